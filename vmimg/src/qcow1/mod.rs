//! QEMU's original copy-on-write format (`qcow`, version 1), read only: what `convert`
//! needs to take these images out.
//!
//! ```text
//!  header (48 bytes, big-endian) | backing file name | L1 table | L2 tables and clusters
//!  guest offset --(cluster_bits + l2_bits)--> L1[i]: L2 table offset (0: unallocated)
//!               --(cluster_bits)------------> L2[j]: cluster offset, or, with bit 63,
//!                                             a compressed cluster: size in the bits
//!                                             below 63, raw deflate data
//! ```
//!
//! Checked as QEMU 10 checks it, with its messages. Encrypted images (QEMU's AES) are
//! refused: their scheme is broken and QEMU only reads them with a key.

use crate::format::{
    BackingName, ChainView, DiscardMode, Format, FormatDriver, ImageDescription, ImageFormat,
    LayerOpen, MapKind, MapQuery, Mapping, OpenedLayer, TableCache, WriteTarget,
};
use crate::storage::{BoxFuture, PreallocMode, Storage, StorageExt};
use crate::{Error, ErrorKind, Result};
use std::cell::RefCell;
use std::sync::{Arc, Mutex};

/// The qcow (version 1) format's entry points.
#[derive(Debug)]
pub struct QcowFormat;

/// The qcow (version 1) format.
pub const QCOW: Format = Format::new(&QcowFormat);

const MAGIC: &[u8; 4] = b"QFI\xfb";
const COMPRESSED: u64 = 1 << 63;
/// Cached L2 tables (at most 64 KiB each).
const L2_CACHE: usize = 64;

impl ImageFormat for QcowFormat {
    fn name(&self) -> &'static str {
        "qcow"
    }

    /// QEMU's `qcow_probe`: the magic and version 1.
    fn probe(&self, first: &[u8], _filename: Option<&str>, _file_size: u64) -> u32 {
        if first.len() >= 8 && first.starts_with(MAGIC) && be32(first, 4) == 1 {
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
        Box::pin(QcowDriver::open(layer))
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidFormat, msg)
}

fn corrupt(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Corrupt, msg)
}

/// An open qcow (version 1) image.
#[derive(Debug)]
pub struct QcowDriver {
    file: Arc<dyn Storage>,
    size: u64,
    cluster_bits: u32,
    l2_bits: u32,
    l1: Vec<u64>,
    backing: Option<String>,
    cache: Mutex<TableCache<u64>>,
}

