//! A format's entry points ([`ImageFormat`]) and the [`Format`] handle that names one.
//!
//! ```text
//!   registry (crate::image): [&RAW, &QCOW2, ...]   -- the one list of formats
//!        |
//!   Format(&'static dyn ImageFormat) -- name, probe, open one layer, create, measure, check
//!        |  open(LayerOpen) -> OpenedLayer { driver, backing name }
//!   dyn FormatDriver                  -- the open layer: mappings, writes, metadata
//! ```
//!
//! The access layer opens a chain by asking each layer's format to open it and to say what
//! comes below it (a backing file name, with its format if the image records one); files a
//! format names itself (data files, extents) go through the layer's implicit-open policy.

use super::{
    CheckReport, FormatDriver, FormatOptions, ImplicitOpenKind, ImplicitOpenPolicy,
    ImplicitOpenRequest, OptionSpec, Repair,
};
use crate::storage::{BoxFuture, LockMode, Permissions, Storage};
use crate::{Error, ErrorKind, Result};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// A disk-image format: how to recognise, open and create its images. One value per
/// format, listed once in the registry; code outside the format's folder reaches it through
/// [`Format`] only.
pub trait ImageFormat: Send + Sync + 'static {
    /// qemu-img's name (`raw`, `qcow2`, ...).
    fn name(&self) -> &'static str;

    /// QEMU's probe score for an image whose first bytes are `first` (512 bytes, zeros past
    /// the end of a shorter file), whose file is `filename` and `file_size` bytes long: 0
    /// for "not this format", 100 for a magic number, 1 for raw.
    fn probe(&self, first: &[u8], filename: Option<&str>, file_size: u64) -> u32;

    /// Whether the format keeps metadata in the image file: then no other user may write
    /// or resize it while it is open (QEMU's locks), readers included.
    fn owns_metadata(&self) -> bool;

    /// Whether an image of this format can have a backing file.
    fn has_backing(&self) -> bool {
        false
    }

    /// Whether its driver stores clusters compressed ([`FormatDriver::write_compressed`]).
    fn compressed_writes(&self) -> bool {
        false
    }

    /// Whether its images can keep persistent dirty bitmaps.
    fn persistent_bitmaps(&self) -> bool {
        false
    }

    /// Opens one layer of a chain over `layer.storage`.
    fn open<'a>(&'a self, layer: LayerOpen<'a>) -> BoxFuture<'a, Result<OpenedLayer>>;

    /// The options [`ImageFormat::create`] takes (`-o help` lists them); `size` among them.
    fn create_options(&self) -> &'static [OptionSpec] {
        &[]
    }

    /// qemu-img's "Formatting" line after `fmt=NAME`: the options as the format will use
    /// them, defaults included.
    fn create_summary(&self, options: &FormatOptions) -> String {
        let _ = options;
        String::new()
    }

    /// Creates an image at `path` with checked `options` (files the image names, such as a
    /// data file, are created beside it). Nothing is created when an option is invalid.
    fn create<'a>(
        &'a self,
        path: &'a Path,
        options: &'a FormatOptions,
    ) -> BoxFuture<'a, Result<()>> {
        let _ = (path, options);
        let name = self.name();
        Box::pin(async move {
            Err(Error::new(
                ErrorKind::Unsupported,
                format!("Format driver '{name}' does not support image creation"),
            ))
        })
    }

    /// The options an open image of this format can change (`amend`), a subset of
    /// [`ImageFormat::create_options`].
    fn amend_options(&self) -> &'static [&'static str] {
        &[]
    }

    /// The file size an image of this format needs (`qemu-img measure`): for a new image
    /// of `source.size` bytes holding `source.data` bytes of data.
    fn measure(&self, options: &FormatOptions, source: &MeasureSource) -> Result<Measure> {
        let _ = (options, source);
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "Block driver '{}' does not support size measurement",
                self.name()
            ),
        ))
    }

    /// The unit in which [`ImageFormat::measure`] counts the source's data: the output's
    /// allocation unit (a cluster), so that data is counted in whole units, each once.
    fn measure_unit(&self, options: &FormatOptions) -> Result<u64> {
        let _ = options;
        Ok(512)
    }

    /// Checks the consistency of an image (and repairs it as `repair` allows), with
    /// qemu-img check's counts. Formats without a check say so.
    fn check<'a>(
        &'a self,
        file: &'a dyn Storage,
        repair: Repair,
    ) -> BoxFuture<'a, Result<CheckReport>> {
        let _ = (file, repair);
        Box::pin(async {
            Err(Error::new(
                ErrorKind::Unsupported,
                "This image format does not support checks",
            ))
        })
    }
}

/// What `measure` knows of the image to be converted (or of a new empty one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeasureSource {
    /// Virtual size.
    pub size: u64,
    /// Bytes of data to copy, counted in whole [`ImageFormat::measure_unit`]s.
    pub data: u64,
    /// The source's persistent bitmaps, granularity and name of each (`None`: its format
    /// has none).
    pub bitmaps: Option<Vec<(u64, String)>>,
}

