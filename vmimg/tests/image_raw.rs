//! The [`Image`] access handle over raw images: files (buffered and `O_DIRECT`) and memory.
//!
//! The model tests drive random unaligned writes, zeroings, discards and reads against a
//! `Vec<u8>` model with a fixed seed; on `O_DIRECT` files every unaligned request goes
//! through the handle's bounce buffers and read-modify-write, which the concurrency test
//! also stresses with writers whose byte ranges share alignment blocks.

use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fastrand::Rng;
use tempfile::TempDir;
use vmimg::{
    BlockStatusKind, BlockingImage, DiscardMode, ErrorKind, Format, Image, ImageOpen,
    MemoryStorage, OpenOptions, PreallocMode, RawCreate, RawOpen, Storage,
};

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// An open raw image and what it lives in.
struct Fixture {
    image: Image,
    /// The image file, for file-backed fixtures.
    path: Option<PathBuf>,
    /// The storage, for memory-backed fixtures.
    memory: Option<Arc<MemoryStorage>>,
    _dir: Option<TempDir>,
}

impl Fixture {
    /// The whole medium as another reader sees it.
    fn medium(&self) -> Vec<u8> {
        match (&self.path, &self.memory) {
            (Some(p), _) => std::fs::read(p).unwrap(),
            (None, Some(m)) => m.to_vec(),
            (None, None) => unreachable!(),
        }
    }
}

const FILE_NAME: &str = "disk.raw";

async fn memory_raw(size: u64) -> Fixture {
    let storage = Arc::new(MemoryStorage::new());
    RawCreate::new(size)
        .create_on(storage.as_ref())
        .await
        .unwrap();
    let image = RawOpen::storage(storage.clone())
        .writable(true)
        .open()
        .await
        .unwrap();
    Fixture {
        image,
        path: None,
        memory: Some(storage),
        _dir: None,
    }
}

async fn buffered_raw(size: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    RawCreate::new(size).create(&path).await.unwrap();
    let image = RawOpen::path(&path).writable(true).open().await.unwrap();
    assert_eq!(image.driver().storage().request_align(), 1);
    Fixture {
        image,
        path: Some(path),
        memory: None,
        _dir: Some(dir),
    }
}

/// A raw file opened with `O_DIRECT`, in the first directory whose file system supports it.
/// Fails (does not skip) when none does.
async fn direct_raw(size: u64) -> Fixture {
    let candidates = [
        std::env::temp_dir(),
        PathBuf::from("/var/tmp"),
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
    ];
    let mut tried = Vec::new();
    for base in candidates {
        let Ok(dir) = tempfile::tempdir_in(&base) else {
            tried.push(format!("{}: cannot create a directory", base.display()));
            continue;
        };
        let path = dir.path().join(FILE_NAME);
        RawCreate::new(size).create(&path).await.unwrap();
        match RawOpen::path(&path)
            .writable(true)
            .direct(true)
            .open()
            .await
        {
            Ok(image) => {
                let align = image.driver().storage().request_align();
                assert!(align >= 512, "O_DIRECT image reports request_align {align}");
                return Fixture {
                    image,
                    path: Some(path),
                    memory: None,
                    _dir: Some(dir),
                };
            }
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                tried.push(format!("{}: {e}", base.display()));
            }
            Err(e) => panic!("opening {} with O_DIRECT: {e:?}", path.display()),
        }
    }
    panic!("no directory supports O_DIRECT; tried: {tried:#?}");
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Position-dependent bytes, different for every `seed`.
fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|p| {
            let x = (p ^ seed.rotate_left(29).wrapping_mul(0xA24B_AED4_963E_E407))
                .wrapping_mul(0x9E37_79B9_7F4A_7C15);
            (x >> 56) as u8
        })
        .collect()
}

#[track_caller]
fn assert_bytes(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(i) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        let end = (i + 16).min(actual.len());
        panic!(
            "{what}: first difference at byte {i} (of {}): got {:02x?}, expected {:02x?}",
            actual.len(),
            &actual[i..end],
            &expected[i..end]
        );
    }
}

