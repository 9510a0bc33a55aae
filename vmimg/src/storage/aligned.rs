//! [`AlignedStorage`]: requests of any alignment on a storage that needs aligned ones.

use super::{
    iov_len, BoxFuture, HostExtent, Permissions, PreallocMode, ResolvedName, Storage, StorageExt,
};
use crate::Result;
use std::io::{IoSlice, IoSliceMut};
use std::path::Path;
use std::sync::Arc;

/// Serves requests of any offset and length on a storage that only takes aligned ones (an
/// `O_DIRECT` file): unaligned reads go through an aligned bounce buffer, unaligned writes
/// are a read-modify-write of the blocks around them, unaligned zeroing writes its partial
/// blocks, and unaligned discards shrink to the whole blocks inside. Aligned requests pass
/// straight through.
///
/// A read-modify-write holds an exclusive lock, every other write a shared one, so no write
/// lands between the read and the write of a block being patched. Format drivers need this
/// for their metadata (8-byte table entries, headers, compressed clusters at byte offsets);
/// [`request_align`](Storage::request_align) still reports the inner alignment, so layers
/// that can align their own requests keep doing so.
#[derive(Debug)]
pub struct AlignedStorage {
    inner: Arc<dyn Storage>,
    rmw: tokio::sync::RwLock<()>,
}

impl AlignedStorage {
    /// Wraps `inner`; a storage without alignment needs is returned as it is.
    pub fn wrap(inner: Arc<dyn Storage>) -> Arc<dyn Storage> {
        if inner.request_align() <= 1 {
            return inner;
        }
        Arc::new(AlignedStorage {
            inner,
            rmw: tokio::sync::RwLock::new(()),
        })
    }

    fn align(&self) -> u64 {
        self.inner.request_align() as u64
    }

    fn is_aligned(&self, offset: u64, len: u64) -> bool {
        let a = self.align();
        offset % a == 0 && len % a == 0
    }

    /// The aligned blocks around `[offset, offset + len)`.
    fn around(&self, offset: u64, len: u64) -> (u64, u64) {
        let a = self.align();
        let start = offset / a * a;
        (start, (offset + len).div_ceil(a) * a)
    }

    /// Read-modify-write: `fill` patches the bytes of `[offset, offset + len)` inside the
    /// buffer holding the aligned blocks around them.
    async fn patch(&self, offset: u64, len: u64, fill: impl FnOnce(&mut [u8])) -> Result<()> {
        let _exclusive = self.rmw.write().await;
        let (start, end) = self.around(offset, len);
        let mut tmp = vec![0u8; (end - start) as usize];
        self.inner.read_at(start, &mut tmp).await?;
        let at = (offset - start) as usize;
        fill(&mut tmp[at..at + len as usize]);
        self.inner.write_at(start, &tmp).await
    }
}

impl Storage for AlignedStorage {
    fn size(&self) -> Result<u64> {
        self.inner.size()
    }

    fn mem_align(&self) -> usize {
        self.inner.mem_align()
    }

    fn request_align(&self) -> usize {
        self.inner.request_align()
    }

