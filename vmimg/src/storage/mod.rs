//! Storage layer: host bytes on a medium, addressed by host offset.
//!
//! ```text
//!   format drivers (raw, qcow2, ...)
//!          |  host offsets
//!   dyn Storage ----+---- FileStorage   (Linux file; buffered or O_DIRECT)
//!                   +---- MemoryStorage (sparse, in memory; tests and scratch)
//!                   +---- NullStorage   (reads zero, writes vanish)
//!                   +---- FaultStorage  (tests: simulated crashes, injected errors)
//!                   +---- HookStorage   (any storage, with a hook around each request)
//! ```
//!
//! Contracts every implementation keeps (the conformance suite in `tests/` checks them):
//! - no short reads or writes: a read fills every byte asked for, a write stores every byte;
//! - reads past the end of the storage return zeros; writes past it grow it;
//! - offsets and lengths are multiples of [`Storage::request_align`], and buffers start at
//!   multiples of [`Storage::mem_align`] *when the caller wants zero-copy*; implementations
//!   that need alignment bounce unaligned memory themselves, but reject unaligned requests
//!   with [`crate::ErrorKind::InvalidArgument`];
//! - [`Storage::flush`] pushes caches held by this process down to the operating system;
//!   [`Storage::sync`] makes everything written so far durable.

mod aligned;
mod debug;
mod fault;
mod file;
mod hook;
mod lock;
mod memory;
mod null;
mod sys;

pub use aligned::AlignedStorage;
pub use debug::{DebugConfig, DebugStorage};
pub use fault::{FaultKind, FaultOp, FaultStorage};
pub use file::{set_created_file_options, CreatedFileOptions, FileStorage, FileStorageOpen};
pub use hook::{HookStorage, StorageHook, StorageOp};
pub use lock::{LockMode, Permissions};
pub use memory::MemoryStorage;
pub use null::NullStorage;

use crate::{Error, ErrorKind, Result};
use std::fmt;
use std::future::Future;
use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::pin::Pin;

/// A boxed, `Send` future: what the object-safe traits of this crate return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How to make room when a storage or image grows (qemu-img's `preallocation=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PreallocMode {
    /// Grow the size only; new space is a hole.
    #[default]
    Off,
    /// Formats allocate their metadata up front; storage treats it as `Off`.
    Metadata,
    /// Reserve the space with `fallocate()` so later writes cannot fail with ENOSPC.
    Falloc,
    /// Write zeros over the new space.
    Full,
}

impl PreallocMode {
    /// Parses qemu-img's names: `off`, `metadata`, `falloc`, `full`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "off" => PreallocMode::Off,
            "metadata" => PreallocMode::Metadata,
            "falloc" => PreallocMode::Falloc,
            "full" => PreallocMode::Full,
            _ => return None,
        })
    }

    /// qemu-img's name for the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            PreallocMode::Off => "off",
            PreallocMode::Metadata => "metadata",
            PreallocMode::Falloc => "falloc",
            PreallocMode::Full => "full",
        }
    }
}

/// What a storage holds at a host range (the answer of `SEEK_DATA`/`SEEK_HOLE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostExtent {
    /// The range holds data (which may still be zeros).
    Data,
    /// The range is a hole: it reads as zeros and occupies no space.
    Hole,
}

/// A file name found inside an image, resolved against the image's own location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedName {
    /// The name as the image states it.
    pub name: String,
    /// The path it refers to: `name` itself when absolute, otherwise relative to the
    /// directory that holds the image.
    pub path: PathBuf,
}

