//! VHDX (Hyper-V): dynamic, fixed and (read-only) differencing disks, with the log.
//!
//! ```text
//!  0 "vhdxfile" | 64K header 1 | 128K header 2 | 192K regions | 256K copy | 1M log | BAT |
//!  metadata | payload blocks ...
//!  guest offset --/ block size--> payload block n --> BAT[n + n / chunk_ratio]:
//!     state (zero, not present, fully present at offset, partially present + bitmap)
//! ```
//!
//! One file per role: `header` (structures, checksums, GUIDs), `layout` (reading and
//! checking the structure), `log` (entries, replay, writing), `replayed` (a read-only view
//! with the log applied in memory), `create` (new images), this file (the driver).
//!
//! New blocks go at the end of the file (QEMU's place). BAT changes stay in memory until a
//! flush, which writes them through the log as QEMU does (a new log GUID in both headers,
//! the entry, the BAT pages, the GUID cleared), so a crash at any point leaves an image that
//! opens with everything flushed before it. An image whose log needs a replay is replayed
//! when opened for writing (as QEMU does) and read through the replayed log without
//! writing when opened read-only (QEMU refuses that open).

mod create;
pub mod header;
mod layout;
pub mod log;
mod replayed;

pub use create::VhdxCreate;
pub use layout::ParentLocator;

use crate::format::{
    BackingName, ChainView, CheckReport, DiscardMode, Format, FormatDriver, FormatOptions,
    ImageDescription, ImageFormat, LayerOpen, MapKind, MapQuery, Mapping, OpenedLayer, OptionSpec,
    Repair, TableCache, WriteCommit, WriteTarget,
};
use crate::storage::{BoxFuture, HostExtent, PreallocMode, Storage, StorageExt};
use crate::{Error, ErrorKind, Result};
use header::{bat_offset, invalid, new_guid, state, Guid, Header, HEADER1, HEADER2, MIB};
use layout::{read_headers, Headers, Layout};
use log::LogEntry;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The VHDX format's entry points.
#[derive(Debug)]
pub struct VhdxFormat;

/// The VHDX format.
pub const VHDX: Format = Format::new(&VhdxFormat);

impl ImageFormat for VhdxFormat {
    fn name(&self) -> &'static str {
        "vhdx"
    }

    /// QEMU's `vhdx_probe`: the file identifier.
    fn probe(&self, first: &[u8], _filename: Option<&str>, _file_size: u64) -> u32 {
        if first.starts_with(layout::SIGNATURE) {
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
        Box::pin(VhdxDriver::open(layer))
    }

    fn create_options(&self) -> &'static [OptionSpec] {
        create::CREATE_OPTIONS
    }

    fn create_summary(&self, options: &FormatOptions) -> String {
        create::summary(options)
    }

    fn create<'a>(
        &'a self,
        path: &'a std::path::Path,
        options: &'a FormatOptions,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { VhdxCreate::from_options(options)?.create(path).await })
    }

    fn check<'a>(
        &'a self,
        file: &'a dyn Storage,
        repair: Repair,
    ) -> BoxFuture<'a, Result<CheckReport>> {
        Box::pin(check(file, repair))
    }
}

impl Headers {
    /// Writes the non-current header as the new current one, twice (both slots end up
    /// current in turn, as QEMU writes them): sequence + 1 each, this session's file-write
    /// GUID, `log_guid`, and a new data-write GUID if `new_data`.
    async fn update(
        &mut self,
        file: &dyn Storage,
        session: Guid,
        log_guid: Guid,
        new_data: bool,
    ) -> Result<()> {
        let data = if new_data {
            new_guid()
        } else {
            self.header.data_write_guid
        };
        for _ in 0..2 {
            let slot = 1 - self.current;
            let h = Header {
                sequence: self.header.sequence + 1,
                file_write_guid: session,
                data_write_guid: data,
                log_guid,
                ..self.header.clone()
            };
            h.write_into(&mut self.raw[slot]);
            let at = if slot == 0 { HEADER1 } else { HEADER2 };
            file.write_at(at, &self.raw[slot]).await?;
            self.current = slot;
            self.header = h;
        }
        Ok(())
    }
}

