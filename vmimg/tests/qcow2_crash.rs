//! Crash simulation: random workloads on qcow2 images over a storage that, at a simulated
//! crash, keeps a random subset of the writes made since the last sync (some torn).
//!
//! Crash images are taken between operations, at the end of every run, and *inside*
//! operations: the storage hook below takes one just before some of the syncs the
//! library issues (the moment with the most writes in flight: a crash at any earlier moment
//! is one of its random subsets), so the ordering inside a flush, an L1 table move, a
//! refcount table move or a resize is tested too.
//!
//! After every crash, with `S` the virtual size the image then has:
//! - `check` finds no corruption (leaks are allowed; lazy-refcount images are repaired
//!   first, as QEMU does) and the image opens;
//! - `S` is one of the sizes the image had since the last successful `sync` (the synced size
//!   or one set by a resize after it, finished or in progress);
//! - every byte below `S` not written since the last `sync` (by a write, zeroing, discard,
//!   compressed write, or by a shrink that cut it off) reads as it did at that sync; bytes
//!   past the size at that sync that nothing wrote since read as zeros (no stale data shows
//!   through space a grow exposed);
//! - grown back to the largest size the run ever had, the image reads the same way past `S`:
//!   space that becomes visible reads as zeros, whatever the crash left past the end.
//!
//! At the end of every run, the running image itself must read as last written.
//!
//! `flush` only pushes caches down; `sync` is the durability point. Three workloads:
//! - general: writes, zeroing, discards, compressed writes (a sixth of the runs use 512-byte
//!   clusters, 64-bit refcounts and writes of up to 256 KiB from a file just short of 2 MiB,
//!   so that the refcount table outgrows its first cluster and moves);
//! - compressed: the run starts from a synced image whose first clusters are mostly
//!   compressed, and most operations are small ones over them (copy-on-write of compressed
//!   clusters, compressed rewrites freeing shared host clusters);
//! - resize: the general operations plus grows (to the middle of a cluster, past the L1
//!   table's coverage so that it moves, preallocated) and shrinks (to the middle of a
//!   cluster too), between 1 MiB and a few GiB; the model is sparse, so a large virtual size
//!   costs nothing.
//!
//! Each prints how many crash points it simulated, and in how many runs the L1 table and the
//! refcount table moved (checked to be some at 50 runs or more).
//!
//! `VMIMG_CRASH_RUNS=N` runs N workloads per test (default 50; CI also runs 1000 in release),
//! `VMIMG_CRASH_FIRST=K` starts at run K, `VMIMG_CRASH_TRACE=1` prints every operation. A
//! failure names the workload, run and seed: rerun it alone with
//! `VMIMG_CRASH_FIRST=<run> VMIMG_CRASH_RUNS=1 VMIMG_CRASH_TRACE=1 cargo test --release -p
//! vmimg --test qcow2_crash <test name> -- --nocapture`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use vmimg::qcow2::check::{check, Repair};
use vmimg::qcow2::types::Geometry;
use vmimg::qcow2::{CompressionType, Header};
use vmimg::storage::{BoxFuture, HookStorage, StorageHook, StorageOp};
use vmimg::{
    DiscardMode, FaultKind, FaultOp, FaultStorage, Image, MemoryStorage, PreallocMode, Qcow2Create,
    Qcow2Open, Storage, StorageExt,
};

const SIZE: u64 = 4 << 20;
const CRASHES_PER_RUN: u64 = 4;
/// Granularity of the sparse model.
const CHUNK: u64 = 64 << 10;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn trace() -> bool {
    std::env::var("VMIMG_CRASH_TRACE").is_ok()
}

/// One 64 KiB piece of the guest disk, as the model knows it.
struct Chunk {
    /// Content as the image should read it now.
    current: Vec<u8>,
    /// Content as of the last successful sync.
    synced: Vec<u8>,
    /// Bytes changed since the last sync: undetermined after a crash.
    touched: Vec<bool>,
}

impl Chunk {
    fn new() -> Self {
        Chunk {
            current: vec![0; CHUNK as usize],
            synced: vec![0; CHUNK as usize],
            touched: vec![false; CHUNK as usize],
        }
    }
}