#[track_caller]
fn assert_kind<T: std::fmt::Debug>(r: vmimg::Result<T>, kind: ErrorKind, what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected {kind:?}, got Ok({v:?})"),
        Err(e) => assert_eq!(e.kind(), kind, "{what}: wrong error kind: {e:?}"),
    }
}

async fn read_vec(img: &Image, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xa5u8; len];
    img.read(offset, &mut buf)
        .await
        .unwrap_or_else(|e| panic!("read of {len} bytes at {offset}: {e:?}"));
    buf
}

/// Random cut points in `0..=len`, sorted; duplicates make empty slices on purpose.
fn random_cuts(rng: &mut Rng, len: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = (0..rng.usize(0..4)).map(|_| rng.usize(0..=len)).collect();
    cuts.sort_unstable();
    cuts
}

fn slices_at<'a>(buf: &'a [u8], cuts: &[usize]) -> Vec<IoSlice<'a>> {
    let mut out = Vec::new();
    let mut prev = 0;
    for &c in cuts.iter().chain([&buf.len()]) {
        out.push(IoSlice::new(&buf[prev..c]));
        prev = c;
    }
    out
}

fn slices_at_mut<'a>(mut buf: &'a mut [u8], cuts: &[usize]) -> Vec<IoSliceMut<'a>> {
    let mut out = Vec::new();
    let mut prev = 0;
    for &c in cuts {
        let (head, rest) = buf.split_at_mut(c - prev);
        out.push(IoSliceMut::new(head));
        buf = rest;
        prev = c;
    }
    out.push(IoSliceMut::new(buf));
    out
}

/// A random range inside `[0, size)`: odd lengths from 1 byte to 40 KB, often at or next to
/// a 512-byte boundary or touching the end of the image.
fn random_range(rng: &mut Rng, size: usize) -> (usize, usize) {
    let len = match rng.u32(0..4) {
        0 => rng.usize(1..=16),
        1 => rng.usize(1..=700),
        2 => rng.usize(1..=9000),
        _ => rng.usize(1..=40_000),
    }
    .min(size);
    let off = match rng.u32(0..4) {
        0 => (rng.usize(0..=size / 512) * 512).saturating_add_signed(rng.isize(-3..=3)),
        1 => size - len,
        _ => rng.usize(0..=size - len),
    };
    (off.min(size - len), len)
}

// ---------------------------------------------------------------------------------------------
// Model tests
// ---------------------------------------------------------------------------------------------

const MODEL_SIZE: u64 = 192 << 10;
const MODEL_OPS: usize = 300;

/// Runs random operations on a fresh (all-zero) image and a `Vec<u8>` model side by side,
/// comparing every read; returns the model.
async fn run_model(img: &Image, seed: u64) -> Vec<u8> {
    let size = img.size() as usize;
    let mut model = vec![0u8; size];
    assert_bytes(&read_vec(img, 0, size).await, &model, "fresh image");
    let mut rng = Rng::with_seed(seed);
    let mut counts = [0usize; 4];
    for i in 0..MODEL_OPS {
        let (off, len) = random_range(&mut rng, size);
        let what = |op: &str| format!("op {i}: {op} of {len} bytes at {off} (seed {seed})");
        match rng.u32(0..10) {
            0..=3 => {
                let mut data = vec![0u8; len];
                rng.fill(&mut data);
                if rng.bool() {
                    img.write(off as u64, &data).await
                } else {
                    let cuts = random_cuts(&mut rng, len);
                    img.writev(off as u64, &slices_at(&data, &cuts)).await
                }
                .unwrap_or_else(|e| panic!("{}: {e:?}", what("write")));
                model[off..off + len].copy_from_slice(&data);
                counts[0] += 1;
            }
            4 => {
                let unmap = rng.bool();
                img.write_zeroes(off as u64, len as u64, unmap)
                    .await
                    .unwrap_or_else(|e| panic!("{}: {e:?}", what("write_zeroes")));
                model[off..off + len].fill(0);
                counts[1] += 1;
            }
            5 => {
                img.discard(off as u64, len as u64, DiscardMode::ReadsZero)
                    .await
                    .unwrap_or_else(|e| panic!("{}: {e:?}", what("discard")));
                model[off..off + len].fill(0);
                counts[2] += 1;
            }
            _ => {
                let mut buf = vec![0xa5u8; len];
                if rng.bool() {
                    img.read(off as u64, &mut buf).await
                } else {
                    let cuts = random_cuts(&mut rng, len);
                    img.readv(off as u64, &mut slices_at_mut(&mut buf, &cuts))
                        .await
                }
                .unwrap_or_else(|e| panic!("{}: {e:?}", what("read")));
                assert_bytes(&buf, &model[off..off + len], &what("read"));
                counts[3] += 1;
            }
        }
        if i % 50 == 49 {
            let all = read_vec(img, 0, size).await;
            assert_bytes(&all, &model, &format!("whole image after op {i}"));
        }
    }
    assert!(
        counts.iter().all(|&c| c >= 10),
        "every kind of operation ran: {counts:?}"
    );
    assert_bytes(
        &read_vec(img, 0, size).await,
        &model,
        "whole image at the end",
    );
    assert_eq!(img.size(), size as u64, "the size never changes");
    img.flush().await.unwrap();
    model
}

