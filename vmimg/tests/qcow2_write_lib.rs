//! Library-level qcow2 write tests: the lazy-refcount dirty bit and the metadata overlap
//! guard.

use std::sync::Arc;
use vmimg::qcow2::check::{check, Repair};
use vmimg::qcow2::header::incompat;
use vmimg::qcow2::Header;
use vmimg::storage::{BoxFuture, HookStorage, StorageHook, StorageOp};
use vmimg::{ErrorKind, Image, MemoryStorage, OpenOptions, Qcow2Create, Qcow2Open, StorageExt};

/// A new image created on memory by `create`, opened for writing.
async fn new_image(create: Qcow2Create) -> (Arc<MemoryStorage>, Image) {
    let s = Arc::new(MemoryStorage::new());
    create.create_on(s.as_ref(), None).await.unwrap();
    let img = Qcow2Open::storage(s.clone())
        .writable(true)
        .open()
        .await
        .unwrap();
    (s, img)
}

async fn header(s: &MemoryStorage) -> Header {
    let mut b = vec![0u8; 65536];
    s.read_at(0, &mut b).await.unwrap();
    Header::parse(&b).unwrap()
}

#[tokio::test]
async fn lazy_refcounts_set_the_dirty_bit_until_the_next_flush() {
    let s = Arc::new(MemoryStorage::new());
    Qcow2Create::new(8 << 20)
        .lazy_refcounts(true)
        .create_on(s.as_ref(), None)
        .await
        .unwrap();
    assert!(!header(&s).await.is_dirty());
    let img = Qcow2Open::storage(s.clone())
        .writable(true)
        .open()
        .await
        .unwrap();
    img.write(100_000, b"lazy").await.unwrap();
    assert!(header(&s).await.is_dirty(), "dirty after the first write");
    img.flush().await.unwrap();
    assert!(!header(&s).await.is_dirty(), "clean after a flush");
    img.write(5 << 20, b"again").await.unwrap();
    assert!(
        header(&s).await.is_dirty(),
        "dirty again after the next write"
    );
    img.flush().await.unwrap();
    let mut buf = [0u8; 5];
    img.read(5 << 20, &mut buf).await.unwrap();
    assert_eq!(&buf, b"again");
}

#[tokio::test]
async fn a_dirty_image_opened_for_writing_gets_its_refcounts_rebuilt_first() {
    let (s, img) = new_image(Qcow2Create::new(8 << 20).lazy_refcounts(true)).await;
    img.write(3 << 20, b"survives").await.unwrap();
    img.flush().await.unwrap();
    img.write(6 << 20, b"crash").await.unwrap();
    // A crash now: the dirty bit is set; simulate refcounts that did not reach the disk by
    // dropping the refcount of the newest cluster.
    let h = header(&s).await;
    assert!(h.is_dirty());
    drop(img);
    let mut entry = [0u8; 8];
    s.read_at(h.refcount_table_offset, &mut entry)
        .await
        .unwrap();
    let block = u64::from_be_bytes(entry);
    let mut counts = vec![0u8; 64];
    s.read_at(block, &mut counts).await.unwrap();
    let last = counts.chunks(2).rposition(|c| c != [0, 0]).unwrap();
    s.write_at(block + 2 * last as u64, &[0, 0]).await.unwrap();
    let before = check(s.as_ref(), Repair::None).await.unwrap();
    assert!(before.corruptions > 0, "{before:?}");

    let img = Qcow2Open::storage(s.clone())
        .writable(true)
        .open()
        .await
        .unwrap();
    assert!(!header(&s).await.is_dirty());
    let after = check(s.as_ref(), Repair::None).await.unwrap();
    assert_eq!((after.corruptions, after.leaks), (0, 0), "{after:?}");
    let mut buf = [0u8; 8];
    img.read(3 << 20, &mut buf).await.unwrap();
    assert_eq!(&buf, b"survives");
    img.flush().await.unwrap();
}

#[tokio::test]
async fn images_without_lazy_refcounts_never_get_the_dirty_bit() {
    let (s, img) = new_image(Qcow2Create::new(8 << 20)).await;
    img.write(0, b"x").await.unwrap();
    assert!(!header(&s).await.is_dirty());
    img.flush().await.unwrap();
}

