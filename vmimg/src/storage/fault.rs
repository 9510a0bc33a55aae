//! Fault-injecting storage for tests: simulated crashes that keep a random subset of the
//! writes made since the last sync (with torn sectors), and chosen I/O failures.
//!
//! ```text
//!   durable: MemoryStorage   <- state as of the last successful sync
//!   pending: [write, write, zero, resize, ...]   <- since then, in order
//!   view   = durable + all pending           (what reads see while running)
//!   crash  = durable + random subset of pending, each write possibly torn at 512 bytes
//! ```

use super::{BoxFuture, HostExtent, MemoryStorage, PreallocMode, Storage, StorageExt};
use crate::{Error, Result};
use std::io::{IoSlice, IoSliceMut};
use std::sync::Mutex;

/// An operation not yet made durable.
#[derive(Clone, Debug)]
enum Pending {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    Resize(u64),
}

/// Which operation fails, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// Fail with EIO.
    Eio,
    /// Fail with ENOSPC.
    NoSpace,
}

/// A rule: fail the `nth` (counting from 1) operation of a kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    /// Reads.
    Read,
    /// Writes (including write-zeroes).
    Write,
    /// Syncs and flushes.
    Sync,
}

#[derive(Debug, Default)]
struct State {
    pending: Vec<Pending>,
    counts: [u64; 3],
    faults: Vec<(FaultOp, u64, FaultKind)>,
}

/// In-memory storage that can simulate crashes and fail chosen operations.
#[derive(Debug)]
pub struct FaultStorage {
    durable: MemoryStorage,
    view: MemoryStorage,
    state: Mutex<State>,
}

impl Default for FaultStorage {
    fn default() -> Self {
        Self::new()
    }
}

impl FaultStorage {
    /// Empty storage.
    pub fn new() -> Self {
        FaultStorage {
            durable: MemoryStorage::new(),
            view: MemoryStorage::new(),
            state: Mutex::new(State::default()),
        }
    }

    /// Storage holding `bytes`, all durable.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        FaultStorage {
            durable: MemoryStorage::from_bytes(bytes),
            view: MemoryStorage::from_bytes(bytes),
            state: Mutex::new(State::default()),
        }
    }

    /// Fails the `nth` (from now, counting from 1) operation of kind `op` with `kind`.
    pub fn fail_nth(&self, op: FaultOp, nth: u64, kind: FaultKind) {
        let mut st = self.state.lock().unwrap();
        let base = st.counts[op as usize];
        st.faults.push((op, base + nth, kind));
    }

    /// Number of operations not yet made durable.
    pub fn pending(&self) -> usize {
        self.state.lock().unwrap().pending.len()
    }

    /// The bytes as they would be after a crash now: the durable state plus each pending
    /// operation kept with probability 1/2 (in order), writes possibly torn at a 512-byte
    /// boundary. `seed` makes it repeatable. The storage itself is unchanged.
    pub fn crash_image(&self, seed: u64) -> Vec<u8> {
        let mut rng = fastrand_like(seed);
        let st = self.state.lock().unwrap();
        let mut img = self.durable.to_vec();
        for op in &st.pending {
            if rng() % 2 == 0 {
                continue;
            }
            match op {
                Pending::Write(off, data) => {
                    // Torn: only a prefix of whole sectors may have made it.
                    let keep = if data.len() > 512 && rng() % 4 == 0 {
                        (rng() as usize % (data.len() / 512)) * 512
                    } else {
                        data.len()
                    };
                    let end = *off as usize + keep;
                    if img.len() < end {
                        img.resize(end, 0);
                    }
                    img[*off as usize..end].copy_from_slice(&data[..keep]);
                }
                Pending::Zero(off, len) => {
                    let end = (*off + *len) as usize;
                    if img.len() < end {
                        img.resize(end, 0);
                    }
                    img[*off as usize..end].fill(0);
                }
                Pending::Resize(size) => img.resize(*size as usize, 0),
            }
        }
        img
    }

    fn fault(&self, op: FaultOp) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        st.counts[op as usize] += 1;
        let n = st.counts[op as usize];
        if let Some(i) = st.faults.iter().position(|&(o, at, _)| o == op && at == n) {
            let (_, _, kind) = st.faults.remove(i);
            let errno = match kind {
                FaultKind::Eio => libc::EIO,
                FaultKind::NoSpace => libc::ENOSPC,
            };
            return Err(Error::from_io(std::io::Error::from_raw_os_error(errno)));
        }
        Ok(())
    }
}

