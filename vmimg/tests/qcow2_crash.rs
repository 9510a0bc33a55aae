//! Crash simulation: random workloads on qcow2 images over a storage that, at a simulated
//! crash, keeps a random subset of the writes made since the last sync (some torn). After
//! every crash the image must open, `check` must find no corruption (leaks are allowed;
//! lazy-refcount images are repaired first, as QEMU does), and every byte written before the
//! last successful `sync` (the durability point; `flush` only pushes caches down) must read
//! back intact.
//!
//! `VMIMG_CRASH_RUNS=N` runs N workloads (default 50, four crash points each; CI also runs 1000).

use std::sync::Arc;
use vmimg::qcow2::check::{check, Repair};
use vmimg::{
    DiscardMode, FaultKind, FaultOp, FaultStorage, Image, MemoryStorage, Qcow2Create, Qcow2Open,
    Storage,
};

const SIZE: u64 = 4 << 20;
const CRASHES_PER_RUN: u64 = 4;

struct Model {
    /// Guest content as the image should read it now.
    current: Vec<u8>,
    /// Guest content as of the last successful flush.
    flushed: Vec<u8>,
    /// Bytes written since the last successful flush (their content is undetermined after a
    /// crash).
    touched: Vec<bool>,
}

impl Model {
    fn new() -> Self {
        Model {
            current: vec![0; SIZE as usize],
            flushed: vec![0; SIZE as usize],
            touched: vec![false; SIZE as usize],
        }
    }
    fn set(&mut self, off: u64, data: &[u8]) {
        let r = off as usize..off as usize + data.len();
        self.current[r.clone()].copy_from_slice(data);
        self.touched[r].fill(true);
    }
    fn flushed(&mut self) {
        self.flushed.copy_from_slice(&self.current);
        self.touched.fill(false);
    }
}

fn create_options(rng: &mut fastrand::Rng) -> (Qcow2Create, bool) {
    let lazy = rng.u8(0..4) == 0;
    let extended = rng.u8(0..4) == 0;
    let cluster = if extended {
        [16384, 65536][rng.usize(0..2)]
    } else {
        [512, 4096, 65536][rng.usize(0..3)]
    };
    let refcount_bits = [1, 4, 16, 64][rng.usize(0..4)];
    (
        Qcow2Create::new(SIZE)
            .cluster_size(cluster)
            .refcount_bits(refcount_bits)
            .extended_l2(extended)
            .lazy_refcounts(lazy),
        lazy,
    )
}

async fn random_op(img: &Image, model: &mut Model, rng: &mut fastrand::Rng) {
    let trace = std::env::var("VMIMG_CRASH_TRACE").is_ok();
    let len = match rng.u8(0..3) {
        0 => rng.u64(1..1000),
        1 => rng.u64(1..70_000),
        _ => 4096 * rng.u64(1..20),
    }
    .min(SIZE);
    let off = rng.u64(0..=SIZE - len);
    let kind = rng.u8(0..10);
    let kind = if kind == 8 && rng.bool() { 10 } else { kind };
    if trace {
        eprintln!("op kind {kind} off {off:#x} len {len:#x}");
    }
    match kind {
        0..=5 => {
            let byte = rng.u8(1..);
            let data = vec![byte; len as usize];
            img.write(off, &data).await.unwrap();
            model.set(off, &data);
        }
        6 | 7 => {
            img.write_zeroes(off, len, rng.bool()).await.unwrap();
            model.set(off, &vec![0; len as usize]);
        }
        8 => {
            img.discard(off, len, DiscardMode::ReadsZero).await.unwrap();
            model.set(off, &vec![0; len as usize]);
        }
        10 => {
            // Pushes metadata down but promises no durability: the model is unchanged.
            img.flush().await.unwrap();
        }
        9 => {
            // Durability point: everything acknowledged so far must survive a crash.
            img.sync().await.unwrap();
            model.flushed();
        }
        _ => unreachable!("kinds are 0..=10"),
    }
}

/// Checks one crash image: opens, consistent (after repair for lazy images), and the bytes
/// not written since the last flush read as they were flushed.
async fn verify_crash(bytes: Vec<u8>, model: &Model, lazy: bool, what: &str) {
    let s: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(&bytes));
    let report = check(s.as_ref(), if lazy { Repair::All } else { Repair::None })
        .await
        .unwrap_or_else(|e| panic!("{what}: check failed: {e}"));
    let left = report.corruptions - report.corruptions_fixed;
    assert_eq!(
        (left, report.check_errors, report.failure.clone()),
        (0, 0, None),
        "{what}: {report:?}"
    );
    let img = Qcow2Open::storage(s)
        .open()
        .await
        .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
    let mut buf = vec![0u8; SIZE as usize];
    img.read(0, &mut buf).await.unwrap();
    let bad = buf
        .iter()
        .zip(&model.flushed)
        .zip(&model.touched)
        .position(|((got, want), touched)| !touched && got != want);
    if let Some(i) = bad {
        panic!(
            "{what}: byte {i:#x} reads {:#x}, but {:#x} was synced there",
            buf[i], model.flushed[i]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_crashes_leave_consistent_images_that_keep_flushed_data() {
    let runs: u64 = std::env::var("VMIMG_CRASH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let mut crash_points = 0;
    let first: u64 = std::env::var("VMIMG_CRASH_FIRST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for run in first..first + runs {
        let mut rng = fastrand::Rng::with_seed(0xc0ffee + run);
        let storage = Arc::new(FaultStorage::new());
        let (create, lazy) = create_options(&mut rng);
        create.create_on(storage.as_ref(), None).await.unwrap();
        storage.sync().await.unwrap();
        let img = Qcow2Open::storage(storage.clone())
            .writable(true)
            .open()
            .await
            .unwrap();
        let mut model = Model::new();
        let ops = rng.usize(5..40);
        for _ in 0..ops {
            random_op(&img, &mut model, &mut rng).await;
        }
        for k in 0..CRASHES_PER_RUN {
            let what = format!("run {run} crash {k} ({create:?})");
            verify_crash(storage.crash_image(run * 100 + k), &model, lazy, &what).await;
            crash_points += 1;
        }
        img.flush().await.unwrap();
    }
    eprintln!("{crash_points} crash points simulated");
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
        let mut model = Model::new();
        let mut rng = fastrand::Rng::with_seed(nth);
        for _ in 0..5 {
            random_op(&img, &mut model, &mut rng).await;
        }
        img.sync().await.unwrap();
        model.flushed();
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
                    // The failed request's range is undetermined; mark it touched.
                    if wrote {
                        model.touched[off as usize..off as usize + 5000].fill(true);
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