#[tokio::test]
async fn lying_refcounts_make_the_image_corrupt_instead_of_overwriting_metadata() {
    let s = Arc::new(MemoryStorage::new());
    Qcow2Create::new(8 << 20)
        .create_on(s.as_ref(), None)
        .await
        .unwrap();
    let h = header(&s).await;
    assert_eq!(h.refcount_bits(), 16);
    // Clear the refcount of the L1 table's cluster (entry 3 of the first refcount block).
    let mut entry = [0u8; 8];
    s.read_at(h.refcount_table_offset, &mut entry)
        .await
        .unwrap();
    let block = u64::from_be_bytes(entry);
    let l1_cluster = h.l1_table_offset / 65536;
    s.write_at(block + l1_cluster * 2, &[0, 0]).await.unwrap();

    let img = Qcow2Open::storage(s.clone())
        .writable(true)
        .open()
        .await
        .unwrap();
    let err = img.write(0, &[7u8; 4096]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(header(&s).await.incompatible_features & incompat::CORRUPT != 0);
    // The L1 table was not overwritten, and further writes are refused.
    let mut l1 = vec![0u8; 8];
    s.read_at(h.l1_table_offset, &mut l1).await.unwrap();
    assert_eq!(l1, vec![0u8; 8]);
    assert_eq!(
        img.write(65536, b"more").await.unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    // Reopening for writing is refused; reading still works.
    let err = Qcow2Open::storage(s.clone())
        .writable(true)
        .open()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReadOnly);
    let ro = Qcow2Open::storage(s.clone())
        .options(OpenOptions::new())
        .open()
        .await
        .unwrap();
    let mut buf = [1u8; 16];
    ro.read(0, &mut buf).await.unwrap();
    assert_eq!(buf, [0u8; 16]);
}

async fn l2_offset(s: &MemoryStorage, h: &Header) -> u64 {
    let mut e = [0u8; 8];
    s.read_at(h.l1_table_offset, &mut e).await.unwrap();
    u64::from_be_bytes(e) & 0x00ff_ffff_ffff_fe00
}

/// Regression (review): an extended-L2 entry with the copied bit and host offset 0 made a
/// guest write land on the header.
#[tokio::test]
async fn crafted_extended_entry_at_offset_zero_never_gets_guest_data() {
    let (s, img) = new_image(Qcow2Create::new(1 << 20).extended_l2(true)).await;
    img.write(65536, b"x").await.unwrap();
    img.flush().await.unwrap();
    drop(img);
    let h = header(&s).await;
    let l2 = l2_offset(&s, &h).await;
    let mut entry = (1u64 << 63).to_be_bytes().to_vec();
    entry.extend_from_slice(&0u64.to_be_bytes());
    s.write_at(l2, &entry).await.unwrap();
    let img = Qcow2Open::storage(s.clone())
        .writable(true)
        .open()
        .await
        .unwrap();
    let _ = img.write(0, &[0x99u8; 4096]).await;
    let _ = img.flush().await;
    let mut magic = [0u8; 4];
    s.read_at(0, &mut magic).await.unwrap();
    assert_eq!(&magic, b"QFI\xfb", "the header was overwritten");
}

/// Regression (review): growing after a shrink exposed stale subclusters and backing data.
#[tokio::test]
async fn regrown_space_reads_zeros_with_extended_l2_and_over_a_backing_file() {
    let (_s, img) = new_image(Qcow2Create::new(1 << 20).extended_l2(true)).await;
    img.write(10 << 10, &[0x77u8; 2048]).await.unwrap();
    img.resize(2048, vmimg::PreallocMode::Off).await.unwrap();
    img.resize(65536, vmimg::PreallocMode::Off).await.unwrap();
    let mut buf = vec![1u8; 65536 - 2048];
    img.read(2048, &mut buf).await.unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "stale subcluster data after regrow"
    );
    img.flush().await.unwrap();

    let base = Arc::new(MemoryStorage::from_bytes(&[0x11u8; 1 << 20]));
    let base_img = vmimg::RawOpen::storage(base).open().await.unwrap();
    let top = Arc::new(MemoryStorage::new());
    Qcow2Create::new(1 << 20)
        .create_on(top.as_ref(), None)
        .await
        .unwrap();
    let img = Qcow2Open::storage(top.clone())
        .options(OpenOptions::new().writable(true).backing(base_img))
        .open()
        .await
        .unwrap();
    img.resize(32 << 10, vmimg::PreallocMode::Off)
        .await
        .unwrap();
    img.resize(1 << 20, vmimg::PreallocMode::Off).await.unwrap();
    let mut buf = vec![1u8; (1 << 20) - (32 << 10)];
    img.read(32 << 10, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0), "backing data showed through");
    let mut head = vec![0u8; 32 << 10];
    img.read(0, &mut head).await.unwrap();
    assert!(head.iter().all(|&b| b == 0x11));
    img.flush().await.unwrap();
}

