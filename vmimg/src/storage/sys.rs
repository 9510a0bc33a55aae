//! Linux system calls the standard library does not wrap: `fallocate`, `lseek` with
//! `SEEK_DATA`/`SEEK_HOLE`, `statx` for direct-I/O alignment, OFD locks (`fcntl`) and the
//! block-device discard ioctl. All `unsafe` of the file
//! storage lives here; every function takes a borrowed `File`, so the descriptor is open for
//! the duration of the call.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `fallocate(fd, mode, offset, len)`.
pub(super) fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    loop {
        // SAFETY: the descriptor comes from a live `&File`; fallocate reads no user memory.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `lseek(fd, offset, whence)`, returning `Ok(None)` for ENXIO (no data/hole past `offset`).
pub(super) fn seek_data_hole(
    file: &File,
    offset: u64,
    whence: libc::c_int,
) -> io::Result<Option<u64>> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: the descriptor comes from a live `&File`; lseek touches no user memory. The file
    // position it moves is never used: all data I/O is positional (pread/pwrite).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(r as u64))
}

/// Direct-I/O alignment `(memory, offset)` of an open file, from `statx(STATX_DIOALIGN)`;
/// `None` where the kernel or file system does not say.
pub(super) fn dio_alignment(file: &File) -> Option<(usize, usize)> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: the descriptor comes from a live `&File`, the empty path with AT_EMPTY_PATH asks
    // about that descriptor, and `stx` is a valid, writable statx buffer.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if r != 0 {
        return None;
    }
    // SAFETY: statx returned 0, so it filled the buffer (which was zeroed before, so every
    // field not filled is a valid zero integer).
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((
        stx.stx_dio_mem_align as usize,
        stx.stx_dio_offset_align as usize,
    ))
}

/// The offset and vector count of a vectored call, converted for the C API.
fn iov_args(offset: u64, count: usize) -> io::Result<(libc::off_t, libc::c_int)> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let count =
        libc::c_int::try_from(count).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok((off, count))
}

