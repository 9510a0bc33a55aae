//! QED (QEMU Enhanced Disk), read and written as QEMU 10 does.
//!
//! ```text
//!  0 header (64 B + backing name) | cs: L1 (ts clusters) | data clusters and L2 tables,
//!  appended at the end of the file in allocation order (data first, then its new L2)
//!  L1/L2 entry: 0 unallocated (backing file, or zeros), 1 (L2 only) zero cluster,
//!               else the byte offset of the table or cluster
//! ```
//!
//! Crash safety as QEMU's: without a backing file the header's need-check bit is set (and
//! made durable) before the first allocation after a flush, and cleared at the next flush
//! once data and tables are durable; a writable open of an image with the bit set runs the
//! repairing check first. With a backing file the data is made durable before the L2
//! entry that publishes it, and the bit is not used.
//!
//! One file per role: `header` (the header, checked as QEMU checks it), `check` (qemu-img
//! check and its repair), this file (the driver and creation).

mod check;
mod header;

pub use header::{max_image_size, QedHeader};

use crate::format::{
    BackingName, ChainView, CheckReport, DiscardMode, Format, FormatDriver, FormatOptions,
    ImageDescription, ImageFormat, LayerOpen, MapKind, MapQuery, Mapping, OpenedLayer, OptionKind,
    OptionSpec, Repair, TableCache, WriteCommit, WriteTarget,
};
use crate::storage::{
    BoxFuture, FileStorageOpen, NewFile, Permissions, PreallocMode, Storage, StorageExt,
};
use crate::{Error, ErrorKind, Result};
use check::{read_table, table_bytes};
use header::{
    valid_cluster_size, valid_table_size, F_BACKING_FILE, F_BACKING_FORMAT_NO_PROBE, F_NEED_CHECK,
    HEADER_BYTES, MAX_BACKING_NAME, ZERO_CLUSTER,
};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// The QED format's entry points.
#[derive(Debug)]
pub struct QedFormat;

/// The QED format.
pub const QED: Format = Format::new(&QedFormat);

/// Default cluster size (qemu-img's).
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 << 10;
/// Default table size in clusters (qemu-img's).
pub const DEFAULT_TABLE_SIZE: u32 = 4;

const fn spec(name: &'static str, kind: OptionKind, help: &'static str) -> OptionSpec {
    OptionSpec { name, kind, help }
}

/// qemu-img's qed options, in its order.
const CREATE_OPTIONS: &[OptionSpec] = &[
    spec("backing_file", OptionKind::Str, "File name of a base image"),
    spec(
        "backing_fmt",
        OptionKind::Str,
        "Image format of the base image",
    ),
    spec("cluster_size", OptionKind::Size, "Cluster size (in bytes)"),
    spec("size", OptionKind::Size, "Virtual disk size"),
    spec(
        "table_size",
        OptionKind::Size,
        "L1/L2 table size (in clusters)",
    ),
];

fn corrupt(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Corrupt, msg)
}

