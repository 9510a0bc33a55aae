//! Fuzzes opening and reading a cloop image: the input is the whole image file, held in a
//! `MemoryStorage`, opened read-only as `cloop`, then read as `qcow2_open_read` reads (the
//! first 4 MiB in 64 KiB chunks, ranges at offsets from the input's last bytes, block
//! status alongside). Errors are expected; a panic, a hang (the 10 s bound) or an
//! allocation beyond libFuzzer's RSS limit is a bug.

#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmimg::{Format, ImageOpen, ImplicitOpenPolicy, MemoryStorage, OpenOptions, Storage};

fuzz_target!(|data: &[u8]| {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(data));
    let opts = OpenOptions::new().policy(ImplicitOpenPolicy::deny());
    common::bounded(async {
        let open = ImageOpen::storage(storage).format(Format::CLOOP).options(opts);
        if let Ok(image) = open.open().await {
            common::exercise(image, data).await;
        }
    });
});