/// A byte count, or the OS error when `r` is negative.
fn byte_count(r: isize) -> io::Result<usize> {
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// `preadv2(fd, bufs, offset, RWF_NOWAIT)`: reads only what the page cache holds, never
/// waiting for the device (`EAGAIN` otherwise). Returns the bytes read.
pub(super) fn preadv2_nowait(
    file: &File,
    bufs: &mut [std::io::IoSliceMut<'_>],
    offset: u64,
) -> io::Result<usize> {
    let (off, count) = iov_args(offset, bufs.len())?;
    // SAFETY: `IoSliceMut` is guaranteed ABI-compatible with `struct iovec` on Unix; every
    // slice is a live, exclusive borrow for the duration of this synchronous call, and the
    // descriptor comes from a live `&File`.
    let r = unsafe {
        libc::preadv2(
            file.as_raw_fd(),
            bufs.as_mut_ptr().cast::<libc::iovec>(),
            count,
            off,
            libc::RWF_NOWAIT,
        )
    };
    byte_count(r)
}

/// `pwritev2(fd, bufs, offset, RWF_NOWAIT)`: writes into the page cache only if that needs no
/// waiting (`EAGAIN` otherwise). Returns the bytes written.
pub(super) fn pwritev2_nowait(
    file: &File,
    bufs: &[std::io::IoSlice<'_>],
    offset: u64,
) -> io::Result<usize> {
    let (off, count) = iov_args(offset, bufs.len())?;
    // SAFETY: `IoSlice` is guaranteed ABI-compatible with `struct iovec` on Unix; every slice
    // is a live borrow for the duration of this synchronous call, and the descriptor comes
    // from a live `&File`.
    let r = unsafe {
        libc::pwritev2(
            file.as_raw_fd(),
            bufs.as_ptr().cast::<libc::iovec>(),
            count,
            off,
            libc::RWF_NOWAIT,
        )
    };
    byte_count(r)
}

/// An OFD lock request on one byte: `l_type` `F_RDLCK`, `F_WRLCK` or `F_UNLCK`.
fn ofd_lock(byte: u64, l_type: libc::c_int) -> io::Result<libc::flock> {
    // SAFETY: `flock` is a plain C struct of integers, for which all-zero bytes are valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start =
        libc::off_t::try_from(byte).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    fl.l_len = 1;
    // OFD locks require l_pid 0 (already, from the zeroed struct).
    Ok(fl)
}

/// Takes (`F_RDLCK`) or releases (`F_UNLCK`) an open-file-description lock on one byte,
/// without waiting.
pub(super) fn ofd_setlk(file: &File, byte: u64, l_type: libc::c_int) -> io::Result<()> {
    let fl = ofd_lock(byte, l_type)?;
    loop {
        // SAFETY: the descriptor comes from a live `&File`, and `fl` is a valid, initialised
        // `struct flock` that the kernel only reads for F_OFD_SETLK.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if r == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Whether an open file description other than this one holds a lock on `byte` that an
/// exclusive lock would conflict with (`F_OFD_GETLK`).
pub(super) fn ofd_locked_elsewhere(file: &File, byte: u64) -> io::Result<bool> {
    let mut fl = ofd_lock(byte, libc::F_WRLCK)?;
    // SAFETY: the descriptor comes from a live `&File`; `fl` is a valid `struct flock` that
    // the kernel reads and overwrites in place for F_OFD_GETLK.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// `ioctl(fd, BLKDISCARD, [offset, len])`: tells a block device the range is unused (its
/// content becomes undefined). Offsets must be multiples of the logical block size.
pub(super) fn blk_discard(file: &File, offset: u64, len: u64) -> io::Result<()> {
    /// `_IO(0x12, 119)`.
    const BLKDISCARD: libc::c_ulong = 0x1277;
    let range: [u64; 2] = [offset, len];
    // SAFETY: the descriptor comes from a live `&File`; BLKDISCARD reads two u64 values
    // (start, length) from the pointer, which points at `range`, alive for the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `struct fsxattr` of `<linux/fs.h>`.
#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

/// Sets the file's extent size hint (`FS_IOC_FSSETXATTR` with `FS_XFLAG_EXTSIZE`), which
/// makes XFS allocate in units of `bytes`; 0 leaves the choice to the file system.
pub(super) fn set_extent_size_hint(file: &File, bytes: u32) -> io::Result<()> {
    const FS_XFLAG_EXTSIZE: u32 = 0x0000_0800;
    let get = libc::_IOR::<FsXattr>(b'X' as u32, 31);
    let set = libc::_IOW::<FsXattr>(b'X' as u32, 32);
    let mut attr = FsXattr::default();
    // SAFETY: the descriptor comes from a live `&File`; FS_IOC_FSGETXATTR writes one
    // `struct fsxattr` to the pointer, which points at `attr`, alive for the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), get, &mut attr as *mut FsXattr) } != 0 {
        return Err(io::Error::last_os_error());
    }
    attr.xflags |= FS_XFLAG_EXTSIZE;
    attr.extsize = bytes;
    // SAFETY: as above; FS_IOC_FSSETXATTR reads one `struct fsxattr` from `attr`.
    if unsafe { libc::ioctl(file.as_raw_fd(), set, &attr as *const FsXattr) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Turns copy-on-write off for the file (`FS_NOCOW_FL`, which btrfs honours while the file
/// is empty).
pub(super) fn set_nocow(file: &File) -> io::Result<()> {
    const FS_NOCOW_FL: libc::c_int = 0x0080_0000;
    let mut flags: libc::c_int = 0;
    // SAFETY: the descriptor comes from a live `&File`; FS_IOC_GETFLAGS writes one int to
    // the pointer, which points at `flags`, alive for the call.
    if unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::FS_IOC_GETFLAGS,
            &mut flags as *mut _,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    flags |= FS_NOCOW_FL;
    // SAFETY: as above; FS_IOC_SETFLAGS reads one int from `flags`.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags as *const _) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