async fn model_test(f: Fixture, seed: u64) {
    let model = run_model(&f.image, seed).await;
    assert_bytes(&f.medium(), &model, "the medium after flush");
}

#[tokio::test]
async fn direct_file_unaligned_ops_match_model() {
    model_test(direct_raw(MODEL_SIZE).await, 0x5eed_0001).await;
}

#[tokio::test]
async fn buffered_file_unaligned_ops_match_model() {
    model_test(buffered_raw(MODEL_SIZE).await, 0x5eed_0002).await;
}

#[tokio::test]
async fn memory_unaligned_ops_match_model() {
    model_test(memory_raw(MODEL_SIZE).await, 0x5eed_0003).await;
}

// ---------------------------------------------------------------------------------------------
// Vectored I/O
// ---------------------------------------------------------------------------------------------

async fn vectored_roundtrip(f: Fixture) {
    let img = &f.image;
    let size = img.size() as usize;
    // Unaligned start, uneven slices (one empty), several alignment blocks.
    let off = 4095usize;
    let data = pattern(1, off as u64, 3 + 5000 + 1 + 4092 + 7);
    let cuts = [3, 5003, 5003, 5004, 9096];
    img.writev(off as u64, &slices_at(&data, &cuts))
        .await
        .unwrap();
    let mut model = vec![0u8; size];
    model[off..off + data.len()].copy_from_slice(&data);

    // Aligned start and total length, unaligned slices.
    let off2 = 32768usize;
    let data2 = pattern(2, off2 as u64, 8192);
    img.writev(off2 as u64, &slices_at(&data2, &[1, 4097, 4098]))
        .await
        .unwrap();
    model[off2..off2 + data2.len()].copy_from_slice(&data2);

    // Read back with different splits, straddling both writes and the zeros around them.
    let start = 4000usize;
    let mut buf = vec![0xeeu8; off2 + 8192 + 100 - start];
    let len = buf.len();
    img.readv(
        start as u64,
        &mut slices_at_mut(&mut buf, &[1, 96, 4097, 4097, 20_000, len - 1]),
    )
    .await
    .unwrap();
    assert_bytes(&buf, &model[start..start + len], "vectored read-back");
    assert_bytes(&read_vec(img, 0, size).await, &model, "whole image");

    // A vectored read with a single empty slice is fine, at any offset inside the image.
    img.readv(size as u64, &mut [IoSliceMut::new(&mut [])])
        .await
        .unwrap();
    img.flush().await.unwrap();
    assert_bytes(&f.medium(), &model, "medium");
}

#[tokio::test]
async fn direct_file_vectored_io_roundtrips() {
    vectored_roundtrip(direct_raw(64 << 10).await).await;
}

#[tokio::test]
async fn memory_vectored_io_roundtrips() {
    vectored_roundtrip(memory_raw(64 << 10).await).await;
}

// ---------------------------------------------------------------------------------------------
// Block status
// ---------------------------------------------------------------------------------------------

