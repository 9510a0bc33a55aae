//! A blocking wrapper over [`Image`] for programs that do not run an async executor.

use super::{BlockStatus, Image, ImageOpen};
use crate::format::DiscardMode;
use crate::storage::PreallocMode;
use crate::{Error, ErrorKind, Result};

/// An [`Image`] with blocking methods, driving its own single-threaded runtime.
///
/// Do not call its methods from inside an async runtime (they would block that runtime's
/// thread; tokio panics on it). The flush-before-drop rule of [`Image`] applies.
///
/// ```no_run
/// use vmimg::{BlockingImage, Format, ImageOpen};
/// let image = BlockingImage::open(ImageOpen::path("disk.raw").format(Format::RAW))?;
/// let mut buf = [0u8; 512];
/// image.read(0, &mut buf)?;
/// # Ok::<(), vmimg::Error>(())
/// ```
#[must_use = "an image must be used, and flushed before it is dropped if it was written"]
#[derive(Debug)]
pub struct BlockingImage {
    image: Image,
    rt: tokio::runtime::Runtime,
}

impl BlockingImage {
    fn runtime() -> Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| Error::new(ErrorKind::Io, "cannot start a runtime").with_source(e))
    }

    /// Opens an image with the given builder.
    pub fn open(open: ImageOpen) -> Result<Self> {
        let rt = Self::runtime()?;
        let image = rt.block_on(open.open())?;
        Ok(BlockingImage { image, rt })
    }

    /// Wraps an already open image.
    pub fn new(image: Image) -> Result<Self> {
        Ok(BlockingImage {
            image,
            rt: Self::runtime()?,
        })
    }

    /// The async handle (for use from async code elsewhere).
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.image.size()
    }

    /// See [`Image::read`].
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.rt.block_on(self.image.read(offset, buf))
    }

    /// See [`Image::write`].
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.rt.block_on(self.image.write(offset, buf))
    }

    /// See [`Image::write_zeroes`].
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.rt
            .block_on(self.image.write_zeroes(offset, len, may_unmap))
    }

    /// See [`Image::discard`].
    pub fn discard(&self, offset: u64, len: u64, mode: DiscardMode) -> Result<()> {
        self.rt.block_on(self.image.discard(offset, len, mode))
    }

    /// See [`Image::flush`].
    pub fn flush(&self) -> Result<()> {
        self.rt.block_on(self.image.flush())
    }

    /// See [`Image::sync`].
    pub fn sync(&self) -> Result<()> {
        self.rt.block_on(self.image.sync())
    }

    /// See [`Image::resize`].
    pub fn resize(&self, new_size: u64, prealloc: PreallocMode) -> Result<()> {
        self.rt.block_on(self.image.resize(new_size, prealloc))
    }

    /// See [`Image::block_status`].
    pub fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.rt.block_on(self.image.block_status(offset, len))
    }
}
