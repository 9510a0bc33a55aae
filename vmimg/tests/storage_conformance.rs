//! One conformance suite for every [`Storage`] implementation.
//!
//! Each check is an async function taking `&dyn Storage` and a [`Caps`] describing what the
//! implementation promises beyond the shared contract (whether it keeps data, whether
//! `extent()` tells holes from data, ...). The table at the bottom runs every check against
//! every implementation as its own test, named `<implementation>_<check>`:
//!
//! | implementation  | factory                  |
//! |-----------------|--------------------------|
//! | `memory`        | [`MemoryStorage::new`]   |
//! | `file_buffered` | [`FileStorageOpen`]      |
//! | `file_direct`   | [`FileStorageOpen`] with `O_DIRECT` (fails if no directory supports it) |
//! | `file_inline`   | [`FileStorageOpen`] with `inline_io` (system calls on the caller's thread) |
//! | `file_direct_inline` | both                |
//! | `null`          | [`NullStorage::new`]     |
//! | `hook`          | [`HookStorage::new`] over a [`MemoryStorage`], with the no-op hook `()` |
//!
//! Checks keep offsets and lengths multiples of `request_align()` (rounding odd sizes up with
//! [`up`]), so storages without alignment needs are exercised at odd offsets while `O_DIRECT`
//! gets aligned requests; only the alignment check sends unaligned ones on purpose.

use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tempfile::TempDir;
use vmimg::storage::HostExtent;
use vmimg::{
    ErrorKind, FileStorageOpen, HookStorage, MemoryStorage, NullStorage, PreallocMode, Storage,
    StorageExt,
};

// ---------------------------------------------------------------------------------------------
// Capabilities and subjects
// ---------------------------------------------------------------------------------------------

/// What an implementation promises beyond the contract every storage keeps.
#[derive(Clone, Debug)]
struct Caps {
    /// Written bytes read back (false for the null storage: every read returns zeros).
    persists: bool,
    /// A discarded range reads back as zeros (discard is advisory in general).
    discard_zeroes: bool,
    /// `extent()` tells written data from never-written holes.
    tracks_extents: bool,
    /// Growing with `Falloc`/`Full` really allocates space (`allocated_size` grows).
    preallocates: bool,
    /// Opened with `O_DIRECT`: requests must be aligned to `request_align()`.
    direct: bool,
    /// The directory holding the storage's file, when it is a file.
    dir: Option<PathBuf>,
}

/// A storage under test, with whatever keeps it alive (its temporary directory).
struct Subject {
    storage: Arc<dyn Storage>,
    caps: Caps,
    _dir: Option<TempDir>,
}

const FILE_NAME: &str = "disk.img";

async fn memory() -> Subject {
    Subject {
        storage: Arc::new(MemoryStorage::new()),
        caps: Caps {
            persists: true,
            discard_zeroes: true,
            tracks_extents: true,
            preallocates: false,
            direct: false,
            dir: None,
        },
        _dir: None,
    }
}

/// A memory storage behind a hook storage that does nothing: every request and query must
/// pass through unchanged.
async fn hook() -> Subject {
    Subject {
        storage: Arc::new(HookStorage::new(MemoryStorage::new(), ())),
        ..memory().await
    }
}

async fn null() -> Subject {
    Subject {
        storage: Arc::new(NullStorage::new(0)),
        caps: Caps {
            persists: false,
            discard_zeroes: true,
            tracks_extents: false,
            preallocates: false,
            direct: false,
            dir: None,
        },
        _dir: None,
    }
}

fn file_caps(dir: &Path, direct: bool) -> Caps {
    Caps {
        persists: true,
        discard_zeroes: true,
        tracks_extents: true,
        preallocates: true,
        direct,
        dir: Some(dir.to_path_buf()),
    }
}

async fn file_buffered() -> Subject {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let storage = FileStorageOpen::new(dir.path().join(FILE_NAME))
        .create(true)
        .open()
        .await
        .expect("create a buffered file storage");
    assert!(!storage.is_direct());
    Subject {
        storage: Arc::new(storage),
        caps: file_caps(dir.path(), false),
        _dir: Some(dir),
    }
}

async fn file_inline() -> Subject {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let storage = FileStorageOpen::new(dir.path().join(FILE_NAME))
        .create(true)
        .inline_io(true)
        .open()
        .await
        .expect("create an inline-I/O file storage");
    Subject {
        storage: Arc::new(storage),
        caps: file_caps(dir.path(), false),
        _dir: Some(dir),
    }
}

async fn file_direct_inline() -> Subject {
    let direct = file_direct().await;
    let path = direct.storage.path().unwrap().to_path_buf();
    let storage = FileStorageOpen::new(&path)
        .writable(true)
        .direct(true)
        .inline_io(true)
        .open()
        .await
        .expect("reopen the O_DIRECT file with inline I/O");
    Subject {
        storage: Arc::new(storage),
        ..direct
    }
}

/// Directories to try for `O_DIRECT` files, in order (tmpfs before Linux 6.6 refuses it).
fn direct_candidates() -> Vec<PathBuf> {
    vec![
        std::env::temp_dir(),
        PathBuf::from("/var/tmp"),
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
    ]
}

