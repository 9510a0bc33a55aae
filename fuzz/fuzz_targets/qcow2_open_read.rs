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

use libfuzzer_sys::fuzz_target;
use vmimg::{ImplicitOpenPolicy, MemoryStorage, OpenOptions, Qcow2Open, Storage};

fuzz_target!(|data: &[u8]| {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(data));
    let data_file: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(data));
    let opts = OpenOptions::new()
        .policy(ImplicitOpenPolicy::deny())
        .data_file(data_file)
        .l2_cache_size(1 << 20);
    common::bounded(async {
        if let Ok(image) = Qcow2Open::storage(storage).options(opts).open().await {
            common::exercise(image, data).await;
        }
    });
});
