//! L1/L2 entries and the bounded L2 table cache.
//!
//! ```text
//!  L1 entry:  | 63: copied | 56-62: 0 | 9-55: L2 table offset | 0-8: 0 |
//!  L2 entry:  | 63: copied | 62: compressed | 0-61: cluster descriptor |
//!   standard: | 56-61: 0 | 9-55: host cluster offset | 1-8: 0 | 0: reads as zero |
//!   compressed (x = 62 - (cluster_bits - 8)): | x-61: extra sectors | 0..x-1: host offset |
//!  extended:  | entry (64 bits) | bitmap: 32-63 zero bits, 0-31 allocated bits |
//! ```

use super::types::Geometry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Bits 9..=55 of an L1 entry: the L2 table offset.
pub const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits 9..=55 of a standard L2 entry: the host cluster offset.
pub const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount is exactly one (no COW needed).
pub const COPIED: u64 = 1 << 63;
/// Compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Standard cluster reads as zero (v3, without extended L2).
pub const ZERO: u64 = 1;

/// What one (sub)cluster holds, decoded from its L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterState {
    /// Not allocated here: read from the backing file.
    Unallocated,
    /// Reads as zeros; the host offset still assigned (preallocated), if any.
    Zero(Option<u64>),
    /// Data at this host offset (of the subcluster's first byte).
    Data(u64),
    /// Compressed cluster with this descriptor (bits 0..=61 of the entry).
    Compressed(u64),
}

/// Why an L2 entry is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryError {
    /// The host offset is not cluster aligned.
    Unaligned(u64),
    /// A subcluster is marked both allocated and zero.
    AllocatedAndZero(u32),
    /// Compressed clusters are impossible with an external data file.
    CompressedWithDataFile,
    /// A subcluster is marked allocated but the entry has no host offset.
    AllocatedWithoutOffset(u32),
}

/// A raw L2 entry (the first 64 bits with extended L2) and its subcluster bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2Entry {
    /// The entry.
    pub entry: u64,
    /// The subcluster bitmap (0 without extended L2).
    pub bitmap: u64,
}

impl L2Entry {
    /// The state of subcluster `sc` (0 without extended L2) of this entry.
    pub fn state(
        self,
        g: Geometry,
        sc: u32,
        has_data_file: bool,
    ) -> Result<ClusterState, EntryError> {
        if self.entry & COMPRESSED != 0 {
            if has_data_file {
                return Err(EntryError::CompressedWithDataFile);
            }
            return Ok(ClusterState::Compressed(
                self.entry & !(COPIED | COMPRESSED),
            ));
        }
        let host = self.entry & L2_OFFSET_MASK;
        // With an external data file, host offset 0 is valid when the copied bit says
        // the cluster is allocated.
        let allocated = host != 0 || (has_data_file && self.entry & COPIED != 0);
        if g.extended_l2() {
            let alloc_bit = self.bitmap & (1 << sc) != 0;
            let zero_bit = self.bitmap & (1 << (32 + sc)) != 0;
            return match (alloc_bit, zero_bit) {
                (true, true) => Err(EntryError::AllocatedAndZero(sc)),
                (false, true) => Ok(ClusterState::Zero(
                    allocated.then(|| host + u64::from(sc) * g.subcluster_size()),
                )),
                (false, false) => Ok(ClusterState::Unallocated),
                (true, false) if !allocated => Err(EntryError::AllocatedWithoutOffset(sc)),
                (true, false) => {
                    check_aligned(g, host)?;
                    Ok(ClusterState::Data(
                        host + u64::from(sc) * g.subcluster_size(),
                    ))
                }
            };
        }
        if self.entry & ZERO != 0 {
            // Preallocated or not, the cluster reads as zeros.
            return Ok(ClusterState::Zero(allocated.then_some(host)));
        }
        if !allocated {
            return Ok(ClusterState::Unallocated);
        }
        check_aligned(g, host)?;
        Ok(ClusterState::Data(host))
    }
}