fn invalid_arg(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

impl ImageFormat for QedFormat {
    fn name(&self) -> &'static str {
        "qed"
    }

    /// QEMU's `bdrv_qed_probe`: the magic at byte 0.
    fn probe(&self, first: &[u8], _filename: Option<&str>, _file_size: u64) -> u32 {
        if first.starts_with(header::MAGIC) {
            100
        } else {
            0
        }
    }

    fn owns_metadata(&self) -> bool {
        true
    }

    fn has_backing(&self) -> bool {
        true
    }

    fn open<'a>(&'a self, layer: LayerOpen<'a>) -> BoxFuture<'a, Result<OpenedLayer>> {
        Box::pin(async move {
            let driver = QedDriver::open(layer.storage, layer.writable, layer.cache_bytes).await?;
            let backing = driver.backing_name();
            Ok(OpenedLayer {
                driver: Arc::new(driver),
                backing,
            })
        })
    }

    fn create_options(&self) -> &'static [OptionSpec] {
        CREATE_OPTIONS
    }

    fn create_summary(&self, o: &FormatOptions) -> String {
        let mut s = format!("size={}", o.size("size").unwrap_or(0));
        for k in ["backing_file", "backing_fmt"] {
            if let Some(v) = o.str(k) {
                s += &format!(" {k}={v}");
            }
        }
        s += &format!(
            " cluster_size={}",
            o.size("cluster_size")
                .unwrap_or(u64::from(DEFAULT_CLUSTER_SIZE))
        );
        if let Some(ts) = o.size("table_size") {
            s += &format!(" table_size={ts}");
        }
        s
    }

    fn create<'a>(&'a self, path: &'a Path, o: &'a FormatOptions) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { QedCreate::from_options(o)?.create(path).await })
    }

    fn check<'a>(
        &'a self,
        file: &'a dyn Storage,
        repair: Repair,
    ) -> BoxFuture<'a, Result<CheckReport>> {
        Box::pin(async move {
            let h = read_header(file).await?;
            // Every L1 entry, as QEMU checks them (entries past the disk come into use when
            // it grows), unless the table is absurdly large.
            let entries = if h.table_bytes() <= 64 << 20 {
                h.table_entries()
            } else {
                h.l1_entries_used()
            };
            let l1 = read_table(file, h.l1_table_offset, entries).await?;
            let fix = repair != Repair::None;
            let (report, _) = check::check(file, &h, l1, fix).await?;
            // As QEMU: a repairing check that leaves no corruption marks the image clean.
            if fix && report.corruptions == 0 && h.features & F_NEED_CHECK != 0 {
                let mut clean = h.clone();
                clean.features &= !F_NEED_CHECK;
                file.write_at(0, &clean.to_bytes()).await?;
                file.sync().await?;
            }
            Ok(report)
        })
    }
}

/// Reads and checks the header of `file`.
async fn read_header(file: &dyn Storage) -> Result<QedHeader> {
    let mut b = [0u8; HEADER_BYTES];
    file.read_at(0, &mut b).await?;
    QedHeader::parse(&b, file.size()?)
}

/// What an L2 entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    Unallocated,
    Zero,
    Data(u64),
}

/// The header as on disk and the backing file it names.
#[derive(Debug)]
struct Meta {
    header: QedHeader,
    backing: Option<String>,
}

/// An open QED image.
#[derive(Debug)]
pub struct QedDriver {
    file: Arc<dyn Storage>,
    writable: bool,
    cs: u64,
    /// Entries per table.
    entries: u64,
    meta: Mutex<Meta>,
    size: AtomicU64,
    /// The L1 entries that can map guest data.
    l1: RwLock<Vec<u64>>,
    /// L2 tables by L1 index; loads happen under the lock so that a table read before an
    /// update is never cached after it.
    cache: tokio::sync::Mutex<TableCache<u64>>,
    /// The end of the file as allocations see it (a multiple of the cluster size).
    end: AtomicU64,
    /// Held while allocating; true while the need-check bit is set on disk.
    alloc: tokio::sync::Mutex<bool>,
    /// L2 tables the cache holds.
    slots: usize,
}

