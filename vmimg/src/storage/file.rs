//! File storage (Linux): positional I/O on a thread pool, buffered or `O_DIRECT`.
//!
//! Buffered reads and writes first try `preadv2`/`pwritev2` with `RWF_NOWAIT` right on the
//! calling thread: the kernel completes them from the page cache without waiting for the
//! device, or refuses with `EAGAIN`. Everything that may wait runs on tokio's blocking thread
//! pool, never on an executor worker. Pool requests move data through pooled, page-aligned
//! buffers owned by the I/O thread, so a request future dropped mid-flight can never leave a
//! thread writing into freed memory, and `O_DIRECT` gets the memory alignment it needs
//! whatever the caller's buffers look like.
//!
//! Measured on the development machine (2 cores, `examples/file_io_backends.rs`): 4 KiB
//! random reads at queue depth 32 from the page cache ran at 84 k ops/s through the pool
//! alone against 1.17 M ops/s for a bare io_uring loop; the `RWF_NOWAIT` fast path closes that
//! gap without a second I/O engine. With `O_DIRECT` the pool reached 0.67x of io_uring at 4 KiB
//! and parity at 1 MiB.

use super::lock::{FileLocks, LockBytes, LockMode, Permissions};
use super::sys;
use super::{check_request, iov_len, BoxFuture, HostExtent, PreallocMode, Storage};
use crate::io_buf::{AlignedBuf, BufPool};
use crate::{Error, ErrorKind, Result};
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

/// Alignment assumed for `O_DIRECT` when the kernel does not report one.
const DEFAULT_DIO_ALIGN: usize = 4096;
/// Largest piece written at once when zeros have to be written out by hand.
const ZERO_CHUNK: usize = 1 << 20;

/// Buffers shared by all file storages: page-aligned, at most 4 MiB idle per size class
/// (idle buffers are peak memory that no request uses).
static POOL: LazyLock<BufPool> = LazyLock::new(|| BufPool::new(4096, 4 << 20));

/// How the files this process creates ([`FileStorageOpen::create`]) are set up besides
/// their content: QEMU's file-protocol creation options, which qemu-img applies to every
/// file it creates for an image (`-o extent_size_hint=`, `-o nocow=`). Process-wide, as
/// they come from the command line of the one creation a qemu-img run makes.
#[derive(Clone, Copy, Debug)]
pub struct CreatedFileOptions {
    /// Extent size hint in bytes (honoured by XFS); 0 leaves allocation to the file
    /// system. QEMU's default is 1 MiB.
    pub extent_size_hint: u32,
    /// Turn copy-on-write off (honoured by btrfs).
    pub nocow: bool,
    /// Called with the reason when the hint cannot be set; the creation goes on either way
    /// (qemu-img warns only about a hint it was given).
    pub hint_failed: Option<fn(&io::Error)>,
}

impl Default for CreatedFileOptions {
    fn default() -> Self {
        CreatedFileOptions {
            extent_size_hint: 1 << 20,
            nocow: false,
            hint_failed: None,
        }
    }
}

static CREATED_FILE_OPTIONS: LazyLock<std::sync::Mutex<CreatedFileOptions>> =
    LazyLock::new(Default::default);

/// Sets the [`CreatedFileOptions`] of the files created from now on.
pub fn set_created_file_options(opts: CreatedFileOptions) {
    *CREATED_FILE_OPTIONS
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = opts;
}

/// Applies the [`CreatedFileOptions`] to a file just created (empty, as XFS wants it for
/// the hint). Failures are not errors: file systems without these features ignore them.
fn set_up_created_file(file: &File) {
    let opts = *CREATED_FILE_OPTIONS
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if opts.nocow {
        let _ = sys::set_nocow(file);
    }
    if let Err(e) = sys::set_extent_size_hint(file, opts.extent_size_hint) {
        if let Some(report) = opts.hint_failed {
            report(&e);
        }
    }
}