/// Regression (review): after `amend` the open handle kept writing with the old options.
#[tokio::test]
async fn writes_through_a_handle_after_amend_are_refused() {
    let (s, img) = new_image(Qcow2Create::new(1 << 20)).await;
    let q = img
        .driver()
        .as_any()
        .downcast_ref::<vmimg::qcow2::Qcow2Driver>()
        .unwrap();
    let a = vmimg::qcow2::Qcow2Amend {
        compat: Some("0.10".into()),
        ..Default::default()
    };
    q.amend(&a, img.below()).await.unwrap();
    let e = img.write_zeroes(0, 65536, false).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert_eq!(header(&s).await.version, 2);
    img.flush().await.unwrap();
}

/// Whole-cluster (64 KiB) writes wait at a gate while it is armed: on a memory storage, lets
/// a test hold an allocating write between allocation and commit.
#[derive(Debug)]
struct Gate {
    armed: std::sync::atomic::AtomicBool,
    gate: tokio::sync::Semaphore,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            armed: false.into(),
            gate: tokio::sync::Semaphore::new(0),
        }
    }
}

impl StorageHook<MemoryStorage> for Gate {
    fn before<'a>(&'a self, _: &'a MemoryStorage, op: StorageOp) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let StorageOp::Write { len: 65536, .. } = op {
                if self.armed.load(std::sync::atomic::Ordering::SeqCst) {
                    self.gate.acquire().await.unwrap().forget();
                }
            }
        })
    }
}

type GateStorage = HookStorage<MemoryStorage, Gate>;

async fn gated_image() -> (Arc<GateStorage>, Image) {
    let s = Arc::new(GateStorage::default());
    Qcow2Create::new(8 << 20)
        .create_on(s.as_ref(), None)
        .await
        .unwrap();
    let img = Qcow2Open::storage(s.clone())
        .writable(true)
        .open()
        .await
        .unwrap();
    (s, img)
}

/// An allocating write writes its data without the metadata lock; a second write to the same
/// cluster waits for its commit, writes to other clusters do not, and the result is one
/// write's data or the other's, never a mix, with clean refcounts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_a_cluster_being_allocated_wait_for_its_commit() {
    let (s, img) = gated_image().await;
    s.hook()
        .armed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let a = tokio::spawn({
        let img = img.clone();
        async move { img.write(1 << 20, &vec![0xaa; 65536]).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!a.is_finished(), "the first write waits at the gate");
    // Another cluster (4 KiB: not gated) goes through while the first allocation is pending.
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        img.write(3 << 20, &[0x33; 4096]),
    )
    .await
    .expect("a write to another cluster must not wait for the pending allocation")
    .unwrap();
    // A write to the pending cluster waits for it.
    let b = tokio::spawn({
        let img = img.clone();
        async move { img.write((1 << 20) + 4096, &[0xbb; 4096]).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(
        !b.is_finished(),
        "a write to the cluster being allocated waits"
    );
    s.hook()
        .armed
        .store(false, std::sync::atomic::Ordering::SeqCst);
    s.hook().gate.add_permits(1);
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    let mut got = vec![0u8; 65536];
    img.read(1 << 20, &mut got).await.unwrap();
    let mut want = vec![0xaa; 65536];
    want[4096..8192].fill(0xbb);
    assert!(
        got == want,
        "the second write lands after the first one's commit"
    );
    img.flush().await.unwrap();
    let report = check(s.as_ref(), Repair::None).await.unwrap();
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
}

/// An allocating write abandoned between allocation and commit (its future dropped, as by
/// a timeout) clears its pending mark: later writes to the cluster do not hang, and the only
/// cost is a leaked cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_allocating_write_does_not_block_the_cluster() {
    let (s, img) = gated_image().await;
    s.hook()
        .armed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let abandoned = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        img.write(1 << 20, &vec![0xaa; 65536]),
    )
    .await;
    assert!(abandoned.is_err(), "the gated write cannot finish");
    s.hook()
        .armed
        .store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        img.write(1 << 20, &vec![0xbb; 65536]),
    )
    .await
    .expect("the cluster of an abandoned write must not stay blocked")
    .unwrap();
    let mut got = vec![0u8; 65536];
    img.read(1 << 20, &mut got).await.unwrap();
    assert!(got.iter().all(|&b| b == 0xbb));
    img.flush().await.unwrap();
    let report = check(s.as_ref(), Repair::None).await.unwrap();
    assert_eq!(report.corruptions, 0, "{report:?}");
    assert_eq!(
        report.leaks, 1,
        "the abandoned allocation leaks one cluster: {report:?}"
    );
}