/// Applies `entries` to the file, extends it as they say, makes it durable, and clears the
/// log GUID in both headers.
async fn replay(file: &dyn Storage, headers: &mut Headers, entries: &[LogEntry]) -> Result<()> {
    log::check_applicable(entries, file.size()?)?;
    let mut last = 0;
    for e in entries {
        for w in &e.writes {
            match w {
                log::LogWrite::Data { offset, bytes } => file.write_at(*offset, bytes).await?,
                log::LogWrite::Zero { offset, len } => {
                    file.write_zeroes(*offset, *len, false).await?
                }
            }
        }
        last = last.max(e.last);
    }
    if file.size()? < last {
        file.resize(last.next_multiple_of(MIB), PreallocMode::Off)
            .await?;
    }
    file.sync().await?;
    headers.update(file, new_guid(), [0; 16], true).await?;
    file.sync().await
}

/// `qemu-img check` for vhdx: replays the log (with a repair), then checks that every block
/// in use lies inside the file and clear of the metadata.
async fn check(file: &dyn Storage, repair: Repair) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let mut headers = read_headers(file).await?;
    let entries = layout::pending_log(file, &headers.header).await?;
    if !entries.is_empty() {
        if repair == Repair::None {
            report.messages.push(
                "The VHDX log holds entries that were never applied; check -r all replays them"
                    .into(),
            );
            report.corruptions += 1;
            return Ok(report);
        }
        replay(file, &mut headers, &entries).await?;
        report.corruptions_fixed += 1;
    }
    let layout = Layout::read(file, &headers.header).await?;
    let file_len = file.size()?;
    let blocks = layout.size.div_ceil(layout.block_size);
    let mut page = vec![0u8; 0];
    let mut page_no = u64::MAX;
    for n in 0..blocks {
        let idx = layout.payload_index(n);
        if idx / 512 != page_no {
            page_no = idx / 512;
            page = vec![0u8; 4096];
            file.read_at(layout.bat_offset + page_no * 4096, &mut page)
                .await?;
        }
        let at = (idx % 512 * 8) as usize;
        let entry = u64::from_le_bytes(page[at..at + 8].try_into().expect("8 bytes"));
        if let Some(msg) = block_problem(&layout, n, entry, file_len) {
            report.messages.push(msg);
            report.corruptions += 1;
        }
    }
    Ok(report)
}

/// What is wrong with payload block `n`'s BAT entry, in QEMU's words where it has them.
fn block_problem(layout: &Layout, n: u64, entry: u64, file_len: u64) -> Option<String> {
    let idx = layout.payload_index(n);
    match entry & 7 {
        state::FULLY_PRESENT => {}
        state::PARTIALLY_PRESENT if layout.parent.is_some() => return None,
        4 | state::PARTIALLY_PRESENT => {
            return Some(format!(
                "VHDX BAT entry {idx} has a state ({}) this disk cannot have",
                entry & 7
            ))
        }
        _ => return None,
    }
    let start = bat_offset(entry);
    let len = layout.block_size.min(layout.size - n * layout.block_size);
    let Some(end) = start.checked_add(len) else {
        return Some(format!("VHDX BAT entry {idx} offset overflow."));
    };
    if start >= file_len {
        return Some(format!(
            "VHDX BAT entry {idx} start offset {start} points after end of file ({file_len}). \
             Image has probably been truncated."
        ));
    }
    if end > file_len {
        return Some(format!(
            "VHDX BAT entry {idx} end offset {} points after end of file ({file_len}). Image \
             has probably been truncated.",
            end - 1
        ));
    }
    layout
        .overlaps(start, len)
        .map(|(s, e)| format!("VHDX region {start}-{end} overlaps with region {s}-{e}"))
}

/// Cached BAT pages (512 entries each) and the pages changed since the last flush.
#[derive(Debug)]
struct Bat {
    cache: TableCache<u64>,
    dirty: BTreeMap<u64, Arc<Vec<u64>>>,
}

