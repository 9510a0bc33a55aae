//! A full disk never loses a confirmed write: a storage with a byte budget (like a small file
//! system: writes and reservations into new 4 KiB blocks use it up, discards give it back)
//! runs random qcow2 workloads until the budget is gone, at every budget of a sweep. After
//! the first "no space" error the image is flushed; the flush must succeed, every write
//! confirmed before the error must read back, and the image must have no corruption.
//!
//! Small clusters (512 bytes) with 64-bit refcounts make new L2 tables and refcount blocks
//! appear every few writes and the refcount table grow (first at 2 MiB of file), so the
//! budget runs out inside each of those steps at some budget of the sweep.

use std::collections::HashSet;
use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, Mutex};
use vmimg::qcow2::check::{check, Repair};
use vmimg::storage::{BoxFuture, HostExtent};
use vmimg::{
    Error, ErrorKind, Format, ImageOpen, MemoryStorage, OpenOptions, PreallocMode, Qcow2Create,
    Storage,
};

const BLOCK: u64 = 4096;

/// Memory storage with a budget of 4 KiB blocks.
#[derive(Debug)]
struct SmallDisk {
    inner: MemoryStorage,
    used: Mutex<HashSet<u64>>,
    budget: u64,
}

impl SmallDisk {
    fn new(budget_bytes: u64) -> Self {
        SmallDisk {
            inner: MemoryStorage::new(),
            used: Mutex::default(),
            budget: budget_bytes / BLOCK,
        }
    }

    /// Takes the blocks of `[offset, offset + len)`, all or none.
    fn take(&self, offset: u64, len: u64) -> vmimg::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut used = self.used.lock().unwrap();
        let blocks = offset / BLOCK..(offset + len).div_ceil(BLOCK);
        let new = blocks.clone().filter(|b| !used.contains(b)).count() as u64;
        if used.len() as u64 + new > self.budget {
            return Err(Error::from_io(std::io::Error::from_raw_os_error(
                libc::ENOSPC,
            )));
        }
        used.extend(blocks);
        Ok(())
    }

    /// Gives back the blocks wholly inside `[offset, offset + len)`.
    fn release(&self, offset: u64, len: u64) {
        let mut used = self.used.lock().unwrap();
        for b in offset.div_ceil(BLOCK)..(offset + len) / BLOCK {
            used.remove(&b);
        }
    }
}

impl Storage for SmallDisk {
    fn size(&self) -> vmimg::Result<u64> {
        self.inner.size()
    }
    fn mem_align(&self) -> usize {
        1
    }
    fn request_align(&self) -> usize {
        1
    }
    fn is_writable(&self) -> bool {
        true
    }
    fn readv<'a>(
        &'a self,
        offset: u64,
        bufs: &'a mut [IoSliceMut<'_>],
    ) -> BoxFuture<'a, vmimg::Result<()>> {
        self.inner.readv(offset, bufs)
    }
    fn writev<'a>(
        &'a self,
        offset: u64,
        bufs: &'a [IoSlice<'_>],
    ) -> BoxFuture<'a, vmimg::Result<()>> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        match self.take(offset, len) {
            Ok(()) => self.inner.writev(offset, bufs),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> BoxFuture<'_, vmimg::Result<()>> {
        let r = if may_unmap {
            self.release(offset, len);
            Ok(())
        } else {
            self.take(offset, len)
        };
        match r {
            Ok(()) => self.inner.write_zeroes(offset, len, may_unmap),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }
    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, vmimg::Result<()>> {
        self.release(offset, len);
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> BoxFuture<'_, vmimg::Result<()>> {
        self.inner.flush()
    }
    fn sync(&self) -> BoxFuture<'_, vmimg::Result<()>> {
        self.inner.sync()
    }
    fn resize(&self, new_size: u64, prealloc: PreallocMode) -> BoxFuture<'_, vmimg::Result<()>> {
        if let Ok(old) = self.inner.size() {
            if new_size < old {
                self.release(new_size.div_ceil(BLOCK) * BLOCK, u64::MAX / 2);
            }
        }
        self.inner.resize(new_size, prealloc)
    }
    fn extent(&self, offset: u64, max_len: u64) -> BoxFuture<'_, vmimg::Result<(HostExtent, u64)>> {
        self.inner.extent(offset, max_len)
    }
    fn allocate(&self, offset: u64, len: u64) -> BoxFuture<'_, vmimg::Result<()>> {
        Box::pin(std::future::ready(self.take(offset, len)))
    }
}