async fn block_status_on_sparse_file(f: Fixture) {
    const MIB: u64 = 1 << 20;
    let img = &f.image;
    assert_eq!(img.size(), 4 * MIB);
    img.write(MIB, &pattern(3, MIB, 64 << 10)).await.unwrap();
    img.flush().await.unwrap();

    // A new file's first block is written, as QEMU's file driver writes it.
    let st = img.block_status(0, 4 * MIB).await.unwrap();
    assert_eq!(
        (st.offset, st.len, st.depth, st.kind),
        (0, 4096, 0, BlockStatusKind::Data { host_offset: 0 }),
        "the first block"
    );
    let st = img.block_status(4096, 4 * MIB - 4096).await.unwrap();
    assert_eq!(
        (st.offset, st.len, st.depth, st.kind),
        (
            4096,
            MIB - 4096,
            0,
            BlockStatusKind::Zero {
                host_offset: Some(4096)
            }
        ),
        "the hole before the data"
    );
    assert!(st.zero() && st.present());

    let st = img.block_status(MIB, 3 * MIB).await.unwrap();
    assert_eq!(
        (st.offset, st.len, st.depth, st.kind),
        (MIB, 64 << 10, 0, BlockStatusKind::Data { host_offset: MIB }),
        "the written data"
    );
    assert!(!st.zero() && st.present());

    let st = img.block_status(MIB + 4096, 100).await.unwrap();
    assert_eq!(
        (st.len, st.kind),
        (
            100,
            BlockStatusKind::Data {
                host_offset: MIB + 4096
            }
        ),
        "length is bounded by the query"
    );

    let rest = 3 * MIB - (64 << 10);
    let st = img.block_status(MIB + (64 << 10), rest).await.unwrap();
    assert_eq!(
        (st.len, st.kind),
        (
            rest,
            BlockStatusKind::Zero {
                host_offset: Some(MIB + (64 << 10))
            }
        ),
        "the tail"
    );

    // Punching the data out turns it back into a hole.
    img.write_zeroes(MIB, 64 << 10, true).await.unwrap();
    let st = img.block_status(4096, 4 * MIB - 4096).await.unwrap();
    assert_eq!(
        (st.len, st.kind),
        (
            4 * MIB - 4096,
            BlockStatusKind::Zero {
                host_offset: Some(4096)
            }
        ),
        "after unmap"
    );

    assert_kind(
        img.block_status(0, 0).await,
        ErrorKind::InvalidArgument,
        "empty range",
    );
    img.flush().await.unwrap();
}

#[tokio::test]
async fn buffered_file_block_status_reports_holes_and_data() {
    block_status_on_sparse_file(buffered_raw(4 << 20).await).await;
}

#[tokio::test]
async fn direct_file_block_status_reports_holes_and_data() {
    block_status_on_sparse_file(direct_raw(4 << 20).await).await;
}

// ---------------------------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn backing_image_or_data_file_on_raw_is_unsupported() {
    let mem = || -> Arc<dyn Storage> { Arc::new(MemoryStorage::with_size(64 << 10)) };
    let backing = || async { RawOpen::storage(mem()).open().await.unwrap() };

    let r = RawOpen::storage(mem())
        .options(OpenOptions::new().backing(backing().await))
        .open()
        .await;
    assert_kind(r, ErrorKind::Unsupported, "raw with a backing image");
    let r = RawOpen::storage(mem())
        .options(OpenOptions::new().writable(true).data_file(mem()))
        .open()
        .await;
    assert_kind(r, ErrorKind::Unsupported, "raw with a data file");
    let r = ImageOpen::storage(mem())
        .format(Format::RAW)
        .options(OpenOptions::new().backing(backing().await))
        .open()
        .await;
    assert_kind(
        r,
        ErrorKind::Unsupported,
        "ImageOpen raw with a backing image",
    );

    let f = buffered_raw(64 << 10).await;
    let path = f.path.clone().unwrap();
    let r = RawOpen::path(&path)
        .options(OpenOptions::new().data_file(mem()))
        .open()
        .await;
    assert_kind(r, ErrorKind::Unsupported, "raw file with a data file");
    let r = RawOpen::path(&path)
        .options(OpenOptions::new().writable(true).backing(backing().await))
        .open()
        .await;
    assert_kind(r, ErrorKind::Unsupported, "raw file with a backing image");
    f.image.flush().await.unwrap();
}

