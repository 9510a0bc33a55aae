//! Crash simulation for VHDX: random writes and syncs over a storage that, at a simulated
//! crash, keeps a random subset of the writes made since its last sync (some torn). Crash
//! images are taken just before syncs the library issues, so they fall inside the log
//! protocol of a sync (after the log GUID is set, after the entry is written, after the BAT
//! pages are applied): some hold a log that must be replayed.
//!
//! After every crash:
//! - the image opens read-only (the log replayed in memory, nothing written) and every
//!   sector not written since the last completed sync reads as it did then;
//! - opened for writing (the log replayed into the file), it reads exactly as the
//!   read-only view did, and its check finds nothing wrong.
//!
//! - the first crash images holding a log are also given to QEMU: `qemu-img check -r all`
//!   replays vmimg's log, and the image then reads as vmimg's view (qemu-img and qemu-io
//!   are on every machine of this kind; the test fails naming `qemu-utils` without them).
//!
//! `VMIMG_CRASH_RUNS=N` runs N workloads (default 30).

use std::sync::{Arc, Mutex};
use vmimg::storage::{BoxFuture, HookStorage, StorageHook, StorageOp};
use vmimg::vhdx::header::{Header, HEADER1, HEADER2};
use vmimg::vhdx::VhdxCreate;
use vmimg::{FaultStorage, Format, ImageOpen, MemoryStorage, Storage, StorageExt};

const SIZE: usize = 12 << 20;
const SECTOR: usize = 512;

/// Takes a crash image at some of the syncs.
#[derive(Debug)]
struct CrashAtSyncs {
    rng: Mutex<fastrand::Rng>,
    images: Mutex<Vec<Vec<u8>>>,
}

impl StorageHook<FaultStorage> for CrashAtSyncs {
    fn before<'a>(&'a self, fault: &'a FaultStorage, op: StorageOp) -> BoxFuture<'a, ()> {
        if op == StorageOp::Sync {
            let mut rng = self.rng.lock().unwrap();
            if rng.u32(0..3) == 0 {
                let seed = rng.u64(..);
                self.images.lock().unwrap().push(fault.crash_image(seed));
            }
        }
        Box::pin(async {})
    }
}

/// Whether the current header of `bytes` names a log (a replay may be due).
fn log_guid_set(bytes: &[u8]) -> bool {
    let h1 = Header::parse(&bytes[HEADER1 as usize..]);
    let h2 = Header::parse(&bytes[HEADER2 as usize..]);
    let current = match (h1, h2) {
        (Some(a), Some(b)) => {
            if a.sequence >= b.sequence {
                a
            } else {
                b
            }
        }
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => return false,
    };
    current.log_guid != [0; 16]
}

async fn read_all(storage: Arc<dyn Storage>, writable: bool) -> vmimg::Result<Vec<u8>> {
    let img = ImageOpen::storage(storage)
        .format(Format::VHDX)
        .writable(writable)
        .open()
        .await?;
    let mut out = vec![0u8; img.size() as usize];
    img.read(0, &mut out).await?;
    if writable {
        img.sync().await?;
    }
    Ok(out)
}

/// Checks one crash image against the data as of the last completed sync.
/// QEMU replays the log of `image` (`check -r all`) and reads what vmimg reads.
fn qemu_replays(image: &[u8], view: &[u8], what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (img, raw) = (dir.path().join("c.vhdx"), dir.path().join("c.raw"));
    std::fs::write(&img, image).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "qemu-img cannot run ({e}): install qemu-utils (apt-get install -y qemu-utils)"
                )
            });
        assert!(
            out.status.success(),
            "{what}: qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (i, r) = (img.to_str().unwrap(), raw.to_str().unwrap());
    run(&["check", "-q", "-r", "all", "-f", "vhdx", i]);
    run(&["convert", "-f", "vhdx", "-O", "raw", i, r]);
    let by_qemu = std::fs::read(&raw).unwrap();
    assert!(by_qemu == view, "{what}: QEMU's replay reads differently");
}

