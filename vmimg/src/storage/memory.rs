//! Sparse in-memory storage: 64 KiB chunks allocated on first write.

use super::{check_request, iov_len, BoxFuture, HostExtent, PreallocMode, Storage};
use crate::Result;
use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::sync::RwLock;

const CHUNK_SHIFT: u32 = 16;
const CHUNK: u64 = 1 << CHUNK_SHIFT;

#[derive(Debug, Default)]
struct Inner {
    size: u64,
    chunks: HashMap<u64, Box<[u8]>>,
}

/// Sparse storage in memory. Unwritten ranges are holes that read as zeros, so images with a
/// large virtual size cost only what is written. Cheap to create; used by tests and fuzzers.
#[derive(Debug)]
pub struct MemoryStorage {
    inner: RwLock<Inner>,
    writable: bool,
}

impl MemoryStorage {
    /// An empty, writable storage.
    pub fn new() -> Self {
        Self::with_size(0)
    }

    /// A writable storage of `size` bytes reading as zeros.
    pub fn with_size(size: u64) -> Self {
        MemoryStorage {
            inner: RwLock::new(Inner {
                size,
                chunks: HashMap::new(),
            }),
            writable: true,
        }
    }

    /// A writable storage holding a copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let s = Self::with_size(bytes.len() as u64);
        s.inner.write().unwrap().write(0, &[IoSlice::new(bytes)]);
        s
    }

    /// Same contents, read-only.
    pub fn into_read_only(mut self) -> Self {
        self.writable = false;
        self
    }

    /// A copy of the whole contents (for tests; allocates the full size).
    pub fn to_vec(&self) -> Vec<u8> {
        let inner = self.inner.read().unwrap();
        let mut v = vec![0u8; inner.size as usize];
        inner.read(0, &mut [IoSliceMut::new(&mut v)]);
        v
    }
}

impl Default for MemoryStorage {
    fn default() -> Self {
        Self::new()
    }
}

impl Inner {
    /// Calls `f(chunk_index, offset_in_chunk, len)` for each chunk piece of a range.
    fn for_each_piece(offset: u64, len: u64, mut f: impl FnMut(u64, usize, usize)) {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let idx = pos >> CHUNK_SHIFT;
            let within = (pos & (CHUNK - 1)) as usize;
            let n = (CHUNK - within as u64).min(end - pos) as usize;
            f(idx, within, n);
            pos += n as u64;
        }
    }

    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) {
        let mut pos = offset;
        for buf in bufs.iter_mut() {
            let mut done = 0usize;
            Self::for_each_piece(pos, buf.len() as u64, |idx, within, n| {
                let dst = &mut buf[done..done + n];
                let chunk_start = idx << CHUNK_SHIFT;
                match self.chunks.get(&idx) {
                    Some(chunk) if chunk_start + (within as u64) < self.size => {
                        // Bytes past the size read as zero even if the chunk still holds data.
                        let valid = (self.size - chunk_start - within as u64).min(n as u64);
                        let valid = valid as usize;
                        dst[..valid].copy_from_slice(&chunk[within..within + valid]);
                        dst[valid..].fill(0);
                    }
                    _ => dst.fill(0),
                }
                done += n;
            });
            pos += buf.len() as u64;
        }
    }

    fn write(&mut self, offset: u64, bufs: &[IoSlice<'_>]) {
        let mut pos = offset;
        for buf in bufs {
            let mut done = 0usize;
            Self::for_each_piece(pos, buf.len() as u64, |idx, within, n| {
                let chunk = self
                    .chunks
                    .entry(idx)
                    .or_insert_with(|| vec![0u8; CHUNK as usize].into_boxed_slice());
                chunk[within..within + n].copy_from_slice(&buf[done..done + n]);
                done += n;
            });
            pos += buf.len() as u64;
        }
        self.size = self.size.max(pos);
    }

    fn zero(&mut self, offset: u64, len: u64) {
        Self::for_each_piece(offset, len, |idx, within, n| {
            if within == 0 && n as u64 == CHUNK {
                self.chunks.remove(&idx);
            } else if let Some(chunk) = self.chunks.get_mut(&idx) {
                chunk[within..within + n].fill(0);
            }
        });
    }

    fn truncate(&mut self, new_size: u64) {
        if new_size < self.size {
            // Zero the tail of the last kept chunk and drop the chunks past the end, so that
            // growing again reads zeros.
            let first_dropped = new_size.div_ceil(CHUNK);
            self.chunks.retain(|&idx, _| idx < first_dropped);
            if new_size % CHUNK != 0 {
                if let Some(chunk) = self.chunks.get_mut(&(new_size >> CHUNK_SHIFT)) {
                    chunk[(new_size % CHUNK) as usize..].fill(0);
                }
            }
        }
        self.size = new_size;
    }
}

