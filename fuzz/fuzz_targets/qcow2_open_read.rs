//! Fuzzes opening and reading a qcow2 image: the input is the whole image file, held in a
//! `MemoryStorage`. The image is opened read-only with the deny policy (a backing file or
//! data file it names is never opened; the input itself is offered as explicit data file, so
//! external-data-file images get read too), then up to the first 4 MiB are read in 64 KiB
//! chunks, plus a few ranges at offsets taken from the input's last bytes, with block status
//! queries alongside. Errors are expected; a panic, a hang (the 10 s bound) or an allocation
//! beyond libFuzzer's RSS limit is a bug.

#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vmimg::{Image, ImplicitOpenPolicy, MemoryStorage, OpenOptions, Qcow2Open, Storage};

/// Bytes read from the start of the disk.
const READ_PREFIX: u64 = 4 << 20;
/// Size of one read.
const CHUNK: u64 = 64 << 10;
/// Bound on one input.
const LIMIT: Duration = Duration::from_secs(10);

/// Offsets derived from the input: its last 24 bytes as three big-endian words.
fn derived_offsets(data: &[u8], size: u64) -> Vec<u64> {
    let mut out = vec![size / 2, size.saturating_sub(CHUNK), size.saturating_sub(1)];
    if size > 0 {
        for w in data.rchunks_exact(8).take(3) {
            out.push(u64::from_be_bytes(w.try_into().expect("8 bytes")) % size);
        }
    }
    out
}

async fn exercise(image: Image, data: &[u8]) {
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

fuzz_target!(|data: &[u8]| {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(data));
    let data_file: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(data));
    let opts = OpenOptions::new()
        .policy(ImplicitOpenPolicy::deny())
        .data_file(data_file)
        .l2_cache_size(1 << 20);
    common::runtime().block_on(async {
        let work = async {
            if let Ok(image) = Qcow2Open::storage(storage).options(opts).open().await {
                exercise(image, data).await;
            }
        };
        tokio::time::timeout(LIMIT, work)
            .await
            .expect("open + reads did not finish within 10 s");
    });
});
