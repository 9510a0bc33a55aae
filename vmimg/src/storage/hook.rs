//! [`HookStorage`]: a storage that passes every request on to an inner one, after letting a
//! [`StorageHook`] see it and, if it wants, hold it.
//!
//! ```text
//!   caller --readv/writev/...--> HookStorage --> hook.before(inner, op)  (sync part now,
//!                                     |                                  future awaited)
//!                                     +--------> inner.readv/writev/...
//!                                     +--------> hook.after(inner, op, outcome)
//! ```

use super::{iov_len, BoxFuture, HostExtent, Permissions, PreallocMode, ResolvedName, Storage};
use crate::{Error, Result};
use std::fmt;
use std::io::{IoSlice, IoSliceMut};
use std::path::Path;

/// A request to a storage, as a [`StorageHook`] sees it: which method, and its arguments
/// (data buffers are described by their total length only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageOp {
    /// [`Storage::readv`] of `len` bytes in all at `offset`.
    Read {
        /// Where the read starts.
        offset: u64,
        /// Total length of the buffers.
        len: u64,
    },
    /// [`Storage::writev`] of `len` bytes in all at `offset`.
    Write {
        /// Where the write starts.
        offset: u64,
        /// Total length of the buffers.
        len: u64,
    },
    /// [`Storage::write_zeroes`].
    WriteZeroes {
        /// Where the range starts.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Whether the space may be released.
        may_unmap: bool,
    },
    /// [`Storage::discard`].
    Discard {
        /// Where the range starts.
        offset: u64,
        /// Length of the range.
        len: u64,
    },
    /// [`Storage::flush`].
    Flush,
    /// [`Storage::sync`].
    Sync,
    /// [`Storage::resize`].
    Resize {
        /// The size asked for.
        new_size: u64,
        /// How new space is made.
        prealloc: PreallocMode,
    },
    /// [`Storage::allocate`].
    Allocate {
        /// Where the range starts.
        offset: u64,
        /// Length of the range.
        len: u64,
    },
    /// [`Storage::extent`].
    Extent {
        /// Where the extent asked about starts.
        offset: u64,
        /// The longest answer wanted.
        max_len: u64,
    },
}

/// What a [`HookStorage`] calls around each request it passes on to its inner storage `S`.
///
/// For tests that pause, observe or interleave requests (hold a write at a gate, take crash
/// images at syncs, yield to the scheduler between requests), and for tracing or throttling.
/// Both methods do nothing by default, so a hook overrides only what it needs; `()` is the
/// hook that does nothing at all.
///
/// Only the asynchronous requests (the ones [`StorageOp`] lists) reach the hook; `size`,
/// `path` and the other synchronous queries go straight to the inner storage.
pub trait StorageHook<S: Storage>: Send + Sync + fmt::Debug + 'static {
    /// Called when `op` is issued, before it reaches `inner`; the request awaits the returned
    /// future, then goes on.
    ///
    /// The method itself runs when the request method is called (when the caller creates the
    /// request's future), so what it does at once happens in the order the requests were
    /// issued: a copy of the inner storage taken here at a [`StorageOp::Sync`] holds every
    /// write issued so far. Work in the returned future happens when the request first runs
    /// (waiting at a gate, yielding, sleeping to throttle).
    fn before<'a>(&'a self, inner: &'a S, op: StorageOp) -> BoxFuture<'a, ()> {
        let _ = (inner, op);
        Box::pin(std::future::ready(()))
    }

    /// Called once `op` has completed on `inner`, with how it went; the request awaits the
    /// returned future before it returns its result (which the hook cannot change).
    fn after<'a>(
        &'a self,
        inner: &'a S,
        op: StorageOp,
        outcome: Result<(), &Error>,
    ) -> BoxFuture<'a, ()> {
        let _ = (inner, op, outcome);
        Box::pin(std::future::ready(()))
    }
}

/// The hook that does nothing: `HookStorage<S, ()>` behaves exactly like `S`.
impl<S: Storage> StorageHook<S> for () {}

