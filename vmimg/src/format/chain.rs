//! The chain reader: guest reads through a stack of format layers, top first, with
//! unallocated ranges falling through to the layer below (and zeros past the last).
//!
//! ```text
//!   read(offset, bufs) --> layer 0 map: Data | Zero | Compressed | Unallocated --+
//!                            |                                                   |
//!                            '-- pieces read from storage, concurrently     layer 1 ...
//! ```
//!
//! Drivers use it through [`ChainView`] (copy-on-write from the layers below them); the
//! access handle uses it for every read.

use super::{FormatDriver, MapKind, MapQuery};
use crate::storage::{BoxFuture, Storage, StorageExt};
use crate::{Error, ErrorKind, Result};
use futures_util::future::try_join_all;
use std::io::IoSliceMut;
use std::sync::Arc;

/// A read-only view of the layers below one layer of a chain (for copy-on-write).
#[derive(Clone, Copy, Debug)]
pub struct ChainView<'a> {
    layers: &'a [Arc<dyn FormatDriver>],
}

impl<'a> ChainView<'a> {
    /// An empty chain: reads return zeros.
    pub fn empty() -> Self {
        ChainView { layers: &[] }
    }

    /// A view of `layers` (top first).
    pub fn new(layers: &'a [Arc<dyn FormatDriver>]) -> Self {
        ChainView { layers }
    }

    /// Whether there is no layer.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Virtual size of the first layer (0 for an empty chain).
    pub fn size(&self) -> u64 {
        self.layers.first().map_or(0, |l| l.size())
    }

    /// Reads guest data through these layers; past the end of the chain (or of a shorter
    /// layer) reads return zeros.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        read_chain(self.layers, offset, vec![buf]).await
    }

    /// Whether `[offset, offset + len)` is known to read as zeros from allocation status
    /// alone (zero clusters, holes, or nothing allocated in any layer), without reading data.
    pub async fn known_zero(&self, offset: u64, len: u64) -> Result<bool> {
        let end = offset + len;
        let mut pos = offset;
        'runs: while pos < end {
            let mut n = end - pos;
            for layer in self.layers {
                if pos >= layer.size() {
                    // Past the end of a shorter layer: zeros.
                    break;
                }
                n = n.min(layer.size() - pos);
                if layer.status_unknown() {
                    return Ok(false);
                }
                let m = layer.map(pos, n, MapQuery::Status).await?;
                if m.len == 0 || m.len > n {
                    return Err(bad_mapping(layer.as_ref(), pos, m.len));
                }
                n = m.len;
                match m.kind {
                    MapKind::Zero { .. } | MapKind::DataZero { .. } => {
                        pos += n;
                        continue 'runs;
                    }
                    MapKind::Unallocated => {}
                    _ => return Ok(false),
                }
            }
            pos += n;
        }
        Ok(true)
    }
}

/// A slice type that can be cut in two (shared and exclusive byte slices).
pub(crate) trait Cut: Sized {
    fn size(&self) -> usize;
    fn cut(self, at: usize) -> (Self, Self);
}

impl Cut for &[u8] {
    fn size(&self) -> usize {
        self.len()
    }
    fn cut(self, at: usize) -> (Self, Self) {
        self.split_at(at)
    }
}

impl Cut for &mut [u8] {
    fn size(&self) -> usize {
        self.len()
    }
    fn cut(self, at: usize) -> (Self, Self) {
        self.split_at_mut(at)
    }
}

pub(crate) fn total<T: Cut>(bufs: &[T]) -> usize {
    bufs.iter().map(Cut::size).sum()
}

/// Removes the first `n` bytes' worth of slices from `bufs` and returns them.
pub(crate) fn take_front<T: Cut>(bufs: &mut Vec<T>, mut n: usize) -> Vec<T> {
    let mut out = Vec::new();
    let mut rest = std::mem::take(bufs).into_iter();
    while n > 0 {
        let Some(b) = rest.next() else { break };
        if b.size() <= n {
            n -= b.size();
            out.push(b);
        } else {
            let (head, tail) = b.cut(n);
            out.push(head);
            bufs.push(tail);
            n = 0;
        }
    }
    bufs.extend(rest);
    out
}