/// The guest disk as it should read, now and after a crash. Sparse: a chunk exists once
/// something was written into it; every byte outside the chunks reads zero, now and as
/// synced. Invariant: `current` is zero past `size`, so `synced` is zero past the synced
/// size.
struct Model {
    chunks: BTreeMap<u64, Chunk>,
    /// The virtual size now.
    size: u64,
    /// Sizes the image has had since the last sync, the synced one first.
    sizes: Vec<u64>,
    /// The largest size the image ever had.
    max_size: u64,
}

impl Model {
    fn new(size: u64) -> Self {
        Model {
            chunks: BTreeMap::new(),
            size,
            sizes: vec![size],
            max_size: size,
        }
    }

    /// Calls `f(chunk, range in the chunk, offset in the request)` for each chunk piece of
    /// `[off, off + len)`; missing chunks are created with `create`, else skipped.
    fn pieces(
        &mut self,
        off: u64,
        len: u64,
        create: bool,
        mut f: impl FnMut(&mut Chunk, Range<usize>, usize),
    ) {
        if len == 0 {
            return;
        }
        let end = off + len;
        let piece = |idx: u64| {
            let a = off.max(idx * CHUNK);
            let b = end.min((idx + 1) * CHUNK);
            (
                (a - idx * CHUNK) as usize..(b - idx * CHUNK) as usize,
                (a - off) as usize,
            )
        };
        if create {
            for idx in off / CHUNK..=(end - 1) / CHUNK {
                let (r, at) = piece(idx);
                f(self.chunks.entry(idx).or_insert_with(Chunk::new), r, at);
            }
        } else {
            for (&idx, chunk) in self.chunks.range_mut(off / CHUNK..=(end - 1) / CHUNK) {
                let (r, at) = piece(idx);
                f(chunk, r, at);
            }
        }
    }

    fn set(&mut self, off: u64, data: &[u8]) {
        self.pieces(off, data.len() as u64, true, |c, r, at| {
            c.current[r.clone()].copy_from_slice(&data[at..at + r.len()]);
            c.touched[r].fill(true);
        });
    }

    /// The range reads zero now; only chunks that exist can read anything else.
    fn zero(&mut self, off: u64, len: u64) {
        self.pieces(off, len, false, |c, r, _| {
            c.current[r.clone()].fill(0);
            c.touched[r].fill(true);
        });
    }

    /// The range is undetermined (a failed write: some of it may have landed).
    fn touch(&mut self, off: u64, len: u64) {
        self.pieces(off, len, true, |c, r, _| c.touched[r].fill(true));
    }

    /// A resize (applied before it starts: crashes inside it may leave either size). A shrink
    /// cuts the tail off: after a crash it may read as before or as zeros.
    fn resize(&mut self, new_size: u64) {
        if new_size < self.size {
            self.zero(new_size, self.size - new_size);
        }
        self.size = new_size;
        self.sizes.push(new_size);
        self.max_size = self.max_size.max(new_size);
    }

