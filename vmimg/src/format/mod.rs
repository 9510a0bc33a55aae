//! The driver contract: what a format implements, and what it is given (the chain below it,
//! the implicit-open policy, QEMU's probe).
//!
//! ```text
//!   Image (crate::image: splitting, backing fall-through, alignment, concurrency)
//!     |-- layer 0: dyn FormatDriver  (the image opened)   --> dyn Storage
//!     |-- layer 1: dyn FormatDriver  (its backing file)    --> dyn Storage
//!     '-- ...
//! ```
//!
//! A driver answers "where does guest range X live?" with a [`Mapping`]; the image handle
//! reads and writes the data itself, outside any driver lock.

mod chain;
mod check;
mod image_format;
mod info;
mod options;
mod policy;
mod probe;
mod table_cache;

pub use chain::ChainView;
pub(crate) use chain::{bad_mapping, read_chain, take_front, total};
pub use check::{CheckReport, Repair};
pub use image_format::{
    BackingName, FileOpen, Format, ImageFormat, LayerOpen, Measure, MeasureSource, OpenedLayer,
    ProbeFn,
};
pub use info::{FormatSpecific, InfoValue};
pub use options::{
    options_help, parse_option_list, parse_size, FormatOptions, OptionKind, OptionSpec, OptionValue,
};
pub use policy::{ImplicitOpenKind, ImplicitOpenPolicy, ImplicitOpenRequest, PolicyDecision};
pub(crate) use probe::CLOOP_MAGIC;
pub use probe::PROBE_BYTES;
pub(crate) use probe::{best, foreign_names, foreign_scores, probe_buffer, vmdk_text};
pub(crate) use table_cache::TableCache;

use crate::storage::{BoxFuture, PreallocMode, Storage};
use crate::{Error, ErrorKind, Result};
use std::fmt;

/// Where a guest range lives at one layer of the chain.
#[derive(Clone, Copy, Debug)]
pub enum MapKind<'a> {
    /// Stored verbatim at `offset` in `storage`.
    Data {
        /// The storage holding the bytes.
        storage: &'a dyn Storage,
        /// Host offset of the first byte.
        offset: u64,
    },
    /// Reads as zeros at this layer: a zero cluster, or a hole in a raw file. `offset` is
    /// the host offset still assigned to the range, if any (a preallocated zero cluster, the
    /// hole's own offset in a raw file).
    Zero {
        /// Host offset assigned to the range, if any.
        offset: Option<u64>,
    },
    /// Allocated at `offset` in `storage`, but the host range is a hole, so it reads as zeros
    /// (only reported by [`MapQuery::Status`] queries).
    DataZero {
        /// The storage holding the range.
        storage: &'a dyn Storage,
        /// Host offset of the first byte.
        offset: u64,
    },
    /// Not allocated at this layer: reads fall through to the backing image, or are zeros
    /// without one.
    Unallocated,
    /// Compressed; decoded by [`FormatDriver::read_compressed`] with this driver-specific
    /// descriptor.
    Compressed(u64),
}

/// The answer of [`FormatDriver::map`]: a prefix of the asked range, and where it lives.
#[derive(Clone, Copy, Debug)]
pub struct Mapping<'a> {
    /// Length of the prefix described (at least 1 byte, at most the length asked).
    pub len: u64,
    /// Where it lives.
    pub kind: MapKind<'a>,
}

/// How precise a mapping query must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapQuery {
    /// For reading: holes may be reported as data (a read of a hole returns zeros anyway),
    /// which spares a system call per request.
    Read,
    /// For status queries (`map`, `convert`): report zero ranges as [`MapKind::Zero`] or
    /// [`MapKind::DataZero`] wherever the driver can tell.
    Status,
}

/// The three meanings of discard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscardMode {
    /// Afterwards the range reads as zeros.
    ReadsZero,
    /// Afterwards the range may read as anything (the cheapest; space may be released).
    ReadsAnything,
    /// Afterwards the range reads from the backing image (zeros without one).
    ReadsBacking,
}