/// Host bytes on a medium. Object-safe: `Arc<dyn Storage>` lets one backing chain mix kinds.
///
/// All futures are `Send`, so a storage can be used from a multi-threaded tokio runtime.
/// File-backed implementations never block the async executor's worker threads.
pub trait Storage: Send + Sync + fmt::Debug + 'static {
    /// Current size in bytes.
    fn size(&self) -> Result<u64>;

    /// Required alignment of buffer addresses for zero-copy I/O (1: none).
    fn mem_align(&self) -> usize;

    /// Required alignment of request offsets and lengths (1: none).
    fn request_align(&self) -> usize;

    /// Whether writes are allowed.
    fn is_writable(&self) -> bool;

    /// The file behind this storage, if it is one (used in messages and to resolve names).
    fn path(&self) -> Option<&Path> {
        None
    }

    /// Reads exactly the total length of `bufs` starting at `offset`; bytes past the end read
    /// as zeros.
    fn readv<'a>(
        &'a self,
        offset: u64,
        bufs: &'a mut [IoSliceMut<'_>],
    ) -> BoxFuture<'a, Result<()>>;

    /// Writes all of `bufs` starting at `offset`, growing the storage if needed.
    fn writev<'a>(&'a self, offset: u64, bufs: &'a [IoSlice<'_>]) -> BoxFuture<'a, Result<()>>;

    /// Makes `len` bytes at `offset` read as zeros. With `may_unmap` the space may be released
    /// (a hole); without it, it stays allocated where the medium can promise that.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> BoxFuture<'_, Result<()>>;

    /// Tells the medium the range is no longer needed. Afterwards the range reads as zeros on
    /// storages that support it and is unchanged on others (discard is advisory).
    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>>;

    /// Pushes data cached by this process down to the operating system.
    fn flush(&self) -> BoxFuture<'_, Result<()>>;

    /// Makes everything written so far durable (fdatasync on files).
    fn sync(&self) -> BoxFuture<'_, Result<()>>;

    /// Changes the size to `new_size`; growing uses `prealloc` for the new space.
    fn resize(&self, new_size: u64, prealloc: PreallocMode) -> BoxFuture<'_, Result<()>>;

    /// Describes the extent starting at `offset`: whether it holds data or is a hole, and how
    /// long (at least 1 byte, at most `max_len`) that extent is. `offset` must be below size.
    fn extent(&self, offset: u64, max_len: u64) -> BoxFuture<'_, Result<(HostExtent, u64)>>;

    /// Reserves space for `len` bytes at `offset` without changing a byte: holes in the
    /// range become allocated zeros, data stays, the size does not change (`fallocate` with
    /// `FALLOC_FL_KEEP_SIZE` on files). Best effort: storages that cannot do it succeed
    /// doing nothing (the default).
    fn allocate(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        let _ = (offset, len);
        Box::pin(std::future::ready(Ok(())))
    }

    /// Bytes of the medium actually occupied (`st_blocks * 512` for files), if known.
    fn allocated_size(&self) -> Option<u64> {
        None
    }

    /// States what this user does with the storage (`perm`) and what it lets other users do
    /// meanwhile (`shared`), replacing what was stated before. Files turn both into QEMU's
    /// image locks (see [`Permissions`]), so that QEMU's tools and vmimg exclude each other;
    /// a conflict fails with [`ErrorKind::Locked`] and leaves the previous state. Storages
    /// no other process can reach succeed doing nothing (the default).
    fn set_permissions(&self, perm: Permissions, shared: Permissions) -> Result<()> {
        let _ = (perm, shared);
        Ok(())
    }

    /// Whether the medium is a block device: its size is its own (resizing fails unless the
    /// size stays), and creating an image on it writes over it rather than truncating it.
    fn is_block_device(&self) -> bool {
        false
    }

    /// The permissions last stated: `(held, shared)`.
    fn permissions(&self) -> (Permissions, Permissions) {
        (Permissions::NONE, Permissions::ALL)
    }

    /// Told by the layer above what its next request is for, by one of QEMU's blkdebug
    /// event names (`"read_aio"`: guest data is read, `"write_aio"`: written). Only
    /// [`DebugStorage`] acts on it; wrappers pass it on.
    fn debug_event(&self, event: &'static str) {
        let _ = event;
    }

    /// Resolves a file name found inside an image stored here (a backing file, a data file).
    ///
    /// Absolute names are returned unchanged; relative ones are taken relative to the
    /// directory holding this storage's file. Storages with no file fail with
    /// [`ErrorKind::Unsupported`] for relative names.
    fn resolve_name(&self, name: &str) -> Result<ResolvedName> {
        let p = Path::new(name);
        if p.is_absolute() {
            return Ok(ResolvedName {
                name: name.to_owned(),
                path: p.to_path_buf(),
            });
        }
        match self.path() {
            Some(own) => {
                let dir = own.parent().unwrap_or(Path::new(""));
                Ok(ResolvedName {
                    name: name.to_owned(),
                    path: dir.join(p),
                })
            }
            None => Err(Error::new(
                ErrorKind::Unsupported,
                format!("cannot resolve relative name '{name}': this storage has no file"),
            )),
        }
    }
}

/// Conveniences over [`Storage`] for single buffers.
pub trait StorageExt: Storage {
    /// Reads `buf.len()` bytes at `offset` (see [`Storage::readv`]).
    fn read_at<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut iov = [IoSliceMut::new(buf)];
            self.readv(offset, &mut iov).await
        })
    }

    /// Writes all of `buf` at `offset` (see [`Storage::writev`]).
    fn write_at<'a>(&'a self, offset: u64, buf: &'a [u8]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let iov = [IoSlice::new(buf)];
            self.writev(offset, &iov).await
        })
    }
}

impl<S: Storage + ?Sized> StorageExt for S {}

/// A file a create operation is about to make: if the operation fails, the file is removed
/// again when it did not exist before (a failed create leaves nothing behind; a file that
/// was there is left, whatever state the failure left it in).
pub(crate) struct NewFile {
    path: PathBuf,
    existed: bool,
}

impl NewFile {
    pub(crate) fn new(path: &Path) -> Self {
        NewFile {
            path: path.to_path_buf(),
            existed: path.symlink_metadata().is_ok(),
        }
    }

    /// Removes the file if the create made it.
    pub(crate) fn remove_if_new(&self) {
        if !self.existed {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Passes `result` through, removing the file first if it failed.
    pub(crate) fn finish<T>(&self, result: Result<T>) -> Result<T> {
        if result.is_err() {
            self.remove_if_new();
        }
        result
    }
}

/// Total byte length of a set of I/O vectors.
pub(crate) fn iov_len(bufs: &[impl std::ops::Deref<Target = [u8]>]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

/// Checks a request against a storage's alignment and writability.
pub(crate) fn check_request(
    storage: &dyn Storage,
    op: &'static str,
    offset: u64,
    len: u64,
    write: bool,
) -> Result<()> {
    if write && !storage.is_writable() {
        return Err(
            Error::new(ErrorKind::ReadOnly, "storage is opened read-only")
                .with_operation(op)
                .with_offset(offset),
        );
    }
    let align = storage.request_align() as u64;
    if align > 1 && (offset % align != 0 || len % align != 0) {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("request of {len:#x} bytes is not aligned to {align} bytes"),
        )
        .with_operation(op)
        .with_offset(offset));
    }
    offset.checked_add(len).ok_or_else(|| {
        Error::new(ErrorKind::OutOfBounds, "request end overflows 64 bits")
            .with_operation(op)
            .with_offset(offset)
    })?;
    Ok(())
}