impl QedDriver {
    async fn open(file: Arc<dyn Storage>, writable: bool, cache_bytes: u64) -> Result<Self> {
        let mut h = read_header(file.as_ref()).await?;
        let backing = if h.has_backing() {
            let mut name = vec![0u8; h.backing_filename_size as usize];
            file.read_at(u64::from(h.backing_filename_offset), &mut name)
                .await?;
            // As QEMU: the name ends at its first NUL.
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            Some(String::from_utf8_lossy(&name[..end]).into_owned()).filter(|n| !n.is_empty())
        } else {
            None
        };
        let writable = writable && file.is_writable();
        let mut l1 = read_table(file.as_ref(), h.l1_table_offset, h.l1_entries_used()).await?;
        if writable {
            let before = h.clone();
            // Unknown auto-clear bits describe data this writer does not keep up to date.
            h.autoclear_features = 0;
            if h.features & F_NEED_CHECK != 0 {
                let (report, fixed) = check::check(file.as_ref(), &h, l1, true).await?;
                l1 = fixed;
                if report.corruptions == 0 && report.check_errors == 0 {
                    h.features &= !F_NEED_CHECK;
                }
            }
            if h != before {
                file.write_at(0, &h.to_bytes()).await?;
                file.sync().await?;
            }
        }
        let end = h.file_end(file.size()?);
        let cs = h.cs();
        let slots = TableCache::<u64>::slots(cache_bytes, h.table_entries(), 8, 2);
        Ok(QedDriver {
            writable,
            cs,
            entries: h.table_entries(),
            size: AtomicU64::new(h.image_size),
            l1: RwLock::new(l1),
            cache: tokio::sync::Mutex::new(TableCache::new(slots)),
            end: AtomicU64::new(end),
            alloc: tokio::sync::Mutex::new(h.features & F_NEED_CHECK != 0),
            slots,
            meta: Mutex::new(Meta { header: h, backing }),
            file,
        })
    }

    fn header(&self) -> QedHeader {
        self.meta.lock().unwrap().header.clone()
    }

    fn backing_name(&self) -> Option<BackingName> {
        let m = self.meta.lock().unwrap();
        m.backing.clone().map(|name| BackingName {
            name,
            format: (m.header.features & F_BACKING_FORMAT_NO_PROBE != 0).then(|| "raw".into()),
            expected_id: None,
        })
    }

    fn has_backing(&self) -> bool {
        self.meta.lock().unwrap().backing.is_some()
    }