fn check_aligned(g: Geometry, host: u64) -> Result<(), EntryError> {
    if g.in_cluster(host) != 0 {
        Err(EntryError::Unaligned(host))
    } else {
        Ok(())
    }
}

/// Host offset and byte length of a compressed cluster's data.
pub fn compressed_extent(g: Geometry, descriptor: u64) -> (u64, u64) {
    let x = 62 - (g.cluster_bits() - 8);
    let host = descriptor & ((1u64 << x) - 1);
    let extra_sectors = (descriptor >> x) & ((1u64 << (62 - x)) - 1);
    let len = (extra_sectors + 1) * 512 - (host & 511);
    (host, len)
}

/// One L2 table, decoded. Entries are atomics so readers never wait for the metadata lock:
/// writers (holding it) store whole entries, readers see the old or the new one.
#[derive(Debug)]
pub struct L2Table {
    words: Box<[AtomicU64]>,
    extended: bool,
    dirty: AtomicBool,
}

impl L2Table {
    /// Decodes a table from its on-disk bytes.
    pub fn from_bytes(bytes: &[u8], extended: bool) -> Self {
        let words = bytes
            .chunks_exact(8)
            .map(|w| AtomicU64::new(u64::from_be_bytes(w.try_into().expect("8 bytes"))))
            .collect();
        L2Table {
            words,
            extended,
            dirty: AtomicBool::new(false),
        }
    }

    /// The entry at `index`.
    pub fn entry(&self, index: usize) -> L2Entry {
        if self.extended {
            L2Entry {
                entry: self.words[2 * index].load(Ordering::Acquire),
                bitmap: self.words[2 * index + 1].load(Ordering::Acquire),
            }
        } else {
            L2Entry {
                entry: self.words[index].load(Ordering::Acquire),
                bitmap: 0,
            }
        }
    }

    /// Stores the entry at `index` and marks the table dirty (metadata lock held).
    ///
    /// With extended entries, an entry that drops its host offset gets its bitmap stored
    /// first, and one that gains an offset gets it stored last, so a concurrent reader never
    /// sees an allocated subcluster without an offset.
    pub fn set(&self, index: usize, e: L2Entry) {
        if self.extended {
            if e.entry & L2_OFFSET_MASK == 0 {
                self.words[2 * index + 1].store(e.bitmap, Ordering::Release);
                self.words[2 * index].store(e.entry, Ordering::Release);
            } else {
                self.words[2 * index].store(e.entry, Ordering::Release);
                self.words[2 * index + 1].store(e.bitmap, Ordering::Release);
            }
        } else {
            self.words[index].store(e.entry, Ordering::Release);
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        if self.extended {
            self.words.len() / 2
        } else {
            self.words.len()
        }
    }

    /// Whether the table has changes not yet written.
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// The on-disk bytes; clears the dirty mark (the caller writes them).
    pub fn take_bytes(&self) -> Vec<u8> {
        self.dirty.store(false, Ordering::Release);
        self.words
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_be_bytes())
            .collect()
    }

    /// Marks the table dirty again (its write failed).
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }
}

struct Slot {
    key: u64,
    table: Arc<L2Table>,
    referenced: bool,
}

#[derive(Default)]
struct CacheInner {
    slots: Vec<Slot>,
    index: HashMap<u64, usize>,
    hand: usize,
}