async fn file_direct() -> Subject {
    let mut tried = Vec::new();
    for base in direct_candidates() {
        let Ok(dir) = tempfile::tempdir_in(&base) else {
            tried.push(format!("{}: cannot create a directory", base.display()));
            continue;
        };
        let open = FileStorageOpen::new(dir.path().join(FILE_NAME))
            .create(true)
            .direct(true)
            .open()
            .await;
        match open {
            Ok(storage) => {
                assert!(storage.is_direct());
                return Subject {
                    storage: Arc::new(storage),
                    caps: file_caps(dir.path(), true),
                    _dir: Some(dir),
                };
            }
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                tried.push(format!("{}: {e}", base.display()));
            }
            Err(e) => panic!("opening an O_DIRECT file in {}: {e:?}", base.display()),
        }
    }
    panic!("no directory supports O_DIRECT; tried: {tried:#?}");
}

/// What read-only subjects hold: 64 KiB (a multiple of any direct-I/O alignment).
fn read_only_content() -> Vec<u8> {
    pattern(99, 0, 64 << 10)
}

async fn memory_read_only() -> Subject {
    let storage = MemoryStorage::from_bytes(&read_only_content()).into_read_only();
    Subject {
        storage: Arc::new(storage),
        ..memory().await
    }
}

async fn hook_read_only() -> Subject {
    let storage = MemoryStorage::from_bytes(&read_only_content()).into_read_only();
    Subject {
        storage: Arc::new(HookStorage::new(storage, ())),
        ..memory().await
    }
}

/// Writes the read-only content through a writable handle of `subject`, then reopens its
/// file read-only.
async fn file_read_only(subject: Subject) -> Subject {
    subject
        .storage
        .write_at(0, &read_only_content())
        .await
        .unwrap();
    subject.storage.sync().await.unwrap();
    let path = subject.storage.path().unwrap().to_path_buf();
    let storage = FileStorageOpen::new(&path)
        .direct(subject.caps.direct)
        .open()
        .await
        .expect("reopen read-only");
    Subject {
        storage: Arc::new(storage),
        ..subject
    }
}

async fn file_buffered_read_only() -> Subject {
    file_read_only(file_buffered().await).await
}

async fn file_direct_read_only() -> Subject {
    file_read_only(file_direct().await).await
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The storage's request alignment (at least 1).
fn align(s: &dyn Storage) -> u64 {
    (s.request_align() as u64).max(1)
}

/// `x` rounded up to a multiple of `a`: odd sizes stay odd where alignment does not matter.
fn up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Position-dependent bytes: a byte that lands at the wrong offset, or comes from the wrong
/// writer (`seed`), does not match.
fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|p| {
            let x = (p ^ seed.rotate_left(29).wrapping_mul(0xA24B_AED4_963E_E407))
                .wrapping_mul(0x9E37_79B9_7F4A_7C15);
            (x >> 56) as u8
        })
        .collect()
}

/// Asserts equality, reporting the first differing offset instead of dumping buffers.
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

/// What reading `data` back should give on this storage.
fn stored(caps: &Caps, data: &[u8]) -> Vec<u8> {
    if caps.persists {
        data.to_vec()
    } else {
        vec![0; data.len()]
    }
}

async fn read_vec(s: &dyn Storage, offset: u64, len: usize) -> Vec<u8> {
    // Pre-fill with non-zero bytes so "reads zeros" is really checked.
    let mut buf = vec![0xa5u8; len];
    s.read_at(offset, &mut buf)
        .await
        .unwrap_or_else(|e| panic!("read of {len} bytes at {offset}: {e:?}"));
    buf
}

/// Splits `buf` at the given lengths (the last slice takes the rest).
fn split_mut<'a>(mut buf: &'a mut [u8], lens: &[usize]) -> Vec<IoSliceMut<'a>> {
    let mut out = Vec::new();
    for &n in lens {
        let (head, rest) = buf.split_at_mut(n.min(buf.len()));
        out.push(IoSliceMut::new(head));
        buf = rest;
    }
    out.push(IoSliceMut::new(buf));
    out
}

fn split<'a>(mut buf: &'a [u8], lens: &[usize]) -> Vec<IoSlice<'a>> {
    let mut out = Vec::new();
    for &n in lens {
        let (head, rest) = buf.split_at(n.min(buf.len()));
        out.push(IoSlice::new(head));
        buf = rest;
    }
    out.push(IoSlice::new(buf));
    out
}

#[track_caller]
fn assert_kind<T: std::fmt::Debug>(r: vmimg::Result<T>, kind: ErrorKind, what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected {kind:?}, got Ok({v:?})"),
        Err(e) => assert_eq!(e.kind(), kind, "{what}: wrong error kind: {e:?}"),
    }
}

