//! Model-based fuzzing of the qcow2 write path: the input chooses creation options (cluster
//! size, refcount width, extended L2, lazy refcounts, compat 0.10/1.1, zstd, preallocation,
//! an external data file, a raw or qcow2 backing image built in memory, the L2 cache size,
//! a yield schedule for the storage) and up to 64 operations on an `Image` over memory
//! storage: writes (plain and vectored), write_zeroes, discards in every mode, compressed
//! writes, flush, sync, invalidate_cache, resize, amend, reopen, reads, block status
//! queries, groups of operations on disjoint ranges run concurrently, and requests that
//! must be refused. A `Vec<u8>` model holds the expected guest content (with the ranges a
//! `ReadsAnything` discard left undetermined).
//!
//! Checked: every operation the model expects to succeed succeeds, and every refused one is
//! refused with the right kind of error and changes nothing; the bytes around each
//! operation read back as the model says, and the whole disk does after every resize,
//! amend and reopen, every 16 operations and at the end; block status never calls a range
//! zero that the model says is not; after the final flush `check` finds no corruption, no
//! check error and no leak; a raw external data file reads as the guest disk. One input runs
//! within 20 s. `VMIMG_FUZZ_TRACE=1` prints the resolved operations as they run.

#![no_main]

#[path = "common.rs"]
mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use std::sync::atomic::{AtomicU64, Ordering};

use vmimg::qcow2::check::{check, Repair};
use vmimg::qcow2::{CompressionType, Qcow2Amend, Qcow2Driver};
use vmimg::storage::{BoxFuture, HookStorage, StorageHook, StorageOp};
use vmimg::{
    DiscardMode, ErrorKind, Image, ImplicitOpenPolicy, MemoryStorage, OpenOptions, PreallocMode,
    Qcow2Create, Qcow2Open, RawOpen, Storage, StorageExt,
};

/// Largest virtual size, of the image and of its backing image.
const MAX_SIZE: u64 = 8 << 20;
/// Most operations per input.
const MAX_OPS: usize = 64;
/// Most writes that build a qcow2 backing image.
const MAX_BACKING_WRITES: usize = 8;
/// Bound on one input.
const LIMIT: Duration = Duration::from_secs(20);
/// A whole-disk comparison after this many operations.
const VERIFY_EVERY: usize = 16;

// ---------------------------------------------------------------------------------------
// The input: creation options and operations.
// ---------------------------------------------------------------------------------------

/// Content of a write: a position-dependent function, so misplaced bytes show.
#[derive(Clone, Copy, Debug)]
enum Pattern {
    /// Every byte the same (compresses well; `Fill(0)` writes zeros).
    Fill(u8),
    /// Changes every 64 bytes (compresses, but not to nothing).
    Stripes(u8),
    /// A hash of the position (does not compress: compressed writes fall back).
    Noise(u8),
}

impl Pattern {
    fn byte(self, pos: u64) -> u8 {
        match self {
            Pattern::Fill(b) => b,
            Pattern::Stripes(s) => s ^ (pos / 64) as u8,
            Pattern::Noise(s) => {
                let x = (pos as u32 ^ (pos >> 32) as u32).wrapping_mul(0x9e37_79b1);
                (x >> 24) as u8 ^ (x >> 11) as u8 ^ s
            }
        }
    }

    /// The bytes of this pattern for guest range `[off, off + len)`.
    fn bytes(self, off: u64, len: u64) -> Vec<u8> {
        (off..off + len).map(|p| self.byte(p)).collect()
    }
}

impl<'a> Arbitrary<'a> for Pattern {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let b = u8::arbitrary(u)?;
        Ok(match u.int_in_range(0..=2)? {
            0 => Pattern::Fill(b),
            1 => Pattern::Stripes(b),
            _ => Pattern::Noise(b),
        })
    }
}

/// A guest range, resolved against the size at the time it runs (see [`Span::resolve`]).
#[derive(Clone, Copy, Debug)]
struct Span {
    off: u32,
    len: u32,
    /// Granularity: byte, sector, subcluster, cluster.
    align: u8,
    /// Length class (low two bits): within two units, eight, 64, anything up to the end;
    /// bit 7: a ragged end even for aligned spans.
    class: u8,
}

impl<'a> Arbitrary<'a> for Span {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Span {
            off: u.arbitrary()?,
            len: u.arbitrary()?,
            align: u.arbitrary()?,
            class: u.arbitrary()?,
        })
    }
}

impl Span {
    /// `(offset, length)` inside a disk of `size` bytes with clusters of `cs` bytes; the
    /// length is 0 only when the disk is empty.
    fn resolve(self, size: u64, cs: u64) -> (u64, u64) {
        if size == 0 {
            return (0, 0);
        }
        let unit = match self.align % 4 {
            0 => 1,
            1 => 512,
            2 => (cs / 32).max(512),
            _ => cs,
        };
        let off = (u64::from(self.off) % size.div_ceil(unit)) * unit;
        let room = size - off;
        let cap = match self.class % 4 {
            0 => 2 * unit,
            1 => 8 * unit,
            2 => 64 * unit,
            _ => room,
        };
        let max_units = room.min(cap).div_ceil(unit).max(1);
        let len = ((u64::from(self.len) % max_units) + 1) * unit;
        let len = if self.class & 0x80 != 0 {
            len.saturating_sub(u64::from(self.len >> 28)).max(1)
        } else {
            len
        };
        (off, len.min(room))
    }
}

#[derive(Clone, Copy, Debug)]
enum Discard {
    Zero,
    Anything,
    Backing,
}

