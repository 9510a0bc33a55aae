//! The qcow2 write path: cluster allocation, copy-on-write, zeroing, discard, and the flush
//! order that keeps the image consistent after a crash at any point.
//!
//! ```text
//!  allocating write:
//!    [metadata lock] refcounts += new clusters (cached) -> COW head/tail of partial
//!      clusters -> guest clusters marked pending
//!    [no lock] guest data written by the caller (other writes run meanwhile)
//!    [metadata lock] commit: L2 entries updated (cached, dirty) -> old clusters released
//!      -> pending mark removed
//!  flush:  refcount blocks -> sync -> L2 tables -> sync -> L1 table -> sync -> header
//! ```
//! Refcounts reach the disk before any L2 entry that uses their clusters, L2 tables before
//! the L1 entries that point to them, and data before the mapping that exposes it. A crash
//! can therefore leak clusters (refcount without a user) but never expose a cluster whose
//! refcount says it is free.

use super::header::{autoclear, Header};
use super::l2::{
    self, ClusterState, L2Entry, L2Table, COPIED, L1_OFFSET_MASK, L2_OFFSET_MASK, ZERO,
};
use super::refcount::{Refcounts, ReftableMove};
use super::types::GuestOffset;
use super::Qcow2Driver;
use crate::format::{ChainView, DiscardMode, WriteCommit, WriteTarget};
use crate::io_buf::is_zero;
use crate::storage::PreallocMode;
use crate::storage::{Storage, StorageExt};
use crate::{Error, ErrorKind, Result};
use std::sync::Arc;
use tokio::sync::OwnedMutexGuard;

/// Allocation bits of the subclusters of the cluster at `c_start` that `[from, to)` touches.
fn touched_mask(g: super::types::Geometry, c_start: u64, from: u64, to: u64) -> u64 {
    let sc = g.subcluster_size();
    let first = (from - c_start) / sc;
    let last = (to - c_start).div_ceil(sc);
    ((1u64 << last) - 1) & !((1u64 << first) - 1)
}

/// Counts in-place writes whose data is still being written.
#[derive(Debug, Default)]
pub struct InFlight {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One in-flight write; dropping it ends it.
pub struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self
            .0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.idle.notify_waiters();
        }
    }
}

impl InFlight {
    fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        InFlightGuard(Arc::clone(self))
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Guest clusters with an allocating write in flight: new host clusters are allocated and
/// the data is being written, but the L2 entries still show the old state. Nothing else may
/// change those clusters (or their entries) until the write commits or is dropped.
#[derive(Debug, Default)]
pub struct PendingAllocs {
    /// Half-open guest cluster index ranges.
    ranges: std::sync::Mutex<Vec<(u64, u64)>>,
    /// Woken whenever a range is removed.
    done: tokio::sync::Notify,
}

impl PendingAllocs {
    /// The first pending guest cluster in `[first, end)`.
    fn first_in(&self, first: u64, end: u64) -> Option<u64> {
        self.ranges
            .lock()
            .unwrap()
            .iter()
            .filter(|(a, b)| *a < end && *b > first)
            .map(|(a, _)| (*a).max(first))
            .min()
    }

    fn add(&self, first: u64, n: u64) {
        self.ranges.lock().unwrap().push((first, first + n));
    }

    fn remove(&self, first: u64) {
        let mut ranges = self.ranges.lock().unwrap();
        if let Some(i) = ranges.iter().position(|(a, _)| *a == first) {
            ranges.swap_remove(i);
        }
        drop(ranges);
        self.done.notify_waiters();
    }
}

/// Marks guest clusters pending while their allocating write is in flight; dropping it (on
/// commit, or when the write is abandoned) clears the mark and wakes waiters.
struct PendingGuard<'a> {
    pending: &'a PendingAllocs,
    first: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.remove(self.first);
    }
}

/// Mutable metadata, behind the driver's async metadata lock.
#[derive(Debug)]
pub struct Meta {
    pub(super) header: Header,
    refcounts: Option<Refcounts>,
    l1_dirty: bool,
    prepared: bool,
    /// Next free byte in the host cluster that compressed data is being packed into.
    free_byte: Option<u64>,
    /// Length the image file is to have by the next flush: the end of the last run of new
    /// clusters whose zero tail was left unwritten (0: nothing due).
    file_end_due: u64,
    /// Host range covering the new runs since the last flush whose copy-on-write parts
    /// were zeros and left unwritten (holes): allocated at the next flush, as QEMU
    /// allocates such runs with zeros.
    zero_span: Option<(u64, u64)>,
}

impl Meta {
    /// Metadata state for a freshly opened image.
    pub fn new(header: Header) -> Self {
        Meta {
            header,
            refcounts: None,
            l1_dirty: false,
            prepared: false,
            free_byte: None,
            file_end_due: 0,
            zero_span: None,
        }
    }

    /// Starts over from `header` (re-read from the file): refcounts are loaded again before
    /// the next change. What is due at the next flush stays due.
    pub(super) fn reset(&mut self, header: Header) {
        let (file_end_due, zero_span) = (self.file_end_due, self.zero_span);
        *self = Meta::new(header);
        self.file_end_due = file_end_due;
        self.zero_span = zero_span;
    }

    pub(super) fn refcounts(&mut self) -> &mut Refcounts {
        self.refcounts
            .as_mut()
            .expect("refcounts are loaded before the first write")
    }
}

/// Refuses writable opens this code cannot honour safely.
pub fn check_writable(
    header: &Header,
    snapshot: bool,
    file: &dyn Storage,
    data: &dyn Storage,
) -> Result<()> {
    if snapshot {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "snapshots can only be opened read-only",
        ));
    }
    if header.is_corrupt() {
        return Err(Error::new(
            ErrorKind::ReadOnly,
            "the image is marked corrupt: it can only be opened read-only until it is repaired",
        ));
    }
    if header.is_dirty() {
        return Err(Error::new(
            ErrorKind::Corrupt,
            "the image is marked dirty: its refcounts must be rebuilt (vmimg check -r all) \
             before writing",
        ));
    }
    if !file.is_writable() || !data.is_writable() {
        return Err(Error::new(
            ErrorKind::ReadOnly,
            "the image file or its data file is read-only",
        ));
    }
    Ok(())
}

type MetaGuard = OwnedMutexGuard<Meta>;

impl Qcow2Driver {
    fn has_data_file(&self) -> bool {
        self.has_data_file
    }

    /// Takes the metadata lock once no allocating write is in flight on guest clusters
    /// `[first, end)` (`0..u64::MAX`: anywhere in the image).
    pub(super) async fn lock_clear(&self, first: u64, end: u64) -> MetaGuard {
        loop {
            // Listen before looking: a range removed after the check still wakes us.
            let done = self.pending.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            let meta = Arc::clone(&self.meta).lock_owned().await;
            if self.pending.first_in(first, end).is_none() {
                return meta;
            }
            drop(meta);
            done.await;
        }
    }

    /// The metadata lock with no allocating write in flight anywhere.
    pub(super) async fn lock_quiesced(&self) -> MetaGuard {
        self.lock_clear(0, u64::MAX).await
    }

