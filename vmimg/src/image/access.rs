//! The access handle: one I/O loop for every format.
//!
//! A request is split on mapping boundaries; data pieces are read or written straight from
//! or to storage, concurrently; unallocated pieces fall through to the next layer of the
//! backing chain (iteratively, so chains hundreds deep use no stack); unaligned writes are
//! done read-modify-write under an exclusive lock so they cannot interleave with others.

use crate::format::{
    bad_mapping, read_chain, take_front, total, ChainView, DiscardMode, Format, FormatDriver,
    ImageDescription, MapKind, MapQuery,
};
use crate::storage::{PreallocMode, Storage};
use crate::{Error, ErrorKind, Result};
use futures_util::future::try_join_all;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// An open disk image and its backing chain: the type users hold.
///
/// Cheap to clone (clones share the image) and safe to use from many tasks at once.
///
/// **Flush before drop.** Writes may sit in metadata caches until [`Image::flush`] (or
/// [`Image::sync`] for durability) completes. Dropping a written image without flushing can
/// lose those writes; a warning is logged when that happens.
#[must_use = "an image must be used, and flushed before it is dropped if it was written"]
#[derive(Clone, Debug)]
pub struct Image {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `layers[0]` is the image itself, `layers[1]` its backing file, and so on.
    layers: Vec<Arc<dyn FormatDriver>>,
    /// Shared by aligned writes, held exclusively by read-modify-write of unaligned ones.
    rmw: tokio::sync::RwLock<()>,
    /// Set by every write, cleared by a successful flush.
    unflushed: AtomicBool,
    /// Whether this handle owns layer 0 (a view of a backing chain does not).
    owner: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.owner && *self.unflushed.get_mut() {
            let name = self.layers[0]
                .storage()
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            tracing::warn!(image = %name, "image dropped with unflushed writes");
        }
    }
}

/// Allocation status of a guest range (the answer of [`Image::block_status`]), in the terms
/// of `qemu-img map`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockStatus {
    /// Guest offset of the range.
    pub offset: u64,
    /// Length of the range.
    pub len: u64,
    /// Chain depth that answers for the range (0: the image itself). For ranges allocated
    /// nowhere it is the deepest layer that covers the range, as in `qemu-img map`.
    pub depth: usize,
    /// What the range holds.
    pub kind: BlockStatusKind,
    /// The file holding the data, when there is one.
    pub file: Option<std::path::PathBuf>,
}

/// What a guest range holds, as far as the chain says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockStatusKind {
    /// Data stored at `host_offset` of the answering layer's storage.
    Data {
        /// Host offset of the first byte.
        host_offset: u64,
    },
    /// Data allocated at `host_offset`, but over a hole: reads as zeros.
    DataZero {
        /// Host offset of the first byte.
        host_offset: u64,
    },
    /// Data stored compressed.
    Compressed,
    /// Data whose allocation the layer does not report (QEMU's answer for drivers without
    /// block status, such as DMG's): data, at no host offset.
    Opaque,
    /// Reads as zeros, recorded as such by the answering layer.
    Zero {
        /// Host offset still assigned to the range, if any.
        host_offset: Option<u64>,
    },
    /// Allocated nowhere in the chain: reads as zeros.
    Unallocated,
}

impl BlockStatus {
    /// Whether some layer of the chain allocates the range (qemu-img map's `present`).
    pub fn present(&self) -> bool {
        !matches!(self.kind, BlockStatusKind::Unallocated)
    }

    /// Whether the range reads as zeros (qemu-img map's `zero`).
    pub fn zero(&self) -> bool {
        matches!(
            self.kind,
            BlockStatusKind::Zero { .. }
                | BlockStatusKind::DataZero { .. }
                | BlockStatusKind::Unallocated
        )
    }

    /// Whether the range holds data (qemu-img map's `data`).
    pub fn data(&self) -> bool {
        matches!(
            self.kind,
            BlockStatusKind::Data { .. }
                | BlockStatusKind::DataZero { .. }
                | BlockStatusKind::Compressed
                | BlockStatusKind::Opaque
        )
    }