/// Every kind of write on a read-only image fails with ReadOnly and changes nothing.
async fn assert_refuses_writes(img: &Image, what: &str) {
    assert!(!img.is_writable(), "{what}: is_writable");
    let size = img.size();
    let before = read_vec(img, 0, size as usize).await;
    let w = |op: &str| format!("{what}: {op}");
    assert_kind(img.write(1, b"x").await, ErrorKind::ReadOnly, &w("write"));
    assert_kind(
        img.write(0, &[1u8; 4096]).await,
        ErrorKind::ReadOnly,
        &w("aligned write"),
    );
    assert_kind(
        img.writev(3, &[IoSlice::new(b"ab"), IoSlice::new(b"c")])
            .await,
        ErrorKind::ReadOnly,
        &w("writev"),
    );
    assert_kind(
        img.write_zeroes(0, 4096, true).await,
        ErrorKind::ReadOnly,
        &w("write_zeroes"),
    );
    assert_kind(
        img.discard(0, 4096, DiscardMode::ReadsZero).await,
        ErrorKind::ReadOnly,
        &w("discard"),
    );
    assert_kind(
        img.resize(2 * size, PreallocMode::Off).await,
        ErrorKind::ReadOnly,
        &w("resize"),
    );
    assert_eq!(img.size(), size, "{what}: size");
    assert_bytes(&read_vec(img, 0, size as usize).await, &before, what);
}

#[tokio::test]
async fn writing_a_read_only_image_fails_with_read_only() {
    const SIZE: u64 = 64 << 10;
    let f = buffered_raw(SIZE).await;
    let content = pattern(4, 0, SIZE as usize);
    f.image.write(0, &content).await.unwrap();
    f.image.flush().await.unwrap();
    let path = f.path.clone().unwrap();

    let ro = RawOpen::path(&path).open().await.unwrap();
    assert_refuses_writes(&ro, "file opened read-only").await;
    let ro_direct = match RawOpen::path(&path).direct(true).open().await {
        Ok(img) => img,
        // The directory of `f` may not do O_DIRECT; the refusal is checked above anyway.
        Err(e) if e.kind() == ErrorKind::Unsupported => ro.clone(),
        Err(e) => panic!("{e:?}"),
    };
    assert_refuses_writes(&ro_direct, "file opened read-only with O_DIRECT").await;
    assert_bytes(&std::fs::read(&path).unwrap(), &content, "file");

    // A writable storage opened read-only.
    let mem = Arc::new(MemoryStorage::from_bytes(&content));
    let img = RawOpen::storage(mem.clone()).open().await.unwrap();
    assert_refuses_writes(&img, "memory opened read-only").await;
    assert_eq!(mem.to_vec(), content);

    // A read-only storage: opening it writable fails, opening it read-only refuses writes.
    let ro_mem: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(&content).into_read_only());
    assert_kind(
        RawOpen::storage(ro_mem.clone()).writable(true).open().await,
        ErrorKind::ReadOnly,
        "opening a read-only storage writable",
    );
    let img = RawOpen::storage(ro_mem).open().await.unwrap();
    assert_refuses_writes(&img, "read-only memory").await;
}

