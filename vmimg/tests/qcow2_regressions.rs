//! Minimal reproductions of bugs the crash simulation (`qcow2_crash.rs`) and the resize race
//! (`qcow2_concurrency.rs`) found: compressed clusters, refcounts held back across a flush,
//! and resizes. Each test names the code that was wrong (`Was:`, fixed since) or still is
//! (`Bug:`).
//!
//! Some need the image as a crash would leave it in the middle of an operation: the storages
//! below keep, at every sync they are asked for, a copy of their bytes (a crash just before
//! that sync, with every write issued so far landed) or a set of crash images (a crash just
//! before that sync, with a random subset of the writes since the previous one landed, some
//! torn).

use std::sync::{Arc, Mutex};
use vmimg::qcow2::check::{check, CheckReport, Repair};
use vmimg::storage::{BoxFuture, HookStorage, StorageHook, StorageOp};
use vmimg::{FaultStorage, Image, MemoryStorage, PreallocMode, Qcow2Create, Qcow2Open, Storage};

/// Keeps, at every sync, the images `capture` makes of the inner storage.
#[derive(Debug)]
struct AtSyncs<S> {
    images: Mutex<Vec<Vec<u8>>>,
    capture: fn(&S) -> Vec<Vec<u8>>,
}

impl<S> AtSyncs<S> {
    fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.images.lock().unwrap())
    }
}

impl<S: Storage> StorageHook<S> for AtSyncs<S> {
    fn before<'a>(&'a self, inner: &'a S, op: StorageOp) -> BoxFuture<'a, ()> {
        if op == StorageOp::Sync {
            let images = (self.capture)(inner);
            self.images.lock().unwrap().extend(images);
        }
        Box::pin(async {})
    }
}

/// Memory storage that keeps a copy of its bytes at every sync.
fn sync_snapshots() -> HookStorage<MemoryStorage, AtSyncs<MemoryStorage>> {
    let capture = |m: &MemoryStorage| vec![m.to_vec()];
    HookStorage::new(
        MemoryStorage::new(),
        AtSyncs {
            images: Mutex::default(),
            capture,
        },
    )
}

/// A [`FaultStorage`] that keeps 32 crash images at every sync.
fn crashes_at_syncs() -> HookStorage<FaultStorage, AtSyncs<FaultStorage>> {
    let capture = |f: &FaultStorage| (0..32).map(|seed| f.crash_image(seed)).collect();
    HookStorage::new(
        FaultStorage::new(),
        AtSyncs {
            images: Mutex::default(),
            capture,
        },
    )
}

const CS: u64 = 64 << 10;

async fn open(s: Arc<dyn Storage>) -> Image {
    Qcow2Open::storage(s).writable(true).open().await.unwrap()
}

fn no_corruption(report: &CheckReport) -> bool {
    report.corruptions == 0 && report.check_errors == 0 && report.failure.is_none()
}

/// A compressed cluster whose data lands where a freed compressed cluster's data was, with
/// the same length, must read as its own data (not as the freed cluster's).
///
/// Was: `Qcow2Driver::decompressed_cluster` (qcow2/mod.rs) caches decompressed clusters by
/// L2 descriptor (host offset and sector count) and nothing drops an entry when the cluster
/// is freed (`release_entry`) or a new one is written (`write_compressed_impl`,
/// qcow2/write.rs), so the new cluster reads (and copies on write) the old content.
#[tokio::test]
async fn compressed_cluster_written_where_a_freed_one_was_reads_its_own_data() {
    let s = Arc::new(MemoryStorage::new());
    Qcow2Create::new(1 << 20)
        .create_on(s.as_ref(), None)
        .await
        .unwrap();
    let img = open(s.clone()).await;
    img.write_compressed(0, &vec![0x11; CS as usize])
        .await
        .unwrap();
    let mut buf = vec![0u8; CS as usize];
    img.read(0, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0x11));
    // Frees the compressed cluster; the flush makes its host cluster reusable.
    img.write(0, &vec![0x22; CS as usize]).await.unwrap();
    img.flush().await.unwrap();
    img.write_compressed(CS, &vec![0x33; CS as usize])
        .await
        .unwrap();
    img.read(CS, &mut buf).await.unwrap();
    assert!(
        buf.iter().all(|&b| b == 0x33),
        "the new compressed cluster reads {:#x}, not 0x33",
        buf[0]
    );
    // A partial write copies the rest of the cluster from the right data too.
    img.write(CS, &[0x44; 100]).await.unwrap();
    img.read(CS, &mut buf).await.unwrap();
    assert!(buf[..100].iter().all(|&b| b == 0x44));
    assert!(
        buf[100..].iter().all(|&b| b == 0x33),
        "copied {:#x}",
        buf[100]
    );
    img.flush().await.unwrap();
}

