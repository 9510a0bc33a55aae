//! The qcow2 format (QEMU copy-on-write, versions 2 and 3).
//!
//! ```text
//!  guest offset --L1 index--> L1 table (in memory) --L2 offset--> L2 table (cached)
//!       --L2 index--> L2 entry: unallocated | zero | data at host offset | compressed
//! ```
//!
//! One file per role: `header` (on-disk header and extensions), `types` (typed offsets and
//! geometry), `l2` (entries and the bounded table cache), `refcount` (refcounts and the
//! allocator), `write` (allocation, copy-on-write, zeroing, discard, flush order),
//! `compress` (deflate/zstd), `create` (new images), `amend` (changing options), `check`
//! (consistency check and repair), `snapshot` (the snapshot table), `bitmaps` (the bitmap
//! directory, kept for `info`).

mod amend;
mod bitmaps;
pub mod check;
mod compress;
mod create;
pub mod header;
mod l2;
mod open;
pub mod options;
mod refcount;
pub mod snapshot;
pub mod types;
mod write;

pub use amend::Qcow2Amend;
pub use bitmaps::BitmapEntry;
pub use create::Qcow2Create;
pub use header::{CompressionType, Header, HeaderError};
pub use open::{Qcow2Format, QCOW2};
pub use snapshot::Snapshot;

use crate::format::{
    BitmapInfo, ChainView, DiscardMode, Format, FormatDriver, FormatSpecific, ImageDescription,
    InfoValue, MapKind, MapQuery, Mapping, SnapshotInfo, WriteTarget,
};
use crate::storage::{BoxFuture, HostExtent, PreallocMode, Storage, StorageExt};
use crate::{Error, ErrorKind, Result};
use l2::{ClusterState, EntryError, L2Cache, L2Table, L1_OFFSET_MASK};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use types::{Geometry, GuestOffset};

/// Decompressed clusters kept for repeated small reads of the same compressed cluster.
const DECOMPRESSED_CACHE: usize = 4;

/// What a qcow2 layer needs from its environment when it is opened.
pub(crate) struct Qcow2Params {
    /// The image file.
    pub file: Arc<dyn Storage>,
    /// Its header, already read with [`read_header`].
    pub header: Header,
    /// The external data file, when the image has one (already opened by the caller).
    pub data_file: Option<Arc<dyn Storage>>,
    /// L2 cache budget in bytes.
    pub l2_cache_bytes: u64,
    /// Open this snapshot (by ID or name) instead of the active state.
    pub snapshot: Option<String>,
    /// Open for writing.
    pub writable: bool,
}

/// What another process may change in an image and [`FormatDriver::invalidate_cache`]
/// re-reads: the header, the snapshot table and the bitmap directory.
#[derive(Debug)]
struct Tables {
    header: Header,
    snapshots: Vec<Snapshot>,
    bitmaps: Vec<BitmapEntry>,
}

/// The active state's (or the opened snapshot's) L1 table and virtual size, read with
/// [`Tables`].
struct Loaded {
    tables: Tables,
    l1: Vec<u64>,
    size: u64,
}

/// The bitmaps as `info` lists them.
fn bitmap_infos(tables: &Tables) -> Vec<BitmapInfo> {
    tables
        .bitmaps
        .iter()
        .map(|b| BitmapInfo {
            name: b.name.clone(),
            granularity: b.granularity(),
            flags: b.flag_names(),
        })
        .collect()
}