async fn out_of_range(f: Fixture) {
    let img = &f.image;
    let size = img.size();
    img.write(size - 1, b"z").await.unwrap();
    let mut two = [0u8; 2];
    let mut one = [0u8; 1];
    assert_kind(
        img.read(size - 1, &mut two).await,
        ErrorKind::OutOfBounds,
        "read across the end",
    );
    assert_kind(
        img.read(size, &mut one).await,
        ErrorKind::OutOfBounds,
        "read at the end",
    );
    assert_kind(
        img.read(size + 4096, &mut one).await,
        ErrorKind::OutOfBounds,
        "read past the end",
    );
    assert_kind(
        img.read(u64::MAX, &mut one).await,
        ErrorKind::OutOfBounds,
        "read whose end overflows",
    );
    assert_kind(
        img.readv(
            size - 4096,
            &mut [IoSliceMut::new(&mut [0u8; 4096]), IoSliceMut::new(&mut one)],
        )
        .await,
        ErrorKind::OutOfBounds,
        "readv across the end",
    );
    assert_kind(
        img.write(size - 1, b"ab").await,
        ErrorKind::OutOfBounds,
        "write across the end",
    );
    assert_kind(
        img.write_zeroes(size - 4096, 8192, false).await,
        ErrorKind::OutOfBounds,
        "write_zeroes across the end",
    );
    assert_kind(
        img.discard(size, 1, DiscardMode::ReadsZero).await,
        ErrorKind::OutOfBounds,
        "discard past the end",
    );
    assert_kind(
        img.block_status(size, 1).await,
        ErrorKind::OutOfBounds,
        "block_status past the end",
    );
    // Nothing was changed, and the bounds are exact.
    img.read(size, &mut []).await.unwrap();
    img.read(size - 1, &mut one).await.unwrap();
    assert_eq!(one, *b"z", "the last byte after refused writes");
    assert_eq!(img.size(), size);
    img.flush().await.unwrap();
    let medium = f.medium();
    assert_eq!(medium.len() as u64, size, "medium grew");
    assert_eq!(medium[size as usize - 1], b'z');
}

#[tokio::test]
async fn direct_file_out_of_range_requests_fail_with_out_of_bounds() {
    out_of_range(direct_raw(64 << 10).await).await;
}

#[tokio::test]
async fn memory_out_of_range_requests_fail_with_out_of_bounds() {
    out_of_range(memory_raw(64 << 10).await).await;
}

// ---------------------------------------------------------------------------------------------
// Resize
// ---------------------------------------------------------------------------------------------

async fn resize_grows_and_shrinks(f: Fixture) {
    const K: u64 = 1024;
    let img = &f.image;
    let medium_len = |f: &Fixture| f.medium().len() as u64;
    let first = pattern(5, 0, 64 * K as usize);
    img.write(0, &first).await.unwrap();

    img.resize(256 * K, PreallocMode::Off).await.unwrap();
    assert_eq!(img.size(), 256 * K);
    assert_eq!(medium_len(&f), 256 * K);
    let got = read_vec(img, 0, 256 * K as usize).await;
    assert_bytes(&got[..64 * K as usize], &first, "old data after growing");
    assert_bytes(
        &got[64 * K as usize..],
        &vec![0; 192 * K as usize],
        "grown part",
    );

    // The new space takes unaligned writes.
    let late = pattern(6, 200 * K + 1, 5001);
    img.write(200 * K + 1, &late).await.unwrap();
    assert_bytes(
        &read_vec(img, 200 * K + 1, 5001).await,
        &late,
        "write in the new part",
    );

    img.resize(32 * K, PreallocMode::Off).await.unwrap();
    assert_eq!(img.size(), 32 * K);
    assert_eq!(medium_len(&f), 32 * K);
    assert_kind(
        img.read(32 * K - 1, &mut [0u8; 2]).await,
        ErrorKind::OutOfBounds,
        "read past the shrunk end",
    );
    assert_bytes(
        &read_vec(img, 0, 32 * K as usize).await,
        &first[..32 * K as usize],
        "kept data after shrinking",
    );

    img.resize(128 * K, PreallocMode::Full).await.unwrap();
    assert_eq!(img.size(), 128 * K);
    let got = read_vec(img, 0, 128 * K as usize).await;
    assert_bytes(
        &got[..32 * K as usize],
        &first[..32 * K as usize],
        "kept data",
    );
    assert_bytes(
        &got[32 * K as usize..],
        &vec![0; 96 * K as usize],
        "regrown part reads zeros, not the old data",
    );

    let align = img.driver().storage().request_align() as u64;
    if align > 1 {
        assert_kind(
            img.resize(128 * K + align / 2, PreallocMode::Off).await,
            ErrorKind::InvalidArgument,
            "resize to an unaligned size",
        );
        assert_eq!(img.size(), 128 * K);
    }
    img.flush().await.unwrap();
    assert_eq!(medium_len(&f), 128 * K);
}

