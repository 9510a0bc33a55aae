//! Fuzzes opening and reading a VMDK image: the input is the whole image file, held in a
//! `MemoryStorage` and opened read-only as `vmdk`. A sparse file (`KDMV`) is read on its
//! own. A descriptor file is its text up to the first NUL; every extent it names resolves,
//! through a policy that opens nothing on the host, to the input's bytes from the next
//! 512-byte boundary on (so the extent parser and the flat, sparse, COWD and SESparse
//! readers all see fuzzed bytes). A parent is never opened. Then the image is read as
//! `qcow2_open_read` reads. Errors are expected; a panic, a hang (the 10 s bound) or an
//! allocation beyond libFuzzer's RSS limit is a bug.

#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmimg::format::ImplicitOpenKind;
use vmimg::{
    Format, ImageOpen, ImplicitOpenPolicy, MemoryStorage, OpenOptions, PolicyDecision, Storage,
};

fuzz_target!(|data: &[u8]| {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(data));
    let tail = data
        .iter()
        .position(|&b| b == 0)
        .map(|p| (p + 1).next_multiple_of(512))
        .filter(|&k| k < data.len())
        .unwrap_or(0);
    let extent: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(&data[tail..]));
    let policy = ImplicitOpenPolicy::custom(move |req| match req.kind {
        ImplicitOpenKind::Extent => PolicyDecision::Use(Arc::clone(&extent)),
        _ => PolicyDecision::Deny("fuzzing: no parent".into()),
    });
    let opts = OpenOptions::new().policy(policy);
    common::bounded(async {
        let open = ImageOpen::storage(storage).format(Format::VMDK).options(opts);
        if let Ok(image) = open.open().await {
            common::exercise(image, data).await;
        }
    });
});