/// A small deterministic generator (splitmix64), so crash images do not depend on a crate.
fn fastrand_like(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl Storage for FaultStorage {
    fn size(&self) -> Result<u64> {
        self.view.size()
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
            self.fault(FaultOp::Read)?;
            self.view.readv(offset, bufs).await
        })
    }

    fn writev<'a>(&'a self, offset: u64, bufs: &'a [IoSlice<'_>]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.fault(FaultOp::Write)?;
            let data: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            self.view.write_at(offset, &data).await?;
            self.state
                .lock()
                .unwrap()
                .pending
                .push(Pending::Write(offset, data));
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.fault(FaultOp::Write)?;
            self.view.write_zeroes(offset, len, may_unmap).await?;
            self.state
                .lock()
                .unwrap()
                .pending
                .push(Pending::Zero(offset, len));
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        // Discard is advisory: treat it as zeroing (what files do), within the size.
        Box::pin(async move {
            let end = (offset + len).min(self.view.size()?);
            if offset < end {
                self.write_zeroes(offset, end - offset, true).await?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.fault(FaultOp::Sync) })
    }

    fn sync(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.fault(FaultOp::Sync)?;
            let pending = std::mem::take(&mut self.state.lock().unwrap().pending);
            for op in pending {
                match op {
                    Pending::Write(off, data) => self.durable.write_at(off, &data).await?,
                    Pending::Zero(off, len) => self.durable.write_zeroes(off, len, true).await?,
                    Pending::Resize(size) => self.durable.resize(size, PreallocMode::Off).await?,
                }
            }
            Ok(())
        })
    }

    fn resize(&self, new_size: u64, prealloc: PreallocMode) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.fault(FaultOp::Write)?;
            self.view.resize(new_size, prealloc).await?;
            self.state
                .lock()
                .unwrap()
                .pending
                .push(Pending::Resize(new_size));
            Ok(())
        })
    }

    fn extent(&self, offset: u64, max_len: u64) -> BoxFuture<'_, Result<(HostExtent, u64)>> {
        self.view.extent(offset, max_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn synced_writes_survive_every_crash_and_unsynced_ones_may_not() {
        let s = FaultStorage::new();
        s.write_at(0, &[1u8; 4096]).await.unwrap();
        s.sync().await.unwrap();
        s.write_at(4096, &[2u8; 4096]).await.unwrap();
        assert_eq!(s.pending(), 1);
        let mut kept = 0;
        for seed in 0..64 {
            let img = s.crash_image(seed);
            assert!(img[..4096].iter().all(|&b| b == 1));
            if img.len() > 4096 && img[4096] == 2 {
                kept += 1;
            }
        }
        assert!(kept > 0 && kept < 64, "kept {kept} of 64");
    }

    #[tokio::test]
    async fn the_nth_operation_fails_with_the_chosen_errno() {
        let s = FaultStorage::new();
        s.fail_nth(FaultOp::Write, 2, FaultKind::NoSpace);
        s.write_at(0, b"a").await.unwrap();
        let e = s.write_at(1, b"b").await.unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::NoSpace);
        s.write_at(2, b"c").await.unwrap();
        s.fail_nth(FaultOp::Sync, 1, FaultKind::Eio);
        assert_eq!(s.sync().await.unwrap_err().errno(), libc::EIO);
        s.sync().await.unwrap();
        assert_eq!(s.crash_image(1), b"a\0c");
    }
}
