//! Crafted VDI images: each is refused with QEMU's words (or a clear error where QEMU would
//! misread the file), or read without a panic, a hang or an allocation proportional to a
//! number in the file.

use std::sync::Arc;
use vmimg::vdi::VdiCreate;
use vmimg::{ErrorKind, Format, ImageOpen, MemoryStorage, OpenOptions, Storage};

/// A dynamic VDI of `size` bytes made by vmimg, with one block written, as bytes.
async fn image(size: u64) -> Vec<u8> {
    let s: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    VdiCreate::new(size).create_on(s.as_ref()).await.unwrap();
    let img = ImageOpen::storage(Arc::clone(&s))
        .format(Format::VDI)
        .writable(true)
        .open()
        .await
        .unwrap();
    img.write(1 << 20, &[7u8; 4096]).await.unwrap();
    img.flush().await.unwrap();
    drop(img);
    let mut out = vec![0u8; s.size().unwrap() as usize];
    vmimg::StorageExt::read_at(s.as_ref(), 0, &mut out)
        .await
        .unwrap();
    out
}

/// The error of an open that must fail (without printing the image if it opened).
async fn refused(bytes: &[u8]) -> vmimg::Error {
    match open(bytes, false).await {
        Ok(_) => panic!("the image opened"),
        Err(e) => e,
    }
}

async fn open(bytes: &[u8], writable: bool) -> vmimg::Result<vmimg::Image> {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(bytes));
    ImageOpen::storage(storage)
        .format(Format::VDI)
        .options(OpenOptions::new().writable(writable))
        .open()
        .await
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[tokio::test]
async fn header_fields_qemu_refuses_are_refused_with_its_words() {
    let good = image(10 << 20).await;
    let cases: [(usize, u32, &str); 9] = [
        (
            0x40,
            0x1234_5678,
            "Image not in VDI format (bad signature 12345678)",
        ),
        (0x44, 0x0001_0000, "unsupported VDI image (version 1.0)"),
        (
            0x154,
            0x201,
            "unsupported VDI image (unaligned block map offset 0x201)",
        ),
        (
            0x158,
            0x401,
            "unsupported VDI image (unaligned data offset 0x401)",
        ),
        (
            0x168,
            4096,
            "unsupported VDI image (sector size 4096 is not 512)",
        ),
        (
            0x178,
            2 << 20,
            "unsupported VDI image (block size 2097152 is not 1048576)",
        ),
        (0x1a8, 1, "unsupported VDI image (non-NULL link UUID)"),
        (0x1b8, 1, "unsupported VDI image (non-NULL parent UUID)"),
        (
            0x17c,
            512,
            "unsupported VDI image (512 extra bytes per block)",
        ),
    ];
    for (at, value, words) in cases {
        let mut b = good.clone();
        put32(&mut b, at, value);
        let err = refused(&b).await;
        assert!(err.to_string().ends_with(words), "{at:#x}: {err}");
    }
    let mut b = good.clone();
    b[0x170..0x178].copy_from_slice(&(11u64 << 20).to_le_bytes());
    let err = refused(&b).await;
    assert!(
        err.to_string().ends_with(
            "unsupported VDI image (disk size 11534336, image bitmap has room for 10485760)"
        ),
        "{err}"
    );
}

/// A block map past the end of the file (or a count of blocks QEMU would read as 4 GiB of
/// map) is refused before anything that large is allocated.
#[tokio::test]
async fn block_maps_beyond_the_file_are_refused_without_allocating_them() {
    let good = image(10 << 20).await;
    for blocks in [300_000u32, 0x0100_0000, 0x3fff_ffff] {
        let mut b = good.clone();
        put32(&mut b, 0x180, blocks);
        let err = refused(&b).await;
        assert_eq!(err.kind(), ErrorKind::InvalidFormat, "{blocks}: {err}");
        assert!(err.to_string().contains("beyond the end"), "{err}");
    }
    let mut b = good.clone();
    put32(&mut b, 0x180, 0x4000_0000);
    let err = refused(&b).await;
    assert!(err.to_string().contains("too many blocks"), "{err}");
    let mut b = good;
    put32(&mut b, 0x154, 0xffff_fe00);
    refused(&b).await;
}

