//! cloop (compressed loopback, version 2.0) images, read only, as QEMU 10 reads them.
//!
//! ```text
//!  0   "#!/bin/sh\n#V2.0 Format\nmodprobe cloop ..." (128 bytes)
//!  128 block size, block count (big-endian u32)
//!  136 block count + 1 offsets (big-endian u64): block i is the zlib stream between
//!      offsets i and i + 1, decoding to one block
//! ```

use crate::format::{
    read_only, ChainView, DiscardMode, Format, FormatDriver, ImageDescription, ImageFormat,
    LayerOpen, MapKind, MapQuery, Mapping, OpenedLayer, WriteTarget,
};
use crate::storage::{BoxFuture, PreallocMode, Storage, StorageExt};
use crate::{Error, ErrorKind, Result};
use std::cell::RefCell;
use std::sync::{Arc, Mutex};

/// The cloop format's entry points.
#[derive(Debug)]
pub struct CloopFormat;

/// The cloop format.
pub const CLOOP: Format = Format::new(&CloopFormat);

/// QEMU's largest block (64 MiB).
const MAX_BLOCK_SIZE: u32 = 64 << 20;
/// QEMU's largest offset table.
const MAX_OFFSETS_BYTES: u64 = 512 << 20;

impl ImageFormat for CloopFormat {
    fn name(&self) -> &'static str {
        "cloop"
    }

    /// QEMU's `cloop_probe`: the version 2.0 script line (score 2).
    fn probe(&self, first: &[u8], _filename: Option<&str>, _file_size: u64) -> u32 {
        if first.starts_with(crate::format::CLOOP_MAGIC) {
            2
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
                    "cloop images are read only: convert them to write",
                ));
            }
            Ok(OpenedLayer {
                driver: Arc::new(CloopDriver::open(layer.storage).await?),
                backing: None,
            })
        })
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidFormat, msg)
}

/// An open cloop image.
#[derive(Debug)]
pub struct CloopDriver {
    file: Arc<dyn Storage>,
    block_size: u64,
    offsets: Vec<u64>,
    /// The last block decoded.
    last: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

thread_local! {
    static INFLATE: RefCell<libdeflater::Decompressor> =
        RefCell::new(libdeflater::Decompressor::new());
}

impl CloopDriver {
    async fn open(file: Arc<dyn Storage>) -> Result<Self> {
        let mut h = [0u8; 136];
        file.read_at(0, &mut h).await?;
        let block_size = u32::from_be_bytes(h[128..132].try_into().expect("4 bytes"));
        if block_size % 512 != 0 {
            return Err(invalid(format!(
                "block_size {block_size} must be a multiple of 512"
            )));
        }
        if block_size == 0 {
            return Err(invalid("block_size cannot be zero"));
        }
        if block_size > MAX_BLOCK_SIZE {
            return Err(invalid(format!(
                "block_size {block_size} must be {} MB or less",
                MAX_BLOCK_SIZE >> 20
            )));
        }
        let n_blocks = u32::from_be_bytes(h[132..136].try_into().expect("4 bytes"));
        if u64::from(n_blocks) > u64::from(u32::MAX - 1) / 8 {
            return Err(invalid(format!(
                "n_blocks {n_blocks} must be {} or less",
                (u32::MAX - 1) / 8
            )));
        }
        let bytes = (u64::from(n_blocks) + 1) * 8;
        if bytes > MAX_OFFSETS_BYTES {
            return Err(invalid(
                "image requires too many offsets, try increasing block size",
            ));
        }
        if 136 + bytes > file.size()? {
            return Err(invalid("the offsets table lies beyond the end of the file"));
        }
        let mut raw = vec![0u8; bytes as usize];
        file.read_at(136, &mut raw).await?;
        let offsets: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        for (i, w) in offsets.windows(2).enumerate() {
            if w[1] < w[0] {
                return Err(invalid(format!(
                    "offsets not monotonically increasing at index {}, image file is corrupt",
                    i + 1
                )));
            }
            if w[1] - w[0] > 2 * u64::from(MAX_BLOCK_SIZE) {
                return Err(invalid(format!(
                    "invalid compressed block size at index {}, image file is corrupt",
                    i + 1
                )));
            }
        }
        Ok(CloopDriver {
            file,
            block_size: u64::from(block_size),
            offsets,
            last: Mutex::new(None),
        })
    }

    /// Block `i`, decoded (the last one is kept).
    async fn block(&self, i: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((k, b)) = self.last.lock().unwrap().clone() {
            if k == i {
                return Ok(b);
            }
        }
        let (start, end) = (self.offsets[i as usize], self.offsets[i as usize + 1]);
        let mut input = vec![0u8; (end - start) as usize];
        self.file.read_at(start, &mut input).await?;
        let bs = self.block_size as usize;
        let block = crate::cpu::run_cpu(move || {
            let mut out = vec![0u8; bs];
            match INFLATE.with(|d| d.borrow_mut().zlib_decompress(&input, &mut out)) {
                Ok(n) if n == bs => Ok(out),
                _ => Err(Error::new(
                    ErrorKind::Corrupt,
                    format!("cloop block {i} cannot be decoded"),
                )),
            }
        })
        .await??;
        let block = Arc::new(block);
        *self.last.lock().unwrap() = Some((i, Arc::clone(&block)));
        Ok(block)
    }
}

impl FormatDriver for CloopDriver {
    fn format(&self) -> Format {
        CLOOP
    }

    fn size(&self) -> u64 {
        (self.offsets.len() as u64 - 1) * self.block_size / 512 * 512
    }

    fn is_writable(&self) -> bool {
        false
    }

    fn storage(&self) -> &dyn Storage {
        self.file.as_ref()
    }

    fn map(&self, offset: u64, len: u64, _query: MapQuery) -> BoxFuture<'_, Result<Mapping<'_>>> {
        Box::pin(async move {
            let within = offset % self.block_size;
            Ok(Mapping {
                len: len.min(self.block_size - within),
                kind: MapKind::Compressed(offset / self.block_size),
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
            let block = self.block(descriptor).await?;
            let within = (guest_offset % self.block_size) as usize;
            buf.copy_from_slice(&block[within..within + buf.len()]);
            Ok(())
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