impl Discard {
    fn mode(self) -> DiscardMode {
        match self {
            Discard::Zero => DiscardMode::ReadsZero,
            Discard::Anything => DiscardMode::ReadsAnything,
            Discard::Backing => DiscardMode::ReadsBacking,
        }
    }
}

impl<'a> Arbitrary<'a> for Discard {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u.int_in_range(0..=2)? {
            0 => Discard::Zero,
            1 => Discard::Anything,
            _ => Discard::Backing,
        })
    }
}

fn prealloc_mode(sel: u8) -> PreallocMode {
    match sel % 8 {
        5 => PreallocMode::Metadata,
        6 => PreallocMode::Falloc,
        7 => PreallocMode::Full,
        _ => PreallocMode::Off,
    }
}

/// One step of a concurrent group.
#[derive(Clone, Copy, Debug)]
enum Sub {
    Write(Span, Pattern),
    Zeroes(Span, bool),
    Discard(Span, Discard),
    Compressed(u32, Pattern),
    Read(Span),
    Flush,
}

impl Sub {
    fn name(&self) -> String {
        match self {
            Sub::Write(_, p) => format!("write ({p:?})"),
            Sub::Zeroes(_, unmap) => format!("write_zeroes (may_unmap {unmap})"),
            Sub::Discard(_, mode) => format!("discard ({mode:?})"),
            Sub::Compressed(_, p) => format!("write_compressed ({p:?})"),
            Sub::Read(_) => "read".into(),
            Sub::Flush => "flush".into(),
        }
    }
}

impl<'a> Arbitrary<'a> for Sub {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u.int_in_range(0..=9)? {
            0..=3 => Sub::Write(u.arbitrary()?, u.arbitrary()?),
            4 => Sub::Zeroes(u.arbitrary()?, u.arbitrary()?),
            5 => Sub::Discard(u.arbitrary()?, u.arbitrary()?),
            6 => Sub::Compressed(u.arbitrary()?, u.arbitrary()?),
            7 | 8 => Sub::Read(u.arbitrary()?),
            _ => Sub::Flush,
        })
    }
}

/// Requests the image must refuse.
#[derive(Clone, Copy, Debug)]
enum Refused {
    /// A write, zeroing, discard or read reaching past the end.
    PastEnd { what: u8, over: u16 },
    /// A compressed write at an unaligned offset or of less than a cluster.
    CompressedShape { cluster: u32, short: u16 },
    /// A resize to a size that is not a multiple of 512.
    ResizeUnaligned { size: u32 },
}

impl<'a> Arbitrary<'a> for Refused {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u.int_in_range(0..=2)? {
            0 => Refused::PastEnd {
                what: u.arbitrary()?,
                over: u.arbitrary()?,
            },
            1 => Refused::CompressedShape {
                cluster: u.arbitrary()?,
                short: u.arbitrary()?,
            },
            _ => Refused::ResizeUnaligned {
                size: u.arbitrary()?,
            },
        })
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        span: Span,
        pattern: Pattern,
        /// Split into this many slices (writev) when above 1.
        slices: u8,
    },
    WriteZeroes {
        span: Span,
        may_unmap: bool,
    },
    Discard {
        span: Span,
        mode: Discard,
    },
    WriteCompressed {
        cluster: u32,
        pattern: Pattern,
    },
    Read {
        span: Span,
        slices: u8,
    },
    BlockStatus {
        span: Span,
    },
    Flush,
    Sync,
    /// Drops cached metadata and decompressed clusters.
    InvalidateCache,
    Resize {
        size: u32,
        unit: u8,
        prealloc: u8,
    },
    Reopen {
        l2_cache: u8,
        check: bool,
    },
    Amend {
        compat: Option<bool>,
        lazy: Option<bool>,
        refcount_order: Option<u8>,
        size: Option<(u32, u8)>,
    },
    Concurrent(Vec<Sub>),
    Refused(Refused),
}

