//! The raw format: guest offset N is byte N of the storage.

use crate::format::open::Source;
use crate::format::{
    ChainView, DiscardMode, Format, FormatDriver, Image, MapKind, MapQuery, Mapping, OpenOptions,
    WriteTarget,
};
use crate::storage::{BoxFuture, FileStorageOpen, HostExtent, PreallocMode, Storage};
use crate::{Error, ErrorKind, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The raw driver. Holes in the storage are reported as zeros by status queries.
#[derive(Debug)]
pub struct RawDriver {
    storage: Arc<dyn Storage>,
    size: AtomicU64,
    writable: bool,
}

impl RawDriver {
    /// A raw layer over `storage`, writable if the storage is and `writable` is set.
    pub fn new(storage: Arc<dyn Storage>, writable: bool) -> Result<Self> {
        let size = storage.size()?;
        Ok(RawDriver {
            writable: writable && storage.is_writable(),
            storage,
            size: AtomicU64::new(size),
        })
    }
}

impl FormatDriver for RawDriver {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    fn map(&self, offset: u64, len: u64, query: MapQuery) -> BoxFuture<'_, Result<Mapping<'_>>> {
        Box::pin(async move {
            let data = Mapping {
                len,
                kind: MapKind::Data {
                    storage: self.storage.as_ref(),
                    offset,
                },
            };
            if query == MapQuery::Read {
                return Ok(data);
            }
            let (extent, n) = self.storage.extent(offset, len).await?;
            let len = n.min(len);
            Ok(match extent {
                HostExtent::Data => Mapping { len, ..data },
                HostExtent::Hole => Mapping {
                    len,
                    kind: MapKind::Zero,
                },
            })
        })
    }

    fn map_for_write<'a>(
        &'a self,
        offset: u64,
        len: u64,
        _below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<WriteTarget<'a>>> {
        Box::pin(async move {
            Ok(WriteTarget {
                len,
                storage: self.storage.as_ref(),
                offset,
            })
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        _below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        self.storage.write_zeroes(offset, len, may_unmap)
    }

    fn discard<'a>(
        &'a self,
        offset: u64,
        len: u64,
        mode: DiscardMode,
        _below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        match mode {
            DiscardMode::ReadsAnything => self.storage.discard(offset, len),
            // No backing file: "falls through to backing" means zeros.
            DiscardMode::ReadsZero | DiscardMode::ReadsBacking => {
                self.storage.write_zeroes(offset, len, true)
            }
        }
    }

    fn resize(&self, new_size: u64, prealloc: PreallocMode) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.storage.resize(new_size, prealloc).await?;
            self.size.store(new_size, Ordering::Release);
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        self.storage.flush()
    }

    fn sync(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.storage.flush().await?;
            self.storage.sync().await
        })
    }

    fn invalidate_cache(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.size.store(self.storage.size()?, Ordering::Release);
            Ok(())
        })
    }
}

/// Opens a raw image.
#[derive(Clone, Debug)]
pub struct RawOpen {
    source: Source,
    opts: OpenOptions,
}

impl RawOpen {
    /// Opens the file at `path`.
    pub fn path(path: impl Into<PathBuf>) -> Self {
        RawOpen {
            source: Source::Path(path.into()),
            opts: OpenOptions::default(),
        }
    }

    /// Opens a raw image held in `storage`.
    pub fn storage(storage: Arc<dyn Storage>) -> Self {
        RawOpen {
            source: Source::Storage(storage),
            opts: OpenOptions::default(),
        }
    }

    /// Open for writing too.
    pub fn writable(mut self, writable: bool) -> Self {
        self.opts = self.opts.writable(writable);
        self
    }

    /// Bypass the host page cache (`O_DIRECT`).
    pub fn direct(mut self, direct: bool) -> Self {
        self.opts = self.opts.direct(direct);
        self
    }

    /// Replaces all options at once.
    pub fn options(mut self, opts: OpenOptions) -> Self {
        self.opts = opts;
        self
    }

    /// Opens the image. A raw image has no backing file nor data file: asking for one is an
    /// error.
    pub async fn open(self) -> Result<Image> {
        if self.opts.backing.is_some() || self.opts.data_file.is_some() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "raw images cannot have a backing file or an external data file",
            ));
        }
        let storage = self.source.open(&self.opts).await?;
        let driver = RawDriver::new(storage, self.opts.writable)?;
        Ok(Image::from_driver(Arc::new(driver), None))
    }
}

/// Creates a raw image (`qemu-img create -f raw`).
#[derive(Clone, Copy, Debug)]
pub struct RawCreate {
    size: u64,
    prealloc: PreallocMode,
}

impl RawCreate {
    /// An image of `size` bytes, sparse unless told otherwise.
    pub fn new(size: u64) -> Self {
        RawCreate {
            size,
            prealloc: PreallocMode::Off,
        }
    }

    /// How to allocate the space (`preallocation=`).
    pub fn preallocation(mut self, prealloc: PreallocMode) -> Self {
        self.prealloc = prealloc;
        self
    }

    /// Creates (or truncates) the file at `path`.
    pub async fn create(self, path: impl Into<PathBuf>) -> Result<()> {
        let path = path.into();
        let storage = FileStorageOpen::new(&path).create(true).open().await?;
        self.create_on(&storage)
            .await
            .map_err(|e| e.with_operation("create").with_path(&path))
    }

    /// Writes a new image over `storage`, discarding what it held.
    pub async fn create_on(self, storage: &dyn Storage) -> Result<()> {
        storage.resize(0, PreallocMode::Off).await?;
        storage.resize(self.size, self.prealloc).await?;
        storage.flush().await
    }
}