/// Reads what [`Tables`] hold, and the L1 table of the active state or of `snapshot`.
async fn load(file: &dyn Storage, header: Header, snapshot: Option<&str>) -> Result<Loaded> {
    let geometry = header.geometry();
    let snapshots = if header.nb_snapshots > 0 {
        // Each entry is at least 40 bytes; read a bounded prefix and let the parser
        // refuse a table that runs past it.
        let max = (u64::from(header.nb_snapshots) * (40 + 1024 + 2 * 65535 + 8))
            .min(snapshot::MAX_TABLE_BYTES);
        let table = read_table(file, header.snapshots_offset, max).await?;
        snapshot::parse_table(&table, header.nb_snapshots, geometry)
            .map_err(|e| Error::new(ErrorKind::InvalidFormat, e.to_string()).with_source(e))?
    } else {
        Vec::new()
    };
    // A snapshot is read with the image's current size, as QEMU does: L1 entries past the
    // snapshot's table read as unallocated.
    let (l1_offset, l1_size, size) = match snapshot {
        None => (header.l1_table_offset, header.l1_size, header.size),
        Some(want) => {
            let s = snapshots
                .iter()
                .find(|s| s.id == want)
                .or_else(|| snapshots.iter().find(|s| s.name == want))
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!("snapshot '{want}' does not exist"),
                    )
                })?;
            (s.l1_table_offset, s.l1_size, header.size)
        }
    };
    let needed = geometry.l1_entries_for(size).unwrap_or(u64::MAX);
    if snapshot.is_none() && u64::from(l1_size) < needed {
        return Err(Error::new(
            ErrorKind::InvalidFormat,
            format!("L1 table of {l1_size} entries is too small for size {size:#x}"),
        ));
    }
    let l1_bytes = read_table(file, l1_offset, u64::from(l1_size) * 8).await?;
    let l1 = be64_words(&l1_bytes, l1_size as usize);
    let bitmaps = match header.bitmaps {
        // Without the autoclear bit the bitmaps are stale: QEMU ignores (and drops) them.
        Some(ext) if header.bitmaps_consistent() => {
            let dir = read_table(file, ext.directory_offset, ext.directory_size).await?;
            // A malformed directory only hides the bitmaps from `info`: the guest data
            // does not depend on it.
            bitmaps::parse_directory(&dir, ext.nb_bitmaps).unwrap_or_default()
        }
        _ => Vec::new(),
    };
    Ok(Loaded {
        tables: Tables {
            header,
            snapshots,
            bitmaps,
        },
        l1,
        size,
    })
}

/// An open qcow2 layer.
pub struct Qcow2Driver {
    file: Arc<dyn Storage>,
    data: Arc<dyn Storage>,
    /// Header, snapshots and bitmaps as last read (at open, or by `invalidate_cache`); the
    /// write path's live header is in `meta`.
    tables: std::sync::RwLock<Arc<Tables>>,
    /// The snapshot opened instead of the active state, if any.
    snapshot: Option<String>,
    /// Facts fixed when the image was created (checked again when the header is re-read).
    geometry: Geometry,
    has_data_file: bool,
    compression: CompressionType,
    /// The active L1 table; read under a short lock, changed with the metadata lock held.
    l1: std::sync::RwLock<Vec<u64>>,
    size: AtomicU64,
    cache: L2Cache,
    writable: bool,
    /// Set when a write found the metadata inconsistent: no more writes.
    corrupt: std::sync::atomic::AtomicBool,
    /// Set by `amend`: writes need a reopened handle that follows the new header.
    amended: std::sync::atomic::AtomicBool,
    /// In-place writes still landing (see `flush`).
    inflight: Arc<write::InFlight>,
    /// Guest clusters with an allocating write in flight.
    pending: write::PendingAllocs,
    meta: Arc<tokio::sync::Mutex<write::Meta>>,
    /// QEMU's "metadata preallocation" guess, made on the first status query: only then are
    /// holes under data clusters reported as zeros.
    metadata_prealloc: tokio::sync::OnceCell<bool>,
    decompressed: Mutex<Vec<(u64, Arc<Vec<u8>>)>>,
}

impl std::fmt::Debug for Qcow2Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Driver")
            .field("file", &self.file.path())
            .field("size", &self.size.load(Ordering::Relaxed))
            .field("cluster_bits", &self.geometry.cluster_bits())
            .field("cache", &self.cache)
            .finish()
    }
}

static CORRUPTION_REPORTER: std::sync::OnceLock<fn(&str)> = std::sync::OnceLock::new();

/// Where the notice of an image being marked corrupt goes (QEMU's tools print "qcow2:
/// Marking image as corrupt: ..." on stderr); by default the library prints nothing.
pub fn set_corruption_reporter(report: fn(&str)) {
    let _ = CORRUPTION_REPORTER.set(report);
}

fn report_corruption(notice: &str) {
    if let Some(report) = CORRUPTION_REPORTER.get() {
        report(notice);
    }
}

fn corrupt(msg: String) -> Error {
    Error::new(ErrorKind::Corrupt, msg)
}