    /// A successful sync.
    fn synced(&mut self) {
        for c in self.chunks.values_mut() {
            c.synced.copy_from_slice(&c.current);
            c.touched.fill(false);
        }
        self.sizes = vec![self.size];
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum View {
    /// The image as it runs: every byte as last written.
    Live,
    /// A crash image: bytes not written since the last sync, as synced.
    Crashed,
}

/// Compares guest bytes `[from, to)` of `img` with the model: the chunks byte by byte, and
/// everything the image maps as data outside them must read zero.
async fn compare(img: &Image, model: &Model, view: View, from: u64, to: u64, what: &str) {
    if from >= to {
        return;
    }
    for (&idx, chunk) in model.chunks.range(from / CHUNK..=(to - 1) / CHUNK) {
        let a = (idx * CHUNK).max(from);
        let b = ((idx + 1) * CHUNK).min(to);
        let mut buf = vec![0u8; (b - a) as usize];
        img.read(a, &mut buf)
            .await
            .unwrap_or_else(|e| panic!("{what}: read at {a:#x} failed: {e}"));
        let r = (a - idx * CHUNK) as usize..(b - idx * CHUNK) as usize;
        let (want, touched) = match view {
            View::Live => (&chunk.current[r.clone()], None),
            View::Crashed => (&chunk.synced[r.clone()], Some(&chunk.touched[r.clone()])),
        };
        // Blocks that match need no look at `touched` (most of them, so this stays fast).
        let bad = buf
            .chunks(64)
            .zip(want.chunks(64))
            .enumerate()
            .filter(|(_, (got, want))| got != want)
            .find_map(|(n, (got, want))| {
                got.iter().zip(want).enumerate().find_map(|(k, (g, w))| {
                    let i = n * 64 + k;
                    (g != w && !touched.is_some_and(|t| t[i])).then_some(i)
                })
            });
        if let Some(k) = bad {
            let state = match view {
                View::Live => "was last written there",
                View::Crashed => "was synced there",
            };
            panic!(
                "{what}: byte {:#x} reads {:#x}, but {:#x} {state}",
                a + k as u64,
                buf[k],
                want[k]
            );
        }
    }
    let mut pos = from;
    while pos < to {
        let st = img
            .block_status(pos, to - pos)
            .await
            .unwrap_or_else(|e| panic!("{what}: block status at {pos:#x} failed: {e}"));
        let end = pos + st.len;
        if st.data() {
            let mut p = pos;
            while p < end {
                let idx = p / CHUNK;
                let q = ((idx + 1) * CHUNK).min(end);
                if !model.chunks.contains_key(&idx) {
                    let mut buf = vec![0u8; (q - p) as usize];
                    img.read(p, &mut buf)
                        .await
                        .unwrap_or_else(|e| panic!("{what}: read at {p:#x} failed: {e}"));
                    if let Some(k) = buf.iter().position(|&b| b != 0) {
                        panic!(
                            "{what}: byte {:#x} reads {:#x}, but nothing was ever written there \
                             ({st:?})",
                            p + k as u64,
                            buf[k]
                        );
                    }
                }
                p = q;
            }
        }
        pos = end;
    }
}

/// Every 20th crash image without lazy refcounts (QEMU repairs those on open instead) also
/// goes through `qemu-img check`, which must agree that nothing is corrupt: exit status 0,
/// or 3 for leaked clusters.
fn qemu_agrees(bytes: &[u8], what: &str) {
    static SEEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if SEEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 20 != 0 {
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("crash.qcow2");
    std::fs::write(&path, bytes).expect("write the crash image");
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img ({e}): apt-get install qemu-utils"));
    let code = out.status.code();
    assert!(
        matches!(code, Some(0) | Some(3)),
        "{what}: qemu-img check finds corruption (exit {code:?}):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Checks one crash image: consistent (after repair for lazy images), opens, has one of the
/// sizes of the model since its last sync, reads as synced, and reads zeros past its end once
/// grown back to the model's largest size. Returns the size it has.
async fn verify_crash(bytes: Vec<u8>, model: &Model, lazy: bool, what: &str) -> u64 {
    if !lazy {
        qemu_agrees(&bytes, what);
    }
    let s: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(&bytes));
    let report = check(s.as_ref(), if lazy { Repair::All } else { Repair::None })
        .await
        .unwrap_or_else(|e| panic!("{what}: check failed: {e}"));
    let left = report.corruptions - report.corruptions_fixed;
    if (left, report.check_errors, report.failure.is_some()) != (0, 0, false) {
        // Leaks are allowed and may be thousands: show the rest.
        let found: Vec<_> = report
            .messages
            .iter()
            .filter(|m| !m.starts_with("Leaked cluster"))
            .collect();
        panic!(
            "{what}: {left} corruptions, {} check errors, failure {:?}, {} leaks: {found:#?}",
            report.check_errors, report.failure, report.leaks
        );
    }
    let img = Qcow2Open::storage(s.clone())
        .writable(true)
        .open()
        .await
        .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
    let size = img.size();
    assert!(
        model.sizes.contains(&size),
        "{what}: the image has size {size:#x}, but since the last sync it only had sizes {:#x?}",
        model.sizes
    );
    compare(&img, model, View::Crashed, 0, size, what).await;
    if model.max_size > size {
        img.resize(model.max_size, PreallocMode::Off)
            .await
            .unwrap_or_else(|e| panic!("{what}: growing back failed: {e}"));
        let what = format!("{what}, grown back from {size:#x}");
        compare(&img, model, View::Crashed, size, model.max_size, &what).await;
        img.flush().await.unwrap();
        let report = check(s.as_ref(), Repair::None).await.unwrap();
        assert_eq!(
            (report.corruptions, report.check_errors),
            (0, 0),
            "{what}: {report:?}"
        );
    }
    size
}

/// Takes crash images of a [`FaultStorage`] inside operations: just before some of the syncs
/// it is asked for, at most `budget` of them.
#[derive(Debug)]
struct CrashAtSyncs {
    state: Mutex<Capture>,
}

#[derive(Debug)]
struct Capture {
    rng: fastrand::Rng,
    one_in: u32,
    budget: u32,
    /// (seed, crash image, syncs seen before it)
    images: Vec<(u64, Vec<u8>, u64)>,
    syncs: u64,
}

impl CrashAtSyncs {
    fn new(seed: u64) -> Self {
        CrashAtSyncs {
            state: Mutex::new(Capture {
                rng: fastrand::Rng::with_seed(seed),
                one_in: 0,
                budget: 0,
                images: Vec::new(),
                syncs: 0,
            }),
        }
    }

    /// From now on, takes a crash image at one sync in `one_in`, `budget` at most.
    fn capture(&self, one_in: u32, budget: u32) {
        let mut st = self.state.lock().unwrap();
        st.one_in = one_in;
        st.budget = budget;
    }

    fn take(&self) -> Vec<(u64, Vec<u8>, u64)> {
        std::mem::take(&mut self.state.lock().unwrap().images)
    }
}

impl StorageHook<FaultStorage> for CrashAtSyncs {
    fn before<'a>(&'a self, fault: &'a FaultStorage, op: StorageOp) -> BoxFuture<'a, ()> {
        if op == StorageOp::Sync {
            let mut guard = self.state.lock().unwrap();
            let st = &mut *guard;
            st.syncs += 1;
            if st.budget > 0 && st.one_in > 0 && st.rng.u32(0..st.one_in) == 0 {
                st.budget -= 1;
                let seed = st.rng.u64(..);
                let syncs = st.syncs;
                let image = fault.crash_image(seed);
                st.images.push((seed, image, syncs));
            }
        }
        Box::pin(async {})
    }
}

/// A [`FaultStorage`] that also takes crash images inside operations (see [`CrashAtSyncs`]).
type Crashing = HookStorage<FaultStorage, CrashAtSyncs>;

/// What a workload does besides writes, zeroing, discards, compressed writes, flushes and
/// syncs.
#[derive(Clone, Copy, Debug)]
struct Flavor {
    name: &'static str,
    seed: u64,
    /// Start from a synced image whose first clusters are mostly compressed, and aim most
    /// operations (small, partial-cluster ones) at them.
    prefill_compressed: bool,
    /// Resizes among the operations.
    resize: bool,
}

const GENERAL: Flavor = Flavor {
    name: "general",
    seed: 0xc0ffee,
    prefill_compressed: false,
    resize: false,
};

const COMPRESSED: Flavor = Flavor {
    name: "compressed",
    seed: 0xc0c0_0000,
    prefill_compressed: true,
    resize: false,
};

const RESIZE: Flavor = Flavor {
    name: "resize",
    seed: 0x5153_0000,
    prefill_compressed: false,
    resize: true,
};

fn create_options(rng: &mut fastrand::Rng, flavor: Flavor) -> (Qcow2Create, bool) {
    let lazy = rng.u8(0..4) == 0;
    let mut extended = rng.u8(0..4) == 0;
    let mut cluster = if extended {
        [16384, 65536][rng.usize(0..2)]
    } else {
        [512, 4096, 65536][rng.usize(0..3)]
    };
    let mut refcount_bits = [1, 4, 16, 64][rng.usize(0..4)];
    if !flavor.resize && !flavor.prefill_compressed && rng.u8(0..6) == 0 {
        // One refcount table cluster covers 2 MiB of file here: the big writes of the
        // workload make it move (see `Workload::big_writes`).
        (extended, cluster, refcount_bits) = (false, 512, 64);
    }
    let mut create = Qcow2Create::new(SIZE)
        .cluster_size(cluster)
        .refcount_bits(refcount_bits)
        .extended_l2(extended)
        .lazy_refcounts(lazy);
    if rng.u8(0..3) == 0 {
        create = create.compression_type(CompressionType::Zstd);
    }
    if (flavor.resize || flavor.prefill_compressed) && rng.u8(0..6) == 0 {
        // Version 2: no zero flag, so zeroing and the zeros of a grow are written out.
        let create = Qcow2Create::new(SIZE)
            .cluster_size(cluster.min(65536))
            .compat("0.10")
            .unwrap();
        return (create, false);
    }
    (create, lazy)
}

/// A cluster's worth of data: mostly compressible runs, sometimes random (which the library
/// then stores uncompressed).
fn cluster_data(rng: &mut fastrand::Rng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    if rng.u8(0..8) == 0 {
        rng.fill(&mut v);
        return v;
    }
    let mut pos = 0;
    while pos < len {
        let n = rng.usize(1..=(len / 3).max(1)).min(len - pos);
        v[pos..pos + n].fill(rng.u8(..));
        pos += n;
    }
    v
}

/// A workload over one image.
struct Workload<'a> {
    img: &'a Image,
    /// The storage, when it takes crash images inside operations.
    storage: Option<Arc<Crashing>>,
    lazy: bool,
    /// Names the run and the operation in messages.
    label: String,
    stats: Stats,
    model: Model,
    rng: fastrand::Rng,
    flavor: Flavor,
    geometry: Geometry,
    /// Operations aim at `[0, hot)` most of the time.
    hot: u64,
    /// Largest size a resize may choose.
    max_size: u64,
    /// Writes of up to 256 KiB too, so that the file outgrows what the first refcount
    /// table cluster covers (2 MiB with 512-byte clusters and 64-bit refcounts).
    big_writes: bool,
}

impl Workload<'_> {
    /// Fails the test with the run's label when an operation fails.
    fn ok(&self, r: vmimg::Result<()>, op: &str) {
        if let Err(e) = r {
            panic!("{}: {op} failed: {e}", self.label);
        }
    }

    /// Checks the crash images taken inside the last operation.
    async fn verify_captured(&mut self) {
        let Some(storage) = self.storage.clone() else {
            return;
        };
        for (seed, bytes, syncs) in storage.hook().take() {
            let what = format!("{} inside, at sync {syncs} (crash seed {seed})", self.label);
            let size = verify_crash(bytes, &self.model, self.lazy, &what).await;
            self.stats.count(&self.model, size, Where::Inside);
        }
    }

    /// Checks a crash image taken now.
    async fn crash_now(&mut self, seed: u64, place: Where) {
        let storage = self.storage.clone().expect("a crashing storage");
        let what = format!("{} {place:?} (crash seed {seed})", self.label);
        let size = verify_crash(
            storage.inner().crash_image(seed),
            &self.model,
            self.lazy,
            &what,
        )
        .await;
        self.stats.count(&self.model, size, place);
    }

    /// A range inside the image for the next operation.
    fn range(&mut self, max_len: u64) -> (u64, u64) {
        let size = self.model.size;
        let cs = self.geometry.cluster_size();
        let rng = &mut self.rng;
        let len = match rng.u8(0..4) {
            0 => rng.u64(1..1000),
            1 if self.big_writes && rng.bool() => rng.u64(1..256 << 10),
            1 => rng.u64(1..70_000),
            2 => 4096 * rng.u64(1..20),
            _ => rng.u64(1..=2 * cs),
        }
        .min(max_len)
        .min(size);
        let region = match rng.u8(0..10) {
            0..=6 => 0..self.hot.min(size),
            7 | 8 if self.flavor.resize => size.saturating_sub(4 * cs.max(CHUNK))..size,
            _ => 0..size,
        };
        let start = region.start.min(size - len);
        let end = region.end.max(start + len);
        (rng.u64(start..=end - len), len)
    }

    async fn op(&mut self) {
        let kinds = 12 + if self.flavor.resize { 2 } else { 0 };
        let kind = self.rng.u8(0..kinds);
        match kind {
            0..=5 => {
                let (off, len) = self.range(u64::MAX);
                let data = vec![self.rng.u8(1..); len as usize];
                if trace() {
                    eprintln!("write {off:#x}+{len:#x} = {:#x}", data[0]);
                }
                self.model.set(off, &data);
                let r = self.img.write(off, &data).await;
                self.ok(r, "write");
            }
            6 | 7 => {
                let (off, len) = self.range(1 << 20);
                let unmap = self.rng.bool();
                if trace() {
                    eprintln!("write_zeroes {off:#x}+{len:#x} unmap {unmap}");
                }
                self.model.zero(off, len);
                let r = self.img.write_zeroes(off, len, unmap).await;
                self.ok(r, "write_zeroes");
            }
            8 if self.rng.bool() => {
                // Pushes metadata down but promises no durability: the model is unchanged.
                if trace() {
                    eprintln!("flush");
                }
                let r = self.img.flush().await;
                self.ok(r, "flush");
            }
            8 => {
                let (off, len) = self.range(1 << 20);
                if trace() {
                    eprintln!("discard {off:#x}+{len:#x}");
                }
                self.model.zero(off, len);
                let r = self.img.discard(off, len, DiscardMode::ReadsZero).await;
                self.ok(r, "discard");
            }
            9 => {
                // Durability point: everything acknowledged so far must survive a crash.
                if trace() {
                    eprintln!("sync");
                }
                let r = self.img.sync().await;
                self.ok(r, "sync");
                // Crashes inside the sync happened before it succeeded.
                self.verify_captured().await;
                self.model.synced();
            }
            10 | 11 => self.write_compressed().await,
            12 | 13 => self.resize().await,
            _ => unreachable!("kind {kind}"),
        }
    }

    /// Writes one cluster compressed: a whole one, or the image's last, partial one.
    async fn write_compressed(&mut self) {
        let cs = self.geometry.cluster_size();
        let size = self.model.size;
        let (off, _) = self.range(1);
        let off = off / cs * cs;
        let len = cs.min(size - off);
        let data = cluster_data(&mut self.rng, len as usize);
        if trace() {
            eprintln!("write_compressed {off:#x}+{len:#x}");
        }
        self.model.set(off, &data);
        let r = self.img.write_compressed(off, &data).await;
        self.ok(r, "write_compressed");
    }

    /// Grows (a little, often to the middle of a cluster; or past the L2 coverage of the L1
    /// table, which then moves) or shrinks (anywhere above 1 MiB, often to the middle of a
    /// cluster).
    async fn resize(&mut self) {
        let g = self.geometry;
        let (cs, cov) = (g.cluster_size(), g.l2_coverage());
        let size = self.model.size;
        let rng = &mut self.rng;
        let new_size = match rng.u8(0..10) {
            0..=3 => size + 512 * rng.u64(1..=2 * cs / 512 + 8),
            4 | 5 => (size / cov + rng.u64(1..=2)) * cov + 512 * rng.u64(0..=2 * cs / 512),
            6 | 7 => size.saturating_sub(512 * rng.u64(1..=2 * cs / 512 + 8)),
            _ => (1 << 20) + 512 * rng.u64(0..=size.saturating_sub(1 << 20) / 512),
        }
        .clamp(1 << 20, self.max_size);
        if new_size == size {
            return;
        }
        let prealloc = if new_size > size && new_size - size <= 1 << 20 && rng.u8(0..6) == 0 {
            [
                PreallocMode::Metadata,
                PreallocMode::Falloc,
                PreallocMode::Full,
            ][rng.usize(0..3)]
        } else {
            PreallocMode::Off
        };
        if trace() {
            eprintln!("resize {size:#x} -> {new_size:#x} ({prealloc:?})");
        }
        self.model.resize(new_size);
        let r = self.img.resize(new_size, prealloc).await;
        self.ok(r, "resize");
        assert_eq!(self.img.size(), new_size);
    }
}

/// Reads the header as the storage holds it now.
async fn header_of(storage: &dyn Storage) -> Header {
    let mut buf = vec![0u8; (64 << 10).min(storage.size().unwrap()) as usize];
    storage.read_at(0, &mut buf).await.unwrap();
    Header::parse(&buf).unwrap()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Where {
    Between,
    Inside,
    AtEnd,
}

#[derive(Debug, Default)]
struct Stats {
    runs: u64,
    /// Crash images checked: between operations, inside them, at the end of runs.
    between: u64,
    inside: u64,
    at_end: u64,
    /// Runs whose L1 table, refcount table moved.
    l1_moves: u64,
    reftable_moves: u64,
    /// Crash images whose size was not the one the model synced last.
    other_sizes: u64,
    /// Crash images that were grown back to check the space past their end.
    regrown: u64,
}

impl Stats {
    fn count(&mut self, model: &Model, size: u64, place: Where) {
        match place {
            Where::Between => self.between += 1,
            Where::Inside => self.inside += 1,
            Where::AtEnd => self.at_end += 1,
        }
        self.other_sizes += u64::from(size != model.sizes[0]);
        self.regrown += u64::from(size < model.max_size);
    }
}

async fn crash_runs(flavor: Flavor) -> Stats {
    let runs = env_u64("VMIMG_CRASH_RUNS", 50);
    let first = env_u64("VMIMG_CRASH_FIRST", 0);
    let mut stats = Stats::default();
    for run in first..first + runs {
        let seed = flavor.seed + run;
        let mut rng = fastrand::Rng::with_seed(seed);
        let storage = Arc::new(Crashing::new(FaultStorage::new(), CrashAtSyncs::new(seed)));
        let (create, lazy) = create_options(&mut rng, flavor);
        create.create_on(storage.as_ref(), None).await.unwrap();
        storage.sync().await.unwrap();
        let h0 = header_of(storage.as_ref()).await;
        let geometry = h0.geometry();
        let cs = geometry.cluster_size();
        let img = Qcow2Open::storage(storage.clone())
            .writable(true)
            .open()
            .await
            .unwrap();
        let hot = if flavor.prefill_compressed {
            (32 * cs).clamp(64 << 10, 2 << 20)
        } else {
            SIZE
        };
        let label = format!("{} run {run} (seed {seed}, {create:?})", flavor.name);
        if trace() {
            eprintln!("{label}");
        }
        let mut w = Workload {
            img: &img,
            storage: Some(storage.clone()),
            lazy,
            label: label.clone(),
            stats,
            model: Model::new(SIZE),
            rng,
            flavor,
            geometry,
            hot,
            max_size: (16 << 20).max(3 * geometry.l2_coverage() + SIZE),
            big_writes: cs == 512 && h0.refcount_bits() == 64,
        };
        if flavor.prefill_compressed {
            // Most clusters of the hot area compressed, a few plain, some left unallocated;
            // all synced.
            for off in (0..hot).step_by(cs as usize) {
                let data = cluster_data(&mut w.rng, cs as usize);
                let r = match w.rng.u8(0..8) {
                    0 => continue,
                    1 => img.write(off, &data).await,
                    _ => img.write_compressed(off, &data).await,
                };
                w.ok(r, "prefill");
                w.model.set(off, &data);
            }
            let r = img.sync().await;
            w.ok(r, "prefill sync");
            w.model.synced();
        }
        if w.big_writes {
            // Data and metadata just short of the 2 MiB of file the first refcount table
            // cluster covers (the file takes about 1.04 times the data).
            let len = (1740 << 10) + 512 * w.rng.u64(0..400);
            let data = cluster_data(&mut w.rng, len as usize);
            img.write(SIZE - len, &data).await.unwrap();
            img.sync().await.unwrap();
            w.model.set(SIZE - len, &data);
            w.model.synced();
        }
        // Moves of the tables count from here: made by the workload, crashes around them.
        let h1 = header_of(storage.as_ref()).await;
        storage.hook().capture(6, 3);
        let ops = w.rng.usize(if w.big_writes { 20 } else { 5 }..40);
        for i in 0..ops {
            w.label = format!("{label} op {i}");
            w.op().await;
            w.verify_captured().await;
            if w.rng.u8(0..8) == 0 {
                let crash_seed = w.rng.u64(..);
                w.crash_now(crash_seed, Where::Between).await;
            }
        }
        storage.hook().capture(0, 0);
        w.label = format!("{label} at the end");
        for k in 0..CRASHES_PER_RUN {
            w.crash_now(run * 100 + k, Where::AtEnd).await;
        }
        // The running image itself reads as written.
        let size = w.model.size;
        compare(
            &img,
            &w.model,
            View::Live,
            0,
            size,
            &format!("{label} live"),
        )
        .await;
        stats = w.stats;
        img.flush().await.unwrap();
        let h = header_of(storage.as_ref()).await;
        stats.l1_moves += u64::from(h.l1_table_offset != h1.l1_table_offset);
        stats.reftable_moves += u64::from(h.refcount_table_offset != h1.refcount_table_offset);
        stats.runs += 1;
    }
    eprintln!(
        "{}: {} crash points simulated over {} runs ({} between operations, {} inside \
         operations, {} at the end of runs); {} with a size other than the synced one, {} grown \
         back; L1 table moved in {} runs, refcount table in {}",
        flavor.name,
        stats.between + stats.inside + stats.at_end,
        stats.runs,
        stats.between,
        stats.inside,
        stats.at_end,
        stats.other_sizes,
        stats.regrown,
        stats.l1_moves,
        stats.reftable_moves
    );
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_crashes_leave_consistent_images_that_keep_flushed_data() {
    let stats = crash_runs(GENERAL).await;
    if stats.runs >= 50 {
        // Small clusters with wide refcounts outgrow the first refcount table cluster.
        assert!(stats.reftable_moves > 0, "{stats:?}");
    }
}

/// Copy-on-write over compressed clusters (partial writes, zeroing and discards that split
/// them, compressed rewrites that free shared host clusters) survives crashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_while_overwriting_compressed_clusters_keep_synced_data() {
    crash_runs(COMPRESSED).await;
}

/// Resizes among the operations: grows (to the middle of clusters, past the L1 table's
/// coverage so that it moves, with preallocation) and shrinks. After a crash the size is one
/// the image had since the last sync, the synced data below it is intact, and the space past
/// it reads as zeros once grown back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_around_resizes_keep_synced_data_within_the_surviving_size() {
    let stats = crash_runs(RESIZE).await;
    if stats.runs >= 50 {
        assert!(stats.l1_moves > 0, "{stats:?}");
        assert!(stats.regrown > 0, "{stats:?}");
    }
}

#[tokio::test]
async fn io_errors_reach_the_caller_and_leave_the_image_consistent() {
    for (op, nth, kind) in [
        (FaultOp::Write, 3, FaultKind::Eio),
        (FaultOp::Write, 5, FaultKind::NoSpace),
        (FaultOp::Write, 9, FaultKind::NoSpace),
        (FaultOp::Sync, 1, FaultKind::Eio),
        (FaultOp::Read, 4, FaultKind::Eio),
    ] {
        let storage = Arc::new(FaultStorage::new());
        Qcow2Create::new(SIZE)
            .cluster_size(4096)
            .create_on(storage.as_ref(), None)
            .await
            .unwrap();
        storage.sync().await.unwrap();
        let img = Qcow2Open::storage(storage.clone())
            .writable(true)
            .open()
            .await
            .unwrap();
        let mut w = Workload {
            img: &img,
            storage: None,
            lazy: false,
            label: String::new(),
            stats: Stats::default(),
            model: Model::new(SIZE),
            rng: fastrand::Rng::with_seed(nth),
            flavor: GENERAL,
            geometry: Geometry::new(12, false),
            hot: SIZE,
            max_size: SIZE,
            big_writes: false,
        };
        for _ in 0..5 {
            w.op().await;
        }
        img.sync().await.unwrap();
        let mut model = w.model;
        model.synced();
        storage.fail_nth(op, nth, kind);
        let mut failed = false;
        for i in 0..40u64 {
            let data = vec![(i as u8) | 1; 5000];
            let off = (i * 77_777) % (SIZE - 5000);
            let read_off = (i.saturating_sub(1) * 77_777) % (SIZE - 5000);
            let r = if i % 7 == 6 {
                img.sync().await
            } else if i % 5 == 4 {
                let mut buf = vec![0u8; 5000];
                img.read(read_off, &mut buf).await
            } else {
                img.write(off, &data).await
            };
            let wrote = i % 7 != 6 && i % 5 != 4;
            match r {
                Ok(()) if wrote => model.set(off, &data),
                Ok(()) => {}
                Err(e) => {
                    failed = true;
                    let expected = match kind {
                        FaultKind::Eio => libc::EIO,
                        FaultKind::NoSpace => libc::ENOSPC,
                    };
                    assert_eq!(e.errno(), expected, "{op:?} {nth}: {e}");
                    // The failed request's range is undetermined.
                    if wrote {
                        model.touch(off, 5000);
                    }
                }
            }
        }
        assert!(failed, "{op:?} {nth}: no failure surfaced");
        let _ = img.flush().await;
        // Whatever happened, the image as it stands (all writes applied) is consistent...
        let report = check(storage.as_ref(), Repair::None).await.unwrap();
        assert_eq!(report.corruptions, 0, "{op:?} {nth} {kind:?}: {report:?}");
        // ...and so is any crash from here.
        verify_crash(
            storage.crash_image(7),
            &model,
            false,
            &format!("{op:?} {nth}"),
        )
        .await;
    }
}