/// Block-map entries naming blocks far past the end read as zeros; a disk size that is not
/// a whole number of sectors is rounded up (as QEMU does).
#[tokio::test]
async fn entries_past_the_end_read_zeros_and_odd_sizes_round_up() {
    let mut b = image(10 << 20).await;
    put32(&mut b, 0x200 + 4 * 3, 0xffff_fff0);
    put32(&mut b, 0x200 + 4 * 4, 5000);
    b[0x170..0x178].copy_from_slice(&((10u64 << 20) - 100).to_le_bytes());
    let img = open(&b, false).await.unwrap();
    assert_eq!(img.size(), 10 << 20);
    let mut buf = vec![1u8; 2 << 20];
    img.read(3 << 20, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    let mut one = vec![0u8; 4096];
    img.read(1 << 20, &mut one).await.unwrap();
    assert!(one.iter().all(|&x| x == 7));
}

/// After a crash between the header's count and a block-map entry (the count lagging the
/// map), a new block still goes after every block in use.
#[tokio::test]
async fn a_lagging_block_count_never_hands_out_a_block_twice() {
    let mut b = image(10 << 20).await;
    put32(&mut b, 0x184, 0); // the count says nothing is allocated; block 1 uses index 0
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(&b));
    let img = ImageOpen::storage(Arc::clone(&storage))
        .format(Format::VDI)
        .writable(true)
        .open()
        .await
        .unwrap();
    img.write(5 << 20, &[9u8; 512]).await.unwrap();
    let mut old = vec![0u8; 4096];
    img.read(1 << 20, &mut old).await.unwrap();
    assert!(old.iter().all(|&x| x == 7), "the old block was overwritten");
    let mut new = vec![0u8; 512];
    img.read(5 << 20, &mut new).await.unwrap();
    assert!(new.iter().all(|&x| x == 9));
}

/// Random damage to the header and block map: errors are fine, panics and hangs are not.
#[tokio::test]
async fn random_mutations_never_panic() {
    let base = image(8 << 20).await;
    let mut rng = fastrand::Rng::with_seed(0x7d1);
    let mut opened = 0;
    for case in 0..1500 {
        let mut b = base.clone();
        for _ in 0..rng.usize(1..=4) {
            let at = rng.usize(0..1024.min(b.len()));
            match rng.u8(0..3) {
                0 => b[at] = rng.u8(..),
                1 => b[at] ^= 1 << rng.u8(0..8),
                _ => {
                    let v = [0u32, 1, 0xffff_ffff, 0xffff_fffe, 0x8000_0000][rng.usize(0..5)];
                    let at = at & !3;
                    if at + 4 <= b.len() {
                        put32(&mut b, at, v);
                    }
                }
            }
        }
        let writable = case % 3 == 0;
        let task = tokio::spawn(async move {
            let Ok(img) = open(&b, writable).await else {
                return false;
            };
            let size = img.size();
            let mut buf = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < size.min(16 << 20) {
                let n = (1u64 << 20).min(size - at) as usize;
                let _ = img.read(at, &mut buf[..n]).await;
                let _ = img.block_status(at, n as u64).await;
                at += n as u64;
            }
            if writable && size > 0 {
                let n = 4096.min(size - size / 2) as usize;
                let _ = img.write(size / 2, &vec![1u8; n]).await;
            }
            true
        });
        match tokio::time::timeout(std::time::Duration::from_secs(20), task).await {
            Err(_) => panic!("case {case} hung"),
            Ok(Err(e)) => panic!("case {case} panicked: {e}"),
            Ok(Ok(o)) => opened += usize::from(o),
        }
    }
    assert!(opened > 300, "only {opened} mutants opened");
}

/// Fuzzing found it: a disk size within 511 bytes of 2^64 overflowed its rounding up to a
/// sector (a panic with overflow checks); it is refused as too large for the block map.
#[tokio::test]
async fn fuzz_a_disk_size_near_2_to_the_64_is_refused() {
    let mut b = image(4 << 20).await;
    for size in [u64::MAX, u64::MAX - 510, u64::MAX - 511] {
        b[0x170..0x178].copy_from_slice(&size.to_le_bytes());
        let err = refused(&b).await;
        assert!(
            err.to_string().contains("image bitmap has room for"),
            "{err}"
        );
    }
}