/// What writing needs, behind one lock: the headers, the session, where blocks go.
#[derive(Debug)]
struct WriteState {
    headers: Headers,
    session: Guid,
    /// Whether this session wrote the headers already (QEMU does on its first write).
    touched: bool,
    /// Where the next block goes (the end of the file).
    next: u64,
}

/// Dirty BAT pages that make a flush happen by itself.
const MAX_DIRTY_PAGES: usize = 256;
/// Cached BAT pages (4 KiB each).
const BAT_CACHE_PAGES: usize = 2048;

/// An open VHDX layer.
#[derive(Debug)]
pub struct VhdxDriver {
    file: Arc<dyn Storage>,
    /// The file as read: itself, or with its log applied in memory (read-only opens).
    view: Arc<dyn Storage>,
    layout: Layout,
    writable: bool,
    bat: Mutex<Bat>,
    write: tokio::sync::Mutex<WriteState>,
    data_write_guid: Mutex<Guid>,
    /// The file's length as this driver made it (checks of block offsets).
    file_len: AtomicU64,
}

impl VhdxDriver {
    async fn open(layer: LayerOpen<'_>) -> Result<OpenedLayer> {
        let file = Arc::clone(&layer.storage);
        let writable = layer.writable && file.is_writable();
        let mut headers = read_headers(file.as_ref()).await?;
        let entries = layout::pending_log(file.as_ref(), &headers.header).await?;
        let view: Arc<dyn Storage> = if entries.is_empty() {
            if writable && headers.header.log_guid != [0; 16] {
                // A log GUID with no valid entry (a crash before the entry was written):
                // QEMU leaves it, and then refuses every allocating write. Cleared here.
                headers
                    .update(file.as_ref(), new_guid(), [0; 16], false)
                    .await?;
            }
            Arc::clone(&file)
        } else if writable {
            replay(file.as_ref(), &mut headers, &entries).await?;
            Arc::clone(&file)
        } else {
            log::check_applicable(&entries, file.size()?)?;
            Arc::new(replayed::Replayed::new(Arc::clone(&file), &entries)?)
        };
        let layout = Layout::read(view.as_ref(), &headers.header).await?;
        if writable && layout.parent.is_some() {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "differencing VHDX disks are opened read-only here",
            ));
        }
        let backing = layout.parent.as_ref().map(|p| BackingName {
            name: p.paths[0].clone(),
            format: Some("vhdx".into()),
            expected_id: Some(p.linkage.to_vec()),
        });
        let file_len = view.size()?;
        let driver = VhdxDriver {
            data_write_guid: Mutex::new(headers.header.data_write_guid),
            write: tokio::sync::Mutex::new(WriteState {
                headers,
                session: new_guid(),
                touched: false,
                next: file_len,
            }),
            bat: Mutex::new(Bat {
                cache: TableCache::new(BAT_CACHE_PAGES),
                dirty: BTreeMap::new(),
            }),
            file_len: AtomicU64::new(file_len),
            file,
            view,
            layout,
            writable,
        };
        Ok(OpenedLayer {
            driver: Arc::new(driver),
            backing,
        })
    }

    /// The BAT page `p` (dirty, cached or read).
    async fn page(&self, p: u64) -> Result<Arc<Vec<u64>>> {
        {
            let bat = self.bat.lock().unwrap();
            if let Some(d) = bat.dirty.get(&p) {
                return Ok(Arc::clone(d));
            }
            if let Some(c) = bat.cache.get(p) {
                return Ok(c);
            }
        }
        let mut raw = vec![0u8; 4096];
        self.view
            .read_at(self.layout.bat_offset + p * 4096, &mut raw)
            .await?;
        let page: Arc<Vec<u64>> = Arc::new(
            raw.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        );
        self.bat.lock().unwrap().cache.put(p, Arc::clone(&page));
        Ok(page)
    }

    async fn entry(&self, idx: u64) -> Result<u64> {
        if idx >= self.layout.bat_entries {
            return Err(invalid(format!("VHDX BAT entry {idx} is past the BAT")));
        }
        Ok(self.page(idx / 512).await?[(idx % 512) as usize])
    }

    /// Sets BAT entry `idx` in memory (written through the log at the next flush).
    async fn set_entry(&self, idx: u64, value: u64) -> Result<()> {
        let page = self.page(idx / 512).await?;
        let mut page = (*page).clone();
        page[(idx % 512) as usize] = value;
        let page = Arc::new(page);
        let mut bat = self.bat.lock().unwrap();
        bat.cache.put(idx / 512, Arc::clone(&page));
        bat.cache.update(idx / 512, (idx % 512) as usize, value);
        bat.dirty.insert(idx / 512, page);
        Ok(())
    }

    /// Where payload block `n` (state 6 at `entry`) lives, checked as QEMU checks it at open:
    /// inside the file, clear of the metadata.
    fn block_start(&self, n: u64, entry: u64) -> Result<u64> {
        let len = self.file_len.load(Ordering::Relaxed);
        match block_problem(&self.layout, n, entry, len) {
            None => Ok(bat_offset(entry)),
            Some(msg) => Err(Error::new(ErrorKind::Corrupt, msg)),
        }
    }

    async fn barrier(&self, durable: bool) -> Result<()> {
        if durable {
            self.file.sync().await
        } else {
            self.file.flush().await
        }
    }

    /// Writes the BAT pages changed since the last flush through the log, QEMU's way.
    async fn commit(&self, w: &mut WriteState, durable: bool) -> Result<()> {
        let per_entry = log::pages_per_entry(self.layout.log_length).max(1);
        loop {
            let pages: Vec<(u64, Arc<Vec<u64>>)> = {
                let bat = self.bat.lock().unwrap();
                bat.dirty
                    .iter()
                    .take(per_entry)
                    .map(|(p, v)| (*p, Arc::clone(v)))
                    .collect()
            };
            if pages.is_empty() {
                return Ok(());
            }
            let bytes: Vec<(u64, Vec<u8>)> = pages
                .iter()
                .map(|(p, v)| {
                    let b: Vec<u8> = v.iter().flat_map(|e| e.to_le_bytes()).collect();
                    (self.layout.bat_offset + p * 4096, b)
                })
                .collect();
            // The data first; then the log, the BAT, and the log closed.
            self.barrier(durable).await?;
            let guid = new_guid();
            w.headers
                .update(self.file.as_ref(), w.session, guid, false)
                .await?;
            self.barrier(durable).await?;
            let len = self.file.size()?;
            let entry = log::build_entry(&guid, 1, 0, len, &bytes);
            self.file.write_at(self.layout.log_offset, &entry).await?;
            self.barrier(durable).await?;
            for (at, b) in &bytes {
                self.file.write_at(*at, b).await?;
            }
            self.barrier(durable).await?;
            w.headers
                .update(self.file.as_ref(), w.session, [0; 16], false)
                .await?;
            self.barrier(durable).await?;
            let mut bat = self.bat.lock().unwrap();
            for (p, _) in pages {
                bat.dirty.remove(&p);
            }
        }
    }

    /// The first write of a session: both headers get this session's GUIDs (and lose a
    /// stale log GUID).
    async fn touch(&self, w: &mut WriteState) -> Result<()> {
        if !w.touched {
            w.headers
                .update(self.file.as_ref(), w.session, [0; 16], true)
                .await?;
            *self.data_write_guid.lock().unwrap() = w.headers.header.data_write_guid;
            w.touched = true;
        }
        Ok(())
    }

    fn check_write(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::ReadOnly, "image is opened read-only"))
        }
    }

    /// Maps a range inside a partially present block of a differencing disk by its sector
    /// bitmap.
    async fn partial(&self, n: u64, entry: u64, within: u64, run: u64) -> Result<Mapping<'_>> {
        let l = &self.layout;
        let sb = self.entry(l.bitmap_index(n)).await?;
        if sb & 7 != state::FULLY_PRESENT {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("VHDX payload block {n} is partially present without a sector bitmap"),
            ));
        }
        let per_block = l.block_size / l.logical_sector;
        let first_bit = (n % l.chunk_ratio) * per_block + within / l.logical_sector;
        let last_bit = (n % l.chunk_ratio) * per_block + (within + run).div_ceil(l.logical_sector);
        let lo = first_bit / 8;
        let mut bits = vec![0u8; (last_bit.div_ceil(8) - lo) as usize];
        self.view.read_at(bat_offset(sb) + lo, &mut bits).await?;
        let bit = |b: u64| bits[(b / 8 - lo) as usize] >> (b % 8) & 1 == 1;
        let here = bit(first_bit);
        let end = (first_bit + 1..last_bit)
            .find(|&b| bit(b) != here)
            .unwrap_or(last_bit);
        let block_base = (n % l.chunk_ratio) * per_block;
        let n_bytes = ((end - block_base) * l.logical_sector).min(within + run) - within;
        let kind = if here {
            MapKind::Data {
                storage: self.view.as_ref(),
                offset: self.block_start(n, (entry & !7) | state::FULLY_PRESENT)? + within,
            }
        } else {
            MapKind::Unallocated
        };
        Ok(Mapping { len: n_bytes, kind })
    }
}