/// Builder for [`FileStorage`].
#[derive(Clone, Debug)]
pub struct FileStorageOpen {
    path: PathBuf,
    writable: bool,
    direct: bool,
    create: bool,
    no_sync: bool,
    inline_io: bool,
    locking: LockMode,
    /// What [`FileStorageOpen::create`] locks before truncating.
    create_permissions: (Permissions, Permissions),
    char_device: bool,
}

impl FileStorageOpen {
    /// Opens `path` read-only, buffered, unless told otherwise.
    pub fn new(path: impl AsRef<Path>) -> Self {
        FileStorageOpen {
            path: path.as_ref().to_path_buf(),
            writable: false,
            direct: false,
            create: false,
            no_sync: false,
            inline_io: false,
            locking: LockMode::Auto,
            create_permissions: (
                Permissions::WRITE | Permissions::RESIZE,
                Permissions::ALL.without(Permissions::RESIZE),
            ),
            char_device: false,
        }
    }

    /// Also open a character device (QEMU's `host_device` driver opens them). Only for a
    /// device the user names: files named inside images never open as character devices,
    /// which may never end.
    pub fn char_device(mut self, allow: bool) -> Self {
        self.char_device = allow;
        self
    }

    /// Whether the file is locked QEMU's way when a user states its permissions
    /// ([`Storage::set_permissions`]); [`LockMode::Auto`] by default.
    pub fn locking(mut self, mode: LockMode) -> Self {
        self.locking = mode;
        self
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

    /// Ignore sync requests (QEMU's `cache=unsafe`): data still reaches the kernel with
    /// every write, so a killed process loses nothing, but a host crash or power loss can
    /// lose or corrupt what was written. For scratch output such as a conversion target.
    pub fn no_sync(mut self, no_sync: bool) -> Self {
        self.no_sync = no_sync;
        self
    }

    /// Do reads and writes on the calling thread, as plain system calls, instead of handing
    /// them to a blocking thread. That saves a thread hand-over per request (about 15% of
    /// the time of a bulk copy), but a request that waits for the disk stalls the
    /// runtime's worker thread meanwhile: for programs that dedicate their runtime to bulk
    /// I/O on this file, such as a conversion's target. Off by default.
    pub fn inline_io(mut self, inline_io: bool) -> Self {
        self.inline_io = inline_io;
        self
    }

    /// Create the file if missing and truncate it to zero length (implies writable).
    ///
    /// As qemu-img does, the file is locked for writing and resizing (sharing everything
    /// but resizing) *before* it is truncated: a file another process holds as a qcow2
    /// image (reader or writer) is refused, not emptied. Block devices are not truncated.
    pub fn create(mut self, create: bool) -> Self {
        self.create = create;
        if create {
            self.writable = true;
        }
        self
    }

    /// What [`FileStorageOpen::create`] holds and shares (and checks) before truncating,
    /// instead of writing and resizing: a format that opens its new image at once asks for
    /// what that open will need, so that a conflict is found before anything is lost.
    pub fn create_permissions(mut self, perm: Permissions, shared: Permissions) -> Self {
        self.create_permissions = (perm, shared);
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
        // Only regular files and block devices: opening a FIFO (which a crafted image can
        // name as its backing file) would block forever, and character devices never end.
        if let Ok(meta) = std::fs::metadata(&self.path) {
            use std::os::unix::fs::FileTypeExt;
            let t = meta.file_type();
            if t.is_fifo() || t.is_socket() || (t.is_char_device() && !self.char_device) {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "not a regular file or block device",
                ));
            }
        }
        let mut opts = OpenOptions::new();
        opts.read(true).write(self.writable);
        if self.create {
            // Truncated below, once the locks say nobody else uses the file.
            opts.create(true);
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
        use std::os::unix::fs::FileTypeExt;
        let block_device = meta.file_type().is_block_device();
        let storage = FileStorage {
            nowait_read: AtomicBool::new(!self.direct),
            nowait_write: AtomicBool::new(!self.direct),
            file: Arc::new(file),
            path: self.path,
            writable: self.writable,
            direct: self.direct,
            no_sync: self.no_sync,
            inline_io: self.inline_io,
            mem_align,
            request_align,
            block_device,
            locks: FileLocks::new(self.locking),
        };
        if self.create {
            let (perm, shared) = self.create_permissions;
            storage.set_permissions(perm, shared)?;
            if !block_device {
                storage.file.set_len(0)?;
                set_up_created_file(&storage.file);
            }
        }
        Ok(storage)
    }
}

