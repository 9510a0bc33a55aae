//! Parallels expandable images ("WithouFreSpacExt", and the original "WithoutFreeSpace"),
//! read and written as QEMU 10 does.
//!
//! ```text
//!  0 header (64) | BAT: u32 per cluster | data_off*512: clusters in allocation order
//!  BAT entry: 0 unallocated, else the host offset in clusters (new magic) or sectors (old)
//! ```
//!
//! New clusters take the first free cluster of the data area (holes left by zero writes are
//! reused, as QEMU reuses them), else go at its end. The header's `inuse` field says a writer
//! may have left the BAT inconsistent: it is set (durably) before the first BAT change after
//! a flush and cleared at the flush, so an image a crash leaves is repaired by the next
//! writable open (QEMU's or vmimg's), and a cleanly used one never needs it. QEMU sets it for
//! the whole of a writable session instead; the files are the same once the writer is done.
//!
//! Deliberately different from QEMU: images with a Format Extension (dirty bitmaps), which
//! QEMU overwrites or truncates when it writes, open read-only only.

mod header;

pub use header::ParallelsHeader;

use crate::format::{
    ChainView, CheckReport, DiscardMode, Format, FormatDriver, FormatOptions, ImageDescription,
    ImageFormat, LayerOpen, MapKind, MapQuery, Mapping, OpenedLayer, OptionKind, OptionSpec,
    Repair, WriteCommit, WriteTarget,
};
use crate::storage::{
    BoxFuture, FileStorageOpen, NewFile, Permissions, PreallocMode, Storage, StorageExt,
};
use crate::{Error, ErrorKind, Result};
use header::{HEADER_BYTES, INUSE_OPEN, MAGIC_EXT, MAGIC_OLD, MAX_BAT_ENTRIES, MAX_TRACKS};
use std::path::Path;
use std::sync::{Arc, RwLock};

/// The Parallels format's entry points.
#[derive(Debug)]
pub struct ParallelsFormat;

/// The Parallels format.
pub const PARALLELS: Format = Format::new(&ParallelsFormat);

/// qemu-img's default cluster size.
pub const DEFAULT_CLUSTER_SIZE: u64 = 1 << 20;

const SECTOR: u64 = 512;

const fn spec(name: &'static str, kind: OptionKind, help: &'static str) -> OptionSpec {
    OptionSpec { name, kind, help }
}

/// qemu-img's parallels options, in its order.
const CREATE_OPTIONS: &[OptionSpec] = &[
    spec(
        "cluster_size",
        OptionKind::Size,
        "Parallels image cluster size",
    ),
    spec("size", OptionKind::Size, "Virtual disk size"),
];

fn invalid_arg(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

impl ImageFormat for ParallelsFormat {
    fn name(&self) -> &'static str {
        "parallels"
    }

    /// QEMU's `parallels_probe`: either magic, and version 2.
    fn probe(&self, first: &[u8], _filename: Option<&str>, _file_size: u64) -> u32 {
        let magic = first.starts_with(MAGIC_EXT) || first.starts_with(MAGIC_OLD);
        if magic && first.len() >= 20 && first[16..20] == header::VERSION.to_le_bytes() {
            100
        } else {
            0
        }
    }

    fn owns_metadata(&self) -> bool {
        true
    }

    fn open<'a>(&'a self, layer: LayerOpen<'a>) -> BoxFuture<'a, Result<OpenedLayer>> {
        Box::pin(async move {
            let driver = ParallelsDriver::open(layer.storage, layer.writable).await?;
            Ok(OpenedLayer {
                driver: Arc::new(driver),
                backing: None,
            })
        })
    }

    fn create_options(&self) -> &'static [OptionSpec] {
        CREATE_OPTIONS
    }

    fn create_summary(&self, o: &FormatOptions) -> String {
        format!(
            "size={} cluster_size={}",
            o.size("size").unwrap_or(0),
            o.size("cluster_size").unwrap_or(DEFAULT_CLUSTER_SIZE)
        )
    }

    fn create<'a>(&'a self, path: &'a Path, o: &'a FormatOptions) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let size = o
                .size("size")
                .ok_or_else(|| invalid_arg("Image creation needs a size parameter"))?;
            ParallelsCreate::new(size)
                .cluster_size(o.size("cluster_size").unwrap_or(DEFAULT_CLUSTER_SIZE))
                .create(path)
                .await
        })
    }

    fn check<'a>(
        &'a self,
        file: &'a dyn Storage,
        repair: Repair,
    ) -> BoxFuture<'a, Result<CheckReport>> {
        Box::pin(async move {
            let (h, bat) = read_meta(file).await?;
            Ok(check(file, h, bat, repair).await?.0)
        })
    }
}