/// Reads a header from `file` (the first cluster, or all of a shorter file).
pub(crate) async fn read_header(file: &dyn Storage) -> Result<Header> {
    let file_size = file.size()?;
    let mut prefix = vec![0u8; (Header::PROBE_LEN as u64).min(file_size) as usize];
    file.read_at(0, &mut prefix).await?;
    let bits = Header::peek_cluster_bits(&prefix)
        .filter(|b| (header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(b))
        .unwrap_or(header::MIN_CLUSTER_BITS);
    let len = (1u64 << bits).min(file_size).max(prefix.len() as u64);
    let mut cluster0 = vec![0u8; len as usize];
    file.read_at(0, &mut cluster0).await?;
    Ok(Header::parse(&cluster0)?)
}

/// Reads up to `bytes` at `offset`, stopping at the end of the file: a table claimed past the
/// end is never allocated in full from a crafted size. Callers treat missing bytes as zeros
/// (L1: unallocated, as QEMU reads them) or as truncation (snapshot table).
async fn read_table(file: &dyn Storage, offset: u64, bytes: u64) -> Result<Vec<u8>> {
    let avail = file.size()?.saturating_sub(offset).min(bytes);
    let mut buf = vec![0u8; avail as usize];
    file.read_at(offset, &mut buf)
        .await
        .map_err(|e| e.with_operation("read qcow2 metadata"))?;
    Ok(buf)
}

fn be64_words(bytes: &[u8], count: usize) -> Vec<u64> {
    let mut words: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|w| u64::from_be_bytes(w.try_into().expect("8 bytes")))
        .collect();
    words.resize(count, 0);
    words
}

