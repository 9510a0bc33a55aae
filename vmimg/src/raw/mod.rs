//! The raw format: guest offset N is byte N of the storage.

use crate::format::{
    ChainView, DiscardMode, Format, FormatDriver, FormatOptions, ImageFormat, LayerOpen, MapKind,
    MapQuery, Mapping, Measure, MeasureSource, OpenedLayer, OptionKind, OptionSpec, ProbeFn,
    WriteTarget, PROBE_BYTES,
};
use crate::storage::{
    BoxFuture, FileStorageOpen, HostExtent, NewFile, Permissions, PreallocMode, Storage, StorageExt,
};
use crate::{Error, ErrorKind, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Raw images are sized in whole 512-byte sectors, as in QEMU: a file whose length is not a
/// multiple reads as zeros up to the next sector boundary.
const SECTOR: u64 = 512;

fn round_to_sector(size: u64) -> u64 {
    size.div_ceil(SECTOR).saturating_mul(SECTOR)
}

/// The raw format's entry points.
#[derive(Debug)]
pub struct RawFormat;

/// The raw format.
pub const RAW: Format = Format::new(&RawFormat);

impl ImageFormat for RawFormat {
    fn name(&self) -> &'static str {
        "raw"
    }

    /// Raw matches anything, with the lowest score (QEMU's `raw_probe`).
    fn probe(&self, _first: &[u8], _filename: Option<&str>, _file_size: u64) -> u32 {
        1
    }

    fn owns_metadata(&self) -> bool {
        false
    }

    fn create_options(&self) -> &'static [OptionSpec] {
        &[
            OptionSpec {
                name: "size",
                kind: OptionKind::Size,
                help: "Virtual disk size",
            },
            OptionSpec {
                name: "preallocation",
                kind: OptionKind::Str,
                help: "Preallocation mode (allowed values: off, falloc, full)",
            },
        ]
    }

    fn create_summary(&self, options: &FormatOptions) -> String {
        let mut s = format!("size={}", options.size("size").unwrap_or(0));
        if let Some(p) = options.str("preallocation") {
            s += &format!(" preallocation={p}");
        }
        s
    }

    fn create<'a>(
        &'a self,
        path: &'a std::path::Path,
        options: &'a FormatOptions,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { RawCreate::from_options(options)?.create(path).await })
    }

    fn measure(&self, _options: &FormatOptions, source: &MeasureSource) -> Result<Measure> {
        let size = round_to_sector(source.size);
        Ok(Measure {
            required: size,
            fully_allocated: size,
            bitmaps: None,
        })
    }

    fn open<'a>(&'a self, layer: LayerOpen<'a>) -> BoxFuture<'a, Result<OpenedLayer>> {
        Box::pin(async move {
            if layer.data_file.is_some() {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "raw images cannot have an external data file",
                ));
            }
            let driver = RawDriver::new(layer.storage, layer.writable)?
                .probed(layer.probed.then_some(layer.probe));
            Ok(OpenedLayer {
                driver: Arc::new(driver),
                backing: None,
            })
        })
    }
}

/// The raw driver. Holes in the storage are reported as zeros by status queries.
#[derive(Debug)]
pub struct RawDriver {
    storage: Arc<dyn Storage>,
    size: AtomicU64,
    writable: bool,
    /// The format was guessed, not named: block 0 is protected with this probe (see
    /// [`RawDriver::probed`]).
    probed: Option<ProbeFn>,
}

