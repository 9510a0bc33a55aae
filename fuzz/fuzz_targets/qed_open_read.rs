//! Fuzzes opening, reading and writing a QED image: the input is the whole image file, held
//! in a `MemoryStorage`.
//!
//! - Read-only: read as `qcow2_open_read` reads (the first 4 MiB in 64 KiB chunks, ranges
//!   at offsets from the input's last bytes, block status alongside), then block status
//!   walked over the whole disk (at most 256 queries). A backing file the image names is
//!   not opened (`no_backing`, as `qemu-img info` opens).
//! - Writable, on a copy (an image with the need-check bit runs the repairing check as it
//!   opens): a write at a third of the disk and one into the first cluster, zeroes over
//!   three clusters, a flush, the written range read back. An image naming a backing file
//!   gets a raw one of 1 MiB of 0x5c in its place, so that new clusters copy from it.
//!
//! Errors are expected; a panic, a hang (the 10 s bound) or an allocation beyond
//! libFuzzer's RSS limit is a bug.

#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
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

/// The writable pass: two writes, zeroes, a flush, a read back and a walk.
async fn write(image: Image) {
    let size = image.size();
    if size == 0 {
        return;
    }
    let cs = image.cluster_size().unwrap_or(4096).clamp(512, 64 << 10);
    let at = size / 3;
    let n = 4096.min(size - at);
    let _ = image.write(at, &vec![0x5a; n as usize]).await;
    let _ = image.write(512.min(size - 1), &[0xa5; 1]).await;
    let _ = image.write_zeroes(0, (3 * cs).min(size), true).await;
    let _ = image.flush().await;
    let mut back = vec![0u8; n as usize];
    let _ = image.read(at, &mut back).await;
    walk(&image).await;
}

fuzz_target!(|data: &[u8]| {
    common::bounded(async {
        let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(data));
        let opts = OpenOptions::new()
            .no_backing(true)
            .policy(ImplicitOpenPolicy::deny());
        let open = ImageOpen::storage(storage)
            .format(Format::QED)
            .options(opts);
        let Ok(image) = open.open().await else {
            return;
        };
        let named_backing = image.describe().backing_filename.is_some();
        walk(&image).await;
        common::exercise(image, data).await;

        let copy: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(data));
        let mut opts = OpenOptions::new()
            .writable(true)
            .policy(ImplicitOpenPolicy::deny());
        if named_backing {
            let base: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(&[0x5c; 1 << 20]));
            let Ok(base) = ImageOpen::storage(base).format(Format::RAW).open().await else {
                return;
            };
            opts = opts.backing(base);
        }
        let open = ImageOpen::storage(copy).format(Format::QED).options(opts);
        if let Ok(image) = open.open().await {
            write(image).await;
        }
    });
});