impl<'a> Arbitrary<'a> for Op {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u.int_in_range(0..=29)? {
            0..=7 => Op::Write {
                span: u.arbitrary()?,
                pattern: u.arbitrary()?,
                slices: u.int_in_range(1..=3)?,
            },
            8..=10 => Op::WriteZeroes {
                span: u.arbitrary()?,
                may_unmap: u.arbitrary()?,
            },
            11..=13 => Op::Discard {
                span: u.arbitrary()?,
                mode: u.arbitrary()?,
            },
            14..=15 => Op::WriteCompressed {
                cluster: u.arbitrary()?,
                pattern: u.arbitrary()?,
            },
            16..=17 => Op::Read {
                span: u.arbitrary()?,
                slices: u.int_in_range(1..=3)?,
            },
            18 => Op::BlockStatus {
                span: u.arbitrary()?,
            },
            19 => {
                if u.arbitrary()? {
                    Op::Flush
                } else {
                    Op::InvalidateCache
                }
            }
            20 => Op::Sync,
            21..=22 => Op::Resize {
                size: u.arbitrary()?,
                unit: u.arbitrary()?,
                prealloc: u.arbitrary()?,
            },
            23..=24 => Op::Reopen {
                l2_cache: u.arbitrary()?,
                check: u.arbitrary()?,
            },
            25 => Op::Amend {
                compat: u.arbitrary()?,
                lazy: u.arbitrary()?,
                refcount_order: if u.arbitrary()? {
                    Some(u.int_in_range(0..=6)?)
                } else {
                    None
                },
                size: u.arbitrary()?,
            },
            26..=28 => {
                let n = u.int_in_range(2..=4)?;
                let mut subs = Vec::with_capacity(n);
                for _ in 0..n {
                    subs.push(u.arbitrary()?);
                }
                Op::Concurrent(subs)
            }
            _ => Op::Refused(u.arbitrary()?),
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum DataFile {
    None,
    External,
    Raw,
}

#[derive(Clone, Debug)]
enum Backing {
    None,
    /// A raw image of `size` bytes filled with `pattern`.
    Raw {
        size: u64,
        pattern: Pattern,
    },
    /// A qcow2 image of `size` bytes with these writes (`compressed`: the whole cluster at
    /// the span's offset, compressed).
    Qcow2 {
        size: u64,
        cluster_bits: u32,
        writes: Vec<(Span, Pattern, bool)>,
    },
}

#[derive(Clone, Debug)]
struct Config {
    size: u64,
    cluster_bits: u32,
    refcount_order: u32,
    extended_l2: bool,
    lazy_refcounts: bool,
    v2: bool,
    zstd: bool,
    prealloc: PreallocMode,
    data_file: DataFile,
    backing: Backing,
    l2_cache: u8,
    /// Seed of the storage's yield schedule (0: never yields).
    schedule: u64,
}

#[derive(Clone, Debug)]
struct Plan {
    config: Config,
    ops: Vec<Op>,
}

/// A size up to [`MAX_SIZE`], a multiple of 512, mostly small.
fn arbitrary_size(u: &mut Unstructured<'_>) -> arbitrary::Result<u64> {
    let max = match u.int_in_range(0..=3)? {
        0 => 64 << 10,
        1 => 512 << 10,
        2 => 2 << 20,
        _ => MAX_SIZE,
    };
    Ok(u.int_in_range(0..=max / 512)? * 512)
}

impl<'a> Arbitrary<'a> for Config {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let v2 = u.ratio(1, 6)?;
        let extended_l2 = !v2 && u.ratio(1, 4)?;
        let cluster_bits = if extended_l2 {
            *u.choose(&[14, 16])?
        } else {
            *u.choose(&[9, 9, 12, 12, 16, 13, 10])?
        };
        let refcount_order = if v2 { 4 } else { u.int_in_range(0..=6)? };
        let lazy_refcounts = !v2 && u.ratio(1, 4)?;
        let zstd = !v2 && u.ratio(1, 4)?;
        let prealloc = prealloc_mode(u.arbitrary::<u8>()? / 2);
        let size = arbitrary_size(u)?;
        let data_file = match u.int_in_range(0..=9)? {
            _ if v2 => DataFile::None,
            0 => DataFile::External,
            1 => DataFile::Raw,
            _ => DataFile::None,
        };
        let backing = match u.int_in_range(0..=3)? {
            _ if matches!(data_file, DataFile::Raw) => Backing::None,
            0 => Backing::Raw {
                size: arbitrary_size(u)?,
                pattern: u.arbitrary()?,
            },
            1 => {
                let size = arbitrary_size(u)?;
                let cluster_bits = *u.choose(&[9, 12, 16])?;
                let n = u.int_in_range(0..=MAX_BACKING_WRITES)?;
                let mut writes = Vec::with_capacity(n);
                for _ in 0..n {
                    writes.push((u.arbitrary()?, u.arbitrary()?, u.ratio(1, 3)?));
                }
                Backing::Qcow2 {
                    size,
                    cluster_bits,
                    writes,
                }
            }
            _ => Backing::None,
        };
        Ok(Config {
            size,
            cluster_bits,
            refcount_order,
            extended_l2,
            lazy_refcounts,
            v2,
            zstd,
            prealloc,
            data_file,
            backing,
            l2_cache: u.arbitrary()?,
            schedule: if u.ratio(3, 4)? {
                u.arbitrary::<u64>()? | 1
            } else {
                0
            },
        })
    }
}

impl<'a> Arbitrary<'a> for Plan {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let config = u.arbitrary()?;
        let mut ops = Vec::new();
        while ops.len() < MAX_OPS && !u.is_empty() {
            ops.push(u.arbitrary()?);
        }
        Ok(Plan { config, ops })
    }
}

// ---------------------------------------------------------------------------------------
// Storage that yields to the executor.
// ---------------------------------------------------------------------------------------

/// Sometimes yields to the executor before a request runs and after a read or write
/// succeeded, on a schedule drawn from the input: memory requests never wait, so without
/// this the operations of a concurrent group would interleave only at lock contention.
#[derive(Debug)]
struct Schedule {
    /// xorshift state; 0: never yield.
    state: AtomicU64,
}

impl Schedule {
    fn new(seed: u64) -> Self {
        Schedule {
            state: AtomicU64::new(seed),
        }
    }

    async fn maybe_yield(&self) {
        let mut x = self.state.load(Ordering::Relaxed);
        if x == 0 {
            return;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state.store(x, Ordering::Relaxed);
        if x & 1 != 0 {
            tokio::task::yield_now().await;
        }
    }
}

impl StorageHook<MemoryStorage> for Schedule {
    fn before<'a>(&'a self, _: &'a MemoryStorage, _: StorageOp) -> BoxFuture<'a, ()> {
        Box::pin(self.maybe_yield())
    }

    fn after<'a>(
        &'a self,
        _: &'a MemoryStorage,
        op: StorageOp,
        outcome: vmimg::Result<(), &vmimg::Error>,
    ) -> BoxFuture<'a, ()> {
        let read_or_write = matches!(op, StorageOp::Read { .. } | StorageOp::Write { .. });
        if read_or_write && outcome.is_ok() {
            Box::pin(self.maybe_yield())
        } else {
            Box::pin(async {})
        }
    }
}

/// `MemoryStorage` whose requests sometimes yield to the executor (see [`Schedule`]).
type Yielding = HookStorage<MemoryStorage, Schedule>;

/// A new empty `Yielding` storage on the schedule `seed` draws.
fn yielding(seed: u64) -> Yielding {
    HookStorage::new(MemoryStorage::new(), Schedule::new(seed))
}

