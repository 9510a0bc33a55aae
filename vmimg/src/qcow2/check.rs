//! Consistency check and repair of a qcow2 image (`qemu-img check [-r leaks|all]`).
//!
//! ```text
//!  expected refcounts: an in-memory refcount array (one entry per host cluster, of the
//!  image's refcount width), built from every reference the metadata makes:
//!    header cluster
//!    + active L1 table -> L2 tables -> data clusters / compressed extents
//!    + each snapshot's L1 table -> L2 tables -> data (one reference per L1/L2 path)
//!    + snapshot table + refcount table + refcount blocks + crypto header
//!    + bitmap directory -> bitmap tables -> bitmap data clusters
//!  then cluster by cluster against the stored refcounts:
//!    stored > expected: leak     stored < expected: corruption
//!    stored == 0 < expected: the refcount structure must be rebuilt (-r all only)
//!  then OFLAG_COPIED of the active L1 and L2 entries: set iff the refcount is exactly 1
//! ```
//!
//! The walk, the counts and the messages follow QEMU's `qcow2_check_refcounts()`, so that
//! `vmimg check` and `qemu-img check` agree number for number. Repairs write corrected
//! entries into the existing refcount blocks; a structure that cannot be fixed in place
//! (a missing refcount block, a block with a bad offset or refcount) is rebuilt from the
//! in-memory array: new refcount blocks and a new refcount table where the array has free
//! clusters (usually at the end of the file), then the header is pointed at the new table.
//! The old structure is then leaked and freed by the same repair.
//!
//! Not repaired (reported as corruptions): damaged snapshot table entries, which QEMU fixes by
//! rewriting the whole snapshot table.

use super::header::{autoclear, incompat, Header};
use super::l2::{compressed_extent, COMPRESSED, COPIED, L1_OFFSET_MASK, L2_OFFSET_MASK, ZERO};
use super::read_header;
use super::refcount::{get_entry, set_entry, Refcounts, ReftableMove, REFTABLE_OFFSET_MASK};
use super::types::Geometry;
pub use crate::format::{CheckReport, Repair};
use crate::storage::{PreallocMode, Storage, StorageExt};
use crate::{Error, ErrorKind, Result};

/// Reserved bits of an L1 entry (bits 0-8 and 56-62).
const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (bits 1-8 and 56-61).
const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Reserved bits of a refcount table entry.
const REFT_RESERVED_MASK: u64 = 0x1ff;
/// Subcluster bitmap: the "allocated" half.
const BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
/// Subcluster bitmap: the "reads as zero" half.
const BITMAP_ALL_ZEROES: u64 = 0xffff_ffff_0000_0000;
/// Bitmap table entries: reserved bits, offset bits, "all ones" flag.
const BME_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
const BME_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const BME_FLAG_ALL_ONES: u64 = 1;
/// QEMU's limits on bitmap directory entries.
const BME_MAX_TABLE_SIZE: u32 = 0x800_0000;
const BME_MIN_GRANULARITY_BITS: u8 = 9;
const BME_MAX_GRANULARITY_BITS: u8 = 31;
const BME_RESERVED_FLAGS: u32 = 0xffff_fff8;
/// QEMU's limits: 32 MiB L1 tables, 1 KiB of snapshot extra data, 64 MiB snapshot table.
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_SNAPSHOT_EXTRA: u32 = 1024;
const MAX_SNAPSHOTS_SIZE: u64 = 64 << 20;

/// Checks the qcow2 image in `file` (and repairs it as `repair` allows).
///
/// Only the image file is read: clusters of an external data file are not refcounted, and
/// a backing file plays no part in the image's own consistency. Repairs need `file` to be
/// writable. Problems in the image are reported in the [`CheckReport`]; an `Err` means the
/// image could not be checked at all (not qcow2, unreadable header, read-only file for a
/// repair).
pub async fn check(file: &dyn Storage, repair: Repair) -> Result<CheckReport> {
    if repair != Repair::None && !file.is_writable() {
        return Err(Error::new(
            ErrorKind::ReadOnly,
            "repairing needs the image file opened for writing",
        ));
    }
    let mut header = read_header(file).await?;
    // A writable open clears the autoclear bits it does not know (QEMU does it in
    // `qcow2_do_open()`, which `check -r` goes through).
    let unknown = header.autoclear_features & !(autoclear::BITMAPS | autoclear::DATA_FILE_RAW);
    if repair != Repair::None && header.version >= 3 && unknown != 0 {
        header.autoclear_features &= !unknown;
        file.write_at(88, &header.autoclear_features.to_be_bytes())
            .await?;
        file.sync().await?;
    }
    let mut c = Checker::new(file, header).await?;
    c.run(repair).await;
    Ok(c.report)
}

/// Why a check stopped: QEMU's `strerror()` text.
#[derive(Debug)]
struct Abort(String);

impl From<Error> for Abort {
    fn from(e: Error) -> Self {
        let errno = e.errno();
        if errno > 0 {
            Abort(strerror(errno))
        } else {
            Abort(e.to_string())
        }
    }
}

fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn abort_errno(errno: i32) -> Abort {
    Abort(strerror(errno))
}

type Step<T = ()> = std::result::Result<T, Abort>;

/// Counters of one part of the check (QEMU's `BdrvCheckResult` without the frag info).
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    corruptions: u64,
    leaks: u64,
    check_errors: u64,
    corruptions_fixed: u64,
    leaks_fixed: u64,
}

impl Counts {
    fn fix_corruption(&mut self) {
        self.corruptions = self.corruptions.saturating_sub(1);
        self.corruptions_fixed += 1;
    }
}

/// Fragmentation counters (QEMU's `BlockFragInfo`).
#[derive(Clone, Copy, Debug, Default)]
struct Frag {
    allocated: u64,
    fragmented: u64,
    compressed: u64,
}

/// The in-memory refcount table: one big refcount block covering the whole file, in the
/// image's refcount width, its byte size a whole number of clusters (so a slice of it can
/// be written as a refcount block).
struct Imrt {
    bytes: Vec<u8>,
    /// Entries (clusters) covered; also the number of clusters the comparison walks.
    len: u64,
    order: u32,
    cluster_size: u64,
}

impl Imrt {
    fn byte_size(&self, entries: u64) -> u64 {
        ((entries << self.order).div_ceil(8)).div_ceil(self.cluster_size) * self.cluster_size
    }