fn zero_fill(bufs: Vec<&mut [u8]>) {
    bufs.into_iter().for_each(|b| b.fill(0));
}

pub(crate) fn bad_mapping(layer: &dyn FormatDriver, offset: u64, len: u64) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!(
            "{} driver returned a mapping of {len:#x} bytes, outside the range asked",
            layer.format()
        ),
    )
    .with_offset(offset)
}

/// Reads `bufs` from `storage` at `host`, bouncing through an aligned buffer when the
/// storage needs alignment the request does not have.
async fn read_storage(storage: &dyn Storage, host: u64, mut bufs: Vec<&mut [u8]>) -> Result<()> {
    storage.debug_event("read_aio");
    let len = total(&bufs) as u64;
    let end = host.checked_add(len).ok_or_else(|| {
        Error::new(ErrorKind::Corrupt, "host offset overflows 64 bits").with_offset(host)
    })?;
    let align = storage.request_align() as u64;
    if align <= 1 || (host % align == 0 && len % align == 0) {
        let mut iov: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        return storage.readv(host, &mut iov).await;
    }
    let start = host / align * align;
    let aligned_end = end.div_ceil(align) * align;
    let mut tmp = vec![0u8; (aligned_end - start) as usize];
    storage.read_at(start, &mut tmp).await?;
    let mut src = &tmp[(host - start) as usize..];
    for b in bufs {
        let (head, rest) = src.split_at(b.len());
        b.copy_from_slice(head);
        src = rest;
    }
    Ok(())
}

/// Reads guest data at `offset` through `layers` (top first) into `bufs`.
///
/// Ranges unallocated in every layer, or past the end of a shorter lower layer, read as
/// zeros. Works on a work list rather than recursion, so chain depth costs no stack.
pub(crate) async fn read_chain(
    layers: &[Arc<dyn FormatDriver>],
    offset: u64,
    bufs: Vec<&mut [u8]>,
) -> Result<()> {
    let mut work = vec![(0usize, offset, bufs)];
    let mut ios: Vec<BoxFuture<'_, Result<()>>> = Vec::new();
    while let Some((depth, start, mut bufs)) = work.pop() {
        let Some(layer) = layers.get(depth) else {
            zero_fill(bufs);
            continue;
        };
        let layer: &dyn FormatDriver = layer.as_ref();
        let end = start + total(&bufs) as u64;
        let avail = end.min(layer.size()).max(start);
        let mut pos = start;
        while pos < avail {
            let m = layer.map(pos, avail - pos, MapQuery::Read).await?;
            if m.len == 0 || m.len > avail - pos {
                return Err(bad_mapping(layer, pos, m.len));
            }
            let piece = take_front(&mut bufs, m.len as usize);
            match m.kind {
                MapKind::Data { storage, offset } => {
                    ios.push(Box::pin(read_storage(storage, offset, piece)));
                }
                MapKind::Zero { .. } | MapKind::DataZero { .. } => zero_fill(piece),
                MapKind::Unallocated => work.push((depth + 1, pos, piece)),
                MapKind::Compressed(desc) => {
                    ios.push(Box::pin(read_compressed(layer, desc, pos, piece)));
                }
            }
            pos += m.len;
        }
        zero_fill(bufs);
    }
    try_join_all(ios).await?;
    Ok(())
}

async fn read_compressed(
    layer: &dyn FormatDriver,
    desc: u64,
    guest_offset: u64,
    mut bufs: Vec<&mut [u8]>,
) -> Result<()> {
    if bufs.len() == 1 {
        return layer.read_compressed(desc, guest_offset, bufs[0]).await;
    }
    let mut tmp = vec![0u8; total(&bufs)];
    layer.read_compressed(desc, guest_offset, &mut tmp).await?;
    let mut src = &tmp[..];
    for b in bufs.iter_mut() {
        let (head, rest) = src.split_at(b.len());
        b.copy_from_slice(head);
        src = rest;
    }
    Ok(())
}