// ---------------------------------------------------------------------------------------
// The model and the run.
// ---------------------------------------------------------------------------------------

/// L2 cache size for a selector: the smallest (16 tables), 256 KiB, or the default 1 MiB.
fn l2_cache_bytes(sel: u8) -> u64 {
    match sel % 3 {
        0 => 0,
        1 => 256 << 10,
        _ => 1 << 20,
    }
}

/// Expected guest content, and the ranges a `ReadsAnything` discard left undetermined
/// (sorted, disjoint, half-open). Comparisons work on slices: a byte loop here would run
/// through libFuzzer's comparison hooks for every byte and dominate the run time.
struct Model {
    data: Vec<u8>,
    unknown: Vec<(u64, u64)>,
}

impl Model {
    /// Removes `[a, b)` from the unknown ranges.
    fn know(&mut self, a: u64, b: u64) {
        let mut out = Vec::with_capacity(self.unknown.len() + 1);
        for &(x, y) in &self.unknown {
            if y <= a || x >= b {
                out.push((x, y));
                continue;
            }
            if x < a {
                out.push((x, a));
            }
            if y > b {
                out.push((b, y));
            }
        }
        self.unknown = out;
    }

    fn set(&mut self, off: u64, bytes: &[u8]) {
        let r = off as usize..off as usize + bytes.len();
        self.data[r].copy_from_slice(bytes);
        self.know(off, off + bytes.len() as u64);
    }

    fn forget(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.know(off, off + len);
        let at = self.unknown.partition_point(|&(x, _)| x < off);
        self.unknown.insert(at, (off, off + len));
    }

    fn resize(&mut self, size: u64) {
        self.data.resize(size as usize, 0);
        self.know(size, u64::MAX);
    }

    /// The known sub-ranges of `[a, b)`.
    fn known_parts(&self, a: u64, b: u64) -> Vec<(u64, u64)> {
        let mut parts = Vec::new();
        let mut pos = a;
        for &(x, y) in &self.unknown {
            if y <= pos || x >= b {
                continue;
            }
            if x > pos {
                parts.push((pos, x));
            }
            pos = y.min(b);
        }
        if pos < b {
            parts.push((pos, b));
        }
        parts
    }
}

struct Run {
    config: Config,
    storage: Arc<Yielding>,
    data_file: Option<Arc<Yielding>>,
    /// The backing image and its content.
    backing: Option<(Image, Vec<u8>)>,
    img: Image,
    model: Model,
    size: u64,
    cs: u64,
    version: u32,
    refcount_order: u32,
    lazy: bool,
    /// The resolved operations so far, for the panic message.
    log: Vec<String>,
    trace: bool,
}

/// Builds the backing image described by `b` and its expected content.
async fn make_backing(b: &Backing) -> Option<(Image, Vec<u8>)> {
    match b {
        Backing::None => None,
        Backing::Raw { size, pattern } => {
            let content = pattern.bytes(0, *size);
            let s = Arc::new(MemoryStorage::from_bytes(&content));
            let img = RawOpen::storage(s).open().await.expect("open raw backing");
            Some((img, content))
        }
        Backing::Qcow2 {
            size,
            cluster_bits,
            writes,
        } => {
            let cs = 1u64 << cluster_bits;
            let s = Arc::new(MemoryStorage::new());
            Qcow2Create::new(*size)
                .cluster_size(cs)
                .create_on(s.as_ref(), None)
                .await
                .expect("create qcow2 backing");
            let img = Qcow2Open::storage(s.clone())
                .writable(true)
                .open()
                .await
                .expect("open qcow2 backing");
            let mut content = vec![0u8; *size as usize];
            for (span, pattern, compressed) in writes {
                let (off, len) = span.resolve(*size, cs);
                if len == 0 {
                    continue;
                }
                if *compressed {
                    let off = off / cs * cs;
                    let len = cs.min(*size - off);
                    let bytes = pattern.bytes(off, len);
                    img.write_compressed(off, &bytes)
                        .await
                        .expect("compressed write to the backing image");
                    content[off as usize..(off + len) as usize].copy_from_slice(&bytes);
                } else {
                    let bytes = pattern.bytes(off, len);
                    img.write(off, &bytes)
                        .await
                        .expect("write to the backing image");
                    content[off as usize..(off + len) as usize].copy_from_slice(&bytes);
                }
            }
            img.flush().await.expect("flush the backing image");
            drop(img);
            let ro = Qcow2Open::storage(s)
                .open()
                .await
                .expect("reopen qcow2 backing");
            Some((ro, content))
        }
    }
}

/// Futures of a concurrent group.
type Pending<'a> = Pin<Box<dyn Future<Output = (usize, vmimg::Result<Option<Vec<u8>>>)> + 'a>>;

