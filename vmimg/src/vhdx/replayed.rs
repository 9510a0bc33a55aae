//! A read-only view of a VHDX file as it would be after replaying its log, without
//! writing anything: opening an image that needs a replay read-only still works (QEMU
//! refuses it until `qemu-img check -r all` replays it).

use super::log::{LogEntry, LogWrite};
use crate::storage::{BoxFuture, HostExtent, PreallocMode, Storage};
use crate::{Error, ErrorKind, Result};
use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::path::Path;
use std::sync::Arc;

/// What the log changes, as the file reads after the replay.
#[derive(Debug)]
pub struct Replayed {
    inner: Arc<dyn Storage>,
    /// 4 KiB pages by offset: `Some` bytes, or `None` for zeros.
    pages: BTreeMap<u64, Option<Arc<Vec<u8>>>>,
    size: u64,
}

impl Replayed {
    /// The file `inner` with `entries` applied in order.
    pub fn new(inner: Arc<dyn Storage>, entries: &[LogEntry]) -> Result<Self> {
        let mut pages = BTreeMap::new();
        let mut size = inner.size()?;
        for e in entries {
            for w in &e.writes {
                match w {
                    LogWrite::Data { offset, bytes } => {
                        pages.insert(*offset, Some(Arc::new(bytes.clone())));
                    }
                    LogWrite::Zero { offset, len } => {
                        // Bounded: a zero range is at most the entry's claim over the file.
                        let end = offset.saturating_add(*len).min(offset + (1 << 30));
                        for p in (*offset..end).step_by(4096) {
                            pages.insert(p, None);
                        }
                    }
                }
            }
            size = size.max(e.last);
        }
        Ok(Replayed { inner, pages, size })
    }
}

fn read_only() -> Error {
    Error::new(
        ErrorKind::ReadOnly,
        "the replayed view of a VHDX log is read-only",
    )
}

impl Storage for Replayed {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }

    fn mem_align(&self) -> usize {
        self.inner.mem_align()
    }

    fn request_align(&self) -> usize {
        self.inner.request_align()
    }

    fn is_writable(&self) -> bool {
        false
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
            self.inner.readv(offset, bufs).await?;
            let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
            let end = offset + len;
            let first = offset / 4096 * 4096;
            for (&page, bytes) in self.pages.range(first..end) {
                // Copy the page's overlap with the request into the buffers.
                let lo = page.max(offset);
                let hi = (page + 4096).min(end);
                let mut pos = offset;
                for b in bufs.iter_mut() {
                    let (bs, be) = (pos, pos + b.len() as u64);
                    let (s, e) = (lo.max(bs), hi.min(be));
                    if s < e {
                        let dst = &mut b[(s - bs) as usize..(e - bs) as usize];
                        match bytes {
                            Some(p) => {
                                dst.copy_from_slice(&p[(s - page) as usize..(e - page) as usize])
                            }
                            None => dst.fill(0),
                        }
                    }
                    pos = be;
                }
            }
            Ok(())
        })
    }

    fn writev<'a>(&'a self, _offset: u64, _bufs: &'a [IoSlice<'_>]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Err(read_only()) })
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Err(read_only()) })
    }

    fn discard(&self, _offset: u64, _len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Err(read_only()) })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn sync(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn resize(&self, _new_size: u64, _prealloc: PreallocMode) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Err(read_only()) })
    }

    fn extent(&self, _offset: u64, max_len: u64) -> BoxFuture<'_, Result<(HostExtent, u64)>> {
        Box::pin(async move { Ok((HostExtent::Data, max_len)) })
    }

    fn allocated_size(&self) -> Option<u64> {
        self.inner.allocated_size()
    }
}