    /// Grows to `new_len` entries (new entries are 0).
    fn resize(&mut self, new_len: u64) -> Step {
        let bytes = self.byte_size(new_len);
        if bytes > self.bytes.len() as u64 {
            let bytes = usize::try_from(bytes).map_err(|_| abort_errno(libc::ENOMEM))?;
            self.bytes
                .try_reserve_exact(bytes - self.bytes.len())
                .map_err(|_| abort_errno(libc::ENOMEM))?;
            self.bytes.resize(bytes, 0);
        }
        self.len = new_len;
        Ok(())
    }

    fn get(&self, cluster: u64) -> u64 {
        get_entry(&self.bytes, self.order, cluster)
    }

    fn set(&mut self, cluster: u64, value: u64) {
        set_entry(&mut self.bytes, self.order, cluster, value)
    }

    fn clear(&mut self) {
        self.bytes.fill(0);
    }
}

/// Which count a refcount repair moves to the fixed side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fixes {
    Nothing,
    Leak,
    Corruption,
}

/// How QEMU classifies an L2 entry (`qcow2_get_cluster_type()`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClusterType {
    Unallocated,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Compressed,
}

/// The parts of a snapshot table entry the check needs.
struct SnapEntry {
    l1_table_offset: u64,
    l1_size: u32,
    id: String,
    name: String,
}

struct Checker<'a> {
    file: &'a dyn Storage,
    header: Header,
    geometry: Geometry,
    cs: u64,
    bits: u32,
    refcount_max: u64,
    /// Entries of one refcount block, as a power of two.
    refblock_bits: u32,
    /// The active L1 table as read when the check started (QEMU's in-memory copy).
    l1: Vec<u64>,
    snapshots: Vec<SnapEntry>,
    snapshots_size: u64,
    /// The refcount table entries (as on disk; QEMU's `s->refcount_table`).
    reftable: Vec<u64>,
    /// Stored refcounts, read (and repaired) through the refcount block cache.
    stored: Refcounts,
    /// Clusters a repair freed: their space is released once the refcounts are written.
    freed: Vec<u64>,
    /// Length of the file (only our own repairs change it).
    file_len: u64,
    res: Counts,
    frag: Frag,
    report: CheckReport,
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn words(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|w| u64::from_be_bytes(w.try_into().expect("8 bytes")))
        .collect()
}

/// `%#x` as C prints it: `0` for zero, `0x...` otherwise.
pub(super) fn c_alt_hex(v: u64) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}