impl Run {
    async fn new(config: Config) -> Run {
        let cs = 1u64 << config.cluster_bits;
        let mut create = Qcow2Create::new(config.size)
            .cluster_size(cs)
            .refcount_bits(1 << config.refcount_order)
            .extended_l2(config.extended_l2)
            .lazy_refcounts(config.lazy_refcounts)
            .preallocation(config.prealloc);
        if config.v2 {
            create = create.compat("0.10").expect("compat 0.10");
        }
        if config.zstd {
            create = create.compression_type(CompressionType::Zstd);
        }
        let data_file = match config.data_file {
            DataFile::None => None,
            DataFile::External => {
                create = create.data_file("data.raw");
                Some(Arc::new(yielding(config.schedule.rotate_left(32))))
            }
            DataFile::Raw => {
                create = create.data_file("data.raw").data_file_raw(true);
                Some(Arc::new(yielding(config.schedule.rotate_left(32))))
            }
        };
        let storage = Arc::new(yielding(config.schedule));
        create
            .create_on(
                storage.as_ref(),
                data_file.as_deref().map(|d| d as &dyn Storage),
            )
            .await
            .unwrap_or_else(|e| panic!("create failed: {e}\n{config:?}"));
        let backing = make_backing(&config.backing).await;
        let mut data = vec![0u8; config.size as usize];
        // Preallocated clusters belong to the image and read as zeros, so the backing image
        // shows through only where nothing is allocated; with extended L2 entries the
        // preallocated clusters' subclusters stay unallocated, as in QEMU (the only case
        // where QEMU lets preallocation and a backing file meet).
        let hides_backing = config.prealloc != PreallocMode::Off && !config.extended_l2;
        if let (Some((_, content)), false) = (&backing, hides_backing) {
            let n = content.len().min(data.len());
            data[..n].copy_from_slice(&content[..n]);
        }
        let img = open(
            &storage,
            &data_file,
            &backing,
            l2_cache_bytes(config.l2_cache),
        )
        .await;
        Run {
            storage,
            data_file,
            backing,
            img,
            model: Model {
                data,
                unknown: Vec::new(),
            },
            size: config.size,
            cs,
            version: if config.v2 { 2 } else { 3 },
            refcount_order: config.refcount_order,
            lazy: config.lazy_refcounts,
            config,
            log: Vec::new(),
            trace: std::env::var_os("VMIMG_FUZZ_TRACE").is_some(),
        }
    }

    fn note(&mut self, what: String) {
        if self.trace {
            eprintln!("qcow2_model: {what}");
        }
        self.log.push(what);
    }

    /// Panics with the configuration and the operations so far.
    fn fail(&self, what: String) -> ! {
        panic!(
            "{what}\nconfig: {:?}\nnow: version {}, {}-bit refcounts, lazy refcounts {}, \
             size {:#x}\noperations:\n  {}",
            self.config,
            self.version,
            1u32 << self.refcount_order,
            self.lazy,
            self.size,
            self.log.join("\n  ")
        );
    }

    fn has_data_file(&self) -> bool {
        !matches!(self.config.data_file, DataFile::None)
    }

    /// Backing content of `[off, off + len)`: zeros past the backing image's end.
    fn backing_bytes(&self, off: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        if let Some((_, content)) = &self.backing {
            let end = (off + len).min(content.len() as u64);
            if off < end {
                out[..(end - off) as usize].copy_from_slice(&content[off as usize..end as usize]);
            }
        }
        out
    }

    fn compare(&self, off: u64, got: &[u8], what: &str) {
        let end = off + got.len() as u64;
        for (a, b) in self.model.known_parts(off, end) {
            let want = &self.model.data[a as usize..b as usize];
            let have = &got[(a - off) as usize..(b - off) as usize];
            if want == have {
                continue;
            }
            let i = want.iter().zip(have).position(|(w, h)| w != h).unwrap_or(0);
            let run = want[i..]
                .iter()
                .zip(&have[i..])
                .take_while(|(w, h)| w != h)
                .count();
            let at = a + i as u64;
            self.fail(format!(
                "{what}: guest byte {at:#x} reads {:#04x}, the model says {:#04x} \
                 ({run} wrong bytes from there; cluster {:#x}, offset {:#x} in it)",
                have[i],
                want[i],
                at / self.cs,
                at % self.cs,
            ));
        }
    }

    /// Reads `[off, off + len)` and compares it with the model.
    async fn verify_range(&self, off: u64, len: u64, what: &str) {
        if len == 0 {
            return;
        }
        let mut buf = vec![0u8; len as usize];
        if let Err(e) = self.img.read(off, &mut buf).await {
            self.fail(format!("{what}: read of {len:#x} at {off:#x} failed: {e}"));
        }
        self.compare(off, &buf, what);
    }

    /// Compares the neighbourhood of an operation on `[off, off + len)`.
    async fn verify_around(&self, off: u64, len: u64, what: &str) {
        let start = off.saturating_sub(self.cs);
        let end = (off + len + self.cs).min(self.size);
        if start < end {
            self.verify_range(start, end - start, what).await;
        }
    }

    async fn verify_all(&self, what: &str) {
        if self.img.size() != self.size {
            self.fail(format!(
                "{what}: the image says its size is {:#x}, the model {:#x}",
                self.img.size(),
                self.size
            ));
        }
        self.verify_range(0, self.size, what).await;
    }

    fn expect_ok<T>(&self, r: vmimg::Result<T>, what: &str) -> T {
        r.unwrap_or_else(|e| self.fail(format!("{what} failed: {e} ({:?})", e.kind())))
    }

    fn expect_err<T>(&self, r: vmimg::Result<T>, kind: ErrorKind, what: &str) {
        match r {
            Ok(_) => self.fail(format!("{what} succeeded; it must fail with {kind:?}")),
            Err(e) if e.kind() != kind => self.fail(format!(
                "{what} failed with {:?} ({e}), not {kind:?}",
                e.kind()
            )),
            Err(_) => {}
        }
    }

    /// Flushes, then checks the image file: no corruption, no check error, no leak.
    async fn check_image(&self, what: &str) {
        let r = self.img.flush().await;
        self.expect_ok(r, &format!("{what}: flush"));
        let report = check(self.storage.as_ref(), Repair::None).await;
        let report = self.expect_ok(report, &format!("{what}: check"));
        if report.corruptions != 0
            || report.check_errors != 0
            || report.leaks != 0
            || report.failure.is_some()
        {
            self.fail(format!("{what}: check found problems: {report:#?}"));
        }
        if let (DataFile::Raw, Some(d)) = (self.config.data_file, &self.data_file) {
            // A raw data file reads as the guest disk.
            let mut buf = vec![0u8; self.size as usize];
            let r = d.read_at(0, &mut buf).await;
            self.expect_ok(r, &format!("{what}: read of the raw data file"));
            self.compare(0, &buf, &format!("{what}: raw data file"));
        }
    }

