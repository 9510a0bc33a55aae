//! File storage (Linux): positional I/O on a thread pool, buffered or `O_DIRECT`.
//!
//! Every system call runs on tokio's blocking thread pool, never on an executor worker. Data
//! moves through pooled, page-aligned buffers owned by the I/O thread, so a request future
//! dropped mid-flight can never leave a thread writing into freed memory, and `O_DIRECT` gets
//! the memory alignment it needs whatever the caller's buffers look like.

use super::sys;
use super::{check_request, iov_len, BoxFuture, HostExtent, PreallocMode, Storage};
use crate::io_buf::{AlignedBuf, BufPool};
use crate::{Error, ErrorKind, Result};
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

/// Alignment assumed for `O_DIRECT` when the kernel does not report one.
const DEFAULT_DIO_ALIGN: usize = 4096;
/// Largest piece written at once when zeros have to be written out by hand.
const ZERO_CHUNK: usize = 1 << 20;

/// Buffers shared by all file storages: page-aligned, at most 64 MiB idle per size class.
static POOL: LazyLock<BufPool> = LazyLock::new(|| BufPool::new(4096, 64 << 20));

/// Builder for [`FileStorage`].
#[derive(Clone, Debug)]
pub struct FileStorageOpen {
    path: PathBuf,
    writable: bool,
    direct: bool,
    create: bool,
}

impl FileStorageOpen {
    /// Opens `path` read-only, buffered, unless told otherwise.
    pub fn new(path: impl AsRef<Path>) -> Self {
        FileStorageOpen {
            path: path.as_ref().to_path_buf(),
            writable: false,
            direct: false,
            create: false,
        }
    }

    /// Open for writing too.
    pub fn writable(mut self, writable: bool) -> Self {
        self.writable = writable;
        self
    }

    /// Bypass the host page cache (`O_DIRECT`). Requests must then be aligned to
    /// [`Storage::request_align`]; the image layer above takes care of that.
    pub fn direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }

    /// Create the file if missing and truncate it to zero length (implies writable).
    pub fn create(mut self, create: bool) -> Self {
        self.create = create;
        if create {
            self.writable = true;
        }
        self
    }

    /// Opens the file.
    pub async fn open(self) -> Result<FileStorage> {
        let path = self.path.clone();
        blocking(move || self.open_sync())
            .await
            .map_err(|e| e.with_operation("open").with_path(&path))
    }

    fn open_sync(self) -> Result<FileStorage> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(self.writable);
        if self.create {
            opts.create(true).truncate(true);
        }
        if self.direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(&self.path).map_err(|e| {
            let err = Error::from_io(e);
            if self.direct && err.errno() == libc::EINVAL {
                Error::new(
                    ErrorKind::Unsupported,
                    "the file system does not support direct I/O (O_DIRECT)",
                )
            } else {
                err
            }
        })?;
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(Error::new(ErrorKind::InvalidArgument, "is a directory"));
        }
        let (mem_align, request_align) = if self.direct {
            sys::dio_alignment(&file).unwrap_or((DEFAULT_DIO_ALIGN, DEFAULT_DIO_ALIGN))
        } else {
            (1, 1)
        };
        Ok(FileStorage {
            file: Arc::new(file),
            path: self.path,
            writable: self.writable,
            direct: self.direct,
            mem_align,
            request_align,
        })
    }
}

/// A regular file (or block device) on Linux.
#[derive(Debug)]
pub struct FileStorage {
    file: Arc<File>,
    path: PathBuf,
    writable: bool,
    direct: bool,
    mem_align: usize,
    request_align: usize,
}

impl FileStorage {
    /// Whether the file was opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    fn ctx(&self, err: Error, op: &'static str, offset: u64) -> Error {
        err.with_operation(op)
            .with_path(&self.path)
            .with_offset(offset)
    }

    /// Runs `f` on the blocking pool with a clone of the file handle.
    async fn run<T: Send + 'static>(
        &self,
        op: &'static str,
        offset: u64,
        f: impl FnOnce(&File) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let file = Arc::clone(&self.file);
        blocking(move || f(&file))
            .await
            .map_err(|e| self.ctx(e, op, offset))
    }
}

/// Runs a blocking closure on tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::new(ErrorKind::Io, "I/O worker thread failed").with_source(e))?
}

/// Reads `buf.len()` bytes at `offset`; the part past end of file is zero-filled.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // O_DIRECT refuses the unaligned offset a short read at end of file leaves.
                if e.raw_os_error() == Some(libc::EINVAL)
                    && offset + done as u64 >= file.metadata()?.len()
                {
                    break;
                }
                return Err(e);
            }
        }
    }
    buf[done..].fill(0);
    Ok(())
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENOTTY)
    )
}