    fn check_write(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::ReadOnly, "image is opened read-only"))
        }
    }

    fn l1_entry(&self, l1i: u64) -> u64 {
        self.l1
            .read()
            .unwrap()
            .get(l1i as usize)
            .copied()
            .unwrap_or(0)
    }

    /// The L2 table of L1 entry `l1i`, or `None` when there is none.
    async fn l2(&self, l1i: u64) -> Result<Option<Arc<Vec<u64>>>> {
        let mut cache = self.cache.lock().await;
        if let Some(t) = cache.get(l1i) {
            return Ok(Some(t));
        }
        let offset = self.l1_entry(l1i);
        if offset == 0 {
            return Ok(None);
        }
        let h = self.header();
        if !h.table_offset_ok(offset, self.end.load(Ordering::Acquire)) {
            return Err(corrupt(format!(
                "QED L1 entry {l1i} names an L2 table at 0x{offset:x}, outside the file"
            )));
        }
        let t = Arc::new(read_table(self.file.as_ref(), offset, self.entries).await?);
        cache.put(l1i, t.clone());
        Ok(Some(t))
    }

    fn classify(&self, e: u64) -> Result<Entry> {
        match e {
            0 => Ok(Entry::Unallocated),
            ZERO_CLUSTER => Ok(Entry::Zero),
            _ if self
                .header()
                .cluster_ok(e, self.end.load(Ordering::Acquire)) =>
            {
                Ok(Entry::Data(e))
            }
            _ => Err(corrupt(format!(
                "QED L2 entry 0x{e:x} is not a cluster inside the file"
            ))),
        }
    }

    /// The state of guest cluster `c` and how many clusters from it (at most `max`, all in
    /// one L2 table) share it: the same kind, data at consecutive host clusters.
    async fn run(&self, c: u64, max: u64) -> Result<(Entry, u64)> {
        let l1i = c / self.entries;
        let l2i = c % self.entries;
        let limit = max.min(self.entries - l2i).max(1);
        let Some(t) = self.l2(l1i).await? else {
            return Ok((Entry::Unallocated, limit));
        };
        let first = self.classify(t[l2i as usize])?;
        let h = self.header();
        let end = self.end.load(Ordering::Acquire);
        let mut n = 1;
        while n < limit {
            let next = t[(l2i + n) as usize];
            let same = match first {
                Entry::Unallocated => next == 0,
                Entry::Zero => next == ZERO_CLUSTER,
                // Each cluster of a run inside the file (a run past its end would let a
                // write in place overlap a later allocation).
                Entry::Data(host) => {
                    next == host.wrapping_add(n * self.cs) && h.cluster_ok(next, end)
                }
            };
            if !same {
                break;
            }
            n += 1;
        }
        Ok((first, n))
    }

    /// Takes `bytes` at the end of the file (under the allocation lock).
    fn reserve(&self, bytes: u64) -> Result<u64> {
        let at = self.end.load(Ordering::Acquire);
        let new_end = at
            .checked_add(bytes)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or_else(|| Error::new(ErrorKind::NoSpace, "the QED image file is full"))?;
        self.end.store(new_end, Ordering::Release);
        Ok(at)
    }

    /// Before the first allocation since the image was last consistent: sets the
    /// need-check bit, durably (images with a backing file order their writes instead).
    async fn begin_allocation(&self, need_check: &mut bool) -> Result<()> {
        if *need_check || self.has_backing() {
            return Ok(());
        }
        let h = {
            let mut m = self.meta.lock().unwrap();
            m.header.features |= F_NEED_CHECK;
            m.header.clone()
        };
        self.file.write_at(0, &h.to_bytes()).await?;
        self.file.sync().await?;
        *need_check = true;
        Ok(())
    }

    /// Writes L2 entries `values` from `l2i` in the table of L1 entry `l1i`; `new_table`
    /// is the offset reserved for that table when it does not exist yet (written whole,
    /// then named in the L1).
    async fn publish(
        &self,
        l1i: u64,
        l2i: u64,
        values: &[u64],
        new_table: Option<u64>,
    ) -> Result<()> {
        let h = self.header();
        let mut cache = self.cache.lock().await;
        if let Some(t) = new_table {
            let mut table = vec![0u64; self.entries as usize];
            table[l2i as usize..l2i as usize + values.len()].copy_from_slice(values);
            self.file.write_at(t, &table_bytes(&table)).await?;
            self.file
                .write_at(h.l1_table_offset + l1i * 8, &t.to_le_bytes())
                .await?;
            if let Some(slot) = self.l1.write().unwrap().get_mut(l1i as usize) {
                *slot = t;
            }
            cache.put(l1i, Arc::new(table));
        } else {
            let offset = self.l1_entry(l1i);
            self.file
                .write_at(offset + l2i * 8, &table_bytes(values))
                .await?;
            for (i, &v) in values.iter().enumerate() {
                cache.update(l1i, l2i as usize + i, v);
            }
        }
        Ok(())
    }

    /// Sets guest clusters `[c, c + n)` (inside one L2 table) to the zero-cluster entry.
    async fn set_zero_clusters(&self, c: u64, n: u64) -> Result<()> {
        let mut need_check = self.alloc.lock().await;
        self.begin_allocation(&mut need_check).await?;
        let l1i = c / self.entries;
        let new_table = if self.l1_entry(l1i) == 0 {
            Some(self.reserve(self.header().table_bytes())?)
        } else {
            None
        };
        let values = vec![ZERO_CLUSTER; n as usize];
        self.publish(l1i, c % self.entries, &values, new_table)
            .await
    }

    /// The header's features and size, for tests and diagnostics.
    pub fn header_fields(&self) -> QedHeader {
        self.header()
    }
}