/// The answer of `measure`, in qemu-img's terms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Measure {
    /// Bytes the output needs with its data.
    pub required: u64,
    /// Bytes the output needs fully allocated.
    pub fully_allocated: u64,
    /// Bytes the source's bitmaps would take, for formats that keep them.
    pub bitmaps: Option<u64>,
}

/// QEMU's probe over every format: the format name for a first sector and a file name.
pub type ProbeFn = fn(&[u8], Option<&str>) -> &'static str;

/// What a format is given to open one layer.
#[derive(Clone, Debug)]
pub struct LayerOpen<'a> {
    /// The image file (or storage).
    pub storage: Arc<dyn Storage>,
    /// Whether this is the image the user opened (not a backing file).
    pub top: bool,
    /// Open for writing.
    pub writable: bool,
    /// The format was probed, not named.
    pub probed: bool,
    /// The probe over every format (a probed raw image uses it to guard block 0).
    pub probe: ProbeFn,
    /// What the user of this layer holds and shares on its files (for files the format
    /// opens itself, such as data files).
    pub permissions: (Permissions, Permissions),
    /// Memory for cached metadata tables of the layer, in bytes.
    pub cache_bytes: u64,
    /// Open this internal snapshot (ID or name) read-only instead of the active state.
    pub snapshot: Option<&'a str>,
    /// An external data file given by the caller, overriding what the image names.
    pub data_file: Option<Arc<dyn Storage>>,
    /// How files the format names are opened.
    pub files: FileOpen<'a>,
}

/// How a format opens the files its image names: through the policy, with the caller's
/// file options.
#[derive(Clone, Copy, Debug)]
pub struct FileOpen<'a> {
    /// The implicit-open policy.
    pub policy: &'a ImplicitOpenPolicy,
    /// Direct I/O.
    pub direct: bool,
    /// Syncs ignored (`cache=unsafe`).
    pub no_sync: bool,
    /// File I/O on the calling thread.
    pub inline_io: bool,
    /// Locking of the files opened.
    pub locking: LockMode,
}

impl FileOpen<'_> {
    /// Opens the file `name` (as stored in the image named `named_by`, resolved against
    /// `resolved`) through the policy.
    pub async fn open(
        &self,
        kind: ImplicitOpenKind,
        name: &str,
        resolved: &Path,
        named_by: Option<&Path>,
        writable: bool,
    ) -> Result<Arc<dyn Storage>> {
        let req = ImplicitOpenRequest {
            kind,
            name,
            path: resolved,
            named_by,
            writable,
            direct: self.direct,
            no_sync: self.no_sync,
            inline_io: self.inline_io,
            locking: self.locking,
        };
        self.policy.open(&req).await
    }
}

/// What a format returns for an opened layer.
pub struct OpenedLayer {
    /// The layer.
    pub driver: Arc<dyn FormatDriver>,
    /// The backing file the image names, if any (opened by the caller through the policy,
    /// unless the caller gave a backing image or asked for none).
    pub backing: Option<BackingName>,
}

/// A backing file as an image names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingName {
    /// The name as stored.
    pub name: String,
    /// Its format, if the image records one (probed otherwise).
    pub format: Option<String>,
    /// The identity the backing image must have ([`FormatDriver::unique_id`]), if the
    /// image records one (a VHD parent's UUID): another file is refused.
    pub expected_id: Option<Vec<u8>>,
}

/// A disk-image format, by name: a handle on its [`ImageFormat`] entry points.
///
/// Two values are equal when they name the same format.
#[derive(Clone, Copy)]
pub struct Format(&'static dyn ImageFormat);

impl Format {
    /// A handle on `format`'s entry points.
    pub const fn new(format: &'static dyn ImageFormat) -> Self {
        Format(format)
    }

    /// qemu-img's name for the format.
    pub fn name(self) -> &'static str {
        self.0.name()
    }

    /// The format's entry points.
    pub fn entry(self) -> &'static dyn ImageFormat {
        self.0
    }

    /// What a user of an image of this format holds on the image file and what it lets
    /// others do meanwhile (the permissions behind QEMU's image locks, see
    /// [`Permissions`]), for a user that opens it `writable` and would share `shared`.
    ///
    /// Formats that keep metadata in the file (qcow2) never share writing or resizing:
    /// another writer would corrupt it, and a reader would see it change underfoot. With
    /// `force_share` (QEMU's `-U`, for read-only users only: refused with `writable`)
    /// everything is shared.
    pub fn permissions(
        self,
        writable: bool,
        shared: Permissions,
        force_share: bool,
    ) -> Result<(Permissions, Permissions)> {
        if force_share && writable {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "force-share=on can only be used with read-only images",
            ));
        }
        let mut perm = Permissions::CONSISTENT_READ;
        if writable {
            perm = perm | Permissions::WRITE;
        }
        if force_share {
            return Ok((perm, Permissions::ALL));
        }
        if !self.0.owns_metadata() {
            return Ok((perm, shared));
        }
        if writable {
            perm = perm | Permissions::RESIZE;
        }
        Ok((
            perm,
            shared.without(Permissions::WRITE | Permissions::RESIZE),
        ))
    }
}

impl PartialEq for Format {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Format {}

impl std::hash::Hash for Format {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name().hash(state);
    }
}

impl fmt::Debug for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Format({})", self.name())
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