async fn verify(image: Vec<u8>, synced: &[u8], touched: &[bool], what: &str, to_qemu: bool) {
    let ro: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(&image));
    let before = image.clone();
    let view = read_all(Arc::clone(&ro), false)
        .await
        .unwrap_or_else(|e| panic!("{what}: read-only open failed: {e}"));
    let mut after = vec![0u8; before.len()];
    ro.read_at(0, &mut after).await.unwrap();
    assert!(after == before, "{what}: a read-only open changed the file");
    for (s, t) in touched.iter().enumerate() {
        let r = s * SECTOR..(s + 1) * SECTOR;
        if !t {
            assert!(
                view[r.clone()] == synced[r.clone()],
                "{what}: sector {s} lost its synced data"
            );
        }
    }
    if to_qemu {
        qemu_replays(&image, &view, what);
    }
    let rw: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(&image));
    let replayed = read_all(Arc::clone(&rw), true)
        .await
        .unwrap_or_else(|e| panic!("{what}: writable open failed: {e}"));
    assert!(
        replayed == view,
        "{what}: the replay reads differently from the view"
    );
    let report = Format::VHDX
        .entry()
        .check(rw.as_ref(), vmimg::format::Repair::None)
        .await
        .unwrap();
    assert_eq!(report.corruptions, 0, "{what}: {:?}", report.messages);
    let reopened = read_all(rw, false).await.unwrap();
    assert!(
        reopened == view,
        "{what}: the replayed file reads differently"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_inside_syncs_keep_synced_data_and_logs_replay() {
    let runs: u64 = std::env::var("VMIMG_CRASH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let (mut crashes, mut with_log) = (0, 0);
    for run in 0..runs {
        let mut rng = fastrand::Rng::with_seed(0x7d8 + run);
        let hook = CrashAtSyncs {
            rng: Mutex::new(fastrand::Rng::with_seed(run)),
            images: Mutex::new(Vec::new()),
        };
        let storage = Arc::new(HookStorage::new(FaultStorage::new(), hook));
        VhdxCreate::new(SIZE as u64)
            .block_size(1 << 20)
            .create_on(storage.as_ref())
            .await
            .unwrap();
        storage.hook().images.lock().unwrap().clear();
        let img = ImageOpen::storage(Arc::clone(&storage) as Arc<dyn Storage>)
            .format(Format::VHDX)
            .writable(true)
            .open()
            .await
            .unwrap();
        let mut current = vec![0u8; SIZE];
        let mut synced = current.clone();
        let mut touched = vec![false; SIZE / SECTOR];
        for op in 0..30 {
            if rng.u8(0..4) == 0 {
                img.sync().await.unwrap();
                let images = std::mem::take(&mut *storage.hook().images.lock().unwrap());
                for (i, image) in images.into_iter().enumerate() {
                    crashes += 1;
                    let logged = log_guid_set(&image);
                    with_log += usize::from(logged);
                    let what = format!("run {run} op {op} crash {i}");
                    let to_qemu = logged && with_log <= 12;
                    verify(image, &synced, &touched, &what, to_qemu).await;
                }
                synced.clone_from(&current);
                touched.fill(false);
                continue;
            }
            let len = rng.usize(1..160) * SECTOR;
            let at = rng.usize(0..(SIZE - len) / SECTOR) * SECTOR;
            let mut data = vec![0u8; len];
            rng.fill(&mut data);
            img.write(at as u64, &data).await.unwrap();
            current[at..at + len].copy_from_slice(&data);
            touched[at / SECTOR..(at + len) / SECTOR].fill(true);
        }
        let mut back = vec![0u8; SIZE];
        img.read(0, &mut back).await.unwrap();
        assert!(
            back == current,
            "run {run}: the image does not read as written"
        );
    }
    eprintln!("{runs} runs: {crashes} crash images, {with_log} with a log to replay");
    assert!(crashes > runs as usize, "too few crash images: {crashes}");
    assert!(with_log > 0, "no crash image held a log");
}