    /// Loads refcounts and clears autoclear bits this code does not maintain, before the
    /// first change to the image.
    pub(super) async fn prepare(&self, meta: &mut Meta) -> Result<()> {
        if self.corrupt.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Corrupt,
                "the image was found corrupt and marked so: no more writes until it is repaired",
            ));
        }
        if meta.prepared {
            return self.mark_dirty_if_lazy(meta).await;
        }
        let refcounts = Refcounts::for_header(self.file.as_ref(), &meta.header).await?;
        meta.refcounts = Some(refcounts);
        // Bitmaps are not updated by our writes: clearing their autoclear bit tells QEMU
        // they are stale. Unknown autoclear bits must be cleared likewise.
        let keep = meta.header.autoclear_features & autoclear::DATA_FILE_RAW;
        if meta.header.autoclear_features != keep {
            meta.header.autoclear_features = keep;
            self.write_header(&meta.header).await?;
            self.file.sync().await?;
        }
        meta.prepared = true;
        self.mark_dirty_if_lazy(meta).await
    }

    /// With lazy refcounts, the dirty bit is set before the first change after a clean
    /// point and cleared by the next complete flush: an image left dirty by a crash gets
    /// its refcounts rebuilt before it is written again.
    async fn mark_dirty_if_lazy(&self, meta: &mut Meta) -> Result<()> {
        if meta.header.lazy_refcounts() && !meta.header.is_dirty() {
            meta.header.incompatible_features |= super::header::incompat::DIRTY;
            self.write_header(&meta.header).await?;
            self.file.sync().await?;
        }
        Ok(())
    }

    /// Whether host cluster `c` holds the header, the active L1 table, the refcount table
    /// or the first cluster of the snapshot table.
    fn is_fixed_metadata(&self, h: &Header, c: u64) -> bool {
        let cs = self.geometry.cluster_size();
        let within = |off: u64, bytes: u64| c >= off / cs && c < (off + bytes).div_ceil(cs);
        c == 0
            || within(h.l1_table_offset, u64::from(h.l1_size) * 8)
            || within(
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters) * cs,
            )
            || (h.nb_snapshots > 0 && within(h.snapshots_offset, 1))
    }

    /// Marks the image corrupt (header bit, no more writes) and returns the error to report.
    async fn mark_corrupt(&self, meta: &mut Meta, what: String) -> Error {
        // Only the first event is told, as QEMU: the image takes no more writes after it.
        if !self.corrupt.swap(true, std::sync::atomic::Ordering::AcqRel) {
            super::report_corruption(&format!(
                "qcow2: Marking image as corrupt: {what}; further corruption events will be suppressed"
            ));
        }
        meta.header.incompatible_features |= super::header::incompat::CORRUPT;
        let written = match self.write_header(&meta.header).await {
            Ok(()) => self.file.sync().await,
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => Error::new(ErrorKind::Corrupt, format!("{what}: image marked corrupt")),
            Err(e) => e.with_operation("mark the image corrupt"),
        }
    }

    /// A refcount structure found broken while in use (an unaligned refblock offset) is
    /// a corruption event, as in QEMU: the image is marked corrupt.
    async fn signal<T>(&self, meta: &mut Meta, r: Result<T>) -> Result<T> {
        match r {
            Err(e)
                if e.kind() == ErrorKind::Corrupt
                    && !self.corrupt.load(std::sync::atomic::Ordering::Acquire) =>
            {
                Err(self.mark_corrupt(meta, e.reason()).await)
            }
            r => r,
        }
    }

    /// Refuses to hand out clusters that hold metadata (a refcount structure that lies):
    /// marks the image corrupt instead, as QEMU's overlap check does.
    async fn check_overlap(&self, meta: &mut Meta, first: u64, n: u64) -> Result<()> {
        let cs = self.geometry.cluster_size();
        let run = first..first + n;
        let fixed = run
            .clone()
            .find(|&c| self.is_fixed_metadata(&meta.header, c));
        let l2 = || {
            self.l1
                .read()
                .unwrap()
                .iter()
                .map(|e| (e & L1_OFFSET_MASK) / cs)
                .find(|c| *c != 0 && run.contains(c))
        };
        let hit = fixed
            .or_else(l2)
            .or_else(|| meta.refcounts().block_in(&run));
        match hit {
            None => Ok(()),
            Some(c) => {
                let what = format!("refcounts claim metadata cluster {:#x} is free", c * cs);
                Err(self.mark_corrupt(meta, what).await)
            }
        }
    }

    /// Refuses guest data aimed at the header, L1 table or refcount table (a crafted L2
    /// entry): marks the image corrupt instead, as QEMU's cheap overlap checks do.
    async fn check_data_target(&self, meta: &mut Meta, host: u64) -> Result<()> {
        if self.has_data_file()
            || !self.is_fixed_metadata(&meta.header, host / self.geometry.cluster_size())
        {
            return Ok(());
        }
        let what = format!("an L2 entry maps guest data onto metadata at {host:#x}");
        Err(self.mark_corrupt(meta, what).await)
    }

    /// Writes `header` and makes it what `describe` reports (bitmaps whose autoclear bit
    /// it clears are gone, as QEMU will see them).
    pub(super) async fn write_header(&self, header: &Header) -> Result<()> {
        let bytes = header.to_bytes().map_err(Error::from)?;
        self.file.write_at(0, &bytes).await?;
        let mut tables = self.tables.write().unwrap();
        let bitmaps = if header.bitmaps_consistent() {
            tables.bitmaps.clone()
        } else {
            Vec::new()
        };
        *tables = Arc::new(super::Tables {
            header: header.clone(),
            snapshots: tables.snapshots.clone(),
            bitmaps,
        });
        Ok(())
    }

    async fn record_move(&self, meta: &mut Meta, moved: Option<ReftableMove>) -> Result<()> {
        if let Some(m) = moved {
            meta.header.refcount_table_offset = m.offset;
            meta.header.refcount_table_clusters = m.clusters as u32;
            self.write_header(&meta.header).await?;
            self.file.sync().await?;
            meta.refcounts()
                .release_old_table(self.file.as_ref())
                .await?;
        }
        Ok(())
    }

    async fn alloc_clusters(&self, meta: &mut Meta, n: u64) -> Result<u64> {
        // Clusters freed since the last flush are reused before the file grows, as QEMU
        // reuses them: making the tables that dropped them durable lets them go.
        let fits = meta.refcounts().fits_in_file(self.file.as_ref(), n).await;
        if self.signal(meta, fits).await? == Some(false) {
            self.flush_locked(meta, true).await?;
        }
        let r = meta.refcounts().alloc(self.file.as_ref(), n).await;
        let (first, moved) = self.signal(meta, r).await?;
        self.record_move(meta, moved).await?;
        self.check_overlap(meta, first, n).await?;
        Ok(first << self.geometry.cluster_bits())
    }

    /// Allocates a cluster for metadata that is written later (at a flush or when the
    /// cache evicts it) and takes its space on the medium now: a full disk then fails the
    /// request that needed the cluster, instead of the flush that would publish every
    /// write confirmed before it. (Space for data is taken by the data write itself.)
    async fn alloc_metadata_cluster(&self, meta: &mut Meta) -> Result<u64> {
        let offset = self.alloc_clusters(meta, 1).await?;
        // On failure the cluster stays counted and unused: a leak, which check repairs.
        self.file
            .allocate(offset, self.geometry.cluster_size())
            .await?;
        Ok(offset)
    }

    /// Drops one reference to a host cluster; `punch` releases the space of a freed cluster.
    async fn unref_cluster(&self, meta: &mut Meta, host: u64, punch: bool) -> Result<()> {
        let c = host >> self.geometry.cluster_bits();
        let v = meta.refcounts().get(self.file.as_ref(), c).await;
        let v = self.signal(meta, v).await?;
        let rc = meta.refcounts();
        if v == 0 {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("cluster {host:#x} is in use but its refcount is 0"),
            ));
        }
        let moved = rc.set(self.file.as_ref(), c, v - 1).await?;
        self.record_move(meta, moved).await?;
        if v == 1
            && meta
                .free_byte
                .is_some_and(|fb| fb >> self.geometry.cluster_bits() == c)
        {
            // The cluster compressed data was packed into is free now: stop packing there.
            meta.free_byte = None;
        }
        if v == 1 && punch {
            self.file
                .discard(host, self.geometry.cluster_size())
                .await?;
        }
        Ok(())
    }

    /// Releases what an L2 entry held (data cluster or compressed extent).
    async fn release_entry(&self, meta: &mut Meta, e: L2Entry, punch: bool) -> Result<()> {
        if e.entry & l2::COMPRESSED != 0 {
            let (host, len) =
                l2::compressed_extent(self.geometry, e.entry & !(COPIED | l2::COMPRESSED));
            // The bytes may be reused: a cached copy keyed by this extent must go.
            self.forget_decompressed(host, len);
            let cs = self.geometry.cluster_size();
            let first = host / cs;
            let last = (host + len - 1) / cs;
            for c in first..=last {
                self.unref_cluster(meta, c * cs, false).await?;
            }
            return Ok(());
        }
        let host = e.entry & L2_OFFSET_MASK;
        if host != 0 && !self.has_data_file() {
            self.unref_cluster(meta, host, punch).await?;
        }
        Ok(())
    }

    /// The L2 table for `l1_index`, made writable: allocated if missing, copied if shared
    /// with a snapshot.
    async fn writable_l2(&self, meta: &mut Meta, l1_index: usize) -> Result<Arc<L2Table>> {
        if self.cache.is_overfull() {
            // Dirty tables are only written by a flush: one operation touching more tables
            // than the cache holds (zeroing a petabyte) must not keep them all in memory.
            self.flush_locked(meta, false).await?;
            self.cache.trim();
        }
        let l1e = self
            .l1
            .read()
            .unwrap()
            .get(l1_index)
            .copied()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::OutOfBounds,
                    format!("L1 index {l1_index} is past the L1 table"),
                )
            })?;
        let old = l1e & L1_OFFSET_MASK;
        let cs = self.geometry.cluster_size();
        if old != 0 && self.geometry.in_cluster(old) != 0 {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("L2 table offset {old:#x} is unaligned (L1 index {l1_index})"),
            ));
        }
        if old != 0 && l1e & COPIED != 0 {
            return self.l2_table(old).await;
        }
        let new_table;
        let new_offset;
        if old == 0 {
            new_offset = self.alloc_metadata_cluster(meta).await?;
            new_table = Arc::new(L2Table::from_bytes(
                &vec![0u8; cs as usize],
                self.geometry.extended_l2(),
            ));
        } else {
            let rc = meta.refcounts().get(self.file.as_ref(), old / cs).await?;
            if rc == 1 {
                // Not shared after all: only the flag was missing.
                self.l1.write().unwrap()[l1_index] = old | COPIED;
                meta.l1_dirty = true;
                return self.l2_table(old).await;
            }
            let shared = self.l2_table(old).await?;
            new_offset = self.alloc_metadata_cluster(meta).await?;
            let mut bytes = Vec::with_capacity(cs as usize);
            for i in 0..shared.len() {
                let mut e = shared.entry(i);
                let host = e.entry & L2_OFFSET_MASK;
                if e.entry & l2::COMPRESSED == 0 && host != 0 {
                    let rc = if self.has_data_file() {
                        1
                    } else {
                        meta.refcounts().get(self.file.as_ref(), host / cs).await?
                    };
                    e.entry = if rc == 1 {
                        e.entry | COPIED
                    } else {
                        e.entry & !COPIED
                    };
                }
                bytes.extend_from_slice(&e.entry.to_be_bytes());
                if self.geometry.extended_l2() {
                    bytes.extend_from_slice(&e.bitmap.to_be_bytes());
                }
            }
            new_table = Arc::new(L2Table::from_bytes(&bytes, self.geometry.extended_l2()));
            self.unref_cluster(meta, old, false).await?;
        }
        new_table.mark_dirty();
        let new_table = self.cache.insert(new_offset, new_table);
        self.l1.write().unwrap()[l1_index] = new_offset | COPIED;
        meta.l1_dirty = true;
        Ok(new_table)
    }

    /// Reads this layer's current content of `[offset, offset + buf.len())` (falling through
    /// to `below` where unallocated).
    async fn read_own(&self, offset: u64, buf: &mut [u8], below: ChainView<'_>) -> Result<()> {
        let mut pos = 0usize;
        let size = self.size.load(std::sync::atomic::Ordering::Acquire);
        while pos < buf.len() {
            let at = offset + pos as u64;
            if at >= size {
                buf[pos..].fill(0);
                break;
            }
            let want = ((buf.len() - pos) as u64).min(size - at);
            let (state, n) = self.map_run(at, want).await?;
            let n = n as usize;
            let piece = &mut buf[pos..pos + n];
            match state {
                ClusterState::Unallocated => below.read(at, piece).await?,
                ClusterState::Zero(_) => piece.fill(0),
                ClusterState::Data(host) => {
                    let within = at % self.geometry.subcluster_size();
                    self.data.read_at(host + within, piece).await?
                }
                ClusterState::Compressed(d) => {
                    let cluster = self.decompressed_cluster(d).await?;
                    let skip = self.geometry.in_cluster(at) as usize;
                    piece.copy_from_slice(&cluster[skip..skip + n]);
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Whether a write to `[offset, end)` of the cluster with entry `e` can go in place; the
    /// host offset of the cluster if so.
    fn in_place(&self, e: L2Entry, offset: u64, end: u64) -> Option<u64> {
        if e.entry & (l2::COMPRESSED | ZERO) != 0 || e.entry & COPIED == 0 {
            return None;
        }
        let host = e.entry & L2_OFFSET_MASK;
        if (host == 0 && !self.has_data_file()) || self.geometry.in_cluster(host) != 0 {
            return None;
        }
        if self.geometry.extended_l2() {
            // Every subcluster the write touches must be allocated already.
            let sc = self.geometry.subcluster_size();
            let c_start = offset - self.geometry.in_cluster(offset);
            let first = (offset - c_start) / sc;
            let last = (end - c_start).div_ceil(sc);
            let needed = ((1u64 << last) - 1) & !((1u64 << first) - 1);
            if e.bitmap & needed != needed {
                return None;
            }
        }
        Some(host)
    }

    /// Makes a prefix of `[offset, offset + len)` writable; see
    /// [`FormatDriver::map_for_write`](crate::FormatDriver::map_for_write).
    pub(super) async fn map_for_write_impl<'a>(
        &'a self,
        offset: u64,
        len: u64,
        below: ChainView<'a>,
    ) -> Result<WriteTarget<'a>> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let first_cluster = offset / cs;
        let mut meta: MetaGuard = self.lock_clear(first_cluster, first_cluster + 1).await;
        self.prepare(&mut meta).await?;
        let coverage_end = (offset / g.l2_coverage() + 1) * g.l2_coverage();
        let mut end = (offset + len).min(coverage_end);
        // Stop before the next cluster another allocating write is filling.
        if let Some(c) = self.pending.first_in(first_cluster + 1, end.div_ceil(cs)) {
            end = end.min(c * cs);
        }
        let cluster = g.guest_cluster(GuestOffset(offset));
        let l1_index = g.l1_index(cluster) as usize;
        let table = self.writable_l2(&mut meta, l1_index).await?;
        let c_start = offset / cs * cs;
        let idx = |pos: u64| g.l2_index(g.guest_cluster(GuestOffset(pos)));
        let piece_end = |pos: u64| (pos / cs * cs + cs).min(end);

        let e0 = table.entry(idx(offset));
        if let Some(host) = self.in_place(e0, offset, piece_end(offset)) {
            self.check_data_target(&mut meta, host).await?;
            let mut pos = c_start + cs;
            while pos < end {
                match self.in_place(table.entry(idx(pos)), pos, piece_end(pos)) {
                    Some(h) if h == host + (pos - c_start) => pos += cs,
                    _ => break,
                }
            }
            return Ok(WriteTarget {
                len: pos.min(end) - offset,
                storage: self.data.as_ref(),
                offset: host + (offset - c_start),
                commit: None,
                hold: Some(Box::new(self.inflight.enter())),
            });
        }

        let size = self.size.load(std::sync::atomic::Ordering::Acquire);
        let e0_host = e0.entry & L2_OFFSET_MASK;
        if g.extended_l2()
            && e0.entry & COPIED != 0
            && e0.entry & l2::COMPRESSED == 0
            && (e0_host != 0 || self.has_data_file())
            && g.in_cluster(e0_host) == 0
        {
            // An allocated cluster with unallocated (or zero) subclusters under the write:
            // fill just those subclusters in place, copying the uncovered parts of the
            // partial ones, then mark them allocated.
            let host = e0_host;
            self.check_data_target(&mut meta, host).await?;
            let w_end = piece_end(offset);
            let touched = touched_mask(g, c_start, offset, w_end);
            self.cow_subclusters(e0, c_start, host, offset, w_end, size, below)
                .await?;
            let i = idx(offset);
            let commit: WriteCommit<'a> = Box::new(move || {
                Box::pin(async move {
                    let old = table.entry(i);
                    let bitmap = (old.bitmap | touched) & !(touched << 32);
                    table.set(
                        i,
                        L2Entry {
                            entry: old.entry,
                            bitmap,
                        },
                    );
                    drop(meta);
                    Ok(())
                })
            });
            return Ok(WriteTarget {
                len: w_end - offset,
                storage: self.data.as_ref(),
                offset: host + (offset - c_start),
                commit: Some(commit),
                hold: None,
            });
        }

        // A run of clusters that need a new host cluster.
        let max_run = if self.has_data_file() {
            u64::MAX
        } else {
            meta.refcounts().max_run()
        };
        let mut n = 1u64;
        let mut pos = c_start + cs;
        while pos < end
            && n < max_run
            && self
                .in_place(table.entry(idx(pos)), pos, piece_end(pos))
                .is_none()
        {
            pos += cs;
            n += 1;
        }
        let run_end = pos.min(end);
        let new_host = if self.has_data_file() {
            // Data file clusters sit at their guest offset and are not refcounted.
            c_start
        } else {
            self.alloc_clusters(&mut meta, n).await?
        };

        // Copy-on-write: the parts of the first and last cluster the write does not cover.
        // A cluster with extended L2 entries and nothing allocated keeps its untouched
        // subclusters unallocated (or zero), so only the partial subclusters are copied.
        let first_index = idx(offset);
        let extended = g.extended_l2();
        let data_file = self.has_data_file();
        let fresh = move |e: L2Entry| {
            extended
                && e.entry & l2::COMPRESSED == 0
                && e.entry & L2_OFFSET_MASK == 0
                && !(data_file && e.entry & COPIED != 0)
        };
        let sc = g.subcluster_size();
        let last_start = (run_end - 1) / cs * cs;
        let head_from = if fresh(e0) { offset / sc * sc } else { c_start };
        // Space past the end of the file reads as zeros already: copied zeros need no write.
        let fresh_space = !self.has_data_file() && new_host >= self.file.size()?;
        // Whether a copy-on-write part was zeros and left as a hole.
        let mut skipped = false;
        if offset > head_from {
            let mut head = vec![0u8; (offset - head_from) as usize];
            self.read_own(head_from, &mut head, below).await?;
            if fresh_space && is_zero(&head) {
                skipped = true;
            } else {
                self.data
                    .write_at(new_host + (head_from - c_start), &head)
                    .await?;
            }
        }
        let e_last = table.entry(idx(last_start));
        let tail_limit = if fresh(e_last) {
            run_end.div_ceil(sc) * sc
        } else {
            last_start + cs
        };
        let tail_end = tail_limit.min(size.div_ceil(512) * 512).max(run_end);
        let mut covered = run_end;
        if run_end < tail_end {
            let mut tail = vec![0u8; (tail_end - run_end) as usize];
            self.read_own(run_end, &mut tail, below).await?;
            if fresh_space && is_zero(&tail) {
                skipped = true;
            } else {
                self.data
                    .write_at(new_host + (run_end - c_start), &tail)
                    .await?;
                covered = tail_end;
            }
        }
        if skipped {
            // QEMU writes zeros over the whole run (allocating it) when its copy-on-write
            // parts are zeros; the holes left here get the same at the next flush, so the
            // file occupies what QEMU's would (and QEMU does not take the image for a
            // metadata-preallocated one).
            let (start, end) = (new_host, new_host + n * cs);
            meta.zero_span = Some(match meta.zero_span {
                Some((a, b)) => (a.min(start), b.max(end)),
                None => (start, end),
            });
        }
        if fresh_space && covered < c_start + n * cs {
            // The rest of the new run reads as zeros already. As in QEMU, it becomes part of
            // the file all the same (so the file ends on a cluster boundary, like qemu-img's
            // output to the byte), but only at the next flush: one resize then instead of
            // a system call for every allocating write.
            meta.file_end_due = meta.file_end_due.max(new_host + n * cs);
        }

        // The data is written without the metadata lock: other writes (and flushes) run
        // meanwhile, and the pending mark keeps them off these clusters until the commit.
        self.pending.add(first_cluster, n);
        let pending = PendingGuard {
            pending: &self.pending,
            first: first_cluster,
        };
        drop(meta);
        let commit: WriteCommit<'a> = Box::new(move || {
            Box::pin(async move {
                let mut meta = Arc::clone(&self.meta).lock_owned().await;
                for k in 0..n {
                    let i = first_index + k as usize;
                    let old = table.entry(i);
                    let ck = c_start + k * cs;
                    let bitmap = if !extended {
                        0
                    } else if fresh(old) {
                        let t = touched_mask(g, ck, offset.max(ck), run_end.min(ck + cs));
                        t | (old.bitmap & !(t << 32) & (0xffff_ffff << 32))
                    } else {
                        0xffff_ffff
                    };
                    let new = L2Entry {
                        entry: (new_host + k * cs) | COPIED,
                        bitmap,
                    };
                    table.set(i, new);
                    let old_host = old.entry & L2_OFFSET_MASK;
                    let reused = self.has_data_file() && old_host == new_host + k * cs;
                    if !reused {
                        self.release_entry(&mut meta, old, false).await?;
                    }
                }
                drop(pending);
                drop(meta);
                Ok(())
            })
        });
        Ok(WriteTarget {
            len: run_end - offset,
            storage: self.data.as_ref(),
            offset: new_host + (offset - c_start),
            commit: Some(commit),
            hold: None,
        })
    }

    /// Before filling subclusters of an allocated extended-L2 cluster in place: copies the
    /// parts of the partially written, not yet allocated subclusters that the write
    /// `[from, to)` does not cover.
    #[allow(clippy::too_many_arguments)]
    async fn cow_subclusters(
        &self,
        e: L2Entry,
        c_start: u64,
        host: u64,
        from: u64,
        to: u64,
        size: u64,
        below: ChainView<'_>,
    ) -> Result<()> {
        let sc = self.geometry.subcluster_size();
        let allocated = |pos: u64| e.bitmap & (1 << ((pos - c_start) / sc)) != 0;
        let head_from = from / sc * sc;
        if from > head_from && !allocated(from) {
            let mut head = vec![0u8; (from - head_from) as usize];
            self.read_own(head_from, &mut head, below).await?;
            self.data
                .write_at(host + (head_from - c_start), &head)
                .await?;
        }
        let tail_to = (to.div_ceil(sc) * sc).min(size.div_ceil(512) * 512);
        if to < tail_to && !allocated(to - 1) {
            let mut tail = vec![0u8; (tail_to - to) as usize];
            self.read_own(to, &mut tail, below).await?;
            self.data.write_at(host + (to - c_start), &tail).await?;
        }
        Ok(())
    }

    /// Finds `n` (< cluster size) bytes for compressed data, packed right after the
    /// previous compressed cluster: in the same host cluster when it fits (one more
    /// reference to it), else spilling into the next host cluster when that one is free to
    /// take (one more reference to each), else at the start of a new cluster.
    async fn alloc_bytes(&self, meta: &mut Meta, n: u64) -> Result<u64> {
        let cs = self.geometry.cluster_size();
        let mut packing = meta.free_byte.filter(|fb| fb % cs != 0);
        if let Some(fb) = packing {
            // A cluster whose refcount is at the width's maximum takes no more users: narrow
            // refcounts (1 to 4 bits) fill up after a few compressed clusters. References
            // dropped since the last flush still count: tables on disk may hold them.
            let rc = meta.refcounts();
            let max = rc.max_refcount();
            let pending = rc.pending_decrease(fb / cs);
            if rc
                .get(self.file.as_ref(), fb / cs)
                .await?
                .saturating_add(pending)
                >= max
            {
                packing = None;
            }
        }
        if let Some(fb) = packing {
            let c = fb / cs;
            if fb % cs + n <= cs {
                self.add_ref(meta, c).await?;
                meta.free_byte = Some(fb + n);
                return Ok(fb);
            }
            let next = self.alloc_clusters(meta, 1).await?;
            if next == (c + 1) * cs {
                self.add_ref(meta, c).await?;
                meta.free_byte = Some(fb + n);
                return Ok(fb);
            }
            meta.free_byte = Some(next + n);
            return Ok(next);
        }
        let start = self.alloc_clusters(meta, 1).await?;
        meta.free_byte = Some(start + n);
        Ok(start)
    }

    async fn add_ref(&self, meta: &mut Meta, cluster: u64) -> Result<()> {
        let v = meta.refcounts().get(self.file.as_ref(), cluster).await;
        let v = self.signal(meta, v).await?;
        let moved = meta
            .refcounts()
            .set(self.file.as_ref(), cluster, v + 1)
            .await?;
        self.record_move(meta, moved).await
    }

    /// Stores a whole cluster compressed; see
    /// [`FormatDriver::write_compressed`](crate::FormatDriver::write_compressed).
    pub(super) async fn write_compressed_impl(
        &self,
        offset: u64,
        buf: &[u8],
        below: ChainView<'_>,
    ) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let size = self.size.load(std::sync::atomic::Ordering::Acquire);
        let len = buf.len() as u64;
        if g.in_cluster(offset) != 0 || !(len == cs || (len < cs && offset + len == size)) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("compressed writes take whole clusters ({cs} bytes at aligned offsets)"),
            ));
        }
        if self.has_data_file() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "compressed clusters are impossible with an external data file",
            ));
        }
        let mut cluster = buf.to_vec();
        cluster.resize(cs as usize, 0);
        let kind = self.compression;
        // Compression is CPU work: off the executor, and outside the metadata lock so that
        // many clusters compress in parallel.
        let compressed = super::compress::run_cpu(move || {
            super::compress::compress(kind, &cluster).ok_or(cluster)
        })
        .await?;
        let data = match compressed {
            Ok(data) => data,
            Err(_) => return self.write_buf(offset, buf, below).await,
        };
        let mut meta = self.lock_clear(offset / cs, offset / cs + 1).await;
        self.prepare(&mut meta).await?;
        let cluster = g.guest_cluster(GuestOffset(offset));
        let table = self
            .writable_l2(&mut meta, g.l1_index(cluster) as usize)
            .await?;
        let host = self.alloc_bytes(&mut meta, data.len() as u64).await?;
        self.forget_decompressed(host, data.len() as u64);
        self.file.write_at(host, &data).await?;
        let x = 62 - (g.cluster_bits() - 8);
        let extra_sectors = (host + data.len() as u64 - 1) / 512 - host / 512;
        let entry = l2::COMPRESSED | (extra_sectors << x) | host;
        let i = g.l2_index(cluster);
        let old = table.entry(i);
        table.set(i, L2Entry { entry, bitmap: 0 });
        self.release_entry(&mut meta, old, false).await
    }

    /// Writes `buf` at guest `offset` through the allocation path (for zeroing and
    /// discarding partial clusters).
    pub(super) async fn write_buf(
        &self,
        offset: u64,
        buf: &[u8],
        below: ChainView<'_>,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let t = self
                .map_for_write_impl(at, (buf.len() - done) as u64, below)
                .await?;
            let n = t.len as usize;
            t.storage.write_at(t.offset, &buf[done..done + n]).await?;
            if let Some(c) = t.commit {
                c().await?;
            }
            done += n;
        }
        Ok(())
    }

    /// Sets the entry of the whole cluster at `offset` with the metadata lock held.
    pub(super) async fn set_cluster(
        &self,
        offset: u64,
        new: impl FnOnce(L2Entry) -> (L2Entry, bool),
        punch: bool,
    ) -> Result<()> {
        let g = self.geometry;
        let c = offset / g.cluster_size();
        let mut meta = self.lock_clear(c, c + 1).await;
        self.prepare(&mut meta).await?;
        let cluster = g.guest_cluster(GuestOffset(offset));
        let table = self
            .writable_l2(&mut meta, g.l1_index(cluster) as usize)
            .await?;
        let i = g.l2_index(cluster);
        let old = table.entry(i);
        let (entry, release) = new(old);
        table.set(i, entry);
        if release {
            self.release_entry(&mut meta, old, punch).await?;
        }
        Ok(())
    }

    /// The L2 entry of the cluster holding `offset` (zero when it has no L2 table).
    async fn current_entry(&self, offset: u64) -> Result<L2Entry> {
        let g = self.geometry;
        let cluster = g.guest_cluster(GuestOffset(offset));
        let l1e = self
            .l1
            .read()
            .unwrap()
            .get(g.l1_index(cluster) as usize)
            .copied()
            .unwrap_or(0);
        if l1e & L1_OFFSET_MASK == 0 {
            return Ok(L2Entry {
                entry: 0,
                bitmap: 0,
            });
        }
        Ok(self
            .l2_table(l1e & L1_OFFSET_MASK)
            .await?
            .entry(g.l2_index(cluster)))
    }

    /// The per-cluster pieces of `[offset, offset + len)`: (start, end, cluster start,
    /// whether the piece covers its whole cluster, or all of it inside the image).
    fn cluster_pieces(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Iterator<Item = (u64, u64, u64, bool)> + 'static {
        let cs = self.geometry.cluster_size();
        let size = self.size.load(std::sync::atomic::Ordering::Acquire);
        let end = offset + len;
        // Lazily: zeroing or discarding terabytes must not build a list per cluster.
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let c_start = pos / cs * cs;
            let piece_end = end.min(c_start + cs);
            let whole = pos == c_start && piece_end >= (c_start + cs).min(size);
            let piece = (pos, piece_end, c_start, whole);
            pos = piece_end;
            Some(piece)
        })
    }

    /// For part `[pos, piece_end)` of cluster `[c_start, c_end)`: `None` when the cluster
    /// holds data, else whether the rest of it reads as zeros below (allocated nowhere, or
    /// holes and zero clusters). Data that happens to be zero counts as data, as in QEMU.
    async fn rest_zero_below(
        &self,
        (c_start, c_end): (u64, u64),
        (pos, piece_end): (u64, u64),
        below: ChainView<'_>,
    ) -> Result<Option<bool>> {
        let (state, _) = self.map_run(c_start, c_end - c_start).await?;
        if !matches!(state, ClusterState::Zero(_) | ClusterState::Unallocated) {
            return Ok(None);
        }
        Ok(Some(
            below.known_zero(c_start, pos - c_start).await?
                && below
                    .known_zero(piece_end, c_end.max(piece_end) - piece_end)
                    .await?,
        ))
    }

    /// Zeroes `[offset, offset + len)`: whole clusters by metadata where the format allows,
    /// the rest by writing zeros.
    pub(super) async fn write_zeroes_impl(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        below: ChainView<'_>,
    ) -> Result<()> {
        let v3 = self.tables().header.version >= 3;
        let raw_data = self.tables().header.data_file_raw();
        for (pos, piece_end, c_start, whole) in self.cluster_pieces(offset, len) {
            let c_end = (c_start + self.geometry.cluster_size())
                .min(self.size.load(std::sync::atomic::Ordering::Acquire));
            // As QEMU: part of a cluster that reads as zeros by its status (zero, or
            // allocated nowhere below) zeroes the whole cluster instead of writing data.
            // The cluster's own state is looked at again under the lock, where it counts:
            // a racing write may have filled the cluster meanwhile.
            let partial =
                !whole && v3 && !raw_data && !self.geometry.extended_l2() && !self.has_data_file();
            let below_zero = if partial {
                self.rest_zero_below((c_start, c_end), (pos, piece_end), below)
                    .await?
            } else {
                None
            };
            if (whole || below_zero.is_some()) && v3 && !raw_data {
                let extended = self.geometry.extended_l2();
                let data_file = self.has_data_file();
                let zeroed = std::sync::atomic::AtomicBool::new(false);
                self.set_cluster(
                    c_start,
                    |old| {
                        let plain = old.entry & l2::COMPRESSED == 0;
                        let reads_zero = plain
                            && (old.entry & ZERO != 0
                                || (old.entry & L2_OFFSET_MASK == 0 && below_zero == Some(true)));
                        if !whole && !reads_zero {
                            return (old, false);
                        }
                        zeroed.store(true, std::sync::atomic::Ordering::Relaxed);
                        let host = old.entry & L2_OFFSET_MASK;
                        let keep = !unmap
                            && old.entry & COPIED != 0
                            && old.entry & l2::COMPRESSED == 0
                            && (host != 0 || data_file);
                        let entry = if keep { host | COPIED } else { 0 };
                        let new = if extended {
                            L2Entry {
                                entry,
                                bitmap: 0xffff_ffff << 32,
                            }
                        } else {
                            L2Entry {
                                entry: entry | ZERO,
                                bitmap: 0,
                            }
                        };
                        (new, !keep)
                    },
                    unmap,
                )
                .await?;
                if !zeroed.load(std::sync::atomic::Ordering::Relaxed) {
                    self.write_buf(pos, &vec![0u8; (piece_end - pos) as usize], below)
                        .await?;
                }
            } else if v3 && !raw_data && self.geometry.extended_l2() && !whole {
                // Whole subclusters get their zero bit; partial ones are written.
                let sc = self.geometry.subcluster_size();
                let (a, b) = (pos.div_ceil(sc) * sc, piece_end / sc * sc);
                let e = self.current_entry(c_start).await?;
                if a < b && e.entry & l2::COMPRESSED == 0 {
                    let mask = touched_mask(self.geometry, c_start, a, b);
                    self.set_cluster(
                        c_start,
                        |old| {
                            let bitmap = (old.bitmap & !mask) | (mask << 32);
                            (
                                L2Entry {
                                    entry: old.entry,
                                    bitmap,
                                },
                                false,
                            )
                        },
                        false,
                    )
                    .await?;
                    for (x, y) in [(pos, a), (b, piece_end)] {
                        if x < y {
                            self.write_buf(x, &vec![0u8; (y - x) as usize], below)
                                .await?;
                        }
                    }
                } else {
                    self.write_buf(pos, &vec![0u8; (piece_end - pos) as usize], below)
                        .await?;
                }
            } else if whole && below.is_empty() && !raw_data {
                // v2 without backing: an unallocated cluster already reads as zeros.
                let (state, _) = self.map_run(c_start, c_end - c_start).await?;
                if state != ClusterState::Unallocated {
                    self.write_buf(pos, &vec![0u8; (piece_end - pos) as usize], below)
                        .await?;
                }
            } else {
                self.write_buf(pos, &vec![0u8; (piece_end - pos) as usize], below)
                    .await?;
            }
        }
        Ok(())
    }

    /// Discards `[offset, offset + len)` with the meaning `mode`.
    pub(super) async fn discard_impl(
        &self,
        offset: u64,
        len: u64,
        mode: DiscardMode,
        below: ChainView<'_>,
    ) -> Result<()> {
        if mode == DiscardMode::ReadsZero {
            return self.write_zeroes_impl(offset, len, true, below).await;
        }
        if self.tables().header.data_file_raw() {
            // A raw data file must keep reading as the guest disk (and has no backing file):
            // discarded whole clusters read as zeros there, as in QEMU; partial ones are
            // left alone unless zeros were asked for.
            let cs = self.geometry.cluster_size();
            let size = self.size.load(std::sync::atomic::Ordering::Acquire);
            let (start, end) = if mode == DiscardMode::ReadsAnything {
                let end = if offset + len >= size {
                    size
                } else {
                    (offset + len) / cs * cs
                };
                (offset.div_ceil(cs) * cs, end)
            } else {
                (offset, offset + len)
            };
            if start < end {
                self.write_zeroes_impl(start, end - start, true, below)
                    .await?;
            }
            return Ok(());
        }
        let v3 = self.tables().header.version >= 3;
        if mode == DiscardMode::ReadsAnything && !v3 && !below.is_empty() {
            // v2 has no zero clusters: unmapping would expose the backing file's data where
            // the guest had written its own, so the data stays (as in QEMU).
            return Ok(());
        }
        for (pos, piece_end, c_start, whole) in self.cluster_pieces(offset, len) {
            let zero = mode == DiscardMode::ReadsAnything && v3 && !below.is_empty();
            if whole {
                let extended = self.geometry.extended_l2();
                self.set_cluster(
                    c_start,
                    |_| {
                        let new = match (zero, extended) {
                            (true, true) => L2Entry {
                                entry: 0,
                                bitmap: 0xffff_ffff << 32,
                            },
                            (true, false) => L2Entry {
                                entry: ZERO,
                                bitmap: 0,
                            },
                            (false, _) => L2Entry {
                                entry: 0,
                                bitmap: 0,
                            },
                        };
                        (new, true)
                    },
                    true,
                )
                .await?;
            } else if mode == DiscardMode::ReadsBacking {
                let mut buf = vec![0u8; (piece_end - pos) as usize];
                below.read(pos, &mut buf).await?;
                self.write_buf(pos, &buf, below).await?;
            }
        }
        Ok(())
    }

    /// Writes cached metadata in crash-safe order; `durable` adds the final sync.
    pub(super) async fn flush_impl(&self, durable: bool) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut meta = self.meta.lock().await;
        if let Some((start, end)) = meta.zero_span.take() {
            // Allocation changes no byte: no need to wait for writes in flight. It is only
            // for likeness with QEMU's files: a failure (a full disk) must not fail the flush.
            if let Err(e) = self.file.allocate(start, end - start).await {
                tracing::debug!("allocating {start:#x}..{end:#x} at flush: {e}");
            }
        }
        if meta.file_end_due == 0 {
            return self.flush_locked(&mut meta, durable).await;
        }
        // Growing the file must not race a data write past its end (a racing resize could
        // cut it short): wait until none is in flight.
        drop(meta);
        let mut meta = self.lock_quiesced().await;
        self.inflight.wait_idle().await;
        let due = std::mem::take(&mut meta.file_end_due);
        if due > self.file.size()? {
            if let Err(e) = self.file.resize(due, PreallocMode::Off).await {
                meta.file_end_due = due;
                return Err(e);
            }
        }
        self.flush_locked(&mut meta, durable).await
    }

    pub(super) async fn flush_locked(&self, meta: &mut Meta, durable: bool) -> Result<()> {
        let file = self.file.as_ref();
        let dirty_tables = self.cache.dirty();
        let mut wrote = false;
        if let Some(rc) = meta.refcounts.as_mut() {
            if rc.is_dirty() {
                rc.flush(file, true).await?;
                wrote = true;
            }
        }
        if !dirty_tables.is_empty() {
            if self.has_data_file() {
                // Copied data in the data file must be durable before the entries exposing it.
                self.data.sync().await?;
            }
            if wrote {
                file.sync().await?;
            }
            for (offset, table) in &dirty_tables {
                let bytes = table.take_bytes();
                if let Err(e) = file.write_at(*offset, &bytes).await {
                    table.mark_dirty();
                    return Err(e);
                }
            }
            wrote = true;
        }
        if meta.l1_dirty {
            if wrote {
                file.sync().await?;
            }
            let raw: Vec<u8> = self
                .l1
                .read()
                .unwrap()
                .iter()
                .flat_map(|e| e.to_be_bytes())
                .collect();
            file.write_at(meta.header.l1_table_offset, &raw).await?;
            meta.l1_dirty = false;
            wrote = true;
        }
        if durable || wrote {
            file.sync().await?;
            if self.has_data_file() {
                self.data.sync().await?;
            }
        }
        if let Some(rc) = meta.refcounts.as_mut() {
            // The tables that stopped using freed clusters are on disk now: their lowered
            // refcounts may follow, and the clusters may be reused.
            if rc.flush_decreases(file).await? {
                file.sync().await?;
            }
            // An in-place write that mapped a cluster before it was freed may still be
            // landing there: wait for those before the cluster can be handed out again.
            // (New writes cannot map anything while this holds the metadata lock.)
            self.inflight.wait_idle().await;
            rc.end_quarantine();
        }
        if meta.header.is_dirty() && meta.header.lazy_refcounts() {
            // Everything is on disk: this is a clean point.
            meta.header.incompatible_features &= !super::header::incompat::DIRTY;
            self.write_header(&meta.header).await?;
            file.sync().await?;
        }
        Ok(())
    }
}