impl FormatDriver for QedDriver {
    fn format(&self) -> Format {
        QED
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn storage(&self) -> &dyn Storage {
        self.file.as_ref()
    }

    fn map(&self, offset: u64, len: u64, _query: MapQuery) -> BoxFuture<'_, Result<Mapping<'_>>> {
        Box::pin(async move {
            let cs = self.cs;
            let within = offset % cs;
            let clusters = (within + len).div_ceil(cs);
            let (entry, n) = self.run(offset / cs, clusters).await?;
            let run = (n * cs - within).min(len);
            let kind = match entry {
                Entry::Unallocated => MapKind::Unallocated,
                Entry::Zero => MapKind::Zero { offset: None },
                Entry::Data(host) => MapKind::Data {
                    storage: self.file.as_ref(),
                    offset: host + within,
                },
            };
            Ok(Mapping { len: run, kind })
        })
    }

    fn map_for_write<'a>(
        &'a self,
        offset: u64,
        len: u64,
        below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<WriteTarget<'a>>> {
        Box::pin(async move {
            self.check_write()?;
            let cs = self.cs;
            let within = offset % cs;
            let c = offset / cs;
            let clusters = (within + len).div_ceil(cs);
            let in_place = |host: u64, n: u64| WriteTarget {
                len: (n * cs - within).min(len),
                storage: self.file.as_ref(),
                offset: host + within,
                commit: None,
                hold: None,
            };
            if let (Entry::Data(host), n) = self.run(c, clusters).await? {
                return Ok(in_place(host, n));
            }
            let mut need_check = self.alloc.lock().await;
            let (entry, n) = self.run(c, clusters).await?;
            if let Entry::Data(host) = entry {
                return Ok(in_place(host, n));
            }
            self.begin_allocation(&mut need_check).await?;
            let run = (n * cs - within).min(len);
            let data = self.reserve(n * cs)?;
            let l1i = c / self.entries;
            let new_table = if self.l1_entry(l1i) == 0 {
                Some(self.reserve(self.header().table_bytes())?)
            } else {
                None
            };
            // The rest of the new clusters: the backing file's data where the clusters
            // fell through to it, zeros otherwise.
            let from_below = entry == Entry::Unallocated && !below.is_empty();
            for (at, bytes) in [(0, within), (within + run, n * cs - within - run)] {
                if bytes == 0 {
                    continue;
                }
                if from_below {
                    let mut tmp = vec![0u8; bytes as usize];
                    below.read(c * cs + at, &mut tmp).await?;
                    self.file.write_at(data + at, &tmp).await?;
                } else {
                    self.file.write_zeroes(data + at, bytes, false).await?;
                }
            }
            let commit: WriteCommit<'a> = Box::new(move || {
                Box::pin(async move {
                    let _held = need_check;
                    if self.has_backing() {
                        // No need-check bit with a backing file: the data is durable
                        // before the entry that names it.
                        self.file.sync().await?;
                    }
                    let values: Vec<u64> = (0..n).map(|i| data + i * cs).collect();
                    self.publish(l1i, c % self.entries, &values, new_table)
                        .await
                })
            });
            Ok(WriteTarget {
                len: run,
                storage: self.file.as_ref(),
                offset: data + within,
                commit: Some(commit),
                hold: None,
            })
        })
    }

    /// As QEMU: whole clusters not holding data become zero clusters; data clusters are
    /// overwritten with zeros and stay allocated; parts of clusters are written as data.
    fn write_zeroes<'a>(
        &'a self,
        offset: u64,
        len: u64,
        _may_unmap: bool,
        below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_write()?;
            let cs = self.cs;
            let end = offset + len;
            let mut pos = offset;
            while pos < end {
                let within = pos % cs;
                let c = pos / cs;
                let (entry, n) = self.run(c, (within + end - pos).div_ceil(cs)).await?;
                let run = (n * cs - within).min(end - pos);
                match entry {
                    Entry::Zero => {}
                    Entry::Data(host) => {
                        self.file.write_zeroes(host + within, run, false).await?;
                    }
                    Entry::Unallocated => {
                        let first_whole = pos.next_multiple_of(cs);
                        let last_whole = (pos + run) / cs * cs;
                        if first_whole < last_whole {
                            if pos < first_whole {
                                let z = vec![0u8; (first_whole - pos) as usize];
                                crate::format::write_through(self, pos, &z, below).await?;
                            }
                            self.set_zero_clusters(
                                first_whole / cs,
                                (last_whole - first_whole) / cs,
                            )
                            .await?;
                            if last_whole < pos + run {
                                let z = vec![0u8; (pos + run - last_whole) as usize];
                                crate::format::write_through(self, last_whole, &z, below).await?;
                            }
                        } else {
                            let z = vec![0u8; run as usize];
                            crate::format::write_through(self, pos, &z, below).await?;
                        }
                    }
                }
                pos += run;
            }
            Ok(())
        })
    }

    fn discard<'a>(
        &'a self,
        offset: u64,
        len: u64,
        mode: DiscardMode,
        below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_write()?;
            match mode {
                // As QEMU: QED has no discard, the data stays.
                DiscardMode::ReadsAnything => Ok(()),
                DiscardMode::ReadsZero => self.write_zeroes(offset, len, true, below).await,
                DiscardMode::ReadsBacking if below.is_empty() => {
                    self.write_zeroes(offset, len, true, below).await
                }
                DiscardMode::ReadsBacking => {
                    // The backing file's data, copied into what this layer holds.
                    let cs = self.cs;
                    let end = offset + len;
                    let mut pos = offset;
                    while pos < end {
                        let within = pos % cs;
                        let (entry, n) = self
                            .run(pos / cs, (within + end - pos).div_ceil(cs))
                            .await?;
                        let run = (n * cs - within).min(end - pos);
                        if entry != Entry::Unallocated {
                            let mut buf = vec![0u8; run.min(4 << 20) as usize];
                            below.read(pos, &mut buf).await?;
                            crate::format::write_through(self, pos, &buf, below).await?;
                            pos += buf.len() as u64;
                            continue;
                        }
                        pos += run;
                    }
                    Ok(())
                }
            }
        })
    }

    fn resize<'a>(
        &'a self,
        new_size: u64,
        prealloc: PreallocMode,
        below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_write()?;
            if prealloc != PreallocMode::Off {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("Unsupported preallocation mode '{}'", prealloc.as_str()),
                ));
            }
            let old = self.size();
            if new_size < old {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "Shrinking images is currently not supported",
                ));
            }
            let h = self.header();
            if new_size % 512 != 0 || new_size > max_image_size(h.cluster_size, h.table_size) {
                return Err(invalid_arg("Invalid image size specified"));
            }
            let _guard = self.alloc.lock().await;
            let h = {
                let mut m = self.meta.lock().unwrap();
                m.header.image_size = new_size;
                m.header.clone()
            };
            let used = h.l1_entries_used() as usize;
            self.file.write_at(0, &h.to_bytes()).await?;
            self.file.sync().await?;
            {
                let mut l1 = self.l1.write().unwrap();
                if l1.len() < used {
                    l1.resize(used, 0);
                }
            }
            drop(_guard);
            // L1 entries past the old end may not have been read: read them now.
            let old_used = QedHeader {
                image_size: old,
                ..h.clone()
            }
            .l1_entries_used();
            if (used as u64) > old_used {
                let extra = read_table(
                    self.file.as_ref(),
                    h.l1_table_offset + old_used * 8,
                    used as u64 - old_used,
                )
                .await?;
                let mut l1 = self.l1.write().unwrap();
                l1[old_used as usize..used].copy_from_slice(&extra);
            }
            self.size.store(new_size, Ordering::Release);
            // The new space reads as zeros, not as the backing file's data.
            let shown = below.size().min(new_size);
            if shown > old {
                self.write_zeroes(old, shown - old, false, below).await?;
            }
            Ok(())
        })
    }

    fn set_backing<'a>(
        &'a self,
        name: Option<&'a str>,
        format: Option<&'a str>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_write()?;
            let _guard = self.alloc.lock().await;
            let mut h = self.header();
            let name_bytes = name.unwrap_or("").as_bytes();
            if HEADER_BYTES as u64 + name_bytes.len() as u64 > h.header_bytes()
                || name_bytes.len() as u64 >= u64::from(MAX_BACKING_NAME)
            {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    "No space left in the file header",
                ));
            }
            h.features &= !(F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE);
            h.backing_filename_offset = HEADER_BYTES as u32;
            h.backing_filename_size = name_bytes.len() as u32;
            if name.is_some() {
                h.features |= F_BACKING_FILE;
                if format == Some("raw") {
                    h.features |= F_BACKING_FORMAT_NO_PROBE;
                }
            }
            let mut b = h.to_bytes().to_vec();
            b.extend_from_slice(name_bytes);
            self.file.write_at(0, &b).await?;
            self.file.sync().await?;
            let mut m = self.meta.lock().unwrap();
            m.header = h;
            m.backing = name.filter(|n| !n.is_empty()).map(str::to_string);
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if !self.writable {
                return self.file.flush().await;
            }
            let mut need_check = self.alloc.lock().await;
            self.file.flush().await?;
            if *need_check {
                // Data and tables durable first: only then is the image consistent.
                self.file.sync().await?;
                let h = {
                    let mut m = self.meta.lock().unwrap();
                    m.header.features &= !F_NEED_CHECK;
                    m.header.clone()
                };
                self.file.write_at(0, &h.to_bytes()).await?;
                *need_check = false;
            }
            Ok(())
        })
    }

    fn sync(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.flush().await?;
            self.file.sync().await
        })
    }

    fn invalidate_cache(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.flush().await?;
            let _guard = self.alloc.lock().await;
            let h = read_header(self.file.as_ref()).await?;
            let l1 = read_table(self.file.as_ref(), h.l1_table_offset, h.l1_entries_used()).await?;
            let mut cache = self.cache.lock().await;
            *cache = TableCache::new(self.slots);
            *self.l1.write().unwrap() = l1;
            self.end
                .store(h.file_end(self.file.size()?), Ordering::Release);
            self.size.store(h.image_size, Ordering::Release);
            self.meta.lock().unwrap().header = h;
            Ok(())
        })
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.cs)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    /// As qemu-img info: the cluster size, the backing file (its format only when the
    /// image says raw), and never a dirty flag (qemu-img 10 shows none for QED).
    fn describe(&self) -> ImageDescription {
        let m = self.meta.lock().unwrap();
        let backing = m.backing.clone();
        ImageDescription {
            filename: self.file.path().map(|p| p.display().to_string()),
            actual_size: self.file.allocated_size(),
            cluster_size: Some(self.cs),
            full_backing_filename: backing.as_ref().map(|b| {
                self.file
                    .resolve_name(b)
                    .map(|r| r.path.display().to_string())
                    .unwrap_or_else(|_| b.clone())
            }),
            backing_format: (backing.is_some()
                && m.header.features & F_BACKING_FORMAT_NO_PROBE != 0)
                .then(|| "raw".into()),
            backing_filename: backing,
            ..ImageDescription::default()
        }
    }
}