/// One workload at one budget: returns how many writes were confirmed before the disk was
/// full (None: the image did not even fit).
async fn run(budget: u64, seed: u64) -> Option<usize> {
    const SIZE: u64 = 16 << 20;
    let disk = Arc::new(SmallDisk::new(budget));
    Qcow2Create::new(SIZE)
        .cluster_size(512)
        .refcount_bits(64)
        .create_on(disk.as_ref(), None)
        .await
        .ok()?;
    let image = ImageOpen::storage(disk.clone())
        .format(Format::QCOW2)
        .options(OpenOptions::new().writable(true))
        .open()
        .await
        .unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    // What the guest may read at each byte: Some(value) once a write was confirmed there;
    // None where a refused write may or may not have landed.
    let mut model: Vec<Option<u8>> = vec![Some(0); SIZE as usize];
    let mut confirmed = 0;
    let mut full = false;
    for _ in 0..2000 {
        let len = rng.u64(1..=32768);
        let off = rng.u64(0..SIZE - len);
        let off = if rng.bool() { off / 4096 * 4096 } else { off };
        let value = rng.u8(1..);
        let range = off as usize..(off + len) as usize;
        match image.write(off, &vec![value; len as usize]).await {
            Ok(()) => {
                model[range].iter_mut().for_each(|m| *m = Some(value));
                confirmed += 1;
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::NoSpace, "budget {budget}: {e}");
                model[range].iter_mut().for_each(|m| *m = None);
                if full {
                    break;
                }
                // One more try after the first failure, as a guest would.
                full = true;
            }
        }
        if rng.u8(..16) == 0 {
            image.flush().await.unwrap_or_else(|e| {
                panic!("budget {budget}: a flush failed before the disk was full: {e}")
            });
        }
    }
    image
        .flush()
        .await
        .unwrap_or_else(|e| panic!("budget {budget}: the final flush failed: {e}"));
    drop(image);

    // The image as the disk holds it: no corruption, every confirmed byte there.
    let bytes = disk.inner.to_vec();
    let copy = MemoryStorage::from_bytes(&bytes);
    let report = check(&copy, Repair::None).await.unwrap();
    assert_eq!(
        (report.corruptions, report.check_errors),
        (0, 0),
        "budget {budget}: {:?}",
        report.messages
    );
    let reopened = ImageOpen::storage(Arc::new(MemoryStorage::from_bytes(&bytes)))
        .format(Format::QCOW2)
        .open()
        .await
        .unwrap();
    let mut got = vec![0u8; SIZE as usize];
    reopened.read(0, &mut got).await.unwrap();
    for (i, (g, m)) in got.iter().zip(&model).enumerate() {
        if let Some(want) = m {
            assert_eq!(g, want, "budget {budget}: byte {i:#x} lost");
        }
    }
    Some(confirmed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_writes_survive_every_budget() {
    let mut filled = 0;
    // 64 KiB to ~3.5 MiB in uneven steps: the disk fills up at different points of the
    // workload (new data cluster, L2 table, refcount block, refcount-table growth).
    let mut budget = 64 << 10;
    let mut seed = 1;
    while budget < 3584 << 10 {
        if let Some(n) = run(budget, seed).await {
            assert!(n < 2000, "budget {budget}: the disk never filled up");
            filled += 1;
        }
        budget += 52 << 10;
        seed += 1;
    }
    assert!(filled > 60, "only {filled} budgets held an image");
}