    async fn reopen(&mut self, l2_cache: u8) {
        let r = self.img.flush().await;
        self.expect_ok(r, "flush before reopen");
        self.img = open(
            &self.storage,
            &self.data_file,
            &self.backing,
            l2_cache_bytes(l2_cache),
        )
        .await;
    }

    /// The model's change for a completed write-like step.
    fn apply(&mut self, sub: &Sub, off: u64, len: u64) {
        match *sub {
            Sub::Write(_, pattern) | Sub::Compressed(_, pattern) => {
                self.model.set(off, &pattern.bytes(off, len))
            }
            Sub::Zeroes(..) | Sub::Discard(_, Discard::Zero) => {
                self.model.set(off, &vec![0u8; len as usize])
            }
            Sub::Discard(_, Discard::Anything) => self.model.forget(off, len),
            Sub::Discard(_, Discard::Backing) => {
                let b = self.backing_bytes(off, len);
                self.model.set(off, &b);
            }
            Sub::Read(_) | Sub::Flush => {}
        }
    }

    /// The guest range of a compressed write of the cluster selected by `sel`.
    fn compressed_range(&self, sel: u32) -> (u64, u64) {
        if self.size == 0 {
            return (0, 0);
        }
        let off = (u64::from(sel) % self.size.div_ceil(self.cs)) * self.cs;
        (off, self.cs.min(self.size - off))
    }

    /// The guest range of a step (empty for flush).
    fn sub_range(&self, sub: &Sub) -> (u64, u64) {
        match *sub {
            Sub::Write(s, _) | Sub::Zeroes(s, _) | Sub::Discard(s, _) | Sub::Read(s) => {
                s.resolve(self.size, self.cs)
            }
            Sub::Compressed(c, _) => self.compressed_range(c),
            Sub::Flush => (0, 0),
        }
    }

    async fn run_op(&mut self, op: &Op) {
        let (size, cs) = (self.size, self.cs);
        match op {
            Op::Write {
                span,
                pattern,
                slices,
            } => {
                let (off, len) = span.resolve(size, cs);
                let what = format!("write {len:#x} at {off:#x} ({pattern:?}, {slices} slices)");
                self.note(what.clone());
                let bytes = pattern.bytes(off, len);
                let r = if *slices > 1 && len > 1 {
                    let cut1 = len / 3;
                    let cut2 = if *slices > 2 { len * 2 / 3 } else { len };
                    let parts = [
                        std::io::IoSlice::new(&bytes[..cut1 as usize]),
                        std::io::IoSlice::new(&bytes[cut1 as usize..cut2 as usize]),
                        std::io::IoSlice::new(&bytes[cut2 as usize..]),
                    ];
                    self.img.writev(off, &parts).await
                } else {
                    self.img.write(off, &bytes).await
                };
                self.expect_ok(r, &what);
                self.model.set(off, &bytes);
                self.verify_around(off, len, &what).await;
            }
            Op::WriteZeroes { span, may_unmap } => {
                let (off, len) = span.resolve(size, cs);
                let what = format!("write_zeroes {len:#x} at {off:#x} (may_unmap {may_unmap})");
                self.note(what.clone());
                let r = self.img.write_zeroes(off, len, *may_unmap).await;
                self.expect_ok(r, &what);
                self.model.set(off, &vec![0u8; len as usize]);
                self.verify_around(off, len, &what).await;
            }
            Op::Discard { span, mode } => {
                let (off, len) = span.resolve(size, cs);
                let what = format!("discard {len:#x} at {off:#x} ({mode:?})");
                self.note(what.clone());
                let r = self.img.discard(off, len, mode.mode()).await;
                self.expect_ok(r, &what);
                self.apply(&Sub::Discard(*span, *mode), off, len);
                self.verify_around(off, len, &what).await;
            }
            Op::WriteCompressed { cluster, pattern } => {
                let (off, len) = self.compressed_range(*cluster);
                if len == 0 {
                    return;
                }
                let what = format!("write_compressed {len:#x} at {off:#x} ({pattern:?})");
                self.note(what.clone());
                let bytes = pattern.bytes(off, len);
                let r = self.img.write_compressed(off, &bytes).await;
                if self.has_data_file() {
                    self.expect_err(r, ErrorKind::Unsupported, &what);
                } else {
                    self.expect_ok(r, &what);
                    self.model.set(off, &bytes);
                }
                self.verify_around(off, len, &what).await;
            }
            Op::Read { span, slices } => {
                let (off, len) = span.resolve(size, cs);
                let what = format!("read {len:#x} at {off:#x} ({slices} slices)");
                self.note(what.clone());
                let mut buf = vec![0u8; len as usize];
                let r = if *slices > 1 && len > 1 {
                    let (a, b) = buf.split_at_mut((len / 2) as usize);
                    let mut parts = [std::io::IoSliceMut::new(a), std::io::IoSliceMut::new(b)];
                    self.img.readv(off, &mut parts).await
                } else {
                    self.img.read(off, &mut buf).await
                };
                self.expect_ok(r, &what);
                self.compare(off, &buf, &what);
            }
            Op::BlockStatus { span } => {
                let (off, len) = span.resolve(size, cs);
                if len == 0 {
                    return;
                }
                let what = format!("block_status {len:#x} at {off:#x}");
                self.note(what.clone());
                let r = self.img.block_status(off, len).await;
                let bs = self.expect_ok(r, &what);
                if bs.offset != off || bs.len == 0 || bs.len > len {
                    self.fail(format!("{what}: bad answer {bs:?}"));
                }
                if bs.zero() {
                    self.compare(off, &vec![0u8; bs.len as usize], &format!("{what}: {bs:?}"));
                }
            }
            Op::Flush => {
                self.note("flush".into());
                let r = self.img.flush().await;
                self.expect_ok(r, "flush");
            }
            Op::InvalidateCache => {
                self.note("invalidate_cache".into());
                let r = self.img.invalidate_cache().await;
                self.expect_ok(r, "invalidate_cache");
            }
            Op::Sync => {
                self.note("sync".into());
                let r = self.img.sync().await;
                self.expect_ok(r, "sync");
            }
            Op::Resize {
                size: raw,
                unit,
                prealloc,
            } => {
                let unit = match unit % 3 {
                    0 => 512,
                    1 => cs,
                    _ => 64 << 10,
                };
                let new = (u64::from(*raw) % (MAX_SIZE / unit + 1)) * unit;
                let mode = prealloc_mode(*prealloc);
                let what = format!("resize {size:#x} -> {new:#x} ({mode:?})");
                self.note(what.clone());
                let r = self.img.resize(new, mode).await;
                if self.has_data_file() && new != size {
                    self.expect_err(r, ErrorKind::Unsupported, &what);
                } else {
                    self.expect_ok(r, &what);
                    self.size = new;
                    // Shrunk space is gone; grown space reads as zeros.
                    self.model.resize(new.min(size));
                    self.model.resize(new);
                }
                self.verify_all(&what).await;
            }
            Op::Reopen { l2_cache, check } => {
                self.note(format!("reopen (check {check})"));
                if *check {
                    self.check_image("check before reopen").await;
                }
                self.reopen(*l2_cache).await;
                self.verify_all("after reopen").await;
            }
            Op::Amend {
                compat,
                lazy,
                refcount_order,
                size: new_size,
            } => self.amend(*compat, *lazy, *refcount_order, *new_size).await,
            Op::Concurrent(subs) => self.concurrent(subs).await,
            Op::Refused(r) => self.refused(*r).await,
        }
    }