#[tokio::test]
async fn direct_file_resize_grows_and_shrinks() {
    resize_grows_and_shrinks(direct_raw(64 << 10).await).await;
}

#[tokio::test]
async fn buffered_file_resize_grows_and_shrinks() {
    resize_grows_and_shrinks(buffered_raw(64 << 10).await).await;
}

#[tokio::test]
async fn memory_resize_grows_and_shrinks() {
    resize_grows_and_shrinks(memory_raw(64 << 10).await).await;
}

// ---------------------------------------------------------------------------------------------
// BlockingImage, outside any runtime
// ---------------------------------------------------------------------------------------------

#[test]
fn blocking_image_works_without_a_runtime() {
    assert!(
        tokio::runtime::Handle::try_current().is_err(),
        "this test must run outside a runtime"
    );
    const SIZE: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();

    let img =
        BlockingImage::open(ImageOpen::path(&path).format(Format::RAW).writable(true)).unwrap();
    assert_eq!(img.size(), SIZE);
    assert_eq!(img.image().format(), Format::RAW);
    img.write(12_345, b"blocking hello").unwrap();
    let mut buf = [0u8; 16];
    img.read(12_344, &mut buf).unwrap();
    assert_eq!(&buf, b"\0blocking hello\0");

    img.write_zeroes(12_345, 5, false).unwrap();
    img.discard(12_354, 2, DiscardMode::ReadsZero).unwrap();
    img.read(12_344, &mut buf).unwrap();
    assert_eq!(&buf, b"\0\0\0\0\0\0ing \0\0llo\0");

    let st = img.block_status(0, 8192).unwrap();
    assert_eq!(
        (st.len, st.kind),
        (
            8192,
            BlockStatusKind::Zero {
                host_offset: Some(0)
            }
        )
    );
    let st = img.block_status(12_288, 100).unwrap();
    assert_eq!(
        st.kind,
        BlockStatusKind::Data {
            host_offset: 12_288
        }
    );

    img.resize(2 * SIZE, PreallocMode::Off).unwrap();
    assert_eq!(img.size(), 2 * SIZE);
    img.write(2 * SIZE - 3, b"end").unwrap();
    img.flush().unwrap();
    img.sync().unwrap();
    drop(img);

    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(on_disk.len() as u64, 2 * SIZE);
    assert_eq!(&on_disk[12_344..12_360], b"\0\0\0\0\0\0ing \0\0llo\0");
    assert_eq!(&on_disk[2 * SIZE as usize - 3..], b"end");

    // Reopened read-only: reads work, writes are refused.
    let ro = BlockingImage::open(ImageOpen::path(&path).format(Format::RAW)).unwrap();
    let mut end = [0u8; 3];
    ro.read(2 * SIZE - 3, &mut end).unwrap();
    assert_eq!(&end, b"end");
    assert_kind(ro.write(0, b"x"), ErrorKind::ReadOnly, "blocking write");
}

// ---------------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------------

/// A byte range of the image and the task that writes it (`None`: nobody, stays zero).
#[derive(Clone, Copy, Debug)]
struct Segment {
    offset: u64,
    len: usize,
    owner: Option<usize>,
}

fn segment_bytes(seg: &Segment, owner: usize, round: u64) -> Vec<u8> {
    pattern(owner as u64 * 2 + round, seg.offset, seg.len)
}

