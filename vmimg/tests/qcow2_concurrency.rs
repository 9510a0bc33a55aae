//! Many tasks on a multi-threaded runtime writing and reading one qcow2 image at once:
//! adjacent and interleaved ranges in the same clusters and L2 tables, allocation and
//! copy-on-write races (over a backing file), zeroing and discards racing writes, flushes
//! in between; verified against a model, then checked for consistency.
//!
//! The resize race runs one task resizing (grows that move the L1 table, shrinks to the
//! middle of a cluster with junk written past the new end first, preallocated grows) against
//! that I/O, against writers in space the first grow added, and against readers of the space
//! later grows added, which must read zeros: once the grow is done, and (the eager variant)
//! as soon as the image size shows it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vmimg::qcow2::check::{check, Repair};
use vmimg::qcow2::Header;
use vmimg::{
    DiscardMode, ErrorKind, Image, MemoryStorage, OpenOptions, PreallocMode, Qcow2Create,
    Qcow2Open, RawOpen, Storage, StorageExt,
};

const SIZE: u64 = 8 << 20;
const TASKS: u64 = 16;

/// Task `t` of `tasks` owns every byte of a region whose 1000-byte stripe index (from the
/// region's start) is `t` modulo `tasks`: stripes are smaller than clusters, so tasks
/// constantly share clusters and L2 tables.
fn owner(pos: u64, tasks: u64) -> u64 {
    (pos / 1000) % tasks
}

/// One task's workload on region `[base, base + len)`: `ops` random writes, zeroings,
/// discards and flushes of its own stripes, each followed by a read-back of one of its
/// stripes. `mine` is the region's initial content; returns the task's view of it.
async fn stripe_worker(
    img: Image,
    (base, len): (u64, u64),
    (t, tasks): (u64, u64),
    mut mine: Vec<u8>,
    seed: u64,
    ops: usize,
) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let stripes = len / 1000 / tasks;
    for _ in 0..ops {
        // A run of this task's stripes.
        let stripe = rng.u64(0..stripes) * tasks + t;
        let start = stripe * 1000 + rng.u64(0..500);
        let end = (stripe * 1000 + 1000).min(len);
        let n = rng.u64(1..=end - start);
        let range = start as usize..(start + n) as usize;
        match rng.u8(0..8) {
            0..=4 => {
                let byte = rng.u8(1..);
                img.write(base + start, &vec![byte; n as usize])
                    .await
                    .unwrap();
                mine[range].fill(byte);
            }
            5 => {
                img.write_zeroes(base + start, n, rng.bool()).await.unwrap();
                mine[range].fill(0);
            }
            6 => {
                img.discard(base + start, n, DiscardMode::ReadsZero)
                    .await
                    .unwrap();
                mine[range].fill(0);
            }
            _ => img.flush().await.unwrap(),
        }
        // Read back a random owned range and compare.
        let stripe = rng.u64(0..stripes) * tasks + t;
        let (a, b) = (stripe * 1000, (stripe * 1000 + 1000).min(len));
        let mut buf = vec![0u8; (b - a) as usize];
        img.read(base + a, &mut buf).await.unwrap();
        assert!(
            buf[..] == mine[a as usize..b as usize],
            "task {t}: stripe at {:#x} reads back wrong",
            base + a
        );
    }
    mine
}

/// Runs `tasks` stripe workers on `[base, base + initial.len())` and merges their views.
async fn merge(
    handles: Vec<tokio::task::JoinHandle<Vec<u8>>>,
    tasks: u64,
    mut into: Vec<u8>,
) -> Vec<u8> {
    let len = into.len();
    for (t, h) in handles.into_iter().enumerate() {
        let mine = h.await.unwrap();
        // The stripes `t` owns: 1000 bytes every `tasks` stripes.
        for a in (t * 1000..len).step_by(tasks as usize * 1000) {
            let b = (a + 1000).min(len);
            debug_assert_eq!(owner(a as u64, tasks), t as u64);
            into[a..b].copy_from_slice(&mine[a..b]);
        }
    }
    into
}

fn spawn_workers(
    img: &Image,
    region: (u64, u64),
    tasks: u64,
    initial: &Arc<Vec<u8>>,
    seed: u64,
    ops: usize,
) -> Vec<tokio::task::JoinHandle<Vec<u8>>> {
    (0..tasks)
        .map(|t| {
            let img = img.clone();
            let initial = Arc::clone(initial);
            tokio::spawn(async move {
                let mine = initial.to_vec();
                stripe_worker(img, region, (t, tasks), mine, seed * 1000 + t, ops).await
            })
        })
        .collect()
}