    /// Amends the image, when the change is one the model knows to be valid, then reopens.
    async fn amend(
        &mut self,
        compat: Option<bool>,
        lazy: Option<bool>,
        refcount_order: Option<u8>,
        new_size: Option<(u32, u8)>,
    ) {
        let target = compat.map(|v3| if v3 { 3 } else { 2 });
        let v3_after = self.version >= 3 || target == Some(3);
        let downgrade = target == Some(2) && self.version >= 3;
        let order = refcount_order.map_or(self.refcount_order, u32::from);
        let new_size = new_size.map(|(raw, unit)| {
            let unit = if unit % 2 == 0 { 512 } else { self.cs };
            (u64::from(raw) % (MAX_SIZE / unit + 1)) * unit
        });
        let valid = !(refcount_order.is_some() && order != 4 && (!v3_after || target == Some(2)))
            && !(lazy == Some(true) && (!v3_after || target == Some(2)))
            && !(downgrade
                && (self.config.extended_l2
                    || self.has_data_file()
                    || self.config.zstd
                    || order != 4))
            && !(self.has_data_file() && new_size.is_some_and(|s| s != self.size));
        if !valid {
            return;
        }
        let a = Qcow2Amend {
            compat: target.map(|v| if v == 3 { "1.1" } else { "0.10" }.to_string()),
            lazy_refcounts: lazy,
            refcount_bits: refcount_order.map(|o| 1 << o),
            data_file_raw: None,
            size: new_size,
        };
        let what = format!("amend {a:?}");
        self.note(what.clone());
        let driver = self
            .img
            .driver()
            .as_any()
            .downcast_ref::<Qcow2Driver>()
            .expect("a qcow2 driver");
        let r = driver.amend(&a, self.img.below()).await;
        // A narrower width is refused when some refcount does not fit (compressed clusters
        // share host clusters), as in QEMU; the size and an upgrade to v3 come before that
        // step and stay done.
        let refused = order < self.refcount_order
            && matches!(&r, Err(e) if e.kind() == ErrorKind::InvalidArgument
                && e.to_string().contains("too large for"));
        if refused {
            self.note("  (refused: a refcount does not fit the new width)".into());
        } else {
            self.expect_ok(r, &what);
        }
        if let Some(s) = new_size {
            let old = self.size;
            self.size = s;
            self.model.resize(s.min(old));
            self.model.resize(s);
        }
        if target == Some(3) || (target.is_some() && !refused) {
            self.version = target.unwrap_or(self.version);
        }
        if !refused {
            if downgrade {
                self.lazy = false;
            } else if let Some(l) = lazy {
                self.lazy = l;
            }
            self.refcount_order = order;
        }
        self.reopen(self.config.l2_cache).await;
        self.verify_all(&format!("after {what} and reopen")).await;
    }

