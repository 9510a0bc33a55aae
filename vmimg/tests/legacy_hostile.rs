//! Crafted images of the read-only legacy formats: each is refused with a clear error
//! (QEMU's words where QEMU has one), or read without a panic, a hang or an allocation
//! proportional to a number in the file.

use std::sync::Arc;
use vmimg::{Format, ImageOpen, ImplicitOpenPolicy, MemoryStorage, OpenOptions, Storage};

async fn open(bytes: &[u8], format: Format) -> vmimg::Result<vmimg::Image> {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(bytes));
    ImageOpen::storage(storage)
        .format(format)
        .options(OpenOptions::new().policy(ImplicitOpenPolicy::deny()))
        .open()
        .await
}

/// The error of an open that must fail.
async fn refused(bytes: &[u8], format: Format) -> vmimg::Error {
    match open(bytes, format).await {
        Ok(_) => panic!("the image opened"),
        Err(e) => e,
    }
}

/// Reads all of `img` (up to 16 MiB) with block status alongside; errors are fine.
async fn read_all(img: &vmimg::Image) {
    let size = img.size();
    let mut buf = vec![0u8; 256 << 10];
    let mut at = 0;
    while at < size.min(16 << 20) {
        let n = (buf.len() as u64).min(size - at) as usize;
        let _ = img.read(at, &mut buf[..n]).await;
        let _ = img.block_status(at, n as u64).await;
        at += n as u64;
    }
}

/// Applies 1500 random mutations to the first `limit` bytes of `base`, opening and reading
/// each: no panic, no hang.
async fn mutate_and_read(base: &[u8], format: Format, seed: u64, limit: usize) -> usize {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut opened = 0;
    for case in 0..1500 {
        let mut b = base.to_vec();
        for _ in 0..rng.usize(1..=4) {
            let at = rng.usize(0..limit.min(b.len()));
            match rng.u8(0..3) {
                0 => b[at] = rng.u8(..),
                1 => b[at] ^= 1 << rng.u8(0..8),
                _ => b[at] = [0u8, 0xff, 0x80, 1][rng.usize(0..4)],
            }
        }
        let task = tokio::spawn(async move {
            match open(&b, format).await {
                Ok(img) => {
                    read_all(&img).await;
                    true
                }
                Err(_) => false,
            }
        });
        match tokio::time::timeout(std::time::Duration::from_secs(20), task).await {
            Err(_) => panic!("case {case} hung"),
            Ok(Err(e)) => panic!("case {case} panicked: {e}"),
            Ok(Ok(o)) => opened += usize::from(o),
        }
    }
    opened
}

// --- qcow (version 1) ---

/// A qcow v1 image written from its documentation: `size` bytes, 4 KiB clusters, 512-entry
/// L2 tables, cluster 0 allocated with 0x5a bytes.
fn qcow1(size: u64) -> Vec<u8> {
    let mut b = vec![0u8; 3 * 4096];
    b[..4].copy_from_slice(b"QFI\xfb");
    b[4..8].copy_from_slice(&1u32.to_be_bytes());
    b[24..32].copy_from_slice(&size.to_be_bytes());
    b[32] = 12;
    b[33] = 9;
    b[40..48].copy_from_slice(&48u64.to_be_bytes());
    // L1[0] -> L2 at 4096; L2[0] -> cluster at 8192.
    b[48..56].copy_from_slice(&4096u64.to_be_bytes());
    b[4096..4104].copy_from_slice(&8192u64.to_be_bytes());
    b[8192..].fill(0x5a);
    b
}

#[tokio::test]
async fn qcow1_reads_a_documented_image() {
    let img = open(&qcow1(4 << 20), Format::QCOW).await.unwrap();
    let mut buf = vec![0u8; 8192];
    img.read(0, &mut buf).await.unwrap();
    assert!(buf[..4096].iter().all(|&x| x == 0x5a));
    assert!(buf[4096..].iter().all(|&x| x == 0));
}

#[tokio::test]
async fn qcow1_header_fields_qemu_refuses_are_refused_with_its_words() {
    let good = qcow1(4 << 20);
    let cases: [(usize, &[u8], &str); 8] = [
        (0, b"QFI\x00", "Image not in qcow format"),
        (4, &2u32.to_be_bytes(), "Unsupported qcow version 2"),
        (
            24,
            &1u64.to_be_bytes(),
            "Image size is too small (must be at least 2 bytes)",
        ),
        (32, &[8], "Cluster size must be between 512 and 64k"),
        (32, &[17], "Cluster size must be between 512 and 64k"),
        (33, &[14], "L2 table size must be between 512 and 64k"),
        (
            36,
            &2u32.to_be_bytes(),
            "invalid encryption method in qcow header",
        ),
        (24, &u64::MAX.to_be_bytes(), "Image too large"),
    ];
    for (at, bytes, words) in cases {
        let mut b = good.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        let err = refused(&b, Format::QCOW).await;
        assert!(err.to_string().ends_with(words), "{at}: {err}");
    }
}

