//! Reference counts: the two-level refcount structure, refcount widths 1..=64 bits, and the
//! free-cluster allocator.
//!
//! ```text
//!  host cluster c --> reftable[c / entries_per_block] --> refcount block (one cluster)
//!                     --> entry c % entries_per_block (refcount_bits wide)
//!  entries_per_block = cluster_size * 8 / refcount_bits
//!  sub-byte widths: bit 0 of an entry is the least significant bit of its byte position
//! ```
//!
//! All state lives behind the caller's metadata lock; dirty blocks are written by
//! [`Refcounts::flush`] (before any L2 table that uses the clusters they count).

use super::types::Geometry;
use crate::storage::{Storage, StorageExt};
use crate::{Error, ErrorKind, Result};
use std::collections::HashMap;

/// Bits 9..=63 of a reftable entry: the refcount block offset.
pub const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Clean refcount blocks kept in memory before the least useful are dropped.
const MAX_CACHED_BLOCKS: usize = 1024;

/// Reads entry `index` of a refcount block with `order` (width = 1 << order bits).
pub fn get_entry(block: &[u8], order: u32, index: u64) -> u64 {
    let bits = 1u64 << order;
    if bits >= 8 {
        let bytes = (bits / 8) as usize;
        let at = index as usize * bytes;
        block[at..at + bytes]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    } else {
        let bit = index * bits;
        let byte = block[(bit / 8) as usize];
        (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
    }
}

/// Writes entry `index` of a refcount block with `order`. `value` must fit the width.
pub fn set_entry(block: &mut [u8], order: u32, index: u64, value: u64) {
    let bits = 1u64 << order;
    if bits >= 8 {
        let bytes = (bits / 8) as usize;
        let at = index as usize * bytes;
        let be = value.to_be_bytes();
        block[at..at + bytes].copy_from_slice(&be[8 - bytes..]);
    } else {
        let bit = index * bits;
        let mask = ((1u64 << bits) - 1) as u8;
        let shift = (bit % 8) as u8;
        let b = &mut block[(bit / 8) as usize];
        *b = (*b & !(mask << shift)) | (((value as u8) & mask) << shift);
    }
}

struct Block {
    bytes: Vec<u8>,
    dirty: bool,
}

/// Length of the prefix of `table` that holds every non-empty entry.
fn used_len(table: &[u64]) -> usize {
    table.iter().rposition(|&e| e != 0).map_or(0, |i| i + 1)
}

/// The refcount structure of one image, with a cache of refcount blocks.
pub struct Refcounts {
    geometry: Geometry,
    order: u32,
    reftable_offset: u64,
    reftable_clusters: u64,
    reftable: Vec<u64>,
    /// Entries of `reftable` up to its last non-empty one (the rest are all empty), so
    /// scans over the blocks cost what the image uses, not the table's size.
    reftable_used: usize,
    reftable_dirty: bool,
    blocks: HashMap<u64, Block>,
    /// No cluster below this index is free (a search hint, not a promise beyond the hint).
    free_hint: u64,
    /// The table replaced by the last move, freed once the header no longer points to it.
    old_table: Option<(u64, u64)>,
    /// Clusters freed since the last complete flush. Until the metadata that stopped using
    /// them is on disk, the disk may still map guest data to them: they are not handed out
    /// again before [`Refcounts::end_quarantine`].
    quarantine: std::collections::HashSet<u64>,
    /// Refcounts lowered since the last complete flush, with the sum of their decreases:
    /// until the L2/L1 changes that dropped the references are on disk, the blocks are
    /// written with the current value plus that sum (a crash then leaks, never
    /// under-counts).
    decreased: HashMap<u64, u64>,
}

impl std::fmt::Debug for Refcounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refcounts")
            .field("order", &self.order)
            .field("reftable_offset", &self.reftable_offset)
            .field("reftable_entries", &self.reftable.len())
            .field("cached_blocks", &self.blocks.len())
            .finish()
    }
}

/// Where the refcount table moved to (the header must be updated to point there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReftableMove {
    /// New offset.
    pub offset: u64,
    /// New size in clusters.
    pub clusters: u64,
}