    fn is_writable(&self) -> bool {
        self.inner.is_writable()
    }

    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }

    fn readv<'a>(
        &'a self,
        offset: u64,
        bufs: &'a mut [IoSliceMut<'_>],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let len = iov_len(bufs) as u64;
            if self.is_aligned(offset, len) {
                return self.inner.readv(offset, bufs).await;
            }
            let (start, end) = self.around(offset, len);
            let mut tmp = vec![0u8; (end - start) as usize];
            self.inner.read_at(start, &mut tmp).await?;
            let mut src = &tmp[(offset - start) as usize..];
            for b in bufs.iter_mut() {
                let (head, rest) = src.split_at(b.len());
                b.copy_from_slice(head);
                src = rest;
            }
            Ok(())
        })
    }

    fn writev<'a>(&'a self, offset: u64, bufs: &'a [IoSlice<'_>]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let len = iov_len(bufs) as u64;
            if self.is_aligned(offset, len) {
                let _shared = self.rmw.read().await;
                return self.inner.writev(offset, bufs).await;
            }
            self.patch(offset, len, |dst| {
                let mut pos = 0;
                for b in bufs {
                    dst[pos..pos + b.len()].copy_from_slice(b);
                    pos += b.len();
                }
            })
            .await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let a = self.align();
            let end = offset + len;
            let (mid_start, mid_end) = (offset.div_ceil(a) * a, end / a * a);
            if mid_start >= mid_end {
                return self.patch(offset, len, |d| d.fill(0)).await;
            }
            if offset < mid_start {
                self.patch(offset, mid_start - offset, |d| d.fill(0))
                    .await?;
            }
            {
                let _shared = self.rmw.read().await;
                self.inner
                    .write_zeroes(mid_start, mid_end - mid_start, may_unmap)
                    .await?;
            }
            if mid_end < end {
                self.patch(mid_end, end - mid_end, |d| d.fill(0)).await?;
            }
            Ok(())
        })
    }

    fn allocate(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        self.inner.allocate(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            // Advisory: only the whole blocks inside are released.
            let a = self.align();
            let (start, end) = (offset.div_ceil(a) * a, (offset + len) / a * a);
            if start >= end {
                return Ok(());
            }
            let _shared = self.rmw.read().await;
            self.inner.discard(start, end - start).await
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        self.inner.flush()
    }

    fn sync(&self) -> BoxFuture<'_, Result<()>> {
        self.inner.sync()
    }

    fn resize(&self, new_size: u64, prealloc: PreallocMode) -> BoxFuture<'_, Result<()>> {
        self.inner.resize(new_size, prealloc)
    }

    fn extent(&self, offset: u64, max_len: u64) -> BoxFuture<'_, Result<(HostExtent, u64)>> {
        self.inner.extent(offset, max_len)
    }

    fn allocated_size(&self) -> Option<u64> {
        self.inner.allocated_size()
    }

    fn set_permissions(&self, perm: Permissions, shared: Permissions) -> Result<()> {
        self.inner.set_permissions(perm, shared)
    }

    fn permissions(&self) -> (Permissions, Permissions) {
        self.inner.permissions()
    }

    fn debug_event(&self, event: &'static str) {
        self.inner.debug_event(event)
    }

    fn is_block_device(&self) -> bool {
        self.inner.is_block_device()
    }

    fn resolve_name(&self, name: &str) -> Result<ResolvedName> {
        self.inner.resolve_name(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::FileStorageOpen;

    /// Unaligned reads, writes and zeroing on an `O_DIRECT` file behave like on a buffered
    /// one, and aligned neighbours are kept.
    #[tokio::test]
    async fn unaligned_requests_on_a_direct_file_work() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("f");
        let direct = FileStorageOpen::new(&path)
            .create(true)
            .direct(true)
            .open()
            .await
            .expect("O_DIRECT on /var/tmp");
        let s = AlignedStorage::wrap(Arc::new(direct));
        assert!(s.request_align() > 1);
        let mut model = vec![0u8; 3 * 4096];
        let base: Vec<u8> = (0..model.len()).map(|i| (i % 251) as u8).collect();
        s.write_at(0, &base).await.unwrap();
        model.copy_from_slice(&base);
        s.write_at(4090, b"unaligned!").await.unwrap();
        model[4090..4100].copy_from_slice(b"unaligned!");
        s.write_zeroes(100, 5000, false).await.unwrap();
        model[100..5100].fill(0);
        s.write_at(3, b"x").await.unwrap();
        model[3] = b'x';
        let mut got = vec![0u8; 9000];
        s.read_at(7, &mut got).await.unwrap();
        assert!(got[..] == model[7..9007]);
        let (mut a, mut b) = ([0u8; 5], [0u8; 9]);
        s.readv(
            4091,
            &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)],
        )
        .await
        .unwrap();
        assert_eq!(&a, &model[4091..4096]);
        assert_eq!(&b, &model[4096..4105]);
        // Past the end: zeros.
        let mut tail = [9u8; 20];
        s.read_at(3 * 4096 - 10, &mut tail).await.unwrap();
        assert_eq!(&tail[..10], &model[3 * 4096 - 10..]);
        assert_eq!(tail[10..], [0u8; 10]);
    }
}