impl RawDriver {
    /// A raw layer over `storage`, writable if the storage is and `writable` is set.
    ///
    /// The virtual size is the storage size rounded up to a whole sector. A writable image on
    /// a storage that needs aligned requests (direct I/O) must have an aligned size, or its
    /// last block could not be written without growing the file: that is refused, as QEMU
    /// does.
    pub fn new(storage: Arc<dyn Storage>, writable: bool) -> Result<Self> {
        let host_size = storage.size()?;
        let align = storage.request_align() as u64;
        if writable && align > 1 && host_size % align != 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "image size {host_size} is not a multiple of the request alignment {align}: \
                     cannot write it with direct I/O"
                ),
            ));
        }
        let size = round_to_sector(host_size);
        Ok(RawDriver {
            writable: writable && storage.is_writable(),
            storage,
            size: AtomicU64::new(size),
            probed: None,
        })
    }

    /// Marks the image as probed raw (its format was guessed, not named, with `probe`), as
    /// QEMU's raw driver does: a write that would make block 0 probe as another format is
    /// refused with [`ErrorKind::PermissionDenied`] (EPERM), so that a guest cannot turn its
    /// disk into, say, a qcow2 image naming a host file as its backing file. Writes then go
    /// in whole 512-byte sectors (read-modify-write), so the check sees the whole new
    /// sector.
    pub fn probed(mut self, probe: Option<ProbeFn>) -> Self {
        self.probed = probe;
        self
    }
}

impl FormatDriver for RawDriver {
    fn format(&self) -> Format {
        RAW
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

    fn request_align(&self) -> usize {
        let align = self.storage.request_align();
        if self.probed.is_some() {
            align.max(SECTOR as usize)
        } else {
            align
        }
    }

    fn check_write(&self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        let Some(probe) = self.probed else {
            return Ok(());
        };
        if offset >= PROBE_BYTES as u64 {
            return Ok(());
        }
        // Writes come in whole sectors here (request_align), so the first one is the new
        // block 0 whole.
        let mut first = Vec::with_capacity(PROBE_BYTES);
        for b in bufs {
            let n = (PROBE_BYTES - first.len()).min(b.len());
            first.extend_from_slice(&b[..n]);
        }
        match probe(&first, None) {
            "raw" => Ok(()),
            other => Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "Operation not permitted: the image's format was probed (raw), and this \
                     write would make block 0 probe as {other}; name the format (-f raw) to \
                     allow it"
                ),
            )),
        }
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
                    kind: MapKind::Zero {
                        offset: Some(offset),
                    },
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
                commit: None,
                hold: None,
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

    fn resize<'a>(
        &'a self,
        new_size: u64,
        prealloc: PreallocMode,
        _below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            // Resizing needs the resize permission (QEMU's raw images share it otherwise):
            // taken for the operation, refused if another user does not share it.
            let (perm, shared) = self.storage.permissions();
            let raise = !perm.contains(Permissions::RESIZE);
            if raise {
                self.storage
                    .set_permissions(perm | Permissions::RESIZE, shared)?;
            }
            let r = self.storage.resize(new_size, prealloc).await;
            if raise {
                // Dropping a permission cannot conflict with anyone.
                let _ = self.storage.set_permissions(perm, shared);
            }
            r?;
            self.size
                .store(round_to_sector(new_size), Ordering::Release);
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        self.storage.flush()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn sync(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.storage.flush().await?;
            self.storage.sync().await
        })
    }

    fn invalidate_cache(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.size
                .store(round_to_sector(self.storage.size()?), Ordering::Release);
            Ok(())
        })
    }
}

/// Creates a raw image (`qemu-img create -f raw`).
#[derive(Clone, Copy, Debug)]
pub struct RawCreate {
    size: u64,
    prealloc: PreallocMode,
}

impl RawCreate {
    /// An image of `size` bytes rounded up to a whole 512-byte sector (as qemu-img does),
    /// sparse unless told otherwise.
    pub fn new(size: u64) -> Self {
        RawCreate {
            size: round_to_sector(size),
            prealloc: PreallocMode::Off,
        }
    }

