//! Fuzzes opening, reading and writing a Parallels image: the input is the whole image
//! file, held in a `MemoryStorage`.
//!
//! - Read-only: block status walked over the whole disk (at most 256 queries, the map),
//!   then read as `qcow2_open_read` reads (the first 4 MiB in 64 KiB chunks, ranges at
//!   offsets from the input's last bytes, block status alongside).
//! - Writable, on a copy (an image a writer left in use, or with a bad BAT or data offset,
//!   is repaired as it opens): a write of 4 KiB at half the disk, a flush, the range read
//!   back (it must read as written), a walk, then `check` of what is left.
//!
//! Errors are expected; a panic, a hang (the 10 s bound), a write that does not read back
//! or an allocation beyond libFuzzer's RSS limit is a bug.

#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmimg::format::Repair;
use vmimg::{Format, Image, ImageOpen, ImplicitOpenPolicy, MemoryStorage, OpenOptions, Storage};

/// Block status from 0 to the end of the disk, one answer after another.
async fn walk(image: &Image) {
    let size = image.size();
    let mut at = 0;
    for _ in 0..256 {
        if at >= size {
            break;
        }
        match image.block_status(at, size - at).await {
            Ok(s) if s.len > 0 => at += s.len,
            _ => break,
        }
    }
}

/// The writable pass: a write, a flush, the write read back, a walk.
async fn write(image: Image) {
    let size = image.size();
    if size == 0 {
        return;
    }
    let at = size / 2;
    let n = 4096.min(size - at) as usize;
    let written = image.write(at, &vec![0x5a; n]).await.is_ok();
    let flushed = image.flush().await.is_ok();
    let mut back = vec![0u8; n];
    if written && flushed && image.read(at, &mut back).await.is_ok() {
        assert!(back.iter().all(|&b| b == 0x5a), "a write did not read back");
    }
    walk(&image).await;
}

fuzz_target!(|data: &[u8]| {
    common::bounded(async {
        let opts = OpenOptions::new().policy(ImplicitOpenPolicy::deny());
        let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(data));
        let open = ImageOpen::storage(storage)
            .format(Format::PARALLELS)
            .options(opts);
        if let Ok(image) = open.open().await {
            walk(&image).await;
            common::exercise(image, data).await;
        }

        let copy: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(data));
        let opts = OpenOptions::new()
            .writable(true)
            .policy(ImplicitOpenPolicy::deny());
        let open = ImageOpen::storage(Arc::clone(&copy))
            .format(Format::PARALLELS)
            .options(opts);
        if let Ok(image) = open.open().await {
            write(image).await;
            let _ = Format::PARALLELS
                .entry()
                .check(copy.as_ref(), Repair::None)
                .await;
        }
    });
});