impl Qcow2Driver {
    /// Moves the L1 table to a new area holding `entries` entries (flushing first, so the
    /// new table never points at unwritten L2 tables).
    async fn grow_l1(&self, meta: &mut Meta, entries: u64) -> Result<()> {
        let cs = self.geometry.cluster_size();
        if entries
            .checked_mul(8)
            .is_none_or(|b| b > super::header::MAX_L1_BYTES)
        {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "the new size needs an L1 table above 32 MiB",
            ));
        }
        let clusters = (entries * 8).div_ceil(cs);
        if clusters > meta.refcounts().max_run() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("growing the L1 table to {clusters} clusters at once is not supported"),
            ));
        }
        self.flush_locked(meta, true).await?;
        let new_offset = self.alloc_clusters(meta, clusters).await?;
        let mut table = self.l1.read().unwrap().clone();
        table.resize(entries as usize, 0);
        let mut raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        raw.resize((clusters * cs) as usize, 0);
        // The new table's refcounts must be on disk before the header points at it.
        meta.refcounts().flush(self.file.as_ref(), true).await?;
        self.file.write_at(new_offset, &raw).await?;
        self.file.sync().await?;
        let old_offset = meta.header.l1_table_offset;
        let old_clusters = (u64::from(meta.header.l1_size) * 8).div_ceil(cs);
        meta.header.l1_table_offset = new_offset;
        meta.header.l1_size = entries as u32;
        self.write_header(&meta.header).await?;
        self.file.sync().await?;
        *self.l1.write().unwrap() = table;
        for i in 0..old_clusters {
            if old_offset != 0 {
                self.unref_cluster(meta, old_offset + i * cs, true).await?;
            }
        }
        Ok(())
    }

    /// Changes the virtual size (see [`FormatDriver::resize`](crate::FormatDriver::resize)).
    pub(super) async fn resize_impl(
        &self,
        new_size: u64,
        prealloc: PreallocMode,
        below: ChainView<'_>,
    ) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let old = self.size.load(std::sync::atomic::Ordering::Acquire);
        if new_size % 512 != 0 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "qcow2 sizes must be multiples of 512 bytes",
            ));
        }
        if self.has_data_file() && new_size != old {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "resizing images with an external data file is not supported yet",
            ));
        }
        if new_size < old {
            // Release every cluster wholly past the new end, visiting only existing tables,
            // then the L2 tables past it.
            let mut meta = self.lock_quiesced().await;
            self.prepare(&mut meta).await?;
            let first_cluster = new_size.div_ceil(cs);
            let l1_len = self.l1.read().unwrap().len() as u64;
            // Host clusters of the cut data, released on the medium at the end.
            let mut cut = Vec::new();
            for l1_index in first_cluster / g.l2_entries()..l1_len {
                let l1e = self.l1.read().unwrap()[l1_index as usize];
                if l1e & L1_OFFSET_MASK == 0 {
                    continue;
                }
                let table = self.writable_l2(&mut meta, l1_index as usize).await?;
                let start = if l1_index == first_cluster / g.l2_entries() {
                    (first_cluster % g.l2_entries()) as usize
                } else {
                    0
                };
                for i in start..table.len() {
                    let e = table.entry(i);
                    if e.entry != 0 || e.bitmap != 0 {
                        table.set(
                            i,
                            L2Entry {
                                entry: 0,
                                bitmap: 0,
                            },
                        );
                        let host = e.entry & L2_OFFSET_MASK;
                        if e.entry & l2::COMPRESSED == 0 && host != 0 && !self.has_data_file() {
                            cut.push(host);
                        }
                        self.release_entry(&mut meta, e, false).await?;
                    }
                }
            }
            let keep = g.l1_entries_for(new_size).unwrap_or(0) as usize;
            let dropped: Vec<(usize, u64)> = self
                .l1
                .read()
                .unwrap()
                .iter()
                .enumerate()
                .skip(keep)
                .filter(|(_, e)| *e & L1_OFFSET_MASK != 0)
                .map(|(i, e)| (i, *e))
                .collect();
            for (i, e) in dropped {
                // Write the table out first if dirty, so nothing references it afterwards.
                self.flush_locked(&mut meta, false).await?;
                self.l1.write().unwrap()[i] = 0;
                meta.l1_dirty = true;
                self.flush_locked(&mut meta, true).await?;
                self.unref_cluster(&mut meta, e & L1_OFFSET_MASK, true)
                    .await?;
            }
            // The tables that stopped mapping the cut clusters reach the disk before the
            // header shows the new size: a crash in between must not leave the new size
            // with old mappings past it (a later grow would expose them).
            self.flush_locked(&mut meta, true).await?;
            // The freed space goes in host order, a run at a time, as QEMU's discards: a
            // cluster at a time would split the file's extents needlessly (more blocks
            // of file-system metadata than QEMU's file has, iotest 250).
            cut.sort_unstable();
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for host in cut {
                if meta.refcounts().get(self.file.as_ref(), host / cs).await? != 0 {
                    continue;
                }
                match runs.last_mut() {
                    Some((_, end)) if *end == host => *end += cs,
                    _ => runs.push((host, host + cs)),
                }
            }
            for (start, end) in runs {
                self.file.discard(start, end - start).await?;
            }
            meta.header.size = new_size;
            self.write_header(&meta.header).await?;
            self.size
                .store(new_size, std::sync::atomic::Ordering::Release);
            return self.flush_locked(&mut meta, true).await;
        }
        {
            let mut meta = self.lock_quiesced().await;
            self.prepare(&mut meta).await?;
            let needed = g.l1_entries_for(new_size).unwrap_or(u64::MAX);
            if needed > self.l1.read().unwrap().len() as u64 {
                self.grow_l1(&mut meta, needed).await?;
            }
        }
        // The new space must read as zeros: the tail of the old last cluster may hold stale
        // bytes (in any of its subclusters), and a larger backing file would show through
        // unallocated clusters. Zero from the old end to the end of its cluster, or to the
        // end of the backing data if that is further; skip only what is unallocated with
        // nothing below. This happens while the size is still the old one (no one else
        // writes or reads there) and is made durable before the header shows the new
        // size, so neither a racing reader nor a crash can see what was there.
        let tail_end = (old.div_ceil(cs) * cs).min(new_size);
        let below_end = below.size().min(new_size);
        let zero_end = tail_end.max(below_end);
        if zero_end > old {
            let needs = if below.is_empty() {
                let (state, n) = self.map_run(old, tail_end.max(old + 1) - old).await?;
                state != ClusterState::Unallocated || old + n < tail_end
            } else {
                true
            };
            if needs {
                self.write_zeroes_impl(old, zero_end - old, false, below)
                    .await?;
                self.flush_impl(true).await?;
            }
        }
        {
            let mut meta = self.lock_quiesced().await;
            self.prepare(&mut meta).await?;
            meta.header.size = new_size;
            self.write_header(&meta.header).await?;
            self.file.sync().await?;
            self.size
                .store(new_size, std::sync::atomic::Ordering::Release);
        }
        if matches!(
            prealloc,
            PreallocMode::Full | PreallocMode::Falloc | PreallocMode::Metadata
        ) {
            // Allocate the new space with zeros written (metadata and falloc as well: the
            // clusters then exist, as the modes ask, and read as zeros).
            let mut pos = old;
            let zeros = vec![0u8; (cs as usize).max(1 << 20).min((new_size - old) as usize)];
            while pos < new_size {
                let n = (new_size - pos).min(zeros.len() as u64) as usize;
                self.write_buf(pos, &zeros[..n], below).await?;
                pos += n as u64;
            }
        }
        Ok(())
    }
}