    /// Runs steps on disjoint ranges at once; steps overlapping an earlier one are dropped.
    async fn concurrent(&mut self, subs: &[Sub]) {
        let mut taken: Vec<(u64, u64)> = Vec::new();
        let mut steps: Vec<(Sub, u64, u64)> = Vec::new();
        for sub in subs {
            let (off, len) = self.sub_range(sub);
            let flush = matches!(sub, Sub::Flush);
            if !flush && len == 0 {
                continue;
            }
            if matches!(sub, Sub::Compressed(..)) && self.has_data_file() {
                continue;
            }
            if taken.iter().any(|&(o, l)| off < o + l && o < off + len) {
                continue;
            }
            taken.push((off, len));
            steps.push((*sub, off, len));
        }
        let what = format!(
            "concurrently: {}",
            steps
                .iter()
                .map(|(s, o, l)| format!("{} {l:#x} at {o:#x}", s.name()))
                .collect::<Vec<_>>()
                .join("; ")
        );
        self.note(what.clone());
        let img = &self.img;
        let futures: Vec<Pending<'_>> = steps
            .iter()
            .enumerate()
            .map(|(i, &(sub, off, len))| -> Pending<'_> {
                Box::pin(async move {
                    let r = match sub {
                        Sub::Write(_, p) => img.write(off, &p.bytes(off, len)).await.map(|_| None),
                        Sub::Compressed(_, p) => img
                            .write_compressed(off, &p.bytes(off, len))
                            .await
                            .map(|_| None),
                        Sub::Zeroes(_, unmap) => {
                            img.write_zeroes(off, len, unmap).await.map(|_| None)
                        }
                        Sub::Discard(_, mode) => {
                            img.discard(off, len, mode.mode()).await.map(|_| None)
                        }
                        Sub::Read(_) => {
                            let mut buf = vec![0u8; len as usize];
                            img.read(off, &mut buf).await.map(|_| Some(buf))
                        }
                        Sub::Flush => img.flush().await.map(|_| None),
                    };
                    (i, r)
                })
            })
            .collect();
        let results = futures_util::future::join_all(futures).await;
        for (i, r) in results {
            let (sub, off, len) = steps[i];
            match self.expect_ok(r, &format!("{what}: step {i}")) {
                Some(buf) => self.compare(off, &buf, &format!("{what}: step {i}")),
                None => self.apply(&sub, off, len),
            }
        }
        for &(_, off, len) in &steps {
            self.verify_around(off, len, &what).await;
        }
    }

    async fn refused(&mut self, r: Refused) {
        let (size, cs) = (self.size, self.cs);
        match r {
            Refused::PastEnd { what, over } => {
                let len = u64::from(over) + 1;
                let off = size.saturating_sub(u64::from(over) / 2);
                let desc = format!("past the end: op {} of {len:#x} at {off:#x}", what % 4);
                self.note(desc.clone());
                let r = match what % 4 {
                    0 => self.img.write(off, &vec![0x5a; len as usize]).await,
                    1 => self.img.write_zeroes(off, len, true).await,
                    2 => self.img.discard(off, len, DiscardMode::ReadsZero).await,
                    _ => {
                        let mut buf = vec![0u8; len as usize];
                        self.img.read(off, &mut buf).await
                    }
                };
                self.expect_err(r, ErrorKind::OutOfBounds, &desc);
                self.verify_around(size.saturating_sub(cs), cs, &desc).await;
            }
            Refused::CompressedShape { cluster, short } => {
                if size < 2 * cs || self.has_data_file() {
                    return;
                }
                // A whole cluster shifted off its boundary, or a short one that is not the
                // image's last.
                let clusters = size / cs - 1;
                let c = u64::from(cluster) % clusters;
                let shift = u64::from(short) % cs;
                let (off, len) = if shift == 0 {
                    (c * cs, 1 + u64::from(short) % (cs - 1))
                } else {
                    (c * cs + shift, cs)
                };
                let desc = format!("misshapen write_compressed {len:#x} at {off:#x}");
                self.note(desc.clone());
                let r = self
                    .img
                    .write_compressed(off, &vec![0x11; len as usize])
                    .await;
                self.expect_err(r, ErrorKind::InvalidArgument, &desc);
                self.verify_around(off, len, &desc).await;
            }
            Refused::ResizeUnaligned { size: raw } => {
                let new = u64::from(raw) % MAX_SIZE;
                if new.is_multiple_of(512) {
                    return;
                }
                let desc = format!("resize to unaligned {new:#x}");
                self.note(desc.clone());
                let r = self.img.resize(new, PreallocMode::Off).await;
                self.expect_err(r, ErrorKind::InvalidArgument, &desc);
                self.verify_all(&desc).await;
            }
        }
    }
}

/// Opens the image for writing, with its data file and backing image.
async fn open(
    storage: &Arc<Yielding>,
    data_file: &Option<Arc<Yielding>>,
    backing: &Option<(Image, Vec<u8>)>,
    l2_cache: u64,
) -> Image {
    let mut opts = OpenOptions::new()
        .writable(true)
        .policy(ImplicitOpenPolicy::deny())
        .l2_cache_size(l2_cache);
    if let Some(d) = data_file {
        opts = opts.data_file(d.clone());
    }
    if let Some((b, _)) = backing {
        opts = opts.backing(b.clone());
    }
    Qcow2Open::storage(storage.clone())
        .options(opts)
        .open()
        .await
        .unwrap_or_else(|e| panic!("open for writing failed: {e}"))
}

async fn execute(plan: Plan) {
    let mut run = Run::new(plan.config).await;
    run.verify_all("after create").await;
    for (i, op) in plan.ops.iter().enumerate() {
        run.run_op(op).await;
        if (i + 1) % VERIFY_EVERY == 0 {
            run.verify_all(&format!("after operation {i}")).await;
        }
    }
    run.verify_all("at the end").await;
    run.check_image("at the end").await;
    run.reopen(0).await;
    run.verify_all("at the end, reopened").await;
    let r = run.img.flush().await;
    run.expect_ok(r, "final flush");
}

fuzz_target!(|plan: Plan| {
    common::runtime().block_on(async {
        tokio::time::timeout(LIMIT, execute(plan))
            .await
            .expect("one input did not finish within 20 s");
    });
});
