//! What the fuzz targets share (included with `#[path]`; not a target of its own).

// Each target uses part of this file.
#![allow(dead_code)]

use std::sync::OnceLock;
use std::time::Duration;

use vmimg::Image;

/// A current-thread runtime with timers and few blocking threads: (de)compression runs on
/// the blocking pool, and under AddressSanitizer every short-lived thread costs memory that
/// libFuzzer counts against its RSS limit.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .max_blocking_threads(4)
            .build()
            .expect("tokio runtime")
    })
}

/// Bytes read from the start of the disk.
const READ_PREFIX: u64 = 4 << 20;
/// Size of one read.
const CHUNK: u64 = 64 << 10;
/// Bound on one input.
const LIMIT: Duration = Duration::from_secs(10);

/// Offsets derived from the input: its last 24 bytes as three big-endian words.
pub fn derived_offsets(data: &[u8], size: u64) -> Vec<u64> {
    let mut out = vec![size / 2, size.saturating_sub(CHUNK), size.saturating_sub(1)];
    if size > 0 {
        for w in data.rchunks_exact(8).take(3) {
            out.push(u64::from_be_bytes(w.try_into().expect("8 bytes")) % size);
        }
    }
    out
}

/// Reads the first 4 MiB of `image` in chunks and ranges at offsets taken from the input,
/// with block status queries alongside; every error is ignored.
pub async fn exercise(image: Image, data: &[u8]) {
    let size = image.size();
    let _ = image.describe();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut offsets: Vec<u64> = (0..size.min(READ_PREFIX)).step_by(CHUNK as usize).collect();
    offsets.extend(derived_offsets(data, size));
    for at in offsets {
        let n = CHUNK.min(size.saturating_sub(at));
        if n == 0 {
            continue;
        }
        let _ = image.read(at, &mut buf[..n as usize]).await;
        let _ = image.block_status(at, n).await;
    }
}


/// Runs `work` on the shared runtime; not finishing within [`LIMIT`] is a bug (a hang).
pub fn bounded(work: impl std::future::Future<Output = ()>) {
    runtime().block_on(async {
        tokio::time::timeout(LIMIT, work)
            .await
            .expect("open + reads did not finish within 10 s");
    });
}