/// Compressed writes work whatever the refcount width: a host cluster packed full of
/// compressed data to the refcount maximum takes no more references (QEMU's
/// `qcow2_alloc_bytes` then starts a new cluster).
///
/// Was: `Qcow2Driver::alloc_bytes` (qcow2/write.rs) adds a reference to the cluster it packs
/// into without looking at the maximum, so with 1- or 4-bit refcounts `write_compressed`
/// fails ("refcount of cluster ... would exceed the 1-bit maximum", Unsupported) as soon as
/// two (or sixteen) compressed clusters share a host cluster.
#[tokio::test]
async fn compressed_writes_work_with_narrow_refcounts() {
    for bits in [1, 2, 4, 8] {
        let s = Arc::new(MemoryStorage::new());
        Qcow2Create::new(4 << 20)
            .refcount_bits(bits)
            .create_on(s.as_ref(), None)
            .await
            .unwrap();
        let img = open(s.clone()).await;
        for i in 0..40u64 {
            img.write_compressed(i * CS, &vec![i as u8 + 1; CS as usize])
                .await
                .unwrap_or_else(|e| panic!("{bits}-bit refcounts, cluster {i}: {e}"));
        }
        img.flush().await.unwrap();
        let mut buf = vec![0u8; CS as usize];
        for i in 0..40u64 {
            img.read(i * CS, &mut buf).await.unwrap();
            assert!(buf.iter().all(|&b| b == i as u8 + 1), "{bits} bits, {i}");
        }
        let report = check(s.as_ref(), Repair::None).await.unwrap();
        assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
    }
}

/// At every point of a flush, the refcounts on disk cover every reference the tables on
/// disk hold, also for a host cluster that lost a reference and then gained two in one
/// flush interval (compressed clusters packed into one host cluster).
///
/// Was: `Refcounts::write_dirty_blocks` (qcow2/refcount.rs), while holding back decreases
/// until the tables that dropped the references are on disk, writes each lowered entry with
/// its value from before the first decrease (`decreased`, recorded in `set_existing`),
/// dropping the increments made after it. Here the host cluster goes 2 -> 1 -> 3; the block
/// is written with 2 and the L2 table with 3 references reaches the disk before
/// `flush_decreases` writes 3: a crash in between leaves "refcount=2 reference=3". The held
/// value must be the current one plus the decreases not yet on disk.
#[tokio::test]
async fn refcounts_on_disk_cover_the_references_on_disk_at_every_sync() {
    let s = Arc::new(sync_snapshots());
    Qcow2Create::new(4 << 20)
        .create_on(s.as_ref(), None)
        .await
        .unwrap();
    let img = open(s.clone()).await;
    // Two compressed clusters packed into one host cluster: refcount 2.
    img.write_compressed(0, &vec![1; CS as usize])
        .await
        .unwrap();
    img.write_compressed(CS, &vec![2; CS as usize])
        .await
        .unwrap();
    img.sync().await.unwrap();
    // Copy-on-write of the first drops a reference (1), two more compressed clusters pack
    // into the same host cluster (3).
    img.write(0, &[9; 100]).await.unwrap();
    img.write_compressed(2 * CS, &vec![3; CS as usize])
        .await
        .unwrap();
    img.write_compressed(3 * CS, &vec![4; CS as usize])
        .await
        .unwrap();
    s.hook().take();
    img.sync().await.unwrap();
    let snapshots = s.hook().take();
    assert!(snapshots.len() > 1);
    for (i, bytes) in snapshots.into_iter().enumerate() {
        let m = MemoryStorage::from_bytes(&bytes);
        let report = check(&m, Repair::None).await.unwrap();
        assert!(no_corruption(&report), "crash at sync {i}: {report:#?}");
    }
}

