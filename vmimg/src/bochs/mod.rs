//! Bochs growing ("redolog") images, read only, as QEMU 10 reads them.
//!
//! ```text
//!  0 header: "Bochs Virtual HD Image" / "Redolog" / "Growing", version, header size,
//!            catalog entries, bitmap bytes, extent bytes, disk size (little-endian)
//!  header size: catalog, u32 per extent: ffffffff unallocated, n: the n-th stored extent
//!  then stored extents: [sector bitmap][extent data]; a clear bit reads as zeros
//! ```

use crate::format::{
    read_only, ChainView, DiscardMode, Format, FormatDriver, ImageDescription, ImageFormat,
    LayerOpen, MapKind, MapQuery, Mapping, OpenedLayer, WriteTarget,
};
use crate::storage::{BoxFuture, PreallocMode, Storage, StorageExt};
use crate::{Error, ErrorKind, Result};
use std::sync::{Arc, Mutex};

/// The Bochs format's entry points.
#[derive(Debug)]
pub struct BochsFormat;

/// The Bochs format.
pub const BOCHS: Format = Format::new(&BochsFormat);

const MAGIC: &[u8] = b"Bochs Virtual HD Image";
const REDOLOG: &[u8] = b"Redolog";
const GROWING: &[u8] = b"Growing";
const VERSION_2: u32 = 0x0002_0000;
const VERSION_1: u32 = 0x0001_0000;
/// QEMU's limit on catalog entries (what bximage needs for its largest images).
const MAX_CATALOG: u32 = 0x10_0000;
const UNALLOCATED: u32 = 0xffff_ffff;

/// A NUL-terminated string field equal to `want`.
fn field_is(b: &[u8], want: &[u8]) -> bool {
    b.starts_with(want) && b.get(want.len()) == Some(&0)
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn is_bochs(b: &[u8]) -> bool {
    b.len() >= 72
        && field_is(&b[..32], MAGIC)
        && field_is(&b[32..48], REDOLOG)
        && field_is(&b[48..64], GROWING)
        && matches!(le32(b, 64), VERSION_1 | VERSION_2)
}

impl ImageFormat for BochsFormat {
    fn name(&self) -> &'static str {
        "bochs"
    }

    /// QEMU's `bochs_probe`.
    fn probe(&self, first: &[u8], _filename: Option<&str>, _file_size: u64) -> u32 {
        if is_bochs(first) {
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
            if layer.writable {
                return Err(Error::new(
                    ErrorKind::ReadOnly,
                    "bochs images are read only: convert them to write",
                ));
            }
            Ok(OpenedLayer {
                driver: Arc::new(BochsDriver::open(layer.storage).await?),
                backing: None,
            })
        })
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidFormat, msg)
}

/// An open Bochs image.
#[derive(Debug)]
pub struct BochsDriver {
    file: Arc<dyn Storage>,
    size: u64,
    catalog: Vec<u32>,
    data_offset: u64,
    bitmap_blocks: u64,
    extent_blocks: u64,
    extent_size: u64,
    /// The last sector bitmap read, by extent.
    bitmap: Mutex<Option<(u32, Arc<Vec<u8>>)>>,
}