/// Builder for new QED images, laid out byte for byte as qemu-img lays them out.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> vmimg::Result<()> {
/// use vmimg::qed::QedCreate;
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("disk.qed");
/// QedCreate::new(1 << 30).cluster_size(4096).create(&path).await?;
/// let image = vmimg::ImageOpen::path(&path).format(vmimg::Format::QED).open().await?;
/// assert_eq!(image.size(), 1 << 30);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct QedCreate {
    size: u64,
    cluster_size: u64,
    table_size: u64,
    backing: Option<(String, Option<String>)>,
}

impl QedCreate {
    /// An image of `size` bytes (rounded up to 512, as qemu-img does) with qemu-img's
    /// defaults: 64 KiB clusters, tables of 4 clusters.
    pub fn new(size: u64) -> Self {
        QedCreate {
            size,
            cluster_size: u64::from(DEFAULT_CLUSTER_SIZE),
            table_size: u64::from(DEFAULT_TABLE_SIZE),
            backing: None,
        }
    }

    /// The cluster size: a power of two from 4 KiB to 64 MiB.
    pub fn cluster_size(mut self, bytes: u64) -> Self {
        self.cluster_size = bytes;
        self
    }

    /// Clusters per table: a power of two from 2 to 16 (QEMU also creates 1, which it
    /// then cannot open: refused here).
    pub fn table_size(mut self, clusters: u64) -> Self {
        self.table_size = clusters;
        self
    }