impl Refcounts {
    /// Loads the refcount table described by the header fields.
    pub async fn load(
        file: &dyn Storage,
        geometry: Geometry,
        order: u32,
        reftable_offset: u64,
        reftable_clusters: u32,
    ) -> Result<Self> {
        let bytes = u64::from(reftable_clusters) * geometry.cluster_size();
        let mut raw = vec![0u8; bytes as usize];
        file.read_at(reftable_offset, &mut raw).await?;
        let reftable: Vec<u64> = raw
            .chunks_exact(8)
            .map(|w| u64::from_be_bytes(w.try_into().expect("8 bytes")))
            .collect();
        Ok(Refcounts {
            geometry,
            order,
            reftable_offset,
            reftable_clusters: u64::from(reftable_clusters),
            reftable_used: used_len(&reftable),
            reftable,
            reftable_dirty: false,
            blocks: HashMap::new(),
            free_hint: 0,
            old_table: None,
            quarantine: std::collections::HashSet::new(),
            decreased: HashMap::new(),
        })
    }

    /// Loads the refcount table a header describes.
    pub async fn for_header(file: &dyn Storage, header: &super::header::Header) -> Result<Self> {
        Self::load(
            file,
            header.geometry(),
            header.refcount_order,
            header.refcount_table_offset,
            header.refcount_table_clusters,
        )
        .await
    }

    /// Refcount width in bits.
    pub fn bits(&self) -> u32 {
        1 << self.order
    }