/// 32 tasks write disjoint byte ranges of an O_DIRECT image at once, twice each. Ranges are
/// mostly unaligned and neighbouring ranges belong to different tasks, so most alignment
/// blocks are shared and read-modify-write must serialise; some ranges are whole aligned
/// blocks (taking the aligned path concurrently). Every task's bytes must survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_unaligned_writes_sharing_blocks_on_direct_image() {
    const TASKS: usize = 32;
    const SIZE: u64 = 256 << 10;
    let f = direct_raw(SIZE).await;
    let align = f.image.driver().storage().request_align() as u64;

    let mut rng = Rng::with_seed(0xc0c0);
    let mut segs = Vec::new();
    let mut prev = None;
    let mut pos = 0;
    let mut want_aligned = false;
    let mut queue: Vec<usize> = Vec::new();
    while pos < SIZE {
        // Now and then: run up to a 4 KiB boundary, then write whole 4 KiB blocks.
        let len = if pos % 4096 == 0 && want_aligned {
            want_aligned = false;
            4096 * rng.u64(1..=2)
        } else if rng.u32(0..8) == 0 {
            want_aligned = true;
            4096 - pos % 4096
        } else {
            rng.u64(1..=1500)
        }
        .min(SIZE - pos);
        // Owners come from shuffled rounds of all tasks (so every task gets its share), and
        // two neighbouring ranges never have the same owner.
        let owner = if rng.u32(0..12) == 0 {
            None
        } else {
            if queue.is_empty() {
                queue.extend(0..TASKS);
                rng.shuffle(&mut queue);
                if queue.last().copied() == prev {
                    queue.swap(0, TASKS - 1);
                }
            }
            queue.pop()
        };
        segs.push(Segment {
            offset: pos,
            len: len as usize,
            owner,
        });
        prev = owner;
        pos += len;
    }
    let block_of = |o: u64| o / align;
    let shared = segs
        .windows(2)
        .filter(|w| {
            w[0].owner.is_some()
                && w[1].owner.is_some()
                && block_of(w[0].offset + w[0].len as u64 - 1) == block_of(w[1].offset)
        })
        .count();
    assert!(shared >= 100, "only {shared} blocks shared by two writers");
    let aligned = segs
        .iter()
        .filter(|s| s.owner.is_some() && s.offset % align == 0 && s.len as u64 % align == 0)
        .count();
    assert!(aligned >= 10, "only {aligned} aligned writes");

    for t in 0..TASKS {
        let n = segs.iter().filter(|s| s.owner == Some(t)).count();
        assert!(n >= 3, "task {t} owns only {n} ranges");
    }

    let segs = Arc::new(segs);
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let img = f.image.clone();
        let segs = Arc::clone(&segs);
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            let mut mine: Vec<Segment> = segs
                .iter()
                .filter(|s| s.owner == Some(t))
                .copied()
                .collect();
            let mut rng = Rng::with_seed(t as u64);
            barrier.wait().await;
            for round in 0..2 {
                rng.shuffle(&mut mine);
                for seg in &mine {
                    img.write(seg.offset, &segment_bytes(seg, t, round))
                        .await
                        .unwrap_or_else(|e| panic!("task {t}: write {seg:?}: {e:?}"));
                    if rng.u32(0..4) == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }
        }));
    }
    // A lost wake-up in the image's locking would hang here: fail instead.
    let join = async {
        for t in tasks {
            t.await.expect("writer task");
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), join)
        .await
        .expect("writers did not finish within 60 s");
    f.image.flush().await.unwrap();

    let all = read_vec(&f.image, 0, SIZE as usize).await;
    let on_disk = f.medium();
    for (what, bytes) in [("image", &all), ("file", &on_disk)] {
        assert_eq!(bytes.len() as u64, SIZE, "{what} size");
        for seg in segs.iter() {
            let got = &bytes[seg.offset as usize..seg.offset as usize + seg.len];
            let (expected, who) = match seg.owner {
                Some(t) => (segment_bytes(seg, t, 1), format!("task {t}")),
                None => (vec![0; seg.len], "nobody".to_owned()),
            };
            assert_bytes(got, &expected, &format!("{what}: {seg:?} written by {who}"));
        }
    }
}

/// The fixture helpers agree on what a raw image is: a file of exactly the size asked.
#[tokio::test]
async fn created_raw_files_have_the_size_asked() {
    for f in [buffered_raw(3 << 20).await, direct_raw(3 << 20).await] {
        let path: &Path = f.path.as_deref().unwrap();
        assert_eq!(std::fs::metadata(path).unwrap().len(), 3 << 20);
        assert_eq!(f.image.size(), 3 << 20);
        assert_eq!(f.image.format(), Format::RAW);
        assert_eq!(f.image.chain_len(), 1);
        assert!(f.image.backing().is_none());
    }
    let m = memory_raw(3 << 20).await;
    assert_eq!(m.memory.as_ref().unwrap().size().unwrap(), 3 << 20);
}
