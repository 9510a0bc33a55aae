//! Many tasks on a multi-threaded runtime writing and reading one qcow2 image at once:
//! adjacent and interleaved ranges in the same clusters and L2 tables, allocation and
//! copy-on-write races (over a backing file), zeroing and discards racing writes, flushes
//! in between; verified against a model, then checked for consistency.

use std::sync::Arc;
use vmimg::qcow2::check::{check, Repair};
use vmimg::{DiscardMode, Image, MemoryStorage, OpenOptions, Qcow2Create, Qcow2Open, RawOpen};

const SIZE: u64 = 8 << 20;
const TASKS: u64 = 16;

/// Task `t` owns every byte whose 1000-byte stripe index is `t` modulo TASKS: stripes are
/// smaller than clusters, so tasks constantly share clusters and L2 tables.
fn owner(pos: u64) -> u64 {
    (pos / 1000) % TASKS
}

async fn run(create: Qcow2Create, backing: bool, seed: u64) {
    let s = Arc::new(MemoryStorage::new());
    create.create_on(s.as_ref(), None).await.unwrap();
    let base_bytes: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8 | 1).collect();
    let mut opts = OpenOptions::new().writable(true);
    if backing {
        let base = RawOpen::storage(Arc::new(MemoryStorage::from_bytes(&base_bytes)))
            .open()
            .await
            .unwrap();
        opts = opts.backing(base);
    }
    let img = Qcow2Open::storage(s.clone())
        .options(opts)
        .open()
        .await
        .unwrap();
    let initial: Arc<Vec<u8>> = Arc::new(if backing {
        base_bytes
    } else {
        vec![0; SIZE as usize]
    });

    let mut handles = Vec::new();
    for t in 0..TASKS {
        let img: Image = img.clone();
        let initial = Arc::clone(&initial);
        handles.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed * 1000 + t);
            // This task's view of its own bytes.
            let mut mine: Vec<u8> = initial.to_vec();
            for _ in 0..150 {
                // A run of this task's stripes.
                let stripe = rng.u64(0..SIZE / 1000 / TASKS) * TASKS + t;
                let start = stripe * 1000 + rng.u64(0..500);
                let end = (stripe * 1000 + 1000).min(SIZE);
                let len = rng.u64(1..=end - start);
                match rng.u8(0..8) {
                    0..=4 => {
                        let byte = rng.u8(1..);
                        img.write(start, &vec![byte; len as usize]).await.unwrap();
                        mine[start as usize..(start + len) as usize].fill(byte);
                    }
                    5 => {
                        img.write_zeroes(start, len, rng.bool()).await.unwrap();
                        mine[start as usize..(start + len) as usize].fill(0);
                    }
                    6 => {
                        img.discard(start, len, DiscardMode::ReadsZero)
                            .await
                            .unwrap();
                        mine[start as usize..(start + len) as usize].fill(0);
                    }
                    _ => img.flush().await.unwrap(),
                }
                // Read back a random owned range and compare.
                let stripe = rng.u64(0..SIZE / 1000 / TASKS) * TASKS + t;
                let (a, b) = (stripe * 1000, (stripe * 1000 + 1000).min(SIZE));
                let mut buf = vec![0u8; (b - a) as usize];
                img.read(a, &mut buf).await.unwrap();
                assert!(
                    buf[..] == mine[a as usize..b as usize],
                    "task {t}: stripe at {a:#x} reads back wrong"
                );
            }
            mine
        }));
    }
    let mut expected = initial.to_vec();
    for (t, h) in handles.into_iter().enumerate() {
        let mine = h.await.unwrap();
        for pos in 0..SIZE {
            if owner(pos) == t as u64 {
                expected[pos as usize] = mine[pos as usize];
            }
        }
    }
    img.flush().await.unwrap();
    let mut all = vec![0u8; SIZE as usize];
    img.read(0, &mut all).await.unwrap();
    if let Some(i) = all.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!(
            "byte {i:#x} (task {}) reads {:#x}, expected {:#x}",
            owner(i as u64),
            all[i],
            expected[i]
        );
    }
    let report = check(s.as_ref(), Repair::None).await.unwrap();
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0),
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_tasks_sharing_clusters_keep_every_byte_and_a_clean_image() {
    for (i, create) in [
        Qcow2Create::new(SIZE).cluster_size(4096),
        Qcow2Create::new(SIZE),
        Qcow2Create::new(SIZE).extended_l2(true),
        Qcow2Create::new(SIZE).cluster_size(512).refcount_bits(2),
    ]
    .into_iter()
    .enumerate()
    {
        run(create.clone(), false, i as u64).await;
        run(create, true, 100 + i as u64).await;
    }
}