impl Qcow2Driver {
    /// Rewrites the header with a new backing file name and format.
    pub(super) async fn set_backing_impl(
        &self,
        name: Option<&str>,
        format: Option<&str>,
    ) -> Result<()> {
        if name.is_some() && self.tables().header.data_file_raw() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "an image with a raw external data file cannot have a backing file",
            ));
        }
        let mut meta = self.lock_quiesced().await;
        self.prepare(&mut meta).await?;
        // Metadata first, so the header never names a backing file for half-written tables.
        self.flush_locked(&mut meta, true).await?;
        let mut h = meta.header.clone();
        h.backing_file = name.map(str::to_string);
        h.backing_format = name.and(format).map(str::to_string);
        h.backing_file_offset = 0;
        h.backing_file_size = 0;
        let bytes = h.to_bytes().map_err(Error::from)?;
        self.file.write_at(0, &bytes).await?;
        self.file.sync().await?;
        meta.header = h;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::OpenOptions;
    use crate::storage::MemoryStorage;
    use crate::{Image, ImageOpen};

    async fn small_cache_image(size: u64) -> Image {
        let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        super::super::Qcow2Create::new(size)
            .cluster_size(512)
            .create_on(storage.as_ref(), None)
            .await
            .unwrap();
        ImageOpen::storage(storage)
            .format(super::super::QCOW2)
            .options(OpenOptions::new().writable(true).l2_cache_size(16 * 512))
            .open()
            .await
            .unwrap()
    }

    fn driver(image: &Image) -> &Qcow2Driver {
        image.driver().as_any().downcast_ref().unwrap()
    }

    /// Regression: dirty L2 tables are never evicted, so zeroing a range that touches more
    /// tables than the cache holds kept them all in memory until the final flush (a
    /// petabyte: gigabytes of tables).
    #[tokio::test]
    async fn zeroing_many_tables_keeps_the_cache_bounded() {
        // 512-byte clusters: one table covers 32 KiB; 4 MiB is 128 tables.
        let image = small_cache_image(4 << 20).await;
        image.write(0, &[7u8; 4096]).await.unwrap();
        image.write_zeroes(0, 4 << 20, false).await.unwrap();
        let cached = driver(&image).cache.len();
        assert!(cached <= 17, "{cached} tables cached, the budget is 16");
        image.flush().await.unwrap();
        let mut buf = vec![1u8; 8192];
        image.read(0, &mut buf).await.unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    /// Regression: the per-cluster pieces of a request were built as a list up front, a
    /// list as long as the request has clusters.
    #[tokio::test]
    async fn cluster_pieces_are_produced_lazily() {
        let image = small_cache_image(1 << 20).await;
        let mut pieces = driver(&image).cluster_pieces(100, u64::MAX / 2);
        assert_eq!(pieces.next(), Some((100, 512, 0, false)));
        assert_eq!(pieces.next(), Some((512, 1024, 512, true)));
    }
}