impl QcowDriver {
    async fn open(layer: LayerOpen<'_>) -> Result<OpenedLayer> {
        if layer.writable {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "qcow (version 1) images are opened read-only here: convert them to write",
            ));
        }
        let file = layer.storage;
        let file_size = file.size()?;
        let mut h = [0u8; 48];
        file.read_at(0, &mut h).await?;
        if &h[..4] != MAGIC {
            return Err(invalid("Image not in qcow format"));
        }
        let version = be32(&h, 4);
        if version != 1 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("Unsupported qcow version {version}"),
            ));
        }
        let backing_offset = be64(&h, 8);
        let backing_len = be32(&h, 16);
        let size = be64(&h, 24);
        let cluster_bits = u32::from(h[32]);
        let l2_bits = u32::from(h[33]);
        let crypt = be32(&h, 36);
        let l1_offset = be64(&h, 40);
        if size <= 1 {
            return Err(invalid(
                "Image size is too small (must be at least 2 bytes)",
            ));
        }
        if !(9..=16).contains(&cluster_bits) {
            return Err(invalid("Cluster size must be between 512 and 64k"));
        }
        // An L2 table is 8 << l2_bits bytes: 512 to 64 KiB.
        if !(6..=13).contains(&l2_bits) {
            return Err(invalid("L2 table size must be between 512 and 64k"));
        }
        if crypt > 1 {
            return Err(invalid("invalid encryption method in qcow header"));
        }
        if crypt == 1 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "encrypted qcow images (QEMU's AES) are not supported",
            ));
        }
        let shift = cluster_bits + l2_bits;
        if size > u64::MAX - (1u64 << shift) {
            return Err(invalid("Image too large"));
        }
        let l1_size = size.div_ceil(1u64 << shift);
        if l1_size > (i32::MAX as u64) / 8 {
            return Err(invalid("Image too large"));
        }
        // The L1 table must be in the file (QEMU would read zeros past its end).
        let l1_end = l1_offset
            .checked_add(l1_size * 8)
            .filter(|&e| e <= file_size)
            .ok_or_else(|| {
                invalid("Could not read L1 table: it lies beyond the end of the file")
            })?;
        let mut raw = vec![0u8; (l1_end - l1_offset) as usize];
        file.read_at(l1_offset, &mut raw).await?;
        let l1 = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        let backing = if backing_offset != 0 {
            if backing_len > 1023 {
                return Err(invalid("Backing file name too long"));
            }
            let mut name = vec![0u8; backing_len as usize];
            if backing_offset
                .checked_add(u64::from(backing_len))
                .is_none_or(|e| e > file_size)
            {
                return Err(invalid(
                    "the backing file name lies beyond the end of the file",
                ));
            }
            file.read_at(backing_offset, &mut name).await?;
            Some(String::from_utf8_lossy(&name).into_owned())
        } else {
            None
        };
        let driver = QcowDriver {
            file,
            size,
            cluster_bits,
            l2_bits,
            l1,
            backing: backing.clone(),
            cache: Mutex::new(TableCache::new(L2_CACHE)),
        };
        Ok(OpenedLayer {
            driver: Arc::new(driver),
            backing: backing.filter(|b| !b.is_empty()).map(|name| BackingName {
                name,
                format: None,
                expected_id: None,
            }),
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The L2 entry of the cluster holding guest `offset` (0: unallocated).
    async fn entry(&self, offset: u64) -> Result<u64> {
        let i = offset >> (self.cluster_bits + self.l2_bits);
        let l2_offset = self.l1.get(i as usize).copied().unwrap_or(0);
        if l2_offset == 0 {
            return Ok(0);
        }
        let j = ((offset >> self.cluster_bits) & ((1 << self.l2_bits) - 1)) as usize;
        let cached = self.cache.lock().unwrap().get(i);
        let table = match cached {
            Some(t) => t,
            None => {
                let mut raw = vec![0u8; 8 << self.l2_bits];
                self.file.read_at(l2_offset, &mut raw).await?;
                let t: Arc<Vec<u64>> = Arc::new(raw.chunks_exact(8).map(|c| be64(c, 0)).collect());
                self.cache.lock().unwrap().put(i, Arc::clone(&t));
                t
            }
        };
        Ok(table[j])
    }

    /// Offset and size of a compressed cluster's data, from its L2 entry.
    fn compressed_extent(&self, entry: u64) -> (u64, u64) {
        let shift = 63 - self.cluster_bits;
        let offset = entry & ((1u64 << shift) - 1);
        let size = (entry >> shift) & (self.cluster_size() - 1);
        (offset, size)
    }
}

thread_local! {
    static INFLATE: RefCell<libdeflater::Decompressor> =
        RefCell::new(libdeflater::Decompressor::new());
}

impl FormatDriver for QcowDriver {
    fn format(&self) -> Format {
        QCOW
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

    fn map(&self, offset: u64, len: u64, _query: MapQuery) -> BoxFuture<'_, Result<Mapping<'_>>> {
        Box::pin(async move {
            let cs = self.cluster_size();
            let within = offset % cs;
            let mut run = len.min(cs - within);
            let entry = self.entry(offset).await?;
            if entry == 0 {
                // Neighbouring unallocated clusters form one run.
                while run < len && self.entry(offset + run).await? == 0 {
                    run = (run + cs).min(len);
                }
                return Ok(Mapping {
                    len: run,
                    kind: MapKind::Unallocated,
                });
            }
            if entry & COMPRESSED != 0 {
                return Ok(Mapping {
                    len: run,
                    kind: MapKind::Compressed(entry),
                });
            }
            let host = entry;
            while run < len && self.entry(offset + run).await? == host + (within + run) / cs * cs {
                run = (run + cs).min(len);
            }
            Ok(Mapping {
                len: run,
                kind: MapKind::Data {
                    storage: self.file.as_ref(),
                    offset: host + within,
                },
            })
        })
    }

    fn read_compressed<'a>(
        &'a self,
        descriptor: u64,
        guest_offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let (offset, size) = self.compressed_extent(descriptor);
            let mut input = vec![0u8; size as usize];
            self.file.read_at(offset, &mut input).await?;
            let cs = self.cluster_size() as usize;
            let cluster = crate::cpu::run_cpu(move || {
                let mut out = vec![0u8; cs];
                let n = INFLATE.with(|d| d.borrow_mut().deflate_decompress(&input, &mut out));
                match n {
                    Ok(n) if n == cs => Ok(out),
                    _ => Err(corrupt(format!(
                        "compressed cluster at 0x{offset:x} ({size} bytes) cannot be decoded"
                    ))),
                }
            })
            .await??;
            let within = (guest_offset % cs as u64) as usize;
            buf.copy_from_slice(&cluster[within..within + buf.len()]);
            Ok(())
        })
    }

    fn map_for_write<'a>(
        &'a self,
        _offset: u64,
        _len: u64,
        _below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<WriteTarget<'a>>> {
        crate::format::read_only()
    }

    fn write_zeroes<'a>(
        &'a self,
        _offset: u64,
        _len: u64,
        _may_unmap: bool,
        _below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        crate::format::read_only()
    }

    fn discard<'a>(
        &'a self,
        _offset: u64,
        _len: u64,
        _mode: DiscardMode,
        _below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        crate::format::read_only()
    }

    fn resize<'a>(
        &'a self,
        _new_size: u64,
        _prealloc: PreallocMode,
        _below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        crate::format::read_only()
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn sync(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(QcowDriver::cluster_size(self))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn describe(&self) -> ImageDescription {
        let backing = self.backing.clone().filter(|b| !b.is_empty());
        ImageDescription {
            filename: self.file.path().map(|p| p.display().to_string()),
            actual_size: self.file.allocated_size(),
            cluster_size: Some(QcowDriver::cluster_size(self)),
            full_backing_filename: backing.as_ref().map(|b| {
                self.file
                    .resolve_name(b)
                    .map(|r| r.path.display().to_string())
                    .unwrap_or_else(|_| b.clone())
            }),
            backing_filename: backing,
            ..ImageDescription::default()
        }
    }
}