/// A storage that passes every request on to an inner storage, calling a [`StorageHook`]
/// before (and after) each one.
///
/// Made for tests that need to pause, observe or interleave the requests a format driver
/// makes (hold a write at a gate, take crash images at each sync, yield to the scheduler
/// around requests) and for tracing or throttling, without writing a whole [`Storage`]
/// implementation that forwards every method. Everything the hook does not do is the inner
/// storage's behaviour: sizes, alignments, writability, the file path, extents, allocated
/// size and name resolution are the inner storage's answers.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> vmimg::Result<()> {
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use vmimg::storage::{BoxFuture, HookStorage, StorageHook, StorageOp};
/// use vmimg::{MemoryStorage, Storage, StorageExt};
///
/// /// Counts the syncs asked for.
/// #[derive(Debug, Default)]
/// struct CountSyncs(AtomicU64);
///
/// impl StorageHook<MemoryStorage> for CountSyncs {
///     fn before<'a>(&'a self, _: &'a MemoryStorage, op: StorageOp) -> BoxFuture<'a, ()> {
///         if op == StorageOp::Sync {
///             self.0.fetch_add(1, Ordering::Relaxed);
///         }
///         Box::pin(async {})
///     }
/// }
///
/// let s = HookStorage::new(MemoryStorage::new(), CountSyncs::default());
/// s.write_at(0, b"data").await?;
/// s.sync().await?;
/// assert_eq!(s.hook().0.load(Ordering::Relaxed), 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct HookStorage<S, H> {
    inner: S,
    hook: H,
}

impl<S, H> HookStorage<S, H> {
    /// Passes the requests made to the new storage on to `inner`, through `hook`.
    pub fn new(inner: S, hook: H) -> Self {
        HookStorage { inner, hook }
    }

    /// The inner storage (to look at it or use it without the hook).
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The hook (to arm it, or to collect what it observed).
    pub fn hook(&self) -> &H {
        &self.hook
    }

    /// The inner storage and the hook.
    pub fn into_parts(self) -> (S, H) {
        (self.inner, self.hook)
    }
}

impl<S: Storage, H: StorageHook<S>> HookStorage<S, H> {
    /// Runs `request` on the inner storage between the hook's `before` (whose synchronous
    /// part runs now, at issue) and `after`.
    fn hooked<'a, T: Send + 'a>(
        &'a self,
        op: StorageOp,
        request: impl FnOnce(&'a S) -> BoxFuture<'a, Result<T>> + Send + 'a,
    ) -> BoxFuture<'a, Result<T>> {
        let before = self.hook.before(&self.inner, op);
        Box::pin(async move {
            before.await;
            let result = request(&self.inner).await;
            self.hook
                .after(&self.inner, op, result.as_ref().map(|_| ()))
                .await;
            result
        })
    }
}