/// A regular file (or block device) on Linux.
#[derive(Debug)]
pub struct FileStorage {
    file: Arc<File>,
    path: PathBuf,
    writable: bool,
    direct: bool,
    /// Sync requests are ignored (`cache=unsafe`).
    no_sync: bool,
    /// Reads and writes run on the calling thread (see [`FileStorageOpen::inline_io`]).
    inline_io: bool,
    mem_align: usize,
    request_align: usize,
    /// A block device: its size comes from the device, and it cannot be resized.
    block_device: bool,
    /// QEMU-compatible image locks on this open file description.
    locks: FileLocks,
    /// Whether the `RWF_NOWAIT` read fast path is worth trying (buffered files where the
    /// kernel supports it; switched off at the first EOPNOTSUPP).
    nowait_read: AtomicBool,
    /// The same for writes (ext4, for one, refuses buffered `RWF_NOWAIT` writes).
    nowait_write: AtomicBool,
}

/// Outcome of a fast-path attempt: bytes done (all, some, or none).
fn nowait_outcome(enabled: &AtomicBool, r: io::Result<usize>) -> Result<usize> {
    match r {
        Ok(n) => Ok(n),
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(0),
        Err(e) if is_unsupported(&e) => {
            enabled.store(false, Ordering::Relaxed);
            Ok(0)
        }
        Err(e) => Err(e.into()),
    }
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

    /// Largest write per system call: [`WRITE_PIECE`] through the page cache, unlimited
    /// with `O_DIRECT` (no page cache folios are made).
    fn write_piece(&self) -> usize {
        if self.direct {
            usize::MAX
        } else {
            WRITE_PIECE
        }
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

/// Buffered requests at least this large skip the pool's bounce buffer on a multi-threaded
/// runtime: the worker does the system call itself, inside `block_in_place` (the runtime
/// moves its other tasks to another thread meanwhile). The copy saved is worth the thread
/// hand-over only for large requests.
const IN_PLACE_MIN: usize = 128 << 10;

/// Whether `tokio::task::block_in_place` may be used here.
fn can_block_in_place() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// Reads into `bufs`, from `skip` bytes into them, at `offset` (the file offset of that
/// point); the part past end of file is zero-filled.
fn read_into(
    file: &File,
    bufs: &mut [IoSliceMut<'_>],
    mut skip: usize,
    offset: u64,
) -> io::Result<()> {
    let mut at = offset;
    for b in bufs.iter_mut() {
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let piece = &mut b[skip..];
        read_full(file, piece, at)?;
        at += piece.len() as u64;
        skip = 0;
    }
    Ok(())
}

/// Largest buffered write handed to the kernel in one system call.
///
/// The page cache sizes a new folio after the write that creates it: a 2 MiB write gets a
/// 2 MiB folio. On virtual machines that hand free memory back to the host (free page
/// reporting, as on this project's machines) those large folios come from memory the host
/// has to fault in again: writing 1.3 GiB to a new file after a few idle seconds took
/// 3.0-4.3 s in 2 MiB writes against 0.50 s in 64 KiB writes (`dd`, 4 runs each), and
/// with the memory warm both took 0.50 s.
const WRITE_PIECE: usize = 64 << 10;

/// Writes all of `buf` at `offset`, in system calls of at most `piece` bytes.
fn write_pieces(file: &File, buf: &[u8], offset: u64, piece: usize) -> io::Result<()> {
    let mut at = offset;
    for b in buf.chunks(piece) {
        file.write_all_at(b, at)?;
        at += b.len() as u64;
    }
    Ok(())
}

/// Writes `bufs`, from `skip` bytes into them, at `offset`, in system calls of at most
/// `piece` bytes.
fn write_from(
    file: &File,
    bufs: &[IoSlice<'_>],
    mut skip: usize,
    offset: u64,
    piece: usize,
) -> io::Result<()> {
    let mut at = offset;
    for b in bufs {
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        write_pieces(file, &b[skip..], at, piece)?;
        at += (b.len() - skip) as u64;
        skip = 0;
    }
    Ok(())
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
                if e.raw_os_error() == Some(libc::EINVAL) && offset + done as u64 >= file_len(file)?
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

/// Copies `src` into the vectors `bufs`, starting `skip` bytes into them.
fn scatter(src: &[u8], bufs: &mut [IoSliceMut<'_>], mut skip: usize) {
    let mut src = src;
    for dst in bufs.iter_mut() {
        if skip >= dst.len() {
            skip -= dst.len();
            continue;
        }
        let (head, rest) = src.split_at(dst.len() - skip);
        dst[skip..].copy_from_slice(head);
        src = rest;
        skip = 0;
    }
}

/// Copies the vectors `bufs`, from `skip` bytes into them, to `dst`.
fn gather(bufs: &[IoSlice<'_>], mut skip: usize, dst: &mut [u8]) {
    let mut pos = 0;
    for src in bufs {
        if skip >= src.len() {
            skip -= src.len();
            continue;
        }
        let n = src.len() - skip;
        dst[pos..pos + n].copy_from_slice(&src[skip..]);
        pos += n;
        skip = 0;
    }
}

/// Length of a regular file, or size of a block device (whose `st_size` is 0).
fn file_len(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    use std::os::unix::fs::FileTypeExt;
    if meta.file_type().is_block_device() {
        use std::io::Seek;
        let mut f = file;
        return f.seek(io::SeekFrom::End(0));
    }
    Ok(meta.len())
}

/// The lock bytes of an open file, as OFD locks.
struct OfdBytes<'a>(&'a File);

impl LockBytes for OfdBytes<'_> {
    fn set(&self, byte: u64, locked: bool) -> io::Result<()> {
        let l_type = if locked { libc::F_RDLCK } else { libc::F_UNLCK };
        sys::ofd_setlk(self.0, byte, l_type)
    }

    fn held_elsewhere(&self, byte: u64) -> io::Result<bool> {
        sys::ofd_locked_elsewhere(self.0, byte)
    }
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
    let end = offset + len;
    let mut from = offset;
    if may_unmap {
        // Punch the part inside the file. Past its end the file is grown by ZERO_RANGE
        // (then punched too): growing with set_len could cut short a racing write that
        // has just grown the file further.
        let eof = file_len(file)?;
        let inside = end.min(eof);
        if offset < inside {
            match punch_hole(file, offset, inside - offset) {
                Ok(()) => from = inside,
                Err(e) if is_unsupported(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if from == end {
            return Ok(());
        }
    }
    match sys::fallocate(file, libc::FALLOC_FL_ZERO_RANGE, from, end - from) {
        Ok(()) => {
            if may_unmap {
                // Best effort: the range reads as zeros either way.
                let _ = punch_hole(file, from, end - from);
            }
            Ok(())
        }
        Err(e) if is_unsupported(&e) => write_zeros_by_hand(file, from, end - from),
        Err(e) => Err(e),
    }
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    sys::fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

fn resize_sync(file: &File, new_size: u64, prealloc: PreallocMode, align: u64) -> io::Result<()> {
    let old = file_len(file)?;
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
    let size = file_len(file)?;
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
        file_len(&self.file).map_err(|e| self.ctx(e.into(), "stat", 0))
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
            if self.inline_io {
                let r = if self.direct {
                    // O_DIRECT wants aligned memory: through an aligned buffer.
                    let mut buf = POOL.get(len);
                    let r = read_full(&self.file, &mut buf, offset);
                    if r.is_ok() {
                        scatter(&buf, bufs, 0);
                    }
                    POOL.put(buf);
                    r
                } else {
                    read_into(&self.file, bufs, 0, offset)
                };
                return r.map_err(|e| self.ctx(e.into(), "read", offset));
            }
            let mut done = 0;
            if self.nowait_read.load(Ordering::Relaxed) && bufs.len() <= 1024 {
                let r = sys::preadv2_nowait(&self.file, bufs, offset);
                done = nowait_outcome(&self.nowait_read, r)
                    .map_err(|e| self.ctx(e, "read", offset))?;
                if done == len {
                    return Ok(());
                }
            }
            // The rest (all of it, or what the page cache did not hold) goes to the pool.
            let rest = len - done;
            let rest_off = offset + done as u64;
            if !self.direct && rest >= IN_PLACE_MIN && can_block_in_place() {
                return tokio::task::block_in_place(|| read_into(&self.file, bufs, done, rest_off))
                    .map_err(|e| self.ctx(e.into(), "read", rest_off));
            }
            let mut buf = POOL.get(rest);
            let buf = self
                .run("read", rest_off, move |f| {
                    read_full(f, &mut buf, rest_off)?;
                    Ok(buf)
                })
                .await?;
            scatter(&buf, bufs, done);
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
            let piece = self.write_piece();
            if self.inline_io {
                let r = if self.direct {
                    let mut buf = POOL.get(len);
                    gather(bufs, 0, &mut buf);
                    let r = write_pieces(&self.file, &buf, offset, piece);
                    POOL.put(buf);
                    r
                } else {
                    write_from(&self.file, bufs, 0, offset, piece)
                };
                return r.map_err(|e| self.ctx(e.into(), "write", offset));
            }
            let mut done = 0;
            if self.nowait_write.load(Ordering::Relaxed) && len <= piece && bufs.len() <= 1024 {
                let r = sys::pwritev2_nowait(&self.file, bufs, offset);
                done = nowait_outcome(&self.nowait_write, r)
                    .map_err(|e| self.ctx(e, "write", offset))?;
                if done == len {
                    return Ok(());
                }
            }
            let rest_off = offset + done as u64;
            if !self.direct && len - done >= IN_PLACE_MIN && can_block_in_place() {
                return tokio::task::block_in_place(|| {
                    write_from(&self.file, bufs, done, rest_off, piece)
                })
                .map_err(|e| self.ctx(e.into(), "write", rest_off));
            }
            let mut buf = POOL.get(len - done);
            gather(bufs, done, &mut buf);
            let buf = self
                .run("write", rest_off, move |f| {
                    write_pieces(f, &buf, rest_off, piece)?;
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

    fn allocate(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if len == 0 || !self.writable {
                return Ok(());
            }
            self.run("allocate", offset, move |f| {
                match sys::fallocate(f, libc::FALLOC_FL_KEEP_SIZE, offset, len) {
                    Err(e) if !is_unsupported(&e) => Err(e.into()),
                    _ => Ok(()),
                }
            })
            .await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            check_request(self, "discard", offset, len, true)
                .map_err(|e| e.with_path(&self.path))?;
            let block_device = self.block_device;
            self.run("discard", offset, move |f| {
                let end = (offset + len).min(file_len(f)?);
                if offset >= end {
                    return Ok(());
                }
                let r = if block_device {
                    // The device's own discard, on the whole 4 KiB blocks inside the range
                    // (discard is advisory: the edges are left alone).
                    let (start, stop) = (offset.div_ceil(4096) * 4096, end / 4096 * 4096);
                    if start >= stop {
                        return Ok(());
                    }
                    sys::blk_discard(f, start, stop - start)
                } else {
                    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                    sys::fallocate(f, mode, offset, end - offset)
                };
                match r {
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
        if self.no_sync {
            return Box::pin(async { Ok(()) });
        }
        Box::pin(self.run("sync", 0, |f| Ok(f.sync_data()?)))
    }

    fn resize(&self, new_size: u64, prealloc: PreallocMode) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            check_request(self, "resize", new_size, 0, true)
                .map_err(|e| e.with_path(&self.path))?;
            if self.block_device {
                // As QEMU: a device keeps its size.
                if new_size == self.size()? {
                    return Ok(());
                }
                return Err(self.ctx(
                    Error::new(ErrorKind::Unsupported, "Cannot resize device files"),
                    "resize",
                    new_size,
                ));
            }
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

    fn set_permissions(&self, perm: Permissions, shared: Permissions) -> Result<()> {
        let name = self.path.display().to_string();
        self.locks
            .set(&OfdBytes(&self.file), &name, perm, shared)
            .map_err(|e| e.with_path(&self.path))
    }

    fn permissions(&self) -> (Permissions, Permissions) {
        self.locks.get()
    }

    fn is_block_device(&self) -> bool {
        self.block_device
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageExt;

    /// Regression: a backing file name pointing at a FIFO made open block forever.
    #[tokio::test]
    async fn fifos_and_character_devices_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let open = FileStorageOpen::new(&fifo).open();
        let err = tokio::time::timeout(std::time::Duration::from_secs(5), open)
            .await
            .expect("opening a FIFO must not block")
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        let err = FileStorageOpen::new("/dev/zero").open().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn scatter_and_gather_skip_whole_and_partial_vectors() {
        let src: Vec<u8> = (0..10).collect();
        let (mut a, mut b, mut c) = ([0u8; 3], [0u8; 4], [0u8; 5]);
        let mut iov = [
            IoSliceMut::new(&mut a),
            IoSliceMut::new(&mut b),
            IoSliceMut::new(&mut c),
        ];
        // 12 bytes of vectors, the first 5 already filled: 7 bytes come from src.
        scatter(&src[..7], &mut iov, 5);
        assert_eq!((a, b, c), ([0, 0, 0], [0, 0, 0, 1], [2, 3, 4, 5, 6]));

        let (x, y) = ([1u8, 2, 3], [4u8, 5, 6, 7]);
        let iov = [IoSlice::new(&x), IoSlice::new(&y)];
        let mut out = [0u8; 2];
        gather(&iov, 5, &mut out);
        assert_eq!(out, [6, 7]);
        let mut out = [0u8; 7];
        gather(&iov, 0, &mut out);
        assert_eq!(out, [1, 2, 3, 4, 5, 6, 7]);
    }

    #[tokio::test]
    async fn vectored_read_of_data_not_in_page_cache_is_served_by_the_pool() {
        cold_vectored_read_and_large_writes().await;
    }

    /// On a multi-threaded runtime large requests skip the bounce buffer (`block_in_place`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_requests_on_a_multi_threaded_runtime_are_done_in_place() {
        assert!(can_block_in_place());
        cold_vectored_read_and_large_writes().await;
    }

    async fn cold_vectored_read_and_large_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        // Writing through O_DIRECT leaves the range out of the page cache, so the buffered
        // reader's RWF_NOWAIT attempt finds it cold and the pool has to read it.
        let direct = FileStorageOpen::new(&path)
            .writable(true)
            .direct(true)
            .open()
            .await
            .unwrap();
        direct.write_at(0, &data).await.unwrap();
        let s = FileStorageOpen::new(&path).open().await.unwrap();
        let mut a = vec![0u8; 300 << 10];
        let mut b = vec![0u8; (1 << 20) - (300 << 10)];
        let mut iov = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        s.readv(0, &mut iov).await.unwrap();
        assert!(a[..] == data[..300 << 10]);
        assert!(b[..] == data[300 << 10..]);

        // A large vectored write past the end, then a cold read straddling the end of file.
        let w = FileStorageOpen::new(&path)
            .writable(true)
            .open()
            .await
            .unwrap();
        let x: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        let y: Vec<u8> = (0..100_000u32).map(|i| (i % 239) as u8).collect();
        w.writev((1 << 20) - 1000, &[IoSlice::new(&x), IoSlice::new(&y)])
            .await
            .unwrap();
        let end = (1u64 << 20) - 1000 + 300_000;
        assert_eq!(w.size().unwrap(), end);
        let mut got = vec![0xaau8; 400_000];
        s.read_at(end - 300_000, &mut got).await.unwrap();
        assert!(got[..200_000] == x[..]);
        assert!(got[200_000..300_000] == y[..]);
        assert!(
            got[300_000..].iter().all(|&v| v == 0),
            "past end of file: zeros"
        );
    }
}