    /// Whether the range is compressed.
    pub fn compressed(&self) -> bool {
        matches!(self.kind, BlockStatusKind::Compressed)
    }

    /// Host offset of the range, when it has one (qemu-img map's `offset`).
    pub fn host_offset(&self) -> Option<u64> {
        match self.kind {
            BlockStatusKind::Data { host_offset } | BlockStatusKind::DataZero { host_offset } => {
                Some(host_offset)
            }
            BlockStatusKind::Zero { host_offset } => host_offset,
            _ => None,
        }
    }
}

async fn write_storage(storage: &dyn Storage, host: u64, bufs: Vec<&[u8]>) -> Result<()> {
    storage.debug_event("write_aio");
    let iov: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
    storage.writev(host, &iov).await
}

impl Image {
    /// Wraps an opened driver (and the image it uses as backing, if any) into a handle.
    ///
    /// The backing image's layers become this image's lower layers; the backing handle may
    /// be dropped afterwards.
    pub fn from_driver(driver: Arc<dyn FormatDriver>, backing: Option<Image>) -> Self {
        let mut layers = vec![driver];
        if let Some(b) = backing {
            layers.extend(b.inner.layers.iter().cloned());
        }
        Self::from_layers(layers, true)
    }

    pub(crate) fn from_layers(layers: Vec<Arc<dyn FormatDriver>>, owner: bool) -> Self {
        Image {
            inner: Arc::new(Inner {
                layers,
                rmw: tokio::sync::RwLock::new(()),
                unflushed: AtomicBool::new(false),
                owner,
            }),
        }
    }

    fn top(&self) -> &dyn FormatDriver {
        self.inner.layers[0].as_ref()
    }

