//! The VDI format (VirtualBox): dynamic and static images, as QEMU 10 reads and writes
//! them.
//!
//! ```text
//!  0 header (512) | block map: u32 per 1 MiB block | blocks, in allocation order
//!  entry: ffffffff unallocated, fffffffe discarded (both read as zeros), n: block n of
//!         the data area (offset_data + n MiB)
//! ```
//!
//! One file per role: `header` (the header, checked as QEMU checks it), this file (the
//! driver, creation and check). New blocks go after the last one, zero-filled around the
//! data written; the header's count is written before the block-map entry, so a crash never
//! leaves two entries naming one block.

mod header;

pub use header::{VdiHeader, BLOCK_SIZE, MAX_CREATE_SIZE};

use crate::format::{
    ChainView, CheckReport, DiscardMode, Format, FormatDriver, FormatOptions, ImageDescription,
    ImageFormat, LayerOpen, MapKind, MapQuery, Mapping, OpenedLayer, OptionKind, OptionSpec,
    Repair, WriteCommit, WriteTarget,
};
use crate::storage::{
    BoxFuture, FileStorageOpen, HostExtent, NewFile, Permissions, PreallocMode, Storage, StorageExt,
};
use crate::{Error, ErrorKind, Result};
use header::{allocated, SIGNATURE, UNALLOCATED};
use std::path::Path;
use std::sync::{Arc, RwLock};

/// The VDI format's entry points.
#[derive(Debug)]
pub struct VdiFormat;

/// The VDI format.
pub const VDI: Format = Format::new(&VdiFormat);

const fn spec(name: &'static str, kind: OptionKind, help: &'static str) -> OptionSpec {
    OptionSpec { name, kind, help }
}

/// qemu-img's vdi options.
const CREATE_OPTIONS: &[OptionSpec] = &[
    spec("size", OptionKind::Size, "Virtual disk size"),
    spec(
        "static",
        OptionKind::Bool,
        "VDI static (pre-allocated) image",
    ),
];

impl ImageFormat for VdiFormat {
    fn name(&self) -> &'static str {
        "vdi"
    }

    /// QEMU's `vdi_probe`: the signature at byte 0x40.
    fn probe(&self, first: &[u8], _filename: Option<&str>, _file_size: u64) -> u32 {
        if first.len() >= 0x44 && first[0x40..0x44] == SIGNATURE.to_le_bytes() {
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
            let driver = VdiDriver::open(layer.storage, layer.writable).await?;
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
        let on = o.bool("static").unwrap_or(false);
        format!(
            "size={} static={}",
            o.size("size").unwrap_or(0),
            if on { "on" } else { "off" }
        )
    }

    fn create<'a>(&'a self, path: &'a Path, o: &'a FormatOptions) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let size = o.size("size").ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    "Image creation needs a size parameter",
                )
            })?;
            VdiCreate::new(size)
                .fixed(o.bool("static").unwrap_or(false))
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
            if repair != Repair::None {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "This image format does not support checks",
                ));
            }
            let mut first = [0u8; 512];
            file.read_at(0, &mut first).await?;
            let h = VdiHeader::parse(&first)?;
            let bmap = read_bmap(file, &h).await?;
            Ok(check_bmap(&h, &bmap))
        })
    }
}

/// qemu-img check for vdi: every allocated entry names a block below the block count, no
/// block is named twice, and the header's count of allocated blocks is right.
fn check_bmap(h: &VdiHeader, bmap: &[u32]) -> CheckReport {
    let mut report = CheckReport::default();
    let mut owner = vec![UNALLOCATED; bmap.len()];
    let mut count = 0u32;
    for (block, &entry) in bmap.iter().enumerate() {
        if !allocated(entry) {
            continue;
        }
        if entry < h.blocks_in_image {
            count += 1;
            let slot = &mut owner[entry as usize];
            if allocated(*slot) {
                report
                    .messages
                    .push(format!("ERROR: block index {entry} also used by {slot}"));
                report.corruptions += 1;
            } else {
                *slot = entry;
            }
        } else {
            report
                .messages
                .push(format!("ERROR: block index {block} too large, is {entry}"));
            report.corruptions += 1;
        }
    }
    if count != h.blocks_allocated {
        report.messages.push(format!(
            "ERROR: allocated blocks mismatch, is {count}, should be {}",
            h.blocks_allocated
        ));
        report.corruptions += 1;
    }
    report
}

/// Reads the block map; it must lie within the file (QEMU reads zeros past the end, which
/// would name block 0 everywhere).
async fn read_bmap(file: &dyn Storage, h: &VdiHeader) -> Result<Vec<u32>> {
    let bytes = u64::from(h.blocks_in_image) * 4;
    let end = u64::from(h.offset_bmap) + bytes;
    if end > file.size()?.next_multiple_of(512) {
        return Err(Error::new(
            ErrorKind::InvalidFormat,
            format!(
                "the VDI block map ({} entries at 0x{:x}) lies beyond the end of the file",
                h.blocks_in_image, h.offset_bmap
            ),
        ));
    }
    let mut raw = vec![0u8; bytes as usize];
    file.read_at(u64::from(h.offset_bmap), &mut raw).await?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect())
}