/// Fills `[0, len)` with `pattern(seed)` on a fresh storage and returns what was written.
async fn fill(s: &dyn Storage, seed: u64, len: u64) -> Vec<u8> {
    assert_eq!(s.size().unwrap(), 0, "subjects start empty");
    let data = pattern(seed, 0, len as usize);
    s.write_at(0, &data).await.unwrap();
    assert_eq!(s.size().unwrap(), len);
    data
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// A vectored write with uneven slices reads back through differently split vectored reads.
async fn write_then_read_roundtrips(s: &dyn Storage, caps: &Caps) {
    let a = align(s);
    let off = up(3001, a);
    // Spans several 64 KiB chunks of the memory storage.
    let len = up(3 * 65536 + 1234, a) as usize;
    let data = pattern(1, off, len);
    s.writev(off, &split(&data, &[1, 7, 4093, 65536, 13]))
        .await
        .unwrap();
    assert_eq!(s.size().unwrap(), off + len as u64, "size after the write");

    let mut buf = vec![0xeeu8; len];
    s.readv(off, &mut split_mut(&mut buf, &[5, 65535, 2, 9999]))
        .await
        .unwrap();
    assert_bytes(&buf, &stored(caps, &data), "vectored read-back");
    assert_bytes(
        &read_vec(s, 0, off as usize).await,
        &vec![0; off as usize],
        "never-written bytes before the write",
    );

    // Overwrite an aligned piece in the middle: the neighbours keep their bytes.
    let (o2, l2) = (off + up(60_001, a), up(10_007, a) as usize);
    let data2 = pattern(2, o2, l2);
    s.writev(o2, &split(&data2, &[l2 / 3, 1])).await.unwrap();
    let mut expected = data.clone();
    let at = (o2 - off) as usize;
    expected[at..at + l2].copy_from_slice(&data2);
    assert_bytes(
        &read_vec(s, off, len).await,
        &stored(caps, &expected),
        "read-back after an overwrite in the middle",
    );
    assert_eq!(
        s.size().unwrap(),
        off + len as u64,
        "overwrite changed size"
    );
}

/// Reads wholly past the end return zeros; a read straddling the end returns the stored head
/// and zeros after the end. Reads never change the size.
async fn reads_past_end_return_zeros(s: &dyn Storage, caps: &Caps) {
    let a = align(s);
    let len = up(10_001, a);
    let data = fill(s, 3, len).await;

    let far = read_vec(s, len + up(70_001, a), up(5001, a) as usize).await;
    assert_bytes(&far, &vec![0; far.len()], "read wholly past the end");
    let just = read_vec(s, len, a as usize).await;
    assert_bytes(
        &just,
        &vec![0; just.len()],
        "read starting exactly at the end",
    );

    let start = len - up(3001, a);
    let n = up(9001, a) as usize;
    let got = read_vec(s, start, n).await;
    let mut expected = stored(caps, &data[start as usize..]);
    expected.resize(n, 0);
    assert_bytes(&got, &expected, "read straddling the end");

    // Vectored: one slice before the end, one across it, one wholly after it.
    let mut buf = vec![0x5au8; n];
    let head = (len - start) as usize;
    s.readv(start, &mut split_mut(&mut buf, &[head - 1, 2]))
        .await
        .unwrap();
    assert_bytes(&buf, &expected, "vectored read straddling the end");
    assert_eq!(s.size().unwrap(), len, "reads must not change the size");
}

/// A write past the end grows the storage; the gap reads as zeros; a later write below the
/// end does not shrink it.
async fn writes_past_end_grow_size(s: &dyn Storage, caps: &Caps) {
    let a = align(s);
    assert_eq!(s.size().unwrap(), 0);
    let off = up(100_003, a);
    let len = up(5003, a) as usize;
    let data = pattern(4, off, len);
    s.write_at(off, &data).await.unwrap();
    assert_eq!(
        s.size().unwrap(),
        off + len as u64,
        "size after writing past the end"
    );
    let got = read_vec(s, 0, off as usize + len).await;
    assert_bytes(&got[..off as usize], &vec![0; off as usize], "the gap");
    assert_bytes(&got[off as usize..], &stored(caps, &data), "the data");

    let small = pattern(5, 0, a as usize);
    s.write_at(0, &small).await.unwrap();
    assert_eq!(s.size().unwrap(), off + len as u64, "a write below the end");
    let off2 = off + len as u64 + up(1, a);
    s.write_at(off2, &small).await.unwrap();
    assert_eq!(s.size().unwrap(), off2 + a, "second growth");
}

/// Shared body of the two write_zeroes checks.
async fn write_zeroes_case(s: &dyn Storage, caps: &Caps, may_unmap: bool) {
    let a = align(s);
    let len = up(200_001, a);
    let data = fill(s, 6, len).await;
    // Covers one whole 64 KiB memory chunk and parts of its neighbours.
    let (zoff, zlen) = (up(5001, a), up(140_001, a));
    s.write_zeroes(zoff, zlen, may_unmap).await.unwrap();
    let mut expected = data;
    expected[zoff as usize..(zoff + zlen) as usize].fill(0);
    assert_bytes(
        &read_vec(s, 0, len as usize).await,
        &stored(caps, &expected),
        &format!("after write_zeroes(may_unmap = {may_unmap})"),
    );
    assert_eq!(
        s.size().unwrap(),
        len,
        "write_zeroes inside changed the size"
    );

    // A second, small range at the very start.
    s.write_zeroes(0, a, may_unmap).await.unwrap();
    expected[..a as usize].fill(0);
    assert_bytes(
        &read_vec(s, 0, len as usize).await,
        &stored(caps, &expected),
        "after write_zeroes at offset 0",
    );
}

async fn write_zeroes_unmap_reads_zeros_keeps_neighbours(s: &dyn Storage, caps: &Caps) {
    write_zeroes_case(s, caps, true).await;
}

async fn write_zeroes_no_unmap_reads_zeros_keeps_neighbours(s: &dyn Storage, caps: &Caps) {
    write_zeroes_case(s, caps, false).await;
}

/// Discard leaves the neighbours intact (and zeros the range where the storage promises it);
/// discarding across the end does not change the size.
async fn discard_keeps_neighbours(s: &dyn Storage, caps: &Caps) {
    let a = align(s);
    let len = up(200_001, a);
    let data = fill(s, 7, len).await;
    let (doff, dlen) = (up(5001, a), up(140_001, a));
    s.discard(doff, dlen).await.unwrap();
    let got = read_vec(s, 0, len as usize).await;
    let (d0, d1) = (doff as usize, (doff + dlen) as usize);
    assert_bytes(&got[..d0], &stored(caps, &data[..d0]), "before the discard");
    assert_bytes(&got[d1..], &stored(caps, &data[d1..]), "after the discard");
    if caps.discard_zeroes {
        assert_bytes(&got[d0..d1], &vec![0; d1 - d0], "discarded range");
    }
    assert_eq!(s.size().unwrap(), len, "discard inside changed the size");

    s.discard(len - a, 4 * a).await.unwrap();
    assert_eq!(
        s.size().unwrap(),
        len,
        "discard across the end changed the size"
    );
    let got = read_vec(s, 0, d0).await;
    assert_bytes(
        &got,
        &stored(caps, &data[..d0]),
        "head after the second discard",
    );
}

/// Shrinking drops the tail; growing again reads zeros there, not the old bytes.
async fn resize_shrink_then_grow_reads_zeros(s: &dyn Storage, caps: &Caps) {
    let a = align(s);
    let len = up(300_001, a);
    let data = fill(s, 8, len).await;
    // Inside a 64 KiB memory chunk, so its stale tail must be zeroed.
    let small = up(70_001, a);
    s.resize(small, PreallocMode::Off).await.unwrap();
    assert_eq!(s.size().unwrap(), small, "size after shrinking");
    let got = read_vec(s, 0, len as usize).await;
    let mut expected = stored(caps, &data[..small as usize]);
    expected.resize(len as usize, 0);
    assert_bytes(
        &got,
        &expected,
        "after shrinking (past the end reads zeros)",
    );

    s.resize(len, PreallocMode::Off).await.unwrap();
    assert_eq!(s.size().unwrap(), len, "size after growing back");
    assert_bytes(
        &read_vec(s, 0, len as usize).await,
        &expected,
        "after growing back: the regrown part reads zeros",
    );
    s.resize(0, PreallocMode::Off).await.unwrap();
    assert_eq!(s.size().unwrap(), 0);
    s.resize(a, PreallocMode::Off).await.unwrap();
    assert_bytes(
        &read_vec(s, 0, a as usize).await,
        &vec![0; a as usize],
        "after 0",
    );
}

const GROW: u64 = 4 << 20;

/// Shared body of the resize-with-preallocation checks.
async fn resize_grow_case(s: &dyn Storage, caps: &Caps, mode: PreallocMode) {
    let a = align(s);
    let base = up(10_001, a);
    let data = fill(s, 9, base).await;
    s.sync().await.unwrap();
    let before = s.allocated_size();
    s.resize(base + GROW, mode).await.unwrap();
    assert_eq!(
        s.size().unwrap(),
        base + GROW,
        "size after growing ({mode:?})"
    );
    let got = read_vec(s, 0, (base + GROW) as usize).await;
    assert_bytes(
        &got[..base as usize],
        &stored(caps, &data),
        "old data after growing",
    );
    assert_bytes(
        &got[base as usize..],
        &vec![0; GROW as usize],
        &format!("grown part ({mode:?})"),
    );
    let after = s.allocated_size();
    let (Some(before), Some(after)) = (before, after) else {
        assert!(
            !caps.preallocates,
            "a preallocating storage reports allocation"
        );
        return;
    };
    match mode {
        PreallocMode::Off | PreallocMode::Metadata => assert!(
            after < before + (1 << 20),
            "{mode:?} must keep the new space sparse: allocated {before} -> {after}"
        ),
        PreallocMode::Falloc | PreallocMode::Full if caps.preallocates => assert!(
            after >= before + GROW - (64 << 10),
            "{mode:?} must allocate the new {GROW} bytes: allocated {before} -> {after}"
        ),
        _ => {}
    }
}

async fn resize_prealloc_off_grows_sparse(s: &dyn Storage, caps: &Caps) {
    resize_grow_case(s, caps, PreallocMode::Off).await;
    // Metadata means Off for a storage: grow again, still sparse.
    let before = s.allocated_size();
    let size = s.size().unwrap();
    s.resize(size + GROW, PreallocMode::Metadata).await.unwrap();
    assert_eq!(s.size().unwrap(), size + GROW);
    if let (Some(before), Some(after)) = (before, s.allocated_size()) {
        assert!(
            after < before + (1 << 20),
            "Metadata allocated {before} -> {after}"
        );
    }
    let tail = read_vec(s, size, GROW as usize).await;
    assert_bytes(&tail, &vec![0; GROW as usize], "Metadata-grown part");
}

async fn resize_prealloc_falloc_grows_and_allocates(s: &dyn Storage, caps: &Caps) {
    resize_grow_case(s, caps, PreallocMode::Falloc).await;
}

async fn resize_prealloc_full_grows_and_allocates(s: &dyn Storage, caps: &Caps) {
    resize_grow_case(s, caps, PreallocMode::Full).await;
}

/// Walks `[0, end)` with `extent()` and returns the kind of every 4 KiB block.
async fn extent_map(s: &dyn Storage, end: u64) -> Vec<HostExtent> {
    let mut kinds = Vec::new();
    let mut pos = 0;
    while pos < end {
        let (kind, n) = s.extent(pos, end - pos).await.unwrap();
        assert!(
            n >= 1 && n <= end - pos,
            "extent({pos}, {}) returned length {n}",
            end - pos
        );
        assert!(
            pos % 4096 == 0 && n % 4096 == 0,
            "extent boundaries should fall on 4 KiB blocks here: {pos} + {n}"
        );
        kinds.extend(std::iter::repeat_n(kind, (n / 4096) as usize));
        pos += n;
    }
    kinds
}

/// Never-written ranges are holes, written ones data; `max_len` bounds the answer.
async fn extent_reports_holes_and_data(s: &dyn Storage, caps: &Caps) {
    const D: u64 = 64 << 10;
    const HOLE: u64 = 1 << 20;
    let total = D + HOLE + D;
    s.resize(total, PreallocMode::Off).await.unwrap();
    s.write_at(0, &pattern(10, 0, D as usize)).await.unwrap();
    s.write_at(D + HOLE, &pattern(10, D + HOLE, D as usize))
        .await
        .unwrap();
    assert_eq!(s.size().unwrap(), total);

    if !caps.tracks_extents {
        // Nothing is stored, so everything is a hole (and reads zeros).
        assert_eq!(s.extent(0, total).await.unwrap(), (HostExtent::Hole, total));
        assert_eq!(s.extent(D, 100).await.unwrap(), (HostExtent::Hole, 100));
        return;
    }
    let kinds = extent_map(s, total).await;
    let blocks = |n: u64| (n / 4096) as usize;
    for (i, k) in kinds.iter().enumerate() {
        let pos = i as u64 * 4096;
        let want = if (D..D + HOLE).contains(&pos) {
            HostExtent::Hole
        } else {
            HostExtent::Data
        };
        assert_eq!(*k, want, "block at {pos}");
    }
    assert_eq!(kinds.len(), blocks(total));
    assert_eq!(s.extent(D, HOLE).await.unwrap(), (HostExtent::Hole, HOLE));
    assert_eq!(
        s.extent(D + 4096, 8192).await.unwrap(),
        (HostExtent::Hole, 8192)
    );
    assert_eq!(s.extent(0, 100).await.unwrap(), (HostExtent::Data, 100));
    assert_eq!(
        s.extent(D + HOLE, total).await.unwrap(),
        (HostExtent::Data, D),
        "the data extent at the end"
    );
    let (kind, n) = s.extent(D + HOLE / 2, total).await.unwrap();
    assert_eq!((kind, n), (HostExtent::Hole, HOLE / 2), "rest of the hole");
}

/// flush and sync succeed, and for files the bytes are in the file afterwards.
async fn flush_and_sync_succeed(s: &dyn Storage, caps: &Caps) {
    let a = align(s);
    s.flush().await.unwrap();
    s.sync().await.unwrap();
    let off = up(777, a);
    let data = pattern(11, off, up(12_345, a) as usize);
    s.write_at(off, &data).await.unwrap();
    s.flush().await.unwrap();
    s.sync().await.unwrap();
    let mut expected = vec![0u8; off as usize];
    expected.extend_from_slice(&stored(caps, &data));
    assert_bytes(
        &read_vec(s, 0, expected.len()).await,
        &expected,
        "after flush",
    );
    if caps.dir.is_some() {
        let on_disk = std::fs::read(s.path().unwrap()).unwrap();
        assert_bytes(&on_disk, &expected, "file contents seen by another reader");
    }
}

/// A read-only storage refuses every kind of write with ReadOnly and keeps its contents.
async fn read_only_refuses_writes(s: &dyn Storage, _caps: &Caps) {
    let content = read_only_content();
    let a = align(s);
    assert!(!s.is_writable());
    let size = content.len() as u64;
    assert_eq!(s.size().unwrap(), size);
    let junk = vec![0xffu8; a as usize];
    assert_kind(s.write_at(0, &junk).await, ErrorKind::ReadOnly, "write");
    assert_kind(
        s.writev(size, &split(&junk, &[1])).await,
        ErrorKind::ReadOnly,
        "writev past the end",
    );
    assert_kind(
        s.write_zeroes(0, a, true).await,
        ErrorKind::ReadOnly,
        "write_zeroes unmap",
    );
    assert_kind(
        s.write_zeroes(a, a, false).await,
        ErrorKind::ReadOnly,
        "write_zeroes",
    );
    assert_kind(s.discard(0, a).await, ErrorKind::ReadOnly, "discard");
    assert_kind(
        s.resize(2 * size, PreallocMode::Off).await,
        ErrorKind::ReadOnly,
        "resize up",
    );
    assert_kind(
        s.resize(0, PreallocMode::Off).await,
        ErrorKind::ReadOnly,
        "resize down",
    );
    assert_eq!(s.size().unwrap(), size, "size after refused writes");
    assert_bytes(
        &read_vec(s, 0, content.len()).await,
        &content,
        "contents after refused writes",
    );
    s.flush().await.unwrap();
}

/// O_DIRECT storages report their alignment and reject unaligned requests (but bounce
/// unaligned memory); the others take any offset and length.
async fn alignment_is_reported_and_enforced(s: &dyn Storage, caps: &Caps) {
    let a = s.request_align() as u64;
    if !caps.direct {
        assert_eq!(a, 1, "request_align of a storage without alignment needs");
        assert_eq!(s.mem_align(), 1);
        s.write_at(3, b"xyz").await.unwrap();
        let want: &[u8] = if caps.persists {
            b"\0xyz\0"
        } else {
            b"\0\0\0\0\0"
        };
        s.write_zeroes(7, 1, false).await.unwrap();
        assert_eq!(read_vec(s, 2, 5).await, want);
        s.discard(5, 3).await.unwrap();
        return;
    }
    assert!(a >= 512, "O_DIRECT request_align() is {a}");
    assert!(a.is_power_of_two(), "request_align() {a}");
    let m = s.mem_align();
    assert!(m >= 1 && m.is_power_of_two(), "mem_align() {m}");

    let len = 4 * a;
    let data = fill(s, 12, len).await;
    let bad = [(1, a), (0, a + 1), (a / 2, a), (a + 1, 1), (0, 1)];
    for (off, n) in bad {
        let what = |op: &str| format!("{op} of {n} bytes at {off}");
        let mut buf = vec![0u8; n as usize];
        assert_kind(
            s.read_at(off, &mut buf).await,
            ErrorKind::InvalidArgument,
            &what("read"),
        );
        assert_kind(
            s.write_at(off, &vec![0xffu8; n as usize]).await,
            ErrorKind::InvalidArgument,
            &what("write"),
        );
        assert_kind(
            s.write_zeroes(off, n, false).await,
            ErrorKind::InvalidArgument,
            &what("write_zeroes"),
        );
        assert_kind(
            s.discard(off, n).await,
            ErrorKind::InvalidArgument,
            &what("discard"),
        );
    }
    assert_kind(
        s.resize(len + 1, PreallocMode::Off).await,
        ErrorKind::InvalidArgument,
        "resize to an unaligned size",
    );
    assert_eq!(s.size().unwrap(), len, "size after rejected requests");
    assert_bytes(&read_vec(s, 0, len as usize).await, &data, "after rejects");

    // Aligned requests from misaligned memory are bounced, not refused.
    let mut backing = vec![0u8; a as usize + 1];
    let new = pattern(13, a, a as usize);
    backing[1..].copy_from_slice(&new);
    s.write_at(a, &backing[1..]).await.unwrap();
    let mut back = vec![0u8; a as usize + 1];
    s.read_at(a, &mut back[1..]).await.unwrap();
    assert_bytes(&back[1..], &new, "aligned request, misaligned memory");
}

/// Relative names resolve against the file's directory; absolute ones are kept; storages
/// without a file refuse relative names.
async fn resolve_name_follows_the_file(s: &dyn Storage, caps: &Caps) {
    let abs = "/srv/images/base.qcow2";
    let r = s.resolve_name(abs).unwrap();
    assert_eq!((r.name.as_str(), r.path.as_path()), (abs, Path::new(abs)));

    match &caps.dir {
        Some(dir) => {
            assert_eq!(s.path(), Some(dir.join(FILE_NAME).as_path()));
            for rel in ["base.img", "sub/dir/base.img", "../up.img"] {
                let r = s.resolve_name(rel).unwrap();
                assert_eq!(r.name, rel);
                assert_eq!(r.path, dir.join(rel), "resolving {rel}");
                assert!(r.path.is_absolute());
            }
        }
        None => {
            assert_eq!(s.path(), None);
            assert_kind(
                s.resolve_name("base.img"),
                ErrorKind::Unsupported,
                "relative name without a file",
            );
        }
    }
}

/// `allocate` changes no byte and not the size, even over data and holes; on storages that
/// preallocate, the space is taken afterwards.
async fn allocate_keeps_bytes_and_size(s: &dyn Storage, caps: &Caps) {
    let a = align(s);
    let blk = a.max(4096);
    let data = pattern(31, 0, blk as usize);
    s.write_at(0, &data).await.unwrap();
    s.write_at(8 * blk, &data).await.unwrap();
    let size = s.size().unwrap();
    let before = read_vec(s, 0, size as usize).await;
    let used = s.allocated_size();
    s.allocate(0, 9 * blk).await.unwrap();
    assert_eq!(s.size().unwrap(), size, "allocate changed the size");
    assert_bytes(
        &read_vec(s, 0, size as usize).await,
        &before,
        "bytes after allocate",
    );
    if caps.preallocates {
        let (used, now) = (used.unwrap(), s.allocated_size().unwrap());
        assert!(
            now >= used + 6 * blk,
            "the holes were not allocated: {used} -> {now}"
        );
    }
}

/// Writes larger than the file storage's per-system-call piece (64 KiB through the page
/// cache) at an odd offset, from uneven vectors, read back whole and around the edges.
async fn large_writes_roundtrip(s: Arc<dyn Storage>, caps: &Caps) {
    let a = align(s.as_ref());
    let off = up(65_536 - 777, a);
    let len = up((3 << 20) + 4321, a) as usize;
    let data = pattern(7, off, len);
    let lens = [up(65_537, a) as usize, 1, up(1 << 20, a) as usize, 3];
    s.writev(off, &split(&data, &lens)).await.unwrap();
    assert_eq!(s.size().unwrap(), off + len as u64, "size after the write");
    assert_bytes(
        &read_vec(s.as_ref(), off, len).await,
        &stored(caps, &data),
        "large write read back",
    );
    // One more, overlapping the first one's tail, from a single slice.
    let off2 = off + len as u64 - up(100_000, a);
    let data2 = pattern(8, off2, len);
    s.write_at(off2, &data2).await.unwrap();
    let mut expected = vec![0u8; off as usize];
    expected.extend_from_slice(&data[..(off2 - off) as usize]);
    expected.extend_from_slice(&data2);
    assert_bytes(
        &read_vec(s.as_ref(), 0, expected.len()).await,
        &stored(caps, &expected),
        "overlapping large writes",
    );
}

/// Tasks growing the storage at once, half by writing data and half by zeroing (with and
/// without unmapping) their own blocks past the end: no zeroing may cut a racing write
/// short, and every block ends up as its task left it.
async fn concurrent_zeroes_and_writes_past_end(s: Arc<dyn Storage>, caps: &Caps) {
    const TASKS: u64 = 32;
    const ROUNDS: u64 = 20;
    let blk = align(s.as_ref()).max(4096);
    for round in 0..ROUNDS {
        let base = round * TASKS * blk;
        let barrier = Arc::new(tokio::sync::Barrier::new(TASKS as usize));
        let mut tasks = Vec::new();
        for i in 0..TASKS {
            let s = Arc::clone(&s);
            let barrier = Arc::clone(&barrier);
            tasks.push(tokio::spawn(async move {
                let at = base + i * blk;
                barrier.wait().await;
                match i % 4 {
                    0 => s.write_zeroes(at, blk, true).await.unwrap(),
                    1 => s.write_zeroes(at, blk, false).await.unwrap(),
                    _ => s
                        .write_at(at, &pattern(i + round, at, blk as usize))
                        .await
                        .unwrap(),
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    }
    let end = ROUNDS * TASKS * blk;
    assert!(
        s.size().unwrap() >= end - 2 * blk,
        "size after concurrent growth"
    );
    let all = read_vec(s.as_ref(), 0, end as usize).await;
    for round in 0..ROUNDS {
        for i in 0..TASKS {
            let at = (round * TASKS + i) * blk;
            let got = &all[at as usize..(at + blk) as usize];
            let expected = if i % 4 < 2 {
                vec![0u8; blk as usize]
            } else {
                stored(caps, &pattern(i + round, at, blk as usize))
            };
            assert_bytes(got, &expected, &format!("round {round}, block of task {i}"));
        }
    }
}

/// 64 tasks write distinct blocks at once (growing the storage in random order), each reads
/// its own block back, and afterwards every block holds its writer's pattern.
async fn concurrent_block_writes(s: Arc<dyn Storage>, caps: &Caps) {
    const TASKS: u64 = 64;
    let blk = align(s.as_ref()).max(4096);
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS as usize));
    let mut order: Vec<u64> = (0..TASKS).collect();
    fastrand::Rng::with_seed(64).shuffle(&mut order);
    let persists = caps.persists;
    let mut tasks = Vec::new();
    for i in order {
        let s = Arc::clone(&s);
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            let data = pattern(1000 + i, i * blk, blk as usize);
            barrier.wait().await;
            s.write_at(i * blk, &data).await.unwrap();
            let mut back = vec![0u8; blk as usize];
            s.read_at(i * blk, &mut back).await.unwrap();
            let expected = if persists { data } else { vec![0; back.len()] };
            assert_bytes(&back, &expected, &format!("task {i} reading its own block"));
        }));
    }
    // A lost wake-up would hang here: fail instead.
    let join = async {
        for t in tasks {
            t.await.expect("writer task");
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), join)
        .await
        .expect("writers did not finish within 60 s");
    assert_eq!(
        s.size().unwrap(),
        TASKS * blk,
        "size after concurrent growth"
    );
    let all = read_vec(s.as_ref(), 0, (TASKS * blk) as usize).await;
    for i in 0..TASKS {
        let got = &all[(i * blk) as usize..((i + 1) * blk) as usize];
        let data = pattern(1000 + i, i * blk, blk as usize);
        assert_bytes(got, &stored(caps, &data), &format!("block of task {i}"));
    }
}

// ---------------------------------------------------------------------------------------------
// The table: every (implementation x check) is its own test.
// ---------------------------------------------------------------------------------------------

/// `check: test_name = factory, ...;` makes one `#[tokio::test]` per row.
macro_rules! conformance {
    ($($check:ident: $($name:ident = $factory:ident),+ ;)+) => {$($(
        #[tokio::test]
        async fn $name() {
            let subject = $factory().await;
            $check(subject.storage.as_ref(), &subject.caps).await;
        }
    )+)+};
}

/// Like `conformance!`, on a multi-threaded runtime, handing the check an `Arc<dyn Storage>`.
macro_rules! conformance_mt {
    ($($check:ident: $($name:ident = $factory:ident),+ ;)+) => {$($(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            let subject = $factory().await;
            $check(Arc::clone(&subject.storage), &subject.caps).await;
        }
    )+)+};
}