    /// The backing file, as stored (relative to the image), and its format (only `raw` is
    /// recorded, as QEMU records it; other formats are probed when opened).
    pub fn backing(mut self, name: &str, format: Option<&str>) -> Self {
        self.backing = Some((name.to_string(), format.map(str::to_string)));
        self
    }

    fn from_options(o: &FormatOptions) -> Result<Self> {
        let size = o
            .size("size")
            .ok_or_else(|| invalid_arg("Image creation needs a size parameter"))?;
        let mut c = QedCreate::new(size);
        if let Some(cs) = o.size("cluster_size") {
            c.cluster_size = cs;
        }
        if let Some(ts) = o.size("table_size") {
            c.table_size = ts;
        }
        if let Some(b) = o.str("backing_file") {
            c = c.backing(b, o.str("backing_fmt"));
        }
        Ok(c)
    }

    /// The header this creation writes, after qemu-img's checks and messages.
    fn header(&self) -> Result<QedHeader> {
        let cs = u32::try_from(self.cluster_size)
            .ok()
            .filter(|&c| valid_cluster_size(c))
            .ok_or_else(|| {
                invalid_arg("QED cluster size must be within range [4096, 67108864] and power of 2")
            })?;
        let ts = u32::try_from(self.table_size)
            .ok()
            .filter(|&t| valid_table_size(t))
            .ok_or_else(|| {
                invalid_arg("QED table size must be within range [1, 16] and power of 2")
            })?;
        if ts == 1 {
            // Deliberately: qemu-img 10 creates these, then cannot open them.
            return Err(invalid_arg(
                "QED table size 1 makes images QEMU cannot open; use 2 to 16",
            ));
        }
        let size = self.size.div_ceil(512).saturating_mul(512);
        let max = max_image_size(cs, ts);
        if size > max {
            return Err(invalid_arg(format!(
                "QED image size must be a non-zero multiple of cluster size and less than {max} bytes"
            )));
        }
        let mut h = QedHeader::new(cs, ts, size);
        if let Some((name, format)) = &self.backing {
            let len = name.len() as u64;
            if HEADER_BYTES as u64 + len > h.cs() || len >= u64::from(MAX_BACKING_NAME) {
                return Err(invalid_arg(format!(
                    "the backing file name is too long for a QED header of {} bytes",
                    h.cs()
                )));
            }
            h.features |= F_BACKING_FILE;
            if format.as_deref() == Some("raw") {
                h.features |= F_BACKING_FORMAT_NO_PROBE;
            }
            h.backing_filename_offset = HEADER_BYTES as u32;
            h.backing_filename_size = len as u32;
        }
        Ok(h)
    }