impl Storage for MemoryStorage {
    fn size(&self) -> Result<u64> {
        Ok(self.inner.read().unwrap().size)
    }

    fn mem_align(&self) -> usize {
        1
    }

    fn request_align(&self) -> usize {
        1
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn readv<'a>(
        &'a self,
        offset: u64,
        bufs: &'a mut [IoSliceMut<'_>],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            check_request(self, "read", offset, iov_len(bufs) as u64, false)?;
            self.inner.read().unwrap().read(offset, bufs);
            Ok(())
        })
    }

    fn writev<'a>(&'a self, offset: u64, bufs: &'a [IoSlice<'_>]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            check_request(self, "write", offset, iov_len(bufs) as u64, true)?;
            self.inner.write().unwrap().write(offset, bufs);
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            check_request(self, "write_zeroes", offset, len, true)?;
            let mut inner = self.inner.write().unwrap();
            inner.zero(offset, len);
            inner.size = inner.size.max(offset + len);
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            check_request(self, "discard", offset, len, true)?;
            let mut inner = self.inner.write().unwrap();
            let end = (offset + len).min(inner.size);
            if offset < end {
                inner.zero(offset, end - offset);
            }
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn sync(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn resize(&self, new_size: u64, _prealloc: PreallocMode) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            check_request(self, "resize", new_size, 0, true)?;
            self.inner.write().unwrap().truncate(new_size);
            Ok(())
        })
    }

    fn extent(&self, offset: u64, max_len: u64) -> BoxFuture<'_, Result<(HostExtent, u64)>> {
        Box::pin(async move {
            let inner = self.inner.read().unwrap();
            let end = offset.saturating_add(max_len).min(inner.size);
            if offset >= end {
                return Ok((HostExtent::Hole, max_len.max(1)));
            }
            let kind_at = |pos: u64| {
                if inner.chunks.contains_key(&(pos >> CHUNK_SHIFT)) {
                    HostExtent::Data
                } else {
                    HostExtent::Hole
                }
            };
            let kind = kind_at(offset);
            let mut pos = (offset | (CHUNK - 1)) + 1;
            while pos < end && kind_at(pos) == kind {
                pos += CHUNK;
            }
            Ok((kind, pos.min(end) - offset))
        })
    }

    fn allocated_size(&self) -> Option<u64> {
        Some(self.inner.read().unwrap().chunks.len() as u64 * CHUNK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageExt;

    #[tokio::test]
    async fn shrink_then_grow_reads_zeros() {
        let s = MemoryStorage::from_bytes(&[0xaa; 100_000]);
        s.resize(1000, PreallocMode::Off).await.unwrap();
        s.resize(100_000, PreallocMode::Off).await.unwrap();
        let mut buf = vec![0xffu8; 100_000];
        s.read_at(0, &mut buf).await.unwrap();
        assert!(buf[..1000].iter().all(|&b| b == 0xaa));
        assert!(buf[1000..].iter().all(|&b| b == 0));
    }

    #[tokio::test]
    async fn extent_reports_chunks_as_data_and_holes() {
        let s = MemoryStorage::with_size(4 * CHUNK);
        s.write_at(CHUNK + 5, b"x").await.unwrap();
        assert_eq!(
            s.extent(0, 4 * CHUNK).await.unwrap(),
            (HostExtent::Hole, CHUNK)
        );
        assert_eq!(
            s.extent(CHUNK, 4 * CHUNK).await.unwrap(),
            (HostExtent::Data, CHUNK)
        );
        assert_eq!(
            s.extent(2 * CHUNK + 7, 4 * CHUNK).await.unwrap(),
            (HostExtent::Hole, 2 * CHUNK - 7)
        );
    }

    #[tokio::test]
    async fn read_only_refuses_writes() {
        let s = MemoryStorage::with_size(10).into_read_only();
        let err = s.write_at(0, b"a").await.unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::ReadOnly);
    }
}