impl BochsDriver {
    async fn open(file: Arc<dyn Storage>) -> Result<Self> {
        let mut h = [0u8; 512];
        file.read_at(0, &mut h).await?;
        if !is_bochs(&h) {
            return Err(invalid("Image not in Bochs format"));
        }
        let disk = if le32(&h, 64) == VERSION_1 {
            u64::from_le_bytes(h[84..92].try_into().expect("8 bytes"))
        } else {
            u64::from_le_bytes(h[88..96].try_into().expect("8 bytes"))
        };
        let size = disk / 512 * 512;
        let header = u64::from(le32(&h, 68));
        let catalog_size = le32(&h, 72);
        if catalog_size > MAX_CATALOG {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "Catalog size is too large",
            ));
        }
        let bitmap = le32(&h, 76);
        let extent = le32(&h, 80);
        if extent < 512 {
            return Err(invalid("Extent size must be at least 512"));
        }
        if !extent.is_power_of_two() {
            return Err(invalid(format!(
                "Extent size {extent} is not a power of two"
            )));
        }
        if extent > 0x80_0000 {
            return Err(invalid(format!("Extent size {extent} is too large")));
        }
        let extent_size = u64::from(extent);
        if u64::from(catalog_size) < size.div_ceil(extent_size) {
            return Err(invalid("Catalog size is too small for this disk size"));
        }
        let mut raw = vec![0u8; catalog_size as usize * 4];
        if header + raw.len() as u64 > file.size()? {
            return Err(invalid("the catalog lies beyond the end of the file"));
        }
        file.read_at(header, &mut raw).await?;
        let catalog = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
        Ok(BochsDriver {
            file,
            size,
            catalog,
            data_offset: header + u64::from(catalog_size) * 4,
            bitmap_blocks: 1 + u64::from(bitmap.wrapping_sub(1)) / 512,
            extent_blocks: 1 + (extent_size - 1) / 512,
            extent_size,
            bitmap: Mutex::new(None),
        })
    }

    /// The sector bitmap of the stored extent `index`.
    async fn bitmap(&self, index: u32) -> Result<Arc<Vec<u8>>> {
        if let Some((i, b)) = self.bitmap.lock().unwrap().clone() {
            if i == index {
                return Ok(b);
            }
        }
        let at = self.extent_start(index);
        let mut b = vec![0u8; (self.extent_size / 512).div_ceil(8) as usize];
        self.file.read_at(at, &mut b).await?;
        let b = Arc::new(b);
        *self.bitmap.lock().unwrap() = Some((index, Arc::clone(&b)));
        Ok(b)
    }

    /// Where the stored extent `index` starts (saturating: a hostile index reads zeros
    /// past the end of the file).
    fn extent_start(&self, index: u32) -> u64 {
        (512 * u64::from(index))
            .saturating_mul(self.extent_blocks + self.bitmap_blocks)
            .saturating_add(self.data_offset)
    }
}

impl FormatDriver for BochsDriver {
    fn format(&self) -> Format {
        BOCHS
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn is_writable(&self) -> bool {
        false
    }

    fn storage(&self) -> &dyn Storage {
        self.file.as_ref()
    }

    fn request_align(&self) -> usize {
        512
    }

    fn map(&self, offset: u64, len: u64, _query: MapQuery) -> BoxFuture<'_, Result<Mapping<'_>>> {
        Box::pin(async move {
            let extent = offset / self.extent_size;
            let within = offset % self.extent_size;
            let run = len.min(self.extent_size - within);
            let index = self.catalog[extent as usize];
            // An extent stored past the end of the file reads as zeros.
            if index == UNALLOCATED || self.extent_start(index) >= self.file.size()? {
                return Ok(Mapping {
                    len: run,
                    kind: MapKind::Zero { offset: None },
                });
            }
            // Sector by sector: a set bit is data, a clear one zeros.
            let bits = self.bitmap(index).await?;
            let bit = |s: u64| bits[(s / 8) as usize] >> (s % 8) & 1 == 1;
            let first = within / 512;
            let last = (within + run).div_ceil(512);
            let here = bit(first);
            let end = (first + 1..last).find(|&s| bit(s) != here).unwrap_or(last);
            let n = (end * 512).min(within + run) - within;
            let kind = if here {
                MapKind::Data {
                    storage: self.file.as_ref(),
                    offset: self.extent_start(index) + 512 * self.bitmap_blocks + within,
                }
            } else {
                MapKind::Zero { offset: None }
            };
            Ok(Mapping { len: n, kind })
        })
    }

    fn map_for_write<'a>(
        &'a self,
        _offset: u64,
        _len: u64,
        _below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<WriteTarget<'a>>> {
        read_only()
    }

    fn write_zeroes<'a>(
        &'a self,
        _offset: u64,
        _len: u64,
        _may_unmap: bool,
        _below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        read_only()
    }

    fn discard<'a>(
        &'a self,
        _offset: u64,
        _len: u64,
        _mode: DiscardMode,
        _below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        read_only()
    }

    fn resize<'a>(
        &'a self,
        _new_size: u64,
        _prealloc: PreallocMode,
        _below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        read_only()
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn sync(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn describe(&self) -> ImageDescription {
        ImageDescription {
            filename: self.file.path().map(|p| p.display().to_string()),
            actual_size: self.file.allocated_size(),
            // QEMU's driver has no driver info: no dirty flag shown.
            no_driver_info: true,
            ..ImageDescription::default()
        }
    }
}