impl Qcow2Driver {
    /// Opens a qcow2 layer over `params.file`.
    pub(crate) async fn open(params: Qcow2Params) -> Result<Self> {
        let file = params.file;
        let header = params.header;
        let geometry = header.geometry();
        let data = match (&params.data_file, header.has_data_file()) {
            (Some(d), true) => Arc::clone(d),
            (None, true) => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "the image keeps its data in an external data file, but none was given \
                     (the image names none, or it was not opened)",
                ))
            }
            (_, false) => Arc::clone(&file),
        };

        let loaded = load(file.as_ref(), header.clone(), params.snapshot.as_deref()).await?;
        let tables = (params.l2_cache_bytes / geometry.cluster_size()).max(16) as usize;
        let writable = params.writable;
        if writable {
            write::check_writable(
                &header,
                params.snapshot.is_some(),
                file.as_ref(),
                data.as_ref(),
            )?;
        }
        Ok(Qcow2Driver {
            file,
            data,
            geometry,
            has_data_file: header.has_data_file(),
            compression: header.compression_type,
            tables: std::sync::RwLock::new(Arc::new(loaded.tables)),
            snapshot: params.snapshot,
            l1: std::sync::RwLock::new(loaded.l1),
            size: AtomicU64::new(loaded.size),
            writable,
            corrupt: std::sync::atomic::AtomicBool::new(false),
            amended: std::sync::atomic::AtomicBool::new(false),
            inflight: Arc::default(),
            pending: write::PendingAllocs::default(),
            meta: Arc::new(tokio::sync::Mutex::new(write::Meta::new(header.clone()))),
            metadata_prealloc: tokio::sync::OnceCell::new(),
            cache: L2Cache::new(tables),
            decompressed: Mutex::new(Vec::new()),
        })
    }

    /// QEMU's guess that the image was created with `preallocation=metadata`: at least
    /// max(allocated * 10 / 9, allocated + 2) clusters have a non-zero refcount, where
    /// `allocated` is the clusters' worth of space the file occupies.
    async fn metadata_preallocated(&self) -> Result<bool> {
        self.metadata_prealloc
            .get_or_try_init(|| async {
                let mut rc =
                    refcount::Refcounts::for_header(self.file.as_ref(), &self.tables().header)
                        .await?;
                let cs = self.geometry.cluster_size();
                let real = self.file.allocated_size().unwrap_or(0) / cs;
                let threshold = (real * 10 / 9).max(real + 2);
                let end = self.file.size()?.div_ceil(cs);
                let used = rc.count_used(self.file.as_ref(), end, threshold).await?;
                Ok::<bool, Error>(used >= threshold)
            })
            .await
            .copied()
    }

    fn tables(&self) -> Arc<Tables> {
        Arc::clone(&self.tables.read().unwrap())
    }

    /// The header as last read (at open, or by `invalidate_cache`).
    pub fn header(&self) -> Header {
        self.tables().header.clone()
    }

    /// The internal snapshots, as last read.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.tables().snapshots.clone()
    }

    /// Re-reads what another process may have changed: header, snapshot table, bitmap
    /// directory, L1 table and size (a writable image flushes its own changes first). An
    /// image re-created with another geometry, data file or compression type must be
    /// reopened instead.
    async fn reload(&self) -> Result<()> {
        if self.writable {
            self.flush_impl(false).await?;
        }
        let mut meta = self.lock_quiesced().await;
        if self.writable {
            self.flush_locked(&mut meta, false).await?;
        }
        let header = read_header(self.file.as_ref()).await?;
        let g = header.geometry();
        if g.cluster_bits() != self.geometry.cluster_bits()
            || g.extended_l2() != self.geometry.extended_l2()
            || header.has_data_file() != self.has_data_file
            || header.compression_type != self.compression
        {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "the image was re-created with another layout: reopen it",
            ));
        }
        let loaded = load(self.file.as_ref(), header.clone(), self.snapshot.as_deref()).await?;
        // The new L1 first, then the cache: a read that found a table through the old L1
        // and reads it from disk meanwhile does not cache it.
        *self.l1.write().unwrap() = loaded.l1;
        self.size.store(loaded.size, Ordering::Release);
        *self.tables.write().unwrap() = Arc::new(loaded.tables);
        self.cache.invalidate();
        self.decompressed.lock().unwrap().clear();
        if self.writable {
            meta.reset(header);
        }
        Ok(())
    }

    async fn l2_table(&self, offset: u64) -> Result<Arc<L2Table>> {
        if let Some(t) = self.cache.get(offset) {
            return Ok(t);
        }
        let generation = self.cache.generation();
        let mut bytes = vec![0u8; self.geometry.cluster_size() as usize];
        self.file.debug_event("l2_load");
        self.file
            .read_at(offset, &mut bytes)
            .await
            .map_err(|e| e.with_operation("read L2 table"))?;
        let table = Arc::new(L2Table::from_bytes(&bytes, self.geometry.extended_l2()));
        Ok(self.cache.insert_read(generation, offset, table))
    }

    fn entry_error(&self, e: EntryError, l2_offset: u64, index: usize) -> Error {
        let what = match e {
            EntryError::Unaligned(host) => format!("cluster offset {host:#x} is unaligned"),
            EntryError::AllocatedAndZero(sc) => {
                format!("subcluster {sc} is marked both allocated and zero")
            }
            EntryError::AllocatedWithoutOffset(sc) => {
                format!("subcluster {sc} is allocated but the entry has no offset")
            }
            EntryError::CompressedWithDataFile => {
                "compressed cluster in an image with an external data file".to_string()
            }
        };
        corrupt(format!(
            "{what} (L2 table at {l2_offset:#x}, index {index})"
        ))
    }

    /// Maps the longest run from `offset` (at most `len` bytes) with one state.
    async fn map_run(&self, offset: u64, len: u64) -> Result<(ClusterState, u64)> {
        let g = self.geometry;
        let cluster = g.guest_cluster(GuestOffset(offset));
        let l1_index = g.l1_index(cluster);
        let coverage_end = (offset / g.l2_coverage() + 1).saturating_mul(g.l2_coverage());
        let max_end = offset.saturating_add(len).min(coverage_end);
        let l1_entry = usize::try_from(l1_index)
            .ok()
            .and_then(|i| self.l1.read().unwrap().get(i).copied())
            .unwrap_or(0);
        let l2_offset = l1_entry & L1_OFFSET_MASK;
        if l2_offset == 0 {
            return Ok((ClusterState::Unallocated, max_end - offset));
        }
        if g.in_cluster(l2_offset) != 0 {
            return Err(corrupt(format!(
                "L2 table offset {l2_offset:#x} is unaligned (L1 index {l1_index})"
            )));
        }
        let table = self.l2_table(l2_offset).await?;
        let has_data_file = self.has_data_file;
        let sc_size = g.subcluster_size();
        let state_at = |pos: u64| -> Result<ClusterState> {
            let c = g.guest_cluster(GuestOffset(pos));
            let index = g.l2_index(c);
            let sc = (g.in_cluster(pos) / sc_size) as u32;
            table
                .entry(index)
                .state(g, sc, has_data_file)
                .map_err(|e| self.entry_error(e, l2_offset, index))
        };
        let first = state_at(offset)?;
        // Start of the (sub)cluster holding `offset`; the run grows a subcluster at a time.
        let base = offset / sc_size * sc_size;
        let mut pos = base + sc_size;
        if let ClusterState::Compressed(_) = first {
            let cluster_end = (offset / g.cluster_size() + 1) * g.cluster_size();
            return Ok((first, cluster_end.min(max_end) - offset));
        }
        while pos < max_end {
            let next = state_at(pos)?;
            let same = match (first, next) {
                // Data merges only where it is contiguous on the host too.
                (ClusterState::Data(a), ClusterState::Data(b)) => b == a + (pos - base),
                (ClusterState::Zero(None), ClusterState::Zero(None)) => true,
                (ClusterState::Zero(Some(a)), ClusterState::Zero(Some(b))) => b == a + (pos - base),
                (ClusterState::Unallocated, ClusterState::Unallocated) => true,
                _ => false,
            };
            if !same {
                break;
            }
            pos += sc_size;
        }
        Ok((first, pos.min(max_end) - offset))
    }

    /// Drops cached decompressed clusters whose compressed bytes overlap host bytes
    /// `[host, host + len)` (freed, or about to hold other compressed data).
    pub(super) fn forget_decompressed(&self, host: u64, len: u64) {
        self.decompressed.lock().unwrap().retain(|(d, _)| {
            let (h, l) = l2::compressed_extent(self.geometry, *d);
            h + l <= host || host + len <= h
        });
    }

    async fn decompressed_cluster(&self, descriptor: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((_, c)) = self
            .decompressed
            .lock()
            .unwrap()
            .iter()
            .find(|(d, _)| *d == descriptor)
        {
            return Ok(Arc::clone(c));
        }
        let (host, len) = l2::compressed_extent(self.geometry, descriptor);
        let mut input = vec![0u8; len as usize];
        self.file
            .read_at(host, &mut input)
            .await
            .map_err(|e| e.with_operation("read compressed cluster"))?;
        let kind = self.compression;
        let cluster_size = self.geometry.cluster_size() as usize;
        // Decoding is CPU work: off the executor, several clusters in parallel.
        let out = compress::run_cpu(move || {
            let mut out = vec![0u8; cluster_size];
            compress::decompress(kind, &input, &mut out).map(|()| out)
        })
        .await?
        .map_err(|e| corrupt(format!("compressed cluster at {host:#x}: {e}")).with_source(e))?;
        let out = Arc::new(out);
        let mut cache = self.decompressed.lock().unwrap();
        if cache.len() >= DECOMPRESSED_CACHE {
            cache.remove(0);
        }
        cache.push((descriptor, Arc::clone(&out)));
        Ok(out)
    }

    fn check_write(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::new(ErrorKind::ReadOnly, "image is opened read-only"));
        }
        if self.amended.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "the image options were amended: reopen the image to write to it",
            ));
        }
        Ok(())
    }

    /// qemu-img's "Format specific information" for qcow2, in its order and keys.
    fn specific(&self, tables: &Tables) -> FormatSpecific {
        let h = &tables.header;
        let v3 = h.version >= 3;
        let mut f = FormatSpecific::new("qcow2");
        f.push("compat", InfoValue::Str(h.compat_name().into()));
        f.push(
            "compression-type",
            InfoValue::Str(h.compression_type.name().into()),
        );
        if v3 {
            f.push("lazy-refcounts", InfoValue::Bool(h.lazy_refcounts()));
        }
        if !tables.bitmaps.is_empty() {
            let list = bitmap_infos(tables)
                .into_iter()
                .map(|b| {
                    InfoValue::Map(vec![
                        (
                            "flags".into(),
                            InfoValue::List(
                                b.flags
                                    .iter()
                                    .map(|f| InfoValue::Str(f.to_string()))
                                    .collect(),
                            ),
                        ),
                        ("name".into(), InfoValue::Str(b.name)),
                        ("granularity".into(), InfoValue::Int(b.granularity)),
                    ])
                })
                .collect();
            f.push("bitmaps", InfoValue::List(list));
        }
        f.push("refcount-bits", InfoValue::Int(h.refcount_bits().into()));
        if let Some(d) = &h.data_file {
            f.push("data-file", InfoValue::Str(d.clone()));
        }
        if h.has_data_file() {
            f.push("data-file-raw", InfoValue::Bool(h.data_file_raw()));
        }
        if v3 {
            f.push("corrupt", InfoValue::Bool(h.is_corrupt()));
            f.push("extended-l2", InfoValue::Bool(h.geometry().extended_l2()));
        }
        f
    }
}