/// Reads the header and the BAT (which must lie within the file).
async fn read_meta(file: &dyn Storage) -> Result<(ParallelsHeader, Vec<u32>)> {
    let mut b = [0u8; HEADER_BYTES];
    file.read_at(0, &mut b).await?;
    let h = ParallelsHeader::parse(&b)?;
    if h.bat_end() > file.size()? {
        return Err(Error::new(
            ErrorKind::InvalidFormat,
            format!(
                "the Parallels BAT ({} entries) lies beyond the end of the file",
                h.bat_entries
            ),
        ));
    }
    let mut raw = vec![0u8; 4 * h.bat_entries as usize];
    file.read_at(HEADER_BYTES as u64, &mut raw).await?;
    let bat = raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    Ok((h, bat))
}

/// Host byte offset of a BAT entry.
fn host(h: &ParallelsHeader, entry: u32) -> u64 {
    u64::from(entry) * h.off_multiplier() * SECTOR
}

/// Clusters in use, by index from the start of the data area.
#[derive(Debug, Default)]
struct UsedMap {
    words: Vec<u64>,
}

impl UsedMap {
    fn get(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn set(&mut self, i: u64, on: bool) {
        let w = (i / 64) as usize;
        if w >= self.words.len() {
            if !on {
                return;
            }
            self.words.resize(w + 1, 0);
        }
        if on {
            self.words[w] |= 1 << (i % 64);
        } else {
            self.words[w] &= !(1 << (i % 64));
        }
    }

    /// The first free cluster, and how many free clusters (at most `want`) follow it.
    fn first_free(&self, want: u64) -> (u64, u64) {
        let mut i = 0;
        while self.get(i) {
            i += 1;
        }
        let mut n = 1;
        while n < want && !self.get(i + n) {
            n += 1;
        }
        (i, n)
    }
}

/// Index of the cluster at host byte `off` in the data area starting at byte `start`.
fn cluster_index(off: u64, start: u64, cs: u64) -> Option<u64> {
    off.checked_sub(start).map(|d| d / cs)
}

/// qemu-img check for Parallels, in QEMU's order and words (messages `ERROR ...`, or
/// `Repairing ...` for what `repair` fixes): an unclean image, a bad data offset, clusters
/// outside the file, space leaked at its end, clusters named twice. Fixes are written.
/// Returns the report and the header and BAT as they are afterwards.
async fn check(
    file: &dyn Storage,
    mut h: ParallelsHeader,
    mut bat: Vec<u32>,
    repair: Repair,
) -> Result<(CheckReport, ParallelsHeader, Vec<u32>)> {
    let (fix_errors, fix_leaks) = (repair.errors(), repair.leaks());
    let word = |fix: bool| if fix { "Repairing" } else { "ERROR" };
    let mut r = CheckReport::default();
    let mut dirty = false;
    let found = |r: &mut CheckReport, fix: bool, msg: String| {
        r.messages.push(format!("{} {msg}", word(fix)));
        if fix {
            r.corruptions_fixed += 1;
        } else {
            r.corruptions += 1;
        }
    };
    let cs = h.cs();
    let size = file.size()?;
    if h.inuse == INUSE_OPEN {
        found(&mut r, fix_errors, "image was not closed correctly".into());
        if fix_errors {
            h.inuse = 0;
            dirty = true;
        }
    }
    let (start, ok) = h.data_start(size / SECTOR);
    if !ok {
        found(
            &mut r,
            fix_errors,
            "data_off field has incorrect value".into(),
        );
        if fix_errors {
            h.data_off = start as u32;
            dirty = true;
        }
    }
    let start = start * SECTOR;
    let mut high = 0u64;
    for (i, e) in bat.iter_mut().enumerate() {
        let off = host(&h, *e);
        if off + cs > size {
            found(&mut r, fix_errors, format!("cluster {i} is outside image"));
            if fix_errors {
                *e = 0;
                dirty = true;
            }
            continue;
        }
        high = high.max(off);
    }
    // Never below the data area (entries before it are dropped below).
    let mut end = if high == 0 {
        start
    } else {
        (high + cs).max(start)
    };
    r.image_end_offset = end;
    if size > end {
        let count = (size - end).div_ceil(cs);
        r.messages.push(format!(
            "{} space leaked at the end of the image {}",
            word(fix_leaks),
            size - end
        ));
        if fix_leaks {
            file.resize(end, PreallocMode::Off).await?;
            r.leaks_fixed += count;
        } else {
            r.leaks += count;
        }
    }
    // Clusters named twice: the later entry gets a copy of its own.
    let mut used = UsedMap::default();
    let mut all = UsedMap::default();
    for &e in &bat {
        let off = host(&h, e);
        if e != 0 && off + cs <= size {
            if let Some(c) = cluster_index(off, start, cs) {
                all.set(c, true);
            }
        }
    }
    for (i, e) in bat.iter_mut().enumerate() {
        let off = host(&h, *e);
        // Entries outside the file were reported (and dropped by a repair) above.
        if off == 0 || off + cs > size {
            continue;
        }
        let Some(c) = cluster_index(off, start, cs) else {
            found(&mut r, fix_errors, format!("cluster {i} is outside image"));
            if fix_errors {
                *e = 0;
                dirty = true;
            }
            continue;
        };
        if !used.get(c) {
            used.set(c, true);
            continue;
        }
        found(
            &mut r,
            fix_errors,
            format!("duplicate offset in BAT entry {i}"),
        );
        if fix_errors {
            let (free, _) = all.first_free(1);
            let new = start + free * cs;
            let mut buf = vec![0u8; cs as usize];
            file.read_at(off, &mut buf).await?;
            file.write_at(new, &buf).await?;
            all.set(free, true);
            used.set(free, true);
            *e = (new / SECTOR / h.off_multiplier()) as u32;
            end = end.max(new + cs);
            r.image_end_offset = end;
            dirty = true;
        }
    }
    r.total_clusters = u64::from(h.bat_entries);
    let mut prev = 0u64;
    for &e in &bat {
        let off = host(&h, e);
        if off == 0 {
            prev = 0;
            continue;
        }
        r.allocated_clusters += 1;
        if prev != 0 && prev + cs != off {
            r.fragmented_clusters += 1;
        }
        prev = off;
    }
    if dirty {
        let mut b = h.to_bytes().to_vec();
        b.extend(bat.iter().flat_map(|e| e.to_le_bytes()));
        file.write_at(0, &b).await?;
    }
    if dirty || r.leaks_fixed > 0 {
        file.sync().await?;
    }
    Ok((r, h, bat))
}

/// Allocation state, under the allocation lock.
#[derive(Debug)]
struct Alloc {
    used: UsedMap,
    /// End of the last cluster in use (bytes).
    data_end: u64,
    /// Whether `inuse` is set on disk.
    inuse: bool,
}

/// An open Parallels image.
#[derive(Debug)]
pub struct ParallelsDriver {
    file: Arc<dyn Storage>,
    writable: bool,
    header: ParallelsHeader,
    cs: u64,
    /// Byte offset of the data area.
    start: u64,
    bat: RwLock<Vec<u32>>,
    alloc: tokio::sync::Mutex<Alloc>,
}

impl ParallelsDriver {
    async fn open(file: Arc<dyn Storage>, writable: bool) -> Result<Self> {
        let (mut h, mut bat) = read_meta(file.as_ref()).await?;
        let writable = writable && file.is_writable();
        let size = file.size()?;
        let (start, ok) = h.data_start(size / SECTOR);
        let cs = h.cs();
        if writable && h.ext_off != 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "the image has a Parallels Format Extension (dirty bitmaps), which writing \
                 would damage (as QEMU does): open it read-only",
            ));
        }
        if writable && h.ext && (start * SECTOR) % cs != 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "the data area of this Parallels image does not start on a cluster: open \
                 it read-only",
            ));
        }
        if writable {
            // QEMU's reasons to repair before use.
            let mut seen = UsedMap::default();
            let mut bad = h.inuse == INUSE_OPEN || !ok;
            for &e in bat.iter().filter(|&&e| e != 0) {
                let off = host(&h, e);
                match cluster_index(off, start * SECTOR, cs) {
                    Some(c) if off + cs <= size && !seen.get(c) => seen.set(c, true),
                    _ => bad = true,
                }
            }
            if bad {
                let (report, fixed_h, fixed_bat) =
                    check(file.as_ref(), h, bat, Repair::All).await?;
                for m in &report.messages {
                    tracing::warn!(image = ?file.path(), "{m}");
                }
                (h, bat) = (fixed_h, fixed_bat);
            }
        }
        let size = file.size()?;
        let start = h.data_start(size / SECTOR).0 * SECTOR;
        let mut used = UsedMap::default();
        let mut data_end = start;
        for &e in bat.iter().filter(|&&e| e != 0) {
            let off = host(&h, e);
            // Entries past the end of the file (read as zeros) hold no cluster of it: the
            // map stays as large as the file.
            if off + cs > size {
                continue;
            }
            if let Some(c) = cluster_index(off, start, cs) {
                used.set(c, true);
            }
            data_end = data_end.max(off + cs);
        }
        Ok(ParallelsDriver {
            writable,
            cs,
            start,
            bat: RwLock::new(bat),
            alloc: tokio::sync::Mutex::new(Alloc {
                used,
                data_end,
                inuse: h.inuse == INUSE_OPEN,
            }),
            header: h,
            file,
        })
    }

    fn check_write(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::ReadOnly, "image is opened read-only"))
        }
    }

    fn entry(&self, i: u64) -> u32 {
        self.bat
            .read()
            .unwrap()
            .get(i as usize)
            .copied()
            .unwrap_or(0)
    }

    /// The state of guest cluster `c`: its host offset (`None`: unallocated), and how many
    /// clusters from it (at most `max`) continue it (unallocated too, or at the following
    /// host clusters).
    fn run(&self, c: u64, max: u64) -> (Option<u64>, u64) {
        let bat = self.bat.read().unwrap();
        let len = bat.len() as u64;
        if c >= len {
            // Past the BAT: unallocated, in one run.
            return (None, max.max(1));
        }
        let first = bat[c as usize];
        let base = (first != 0).then(|| host(&self.header, first));
        let mut n = 1;
        while n < max {
            if c + n >= len {
                if base.is_none() {
                    n = max;
                }
                break;
            }
            let e = bat[(c + n) as usize];
            let same = match base {
                None => e == 0,
                Some(b) => e != 0 && host(&self.header, e) == b + n * self.cs,
            };
            if !same {
                break;
            }
            n += 1;
        }
        (base, n)
    }

    /// Before the first BAT change since the image was last consistent: sets `inuse`,
    /// durably.
    async fn begin_change(&self, a: &mut Alloc) -> Result<()> {
        if a.inuse {
            return Ok(());
        }
        let mut h = self.header.clone();
        h.inuse = INUSE_OPEN;
        self.file.write_at(0, &h.to_bytes()).await?;
        self.file.sync().await?;
        a.inuse = true;
        Ok(())
    }

    /// Sets BAT entries from `first` to `values`, on disk and in memory.
    async fn set_entries(&self, first: u64, values: &[u32]) -> Result<()> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.file
            .write_at(HEADER_BYTES as u64 + 4 * first, &bytes)
            .await?;
        let mut bat = self.bat.write().unwrap();
        bat[first as usize..first as usize + values.len()].copy_from_slice(values);
        Ok(())
    }

    /// As QEMU's discard: whole clusters only, without a backing file; each allocated one
    /// is released (punched, unallocated, free for reuse).
    async fn release(&self, offset: u64, len: u64) -> Result<()> {
        let cs = self.cs;
        let mut a = self.alloc.lock().await;
        for c in offset / cs..(offset + len) / cs {
            let e = self.entry(c);
            if e == 0 {
                continue;
            }
            self.begin_change(&mut a).await?;
            let off = host(&self.header, e);
            self.set_entries(c, &[0]).await?;
            self.file.discard(off, cs).await?;
            if let Some(i) = cluster_index(off, self.start, cs) {
                a.used.set(i, false);
            }
        }
        Ok(())
    }

    fn whole_clusters(&self, offset: u64, len: u64) -> bool {
        offset % self.cs == 0 && len % self.cs == 0
    }
}