/// A bounded cache of L2 tables keyed by host offset, with CLOCK eviction (an approximation
/// of least-recently-used that costs O(1) per access).
pub struct L2Cache {
    inner: Mutex<CacheInner>,
    capacity: usize,
    /// Bumped by [`L2Cache::invalidate`]: a table read from disk before that is not cached.
    generation: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for L2Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.inner.lock().map(|i| i.slots.len()).unwrap_or(0);
        f.debug_struct("L2Cache")
            .field("tables", &n)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl L2Cache {
    /// A cache holding at most `capacity` tables (at least 1).
    pub fn new(capacity: usize) -> Self {
        L2Cache {
            inner: Mutex::new(CacheInner::default()),
            capacity: capacity.max(1),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The table at `offset`, if cached.
    pub fn get(&self, offset: u64) -> Option<Arc<L2Table>> {
        let mut inner = self.inner.lock().unwrap();
        let i = *inner.index.get(&offset)?;
        inner.slots[i].referenced = true;
        Some(Arc::clone(&inner.slots[i].table))
    }

    /// Caches `table` at `offset` unless a table is cached there already, and returns the
    /// cached one: a reader's copy loaded from disk must never replace a table a writer
    /// has changed meanwhile. Evicts a table not used recently when full; tables that are
    /// dirty or still held elsewhere (a pending write commit) are never evicted.
    pub fn insert(&self, offset: u64, table: Arc<L2Table>) -> Arc<L2Table> {
        let mut inner = self.inner.lock().unwrap();
        self.insert_locked(&mut inner, offset, table)
    }

    fn insert_locked(
        &self,
        inner: &mut CacheInner,
        offset: u64,
        table: Arc<L2Table>,
    ) -> Arc<L2Table> {
        if let Some(&i) = inner.index.get(&offset) {
            inner.slots[i].referenced = true;
            return Arc::clone(&inner.slots[i].table);
        }
        let result = Arc::clone(&table);
        if inner.slots.len() < self.capacity {
            let i = inner.slots.len();
            inner.slots.push(Slot {
                key: offset,
                table,
                referenced: true,
            });
            inner.index.insert(offset, i);
            return result;
        }
        // Dirty tables are never evicted (they are written by the next flush); if every
        // table is dirty the cache grows past its capacity until then.
        let mut budget = 2 * inner.slots.len();
        loop {
            if budget == 0 {
                let i = inner.slots.len();
                inner.slots.push(Slot {
                    key: offset,
                    table,
                    referenced: true,
                });
                inner.index.insert(offset, i);
                return result;
            }
            budget -= 1;
            let hand = inner.hand;
            inner.hand = (hand + 1) % inner.slots.len();
            let slot = &inner.slots[hand];
            // Held elsewhere: a pending commit will change it; the cache must keep it.
            let pinned = Arc::strong_count(&slot.table) > 1;
            if slot.referenced || slot.table.is_dirty() || pinned {
                inner.slots[hand].referenced = false;
                continue;
            }
            let old = inner.slots[hand].key;
            inner.index.remove(&old);
            inner.slots[hand] = Slot {
                key: offset,
                table,
                referenced: true,
            };
            inner.index.insert(offset, hand);
            return result;
        }
    }

    /// The current generation, to pass to [`L2Cache::insert_read`] for a table about to be
    /// read from disk.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Caches a table read from disk, unless the cache was invalidated since `generation`
    /// was taken (the bytes may be stale then): like [`L2Cache::insert`] otherwise.
    pub fn insert_read(&self, generation: u64, offset: u64, table: Arc<L2Table>) -> Arc<L2Table> {
        let mut inner = self.inner.lock().unwrap();
        if self.generation.load(Ordering::Acquire) != generation {
            return table;
        }
        self.insert_locked(&mut inner, offset, table)
    }

    /// Forgets every clean table, held elsewhere or not (their holders keep their copies),
    /// and makes tables read from disk before this call uncacheable: another process
    /// changed the image.
    pub fn invalidate(&self) {
        let mut inner = self.inner.lock().unwrap();
        self.generation.fetch_add(1, Ordering::AcqRel);
        let keep: Vec<Slot> = std::mem::take(&mut inner.slots)
            .into_iter()
            .filter(|s| s.table.is_dirty())
            .collect();
        *inner = CacheInner::default();
        for s in keep {
            let i = inner.slots.len();
            inner.index.insert(s.key, i);
            inner.slots.push(s);
        }
    }

    /// Whether dirty tables made the cache grow past its capacity (they are only written by
    /// a flush).
    pub fn is_overfull(&self) -> bool {
        self.inner.lock().unwrap().slots.len() > self.capacity
    }

    /// Drops clean tables no one else holds until the cache is at half its capacity
    /// (after a flush made the tables that overfilled it clean): room for as many new
    /// tables again before the next flush.
    pub fn trim(&self) {
        let mut inner = self.inner.lock().unwrap();
        let mut excess = inner.slots.len().saturating_sub(self.capacity / 2);
        if excess == 0 {
            return;
        }
        let keep: Vec<Slot> = std::mem::take(&mut inner.slots)
            .into_iter()
            .filter(|s| {
                let droppable = !s.table.is_dirty() && Arc::strong_count(&s.table) == 1;
                if droppable && excess > 0 {
                    excess -= 1;
                    return false;
                }
                true
            })
            .collect();
        *inner = CacheInner::default();
        for s in keep {
            let i = inner.slots.len();
            inner.index.insert(s.key, i);
            inner.slots.push(s);
        }
    }

    /// The dirty tables with their offsets, in offset order.
    pub fn dirty(&self) -> Vec<(u64, Arc<L2Table>)> {
        let inner = self.inner.lock().unwrap();
        let mut v: Vec<(u64, Arc<L2Table>)> = inner
            .slots
            .iter()
            .filter(|s| s.table.is_dirty())
            .map(|s| (s.key, Arc::clone(&s.table)))
            .collect();
        v.sort_unstable_by_key(|(k, _)| *k);
        v
    }

    /// Number of cached tables.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g() -> Geometry {
        Geometry::new(16, false)
    }

    #[test]
    fn standard_entries_decode() {
        let e = |entry| L2Entry { entry, bitmap: 0 };
        assert_eq!(e(0).state(g(), 0, false), Ok(ClusterState::Unallocated));
        assert_eq!(
            e(COPIED | 0x50000).state(g(), 0, false),
            Ok(ClusterState::Data(0x50000))
        );
        assert_eq!(
            e(0x50000 | ZERO).state(g(), 0, false),
            Ok(ClusterState::Zero(Some(0x50000)))
        );
        assert_eq!(e(ZERO).state(g(), 0, false), Ok(ClusterState::Zero(None)));
        assert_eq!(
            e(0x50200).state(g(), 0, false),
            Err(EntryError::Unaligned(0x50200))
        );
        // External data file: offset 0 with the copied bit is allocated.
        assert_eq!(e(COPIED).state(g(), 0, true), Ok(ClusterState::Data(0)));
        assert_eq!(
            e(COMPRESSED | 5).state(g(), 0, true),
            Err(EntryError::CompressedWithDataFile)
        );
    }

    #[test]
    fn extended_entries_decode_per_subcluster() {
        let g = Geometry::new(16, true);
        let e = L2Entry {
            entry: 0x80000,
            bitmap: 0b0101 | (0b1000 << 32),
        };
        assert_eq!(e.state(g, 0, false), Ok(ClusterState::Data(0x80000)));
        assert_eq!(e.state(g, 1, false), Ok(ClusterState::Unallocated));
        assert_eq!(
            e.state(g, 2, false),
            Ok(ClusterState::Data(0x80000 + 2 * 2048))
        );
        assert_eq!(
            e.state(g, 3, false),
            Ok(ClusterState::Zero(Some(0x80000 + 3 * 2048)))
        );
        let bad = L2Entry {
            entry: 0x80000,
            bitmap: 1 | (1 << 32),
        };
        assert_eq!(bad.state(g, 0, false), Err(EntryError::AllocatedAndZero(0)));
    }

    #[test]
    fn compressed_descriptor_extent() {
        // 64 KiB clusters: x = 54; 2 extra sectors, offset 0x10100.
        let d = (2u64 << 54) | 0x10100;
        assert_eq!(compressed_extent(g(), d), (0x10100, 3 * 512 - 0x100));
    }

    #[test]
    fn cache_is_bounded_and_evicts_unreferenced_tables() {
        let c = L2Cache::new(2);
        let t = || Arc::new(L2Table::from_bytes(&[0u8; 16], false));
        c.insert(1, t());
        c.insert(2, t());
        assert!(c.get(1).is_some());
        c.insert(3, t());
        assert_eq!(c.len(), 2);
        assert!(c.get(3).is_some());
        assert_eq!(
            [1, 2].iter().filter(|&&k| c.get(k).is_some()).count(),
            1,
            "exactly one of the old tables was evicted"
        );
        c.invalidate();
        assert_eq!(c.len(), 0);
    }

    /// Regression: a reader's stale copy replaced a table a writer had just changed.
    #[test]
    fn insert_keeps_the_cached_table_and_returns_it() {
        let c = L2Cache::new(4);
        let writer = c.insert(1, Arc::new(L2Table::from_bytes(&[0u8; 16], false)));
        writer.set(
            0,
            L2Entry {
                entry: 0x50000 | COPIED,
                bitmap: 0,
            },
        );
        let reader_copy = Arc::new(L2Table::from_bytes(&[0u8; 16], false));
        let got = c.insert(1, reader_copy);
        assert_eq!(got.entry(0).entry, 0x50000 | COPIED);
        assert!(Arc::ptr_eq(&got, &writer));
    }

    /// After a flush made the tables that overfilled the cache clean, `trim` brings it back
    /// to its capacity, keeping dirty tables and tables held elsewhere.
    #[test]
    fn trim_drops_clean_tables_down_to_capacity() {
        let c = L2Cache::new(2);
        let held = c.insert(0, Arc::new(L2Table::from_bytes(&[0u8; 16], false)));
        held.mark_dirty();
        let mut others = Vec::new();
        for k in 1..6 {
            let t = c.insert(k, Arc::new(L2Table::from_bytes(&[0u8; 16], false)));
            t.mark_dirty();
            others.push(t);
        }
        assert_eq!(c.len(), 6);
        assert!(c.is_overfull());
        for t in &others[..4] {
            t.take_bytes();
        }
        let still_dirty = others.pop().unwrap();
        drop(others);
        c.trim();
        assert_eq!(c.len(), 2, "the dirty and the held table stay");
        assert!(!c.is_overfull());
        assert!(c.get(0).is_some() && c.get(5).is_some());
        drop((held, still_dirty));
    }

    /// `invalidate` forgets clean tables even while someone holds them, and a table read
    /// from disk before it is not cached after it (its bytes may be stale).
    #[test]
    fn invalidate_forgets_held_tables_and_refuses_stale_reads() {
        let c = L2Cache::new(4);
        let held = c.insert(1, Arc::new(L2Table::from_bytes(&[0u8; 16], false)));
        let before = c.generation();
        c.invalidate();
        assert!(c.get(1).is_none());
        let stale = c.insert_read(before, 2, Arc::new(L2Table::from_bytes(&[0u8; 16], false)));
        assert!(c.get(2).is_none());
        let fresh = c.insert_read(
            c.generation(),
            2,
            Arc::new(L2Table::from_bytes(&[0u8; 16], false)),
        );
        assert!(c.get(2).is_some_and(|t| Arc::ptr_eq(&t, &fresh)));
        drop((held, stale));
    }

    /// Regression: a table held for a pending commit was evicted, losing the commit.
    #[test]
    fn tables_held_elsewhere_are_not_evicted() {
        let c = L2Cache::new(1);
        let held = c.insert(1, Arc::new(L2Table::from_bytes(&[0u8; 16], false)));
        for k in 2..10 {
            c.insert(k, Arc::new(L2Table::from_bytes(&[0u8; 16], false)));
        }
        assert!(c.get(1).is_some_and(|t| Arc::ptr_eq(&t, &held)));
    }
}