/// An open VDI image.
#[derive(Debug)]
pub struct VdiDriver {
    file: Arc<dyn Storage>,
    header: VdiHeader,
    size: u64,
    writable: bool,
    bmap: RwLock<Vec<u32>>,
    /// Held while a block is allocated: the header as on disk (its count of blocks), and
    /// the index the next block takes.
    alloc: tokio::sync::Mutex<(VdiHeader, u32)>,
}

impl VdiDriver {
    async fn open(file: Arc<dyn Storage>, writable: bool) -> Result<Self> {
        let mut first = [0u8; 512];
        file.read_at(0, &mut first).await?;
        let header = VdiHeader::parse(&first)?;
        let bmap = read_bmap(file.as_ref(), &header).await?;
        // After the header's count and after every block in use (a crash between the two
        // updates must not hand out a block twice).
        let next = bmap
            .iter()
            .filter(|&&e| allocated(e))
            .map(|&e| e + 1)
            .max()
            .unwrap_or(0)
            .max(header.blocks_allocated);
        Ok(VdiDriver {
            size: header.disk_size,
            writable: writable && file.is_writable(),
            bmap: RwLock::new(bmap),
            alloc: tokio::sync::Mutex::new((header.clone(), next)),
            header,
            file,
        })
    }

    fn entry(&self, block: u64) -> u32 {
        self.bmap
            .read()
            .unwrap()
            .get(block as usize)
            .copied()
            .unwrap_or(UNALLOCATED)
    }

    fn block_offset(&self, entry: u32) -> u64 {
        u64::from(self.header.offset_data) + u64::from(entry) * u64::from(BLOCK_SIZE)
    }

    fn check_write(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::ReadOnly, "image is opened read-only"))
        }
    }
}