impl FormatDriver for Qcow2Driver {
    fn format(&self) -> Format {
        QCOW2
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

    fn map(&self, offset: u64, len: u64, query: MapQuery) -> BoxFuture<'_, Result<Mapping<'_>>> {
        Box::pin(async move {
            let (state, len) = self.map_run(offset, len).await?;
            let within = offset % self.geometry.subcluster_size();
            let kind = match state {
                ClusterState::Unallocated => MapKind::Unallocated,
                ClusterState::Zero(host) => MapKind::Zero {
                    offset: host.map(|h| h + within),
                },
                ClusterState::Data(host) => {
                    let storage = self.data.as_ref();
                    let offset = host + within;
                    if query == MapQuery::Status && self.metadata_preallocated().await? {
                        // Data clusters over holes read as zeros (preallocation=metadata):
                        // report that where QEMU would look, i.e. when its metadata
                        // preallocation guess holds.
                        let (extent, n) = storage.extent(offset, len).await?;
                        let len = n.min(len);
                        let kind = match extent {
                            HostExtent::Hole => MapKind::DataZero { storage, offset },
                            HostExtent::Data => MapKind::Data { storage, offset },
                        };
                        return Ok(Mapping { len, kind });
                    }
                    MapKind::Data { storage, offset }
                }
                ClusterState::Compressed(d) => MapKind::Compressed(d),
            };
            Ok(Mapping { len, kind })
        })
    }

    fn read_compressed<'a>(
        &'a self,
        descriptor: u64,
        guest_offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let cluster = self.decompressed_cluster(descriptor).await?;
            let skip = self.geometry.in_cluster(guest_offset) as usize;
            let src = cluster
                .get(skip..skip + buf.len())
                .ok_or_else(|| corrupt("compressed read crosses a cluster".into()))?;
            buf.copy_from_slice(src);
            Ok(())
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
            self.map_for_write_impl(offset, len, below).await
        })
    }

    fn write_compressed<'a>(
        &'a self,
        offset: u64,
        buf: &'a [u8],
        below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_write()?;
            self.write_compressed_impl(offset, buf, below).await
        })
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.geometry.cluster_size())
    }

    fn subcluster_size(&self) -> Option<u64> {
        Some(self.geometry.subcluster_size())
    }

    fn amend<'a>(
        &'a self,
        options: &'a crate::format::FormatOptions,
        below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let a = options::amend_from_options(options)?;
            Qcow2Driver::amend(self, &a, below).await
        })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn set_backing<'a>(
        &'a self,
        name: Option<&'a str>,
        format: Option<&'a str>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_write()?;
            self.set_backing_impl(name, format).await
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_write()?;
            self.write_zeroes_impl(offset, len, may_unmap, below).await
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
            self.discard_impl(offset, len, mode, below).await
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
            self.resize_impl(new_size, prealloc, below).await
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.flush_impl(false))
    }

    fn sync(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.flush_impl(true))
    }

    fn invalidate_cache(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.reload().await })
    }

    fn describe(&self) -> ImageDescription {
        let tables = self.tables();
        let h = &tables.header;
        ImageDescription {
            filename: self.file.path().map(|p| p.display().to_string()),
            actual_size: self.file.allocated_size(),
            backing_filename: h.backing_file.clone(),
            full_backing_filename: h.backing_file.as_deref().map(|name| {
                self.file
                    .resolve_name(name)
                    .map(|r| r.path.display().to_string())
                    .unwrap_or_else(|_| name.to_string())
            }),
            backing_format: h.backing_format.clone(),
            dirty: h.is_dirty(),
            cluster_size: Some(self.geometry.cluster_size()),
            snapshots: tables
                .snapshots
                .iter()
                .map(|s| SnapshotInfo {
                    id: s.id.clone(),
                    name: s.name.clone(),
                    vm_state_size: s.vm_state_size,
                    date_sec: s.date_sec,
                    date_nsec: s.date_nsec,
                    vm_clock_nsec: s.vm_clock_nsec,
                    icount: s.icount,
                })
                .collect(),
            bitmaps: bitmap_infos(&tables),
            format_specific: Some(self.specific(&tables)),
            children: Vec::new(),
            no_driver_info: false,
        }
    }
}