/// Tables or names beyond the end of the file, and huge sizes, are refused before
/// anything of their size is allocated; entries pointing past the end read as zeros.
#[tokio::test]
async fn qcow1_tables_beyond_the_file_are_refused_without_allocating() {
    let mut b = qcow1(4 << 20);
    b[24..32].copy_from_slice(&(1u64 << 40).to_be_bytes());
    let err = refused(&b, Format::QCOW).await;
    assert!(err.to_string().contains("beyond the end"), "{err}");
    b[24..32].copy_from_slice(&(1u64 << 60).to_be_bytes());
    let err = refused(&b, Format::QCOW).await;
    assert!(err.to_string().ends_with("Image too large"), "{err}");
    let mut b = qcow1(4 << 20);
    b[40..48].copy_from_slice(&(u64::MAX - 4).to_be_bytes());
    refused(&b, Format::QCOW).await;
    let mut b = qcow1(4 << 20);
    b[8..16].copy_from_slice(&(1u64 << 40).to_be_bytes());
    b[16..20].copy_from_slice(&100u32.to_be_bytes());
    let err = refused(&b, Format::QCOW).await;
    assert!(err.to_string().contains("backing file name"), "{err}");
    let mut b = qcow1(4 << 20);
    b[16..20].copy_from_slice(&5000u32.to_be_bytes());
    b[8..16].copy_from_slice(&100u64.to_be_bytes());
    let err = refused(&b, Format::QCOW).await;
    assert!(
        err.to_string().ends_with("Backing file name too long"),
        "{err}"
    );
    // A cluster far past the end, and a compressed cluster of garbage.
    let mut b = qcow1(4 << 20);
    b[4104..4112].copy_from_slice(&(1u64 << 50).to_be_bytes());
    let garbage = (1u64 << 63) | (100u64 << 51) | 8192;
    b[4112..4120].copy_from_slice(&garbage.to_be_bytes());
    let img = open(&b, Format::QCOW).await.unwrap();
    let mut buf = vec![1u8; 4096];
    img.read(4096, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    assert!(img.read(8192, &mut buf).await.is_err());
}

#[tokio::test]
async fn qcow1_random_mutations_never_panic() {
    let opened = mutate_and_read(&qcow1(4 << 20), Format::QCOW, 0x9c01, 4200).await;
    assert!(opened > 200, "only {opened} mutants opened");
}

// --- bochs ---

/// A minimal Bochs growing image: 4 extents of 4 KiB, extent 0 stored with every sector.
fn bochs() -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[..22].copy_from_slice(b"Bochs Virtual HD Image");
    b[32..39].copy_from_slice(b"Redolog");
    b[48..55].copy_from_slice(b"Growing");
    b[64..68].copy_from_slice(&0x0002_0000u32.to_le_bytes());
    b[68..72].copy_from_slice(&512u32.to_le_bytes());
    b[72..76].copy_from_slice(&4u32.to_le_bytes());
    b[76..80].copy_from_slice(&512u32.to_le_bytes());
    b[80..84].copy_from_slice(&4096u32.to_le_bytes());
    b[88..96].copy_from_slice(&(16u64 << 10).to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b.extend([0xffu8; 12]);
    let mut bitmap = vec![0u8; 512];
    bitmap[0] = 0xff;
    b.extend(bitmap);
    b.extend([0x42u8; 4096]);
    b
}

#[tokio::test]
async fn bochs_headers_qemu_refuses_are_refused_with_its_words() {
    let img = open(&bochs(), Format::BOCHS).await.unwrap();
    let mut buf = vec![0u8; 8192];
    img.read(0, &mut buf).await.unwrap();
    assert!(buf[..4096].iter().all(|&x| x == 0x42) && buf[4096..].iter().all(|&x| x == 0));
    let cases: [(usize, u32, &str); 6] = [
        (64, 0x0003_0000, "Image not in Bochs format"),
        (72, 0x0010_0001, "Catalog size is too large"),
        (80, 256, "Extent size must be at least 512"),
        (80, 3000, "Extent size 3000 is not a power of two"),
        (80, 0x0100_0000, "Extent size 16777216 is too large"),
        (72, 2, "Catalog size is too small for this disk size"),
    ];
    for (at, v, words) in cases {
        let mut b = bochs();
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let err = refused(&b, Format::BOCHS).await;
        assert!(err.to_string().ends_with(words), "{at}: {err}");
    }
    // A catalog entry naming an extent far past the end reads zeros.
    let mut b = bochs();
    b[512..516].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
    let img = open(&b, Format::BOCHS).await.unwrap();
    let mut one = vec![1u8; 4096];
    img.read(0, &mut one).await.unwrap();
    assert!(one.iter().all(|&x| x == 0));
}

#[tokio::test]
async fn bochs_random_mutations_never_panic() {
    let opened = mutate_and_read(&bochs(), Format::BOCHS, 0xb0c5, 1100).await;
    assert!(opened > 200, "only {opened} mutants opened");
}

// --- cloop ---

/// A minimal cloop image: two 512-byte blocks stored as zlib streams of zeros and 0x33.
fn cloop() -> Vec<u8> {
    let script =
        b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
    let mut b = script.to_vec();
    b.resize(128, 0);
    b.extend(512u32.to_be_bytes());
    b.extend(2u32.to_be_bytes());
    // Stored (uncompressed) deflate blocks inside zlib wrappers, written by hand: header
    // 78 01, a final stored block of 512 bytes, the Adler-32 of the data.
    let stored = |byte: u8| {
        let mut s = vec![0x78, 0x01, 0x01, 0x00, 0x02, 0xff, 0xfd];
        s.extend([byte; 512]);
        let (mut a, mut b2) = (1u32, 0u32);
        for _ in 0..512 {
            a = (a + u32::from(byte)) % 65521;
            b2 = (b2 + a) % 65521;
        }
        s.extend(((b2 << 16) | a).to_be_bytes());
        s
    };
    let (z0, z1) = (stored(0), stored(0x33));
    let start = 136 + 3 * 8;
    for o in [start, start + z0.len(), start + z0.len() + z1.len()] {
        b.extend((o as u64).to_be_bytes());
    }
    b.extend(z0);
    b.extend(z1);
    b
}

#[tokio::test]
async fn cloop_headers_qemu_refuses_are_refused_with_its_words() {
    let img = open(&cloop(), Format::CLOOP).await.unwrap();
    let mut buf = vec![0u8; 1024];
    img.read(0, &mut buf).await.unwrap();
    assert!(buf[..512].iter().all(|&x| x == 0) && buf[512..].iter().all(|&x| x == 0x33));
    let cases: [(usize, u32, &str); 5] = [
        (128, 1000, "block_size 1000 must be a multiple of 512"),
        (128, 0, "block_size cannot be zero"),
        (128, 128 << 20, "block_size 134217728 must be 64 MB or less"),
        (
            132,
            0x2000_0000,
            "n_blocks 536870912 must be 536870911 or less",
        ),
        (
            132,
            0x1000_0000,
            "image requires too many offsets, try increasing block size",
        ),
    ];
    for (at, v, words) in cases {
        let mut b = cloop();
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let err = refused(&b, Format::CLOOP).await;
        assert!(err.to_string().ends_with(words), "{at}: {err}");
    }
    let mut b = cloop();
    b[144..152].copy_from_slice(&10u64.to_be_bytes());
    let err = refused(&b, Format::CLOOP).await;
    assert!(
        err.to_string()
            .contains("not monotonically increasing at index 1"),
        "{err}"
    );
    let mut b = cloop();
    b[152..160].copy_from_slice(&(1u64 << 40).to_be_bytes());
    let err = refused(&b, Format::CLOOP).await;
    assert!(
        err.to_string()
            .contains("invalid compressed block size at index 2"),
        "{err}"
    );
    // A block of garbage fails its read only.
    let mut b = cloop();
    let n = b.len();
    b[n - 300] ^= 0xff;
    let img = open(&b, Format::CLOOP).await.unwrap();
    assert!(img.read(0, &mut buf[..512]).await.is_ok());
    assert!(img.read(512, &mut buf[..512]).await.is_err());
}

#[tokio::test]
async fn cloop_random_mutations_never_panic() {
    let opened = mutate_and_read(&cloop(), Format::CLOOP, 0xc100, 1200).await;
    assert!(opened > 200, "only {opened} mutants opened");
}