/// Writes zeros over `[offset, offset + len)` by hand, in aligned chunks.
fn write_zeros_by_hand(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeros = AlignedBuf::zeroed(ZERO_CHUNK.min(len as usize), DEFAULT_DIO_ALIGN);
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = (end - pos).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

fn zero_range(file: &File, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
    if may_unmap {
        let end = offset + len;
        if end > file.metadata()?.len() {
            file.set_len(end)?;
        }
        match sys::fallocate(
            file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => return Ok(()),
            Err(e) if is_unsupported(&e) => {}
            Err(e) => return Err(e),
        }
    }
    match sys::fallocate(file, libc::FALLOC_FL_ZERO_RANGE, offset, len) {
        Ok(()) => Ok(()),
        Err(e) if is_unsupported(&e) => write_zeros_by_hand(file, offset, len),
        Err(e) => Err(e),
    }
}

fn resize_sync(file: &File, new_size: u64, prealloc: PreallocMode, align: u64) -> io::Result<()> {
    let old = file.metadata()?.len();
    if new_size <= old {
        return file.set_len(new_size);
    }
    match prealloc {
        PreallocMode::Off | PreallocMode::Metadata => file.set_len(new_size),
        PreallocMode::Falloc => match sys::fallocate(file, 0, old, new_size - old) {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) => resize_sync(file, new_size, PreallocMode::Full, align),
            Err(e) => Err(e),
        },
        PreallocMode::Full => {
            file.set_len(new_size)?;
            // Bytes between `old` and the next aligned offset already read as zeros.
            let start = old.div_ceil(align) * align;
            let end = new_size / align * align;
            if start < end {
                write_zeros_by_hand(file, start, end - start)?;
            }
            Ok(())
        }
    }
}

fn extent_sync(file: &File, offset: u64, max_len: u64) -> io::Result<(HostExtent, u64)> {
    let size = file.metadata()?.len();
    let end = offset.saturating_add(max_len).min(size);
    if offset >= end {
        return Ok((HostExtent::Hole, max_len.max(1)));
    }
    let data = match sys::seek_data_hole(file, offset, libc::SEEK_DATA) {
        Ok(Some(d)) => d,
        Ok(None) => return Ok((HostExtent::Hole, end - offset)),
        Err(e) if is_unsupported(&e) => return Ok((HostExtent::Data, end - offset)),
        Err(e) => return Err(e),
    };
    if data > offset {
        return Ok((HostExtent::Hole, data.min(end) - offset));
    }
    let hole = sys::seek_data_hole(file, offset, libc::SEEK_HOLE)?.unwrap_or(end);
    Ok((HostExtent::Data, hole.clamp(offset + 1, end) - offset))
}

impl Storage for FileStorage {
    fn size(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| self.ctx(e.into(), "stat", 0))
    }

    fn mem_align(&self) -> usize {
        self.mem_align
    }

    fn request_align(&self) -> usize {
        self.request_align
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn readv<'a>(
        &'a self,
        offset: u64,
        bufs: &'a mut [IoSliceMut<'_>],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let len = iov_len(bufs);
            check_request(self, "read", offset, len as u64, false)
                .map_err(|e| e.with_path(&self.path))?;
            if len == 0 {
                return Ok(());
            }
            let mut buf = POOL.get(len);
            let buf = self
                .run("read", offset, move |f| {
                    read_full(f, &mut buf, offset)?;
                    Ok(buf)
                })
                .await?;
            let mut src = &buf[..];
            for dst in bufs.iter_mut() {
                let (head, rest) = src.split_at(dst.len());
                dst.copy_from_slice(head);
                src = rest;
            }
            POOL.put(buf);
            Ok(())
        })
    }

    fn writev<'a>(&'a self, offset: u64, bufs: &'a [IoSlice<'_>]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let len = iov_len(bufs);
            check_request(self, "write", offset, len as u64, true)
                .map_err(|e| e.with_path(&self.path))?;
            if len == 0 {
                return Ok(());
            }
            let mut buf = POOL.get(len);
            let mut pos = 0;
            for src in bufs {
                buf[pos..pos + src.len()].copy_from_slice(src);
                pos += src.len();
            }
            let buf = self
                .run("write", offset, move |f| {
                    f.write_all_at(&buf, offset)?;
                    Ok(buf)
                })
                .await?;
            POOL.put(buf);
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            check_request(self, "write_zeroes", offset, len, true)
                .map_err(|e| e.with_path(&self.path))?;
            if len == 0 {
                return Ok(());
            }
            self.run("write_zeroes", offset, move |f| {
                Ok(zero_range(f, offset, len, may_unmap)?)
            })
            .await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            check_request(self, "discard", offset, len, true)
                .map_err(|e| e.with_path(&self.path))?;
            self.run("discard", offset, move |f| {
                let end = (offset + len).min(f.metadata()?.len());
                if offset >= end {
                    return Ok(());
                }
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                match sys::fallocate(f, mode, offset, end - offset) {
                    Err(e) if !is_unsupported(&e) => Err(e.into()),
                    _ => Ok(()),
                }
            })
            .await
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        // No data is cached in this process: everything written went to the kernel already.
        Box::pin(async { Ok(()) })
    }

    fn sync(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.run("sync", 0, |f| Ok(f.sync_data()?)))
    }

    fn resize(&self, new_size: u64, prealloc: PreallocMode) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            check_request(self, "resize", new_size, 0, true)
                .map_err(|e| e.with_path(&self.path))?;
            let align = self.request_align as u64;
            self.run("resize", new_size, move |f| {
                Ok(resize_sync(f, new_size, prealloc, align)?)
            })
            .await
        })
    }

    fn extent(&self, offset: u64, max_len: u64) -> BoxFuture<'_, Result<(HostExtent, u64)>> {
        Box::pin(self.run("extent", offset, move |f| {
            Ok(extent_sync(f, offset, max_len)?)
        }))
    }

    fn allocated_size(&self) -> Option<u64> {
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }
}
