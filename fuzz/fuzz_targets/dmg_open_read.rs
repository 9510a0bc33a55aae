//! Fuzzes opening and reading a DMG (UDIF) image: the input is the whole image file, held
//! in a `MemoryStorage`, opened read-only as `dmg` (the only way it opens). Every sector of
//! the first 1 MiB is read on its own (each chunk decoded, the last-chunk cache hit and
//! missed), then the disk is read as `qcow2_open_read` reads it (the first 4 MiB in 64 KiB
//! chunks, ranges at offsets from the input's last bytes, block status alongside).
//!
//! Errors are expected (sectors no chunk covers, chunks that do not decode); a panic (also
//! one in a decoder on vmimg's CPU threads: libFuzzer's panic hook aborts), a hang (the
//! 10 s bound) or an allocation beyond libFuzzer's RSS limit is a bug.

#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmimg::{Format, ImageOpen, ImplicitOpenPolicy, MemoryStorage, OpenOptions, Storage};

/// Sectors read one by one.
const SECTORS: u64 = 2048;

fuzz_target!(|data: &[u8]| {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(data));
    let opts = OpenOptions::new().policy(ImplicitOpenPolicy::deny());
    common::bounded(async {
        let open = ImageOpen::storage(storage)
            .format(Format::DMG)
            .options(opts);
        let Ok(image) = open.open().await else {
            return;
        };
        let mut sector = [0u8; 512];
        for s in 0..(image.size() / 512).min(SECTORS) {
            let _ = image.read(s * 512, &mut sector).await;
            let _ = image.block_status(s * 512, 512).await;
        }
        common::exercise(image, data).await;
    });
});