    /// The virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.top().size()
    }

    /// The format of the image itself (layer 0).
    pub fn format(&self) -> Format {
        self.top().format()
    }

    /// Whether the image accepts writes.
    pub fn is_writable(&self) -> bool {
        self.top().is_writable()
    }

    /// The image's backing image, if it has one (a read-only view sharing this handle's
    /// layers).
    pub fn backing(&self) -> Option<Image> {
        (self.inner.layers.len() > 1)
            .then(|| Self::from_layers(self.inner.layers[1..].to_vec(), false))
    }

    /// Number of layers: 1 for an image without backing file.
    pub fn chain_len(&self) -> usize {
        self.inner.layers.len()
    }

    /// The driver of layer 0 (for format-specific queries).
    pub fn driver(&self) -> &Arc<dyn FormatDriver> {
        &self.inner.layers[0]
    }

    /// Facts for `info` about layer 0.
    pub fn describe(&self) -> ImageDescription {
        self.top().describe()
    }

    fn check_range(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::new(
                ErrorKind::OutOfBounds,
                format!("request of {len:#x} bytes ends past the image size {size:#x}"),
            )
            .with_operation(op)
            .with_offset(offset)),
        }
    }

    fn check_write(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        if !self.is_writable() {
            return Err(Error::new(ErrorKind::ReadOnly, "image is opened read-only")
                .with_operation(op)
                .with_offset(offset));
        }
        self.check_range(op, offset, len)
    }

    fn ctx(&self, err: Error, op: &'static str, offset: u64) -> Error {
        let err = err.with_operation(op).with_offset(offset);
        match self.top().storage().path() {
            Some(p) => err.with_path(p),
            None => err,
        }
    }

    /// Guest write alignment: the top layer's request alignment.
    fn write_align(&self) -> u64 {
        self.top().request_align().max(1) as u64
    }

    /// Reads `buf.len()` bytes at guest `offset`.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_slices(offset, vec![buf]).await
    }

    /// Reads into several buffers, filled in order, starting at guest `offset`.
    pub async fn readv(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        self.read_slices(offset, bufs.iter_mut().map(|b| &mut **b).collect())
            .await
    }

    async fn read_slices(&self, offset: u64, bufs: Vec<&mut [u8]>) -> Result<()> {
        let len = total(&bufs) as u64;
        self.check_range("read", offset, len)?;
        read_chain(&self.inner.layers, offset, bufs)
            .await
            .map_err(|e| self.ctx(e, "read", offset))
    }

    /// Writes `buf` at guest `offset`.
    pub async fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_slices(offset, vec![buf]).await
    }

    /// Writes several buffers, in order, starting at guest `offset`.
    pub async fn writev(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        self.write_slices(offset, bufs.iter().map(|b| &**b).collect())
            .await
    }

    async fn write_slices(&self, offset: u64, bufs: Vec<&[u8]>) -> Result<()> {
        let len = total(&bufs) as u64;
        self.check_write("write", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.inner.unflushed.store(true, Ordering::Relaxed);
        let align = self.write_align();
        let result = if align > 1 && (offset % align != 0 || len % align != 0) {
            self.write_unaligned(offset, bufs, align).await
        } else {
            let _shared = if align > 1 {
                Some(self.inner.rmw.read().await)
            } else {
                None
            };
            self.write_aligned(offset, bufs).await
        };
        result.map_err(|e| self.ctx(e, "write", offset))
    }

    /// Read-modify-write of the aligned blocks around an unaligned request.
    async fn write_unaligned(&self, offset: u64, bufs: Vec<&[u8]>, align: u64) -> Result<()> {
        let _exclusive = self.inner.rmw.write().await;
        let end = offset + total(&bufs) as u64;
        let start = offset / align * align;
        // The image size is a multiple of the alignment when alignment matters; clamp anyway.
        let aligned_end = (end.div_ceil(align) * align).min(self.size().max(end));
        let mut tmp = vec![0u8; (aligned_end - start) as usize];
        let head = ((offset - start) as usize).min(tmp.len());
        if head > 0 {
            let n = (align as usize).min(tmp.len());
            read_chain(&self.inner.layers, start, vec![&mut tmp[..n]]).await?;
        }
        let tail_start = (end - start) as usize;
        if tail_start < tmp.len() {
            let block = (aligned_end - align).max(start);
            let from = (block - start) as usize;
            read_chain(&self.inner.layers, block, vec![&mut tmp[from..]]).await?;
        }
        let mut pos = head;
        for b in bufs {
            tmp[pos..pos + b.len()].copy_from_slice(b);
            pos += b.len();
        }
        self.write_aligned(start, vec![&tmp[..]]).await
    }

    async fn write_aligned(&self, offset: u64, mut bufs: Vec<&[u8]>) -> Result<()> {
        let top = self.top();
        top.check_write(offset, &bufs)?;
        let end = offset + total(&bufs) as u64;
        let mut pos = offset;
        let mut ios = Vec::new();
        while pos < end {
            let t = top.map_for_write(pos, end - pos, self.below()).await?;
            if t.len == 0 || t.len > end - pos {
                return Err(bad_mapping(top, pos, t.len));
            }
            let piece = take_front(&mut bufs, t.len as usize);
            match (t.commit, t.hold) {
                (None, None) => ios.push(write_storage(t.storage, t.offset, piece)),
                (commit, hold) => {
                    // The driver tracks this write (a new allocation to publish, or an
                    // in-flight write it must wait for): finish it before asking for the
                    // next target, which may need the lock that the driver's wait holds.
                    write_storage(t.storage, t.offset, piece).await?;
                    drop(hold);
                    if let Some(commit) = commit {
                        // Data first, then the mapping that exposes it.
                        commit().await?;
                    }
                }
            }
            pos += t.len;
        }
        try_join_all(ios).await?;
        Ok(())
    }

    /// Splits `[offset, offset + len)` into an unaligned head, an aligned middle and an
    /// unaligned tail (either may be empty).
    fn split_aligned(&self, offset: u64, len: u64) -> [(u64, u64); 3] {
        let align = self.write_align();
        let end = offset + len;
        let mid_start = offset.div_ceil(align) * align;
        let mid_end = end / align * align;
        if mid_start >= mid_end {
            return [(offset, len), (end, 0), (end, 0)];
        }
        [
            (offset, mid_start - offset),
            (mid_start, mid_end - mid_start),
            (mid_end, end - mid_end),
        ]
    }

    /// Writes one whole cluster compressed (see [`FormatDriver::write_compressed`]); `offset`
    /// must be cluster aligned and `buf` a whole cluster, or the image's last partial one.
    pub async fn write_compressed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check_write("write_compressed", offset, buf.len() as u64)?;
        self.inner.unflushed.store(true, Ordering::Relaxed);
        self.top()
            .write_compressed(offset, buf, self.below())
            .await
            .map_err(|e| self.ctx(e, "write_compressed", offset))
    }

    /// Records a new backing file name and format in the image header (`None` removes it).
    /// The open handle keeps reading through its current chain; reopen to use the new one.
    pub async fn set_backing(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        if !self.is_writable() {
            return Err(Error::new(ErrorKind::ReadOnly, "image is opened read-only"));
        }
        self.top()
            .set_backing(name, format)
            .await
            .map_err(|e| self.ctx(e, "set_backing", 0))
    }

    /// The layers below the image itself (for format-specific operations that need them).
    pub fn below(&self) -> ChainView<'_> {
        ChainView::new(&self.inner.layers[1..])
    }

    /// Whether writes must be whole clusters through [`Image::write_compressed`] (a
    /// stream-optimized VMDK): copies into this image then compress every cluster.
    pub fn needs_compressed_writes(&self) -> bool {
        self.top().needs_compressed_writes()
    }

    /// The format's cluster size, if it has clusters.
    pub fn cluster_size(&self) -> Option<u64> {
        self.top().cluster_size()
    }

    /// The format's unit of allocation within a cluster (its cluster size, or a qcow2
    /// subcluster), if it has clusters.
    pub fn subcluster_size(&self) -> Option<u64> {
        self.top().subcluster_size()
    }

    /// Makes `len` bytes at `offset` read as zeros. With `may_unmap` the space may be
    /// released (qemu-io's `write -z -u`).
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_write("write_zeroes", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.inner.unflushed.store(true, Ordering::Relaxed);
        let [head, mid, tail] = self.split_aligned(offset, len);
        for (o, l) in [head, tail] {
            if l > 0 {
                self.write(o, &vec![0u8; l as usize]).await?;
            }
        }
        if mid.1 > 0 {
            let _shared = self.inner.rmw.read().await;
            self.top()
                .write_zeroes(mid.0, mid.1, may_unmap, self.below())
                .await
                .map_err(|e| self.ctx(e, "write_zeroes", mid.0))?;
        }
        Ok(())
    }

    /// Discards `len` bytes at `offset` with the meaning `mode` (see [`DiscardMode`]).
    ///
    /// Parts smaller than the write alignment are zeroed ([`DiscardMode::ReadsZero`]),
    /// copied up from the backing chain ([`DiscardMode::ReadsBacking`]), or left alone
    /// ([`DiscardMode::ReadsAnything`]).
    pub async fn discard(&self, offset: u64, len: u64, mode: DiscardMode) -> Result<()> {
        self.check_write("discard", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.inner.unflushed.store(true, Ordering::Relaxed);
        let [head, mid, tail] = self.split_aligned(offset, len);
        for (o, l) in [head, tail] {
            if l == 0 {
                continue;
            }
            match mode {
                DiscardMode::ReadsAnything => {}
                DiscardMode::ReadsZero => self.write(o, &vec![0u8; l as usize]).await?,
                DiscardMode::ReadsBacking => {
                    let mut tmp = vec![0u8; l as usize];
                    self.below().read(o, &mut tmp).await?;
                    self.write(o, &tmp).await?;
                }
            }
        }
        if mid.1 > 0 {
            let _shared = self.inner.rmw.read().await;
            self.top()
                .discard(mid.0, mid.1, mode, self.below())
                .await
                .map_err(|e| self.ctx(e, "discard", mid.0))?;
        }
        Ok(())
    }

    /// Writes cached metadata and pushes caches down to the operating system.
    pub async fn flush(&self) -> Result<()> {
        self.top()
            .flush()
            .await
            .map_err(|e| self.ctx(e, "flush", 0))?;
        self.inner.unflushed.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// [`Image::flush`], then makes everything written durable.
    pub async fn sync(&self) -> Result<()> {
        self.top()
            .sync()
            .await
            .map_err(|e| self.ctx(e, "sync", 0))?;
        self.inner.unflushed.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Changes the virtual size; growing uses `prealloc` for the new space.
    pub async fn resize(&self, new_size: u64, prealloc: PreallocMode) -> Result<()> {
        if !self.is_writable() {
            return Err(Error::new(ErrorKind::ReadOnly, "image is opened read-only")
                .with_operation("resize"));
        }
        let align = self.write_align();
        if new_size % align != 0 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("new size {new_size} is not a multiple of the alignment {align}"),
            )
            .with_operation("resize"));
        }
        self.inner.unflushed.store(true, Ordering::Relaxed);
        let _exclusive = self.inner.rmw.write().await;
        self.top()
            .resize(new_size, prealloc, self.below())
            .await
            .map_err(|e| self.ctx(e, "resize", new_size))
    }

    /// Re-reads the metadata of every layer that another process may have changed (qcow2:
    /// header, L1 and L2 tables, size, snapshots, bitmaps; a writable layer flushes its own
    /// changes first). The chain itself is kept: a backing file renamed meanwhile shows in
    /// [`Image::describe`], and is read after reopening the image.
    pub async fn invalidate_cache(&self) -> Result<()> {
        for layer in &self.inner.layers {
            layer.invalidate_cache().await?;
        }
        Ok(())
    }

    /// Allocation status of the longest prefix of `[offset, offset + len)` that has one
    /// status, walking down the backing chain.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.check_range("block_status", offset, len)?;
        if len == 0 {
            return Err(Error::new(ErrorKind::InvalidArgument, "empty range")
                .with_operation("block_status"));
        }
        let mut len = len;
        let mut covering = 0;
        for (depth, layer) in self.inner.layers.iter().enumerate() {
            if offset >= layer.size() {
                // Past the end of a shorter backing file: zeros, allocated nowhere.
                break;
            }
            covering = depth;
            len = len.min(layer.size() - offset);
            if layer.status_unknown() {
                return Ok(BlockStatus {
                    offset,
                    len,
                    depth,
                    kind: BlockStatusKind::Opaque,
                    file: layer.storage().path().map(std::path::Path::to_path_buf),
                });
            }
            let m = layer
                .map(offset, len, MapQuery::Status)
                .await
                .map_err(|e| self.ctx(e, "block_status", offset))?;
            if m.len == 0 || m.len > len {
                return Err(bad_mapping(layer.as_ref(), offset, m.len));
            }
            len = m.len;
            let file_of = |s: &dyn Storage| s.path().map(std::path::Path::to_path_buf);
            let (kind, file) = match m.kind {
                MapKind::Data { storage, offset } => (
                    BlockStatusKind::Data {
                        host_offset: offset,
                    },
                    file_of(storage),
                ),
                MapKind::DataZero { storage, offset } => (
                    BlockStatusKind::DataZero {
                        host_offset: offset,
                    },
                    file_of(storage),
                ),
                MapKind::Zero { offset } => (
                    BlockStatusKind::Zero {
                        host_offset: offset,
                    },
                    file_of(layer.storage()),
                ),
                MapKind::Compressed(_) => (BlockStatusKind::Compressed, file_of(layer.storage())),
                MapKind::Unallocated => continue,
            };
            return Ok(BlockStatus {
                offset,
                len,
                depth,
                kind,
                file,
            });
        }
        Ok(BlockStatus {
            offset,
            len,
            depth: covering,
            kind: BlockStatusKind::Unallocated,
            file: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{MapKind, Mapping, WriteTarget};
    use crate::storage::{BoxFuture, HostExtent, MemoryStorage, StorageExt};

    #[test]
    fn take_front_splits_across_slices() {
        let a = [1u8, 2, 3];
        let b = [4u8, 5];
        let mut v: Vec<&[u8]> = vec![&a, &b];
        let front = take_front(&mut v, 4);
        assert_eq!(front, vec![&[1u8, 2, 3][..], &[4u8][..]]);
        assert_eq!(v, vec![&[5u8][..]]);
    }

    /// A test driver over sparse memory: unwritten 64 KiB chunks are *unallocated* (fall
    /// through to backing), so the access layer's chain logic can be tested without qcow2.
    #[derive(Debug)]
    struct Sparse {
        storage: MemoryStorage,
        size: u64,
        align: usize,
    }

    impl FormatDriver for Sparse {
        fn format(&self) -> Format {
            Format::RAW
        }
        fn size(&self) -> u64 {
            self.size
        }
        fn is_writable(&self) -> bool {
            true
        }
        fn storage(&self) -> &dyn Storage {
            &self.storage
        }
        fn request_align(&self) -> usize {
            self.align
        }
        fn map(&self, offset: u64, len: u64, _q: MapQuery) -> BoxFuture<'_, Result<Mapping<'_>>> {
            Box::pin(async move {
                let (ext, n) = self.storage.extent(offset, len).await?;
                let n = n.min(len);
                Ok(match ext {
                    HostExtent::Data => Mapping {
                        len: n,
                        kind: MapKind::Data {
                            storage: &self.storage,
                            offset,
                        },
                    },
                    HostExtent::Hole => Mapping {
                        len: n,
                        kind: MapKind::Unallocated,
                    },
                })
            })
        }
        fn map_for_write<'a>(
            &'a self,
            offset: u64,
            len: u64,
            below: ChainView<'a>,
        ) -> BoxFuture<'a, Result<WriteTarget<'a>>> {
            Box::pin(async move {
                // Copy-on-write whole 64 KiB chunks that are still unallocated here.
                let chunk = 65536u64;
                let start = offset / chunk * chunk;
                let end = (offset + len).div_ceil(chunk) * chunk;
                let mut c = start;
                while c < end.min(self.size) {
                    if self.storage.extent(c, chunk).await?.0 == HostExtent::Hole {
                        let mut tmp = vec![0u8; chunk.min(self.size - c) as usize];
                        below.read(c, &mut tmp).await?;
                        self.storage.write_at(c, &tmp).await?;
                    }
                    c += chunk;
                }
                Ok(WriteTarget {
                    len,
                    storage: &self.storage,
                    offset,
                    commit: None,
                    hold: None,
                })
            })
        }
        fn write_zeroes<'a>(
            &'a self,
            offset: u64,
            len: u64,
            _unmap: bool,
            below: ChainView<'a>,
        ) -> BoxFuture<'a, Result<()>> {
            Box::pin(async move {
                let t = self.map_for_write(offset, len, below).await?;
                t.storage.write_at(offset, &vec![0u8; len as usize]).await
            })
        }
        fn discard<'a>(
            &'a self,
            offset: u64,
            len: u64,
            _mode: DiscardMode,
            _below: ChainView<'a>,
        ) -> BoxFuture<'a, Result<()>> {
            Box::pin(async move { self.storage.discard(offset, len).await })
        }
        fn resize<'a>(
            &'a self,
            _s: u64,
            _p: PreallocMode,
            _below: ChainView<'a>,
        ) -> BoxFuture<'a, Result<()>> {
            Box::pin(async { Err(Error::new(ErrorKind::Unsupported, "no")) })
        }
        fn flush(&self) -> BoxFuture<'_, Result<()>> {
            Box::pin(async { Ok(()) })
        }
        fn sync(&self) -> BoxFuture<'_, Result<()>> {
            Box::pin(async { Ok(()) })
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    async fn sparse(size: u64, align: usize, fill: &[(u64, u8, usize)]) -> Arc<dyn FormatDriver> {
        let storage = MemoryStorage::with_size(size);
        for &(off, byte, n) in fill {
            storage.write_at(off, &vec![byte; n]).await.unwrap();
        }
        Arc::new(Sparse {
            storage,
            size,
            align,
        })
    }

    #[tokio::test]
    async fn unallocated_ranges_fall_through_to_backing_and_past_its_end_read_zero() {
        let base = Image::from_driver(sparse(128 << 10, 1, &[(0, 0xbb, 128 << 10)]).await, None);
        let top = Image::from_driver(
            sparse(256 << 10, 1, &[(64 << 10, 0x77, 1000)]).await,
            Some(base),
        );
        let mut buf = vec![0xffu8; 256 << 10];
        top.read(0, &mut buf).await.unwrap();
        assert!(buf[..64 << 10].iter().all(|&b| b == 0xbb));
        assert!(buf[64 << 10..(64 << 10) + 1000].iter().all(|&b| b == 0x77));
        // The rest of the top's written chunk is allocated there (zeros).
        assert!(buf[(64 << 10) + 1000..128 << 10].iter().all(|&b| b == 0));
        assert!(buf[128 << 10..].iter().all(|&b| b == 0), "past backing end");
        let st = top.block_status(0, 256 << 10).await.unwrap();
        assert_eq!((st.depth, st.len), (1, 64 << 10));
        // Past the backing file's end: allocated nowhere, answered by the top (as qemu-img).
        let st = top.block_status(128 << 10, 128 << 10).await.unwrap();
        assert_eq!(st.kind, BlockStatusKind::Unallocated);
        assert_eq!(st.depth, 0);
    }

    #[tokio::test]
    async fn deep_chain_reads_bottom_layer_without_recursion() {
        let mut img = Image::from_driver(sparse(64 << 10, 1, &[(100, 0x42, 10)]).await, None);
        for _ in 0..500 {
            img = Image::from_driver(sparse(64 << 10, 1, &[]).await, Some(img));
        }
        assert_eq!(img.chain_len(), 501);
        let mut buf = [0u8; 12];
        img.read(99, &mut buf).await.unwrap();
        assert_eq!(
            buf,
            [0, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0]
        );
    }

    #[tokio::test]
    async fn unaligned_write_is_read_modify_write_over_backing() {
        let base = Image::from_driver(sparse(1 << 20, 1, &[(0, 0x11, 1 << 20)]).await, None);
        let top = Image::from_driver(sparse(1 << 20, 4096, &[]).await, Some(base));
        top.write(5000, b"hello").await.unwrap();
        let mut buf = vec![0u8; 8192];
        top.read(4096, &mut buf).await.unwrap();
        assert_eq!(&buf[904..909], b"hello");
        assert!(buf[..904].iter().all(|&b| b == 0x11));
        assert!(buf[909..].iter().all(|&b| b == 0x11));
        top.flush().await.unwrap();
    }

    #[tokio::test]
    async fn discard_reads_backing_copies_unaligned_edges_from_below() {
        let base = Image::from_driver(sparse(1 << 20, 1, &[(0, 0x22, 1 << 20)]).await, None);
        let top = Image::from_driver(sparse(1 << 20, 4096, &[]).await, Some(base));
        top.write(0, &vec![0x33; 16384]).await.unwrap();
        top.discard(100, 8000, DiscardMode::ReadsBacking)
            .await
            .unwrap();
        let mut buf = vec![0u8; 16384];
        top.read(0, &mut buf).await.unwrap();
        assert!(buf[..100].iter().all(|&b| b == 0x33));
        assert!(buf[100..8100].iter().all(|&b| b == 0x22));
        assert!(buf[8100..].iter().all(|&b| b == 0x33));
        top.flush().await.unwrap();
    }

    #[tokio::test]
    async fn out_of_bounds_requests_are_refused_and_backing_view_drops_top() {
        let img = Image::from_driver(sparse(4096, 1, &[]).await, None);
        let mut buf = [0u8; 2];
        let e = img.read(4095, &mut buf).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfBounds);
        let e = img.read(u64::MAX, &mut buf).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfBounds);
        let view = Image::from_driver(sparse(4096, 1, &[]).await, Some(img))
            .backing()
            .unwrap();
        assert_eq!(view.chain_len(), 1);
    }
}