impl<S: Storage, H: StorageHook<S>> Storage for HookStorage<S, H> {
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
        let len = iov_len(bufs) as u64;
        self.hooked(StorageOp::Read { offset, len }, move |s| {
            s.readv(offset, bufs)
        })
    }

    fn writev<'a>(&'a self, offset: u64, bufs: &'a [IoSlice<'_>]) -> BoxFuture<'a, Result<()>> {
        let len = iov_len(bufs) as u64;
        self.hooked(StorageOp::Write { offset, len }, move |s| {
            s.writev(offset, bufs)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> BoxFuture<'_, Result<()>> {
        let op = StorageOp::WriteZeroes {
            offset,
            len,
            may_unmap,
        };
        self.hooked(op, move |s| s.write_zeroes(offset, len, may_unmap))
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        self.hooked(StorageOp::Discard { offset, len }, move |s| {
            s.discard(offset, len)
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        self.hooked(StorageOp::Flush, |s| s.flush())
    }

    fn sync(&self) -> BoxFuture<'_, Result<()>> {
        self.hooked(StorageOp::Sync, |s| s.sync())
    }

    fn resize(&self, new_size: u64, prealloc: PreallocMode) -> BoxFuture<'_, Result<()>> {
        self.hooked(StorageOp::Resize { new_size, prealloc }, move |s| {
            s.resize(new_size, prealloc)
        })
    }

    fn allocate(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        self.hooked(StorageOp::Allocate { offset, len }, move |s| {
            s.allocate(offset, len)
        })
    }

    fn extent(&self, offset: u64, max_len: u64) -> BoxFuture<'_, Result<(HostExtent, u64)>> {
        self.hooked(StorageOp::Extent { offset, max_len }, move |s| {
            s.extent(offset, max_len)
        })
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
    use crate::storage::{MemoryStorage, StorageExt};
    use std::sync::{Arc, Mutex};

    /// Logs every call it gets; holds writes at offset 4096 until the gate opens.
    #[derive(Debug)]
    struct Recorder {
        log: Mutex<Vec<String>>,
        gate: tokio::sync::Semaphore,
    }

    impl Recorder {
        fn new() -> Self {
            Recorder {
                log: Mutex::new(Vec::new()),
                gate: tokio::sync::Semaphore::new(0),
            }
        }

        fn log(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }
    }

    impl StorageHook<MemoryStorage> for Recorder {
        fn before<'a>(&'a self, _: &'a MemoryStorage, op: StorageOp) -> BoxFuture<'a, ()> {
            self.log.lock().unwrap().push(format!("before {op:?}"));
            Box::pin(async move {
                if let StorageOp::Write { offset: 4096, .. } = op {
                    self.gate.acquire().await.unwrap().forget();
                }
            })
        }

        fn after<'a>(
            &'a self,
            inner: &'a MemoryStorage,
            op: StorageOp,
            outcome: Result<(), &Error>,
        ) -> BoxFuture<'a, ()> {
            let size = inner.size().unwrap();
            let ok = outcome.is_ok();
            self.log
                .lock()
                .unwrap()
                .push(format!("after {op:?} ok={ok} size={size}"));
            Box::pin(async {})
        }
    }

    /// The hook sees each request, in order, before and after it runs on the inner storage,
    /// and a request waits for the future its `before` returned.
    #[tokio::test]
    async fn the_hook_sees_requests_in_order_and_can_hold_one() {
        let s = Arc::new(HookStorage::new(MemoryStorage::new(), Recorder::new()));
        s.write_at(0, b"abc").await.unwrap();
        let (mut a, mut bc) = ([0u8; 1], [0u8; 2]);
        s.readv(0, &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut bc)])
            .await
            .unwrap();
        assert_eq!((&a, &bc), (b"a", b"bc"));
        s.write_zeroes(1, 2, true).await.unwrap();
        s.discard(0, 1).await.unwrap();
        s.flush().await.unwrap();
        s.sync().await.unwrap();
        s.resize(100, PreallocMode::Off).await.unwrap();
        assert_eq!(s.extent(0, 100).await.unwrap(), (HostExtent::Data, 100));
        assert_eq!(
            s.hook().log(),
            [
                "before Write { offset: 0, len: 3 }",
                "after Write { offset: 0, len: 3 } ok=true size=3",
                "before Read { offset: 0, len: 3 }",
                "after Read { offset: 0, len: 3 } ok=true size=3",
                "before WriteZeroes { offset: 1, len: 2, may_unmap: true }",
                "after WriteZeroes { offset: 1, len: 2, may_unmap: true } ok=true size=3",
                "before Discard { offset: 0, len: 1 }",
                "after Discard { offset: 0, len: 1 } ok=true size=3",
                "before Flush",
                "after Flush ok=true size=3",
                "before Sync",
                "after Sync ok=true size=3",
                "before Resize { new_size: 100, prealloc: Off }",
                "after Resize { new_size: 100, prealloc: Off } ok=true size=100",
                "before Extent { offset: 0, max_len: 100 }",
                "after Extent { offset: 0, max_len: 100 } ok=true size=100",
            ]
            .map(String::from)
        );
        s.hook().log.lock().unwrap().clear();

        // A write at 4096 waits at the gate: `before` has run, the inner storage has not seen
        // the write, and other requests go past it.
        let held = tokio::spawn({
            let s = Arc::clone(&s);
            async move { s.write_at(4096, b"late").await }
        });
        while s.hook().log().is_empty() {
            tokio::task::yield_now().await;
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!held.is_finished());
        assert_eq!(s.inner().size().unwrap(), 100);
        s.write_at(8, b"x").await.unwrap();
        s.hook().gate.add_permits(1);
        held.await.unwrap().unwrap();
        assert_eq!(
            s.hook().log(),
            [
                "before Write { offset: 4096, len: 4 }",
                "before Write { offset: 8, len: 1 }",
                "after Write { offset: 8, len: 1 } ok=true size=100",
                "after Write { offset: 4096, len: 4 } ok=true size=4100",
            ]
            .map(String::from)
        );
        let mut back = [0u8; 4];
        s.inner().read_at(4096, &mut back).await.unwrap();
        assert_eq!(&back, b"late");

        // A failed request reaches `after` with its error, and the caller gets the error.
        let ro = HookStorage::new(MemoryStorage::new().into_read_only(), Recorder::new());
        let err = ro.write_at(0, b"no").await.unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::ReadOnly);
        assert_eq!(
            ro.hook().log(),
            [
                "before Write { offset: 0, len: 2 }",
                "after Write { offset: 0, len: 2 } ok=false size=0",
            ]
            .map(String::from)
        );
    }

    /// Synchronous queries are the inner storage's answers.
    #[test]
    fn queries_are_the_inner_storages() {
        let s = HookStorage::new(MemoryStorage::from_bytes(&[1; 70_000]).into_read_only(), ());
        assert_eq!(s.size().unwrap(), 70_000);
        assert!(!s.is_writable());
        assert_eq!(s.allocated_size(), s.inner().allocated_size());
        assert_eq!((s.mem_align(), s.request_align(), s.path()), (1, 1, None));
        assert!(s.resolve_name("rel").is_err());
        let (inner, ()) = s.into_parts();
        assert_eq!(inner.size().unwrap(), 70_000);
    }
}