/// Called after the data of a [`WriteTarget`] was written, to publish the new mapping.
pub type WriteCommit<'a> = Box<dyn FnOnce() -> BoxFuture<'a, Result<()>> + Send + 'a>;

/// Where the bytes of a guest range are to be written (see [`FormatDriver::map_for_write`]).
pub struct WriteTarget<'a> {
    /// Length of the prefix described.
    pub len: u64,
    /// The storage to write to.
    pub storage: &'a dyn Storage,
    /// Host offset of the first byte.
    pub offset: u64,
    /// For newly allocated ranges: run once the data is written (the mapping must not
    /// expose the range before its data is in place). The driver may hold its metadata lock
    /// until then, so the caller writes and commits before asking for the next target.
    /// Dropping it without calling it abandons the allocation (at worst leaking clusters).
    pub commit: Option<WriteCommit<'a>>,
    /// Kept alive while the data is written, then dropped (drivers use it to know which
    /// writes are in flight). Like `commit`, the caller finishes such a write before asking
    /// for the next target.
    pub hold: Option<Box<dyn Send + 'a>>,
}

impl std::fmt::Debug for WriteTarget<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTarget")
            .field("len", &self.len)
            .field("offset", &self.offset)
            .field("commit", &self.commit.is_some())
            .finish()
    }
}

/// An internal snapshot, as `info` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique ID.
    pub id: String,
    /// Name (tag).
    pub name: String,
    /// Size of the saved VM state in bytes.
    pub vm_state_size: u64,
    /// Seconds since the Epoch when taken.
    pub date_sec: u32,
    /// Nanoseconds part of that time.
    pub date_nsec: u32,
    /// Guest run time in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Record/replay instruction count, if recorded.
    pub icount: Option<i64>,
}

/// A persistent dirty bitmap, as `info` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// Bytes of guest data one bit covers.
    pub granularity: u64,
    /// Flags as qemu-img names them (`in-use`, `auto`).
    pub flags: Vec<&'static str>,
}

/// Facts about an open image for `info`.
#[derive(Clone, Debug, Default)]
pub struct ImageDescription {
    /// File name of the image, as opened.
    pub filename: Option<String>,
    /// Bytes the image occupies on its medium.
    pub actual_size: Option<u64>,
    /// The backing file name as stored in the image.
    pub backing_filename: Option<String>,
    /// The backing file name resolved against the image's location.
    pub full_backing_filename: Option<String>,
    /// The backing file format as stored in the image.
    pub backing_format: Option<String>,
    /// Whether the image is marked dirty.
    pub dirty: bool,
    /// Cluster size, for formats that have clusters.
    pub cluster_size: Option<u64>,
    /// Internal snapshots.
    pub snapshots: Vec<SnapshotInfo>,
    /// Persistent dirty bitmaps QEMU would use.
    pub bitmaps: Vec<BitmapInfo>,
    /// Format-specific facts (qemu-img's "Format specific information").
    pub format_specific: Option<FormatSpecific>,
    /// Files of the image other than its own (a VMDK's extents), as qemu-img's child
    /// nodes.
    pub children: Vec<ChildFile>,
    /// QEMU's driver for the format answers no driver info (Parallels, DMG, Bochs,
    /// cloop): qemu-img then shows no cluster size and no dirty flag.
    pub no_driver_info: bool,
}

/// A file an image is made of besides its own, as `info` lists it.
#[derive(Clone, Debug)]
pub struct ChildFile {
    /// qemu-img's node name (`extents.0`).
    pub name: String,
    /// The file.
    pub storage: std::sync::Arc<dyn Storage>,
}

