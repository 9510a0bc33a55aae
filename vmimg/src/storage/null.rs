//! Null storage: reads return zeros, writes are accepted and forgotten (like QEMU's null-co).

use super::{check_request, iov_len, BoxFuture, HostExtent, PreallocMode, Storage};
use crate::Result;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};

/// Storage that stores nothing: every read returns zeros, every write succeeds and is
/// dropped. Its size follows resizes and writes. Useful to benchmark the layers above storage.
#[derive(Debug)]
pub struct NullStorage {
    size: AtomicU64,
}

impl NullStorage {
    /// A null storage that reports `size` bytes.
    pub fn new(size: u64) -> Self {
        NullStorage {
            size: AtomicU64::new(size),
        }
    }

    fn grow_to(&self, end: u64) {
        self.size.fetch_max(end, Ordering::Relaxed);
    }
}

impl Storage for NullStorage {
    fn size(&self) -> Result<u64> {
        Ok(self.size.load(Ordering::Relaxed))
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
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            check_request(self, "read", offset, iov_len(bufs) as u64, false)?;
            bufs.iter_mut().for_each(|b| b.fill(0));
            Ok(())
        })
    }

    fn writev<'a>(&'a self, offset: u64, bufs: &'a [IoSlice<'_>]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let len = iov_len(bufs) as u64;
            check_request(self, "write", offset, len, true)?;
            self.grow_to(offset + len);
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            check_request(self, "write_zeroes", offset, len, true)?;
            self.grow_to(offset + len);
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { check_request(self, "discard", offset, len, true) })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn sync(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn resize(&self, new_size: u64, _prealloc: PreallocMode) -> BoxFuture<'_, Result<()>> {
        self.size.store(new_size, Ordering::Relaxed);
        Box::pin(async { Ok(()) })
    }

    fn extent(&self, offset: u64, max_len: u64) -> BoxFuture<'_, Result<(HostExtent, u64)>> {
        let size = self.size.load(Ordering::Relaxed);
        let len = size.saturating_sub(offset).min(max_len).max(1);
        Box::pin(async move { Ok((HostExtent::Hole, len)) })
    }

    fn allocated_size(&self) -> Option<u64> {
        Some(0)
    }
}