impl FormatDriver for ParallelsDriver {
    fn format(&self) -> Format {
        PARALLELS
    }

    fn size(&self) -> u64 {
        self.header.size()
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
            let (base, n) = self.run(offset / cs, (within + len).div_ceil(cs));
            let run = (n * cs - within).min(len);
            let kind = match base {
                None => MapKind::Unallocated,
                Some(b) => MapKind::Data {
                    storage: self.file.as_ref(),
                    offset: b + within,
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
            let in_place = |b: u64, n: u64| WriteTarget {
                len: (n * cs - within).min(len),
                storage: self.file.as_ref(),
                offset: b + within,
                commit: None,
                hold: None,
            };
            if let (Some(b), n) = self.run(c, clusters) {
                return Ok(in_place(b, n));
            }
            let entries = u64::from(self.header.bat_entries);
            if c >= entries {
                // QEMU aborts here; a disk larger than its BAT cannot take the write.
                return Err(Error::new(
                    ErrorKind::InvalidFormat,
                    format!(
                        "the Parallels BAT ({entries} entries) does not cover guest offset \
                         {offset}"
                    ),
                ));
            }
            let clusters = clusters.min(entries - c);
            let mut a = self.alloc.lock().await;
            let (base, n) = self.run(c, clusters);
            if let Some(b) = base {
                return Ok(in_place(b, n));
            }
            self.begin_change(&mut a).await?;
            let (free, n) = a.used.first_free(n);
            let at = self.start + free * cs;
            let value = at / SECTOR / self.header.off_multiplier();
            if (at + n * cs) / SECTOR / self.header.off_multiplier() > u64::from(u32::MAX) {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    "the Parallels image is full",
                ));
            }
            let run = (n * cs - within).min(len);
            for (from, bytes) in [(0, within), (within + run, n * cs - within - run)] {
                if bytes == 0 {
                    continue;
                }
                if below.is_empty() {
                    self.file.write_zeroes(at + from, bytes, false).await?;
                } else {
                    let mut tmp = vec![0u8; bytes as usize];
                    below.read(c * cs + from, &mut tmp).await?;
                    self.file.write_at(at + from, &tmp).await?;
                }
            }
            let commit: WriteCommit<'a> = Box::new(move || {
                Box::pin(async move {
                    let mut a = a;
                    let step = (cs / SECTOR / self.header.off_multiplier()) as u32;
                    let values: Vec<u32> = (0..n as u32).map(|i| value as u32 + i * step).collect();
                    self.set_entries(c, &values).await?;
                    for i in 0..n {
                        a.used.set(free + i, true);
                    }
                    a.data_end = a.data_end.max(at + n * cs);
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

    /// As QEMU: whole clusters without a backing file are released (they read as zeros
    /// unallocated); anything else is written as zeros.
    fn write_zeroes<'a>(
        &'a self,
        offset: u64,
        len: u64,
        _may_unmap: bool,
        below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_write()?;
            if below.is_empty() && self.whole_clusters(offset, len) {
                return self.release(offset, len).await;
            }
            let zeros = vec![0u8; len.min(4 << 20) as usize];
            let mut pos = offset;
            while pos < offset + len {
                let n = (offset + len - pos).min(zeros.len() as u64) as usize;
                crate::format::write_through(self, pos, &zeros[..n], below).await?;
                pos += n as u64;
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
                DiscardMode::ReadsAnything => {
                    // As QEMU: whole clusters without a backing file, else nothing.
                    if below.is_empty() && self.whole_clusters(offset, len) {
                        self.release(offset, len).await?;
                    }
                    Ok(())
                }
                DiscardMode::ReadsZero => self.write_zeroes(offset, len, true, below).await,
                DiscardMode::ReadsBacking if below.is_empty() => {
                    self.write_zeroes(offset, len, true, below).await
                }
                DiscardMode::ReadsBacking => {
                    let mut pos = offset;
                    while pos < offset + len {
                        let mut buf = vec![0u8; (offset + len - pos).min(4 << 20) as usize];
                        below.read(pos, &mut buf).await?;
                        crate::format::write_through(self, pos, &buf, below).await?;
                        pos += buf.len() as u64;
                    }
                    Ok(())
                }
            }
        })
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
            if !self.writable {
                return self.file.flush().await;
            }
            let mut a = self.alloc.lock().await;
            self.file.flush().await?;
            if a.inuse {
                // The BAT durable first: only then is the image consistent.
                self.file.sync().await?;
                let mut h = self.header.clone();
                h.inuse = 0;
                self.file.write_at(0, &h.to_bytes()).await?;
                a.inuse = false;
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

    fn cluster_size(&self) -> Option<u64> {
        Some(self.cs)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    /// As qemu-img info: QEMU's driver answers no driver info, so no cluster size and no
    /// dirty flag are shown.
    fn describe(&self) -> ImageDescription {
        ImageDescription {
            filename: self.file.path().map(|p| p.display().to_string()),
            actual_size: self.file.allocated_size(),
            no_driver_info: true,
            ..ImageDescription::default()
        }
    }
}

/// Builder for new Parallels images, laid out byte for byte as qemu-img lays them out.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> vmimg::Result<()> {
/// use vmimg::parallels::ParallelsCreate;
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("disk.hdd");
/// ParallelsCreate::new(1 << 30).create(&path).await?;
/// let image = vmimg::ImageOpen::path(&path)
///     .format(vmimg::Format::PARALLELS)
///     .open()
///     .await?;
/// assert_eq!(image.size(), 1 << 30);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ParallelsCreate {
    size: u64,
    cluster_size: u64,
}

impl ParallelsCreate {
    /// An image of `size` bytes (rounded up to 512, as qemu-img does) with 1 MiB clusters.
    pub fn new(size: u64) -> Self {
        ParallelsCreate {
            size,
            cluster_size: DEFAULT_CLUSTER_SIZE,
        }
    }

    /// The cluster size: a power of two of at least 512 bytes (QEMU also takes other
    /// sizes, whose images it then misreads: refused here).
    pub fn cluster_size(mut self, bytes: u64) -> Self {
        self.cluster_size = bytes;
        self
    }

    fn header(&self) -> Result<ParallelsHeader> {
        let cs = self.cluster_size.div_ceil(SECTOR) * SECTOR;
        let size = self.size.div_ceil(SECTOR) * SECTOR;
        if self.cluster_size >= (i64::MAX as u64) >> 32 {
            return Err(invalid_arg("Cluster size is too large"));
        }
        if cs == 0 || size >= cs << 32 {
            return Err(invalid_arg("Image size is too large for this cluster size"));
        }
        // Deliberately refused: geometries QEMU writes and then cannot open or misreads.
        if !cs.is_power_of_two() || cs / SECTOR > u64::from(MAX_TRACKS) {
            return Err(invalid_arg(format!(
                "a cluster size of {} bytes makes images QEMU misreads or cannot open; use a \
                 power of two up to 1 GiB",
                self.cluster_size
            )));
        }
        if size.div_ceil(cs) > u64::from(MAX_BAT_ENTRIES) {
            return Err(invalid_arg(
                "the image would need more BAT entries than QEMU opens; use larger clusters",
            ));
        }
        Ok(ParallelsHeader::new(size, cs))
    }

    /// Creates (or truncates) the file at `path`; a create that fails removes the file it
    /// made.
    pub async fn create(&self, path: &Path) -> Result<()> {
        self.header()?;
        let new = NewFile::new(path);
        let (perm, shared) = PARALLELS.permissions(true, Permissions::ALL, false)?;
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

    /// Writes a new image over `file`: the header, then zeros up to the data area.
    pub async fn create_on(&self, file: &dyn Storage) -> Result<()> {
        let h = self.header()?;
        file.resize(0, PreallocMode::Off).await?;
        file.write_at(0, &h.to_bytes()).await?;
        let end = u64::from(h.data_off) * SECTOR;
        let zeros = vec![0u8; (end - HEADER_BYTES as u64).min(1 << 20) as usize];
        let mut at = HEADER_BYTES as u64;
        while at < end {
            let n = (end - at).min(zeros.len() as u64);
            file.write_at(at, &zeros[..n as usize]).await?;
            at += n;
        }
        file.sync().await
    }
}