impl FormatDriver for VhdxDriver {
    fn format(&self) -> Format {
        VHDX
    }

    fn size(&self) -> u64 {
        self.layout.size
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn storage(&self) -> &dyn Storage {
        self.file.as_ref()
    }

    fn request_align(&self) -> usize {
        // A differencing disk's bitmap says, sector by sector, which file holds the data.
        if self.layout.parent.is_some() {
            self.layout.logical_sector as usize
        } else {
            self.file.request_align()
        }
    }

    fn map(&self, offset: u64, len: u64, query: MapQuery) -> BoxFuture<'_, Result<Mapping<'_>>> {
        Box::pin(async move {
            let bs = self.layout.block_size;
            let n = offset / bs;
            let within = offset % bs;
            let run = len.min(bs - within);
            let entry = self.entry(self.layout.payload_index(n)).await?;
            let differencing = self.layout.parent.is_some();
            let kind = match entry & 7 {
                state::FULLY_PRESENT => {
                    let host = self.block_start(n, entry)? + within;
                    let data = Mapping {
                        len: run,
                        kind: MapKind::Data {
                            storage: self.view.as_ref(),
                            offset: host,
                        },
                    };
                    if query == MapQuery::Read {
                        return Ok(data);
                    }
                    let (ext, got) = self.view.extent(host, run).await?;
                    return Ok(match ext {
                        HostExtent::Data => Mapping { len: got, ..data },
                        HostExtent::Hole => Mapping {
                            len: got,
                            kind: MapKind::DataZero {
                                storage: self.view.as_ref(),
                                offset: host,
                            },
                        },
                    });
                }
                state::PARTIALLY_PRESENT if differencing => {
                    return self.partial(n, entry, within, run).await;
                }
                state::ZERO => MapKind::Zero { offset: None },
                state::NOT_PRESENT | state::UNDEFINED | state::UNMAPPED | state::UNMAPPED_V095
                    if differencing =>
                {
                    MapKind::Unallocated
                }
                state::NOT_PRESENT | state::UNDEFINED | state::UNMAPPED | state::UNMAPPED_V095 => {
                    MapKind::Zero { offset: None }
                }
                s => {
                    return Err(Error::new(
                        ErrorKind::Corrupt,
                        format!(
                            "VHDX BAT entry {} has a state ({s}) this disk cannot have",
                            self.layout.payload_index(n)
                        ),
                    ))
                }
            };
            Ok(Mapping { len: run, kind })
        })
    }

    fn map_for_write<'a>(
        &'a self,
        offset: u64,
        len: u64,
        _below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<WriteTarget<'a>>> {
        Box::pin(async move {
            self.check_write()?;
            let bs = self.layout.block_size;
            let n = offset / bs;
            let within = offset % bs;
            let run = len.min(bs - within);
            let idx = self.layout.payload_index(n);
            let mut w = self.write.lock().await;
            self.touch(&mut w).await?;
            let entry = self.entry(idx).await?;
            match entry & 7 {
                state::FULLY_PRESENT => {
                    let start = self.block_start(n, entry)?;
                    return Ok(WriteTarget {
                        len: run,
                        storage: self.file.as_ref(),
                        offset: start + within,
                        commit: None,
                        hold: None,
                    });
                }
                4 | state::PARTIALLY_PRESENT => {
                    return Err(Error::new(
                        ErrorKind::Corrupt,
                        format!("VHDX BAT entry {idx} has a state this disk cannot have"),
                    ))
                }
                _ => {}
            }
            // A new block at the end of the file; the file grows over it (reading zeros).
            let at = w.next.next_multiple_of(MIB);
            let end = at + bs;
            if self.file.size()? < end {
                self.file.resize(end, PreallocMode::Off).await?;
            }
            w.next = end;
            self.file_len.fetch_max(end, Ordering::Relaxed);
            let commit: WriteCommit<'a> = Box::new(move || {
                Box::pin(async move {
                    let mut w = w;
                    self.set_entry(idx, at | state::FULLY_PRESENT).await?;
                    let dirty = self.bat.lock().unwrap().dirty.len();
                    if dirty >= MAX_DIRTY_PAGES {
                        self.commit(&mut w, false).await?;
                    }
                    Ok(())
                })
            });
            Ok(WriteTarget {
                len: run,
                storage: self.file.as_ref(),
                offset: at + within,
                commit: Some(commit),
                hold: None,
            })
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        _below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_write()?;
            let bs = self.layout.block_size;
            let end = offset + len;
            let mut pos = offset;
            while pos < end {
                let n = pos / bs;
                let within = pos % bs;
                let run = (end - pos).min(bs - within);
                let entry = self.entry(self.layout.payload_index(n)).await?;
                // Blocks not in the file read as zeros already.
                if entry & 7 == state::FULLY_PRESENT {
                    let mut w = self.write.lock().await;
                    self.touch(&mut w).await?;
                    let start = self.block_start(n, entry)?;
                    self.file
                        .write_zeroes(start + within, run, may_unmap)
                        .await?;
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
        match mode {
            // As QEMU: the data stays.
            DiscardMode::ReadsAnything => Box::pin(async move { self.check_write() }),
            DiscardMode::ReadsZero | DiscardMode::ReadsBacking => {
                self.write_zeroes(offset, len, true, below)
            }
        }
    }

    fn resize<'a>(
        &'a self,
        _new_size: u64,
        _prealloc: PreallocMode,
        _below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async {
            Err(Error::new(
                ErrorKind::Unsupported,
                "Image format driver does not support resize",
            ))
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if self.writable {
                let mut w = self.write.lock().await;
                self.commit(&mut w, false).await?;
            }
            self.file.flush().await
        })
    }

    fn sync(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if self.writable {
                let mut w = self.write.lock().await;
                self.commit(&mut w, true).await?;
            }
            self.file.flush().await?;
            self.file.sync().await
        })
    }

    fn unique_id(&self) -> Option<Vec<u8>> {
        Some(self.data_write_guid.lock().unwrap().to_vec())
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.layout.block_size)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn describe(&self) -> ImageDescription {
        let parent = self.layout.parent.as_ref().map(|p| p.paths[0].clone());
        ImageDescription {
            filename: self.file.path().map(|p| p.display().to_string()),
            actual_size: self.file.allocated_size(),
            cluster_size: Some(self.layout.block_size),
            full_backing_filename: parent.as_ref().map(|b| {
                self.file
                    .resolve_name(b)
                    .map(|r| r.path.display().to_string())
                    .unwrap_or_else(|_| b.clone())
            }),
            backing_format: parent.as_ref().map(|_| "vhdx".into()),
            backing_filename: parent,
            ..ImageDescription::default()
        }
    }
}