/// Space a grow adds reads as zeros after a crash too: bytes a synced shrink cut off in the
/// middle of a cluster must not come back when a grow over them survives a crash and the
/// zeroing of the old last cluster's tail does not.
///
/// Was: `Qcow2Driver::resize_impl` (qcow2/write.rs), growing, writes the header with the new
/// size and syncs it (and publishes the size in memory) before zeroing `[old end, end of its
/// cluster)` with `write_zeroes_impl`, whose writes are not durable when the resize returns
/// (here an in-place write of zeros into the allocated last cluster). The tail must be zeroed
/// (durably) before the header shows the new size. In memory, the same order lets a reader
/// racing the grow see the junk (`space_a_running_grow_adds_reads_zeros_to_racing_readers`
/// in `qcow2_concurrency.rs`).
#[tokio::test]
async fn a_grow_never_shows_bytes_a_synced_shrink_cut_off_even_after_a_crash() {
    let storage = Arc::new(FaultStorage::new());
    Qcow2Create::new(1 << 20)
        .create_on(storage.as_ref(), None)
        .await
        .unwrap();
    storage.sync().await.unwrap();
    let img = open(storage.clone()).await;
    img.write(0, &vec![0xaa; CS as usize]).await.unwrap();
    img.resize(CS / 2, PreallocMode::Off).await.unwrap();
    img.sync().await.unwrap();
    img.resize(1 << 20, PreallocMode::Off).await.unwrap();
    let mut buf = vec![0u8; (CS / 2) as usize];
    img.read(CS / 2, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0), "the grown space reads junk");
    for seed in 0..16 {
        let m: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(&storage.crash_image(seed)));
        let crashed = open(m).await;
        if crashed.size() > CS / 2 {
            crashed.read(CS / 2, &mut buf).await.unwrap();
            if let Some(i) = buf.iter().position(|&b| b != 0) {
                panic!(
                    "crash {seed}: byte {:#x} of the grown space reads {:#x}",
                    CS / 2 + i as u64,
                    buf[i]
                );
            }
        }
    }
    img.flush().await.unwrap();
}

/// A crash in the middle of a shrink never leaves the header with the new size while the L2
/// tables on disk still map clusters past it: growing the image again would show their old
/// data.
///
/// Was: `Qcow2Driver::resize_impl` (qcow2/write.rs), shrinking, writes the header with the
/// new size before `flush_locked` writes the L2 tables that no longer map the clusters past
/// it (it only flushes first for L2 tables it drops whole). The final flush syncs the header
/// together with the refcount blocks, before the L2 tables are written: a crash at that sync
/// leaves the new size with the old mappings, and a grow (which only zeroes the tail of the
/// old last cluster) exposes them. The L2 changes must be durable before the header is
/// written.
#[tokio::test]
async fn a_crash_inside_a_shrink_leaves_nothing_mapped_past_the_new_end() {
    let s = Arc::new(sync_snapshots());
    Qcow2Create::new(4 << 20)
        .create_on(s.as_ref(), None)
        .await
        .unwrap();
    let img = open(s.clone()).await;
    // Compressed: freeing it does not punch its data out of the file.
    img.write_compressed(3 << 20, &vec![0xbb; CS as usize])
        .await
        .unwrap();
    img.sync().await.unwrap();
    s.hook().take();
    img.resize(1 << 20, PreallocMode::Off).await.unwrap();
    let snapshots = s.hook().take();
    assert!(!snapshots.is_empty());
    for (i, bytes) in snapshots.into_iter().enumerate() {
        let m = Arc::new(MemoryStorage::from_bytes(&bytes));
        let report = check(m.as_ref(), Repair::None).await.unwrap();
        assert!(no_corruption(&report), "crash at sync {i}: {report:#?}");
        let crashed = open(m).await;
        let survived = crashed.size();
        if survived < 4 << 20 {
            crashed.resize(4 << 20, PreallocMode::Off).await.unwrap();
        }
        let mut buf = vec![0u8; CS as usize];
        crashed.read(3 << 20, &mut buf).await.unwrap();
        // With the old size the shrink may or may not have freed the data; with the new one
        // the space is new and reads zeros.
        let old = survived == 4 << 20 && buf.iter().all(|&b| b == 0xbb);
        assert!(
            old || buf.iter().all(|&b| b == 0),
            "crash at sync {i}: the image has size {survived:#x}; grown back, the cut space \
             reads {:#x}",
            buf[0]
        );
        crashed.flush().await.unwrap();
    }
    img.flush().await.unwrap();
}