    /// A creation from checked options (`size`, `preallocation`).
    pub fn from_options(options: &FormatOptions) -> Result<Self> {
        let size = options.size("size").ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidArgument,
                "Image creation needs a size parameter",
            )
        })?;
        let prealloc = match options.str("preallocation") {
            None => PreallocMode::Off,
            Some(v) => match PreallocMode::parse(v) {
                Some(PreallocMode::Metadata) | None => {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        format!("invalid parameter value: {v}"),
                    ))
                }
                Some(p) => p,
            },
        };
        Ok(RawCreate::new(size).preallocation(prealloc))
    }

    /// How to allocate the space (`preallocation=`).
    pub fn preallocation(mut self, prealloc: PreallocMode) -> Self {
        self.prealloc = prealloc;
        self
    }

    /// The size the image will have.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Creates (or truncates) the file at `path`. Nothing is created for a size no file can
    /// have; a create that fails halfway (a full disk) removes the file it made.
    pub async fn create(self, path: impl Into<PathBuf>) -> Result<()> {
        let path = path.into();
        self.validate()?;
        let new = NewFile::new(&path);
        let storage = new.finish(FileStorageOpen::new(&path).create(true).open().await)?;
        let result = self
            .create_on(&storage)
            .await
            .map_err(|e| e.with_operation("create").with_path(&path));
        drop(storage);
        new.finish(result)
    }

    fn validate(&self) -> Result<()> {
        if self.size > i64::MAX as u64 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "Invalid image size specified. Must be between 0 and {}.",
                    i64::MAX
                ),
            ));
        }
        Ok(())
    }

    /// Writes a new image over `storage`, discarding what it held.
    pub async fn create_on(self, storage: &dyn Storage) -> Result<()> {
        self.validate()?;
        if storage.is_block_device() {
            // A device keeps its size and content; the image must fit.
            let have = storage.size()?;
            if self.size > have {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    format!(
                        "the image size {} is larger than the device ({have} bytes)",
                        self.size
                    ),
                ));
            }
            return storage.flush().await;
        }
        storage.resize(0, PreallocMode::Off).await?;
        storage.resize(self.size, self.prealloc).await?;
        if self.prealloc == PreallocMode::Off && self.size > 0 {
            // As QEMU's file driver: the first block of a new file is written (with zeros),
            // so that its allocation is what probes of the file's alignment find; the rest
            // stays a hole.
            let n = if self.size < 4096 { 512 } else { 4096 }.min(self.size);
            storage.write_at(0, &vec![0u8; n as usize]).await?;
        }
        storage.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MemoryStorage, StorageExt};
    use crate::RawOpen;

    #[tokio::test]
    async fn create_rounds_size_up_to_a_sector_like_qemu_img() {
        let s = MemoryStorage::new();
        RawCreate::new(1000).create_on(&s).await.unwrap();
        assert_eq!(s.size().unwrap(), 1024);
        assert_eq!(RawCreate::new(0).size(), 0);
    }

    #[tokio::test]
    async fn odd_sized_file_has_a_sector_rounded_virtual_size_reading_zeros() {
        let s: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(&[7u8; 1000]));
        let img = RawOpen::storage(s).open().await.unwrap();
        assert_eq!(img.size(), 1024);
        let mut buf = [1u8; 24];
        img.read(1000, &mut buf).await.unwrap();
        assert_eq!(buf, [0u8; 24]);
    }

    #[tokio::test]
    async fn writable_direct_open_of_unaligned_file_is_refused_like_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("odd.raw");
        std::fs::write(&p, [3u8; 1000]).unwrap();
        let direct = match FileStorageOpen::new(&p)
            .writable(true)
            .direct(true)
            .open()
            .await
        {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                panic!("the temp dir does not support O_DIRECT: {e}")
            }
            Err(e) => panic!("{e}"),
        };
        let err = RawDriver::new(Arc::new(direct), true).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.to_string().contains("not a multiple"), "{err}");
        // Read-only direct opens are fine: reads bounce through aligned buffers.
        let img = RawOpen::path(&p).direct(true).open().await.unwrap();
        let mut buf = [9u8; 124];
        img.read(900, &mut buf).await.unwrap();
        assert_eq!(buf[..100], [3u8; 100]);
        assert_eq!(buf[100..], [0u8; 24]);
        let mut block = [9u8; 512];
        img.driver()
            .storage()
            .read_at(512, &mut block)
            .await
            .unwrap();
        assert_eq!(block[..488], [3u8; 488]);
        assert_eq!(block[488..], [0u8; 24]);
    }
}