    /// Largest refcount the width can hold.
    pub fn max_refcount(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << self.bits()) - 1
        }
    }

    fn entries_per_block(&self) -> u64 {
        (self.geometry.cluster_size() * 8) >> self.order
    }

    /// The current refcount table offset and size in clusters.
    #[cfg(test)]
    pub fn reftable_location(&self) -> (u64, u64) {
        (self.reftable_offset, self.reftable_clusters)
    }

    async fn block_mut(&mut self, file: &dyn Storage, offset: u64) -> Result<&mut Block> {
        if !self.blocks.contains_key(&offset) {
            if self.blocks.len() >= MAX_CACHED_BLOCKS {
                self.blocks.retain(|_, b| b.dirty);
            }
            let mut bytes = vec![0u8; self.geometry.cluster_size() as usize];
            file.read_at(offset, &mut bytes).await?;
            self.blocks.insert(
                offset,
                Block {
                    bytes,
                    dirty: false,
                },
            );
        }
        Ok(self.blocks.get_mut(&offset).expect("inserted above"))
    }

    fn block_offset(&self, table_index: u64) -> Result<Option<u64>> {
        let Some(&entry) = self.reftable.get(table_index as usize) else {
            return Ok(None);
        };
        let off = entry & REFTABLE_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if self.geometry.in_cluster(off) != 0 {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "Refblock offset {off:#x} unaligned (reftable index: {})",
                    super::check::c_alt_hex(table_index)
                ),
            ));
        }
        Ok(Some(off))
    }

    /// The refcount of host cluster `cluster`.
    pub async fn get(&mut self, file: &dyn Storage, cluster: u64) -> Result<u64> {
        let epb = self.entries_per_block();
        let Some(block) = self.block_offset(cluster / epb)? else {
            return Ok(0);
        };
        let order = self.order;
        let b = self.block_mut(file, block).await?;
        Ok(get_entry(&b.bytes, order, cluster % epb))
    }

    fn check_value(&self, cluster: u64, value: u64) -> Result<()> {
        if value > self.max_refcount() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "refcount of cluster {cluster:#x} would exceed the {}-bit maximum",
                    self.bits()
                ),
            ));
        }
        Ok(())
    }

    /// Sets the refcount of host cluster `cluster` (creating its refcount block, and growing
    /// the refcount table, when needed). Returns a table move the header must record.
    pub async fn set(
        &mut self,
        file: &dyn Storage,
        cluster: u64,
        value: u64,
    ) -> Result<Option<ReftableMove>> {
        self.check_value(cluster, value)?;
        let epb = self.entries_per_block();
        let index = cluster / epb;
        let mut moved = None;
        if self.block_offset(index)?.is_none() {
            if value == 0 {
                return Ok(None);
            }
            // Space first: nothing after a table move may fail for want of it (the move
            // would be lost to the caller).
            self.reserve_block_home(file, index, cluster..cluster + 1)
                .await?;
            if index as usize >= self.reftable.len() {
                moved = Some(self.grow_reftable(file, index + 1, cluster + 1).await?);
            }
            if self.block_offset(index)?.is_none() {
                self.create_block(index, cluster..cluster + 1);
            }
        }
        self.set_existing(file, cluster, value).await?;
        Ok(moved)
    }

    /// Sets a refcount whose block exists.
    async fn set_existing(&mut self, file: &dyn Storage, cluster: u64, value: u64) -> Result<()> {
        let epb = self.entries_per_block();
        let block = self
            .block_offset(cluster / epb)?
            .expect("caller made sure the block exists");
        let order = self.order;
        let b = self.block_mut(file, block).await?;
        let old = get_entry(&b.bytes, order, cluster % epb);
        set_entry(&mut b.bytes, order, cluster % epb, value);
        b.dirty = true;
        if value < old {
            *self.decreased.entry(cluster).or_insert(0) += old - value;
        }
        if value == 0 {
            self.quarantine.insert(cluster);
        }
        Ok(())
    }

    /// Sum of the decreases of `cluster`'s refcount not yet on disk: tables on disk may still
    /// hold that many references beyond the current count.
    pub fn pending_decrease(&self, cluster: u64) -> u64 {
        self.decreased.get(&cluster).copied().unwrap_or(0)
    }

    /// Makes the clusters freed since the last complete flush allocatable again (call once
    /// the metadata that stopped using them is durable).
    pub fn end_quarantine(&mut self) {
        for c in self.quarantine.drain() {
            self.free_hint = self.free_hint.min(c);
        }
    }

    /// The cluster a new refcount block for table index `index` lives on: the first of its
    /// own range outside `avoid` (every cluster of a range without a block has refcount 0,
    /// so any of them is free).
    fn block_home(&self, index: u64, avoid: &std::ops::Range<u64>) -> u64 {
        let first = index * self.entries_per_block();
        (first..first + self.entries_per_block())
            .find(|c| !avoid.contains(c))
            .expect("allocation runs never cover a whole refcount block range")
    }

    /// Takes the space of the block [`Refcounts::create_block`] would make for `index` on
    /// the medium. The block is written later (at a flush): a full disk must fail the
    /// allocation that needs it, not that flush.
    async fn reserve_block_home(
        &self,
        file: &dyn Storage,
        index: u64,
        avoid: std::ops::Range<u64>,
    ) -> Result<()> {
        let home = self.block_home(index, &avoid);
        file.allocate(
            home << self.geometry.cluster_bits(),
            self.geometry.cluster_size(),
        )
        .await
    }

    /// Creates the refcount block of table index `index` inside its own range (so it counts
    /// itself), on a cluster outside `avoid` (whose space the caller reserved with
    /// [`Refcounts::reserve_block_home`]).
    fn create_block(&mut self, index: u64, avoid: std::ops::Range<u64>) {
        let first = index * self.entries_per_block();
        let home = self.block_home(index, &avoid);
        let mut bytes = vec![0u8; self.geometry.cluster_size() as usize];
        set_entry(&mut bytes, self.order, home - first, 1);
        let home_offset = home << self.geometry.cluster_bits();
        self.blocks
            .insert(home_offset, Block { bytes, dirty: true });
        self.reftable[index as usize] = home_offset;
        self.reftable_used = self.reftable_used.max(index as usize + 1);
        self.reftable_dirty = true;
    }

    /// Longest run the allocator hands out at once (half a refcount block's range, so a new
    /// block always finds a home beside the run).
    pub fn max_run(&self) -> u64 {
        self.entries_per_block() / 2
    }

    /// Whether `n` contiguous clusters could be allocated inside the file as it is, when
    /// clusters freed since the last flush wait to be reusable (`None` when none wait).
    pub async fn fits_in_file(&mut self, file: &dyn Storage, n: u64) -> Result<Option<bool>> {
        if self.quarantine.is_empty() {
            return Ok(None);
        }
        let end = file.size()?.div_ceil(self.geometry.cluster_size());
        let (mut start, mut run) = (self.free_hint, 0);
        while run < n && start + n <= end {
            let c = start + run;
            if !self.quarantine.contains(&c) && self.get(file, c).await? == 0 {
                run += 1;
            } else {
                start = c + 1;
                run = 0;
            }
        }
        Ok(Some(run == n))
    }

    /// Allocates `n` (at most [`Refcounts::max_run`]) contiguous free clusters with refcount
    /// 1 and returns the first. Freed clusters are reused; past the last counted cluster
    /// everything is free.
    pub async fn alloc(
        &mut self,
        file: &dyn Storage,
        n: u64,
    ) -> Result<(u64, Option<ReftableMove>)> {
        debug_assert!(n >= 1 && n <= self.max_run());
        let epb = self.entries_per_block();
        let mut start = self.free_hint;
        let mut run = 0;
        while run < n {
            let c = start + run;
            if !self.quarantine.contains(&c) && self.get(file, c).await? == 0 {
                run += 1;
            } else {
                start = c + 1;
                run = 0;
            }
        }
        let mut moved = None;
        let last = (start + n - 1) / epb;
        // Space first: nothing after a table move may fail for want of it.
        for index in start / epb..=last {
            if self.block_offset(index)?.is_none() {
                self.reserve_block_home(file, index, start..start + n)
                    .await?;
            }
        }
        if last as usize >= self.reftable.len() {
            moved = Some(self.grow_reftable(file, last + 1, start + n).await?);
        }
        for index in start / epb..=last {
            if self.block_offset(index)?.is_none() {
                self.create_block(index, start..start + n);
            }
        }
        for c in start..start + n {
            self.set_existing(file, c, 1).await?;
        }
        self.free_hint = start + n;
        Ok((start, moved))
    }

    /// Moves the refcount table to a larger area at the end of the file, with at least
    /// `min_entries` entries and placed at or after cluster `min_start`. The new table and
    /// any refcount blocks it needs form one region that counts itself. The caller must
    /// record the move in the header, then call [`Refcounts::release_old_table`].
    async fn grow_reftable(
        &mut self,
        file: &dyn Storage,
        min_entries: u64,
        min_start: u64,
    ) -> Result<ReftableMove> {
        let cs = self.geometry.cluster_size();
        let bits = self.geometry.cluster_bits();
        let epb = self.entries_per_block();
        let start = (file.size()?.div_ceil(cs))
            .max(min_start)
            .max(self.highest_used_cluster() + 1);
        let mut clusters = (min_entries * 8)
            .div_ceil(cs)
            .max(self.reftable_clusters * 2)
            .max(1);
        let missing = |table_len: usize, table: &[u64], end: u64| -> Vec<u64> {
            (start / epb..=(end - 1) / epb)
                .filter(|&i| {
                    i as usize >= table_len || table[i as usize] & REFTABLE_OFFSET_MASK == 0
                })
                .collect()
        };
        // Fixed point: region = table clusters + one new block per uncovered index.
        let mut new_blocks;
        loop {
            let mut k = 0u64;
            loop {
                new_blocks = missing(self.reftable.len(), &self.reftable, start + clusters + k);
                if new_blocks.len() as u64 == k {
                    break;
                }
                k = new_blocks.len() as u64;
            }
            let end = start + clusters + k;
            let entries = min_entries.max((end - 1) / epb + 1);
            if entries * 8 <= clusters * cs {
                break;
            }
            clusters = (entries * 8).div_ceil(cs);
        }
        let end = start + clusters + new_blocks.len() as u64;
        // The region's space first, before anything changes: a full disk fails here.
        file.allocate(start << bits, (end - start) * cs).await?;
        let mut table = self.reftable.clone();
        table.resize((clusters * cs / 8) as usize, 0);
        for (k, &index) in new_blocks.iter().enumerate() {
            let home = start + clusters + k as u64;
            self.blocks.insert(
                home << bits,
                Block {
                    bytes: vec![0u8; cs as usize],
                    dirty: true,
                },
            );
            table[index as usize] = home << bits;
        }
        self.reftable_used = used_len(&table);
        let old = std::mem::replace(&mut self.reftable, table);
        let written: Result<()> = async {
            for c in start..end {
                self.set_existing(file, c, 1).await?;
            }
            // Blocks first, then the table, then make both durable before the header moves.
            self.write_dirty_blocks(file, true).await?;
            let raw: Vec<u8> = self.reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
            file.write_at(start << bits, &raw).await?;
            file.sync().await
        }
        .await;
        if let Err(e) = written {
            // The old table stays in charge (clusters of the region it counts stay counted:
            // leaks at worst); the new blocks are forgotten.
            self.reftable = old;
            self.reftable_used = used_len(&self.reftable);
            for k in 0..new_blocks.len() as u64 {
                self.blocks.remove(&((start + clusters + k) << bits));
            }
            return Err(e);
        }
        drop(old);
        self.old_table = Some((self.reftable_offset, self.reftable_clusters));
        self.reftable_offset = start << bits;
        self.reftable_clusters = clusters;
        self.reftable_dirty = false;
        self.free_hint = self.free_hint.max(end);
        Ok(ReftableMove {
            offset: start << bits,
            clusters,
        })
    }

    /// Frees the clusters of the refcount table replaced by the last move (call after the
    /// header points to the new table).
    pub async fn release_old_table(&mut self, file: &dyn Storage) -> Result<()> {
        if let Some((offset, clusters)) = self.old_table.take() {
            let first = offset >> self.geometry.cluster_bits();
            for c in first..first + clusters {
                self.set_existing(file, c, 0).await?;
            }
        }
        Ok(())
    }

    fn highest_used_cluster(&self) -> u64 {
        let bits = self.geometry.cluster_bits();
        let blocks = self
            .reftable
            .iter()
            .map(|e| (e & REFTABLE_OFFSET_MASK) >> bits)
            .max()
            .unwrap_or(0);
        let table_end = (self.reftable_offset >> bits) + self.reftable_clusters;
        blocks.max(table_end.saturating_sub(1))
    }

    /// Writes dirty blocks. With `hold_decreases`, entries lowered since the last complete
    /// flush are written with their earlier value and their blocks stay dirty.
    async fn write_dirty_blocks(&mut self, file: &dyn Storage, hold_decreases: bool) -> Result<()> {
        let epb = self.entries_per_block();
        let mut held: HashMap<u64, Vec<(u64, u64)>> = HashMap::new();
        if hold_decreases {
            let max = self.max_refcount();
            for (&c, &pending) in &self.decreased {
                let cached = self.block_offset(c / epb)?;
                if let Some((block, b)) = cached.and_then(|o| Some((o, self.blocks.get(&o)?))) {
                    // Tables on disk may still hold every reference dropped since the last
                    // complete flush, on top of the current ones (increments made after a
                    // decrease count too): write the sum.
                    let current = get_entry(&b.bytes, self.order, c % epb);
                    let safe = current.saturating_add(pending).min(max);
                    held.entry(block).or_default().push((c % epb, safe));
                }
            }
        }
        let mut dirty: Vec<u64> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(&o, _)| o)
            .collect();
        dirty.sort_unstable();
        for o in dirty {
            let b = self.blocks.get_mut(&o).expect("listed above");
            match held.get(&o) {
                None => {
                    file.write_at(o, &b.bytes).await?;
                    b.dirty = false;
                }
                Some(entries) => {
                    let mut safe = b.bytes.clone();
                    for &(i, old) in entries {
                        set_entry(&mut safe, self.order, i, old);
                    }
                    file.write_at(o, &safe).await?;
                }
            }
        }
        Ok(())
    }

    /// First half of a flush: writes dirty refcount blocks with every decrease since the
    /// last complete flush held back (increments reach the disk before the L2 entries that
    /// use them), then, after a barrier, the refcount table if it changed. Blocks stay
    /// dirty when they hold decreases; [`Refcounts::flush_decreases`] writes them once the
    /// L2/L1 tables no longer reference those clusters on disk.
    pub async fn flush(&mut self, file: &dyn Storage, barrier: bool) -> Result<()> {
        self.write_dirty_blocks(file, true).await?;
        if self.reftable_dirty {
            if barrier {
                file.sync().await?;
            }
            let raw: Vec<u8> = self.reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
            file.write_at(self.reftable_offset, &raw).await?;
            self.reftable_dirty = false;
        }
        Ok(())
    }

    /// Rewrites the whole refcount structure with width `1 << new_order`: new blocks and a
    /// new table are laid out at the end of the file (counting themselves), written and made
    /// durable. The caller points the header at the returned table, after which the old
    /// blocks and table are unused (their clusters read refcount 0 in the new structure).
    pub async fn rewrite_with_order(
        &mut self,
        file: &dyn Storage,
        new_order: u32,
    ) -> Result<ReftableMove> {
        let cs = self.geometry.cluster_size();
        let bits = self.geometry.cluster_bits();
        let end = file
            .size()?
            .div_ceil(cs)
            .max(self.highest_used_cluster() + 1);
        let mut values = Vec::with_capacity(end as usize);
        for c in 0..end {
            values.push(self.get(file, c).await?);
        }
        // The old structure's own clusters become free in the new one.
        let (old_table, old_clusters) = (self.reftable_offset >> bits, self.reftable_clusters);
        for c in old_table..old_table + old_clusters {
            values[c as usize] = 0;
        }
        for e in &self.reftable {
            let b = (e & REFTABLE_OFFSET_MASK) >> bits;
            if b != 0 && (b as usize) < values.len() {
                values[b as usize] = 0;
            }
        }
        let max = if new_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u64 << new_order)) - 1
        };
        if let Some(c) = values.iter().position(|&v| v > max) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "cluster {c} has refcount {}, too large for {}-bit refcounts",
                    values[c],
                    1u64 << new_order
                ),
            ));
        }
        let epb = (cs * 8) >> new_order;
        // Fixed point: blocks and table at [end, end + b + t) must count everything.
        let (mut b, mut t) = (1u64, 1u64);
        loop {
            let total = end + b + t;
            let nb = total.div_ceil(epb);
            let nt = (nb * 8).div_ceil(cs);
            if nb == b && nt == t {
                break;
            }
            (b, t) = (nb, nt);
        }
        values.resize((end + b + t) as usize, 1);
        let blocks_at = end;
        let table_at = end + b;
        for i in 0..b {
            let mut block = vec![0u8; cs as usize];
            for j in 0..epb {
                let c = (i * epb + j) as usize;
                if c < values.len() {
                    set_entry(&mut block, new_order, j, values[c]);
                }
            }
            file.write_at((blocks_at + i) << bits, &block).await?;
        }
        let mut table = vec![0u8; (t * cs) as usize];
        for i in 0..b {
            let at = (i * 8) as usize;
            table[at..at + 8].copy_from_slice(&((blocks_at + i) << bits).to_be_bytes());
        }
        file.write_at(table_at << bits, &table).await?;
        file.sync().await?;
        *self = Refcounts {
            geometry: self.geometry,
            order: new_order,
            reftable_offset: table_at << bits,
            reftable_clusters: t,
            reftable: (0..t * cs / 8)
                .map(|i| if i < b { (blocks_at + i) << bits } else { 0 })
                .collect(),
            reftable_used: b as usize,
            reftable_dirty: false,
            blocks: HashMap::new(),
            free_hint: 0,
            old_table: None,
            quarantine: std::collections::HashSet::new(),
            decreased: HashMap::new(),
        };
        Ok(ReftableMove {
            offset: table_at << bits,
            clusters: t,
        })
    }

    /// A cluster in `range` that holds a refcount block, if any.
    pub fn block_in(&self, range: &std::ops::Range<u64>) -> Option<u64> {
        let bits = self.geometry.cluster_bits();
        self.reftable[..self.reftable_used]
            .iter()
            .map(|e| (e & REFTABLE_OFFSET_MASK) >> bits)
            .find(|c| *c != 0 && range.contains(c))
    }

    /// Number of clusters below `end_cluster` with a non-zero refcount, counting at most up
    /// to `limit` (the caller's threshold). Blocks past the end of the file read as zeros
    /// and are skipped; one block buffer is used, not the cache, so a crafted table cannot
    /// make this allocate or scan more than the file holds.
    pub async fn count_used(
        &mut self,
        file: &dyn Storage,
        end_cluster: u64,
        limit: u64,
    ) -> Result<u64> {
        let epb = self.entries_per_block();
        let file_size = file.size()?;
        let mut used = 0;
        let mut buf = vec![0u8; self.geometry.cluster_size() as usize];
        for index in 0..end_cluster.div_ceil(epb).min(self.reftable.len() as u64) {
            let Some(block) = self.block_offset(index)? else {
                continue;
            };
            if block >= file_size {
                continue;
            }
            file.read_at(block, &mut buf).await?;
            let n = epb.min(end_cluster - index * epb);
            used += (0..n)
                .filter(|&i| get_entry(&buf, self.order, i) != 0)
                .count() as u64;
            if used >= limit {
                return Ok(used);
            }
            tokio::task::yield_now().await;
        }
        Ok(used)
    }

    /// Second half of a flush: writes the blocks holding decreases, now that no table on
    /// disk references those clusters any more. Returns whether anything was written.
    pub async fn flush_decreases(&mut self, file: &dyn Storage) -> Result<bool> {
        if self.decreased.is_empty() {
            return Ok(false);
        }
        self.write_dirty_blocks(file, false).await?;
        self.decreased.clear();
        Ok(true)
    }

    /// Whether anything awaits [`Refcounts::flush`].
    pub fn is_dirty(&self) -> bool {
        self.reftable_dirty || self.blocks.values().any(|b| b.dirty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    #[test]
    fn entries_of_every_width_round_trip_without_touching_neighbours() {
        for order in 0..=6u32 {
            let bits = 1u64 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits;
            for i in 0..n {
                set_entry(&mut block, order, i, (i * 7 + 1) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_entry(&block, order, i),
                    (i * 7 + 1) & max,
                    "order {order} entry {i}"
                );
            }
            set_entry(&mut block, order, 3, max);
            assert_eq!(get_entry(&block, order, 2), (2 * 7 + 1) & max);
            assert_eq!(get_entry(&block, order, 4), (4 * 7 + 1) & max);
        }
    }

    #[test]
    fn sub_byte_entries_start_at_the_least_significant_bit() {
        let mut block = [0u8; 2];
        set_entry(&mut block, 0, 0, 1);
        set_entry(&mut block, 0, 9, 1);
        assert_eq!(block, [0b0000_0001, 0b0000_0010]);
        let mut block = [0u8; 1];
        set_entry(&mut block, 2, 1, 0xa);
        assert_eq!(block, [0xa0]);
    }

    /// A fresh image layout: header, reftable, one refblock, all counted in block 0.
    async fn fresh(order: u32, cluster_bits: u32) -> (MemoryStorage, Refcounts) {
        let g = Geometry::new(cluster_bits, false);
        let cs = g.cluster_size();
        let file = MemoryStorage::new();
        let mut block = vec![0u8; cs as usize];
        for i in 0..3 {
            set_entry(&mut block, order, i, 1);
        }
        file.write_at(2 * cs, &block).await.unwrap();
        file.write_at(cs, &(2 * cs).to_be_bytes()).await.unwrap();
        file.resize(3 * cs, crate::PreallocMode::Off).await.unwrap();
        let r = Refcounts::load(&file, g, order, cs, 1).await.unwrap();
        (file, r)
    }

    #[tokio::test]
    async fn alloc_hands_out_free_clusters_and_reuses_freed_ones() {
        let (file, mut r) = fresh(4, 16).await;
        let (a, _) = r.alloc(&file, 2).await.unwrap();
        assert_eq!(a, 3);
        let (b, _) = r.alloc(&file, 1).await.unwrap();
        assert_eq!(b, 5);
        r.set(&file, 3, 0).await.unwrap();
        let (q, _) = r.alloc(&file, 1).await.unwrap();
        assert_eq!(
            q, 6,
            "a cluster freed since the last flush is not reused yet"
        );
        r.end_quarantine();
        let (c, _) = r.alloc(&file, 1).await.unwrap();
        assert_eq!(c, 3, "a freed cluster is reused after the flush");
        assert_eq!(r.get(&file, 4).await.unwrap(), 1);
        r.flush(&file, true).await.unwrap();
        let mut again = Refcounts::load(&file, Geometry::new(16, false), 4, 65536, 1)
            .await
            .unwrap();
        assert_eq!(again.get(&file, 5).await.unwrap(), 1);
        assert_eq!(again.get(&file, 7).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn small_clusters_and_wide_refcounts_grow_blocks_and_the_table() {
        // 512-byte clusters, 64-bit refcounts: 64 entries per block, 64 blocks per table
        // cluster, so 10 000 clusters need new blocks and a larger table.
        let (file, mut r) = fresh(6, 9).await;
        let mut moves = 0;
        let mut allocated = Vec::new();
        for _ in 0..(10_000 / 16) {
            let (c, m) = r.alloc(&file, 16).await.unwrap();
            if let Some(m) = m {
                moves += 1;
                assert!(m.clusters >= 2);
                r.release_old_table(&file).await.unwrap();
            }
            allocated.push(c);
        }
        assert!(moves >= 1);
        r.flush(&file, true).await.unwrap();
        let (off, clusters) = r.reftable_location();
        let mut again = Refcounts::load(&file, Geometry::new(9, false), 6, off, clusters as u32)
            .await
            .unwrap();
        for &c in &allocated {
            for i in 0..16 {
                assert_eq!(
                    again.get(&file, c + i).await.unwrap(),
                    1,
                    "cluster {}",
                    c + i
                );
            }
        }
        // Every refcount block and table cluster counts as used, and no two uses collide.
        let mut used = std::collections::HashSet::new();
        for &c in &allocated {
            for i in 0..16 {
                assert!(used.insert(c + i), "cluster {} handed out twice", c + i);
            }
        }
        let first_table = off >> 9;
        for c in first_table..first_table + clusters {
            assert_eq!(again.get(&file, c).await.unwrap(), 1, "table cluster {c}");
            assert!(!used.contains(&c), "table cluster {c} was also handed out");
        }
        let blocks: Vec<u64> = again
            .reftable
            .iter()
            .map(|e| (e & REFTABLE_OFFSET_MASK) >> 9)
            .filter(|&b| b != 0)
            .collect();
        assert!(blocks.len() > 100);
        for b in blocks {
            assert_eq!(again.get(&file, b).await.unwrap(), 1, "block cluster {b}");
            assert!(!used.contains(&b), "block cluster {b} was also handed out");
        }
    }

    /// A refcount-table move that fails halfway (a full disk, an I/O error while writing
    /// the new table) leaves the old table in charge, and the next allocation moves it
    /// cleanly. Before, the new table stayed in memory with the old offset, and every later
    /// flush failed (or wrote the larger table over what followed the old one).
    #[tokio::test]
    async fn a_failed_table_move_leaves_the_old_table_in_charge() {
        use crate::storage::{FaultKind, FaultOp, FaultStorage};
        // Find the allocation that moves the table (512-byte clusters, 64-bit refcounts).
        let (mem, mut r) = fresh(6, 9).await;
        let mut k = 0;
        while r.alloc(&mem, 16).await.unwrap().1.is_none() {
            k += 1;
        }
        let file = FaultStorage::from_bytes(&mem_bytes_at_start(9, 6).await);
        let g = Geometry::new(9, false);
        let mut r = Refcounts::load(&file, g, 6, 512, 1).await.unwrap();
        let mut allocated = Vec::new();
        for _ in 0..k {
            allocated.push(r.alloc(&file, 16).await.unwrap().0);
        }
        let before = (r.reftable_location(), r.reftable.len());
        file.fail_nth(FaultOp::Write, 1, FaultKind::NoSpace);
        assert!(r.alloc(&file, 16).await.is_err());
        assert_eq!((r.reftable_location(), r.reftable.len()), before);
        // Flushing the old state works, and the next allocation moves the table.
        r.flush(&file, true).await.unwrap();
        let (c, m) = r.alloc(&file, 16).await.unwrap();
        assert!(m.is_some(), "the retried allocation did not move the table");
        allocated.push(c);
        r.release_old_table(&file).await.unwrap();
        r.flush(&file, true).await.unwrap();
        let (off, clusters) = r.reftable_location();
        let mut again = Refcounts::load(&file, g, 6, off, clusters as u32)
            .await
            .unwrap();
        for &c in &allocated {
            for i in 0..16 {
                assert_eq!(
                    again.get(&file, c + i).await.unwrap(),
                    1,
                    "cluster {}",
                    c + i
                );
            }
        }
    }

    /// The bytes [`fresh`] starts from.
    async fn mem_bytes_at_start(cluster_bits: u32, order: u32) -> Vec<u8> {
        let (file, _) = fresh(order, cluster_bits).await;
        file.to_vec()
    }

    #[tokio::test]
    async fn refcount_overflow_is_refused() {
        let (file, mut r) = fresh(0, 16).await;
        assert_eq!(r.max_refcount(), 1);
        let e = r.set(&file, 5, 2).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
    }
}
