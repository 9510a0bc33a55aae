//! Apple DMG (UDIF) images, read only, as QEMU 10 reads them (with its dmg-bz2 and
//! dmg-lzfse modules).
//!
//! ```text
//!  data fork: chunks | resource fork or XML property list: mish tables | koly trailer
//!  chunk: guest sectors [sector, sector + count) <- zeros | raw | zlib | bzip2 | LZFSE
//!         bytes at (data fork + table offset + chunk offset)
//! ```
//!
//! Sectors no chunk covers (gaps, chunks of types QEMU does not read such as ADC and LZMA)
//! read as I/O errors, as in QEMU. One file per role: `tables` (trailer and chunk tables),
//! this file (the driver: chunk lookup and decoding).

mod tables;

pub use tables::{glib_base64, Chunk, ChunkKind};

use crate::format::{
    read_only, ChainView, DiscardMode, Format, FormatDriver, ImageDescription, ImageFormat,
    LayerOpen, MapKind, MapQuery, Mapping, OpenedLayer, WriteTarget,
};
use crate::storage::{BoxFuture, PreallocMode, Storage, StorageExt};
use crate::{Error, ErrorKind, Result};
use std::cell::RefCell;
use std::sync::{Arc, Mutex};

/// The DMG format's entry points.
#[derive(Debug)]
pub struct DmgFormat;

/// The DMG format.
pub const DMG: Format = Format::new(&DmgFormat);

impl ImageFormat for DmgFormat {
    fn name(&self) -> &'static str {
        "dmg"
    }

    /// QEMU's `dmg_probe`: the file name alone, ending in `.dmg` (score 2, above raw).
    fn probe(&self, _first: &[u8], filename: Option<&str>, _file_size: u64) -> u32 {
        match filename {
            Some(n) if n.len() > 4 && n.ends_with(".dmg") => 2,
            _ => 0,
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
                    "Image is read-only: dmg images are read only, convert them to write",
                ));
            }
            Ok(OpenedLayer {
                driver: Arc::new(DmgDriver::open(layer.storage).await?),
                backing: None,
            })
        })
    }
}

thread_local! {
    static INFLATE: RefCell<libdeflater::Decompressor> =
        RefCell::new(libdeflater::Decompressor::new());
}

/// An open DMG image.
#[derive(Debug)]
pub struct DmgDriver {
    file: Arc<dyn Storage>,
    size: u64,
    chunks: Vec<Chunk>,
    /// The last chunk decoded.
    last: Mutex<Option<(usize, Arc<Vec<u8>>)>>,
    /// The last chunk that did not decode (its sectors fail at once).
    failed: Mutex<Option<usize>>,
}

fn io_error(msg: String) -> Error {
    Error::new(ErrorKind::Io, msg)
}

/// Decodes `input` of a chunk of `kind` into exactly `out.len()` bytes, with QEMU's rules
/// for what counts as decoded.
fn decode(kind: ChunkKind, input: &[u8], out: &mut [u8]) -> bool {
    match kind {
        ChunkKind::Zlib => INFLATE
            .with(|d| d.borrow_mut().zlib_decompress(input, out))
            .is_ok_and(|n| n == out.len()),
        #[cfg(feature = "dmg-bzip2")]
        ChunkKind::Bzip2 => {
            let mut d = bzip2::Decompress::new(false);
            matches!(d.decompress(input, out), Ok(bzip2::Status::StreamEnd))
                && d.total_out() == out.len() as u64
        }
        #[cfg(feature = "dmg-lzfse")]
        ChunkKind::Lzfse => {
            // As QEMU: whatever the stream yields, cut at the chunk's size (a short
            // stream leaves zeros); nothing at all is an error.
            use std::io::Read;
            let mut dec = lzfse_rust::LzfseRingDecoder::default();
            let mut reader = dec.reader_bytes(input).take(out.len() as u64);
            let mut done = 0;
            loop {
                match reader.read(&mut out[done..]) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(_) => return false,
                }
            }
            done > 0
        }
        _ => false,
    }
}

impl DmgDriver {
    async fn open(file: Arc<dyn Storage>) -> Result<Self> {
        let t = tables::read_tables(file.as_ref()).await?;
        for ty in &t.dropped {
            tracing::warn!(
                "Image contains chunks of unknown type {ty:x}, accessing them will result in \
                 I/O errors"
            );
        }
        Ok(DmgDriver {
            file,
            size: t.sectors * 512,
            chunks: t.chunks,
            last: Mutex::new(None),
            failed: Mutex::new(None),
        })
    }

    /// The chunks, in file order.
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// Chunk `i`, decoded (the last one is kept).
    async fn decoded(&self, i: usize) -> Result<Arc<Vec<u8>>> {
        if let Some((k, b)) = self.last.lock().unwrap().clone() {
            if k == i {
                return Ok(b);
            }
        }
        let c = self.chunks[i];
        let undecodable = || {
            io_error(format!(
                "dmg chunk {i} ({:?}, sectors {}..{}) cannot be decoded",
                c.kind,
                c.sector,
                c.sector.wrapping_add(c.count)
            ))
        };
        if *self.failed.lock().unwrap() == Some(i) {
            return Err(undecodable());
        }
        let mut input = vec![0u8; c.length as usize];
        self.file
            .read_at(c.offset, &mut input)
            .await
            .map_err(|e| io_error(format!("cannot read dmg chunk {i}: {e}")))?;
        let bytes = (c.count * 512) as usize;
        let out = if c.kind == ChunkKind::Raw {
            // A short raw chunk reads zeros after its bytes.
            input.resize(bytes, 0);
            input
        } else {
            let decoded = crate::cpu::run_cpu(move || {
                let mut out = vec![0u8; bytes];
                decode(c.kind, &input, &mut out).then_some(out)
            })
            .await?;
            match decoded {
                Some(out) => out,
                None => {
                    *self.failed.lock().unwrap() = Some(i);
                    return Err(undecodable());
                }
            }
        };
        let out = Arc::new(out);
        *self.last.lock().unwrap() = Some((i, Arc::clone(&out)));
        Ok(out)
    }
}

impl FormatDriver for DmgDriver {
    fn format(&self) -> Format {
        DMG
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
            let sector = offset / 512;
            let i = tables::search(&self.chunks, sector).ok_or_else(|| {
                io_error(format!(
                    "no chunk of the dmg image holds sector {sector} (a gap, or a chunk type \
                     QEMU does not read)"
                ))
            })?;
            let c = self.chunks[i];
            let end = c.sector.wrapping_add(c.count).saturating_mul(512);
            let run = len.min(end - offset);
            let kind = match c.kind {
                ChunkKind::Zero => MapKind::Zero { offset: None },
                ChunkKind::Raw if c.length >= c.count * 512 => MapKind::Data {
                    storage: self.file.as_ref(),
                    offset: c
                        .offset
                        .checked_add(offset - c.sector * 512)
                        .ok_or_else(|| io_error(format!("dmg chunk {i} lies beyond any file")))?,
                },
                _ => MapKind::Compressed(i as u64),
            };
            Ok(Mapping { len: run, kind })
        })
    }

    fn read_compressed<'a>(
        &'a self,
        descriptor: u64,
        guest_offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let i = descriptor as usize;
            let data = self.decoded(i).await?;
            let within = (guest_offset - self.chunks[i].sector * 512) as usize;
            buf.copy_from_slice(&data[within..within + buf.len()]);
            Ok(())
        })
    }

    /// As QEMU's generic answer for drivers without block status: the whole disk is data.
    fn status_unknown(&self) -> bool {
        true
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