/// With narrow refcounts, a host cluster that lost a reference in this flush interval takes
/// no more references than its refcount can count together with the lost one: until the
/// table that dropped it is on disk, a crash can leave both on disk.
///
/// Bug: `Refcounts::write_dirty_blocks` (qcow2/refcount.rs) holds a lowered refcount back at
/// `current + pending decreases`, clamped to the width's maximum, and
/// `Qcow2Driver::alloc_bytes` (qcow2/write.rs) packs one more compressed cluster into the
/// host cluster while `current < max`, ignoring the pending decreases. Here (4-bit
/// refcounts, maximum 15) the host cluster goes 14 (synced) -> 13 (copy-on-write of one of
/// its compressed clusters) -> 15 (two more packed into it, from another L2 table); the
/// block is written with min(15 + 1, 15) = 15, and a crash that lands the second table but
/// not the first leaves 16 references on disk: check reports "ERROR: overflow cluster".
/// `alloc_bytes` must count the pending decreases against the maximum (start a new cluster
/// when `current + pending >= max`).
#[tokio::test]
async fn narrow_refcounts_never_overflow_on_disk_when_a_cluster_is_freed_and_reused() {
    const CS: u64 = 4096;
    let s = Arc::new(crashes_at_syncs());
    Qcow2Create::new(8 << 20)
        .cluster_size(CS)
        .refcount_bits(4)
        .create_on(s.as_ref(), None)
        .await
        .unwrap();
    let img = open(s.clone()).await;
    // Fourteen compressed clusters packed into one host cluster (L2 table 0), and a second
    // L2 table (for [4 MiB, 6 MiB)) on disk already.
    for i in 0..14u64 {
        img.write_compressed(i * CS, &vec![i as u8 + 1; CS as usize])
            .await
            .unwrap();
    }
    img.write((6 << 20) - CS, &[7; 100]).await.unwrap();
    img.sync().await.unwrap();
    // One reference dropped (table 0), two added (the other table).
    img.write(0, &[9; 100]).await.unwrap();
    for k in 0..2u64 {
        img.write_compressed((4 << 20) + k * CS, &vec![0x20 + k as u8; CS as usize])
            .await
            .unwrap();
    }
    s.hook().take();
    img.sync().await.unwrap();
    let images = s.hook().take();
    assert!(!images.is_empty());
    for (i, bytes) in images.into_iter().enumerate() {
        let m = MemoryStorage::from_bytes(&bytes);
        let report = check(&m, Repair::None).await.unwrap();
        assert!(
            no_corruption(&report),
            "crash image {i} (sync {}, seed {}): {:#?}",
            i / 32,
            i % 32,
            report
                .messages
                .iter()
                .filter(|m| !m.starts_with("Leaked"))
                .collect::<Vec<_>>()
        );
    }
    // The image itself reads as written.
    let mut buf = vec![0u8; CS as usize];
    img.read(4 << 20, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0x20));
    img.flush().await.unwrap();
}