impl FormatDriver for VdiDriver {
    fn format(&self) -> Format {
        VDI
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn storage(&self) -> &dyn Storage {
        self.file.as_ref()
    }

    fn map(&self, offset: u64, len: u64, query: MapQuery) -> BoxFuture<'_, Result<Mapping<'_>>> {
        Box::pin(async move {
            let bs = u64::from(BLOCK_SIZE);
            let block = offset / bs;
            let within = offset % bs;
            let mut run = len.min(bs - within);
            let entry = self.entry(block);
            if !allocated(entry) {
                // No backing file: unallocated blocks read as zeros (as QEMU reports them).
                let mut b = block + 1;
                while run < len && !allocated(self.entry(b)) {
                    run = (run + bs).min(len);
                    b += 1;
                }
                return Ok(Mapping {
                    len: run,
                    kind: MapKind::Zero { offset: None },
                });
            }
            // Consecutive blocks at consecutive places form one run.
            let mut b = block + 1;
            while run < len && self.entry(b) == entry + (b - block) as u32 {
                run = (run + bs).min(len);
                b += 1;
            }
            let host = self.block_offset(entry) + within;
            let data = Mapping {
                len: run,
                kind: MapKind::Data {
                    storage: self.file.as_ref(),
                    offset: host,
                },
            };
            if query == MapQuery::Read {
                return Ok(data);
            }
            // As QEMU: a hole in the file reads as zeros (and is still the image's data).
            let fsize = self.file.size()?;
            if host >= fsize {
                return Ok(Mapping {
                    len: run,
                    kind: MapKind::DataZero {
                        storage: self.file.as_ref(),
                        offset: host,
                    },
                });
            }
            let (ext, n) = self.file.extent(host, run.min(fsize - host)).await?;
            Ok(match ext {
                HostExtent::Data => Mapping { len: n, ..data },
                HostExtent::Hole => Mapping {
                    len: n,
                    kind: MapKind::DataZero {
                        storage: self.file.as_ref(),
                        offset: host,
                    },
                },
            })
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
            let bs = u64::from(BLOCK_SIZE);
            let block = offset / bs;
            let within = offset % bs;
            let run = len.min(bs - within);
            let in_place = |entry: u32| WriteTarget {
                len: run,
                storage: self.file.as_ref(),
                offset: self.block_offset(entry) + within,
                commit: None,
                hold: None,
            };
            let entry = self.entry(block);
            if allocated(entry) {
                return Ok(in_place(entry));
            }
            let mut state = self.alloc.lock().await;
            let entry = self.entry(block);
            if allocated(entry) {
                return Ok(in_place(entry));
            }
            let index = state.1;
            if index >= header::DISCARDED {
                return Err(Error::new(ErrorKind::NoSpace, "the VDI image is full"));
            }
            let start = self.block_offset(index);
            // The rest of the block reads as zeros (a previous crash may have left bytes).
            if within > 0 {
                self.file.write_zeroes(start, within, false).await?;
            }
            let tail = within + run;
            if tail < bs {
                self.file
                    .write_zeroes(start + tail, bs - tail, false)
                    .await?;
            }
            let commit: WriteCommit<'a> = Box::new(move || {
                Box::pin(async move {
                    let (header, next) = &mut *state;
                    // The count first: a crash before the entry wastes a block, never
                    // shares one.
                    header.blocks_allocated = header.blocks_allocated.max(index + 1);
                    self.file.write_at(0, &header.to_bytes()).await?;
                    let at = u64::from(self.header.offset_bmap) + block * 4;
                    self.file.write_at(at, &index.to_le_bytes()).await?;
                    self.bmap.write().unwrap()[block as usize] = index;
                    *next = index + 1;
                    self.file.flush().await
                })
            });
            Ok(WriteTarget {
                len: run,
                storage: self.file.as_ref(),
                offset: start + within,
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
            let bs = u64::from(BLOCK_SIZE);
            let end = offset + len;
            let mut pos = offset;
            while pos < end {
                let block = pos / bs;
                let within = pos % bs;
                let run = (end - pos).min(bs - within);
                let entry = self.entry(block);
                // Unallocated blocks read as zeros already.
                if allocated(entry) {
                    self.file
                        .write_zeroes(self.block_offset(entry) + within, run, may_unmap)
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
            // As QEMU: VDI has no discard, the data stays.
            DiscardMode::ReadsAnything => Box::pin(async move { self.check_write() }),
            // No backing file: "the backing file's data" is zeros.
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
        self.file.flush()
    }

    fn sync(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.file.flush().await?;
            self.file.sync().await
        })
    }

    fn unique_id(&self) -> Option<Vec<u8>> {
        Some(self.header.uuid_image.to_vec())
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(u64::from(BLOCK_SIZE))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn describe(&self) -> ImageDescription {
        ImageDescription {
            filename: self.file.path().map(|p| p.display().to_string()),
            actual_size: self.file.allocated_size(),
            cluster_size: Some(u64::from(BLOCK_SIZE)),
            ..ImageDescription::default()
        }
    }
}

/// Builder for new VDI images, laid out as qemu-img lays them out (but the UUIDs).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> vmimg::Result<()> {
/// use vmimg::vdi::VdiCreate;
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("disk.vdi");
/// VdiCreate::new(64 << 20).create(&path).await?;
/// let image = vmimg::ImageOpen::path(&path).format(vmimg::Format::VDI).open().await?;
/// assert_eq!(image.size(), 64 << 20);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct VdiCreate {
    size: u64,
    fixed: bool,
}

impl VdiCreate {
    /// A dynamic image of `size` bytes (rounded up to a sector).
    pub fn new(size: u64) -> Self {
        VdiCreate { size, fixed: false }
    }

    /// A static image: every block allocated (the file has the full size, as a hole).
    pub fn fixed(mut self, fixed: bool) -> Self {
        self.fixed = fixed;
        self
    }

    /// Creates (or truncates) the file at `path`; a create that fails removes the file it
    /// made.
    pub async fn create(&self, path: &Path) -> Result<()> {
        self.check()?;
        let new = NewFile::new(path);
        let (perm, shared) = VDI.permissions(true, Permissions::ALL, false)?;
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

    fn check(&self) -> Result<()> {
        if self.size > MAX_CREATE_SIZE {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "Unsupported VDI image size (size is 0x{:x}, max supported is 0x{MAX_CREATE_SIZE:x})",
                    self.size
                ),
            ));
        }
        Ok(())
    }

    /// Writes a new image over `file`.
    pub async fn create_on(&self, file: &dyn Storage) -> Result<()> {
        self.check()?;
        let h = VdiHeader::new(self.size, self.fixed);
        let blocks = h.blocks_in_image as usize;
        let map_bytes = (h.offset_data - h.offset_bmap) as usize;
        let mut map = vec![0u8; map_bytes];
        for (i, e) in map.chunks_exact_mut(4).take(blocks).enumerate() {
            let v = if self.fixed { i as u32 } else { UNALLOCATED };
            e.copy_from_slice(&v.to_le_bytes());
        }
        file.resize(0, PreallocMode::Off).await?;
        file.write_at(0, &h.to_bytes()).await?;
        file.write_at(u64::from(h.offset_bmap), &map).await?;
        if self.fixed {
            let end = u64::from(h.offset_data) + blocks as u64 * u64::from(BLOCK_SIZE);
            file.resize(end, PreallocMode::Off).await?;
        }
        file.sync().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_counts_like_qemu_img() {
        let mut h = VdiHeader::new(10 << 20, false);
        h.blocks_allocated = 2;
        let mut bmap = vec![UNALLOCATED; 10];
        bmap[0] = 1;
        bmap[1] = 0;
        assert_eq!(check_bmap(&h, &bmap), CheckReport::default());
        bmap[2] = 0;
        let r = check_bmap(&h, &bmap);
        assert_eq!(
            r.messages,
            [
                "ERROR: block index 0 also used by 0",
                "ERROR: allocated blocks mismatch, is 3, should be 2"
            ]
        );
        assert_eq!(r.corruptions, 2);
        bmap[2] = 20;
        let r = check_bmap(&h, &bmap);
        assert_eq!(r.messages[0], "ERROR: block index 2 too large, is 20");
    }
}