conformance! {
    write_then_read_roundtrips:
        memory_write_then_read_roundtrips = memory,
        hook_write_then_read_roundtrips = hook,
        file_buffered_write_then_read_roundtrips = file_buffered,
        file_direct_write_then_read_roundtrips = file_direct,
        file_inline_write_then_read_roundtrips = file_inline,
        file_direct_inline_write_then_read_roundtrips = file_direct_inline,
        null_write_then_read_roundtrips = null;
    reads_past_end_return_zeros:
        memory_reads_past_end_return_zeros = memory,
        hook_reads_past_end_return_zeros = hook,
        file_buffered_reads_past_end_return_zeros = file_buffered,
        file_direct_reads_past_end_return_zeros = file_direct,
        file_inline_reads_past_end_return_zeros = file_inline,
        file_direct_inline_reads_past_end_return_zeros = file_direct_inline,
        null_reads_past_end_return_zeros = null;
    writes_past_end_grow_size:
        memory_writes_past_end_grow_size = memory,
        hook_writes_past_end_grow_size = hook,
        file_buffered_writes_past_end_grow_size = file_buffered,
        file_direct_writes_past_end_grow_size = file_direct,
        file_inline_writes_past_end_grow_size = file_inline,
        null_writes_past_end_grow_size = null;
    write_zeroes_unmap_reads_zeros_keeps_neighbours:
        memory_write_zeroes_unmap_reads_zeros_keeps_neighbours = memory,
        hook_write_zeroes_unmap_reads_zeros_keeps_neighbours = hook,
        file_buffered_write_zeroes_unmap_reads_zeros_keeps_neighbours = file_buffered,
        file_direct_write_zeroes_unmap_reads_zeros_keeps_neighbours = file_direct,
        null_write_zeroes_unmap_reads_zeros_keeps_neighbours = null;
    write_zeroes_no_unmap_reads_zeros_keeps_neighbours:
        memory_write_zeroes_no_unmap_reads_zeros_keeps_neighbours = memory,
        hook_write_zeroes_no_unmap_reads_zeros_keeps_neighbours = hook,
        file_buffered_write_zeroes_no_unmap_reads_zeros_keeps_neighbours = file_buffered,
        file_direct_write_zeroes_no_unmap_reads_zeros_keeps_neighbours = file_direct,
        null_write_zeroes_no_unmap_reads_zeros_keeps_neighbours = null;
    discard_keeps_neighbours:
        memory_discard_keeps_neighbours = memory,
        hook_discard_keeps_neighbours = hook,
        file_buffered_discard_keeps_neighbours = file_buffered,
        file_direct_discard_keeps_neighbours = file_direct,
        null_discard_keeps_neighbours = null;
    resize_shrink_then_grow_reads_zeros:
        memory_resize_shrink_then_grow_reads_zeros = memory,
        hook_resize_shrink_then_grow_reads_zeros = hook,
        file_buffered_resize_shrink_then_grow_reads_zeros = file_buffered,
        file_direct_resize_shrink_then_grow_reads_zeros = file_direct,
        null_resize_shrink_then_grow_reads_zeros = null;
    resize_prealloc_off_grows_sparse:
        memory_resize_prealloc_off_grows_sparse = memory,
        hook_resize_prealloc_off_grows_sparse = hook,
        file_buffered_resize_prealloc_off_grows_sparse = file_buffered,
        file_direct_resize_prealloc_off_grows_sparse = file_direct,
        null_resize_prealloc_off_grows_sparse = null;
    resize_prealloc_falloc_grows_and_allocates:
        memory_resize_prealloc_falloc_grows_and_allocates = memory,
        hook_resize_prealloc_falloc_grows_and_allocates = hook,
        file_buffered_resize_prealloc_falloc_grows_and_allocates = file_buffered,
        file_direct_resize_prealloc_falloc_grows_and_allocates = file_direct,
        null_resize_prealloc_falloc_grows_and_allocates = null;
    resize_prealloc_full_grows_and_allocates:
        memory_resize_prealloc_full_grows_and_allocates = memory,
        hook_resize_prealloc_full_grows_and_allocates = hook,
        file_buffered_resize_prealloc_full_grows_and_allocates = file_buffered,
        file_direct_resize_prealloc_full_grows_and_allocates = file_direct,
        null_resize_prealloc_full_grows_and_allocates = null;
    extent_reports_holes_and_data:
        memory_extent_reports_holes_and_data = memory,
        hook_extent_reports_holes_and_data = hook,
        file_buffered_extent_reports_holes_and_data = file_buffered,
        file_direct_extent_reports_holes_and_data = file_direct,
        null_extent_reports_holes_and_data = null;
    flush_and_sync_succeed:
        memory_flush_and_sync_succeed = memory,
        hook_flush_and_sync_succeed = hook,
        file_buffered_flush_and_sync_succeed = file_buffered,
        file_direct_flush_and_sync_succeed = file_direct,
        null_flush_and_sync_succeed = null;
    // NullStorage has no read-only mode.
    read_only_refuses_writes:
        memory_read_only_refuses_writes = memory_read_only,
        hook_read_only_refuses_writes = hook_read_only,
        file_buffered_read_only_refuses_writes = file_buffered_read_only,
        file_direct_read_only_refuses_writes = file_direct_read_only;
    alignment_is_reported_and_enforced:
        memory_alignment_is_reported_and_enforced = memory,
        hook_alignment_is_reported_and_enforced = hook,
        file_buffered_alignment_is_reported_and_enforced = file_buffered,
        file_direct_alignment_is_reported_and_enforced = file_direct,
        file_direct_inline_alignment_is_reported_and_enforced = file_direct_inline,
        null_alignment_is_reported_and_enforced = null;
    allocate_keeps_bytes_and_size:
        memory_allocate_keeps_bytes_and_size = memory,
        file_buffered_allocate_keeps_bytes_and_size = file_buffered,
        file_direct_allocate_keeps_bytes_and_size = file_direct,
        null_allocate_keeps_bytes_and_size = null;
    resolve_name_follows_the_file:
        memory_resolve_name_follows_the_file = memory,
        hook_resolve_name_follows_the_file = hook,
        file_buffered_resolve_name_follows_the_file = file_buffered,
        file_direct_resolve_name_follows_the_file = file_direct,
        null_resolve_name_follows_the_file = null;
}