    /// Creates (or truncates) the file at `path`; a create that fails removes the file it
    /// made.
    pub async fn create(&self, path: &Path) -> Result<()> {
        self.header()?;
        let new = NewFile::new(path);
        let (perm, shared) = QED.permissions(true, Permissions::ALL, false)?;
        let file = new.finish(
            FileStorageOpen::new(path)
                .create(true)
                .create_permissions(perm, shared)
                .open()
                .await,
        )?;
        let result = self
            .create_on(&file)
            .await
            .map_err(|e| e.with_operation("create").with_path(path));
        drop(file);
        new.finish(result)
    }

    /// Writes a new image over `file`: the header and backing name, then the L1 table
    /// written as zeros (a hole between them, as qemu-img leaves it).
    pub async fn create_on(&self, file: &dyn Storage) -> Result<()> {
        let h = self.header()?;
        file.resize(0, PreallocMode::Off).await?;
        let mut first = h.to_bytes().to_vec();
        if let Some((name, _)) = &self.backing {
            first.extend_from_slice(name.as_bytes());
        }
        file.write_at(0, &first).await?;
        let zeros = vec![0u8; h.table_bytes().min(1 << 20) as usize];
        let mut at = 0;
        while at < h.table_bytes() {
            let n = (h.table_bytes() - at).min(zeros.len() as u64);
            file.write_at(h.l1_table_offset + at, &zeros[..n as usize])
                .await?;
            at += n;
        }
        file.sync().await
    }
}