/// Opens a new image on `s`, over a raw backing image of `base_bytes` when given.
async fn open(s: &Arc<MemoryStorage>, base_bytes: Option<&[u8]>) -> Image {
    let mut opts = OpenOptions::new().writable(true);
    if let Some(bytes) = base_bytes {
        let base = RawOpen::storage(Arc::new(MemoryStorage::from_bytes(bytes)))
            .open()
            .await
            .unwrap();
        opts = opts.backing(base);
    }
    Qcow2Open::storage(s.clone())
        .options(opts)
        .open()
        .await
        .unwrap()
}

/// Reads `[from, from + expected.len())` and compares; `what` names the region.
async fn expect_bytes(img: &Image, from: u64, expected: &[u8], what: &str) {
    let mut all = vec![0u8; expected.len()];
    img.read(from, &mut all).await.unwrap();
    if let Some(i) = all.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: byte {:#x} reads {:#x}, expected {:#x}",
            from + i as u64,
            all[i],
            expected[i]
        );
    }
}

async fn expect_clean(s: &dyn Storage, what: &str) {
    let report = check(s, Repair::None).await.unwrap();
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0),
        "{what}: {report:?}"
    );
}

async fn run(create: Qcow2Create, backing: bool, seed: u64) {
    let s = Arc::new(MemoryStorage::new());
    create.create_on(s.as_ref(), None).await.unwrap();
    let base_bytes: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8 | 1).collect();
    let img = open(&s, backing.then_some(&base_bytes[..])).await;
    let initial: Arc<Vec<u8>> = Arc::new(if backing {
        base_bytes
    } else {
        vec![0; SIZE as usize]
    });
    let handles = spawn_workers(&img, (0, SIZE), TASKS, &initial, seed, 150);
    let expected = merge(handles, TASKS, initial.to_vec()).await;
    img.flush().await.unwrap();
    expect_bytes(&img, 0, &expected, "after the race").await;
    expect_clean(s.as_ref(), &format!("{create:?}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_tasks_sharing_clusters_keep_every_byte_and_a_clean_image() {
    for (i, create) in layouts().into_iter().enumerate() {
        run(create.clone(), false, i as u64).await;
        run(create, true, 100 + i as u64).await;
    }
}

fn layouts() -> [Qcow2Create; 4] {
    [
        Qcow2Create::new(SIZE).cluster_size(4096),
        Qcow2Create::new(SIZE),
        Qcow2Create::new(SIZE).extended_l2(true),
        Qcow2Create::new(SIZE).cluster_size(512).refcount_bits(2),
    ]
}

/// Space that later grows hold for writers: `[SIZE, SIZE + KEEP)` once the first grow is
/// done. No shrink goes below `SIZE + KEEP`; the resizer writes junk past the end before
/// every shrink, which later grows must not show.
const KEEP: u64 = 4 << 20;
const KEEP_TASKS: u64 = 4;

/// The sizes the resizer goes through while the I/O runs, given the cluster size and the
/// guest bytes one L2 table covers: grows to the middle of a cluster, past the L1 table's
/// coverage (twice, so that it moves twice), shrinks to the middle of a cluster, small
/// grows, repeated.
fn resize_plan(cs: u64, cov: u64) -> Vec<u64> {
    let k = SIZE + KEEP;
    let l1_grow_1 = (k / cov + 2) * cov + 512 * 5;
    let l1_grow_2 = (l1_grow_1 / cov + 3) * cov + cs.max(1024) / 2;
    vec![
        k + 512 * 3,
        l1_grow_1,
        k + cs + 512 * 9,
        l1_grow_2,
        k + 512 * 17,
        k + 3 * cs + 512,
        k + 7 * cs + 1024,
        k + 2 * cs + 512 * 3,
        k + (1 << 20) + 512,
        k + 512 * 11,
        k + (2 << 20),
    ]
}

/// One step of the resizer. A shrink holds `grown` exclusively and first writes junk past the
/// new end (in the new last cluster and beyond), which no later grow may show; a grow
/// (sometimes preallocated) publishes its new end in `grown` once it is done.
async fn resize_to(
    img: &Image,
    grown: &tokio::sync::RwLock<u64>,
    new_size: u64,
    cs: u64,
    rng: &mut fastrand::Rng,
) {
    let old = img.size();
    if new_size < old {
        let mut end = grown.write().await;
        let junk_end = old.min(new_size + 2 * cs + 4096);
        img.write(new_size, &vec![0xee; (junk_end - new_size) as usize])
            .await
            .unwrap();
        img.resize(new_size, PreallocMode::Off).await.unwrap();
        *end = (*end).min(new_size);
    } else if new_size > old {
        let prealloc = if new_size - old <= 1 << 20 && rng.u8(0..4) == 0 {
            [PreallocMode::Metadata, PreallocMode::Full][rng.usize(0..2)]
        } else {
            PreallocMode::Off
        };
        img.resize(new_size, prealloc).await.unwrap();
        *grown.write().await = new_size;
    }
}

async fn header_of(s: &dyn Storage) -> Header {
    let mut buf = vec![0u8; 64 << 10];
    s.read_at(0, &mut buf).await.unwrap();
    Header::parse(&buf).unwrap()
}

/// The resize race: 16 tasks on `[0, SIZE)` and, once the first grow is done, 4 tasks on
/// `[SIZE, SIZE + KEEP)`, while one task resizes through `resize_plan` (and on until the
/// writers are done) and two read the space past `SIZE + KEEP` that finished grows added
/// (zeros). With `eager`, a third reader reads whatever the current size shows there: zeros
/// too, even while a grow is still running.
async fn run_resize_race(create: Qcow2Create, backing: bool, eager: bool, seed: u64) {
    let what = format!("{create:?}, backing {backing}, seed {seed}");
    let s = Arc::new(MemoryStorage::new());
    create.create_on(s.as_ref(), None).await.unwrap();
    let h0 = header_of(s.as_ref()).await;
    let g = h0.geometry();
    let (cs, cov) = (g.cluster_size(), g.l2_coverage());
    // The backing file is longer than the image: the first grow must hide its tail.
    let base_bytes: Vec<u8> = (0..SIZE + (2 << 20)).map(|i| (i % 251) as u8 | 1).collect();
    let img = open(&s, backing.then_some(&base_bytes[..])).await;
    let initial: Arc<Vec<u8>> = Arc::new(if backing {
        base_bytes[..SIZE as usize].to_vec()
    } else {
        vec![0; SIZE as usize]
    });
    let k_end = SIZE + KEEP;

    let main = spawn_workers(&img, (0, SIZE), TASKS, &initial, seed, 150);
    // Shrinks hold this exclusively; readers of the grown space hold it shared. It guards
    // the end of the space finished grows added (readers never race a shrink of what they
    // read, which could hand their clusters to someone else).
    let grown = Arc::new(tokio::sync::RwLock::new(SIZE));
    let (keep_ready, keep_rx) = tokio::sync::watch::channel(false);
    let writers_done = Arc::new(AtomicBool::new(false));
    let resizer_done = Arc::new(AtomicBool::new(false));

    let keep_handles: Vec<_> = (0..KEEP_TASKS)
        .map(|t| {
            let img = img.clone();
            let mut rx = keep_rx.clone();
            tokio::spawn(async move {
                rx.wait_for(|ready| *ready).await.unwrap();
                let mine = vec![0u8; KEEP as usize];
                stripe_worker(img, (SIZE, KEEP), (t, KEEP_TASKS), mine, seed * 77 + t, 100).await
            })
        })
        .collect();

    let resizer = {
        let img = img.clone();
        let grown = Arc::clone(&grown);
        let writers_done = Arc::clone(&writers_done);
        let resizer_done = Arc::clone(&resizer_done);
        tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
            let pause = |rng: &mut fastrand::Rng| {
                tokio::time::sleep(std::time::Duration::from_micros(rng.u64(0..3000)))
            };
            for (i, &size) in resize_plan(cs, cov).iter().enumerate() {
                resize_to(&img, &grown, size, cs, &mut rng).await;
                if i == 0 {
                    keep_ready.send(true).unwrap();
                }
                pause(&mut rng).await;
            }
            // Small grows and shrinks around the kept space until the writers are done.
            while !writers_done.load(Ordering::Acquire) {
                let size = k_end + 512 * rng.u64(1..4 * cs / 512 + 64);
                resize_to(&img, &grown, size, cs, &mut rng).await;
                pause(&mut rng).await;
            }
            // Last, a shrink to the middle of a cluster and a grow that must zero what the
            // shrink left there.
            for size in [k_end + (3 << 20), k_end + 512 * 7, k_end + (2 << 20) + 512] {
                resize_to(&img, &grown, size, cs, &mut rng).await;
            }
            resizer_done.store(true, Ordering::Release);
            img.size()
        })
    };

    let readers: Vec<_> = (0..2 + u64::from(eager))
        .map(|r| {
            let img = img.clone();
            let grown = Arc::clone(&grown);
            let resizer_done = Arc::clone(&resizer_done);
            let what = what.clone();
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(seed * 31 + r);
                let mut reads = 0u64;
                while !resizer_done.load(Ordering::Acquire) {
                    let end = grown.read().await;
                    // Readers 0 and 1: space finished grows added; reader 2: whatever the
                    // image size shows now, grow in progress or not.
                    let limit = if r == 2 { img.size() } else { *end };
                    if limit > k_end {
                        let a = rng.u64(k_end..limit);
                        let n = rng.u64(1..=(limit - a).min(256 << 10));
                        let mut buf = vec![0xffu8; n as usize];
                        match img.read(a, &mut buf).await {
                            Ok(()) => {
                                if let Some(i) = buf.iter().position(|&b| b != 0) {
                                    panic!(
                                        "{what}: reader {r}: byte {:#x} of the grown space \
                                         reads {:#x} (size {limit:#x})",
                                        a + i as u64,
                                        buf[i]
                                    );
                                }
                                reads += 1;
                            }
                            // Only a grow can run meanwhile: the size never drops below
                            // `limit` while this lock is held.
                            Err(e) => panic!("{what}: reader {r}: read {a:#x}+{n:#x}: {e}"),
                        }
                    }
                    drop(end);
                    tokio::task::yield_now().await;
                }
                reads
            })
        })
        .collect();

    let expected = merge(main, TASKS, initial.to_vec()).await;
    let keep_expected = merge(keep_handles, KEEP_TASKS, vec![0; KEEP as usize]).await;
    writers_done.store(true, Ordering::Release);
    let final_size = resizer.await.unwrap();
    let mut reads = 0;
    for r in readers {
        reads += r.await.unwrap();
    }
    assert!(reads > 0, "{what}: no read of the grown space ran");
    assert_eq!(img.size(), final_size);

    img.flush().await.unwrap();
    expect_bytes(&img, 0, &expected, &format!("{what}: [0, SIZE)")).await;
    expect_bytes(&img, SIZE, &keep_expected, &format!("{what}: kept space")).await;
    let tail = vec![0u8; (final_size - k_end) as usize];
    expect_bytes(&img, k_end, &tail, &format!("{what}: grown space")).await;
    expect_clean(s.as_ref(), &what).await;
    let h = header_of(s.as_ref()).await;
    assert_ne!(
        h.l1_table_offset, h0.l1_table_offset,
        "{what}: the L1 table never moved"
    );
    assert_eq!(h.size, final_size);

    // Reopened, the image reads the same.
    drop(img);
    let img = open(&s, backing.then_some(&base_bytes[..])).await;
    expect_bytes(&img, 0, &expected, &format!("{what}: reopened")).await;
    expect_bytes(&img, SIZE, &keep_expected, &format!("{what}: reopened")).await;
    expect_bytes(&img, k_end, &tail, &format!("{what}: reopened")).await;
    let e = img.read(final_size, &mut [0u8; 1]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfBounds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resizes_racing_io_keep_every_byte_and_grown_space_reads_zeros() {
    for (i, create) in layouts().into_iter().enumerate() {
        run_resize_race(create.clone(), false, false, 200 + i as u64).await;
        run_resize_race(create, true, false, 300 + i as u64).await;
    }
    // Version 2 has no zero flag: the zeros of a grow are written.
    let v2 = Qcow2Create::new(SIZE)
        .cluster_size(4096)
        .compat("0.10")
        .unwrap();
    run_resize_race(v2.clone(), false, false, 400).await;
    run_resize_race(v2, true, false, 401).await;
}

/// Space a grow adds reads as zeros as soon as the image size shows it, while the grow is
/// still running (and although shrinks to the middle of a cluster left junk past the end).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn space_a_running_grow_adds_reads_zeros_to_racing_readers() {
    for (i, create) in layouts().into_iter().enumerate() {
        run_resize_race(create, i % 2 == 1, true, 500 + i as u64).await;
    }
}
