//! Fuzzes opening, reading and writing VHDX images. A VHDX file is at least 8 MiB, so the
//! input is not the file: it is a list of patches over a valid 8 MiB image made by vmimg
//! (1 MiB blocks, two blocks written, the log, BAT and metadata at qemu-img's places):
//!
//! ```text
//!  input: flags, then records [area][offset u16][length u8][bytes]
//!  area: file id | header 1 | header 2 | region table | log | BAT | metadata table |
//!        metadata items | data
//!  flags: 1 reseal both headers, 2 reseal the region table, 4 reseal the log entry at the
//!         log's start, 8 also open it for writing (a copy), write and sync
//! ```
//!
//! Resealing lets mutations pass the CRC-32C checks and reach the structures behind them
//! (a log to replay, in memory read-only and into the file writable). Errors are expected;
//! a panic, a hang (the 10 s bound) or an allocation beyond libFuzzer's RSS limit is a bug.

#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use vmimg::vhdx::header::seal;
use vmimg::vhdx::VhdxCreate;
use vmimg::{
    Format, ImageOpen, ImplicitOpenPolicy, MemoryStorage, OpenOptions, Storage, StorageExt,
};

const MIB: usize = 1 << 20;
/// Where the patch areas start (qemu-img's layout of an 8 MiB image with 1 MiB blocks).
const AREAS: [usize; 9] = [0, 64 << 10, 128 << 10, 192 << 10, MIB, 2 * MIB, 3 * MIB, 3 * MIB + (64 << 10), 8 * MIB];

fn template() -> &'static [u8] {
    static T: OnceLock<Vec<u8>> = OnceLock::new();
    T.get_or_init(|| {
        common::runtime().block_on(async {
            let s: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
            VhdxCreate::new(8 << 20)
                .block_size(1 << 20)
                .create_on(s.as_ref())
                .await
                .expect("create");
            let img = ImageOpen::storage(Arc::clone(&s))
                .format(Format::VHDX)
                .writable(true)
                .open()
                .await
                .expect("open");
            img.write(0, &[0x11; 4096]).await.expect("write");
            img.write(5 << 20, &[0x22; 4096]).await.expect("write");
            img.sync().await.expect("sync");
            drop(img);
            let mut b = vec![0u8; s.size().expect("size") as usize];
            s.read_at(0, &mut b).await.expect("read");
            b
        })
    })
}

fn patched(data: &[u8]) -> (Vec<u8>, u8) {
    let mut img = template().to_vec();
    let Some((&flags, mut rest)) = data.split_first() else {
        return (img, 0);
    };
    while rest.len() >= 4 {
        let area = AREAS[rest[0] as usize % AREAS.len()];
        let at = area + usize::from(u16::from_le_bytes([rest[1], rest[2]]));
        let n = usize::from(rest[3]).min(rest.len() - 4);
        let bytes = &rest[4..4 + n];
        if at + n > img.len() {
            img.resize(at + n, 0);
        }
        img[at..at + n].copy_from_slice(bytes);
        rest = &rest[4 + n..];
    }
    if flags & 1 != 0 {
        for h in [64 << 10, 128 << 10] {
            seal(&mut img[h..h + 4096], 4);
        }
    }
    if flags & 2 != 0 {
        seal(&mut img[192 << 10..256 << 10], 4);
    }
    if flags & 4 != 0 && &img[MIB..MIB + 4] == b"loge" {
        let len = u32::from_le_bytes(img[MIB + 8..MIB + 12].try_into().expect("4 bytes")) as usize;
        if len >= 4096 && len <= MIB && len % 4096 == 0 {
            seal(&mut img[MIB..MIB + len], 4);
        }
    }
    (img, flags)
}

fuzz_target!(|data: &[u8]| {
    let (img, flags) = patched(data);
    common::bounded(async {
        let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(&img));
        let opts = OpenOptions::new().policy(ImplicitOpenPolicy::deny());
        let open = ImageOpen::storage(storage).format(Format::VHDX).options(opts);
        if let Ok(image) = open.open().await {
            common::exercise(image, data).await;
        }
        if flags & 8 != 0 {
            let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(&img));
            let opts = OpenOptions::new()
                .writable(true)
                .policy(ImplicitOpenPolicy::deny());
            let open = ImageOpen::storage(storage).format(Format::VHDX).options(opts);
            if let Ok(image) = open.open().await {
                let size = image.size();
                if size > 0 {
                    let n = 4096.min(size - size / 3) as usize;
                    let _ = image.write(size / 3, &vec![0x5a; n]).await;
                }
                let _ = image.sync().await;
                common::exercise(image, data).await;
            }
        }
    });
});
