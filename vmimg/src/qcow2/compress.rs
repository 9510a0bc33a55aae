//! Decoding of compressed clusters: raw deflate (RFC 1951, no zlib header) and zstd.
//!
//! Decoding stops once a whole cluster is produced, so trailing bytes of the last sector are
//! ignored; data that ends before a whole cluster is produced is an error, as in QEMU.

use super::header::CompressionType;
use std::cell::RefCell;
use thiserror::Error as ThisError;
use zstd::stream::raw::Operation;

/// Largest zstd window accepted (8 MiB), bounding the memory a crafted frame can demand;
/// clusters are at most 2 MiB.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Why a compressed cluster could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, ThisError)]
pub enum DecompressError {
    /// The stream is malformed.
    #[error("{0} stream is malformed")]
    BadData(&'static str),
    /// The stream ended before a whole cluster was produced.
    #[error("{kind} stream produced {produced} bytes, not a whole cluster of {expected}")]
    Short {
        /// deflate or zstd.
        kind: &'static str,
        /// Bytes produced.
        produced: usize,
        /// Cluster size.
        expected: usize,
    },
}

pub use crate::cpu::run_cpu;

/// Compresses one cluster for storage; `None` when the result would not be smaller than
/// the cluster (QEMU then stores the cluster uncompressed).
pub fn compress(kind: CompressionType, input: &[u8]) -> Option<Vec<u8>> {
    let limit = input.len().saturating_sub(1);
    match kind {
        CompressionType::Deflate => DEFLATE.with(|c| {
            let mut out = vec![0u8; limit];
            let n = c.borrow_mut().deflate_compress(input, &mut out).ok()?;
            out.truncate(n);
            Some(out)
        }),
        CompressionType::Zstd => ZSTD_C.with(|cell| {
            // One context per thread: creating one per cluster cost more than compressing.
            let mut slot = cell.borrow_mut();
            let c = match slot.as_mut() {
                Some(c) => c,
                None => slot.insert(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok()?),
            };
            // Output that would not fit in `limit` bytes fails, and is stored plain.
            let mut out = Vec::with_capacity(limit);
            c.compress_to_buffer(input, &mut out).ok()?;
            Some(out)
        }),
    }
}

/// zstd level for compressed clusters (zstd's default, as QEMU uses).
const ZSTD_LEVEL: i32 = 3;

thread_local! {
    static DEFLATE: RefCell<libdeflater::Compressor> = RefCell::new(libdeflater::Compressor::new(
        libdeflater::CompressionLvl::new(6).expect("level 6 is valid"),
    ));
    static INFLATE: RefCell<libdeflater::Decompressor> =
        RefCell::new(libdeflater::Decompressor::new());
    static ZSTD: RefCell<Option<zstd::zstd_safe::DCtx<'static>>> = const { RefCell::new(None) };
    static ZSTD_C: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
}

/// Decodes `input` into exactly `out.len()` bytes.
pub fn decompress(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), DecompressError> {
    match kind {
        CompressionType::Deflate => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), DecompressError> {
    let produced = INFLATE.with(|d| {
        d.borrow_mut()
            .deflate_decompress(input, out)
            .map_err(|_| DecompressError::BadData("deflate"))
    })?;
    if produced != out.len() {
        return Err(DecompressError::Short {
            kind: "deflate",
            produced,
            expected: out.len(),
        });
    }
    Ok(())
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), DecompressError> {
    ZSTD.with(|cell| {
        let mut slot = cell.borrow_mut();
        let ctx = match slot.as_mut() {
            Some(ctx) => ctx,
            None => {
                let mut ctx = zstd::zstd_safe::DCtx::create();
                ctx.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
                    ZSTD_WINDOW_LOG_MAX,
                ))
                .map_err(|_| DecompressError::BadData("zstd"))?;
                slot.insert(ctx)
            }
        };
        let mut dec = zstd::stream::raw::Decoder::with_context(ctx);
        let (mut read, mut written) = (0usize, 0usize);
        while written < out.len() {
            let st = dec
                .run_on_buffers(&input[read..], &mut out[written..])
                .map_err(|_| DecompressError::BadData("zstd"))?;
            read += st.bytes_read;
            written += st.bytes_written;
            if st.bytes_read == 0 && st.bytes_written == 0 {
                return Err(DecompressError::Short {
                    kind: "zstd",
                    produced: written,
                    expected: out.len(),
                });
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Vec<u8> {
        (0..65536u32).map(|i| (i / 300) as u8).collect()
    }

    #[test]
    fn deflate_round_trip_ignores_trailing_bytes() {
        let data = cluster();
        let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
        let mut comp = vec![0u8; c.deflate_compress_bound(data.len())];
        let n = c.deflate_compress(&data, &mut comp).unwrap();
        comp.truncate(n);
        comp.extend_from_slice(&[0xaa; 300]);
        let mut out = vec![0u8; data.len()];
        decompress(CompressionType::Deflate, &comp, &mut out).unwrap();
        assert!(out == data);
    }

    #[test]
    fn zstd_round_trip_ignores_trailing_bytes() {
        let data = cluster();
        let mut comp = zstd::bulk::compress(&data, 3).unwrap();
        comp.extend_from_slice(&[0u8; 100]);
        let mut out = vec![0u8; data.len()];
        decompress(CompressionType::Zstd, &comp, &mut out).unwrap();
        assert!(out == data);
    }

    #[test]
    fn compress_round_trips_and_refuses_incompressible_data() {
        let data = cluster();
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            let c = compress(kind, &data).unwrap();
            assert!(c.len() < data.len() / 4);
            let mut out = vec![0u8; data.len()];
            decompress(kind, &c, &mut out).unwrap();
            assert!(out == data);
            let mut rng = fastrand::Rng::with_seed(5);
            let noise: Vec<u8> = (0..65536).map(|_| rng.u8(..)).collect();
            assert!(compress(kind, &noise).is_none(), "{kind:?}");
        }
    }

    #[test]
    fn garbage_and_short_streams_are_errors_not_panics() {
        let mut out = vec![0u8; 65536];
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            assert!(decompress(kind, &[0xff; 64], &mut out).is_err());
            assert!(decompress(kind, &[], &mut out).is_err());
        }
        let short = zstd::bulk::compress(&[1u8; 1000], 3).unwrap();
        assert!(matches!(
            decompress(CompressionType::Zstd, &short, &mut out),
            Err(DecompressError::Short { .. })
        ));
        let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
        let mut comp = vec![0u8; 4096];
        let n = c.deflate_compress(&[1u8; 1000], &mut comp).unwrap();
        assert!(matches!(
            decompress(CompressionType::Deflate, &comp[..n], &mut out),
            Err(DecompressError::Short { .. })
        ));
    }
}