impl<'a> Checker<'a> {
    async fn new(file: &'a dyn Storage, header: Header) -> Result<Checker<'a>> {
        let geometry = header.geometry();
        let cs = geometry.cluster_size();
        let bits = geometry.cluster_bits();
        let order = header.refcount_order;
        let l1_bytes = u64::from(header.l1_size) * 8;
        let mut raw = vec![0u8; l1_bytes as usize];
        file.read_at(header.l1_table_offset, &mut raw).await?;
        let l1 = words(&raw);
        let (reftable, stored) = Self::load_refcounts(file, &header).await?;
        Ok(Checker {
            file,
            geometry,
            cs,
            bits,
            refcount_max: if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1u32 << order)) - 1
            },
            refblock_bits: bits + 3 - order,
            l1,
            snapshots: Vec::new(),
            snapshots_size: 0,
            reftable,
            stored,
            freed: Vec::new(),
            file_len: file.size()?,
            res: Counts::default(),
            frag: Frag::default(),
            report: CheckReport::default(),
            header,
        })
    }

    async fn load_refcounts(file: &dyn Storage, h: &Header) -> Result<(Vec<u64>, Refcounts)> {
        let g = h.geometry();
        let bytes = u64::from(h.refcount_table_clusters) * g.cluster_size();
        let mut raw = vec![0u8; bytes as usize];
        file.read_at(h.refcount_table_offset, &mut raw).await?;
        let stored = Refcounts::load(
            file,
            g,
            h.refcount_order,
            h.refcount_table_offset,
            h.refcount_table_clusters,
        )
        .await?;
        Ok((words(&raw), stored))
    }

    fn msg(&mut self, m: String) {
        self.report.messages.push(m);
    }

    fn has_data_file(&self) -> bool {
        self.header.has_data_file()
    }

    /// Reads the file length again (after a repair that may have grown the file).
    fn refresh_len(&mut self) -> Step<u64> {
        self.file_len = self.file.size()?;
        Ok(self.file_len)
    }

    fn clusters_of(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cs)
    }

    /// QEMU's `qcow2_co_check_locked()`: the snapshot table, then the refcounts, then
    /// marking a repaired image clean.
    async fn run(&mut self, fix: Repair) {
        let mut snap = Counts::default();
        let result = match self.read_snapshot_table(&mut snap).await {
            Ok(()) => self.check_refcounts(fix).await,
            Err(e) => Err(e),
        };
        let r = &mut self.report;
        r.corruptions = self.res.corruptions + snap.corruptions;
        r.leaks = self.res.leaks + snap.leaks;
        r.check_errors = self.res.check_errors + snap.check_errors;
        r.corruptions_fixed = self.res.corruptions_fixed + snap.corruptions_fixed;
        r.leaks_fixed = self.res.leaks_fixed + snap.leaks_fixed;
        r.allocated_clusters = self.frag.allocated;
        r.fragmented_clusters = self.frag.fragmented;
        r.compressed_clusters = self.frag.compressed;
        if let Err(Abort(why)) = result {
            r.failure = Some(why);
            return;
        }
        if fix != Repair::None && r.check_errors == 0 && r.corruptions == 0 {
            if let Err(Abort(why)) = self.mark_clean().await {
                self.report.failure = Some(why);
            }
        }
    }

    /// Clears the dirty and corrupt bits (QEMU's `qcow2_mark_clean()` and
    /// `qcow2_mark_consistent()`), writing only the feature field.
    async fn mark_clean(&mut self) -> Step {
        let bits = incompat::DIRTY | incompat::CORRUPT;
        if self.header.version < 3 || self.header.incompatible_features & bits == 0 {
            return Ok(());
        }
        self.file.sync().await?;
        let features = self.header.incompatible_features & !bits;
        self.file.write_at(72, &features.to_be_bytes()).await?;
        self.file.sync().await?;
        self.header.incompatible_features = features;
        Ok(())
    }

    /// QEMU's `qcow2_check_read_snapshot_table()` (without the repairs).
    async fn read_snapshot_table(&mut self, res: &mut Counts) -> Step {
        let n = self.header.nb_snapshots;
        if n == 0 {
            return Ok(());
        }
        let base = self.header.snapshots_offset;
        let mut reader = WindowReader::new(self.file);
        let mut offset = base;
        let mut table_length = 0u64;
        let mut entries = Vec::new();
        let mut incomplete = Vec::new();
        for i in 0..n {
            table_length = table_length.div_ceil(8) * 8;
            offset = offset.div_ceil(8) * 8;
            let h = reader.read(offset, 40).await?;
            offset += 40;
            let l1_table_offset = be64(&h, 0);
            let l1_size = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
            let id_len = u64::from(u16::from_be_bytes([h[12], h[13]]));
            let name_len = u64::from(u16::from_be_bytes([h[14], h[15]]));
            let extra = u32::from_be_bytes(h[36..40].try_into().expect("4 bytes"));
            if extra > MAX_SNAPSHOT_EXTRA {
                res.check_errors += 1;
                self.msg(format!(
                    "ERROR failed to read the snapshot table: Too much extra metadata in \
                     snapshot table entry {i}"
                ));
                self.msg(
                    "You can force-remove this extra metadata with qemu-img check -r all"
                        .to_string(),
                );
                return Err(abort_errno(libc::EFBIG));
            }
            offset += u64::from(extra);
            let id = reader.read(offset, id_len as usize).await?;
            offset += id_len;
            let name = reader.read(offset, name_len as usize).await?;
            offset += name_len;
            table_length += 40 + u64::from(extra) + id_len + name_len;
            if table_length > MAX_SNAPSHOTS_SIZE || offset - base > i32::MAX as u64 {
                res.check_errors += 1;
                self.msg(
                    "ERROR failed to read the snapshot table: Snapshot table is too big"
                        .to_string(),
                );
                self.msg(format!(
                    "You can force-remove all {} overhanging snapshots with qemu-img check \
                     -r all",
                    n - i
                ));
                return Err(abort_errno(libc::EFBIG));
            }
            if self.header.version >= 3 && extra < 16 {
                incomplete.push(i);
            }
            entries.push(SnapEntry {
                l1_table_offset,
                l1_size,
                id: String::from_utf8_lossy(&id).into_owned(),
                name: String::from_utf8_lossy(&name).into_owned(),
            });
        }
        self.snapshots = entries;
        self.snapshots_size = offset - base;
        for i in incomplete {
            res.corruptions += 1;
            self.msg(format!("ERROR snapshot table entry {i} is incomplete"));
        }
        Ok(())
    }

    /// QEMU's `qcow2_check_refcounts()`.
    async fn check_refcounts(&mut self, fix: Repair) -> Step {
        let size = self
            .refresh_len()
            .inspect_err(|_| self.res.check_errors += 1)?;
        let nb_clusters = self.clusters_of(size);
        if nb_clusters > i32::MAX as u64 {
            self.res.check_errors += 1;
            return Err(abort_errno(libc::EFBIG));
        }
        self.report.total_clusters = self.clusters_of(self.header.size / 512 * 512);
        let mut imrt = Imrt {
            bytes: Vec::new(),
            len: 0,
            order: self.header.refcount_order,
            cluster_size: self.cs,
        };
        imrt.resize(nb_clusters)
            .inspect_err(|_| self.res.check_errors += 1)?;
        let mut rebuild = false;
        self.calculate_refcounts(fix, &mut rebuild, &mut imrt)
            .await?;

        let pre_compare = self.res;
        let mut highest = self
            .compare_refcounts(Repair::None, &mut rebuild, &imrt)
            .await;

        if rebuild && fix.errors() {
            let old = self.res;
            let mut fresh_leaks = 0;
            self.msg("Rebuilding refcount structure".to_string());
            self.rebuild_refcount_structure(&mut imrt).await?;
            self.res.corruptions = 0;
            self.res.leaks = 0;
            // The references are counted again over the new structure (the fragmentation
            // counts of the first walk stay).
            rebuild = false;
            imrt.clear();
            let frag = self.frag;
            self.calculate_refcounts(Repair::None, &mut rebuild, &mut imrt)
                .await?;
            self.frag = frag;
            if fix.leaks() {
                // The old structure is leaked now: free it. Only leaks the new structure
                // itself could not account for are kept.
                let saved = self.res;
                self.res = Counts::default();
                highest = self
                    .compare_refcounts(Repair::Leaks, &mut rebuild, &imrt)
                    .await;
                if rebuild {
                    self.msg("ERROR rebuilt refcount structure is still broken".to_string());
                }
                fresh_leaks = self.res.leaks;
                self.res = saved;
            }
            if self.res.corruptions < old.corruptions {
                self.res.corruptions_fixed += old.corruptions - self.res.corruptions;
            }
            if self.res.leaks < old.leaks {
                self.res.leaks_fixed += old.leaks - self.res.leaks;
            }
            self.res.leaks += fresh_leaks;
        } else if fix != Repair::None {
            if rebuild {
                self.msg("ERROR need to rebuild refcount structures".to_string());
                self.res.check_errors += 1;
                return Err(abort_errno(libc::EIO));
            }
            if self.res.leaks > 0 || self.res.corruptions > 0 {
                self.res = pre_compare;
                highest = self.compare_refcounts(fix, &mut rebuild, &imrt).await;
            }
        }
        self.write_refcounts().await?;

        self.check_oflag_copied(fix).await?;
        self.report.image_end_offset = (highest + 1) * self.cs;
        Ok(())
    }

    /// Writes repaired refcounts, then releases the space of clusters they freed (QEMU
    /// discards those, as freeing with `QCOW2_DISCARD_ALWAYS` does).
    async fn write_refcounts(&mut self) -> Step {
        if self.stored.is_dirty() {
            // Repairs write every corrected count at once, decreases included: the tables
            // referencing clusters are what the counts were corrected against.
            self.stored
                .flush(self.file, true)
                .await
                .inspect_err(|_| self.res.check_errors += 1)?;
            self.stored
                .flush_decreases(self.file)
                .await
                .inspect_err(|_| self.res.check_errors += 1)?;
            self.file.sync().await?;
        }
        for c in std::mem::take(&mut self.freed) {
            // Discard is advisory: a refusal leaves the (free) cluster's bytes in place.
            let _ = self.file.discard(c << self.bits, self.cs).await;
        }
        Ok(())
    }

    /// QEMU's `calculate_refcounts()`.
    async fn calculate_refcounts(
        &mut self,
        fix: Repair,
        rebuild: &mut bool,
        imrt: &mut Imrt,
    ) -> Step {
        self.inc(imrt, 0, self.cs)?;
        let (l1_offset, l1_size) = (self.header.l1_table_offset, self.header.l1_size);
        self.check_l1(imrt, l1_offset, l1_size, true, fix).await?;

        if self.has_data_file() && !self.snapshots.is_empty() {
            self.msg(format!(
                "ERROR {} snapshots in image with data file",
                self.snapshots.len()
            ));
            self.res.corruptions += 1;
        }
        for i in 0..self.snapshots.len() {
            let sn = &self.snapshots[i];
            let (off, size) = (sn.l1_table_offset, sn.l1_size);
            if self.geometry.in_cluster(off) != 0 {
                let m = format!(
                    "ERROR snapshot {} ({}) l1_offset={}: L1 table is not cluster aligned; \
                     snapshot table entry corrupted",
                    sn.id,
                    sn.name,
                    c_alt_hex(off)
                );
                self.msg(m);
                self.res.corruptions += 1;
                continue;
            }
            if u64::from(size) > MAX_L1_BYTES / 8 {
                let m = format!(
                    "ERROR snapshot {} ({}) l1_size={}: L1 table is too large; snapshot \
                     table entry corrupted",
                    sn.id,
                    sn.name,
                    c_alt_hex(u64::from(size))
                );
                self.msg(m);
                self.res.corruptions += 1;
                continue;
            }
            self.check_l1(imrt, off, size, false, fix).await?;
        }
        self.inc(imrt, self.header.snapshots_offset, self.snapshots_size)?;

        let reftable_bytes = self.reftable.len() as u64 * 8;
        self.inc(imrt, self.header.refcount_table_offset, reftable_bytes)?;

        if let Some(c) = self.header.crypto {
            if c.length != 0 {
                self.inc(imrt, c.offset, c.length)?;
            }
        }
        self.check_bitmaps(imrt).await?;
        self.check_refblocks(fix, rebuild, imrt).await
    }

    /// Counts one reference to each cluster of `[offset, offset + size)` (QEMU's
    /// `qcow2_inc_refcounts_imrt()`).
    fn inc(&mut self, imrt: &mut Imrt, offset: u64, size: u64) -> Step {
        if size == 0 {
            return Ok(());
        }
        let file_len = self.file_len;
        // The last cluster may be partly beyond the end of the file, but not more.
        if i128::from(offset) + i128::from(size) - i128::from(file_len) >= i128::from(self.cs) {
            self.msg(format!(
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset {offset:#x} size {size:#x}"
            ));
            self.res.corruptions += 1;
            return Ok(());
        }
        let first = offset >> self.bits;
        let last = (offset + size - 1) >> self.bits;
        for k in first..=last {
            if k >= imrt.len {
                imrt.resize(k + 1)
                    .inspect_err(|_| self.res.check_errors += 1)?;
            }
            let r = imrt.get(k);
            if r == self.refcount_max {
                self.msg(format!(
                    "ERROR: overflow cluster offset={:#x}",
                    k << self.bits
                ));
                self.msg(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img \
                     convert to create a clean copy if the image cannot be opened for writing"
                        .to_string(),
                );
                self.res.corruptions += 1;
                continue;
            }
            imrt.set(k, r + 1);
        }
        Ok(())
    }

    fn cluster_type(&self, entry: u64) -> ClusterType {
        if entry & COMPRESSED != 0 {
            ClusterType::Compressed
        } else if entry & ZERO != 0 && !self.geometry.extended_l2() {
            if entry & L2_OFFSET_MASK != 0 {
                ClusterType::ZeroAlloc
            } else {
                ClusterType::ZeroPlain
            }
        } else if entry & L2_OFFSET_MASK == 0 {
            // Offset 0 is a valid data file offset, told apart by the copied flag.
            if self.has_data_file() && entry & COPIED != 0 {
                ClusterType::Normal
            } else {
                ClusterType::Unallocated
            }
        } else {
            ClusterType::Normal
        }
    }

    /// QEMU's `check_refcounts_l1()`: the L1 table, its L2 tables and their clusters
    /// (`frag`: count the fragmentation statistics, for the active table only).
    async fn check_l1(
        &mut self,
        imrt: &mut Imrt,
        l1_offset: u64,
        l1_size: u32,
        frag: bool,
        fix: Repair,
    ) -> Step {
        if l1_size == 0 {
            return Ok(());
        }
        let bytes = u64::from(l1_size) * 8;
        self.inc(imrt, l1_offset, bytes)?;
        let mut raw = vec![0u8; bytes as usize];
        if let Err(e) = self.file.read_at(l1_offset, &mut raw).await {
            self.msg("ERROR: I/O error in check_refcounts_l1".to_string());
            self.res.check_errors += 1;
            return Err(e.into());
        }
        for entry in words(&raw) {
            if entry == 0 {
                continue;
            }
            if entry & L1E_RESERVED_MASK != 0 {
                self.msg(format!(
                    "ERROR found L1 entry with reserved bits set: {entry:x}"
                ));
                self.res.corruptions += 1;
            }
            let l2_offset = entry & L1_OFFSET_MASK;
            self.inc(imrt, l2_offset, self.cs)?;
            if self.geometry.in_cluster(l2_offset) != 0 {
                self.msg(format!(
                    "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry \
                     corrupted"
                ));
                self.res.corruptions += 1;
            }
            self.check_l2(imrt, l2_offset, frag, fix).await?;
        }
        Ok(())
    }

    /// QEMU's `check_refcounts_l2()`.
    async fn check_l2(&mut self, imrt: &mut Imrt, l2_offset: u64, frag: bool, fix: Repair) -> Step {
        let mut table = vec![0u8; self.cs as usize];
        if let Err(e) = self.file.read_at(l2_offset, &mut table).await {
            self.msg("ERROR: I/O error in check_refcounts_l2".to_string());
            self.res.check_errors += 1;
            return Err(e.into());
        }
        let extended = self.geometry.extended_l2();
        let entry_size: usize = if extended { 16 } else { 8 };
        let data_file = self.has_data_file();
        let mut next_contiguous = 0u64;
        for i in 0..self.geometry.l2_entries() as usize {
            let mut entry = be64(&table, i * entry_size);
            let bitmap = if extended {
                be64(&table, i * entry_size + 8)
            } else {
                0
            };
            let ty = self.cluster_type(entry);
            if ty != ClusterType::Compressed && entry & L2E_STD_RESERVED_MASK != 0 {
                self.msg(format!(
                    "ERROR found l2 entry with reserved bits set: {entry:x}"
                ));
                self.res.corruptions += 1;
            }
            match ty {
                ClusterType::Compressed => {
                    if entry & COPIED != 0 {
                        let (coffset, _) = compressed_extent(self.geometry, entry);
                        self.msg(format!(
                            "ERROR: coffset={coffset:#x}: copied flag must never be set for \
                             compressed clusters"
                        ));
                        entry &= !COPIED;
                        self.res.corruptions += 1;
                    }
                    if data_file {
                        self.msg(format!(
                            "ERROR compressed cluster {i} with data file, entry={entry:#x}"
                        ));
                        self.res.corruptions += 1;
                        continue;
                    }
                    if bitmap != 0 {
                        self.msg(format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation \
                             bitmap, entry={entry:#x}"
                        ));
                        self.res.corruptions += 1;
                        continue;
                    }
                    let (coffset, csize) = compressed_extent(self.geometry, entry);
                    self.inc(imrt, coffset, csize)?;
                    if frag {
                        self.frag.allocated += 1;
                        self.frag.compressed += 1;
                        // Compressed clusters share sectors: fragmented by nature.
                        self.frag.fragmented += 1;
                    }
                }
                ClusterType::ZeroAlloc | ClusterType::Normal => {
                    let offset = entry & L2_OFFSET_MASK;
                    if (bitmap >> 32) & bitmap != 0 {
                        self.res.corruptions += 1;
                        self.msg(format!(
                            "ERROR offset={offset:x}: Allocated cluster has corrupted \
                             subcluster allocation bitmap"
                        ));
                    }
                    if self.geometry.in_cluster(offset) != 0 {
                        self.res.corruptions += 1;
                        let contains_data = if extended {
                            bitmap & BITMAP_ALL_ALLOC != 0
                        } else {
                            entry & ZERO == 0
                        };
                        if !contains_data {
                            self.msg(format!(
                                "{} offset={offset:x}: Preallocated cluster is not properly \
                                 aligned; L2 entry corrupted.",
                                if fix.errors() { "Repairing" } else { "ERROR" }
                            ));
                            if fix.errors()
                                && self
                                    .fix_l2_entry_by_zero(l2_offset, i, bitmap)
                                    .await
                                    .is_ok()
                            {
                                // The cluster is not used any more.
                                continue;
                            }
                        } else {
                            self.msg(format!(
                                "ERROR offset={offset:x}: Data cluster is not properly \
                                 aligned; L2 entry corrupted."
                            ));
                        }
                    }
                    if frag {
                        self.frag.allocated += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            self.frag.fragmented += 1;
                        }
                        next_contiguous = offset + self.cs;
                    }
                    if !data_file {
                        self.inc(imrt, offset, self.cs)?;
                    }
                }
                ClusterType::ZeroPlain => {}
                ClusterType::Unallocated => {
                    if bitmap & BITMAP_ALL_ALLOC != 0 {
                        self.res.corruptions += 1;
                        self.msg(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .to_string(),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Turns an L2 entry into a zero cluster without host offset (all its allocated
    /// subclusters into zero subclusters). The caller counted the corruption.
    async fn fix_l2_entry_by_zero(&mut self, l2_offset: u64, index: usize, bitmap: u64) -> Step {
        let mut bytes = Vec::with_capacity(16);
        if self.geometry.extended_l2() {
            let bitmap = (bitmap | (bitmap << 32)) & BITMAP_ALL_ZEROES;
            bytes.extend_from_slice(&0u64.to_be_bytes());
            bytes.extend_from_slice(&bitmap.to_be_bytes());
        } else {
            bytes.extend_from_slice(&ZERO.to_be_bytes());
        }
        let at = l2_offset + index as u64 * bytes.len() as u64;
        let written = async {
            self.file.write_at(at, &bytes).await?;
            self.file.sync().await
        }
        .await;
        match written {
            Ok(()) => {
                self.res.fix_corruption();
                Ok(())
            }
            Err(e) => {
                self.msg(format!(
                    "ERROR: Failed to overwrite L2 table entry: {}",
                    Abort::from(e).0
                ));
                self.res.check_errors += 1;
                Err(abort_errno(libc::EIO))
            }
        }
    }

    /// QEMU's `qcow2_check_bitmaps_refcounts()`: only bitmaps marked consistent count.
    async fn check_bitmaps(&mut self, imrt: &mut Imrt) -> Step {
        let Some(ext) = self.header.bitmaps else {
            return Ok(());
        };
        if !self.header.bitmaps_consistent() {
            return Ok(());
        }
        self.inc(imrt, ext.directory_offset, ext.directory_size)?;
        let mut dir = vec![0u8; ext.directory_size as usize];
        self.file.read_at(ext.directory_offset, &mut dir).await?;
        let entries = super::bitmaps::parse_directory(&dir, ext.nb_bitmaps).filter(|list| {
            list.iter().all(|b| {
                b.table_size != 0
                    && b.table_offset != 0
                    && self.geometry.in_cluster(b.table_offset) == 0
                    && b.table_size <= BME_MAX_TABLE_SIZE
                    && (BME_MIN_GRANULARITY_BITS..=BME_MAX_GRANULARITY_BITS)
                        .contains(&b.granularity_bits)
                    && b.flags & BME_RESERVED_FLAGS == 0
                    && b.kind == 1
            })
        });
        let Some(entries) = entries else {
            self.res.corruptions += 1;
            return Err(abort_errno(libc::EINVAL));
        };
        for b in entries {
            let bytes = u64::from(b.table_size) * 8;
            self.inc(imrt, b.table_offset, bytes)?;
            // Past the end of the file the table reads as zeros (unallocated entries): no
            // need to hold more of it than the file has.
            let avail = bytes.min(self.file_len.saturating_sub(b.table_offset));
            let mut raw = vec![0u8; avail as usize];
            if self.file.read_at(b.table_offset, &mut raw).await.is_err() {
                self.res.corruptions += 1;
                break;
            }
            for entry in words(&raw) {
                let offset = entry & BME_OFFSET_MASK;
                let bad = entry & BME_RESERVED_MASK != 0
                    || (offset != 0
                        && (entry & BME_FLAG_ALL_ONES != 0
                            || self.geometry.in_cluster(offset) != 0));
                if bad {
                    self.res.corruptions += 1;
                    continue;
                }
                if offset != 0 {
                    self.inc(imrt, offset, self.cs)?;
                }
            }
        }
        Ok(())
    }

    /// QEMU's `check_refblocks()`: each refcount block must be aligned, inside the image
    /// and referenced exactly once.
    async fn check_refblocks(&mut self, fix: Repair, rebuild: &mut bool, imrt: &mut Imrt) -> Step {
        for i in 0..self.reftable.len() {
            let raw = self.reftable[i];
            let offset = raw & REFTABLE_OFFSET_MASK;
            let cluster = offset >> self.bits;
            if raw & REFT_RESERVED_MASK != 0 {
                self.msg(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                self.res.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if self.geometry.in_cluster(offset) != 0 {
                self.msg(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry \
                     corrupted"
                ));
                self.res.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if cluster >= imrt.len {
                self.res.corruptions += 1;
                self.msg(format!(
                    "{} refcount block {i} is outside image",
                    if fix.errors() { "Repairing" } else { "ERROR" }
                ));
                if fix.errors() {
                    match self.grow_file_for(imrt, offset).await {
                        Ok(()) => {
                            self.res.fix_corruption();
                            // The new cluster was zero and is referenced once now.
                            self.inc(imrt, offset, self.cs)?;
                        }
                        Err(Abort(why)) => {
                            *rebuild = true;
                            self.msg(format!("ERROR could not resize image: {why}"));
                        }
                    }
                }
                continue;
            }
            if offset != 0 {
                self.inc(imrt, offset, self.cs)?;
                let r = imrt.get(cluster);
                if r != 1 {
                    self.msg(format!("ERROR refcount block {i} refcount={r}"));
                    self.res.corruptions += 1;
                    *rebuild = true;
                }
            }
        }
        Ok(())
    }

    /// Grows the file to hold the cluster at `offset` (a refcount block placed past the end).
    async fn grow_file_for(&mut self, imrt: &mut Imrt, offset: u64) -> Step {
        let end = offset
            .checked_add(self.cs)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or_else(|| abort_errno(libc::EINVAL))?;
        self.file.resize(end, PreallocMode::Off).await?;
        let len = self.refresh_len()?;
        let nb = self.clusters_of(len);
        if nb > imrt.len {
            imrt.resize(nb)
                .inspect_err(|_| self.res.check_errors += 1)?;
        }
        if offset >> self.bits >= imrt.len {
            return Err(abort_errno(libc::EINVAL));
        }
        Ok(())
    }

    /// QEMU's `compare_refcounts()`: stored against expected refcounts, repairing what
    /// `fix` allows. Returns the highest cluster in use.
    async fn compare_refcounts(&mut self, fix: Repair, rebuild: &mut bool, imrt: &Imrt) -> u64 {
        let mut highest = 0;
        for i in 0..imrt.len {
            let stored = match self.stored.get(self.file, i).await {
                Ok(v) => v,
                Err(e) => {
                    let why = Abort::from(e).0;
                    self.msg(format!("Can't get refcount for cluster {i}: {why}"));
                    self.res.check_errors += 1;
                    continue;
                }
            };
            let expected = imrt.get(i);
            if stored > 0 || expected > 0 {
                highest = i;
            }
            if stored == expected {
                continue;
            }
            let fixes = if stored == 0 {
                *rebuild = true;
                Fixes::Nothing
            } else if stored > expected && fix.leaks() {
                Fixes::Leak
            } else if stored < expected && fix.errors() {
                Fixes::Corruption
            } else {
                Fixes::Nothing
            };
            let word = if fixes != Fixes::Nothing {
                "Repairing"
            } else if stored < expected {
                "ERROR"
            } else {
                "Leaked"
            };
            self.msg(format!(
                "{word} cluster {i} refcount={stored} reference={expected}"
            ));
            if fixes != Fixes::Nothing && self.set_stored(i, expected).await.is_ok() {
                match fixes {
                    Fixes::Leak => self.res.leaks_fixed += 1,
                    _ => self.res.corruptions_fixed += 1,
                }
                continue;
            }
            if stored < expected {
                self.res.corruptions += 1;
            } else {
                self.res.leaks += 1;
            }
        }
        highest
    }

    /// Sets a stored refcount (through the block cache).
    async fn set_stored(&mut self, cluster: u64, value: u64) -> Step {
        let moved = self.stored.set(self.file, cluster, value).await?;
        if let Some(m) = moved {
            // Only possible for a cluster without refcount block, which takes a rebuild
            // instead; kept correct all the same.
            self.point_header_at(m).await?;
            self.stored.release_old_table(self.file).await?;
        }
        if value == 0 {
            self.freed.push(cluster);
        }
        Ok(())
    }

    /// Points the header at a new refcount table (only those two fields are written, as
    /// QEMU does).
    async fn point_header_at(&mut self, m: ReftableMove) -> Step {
        let clusters = u32::try_from(m.clusters).map_err(|_| abort_errno(libc::EFBIG))?;
        let mut field = Vec::with_capacity(12);
        field.extend_from_slice(&m.offset.to_be_bytes());
        field.extend_from_slice(&clusters.to_be_bytes());
        self.file.sync().await?;
        self.file.write_at(48, &field).await?;
        self.file.sync().await?;
        self.header.refcount_table_offset = m.offset;
        self.header.refcount_table_clusters = clusters;
        Ok(())
    }

    /// QEMU's `check_oflag_copied()`: bit 63 of active L1 and L2 entries must be set
    /// exactly when the refcount is 1.
    async fn check_oflag_copied(&mut self, fix: Repair) -> Step {
        let repair = match fix {
            Repair::All => true,
            // Refcounts were repaired first: trust them only if nothing else is wrong.
            Repair::Leaks => {
                self.res.check_errors == 0 && self.res.corruptions == 0 && self.res.leaks == 0
            }
            Repair::None => false,
        };
        let word = if repair { "Repairing" } else { "ERROR" };
        let data_file = self.has_data_file();
        let extended = self.geometry.extended_l2();
        let entry_size: usize = if extended { 16 } else { 8 };
        let mut table = vec![0u8; self.cs as usize];
        for i in 0..self.l1.len() {
            let l1_entry = self.l1[i];
            let l2_offset = l1_entry & L1_OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            // A refcount that cannot be read was reported by the comparison already.
            let Ok(refcount) = self.stored.get(self.file, l2_offset >> self.bits).await else {
                continue;
            };
            if (refcount == 1) != (l1_entry & COPIED != 0) {
                self.res.corruptions += 1;
                self.msg(format!(
                    "{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} \
                     refcount={refcount}"
                ));
                if repair {
                    let fixed = if refcount == 1 {
                        l1_entry | COPIED
                    } else {
                        l1_entry & !COPIED
                    };
                    self.l1[i] = fixed;
                    let at = self.header.l1_table_offset + i as u64 * 8;
                    let written = async {
                        self.file.write_at(at, &fixed.to_be_bytes()).await?;
                        self.file.sync().await
                    }
                    .await;
                    if let Err(e) = written {
                        self.res.check_errors += 1;
                        return Err(e.into());
                    }
                    self.res.fix_corruption();
                }
            }

            if let Err(e) = self.file.read_at(l2_offset, &mut table).await {
                let e = Abort::from(e);
                self.msg(format!("ERROR: Could not read L2 table: {}", e.0));
                self.res.check_errors += 1;
                return Err(e);
            }
            let mut dirty = 0u64;
            for j in 0..self.geometry.l2_entries() as usize {
                let at = j * entry_size;
                let entry = be64(&table, at);
                let ty = self.cluster_type(entry);
                if ty != ClusterType::Normal && ty != ClusterType::ZeroAlloc {
                    continue;
                }
                let refcount = if data_file {
                    1
                } else {
                    match self
                        .stored
                        .get(self.file, (entry & L2_OFFSET_MASK) >> self.bits)
                        .await
                    {
                        Ok(r) => r,
                        Err(_) => continue,
                    }
                };
                if (refcount == 1) != (entry & COPIED != 0) {
                    self.res.corruptions += 1;
                    self.msg(format!(
                        "{word} OFLAG_COPIED data cluster: l2_entry={entry:x} \
                         refcount={refcount}"
                    ));
                    if repair {
                        let fixed = if refcount == 1 {
                            entry | COPIED
                        } else {
                            entry & !COPIED
                        };
                        table[at..at + 8].copy_from_slice(&fixed.to_be_bytes());
                        dirty += 1;
                    }
                }
            }
            if dirty > 0 {
                if let Err(e) = self.file.write_at(l2_offset, &table).await {
                    let e = Abort::from(e);
                    self.msg(format!("ERROR: Could not write L2 table: {}", e.0));
                    self.res.check_errors += 1;
                    return Err(e);
                }
                self.res.corruptions = self.res.corruptions.saturating_sub(dirty);
                self.res.corruptions_fixed += dirty;
            }
        }
        if repair {
            self.file.sync().await?;
        }
        Ok(())
    }

    /// Allocates `count` clusters in the in-memory refcount array, from `*first_free` on
    /// (QEMU's `alloc_clusters_imrt()`); `*first_free` moves to the first gap seen.
    fn alloc_imrt(&mut self, imrt: &mut Imrt, count: u64, first_free: &mut u64) -> Step<u64> {
        let mut cluster = *first_free;
        let mut first_gap = true;
        let mut contiguous = 0u64;
        while cluster < imrt.len && contiguous < count {
            if imrt.get(cluster) == 0 {
                contiguous += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            } else {
                contiguous = 0;
            }
            cluster += 1;
        }
        if contiguous < count {
            imrt.resize(cluster + count - contiguous)?;
        }
        cluster -= contiguous;
        for c in cluster..cluster + count {
            imrt.set(c, 1);
        }
        Ok(cluster << self.bits)
    }

    /// Writes the refcount blocks covering the allocated clusters of `[first, end)`, each a
    /// slice of the in-memory array, allocating them (and growing `table`) where needed
    /// (QEMU's `rebuild_refcounts_write_refblocks()`). Returns whether `table` grew.
    async fn write_refblocks(
        &mut self,
        imrt: &mut Imrt,
        first: u64,
        mut end: u64,
        table: &mut Vec<u64>,
    ) -> Step<bool> {
        let per_block = 1u64 << self.refblock_bits;
        let mut first_free = 0u64;
        let mut grown = false;
        let mut cluster = first;
        while cluster < end {
            if imrt.get(cluster) == 0 {
                cluster += 1;
                continue;
            }
            let index = cluster >> self.refblock_bits;
            let block_start = index << self.refblock_bits;
            let block_offset = match table.get(index as usize) {
                Some(&o) if o != 0 => o,
                _ => {
                    // Never inside a refcount block already written.
                    first_free = first_free.max(block_start);
                    let offset = self.alloc_imrt(imrt, 1, &mut first_free).inspect_err(|e| {
                        self.msg(format!("ERROR allocating refblock: {}", e.0));
                    })?;
                    if offset >> self.bits >= end {
                        // The block that counts this new block must be written too.
                        end = (offset >> self.bits) + 1;
                    }
                    if table.len() as u64 <= index {
                        let entries = ((index + 1) * 8).div_ceil(self.cs) * self.cs / 8;
                        table.resize(entries as usize, 0);
                        grown = true;
                    }
                    table[index as usize] = offset;
                    offset
                }
            };
            let start = (index * self.cs) as usize;
            let block = &imrt.bytes[start..start + self.cs as usize];
            if let Err(e) = self.file.write_at(block_offset, block).await {
                let e = Abort::from(e);
                self.msg(format!("ERROR writing refblock: {}", e.0));
                return Err(e);
            }
            cluster = block_start + per_block;
        }
        Ok(grown)
    }

    /// Writes a new refcount structure made from the in-memory array alone, and points the
    /// header at it (QEMU's `rebuild_refcount_structure()`). The old structure is leaked.
    async fn rebuild_refcount_structure(&mut self, imrt: &mut Imrt) -> Step {
        let result = self.rebuild_inner(imrt).await;
        if result.is_err() {
            self.res.check_errors += 1;
        }
        result
    }

    async fn rebuild_inner(&mut self, imrt: &mut Imrt) -> Step {
        let mut table: Vec<u64> = Vec::new();
        let nb = imrt.len;
        self.write_refblocks(imrt, 0, nb, &mut table).await?;
        let (offset, clusters) = loop {
            let bytes = table.len() as u64 * 8;
            let clusters = self.clusters_of(bytes);
            let mut first_free = 0;
            let offset = self
                .alloc_imrt(imrt, clusters, &mut first_free)
                .inspect_err(|e| self.msg(format!("ERROR allocating reftable: {}", e.0)))?;
            let start = offset >> self.bits;
            // The table's own clusters changed the array: write their blocks again.
            if !self
                .write_refblocks(imrt, start, start + clusters, &mut table)
                .await?
            {
                break (offset, clusters);
            }
        };
        let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        if let Err(e) = self.file.write_at(offset, &raw).await {
            let e = Abort::from(e);
            self.msg(format!("ERROR writing reftable: {}", e.0));
            return Err(e);
        }
        if let Err(e) = self
            .point_header_at(ReftableMove { offset, clusters })
            .await
        {
            self.msg(format!("ERROR setting reftable: {}", e.0));
            return Err(e);
        }
        let (reftable, stored) = Self::load_refcounts(self.file, &self.header).await?;
        self.reftable = reftable;
        self.stored = stored;
        self.refresh_len()?;
        Ok(())
    }
}

/// Reads small pieces of a table through a window of the file.
struct WindowReader<'a> {
    file: &'a dyn Storage,
    start: u64,
    buf: Vec<u8>,
}

impl<'a> WindowReader<'a> {
    const WINDOW: usize = 64 << 10;

    fn new(file: &'a dyn Storage) -> Self {
        WindowReader {
            file,
            start: 0,
            buf: Vec::new(),
        }
    }

    /// `len` bytes at `offset` (zeros past the end of the file).
    async fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let end = offset + len as u64;
        if offset < self.start || end > self.start + self.buf.len() as u64 {
            self.start = offset;
            self.buf = vec![0u8; len.max(Self::WINDOW)];
            self.file.read_at(offset, &mut self.buf).await?;
        }
        let at = (offset - self.start) as usize;
        Ok(self.buf[at..at + len].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DiscardMode, MemoryStorage, Qcow2Create, Qcow2Open};
    use std::sync::Arc;

    /// A fresh image written through the library's own write path.
    async fn written_image(create: Qcow2Create) -> Arc<MemoryStorage> {
        let storage = Arc::new(MemoryStorage::new());
        create.create_on(storage.as_ref(), None).await.unwrap();
        let image = Qcow2Open::storage(storage.clone())
            .writable(true)
            .open()
            .await
            .unwrap();
        let cs = image.cluster_size().unwrap();
        image.write(0, &vec![1u8; 3 * cs as usize]).await.unwrap();
        image.write(10 * cs + 100, &[2u8; 5000]).await.unwrap();
        image.write_zeroes(20 * cs, 2 * cs, false).await.unwrap();
        image
            .write_compressed(30 * cs, &vec![3u8; cs as usize])
            .await
            .unwrap();
        image.discard(cs, cs, DiscardMode::ReadsZero).await.unwrap();
        image.flush().await.unwrap();
        storage
    }

    fn clean(r: &CheckReport) -> bool {
        r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 && r.failure.is_none()
    }

    /// Adds `delta` to the stored refcount of `cluster`.
    async fn bump(storage: &MemoryStorage, cluster: u64, delta: i64) {
        let h = read_header(storage).await.unwrap();
        let mut rc = Refcounts::load(
            storage,
            h.geometry(),
            h.refcount_order,
            h.refcount_table_offset,
            h.refcount_table_clusters,
        )
        .await
        .unwrap();
        let v = rc.get(storage, cluster).await.unwrap();
        let new = v.checked_add_signed(delta).unwrap();
        assert!(rc.set(storage, cluster, new).await.unwrap().is_none());
        rc.flush(storage, true).await.unwrap();
        rc.flush_decreases(storage).await.unwrap();
    }

    #[tokio::test]
    async fn images_written_by_the_library_check_clean() {
        for create in [
            Qcow2Create::new(8 << 20),
            Qcow2Create::new(8 << 20).cluster_size(512).refcount_bits(1),
            Qcow2Create::new(8 << 20)
                .cluster_size(4096)
                .refcount_bits(64),
            Qcow2Create::new(8 << 20).extended_l2(true),
            Qcow2Create::new(8 << 20).compat("0.10").unwrap(),
        ] {
            let storage = written_image(create.clone()).await;
            let r = check(storage.as_ref(), Repair::None).await.unwrap();
            assert!(clean(&r), "{create:?}: {r:#?}");
            assert!(r.allocated_clusters >= 4, "{r:#?}");
            assert_eq!(r.compressed_clusters, 1);
        }
    }

    #[tokio::test]
    async fn a_leak_is_found_and_freed() {
        let storage = written_image(Qcow2Create::new(8 << 20)).await;
        // The header cluster is referenced once; a second count is a leak.
        bump(&storage, 0, 1).await;
        let r = check(storage.as_ref(), Repair::None).await.unwrap();
        assert_eq!((r.leaks, r.corruptions), (1, 0), "{r:#?}");
        assert_eq!(r.messages, ["Leaked cluster 0 refcount=2 reference=1"]);
        let r = check(storage.as_ref(), Repair::Leaks).await.unwrap();
        assert_eq!((r.leaks, r.leaks_fixed), (0, 1), "{r:#?}");
        assert!(clean(&check(storage.as_ref(), Repair::None).await.unwrap()));
    }

    #[tokio::test]
    async fn a_missing_refcount_is_rebuilt_only_with_repair_all() {
        let storage = written_image(Qcow2Create::new(8 << 20)).await;
        let before = check(storage.as_ref(), Repair::None).await.unwrap();
        // The first data cluster follows the header, refcount table, refcount block, L1
        // and L2 tables; dropping its refcount to 0 needs a rebuild.
        let l2 = read_header(storage.as_ref()).await.unwrap();
        let mut entry = [0u8; 8];
        storage
            .read_at(l2.l1_table_offset, &mut entry)
            .await
            .unwrap();
        let l2_offset = u64::from_be_bytes(entry) & L1_OFFSET_MASK;
        storage.read_at(l2_offset, &mut entry).await.unwrap();
        let data = (u64::from_be_bytes(entry) & L2_OFFSET_MASK) >> l2.cluster_bits;
        bump(&storage, data, -1).await;

        let r = check(storage.as_ref(), Repair::None).await.unwrap();
        assert_eq!(r.corruptions, 2, "refcount and OFLAG_COPIED: {r:#?}");
        let r = check(storage.as_ref(), Repair::Leaks).await.unwrap();
        assert_eq!(r.failure.as_deref(), Some("Input/output error"));
        assert!(r
            .messages
            .contains(&"ERROR need to rebuild refcount structures".to_string()));

        let r = check(storage.as_ref(), Repair::All).await.unwrap();
        assert!(r.failure.is_none(), "{r:#?}");
        assert_eq!((r.corruptions, r.corruptions_fixed), (0, 1), "{r:#?}");
        assert!(r
            .messages
            .contains(&"Rebuilding refcount structure".to_string()));
        let after = check(storage.as_ref(), Repair::None).await.unwrap();
        assert!(clean(&after), "{after:#?}");
        assert_eq!(after.allocated_clusters, before.allocated_clusters);
    }

    #[tokio::test]
    async fn repairs_need_a_writable_file_and_a_qcow2_header() {
        let storage = written_image(Qcow2Create::new(8 << 20)).await;
        let mut bytes = vec![0u8; storage.size().unwrap() as usize];
        storage.read_at(0, &mut bytes).await.unwrap();
        let read_only = MemoryStorage::from_bytes(&bytes).into_read_only();
        assert!(clean(&check(&read_only, Repair::None).await.unwrap()));
        let e = check(&read_only, Repair::Leaks).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
        let raw = MemoryStorage::from_bytes(b"not a qcow2 image at all");
        assert!(check(&raw, Repair::None).await.is_err());
    }
}