/// A format driver: maps guest ranges of one image layer and changes its metadata.
///
/// Contract: callers (the [`Image`](crate::Image)) only ask about ranges inside `[0, size())`, with
/// non-zero lengths; writes only come while [`FormatDriver::is_writable`] is true.
pub trait FormatDriver: Send + Sync + fmt::Debug + 'static {
    /// The format.
    fn format(&self) -> Format;

    /// The virtual (guest) size in bytes.
    fn size(&self) -> u64;

    /// Whether the layer accepts writes.
    fn is_writable(&self) -> bool;

    /// The main storage (the image file itself).
    fn storage(&self) -> &dyn Storage;

    /// Guest request alignment this layer needs for writes (1: none).
    fn request_align(&self) -> usize {
        self.storage().request_align()
    }

    /// Refuses a write this layer must not take, before anything of it is written: called
    /// with the data of every write (aligned to [`FormatDriver::request_align`]). The
    /// default takes everything; a probed raw image refuses to change its probe.
    fn check_write(&self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        let _ = (offset, bufs);
        Ok(())
    }

    /// Describes the longest prefix of `[offset, offset + len)` that lives in one place.
    fn map(&self, offset: u64, len: u64, query: MapQuery) -> BoxFuture<'_, Result<Mapping<'_>>>;

    /// Decodes the compressed cluster described by `descriptor` (from
    /// [`MapKind::Compressed`]) and fills `buf` with its bytes from guest offset
    /// `guest_offset` on (`buf` does not cross the cluster).
    fn read_compressed<'a>(
        &'a self,
        _descriptor: u64,
        _guest_offset: u64,
        _buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async {
            Err(Error::new(
                ErrorKind::Unsupported,
                "this format has no compressed clusters",
            ))
        })
    }

    /// Makes a prefix of `[offset, offset + len)` writable (allocating, copying on write from
    /// `below` where a partial cluster needs it) and says where its bytes go.
    fn map_for_write<'a>(
        &'a self,
        offset: u64,
        len: u64,
        below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<WriteTarget<'a>>>;

    /// Stores one whole cluster at cluster-aligned `offset` compressed (the last cluster of
    /// the image may be shorter: it is padded with zeros). Data that does not shrink is
    /// stored uncompressed. Formats without compression refuse with
    /// [`ErrorKind::Unsupported`].
    fn write_compressed<'a>(
        &'a self,
        _offset: u64,
        _buf: &'a [u8],
        _below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async {
            Err(Error::new(
                ErrorKind::Unsupported,
                "Compression not supported for this file format",
            ))
        })
    }

    /// Changes the backing file name (and format) recorded in the image, or removes it with
    /// `None`. Only the header changes: see `rebase` for keeping the content.
    fn set_backing<'a>(
        &'a self,
        _name: Option<&'a str>,
        _format: Option<&'a str>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async {
            Err(Error::new(
                ErrorKind::Unsupported,
                "this format has no backing file",
            ))
        })
    }

    /// Changes options of the open image (`qemu-img amend`): `options` were checked
    /// against the format's [`ImageFormat::amend_options`]. The image is flushed and must
    /// be reopened to be written with the new options.
    fn amend<'a>(
        &'a self,
        options: &'a FormatOptions,
        below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        let _ = (options, below);
        let name = self.format().name();
        Box::pin(async move {
            Err(Error::new(
                ErrorKind::Unsupported,
                format!("Format driver '{name}' does not support option amendment"),
            ))
        })
    }

    /// An identity an overlay records of its backing file, to check that the file found is
    /// its parent (a VHD's UUID). `None` by default.
    fn unique_id(&self) -> Option<Vec<u8>> {
        None
    }

    /// Whether the layer reports no allocation status, as QEMU's drivers without block
    /// status (DMG): `map` then shows the whole disk as data, at no host offset.
    fn status_unknown(&self) -> bool {
        false
    }

    /// Whether every write must go through [`FormatDriver::write_compressed`] (a
    /// stream-optimized VMDK): copies then write whole clusters compressed.
    fn needs_compressed_writes(&self) -> bool {
        false
    }

    /// Checks a format checked through its open image (VMDK, whose extents the image
    /// names), with qemu-img check's counts; `repair` as asked. Formats checked from their
    /// file alone ([`ImageFormat::check`]) and formats without a check say
    /// [`ErrorKind::Unsupported`].
    fn check(&self, repair: Repair) -> BoxFuture<'_, Result<CheckReport>> {
        let _ = repair;
        Box::pin(async {
            Err(Error::new(
                ErrorKind::Unsupported,
                "This image format does not support checks",
            ))
        })
    }

    /// The driver as `Any`, for tests and diagnostics; format-specific operations are
    /// methods of this trait, not downcasts.
    fn as_any(&self) -> &dyn std::any::Any;

    /// The unit of compressed writes and of allocation, for formats that have one.
    fn cluster_size(&self) -> Option<u64> {
        None
    }

    /// The unit of allocation within a cluster (a qcow2 subcluster with extended L2
    /// entries); the cluster size elsewhere.
    fn subcluster_size(&self) -> Option<u64> {
        self.cluster_size()
    }

    /// Makes the range read as zeros at this layer (not falling through to `below`).
    /// `may_unmap` allows releasing the space.
    fn write_zeroes<'a>(
        &'a self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>>;

    /// Discards the range with the given meaning.
    fn discard<'a>(
        &'a self,
        offset: u64,
        len: u64,
        mode: DiscardMode,
        below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>>;

    /// Changes the virtual size. Space that becomes visible reads as zeros (not as stale
    /// data, nor as the backing file's data); growing uses `prealloc` for the new space.
    fn resize<'a>(
        &'a self,
        new_size: u64,
        prealloc: PreallocMode,
        below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>>;

    /// Writes cached metadata to storage and flushes the storage.
    fn flush(&self) -> BoxFuture<'_, Result<()>>;

    /// [`FormatDriver::flush`], then makes everything durable.
    fn sync(&self) -> BoxFuture<'_, Result<()>>;

    /// Re-reads what another process may have changed in this layer (its metadata, its
    /// size), dropping cached copies; a writable layer flushes its own changes first.
    fn invalidate_cache(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Facts for `info`.
    fn describe(&self) -> ImageDescription {
        let storage = self.storage();
        ImageDescription {
            filename: storage.path().map(|p| p.display().to_string()),
            actual_size: storage.allocated_size(),
            ..ImageDescription::default()
        }
    }
}