conformance_mt! {
    concurrent_block_writes:
        memory_concurrent_block_writes = memory,
        hook_concurrent_block_writes = hook,
        file_buffered_concurrent_block_writes = file_buffered,
        file_direct_concurrent_block_writes = file_direct,
        file_inline_concurrent_block_writes = file_inline,
        file_direct_inline_concurrent_block_writes = file_direct_inline,
        null_concurrent_block_writes = null;
    concurrent_zeroes_and_writes_past_end:
        memory_concurrent_zeroes_and_writes_past_end = memory,
        hook_concurrent_zeroes_and_writes_past_end = hook,
        file_buffered_concurrent_zeroes_and_writes_past_end = file_buffered,
        file_direct_concurrent_zeroes_and_writes_past_end = file_direct,
        file_inline_concurrent_zeroes_and_writes_past_end = file_inline,
        null_concurrent_zeroes_and_writes_past_end = null;
    large_writes_roundtrip:
        memory_large_writes_roundtrip = memory,
        hook_large_writes_roundtrip = hook,
        file_buffered_large_writes_roundtrip = file_buffered,
        file_direct_large_writes_roundtrip = file_direct,
        file_inline_large_writes_roundtrip = file_inline,
        file_direct_inline_large_writes_roundtrip = file_direct_inline,
        null_large_writes_roundtrip = null;
}