/// Fills `buf` with random bytes for identifiers (image UUIDs, content IDs): from
/// `/dev/urandom`, or from the clock where it cannot be read.
pub(crate) fn random_bytes(buf: &mut [u8]) {
    use std::io::Read;
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf));
    if random.is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
            .to_le_bytes();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = t[i % t.len()] ^ (i as u8).wrapping_mul(151);
        }
    }
}

/// Writes `buf` at guest `offset` of `layer` through its own write path (targets, then
/// commits), for drivers that write through themselves (zero fills, copies from below).
pub(crate) async fn write_through(
    layer: &dyn FormatDriver,
    offset: u64,
    buf: &[u8],
    below: ChainView<'_>,
) -> Result<()> {
    use crate::storage::StorageExt;
    let mut done = 0usize;
    while done < buf.len() {
        let t = layer
            .map_for_write(offset + done as u64, (buf.len() - done) as u64, below)
            .await?;
        let n = t.len as usize;
        t.storage.debug_event("write_aio");
        t.storage.write_at(t.offset, &buf[done..done + n]).await?;
        drop(t.hold);
        if let Some(c) = t.commit {
            c().await?;
        }
        done += n;
    }
    Ok(())
}

/// The answer of a read-only format's write operations.
pub(crate) fn read_only<'a, T: Send + 'a>() -> BoxFuture<'a, Result<T>> {
    Box::pin(async { Err(Error::new(ErrorKind::ReadOnly, "image is opened read-only")) })
}
