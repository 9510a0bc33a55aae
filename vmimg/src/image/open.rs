//! Open builders shared by every format, and the format-dispatching [`ImageOpen`].

use super::{probe_bytes, Image};
use crate::format::{
    FileOpen, Format, FormatDriver, ImplicitOpenKind, ImplicitOpenPolicy, LayerOpen,
};
use crate::storage::{AlignedStorage, FileStorageOpen, LockMode, Permissions, Storage};
use crate::{Error, ErrorKind, Result};
use std::path::PathBuf;
use std::sync::Arc;

/// Default memory for the cached metadata tables of each layer (qcow2's L2 tables): 32 MiB,
/// QEMU's default maximum on Linux.
pub const DEFAULT_CACHE_BYTES: u64 = 32 << 20;

/// Default limit on the number of layers in a backing chain.
pub const DEFAULT_MAX_CHAIN_DEPTH: usize = 1024;

/// Where an image's bytes come from.
#[derive(Clone, Debug)]
pub(crate) enum Source {
    Path(PathBuf),
    Storage(Arc<dyn Storage>),
}

impl Source {
    /// Opens the source (a path becomes a [`FileStorage`](crate::storage::FileStorage)).
    pub(crate) async fn open(&self, opts: &OpenOptions) -> Result<Arc<dyn Storage>> {
        match self {
            // Format drivers read and write metadata at any offset: O_DIRECT files get
            // their requests aligned for them.
            Source::Path(p) => Ok(AlignedStorage::wrap(Arc::new(
                FileStorageOpen::new(p)
                    .writable(opts.writable)
                    .direct(opts.direct)
                    .no_sync(opts.no_sync)
                    .inline_io(opts.inline_io)
                    .locking(opts.locking)
                    .open()
                    .await?,
            ))),
            Source::Storage(s) => {
                if opts.writable && !s.is_writable() {
                    return Err(Error::new(
                        ErrorKind::ReadOnly,
                        "cannot open a read-only storage for writing",
                    )
                    .with_operation("open"));
                }
                Ok(Arc::clone(s))
            }
        }
    }
}

/// Options every format's open builder understands.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    pub(crate) writable: bool,
    pub(crate) direct: bool,
    pub(crate) no_sync: bool,
    pub(crate) inline_io: bool,
    pub(crate) policy: ImplicitOpenPolicy,
    pub(crate) backing: Option<Image>,
    pub(crate) no_backing: bool,
    pub(crate) data_file: Option<Arc<dyn Storage>>,
    pub(crate) l2_cache_bytes: u64,
    pub(crate) snapshot: Option<String>,
    pub(crate) max_chain_depth: usize,
    pub(crate) untrusted: bool,
    pub(crate) locking: LockMode,
    pub(crate) force_share: bool,
    pub(crate) share: Permissions,
    pub(crate) metadata_only: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            direct: false,
            no_sync: false,
            inline_io: false,
            policy: ImplicitOpenPolicy::default(),
            backing: None,
            no_backing: false,
            data_file: None,
            l2_cache_bytes: DEFAULT_CACHE_BYTES,
            snapshot: None,
            max_chain_depth: DEFAULT_MAX_CHAIN_DEPTH,
            untrusted: false,
            locking: LockMode::Auto,
            force_share: false,
            share: Permissions::ALL,
            metadata_only: false,
        }
    }
}

impl OpenOptions {
    /// Read-only, buffered, permissive implicit-open policy, backing as the image names it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Memory for the cached metadata tables of each layer (qcow2's L2 tables), in bytes
    /// (default 32 MiB; at least 16 tables are kept whatever the budget).
    pub fn l2_cache_size(mut self, bytes: u64) -> Self {
        self.l2_cache_bytes = bytes;
        self
    }

    /// Open an internal snapshot (by ID or name) read-only instead of the active state.
    pub fn snapshot(mut self, id_or_name: impl Into<String>) -> Self {
        self.snapshot = Some(id_or_name.into());
        self
    }

    /// Untrusted-image mode, for images from sources you do not control: no format probing
    /// (the format must be named), no file named inside the image is opened (backing and
    /// data files must be given explicitly), and a smaller metadata cache (4 MiB per layer).
    /// Files given explicitly with [`OpenOptions::backing`] or [`OpenOptions::data_file`]
    /// still work.
    pub fn untrusted(mut self, untrusted: bool) -> Self {
        self.untrusted = untrusted;
        if untrusted {
            self.policy = ImplicitOpenPolicy::deny();
            self.l2_cache_bytes = self.l2_cache_bytes.min(4 << 20);
        }
        self
    }

    /// Whether files this open creates are locked QEMU's way (default [`LockMode::Auto`]:
    /// wherever the file system supports it). Locks make QEMU's tools and vmimg exclude
    /// each other: a qcow2 image one of them writes cannot be opened by the other, and
    /// nobody writes a qcow2 image that another process reads (see [`Permissions`]).
    pub fn locking(mut self, mode: LockMode) -> Self {
        self.locking = mode;
        self
    }

    /// Share every permission with other users, whatever the format would refuse (QEMU's
    /// `-U`/`force-share`): the image can then be read while another process writes it,
    /// at the risk of reading inconsistent data. Only for read-only opens.
    pub fn force_share(mut self, force_share: bool) -> Self {
        self.force_share = force_share;
        self
    }

    /// The handle only looks at metadata (what `info` does, QEMU's `BDRV_O_NO_IO`): it holds
    /// no permission on the image file, so a process that refuses others consistent reads
    /// does not keep it out (it still refuses what its format never shares). Data read
    /// through such a handle may be changing underneath.
    pub fn metadata_only(mut self, metadata_only: bool) -> Self {
        self.metadata_only = metadata_only;
        self
    }

    /// What other users may do with the image file while this handle is open (default:
    /// everything the format allows; qcow2 never shares writing nor resizing). A copy's
    /// source would refuse writing and resizing, as `qemu-img convert` does.
    pub fn share(mut self, shared: Permissions) -> Self {
        self.share = shared;
        self
    }

    /// Refuse backing chains with more than `depth` layers (default 1024).
    pub fn max_chain_depth(mut self, depth: usize) -> Self {
        self.max_chain_depth = depth.max(1);
        self
    }

    /// Open for writing too.
    pub fn writable(mut self, writable: bool) -> Self {
        self.writable = writable;
        self
    }

    /// Bypass the host page cache (`O_DIRECT`) for files this open creates.
    pub fn direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }

    /// Ignore sync requests for files this open creates (QEMU's `cache=unsafe`, the
    /// default of `qemu-img convert` for its target): flushes still write all metadata to
    /// the kernel in order, so a killed process loses nothing, but nothing waits for the
    /// disk, and a host crash or power loss can lose or corrupt the image.
    pub fn no_sync(mut self, no_sync: bool) -> Self {
        self.no_sync = no_sync;
        self
    }

    /// Do file reads and writes on the calling thread for files this open creates (see
    /// [`FileStorageOpen::inline_io`](crate::storage::FileStorageOpen::inline_io)): faster
    /// bulk copies, at the price of stalling a runtime worker while a request waits for
    /// the disk.
    pub fn inline_io(mut self, inline_io: bool) -> Self {
        self.inline_io = inline_io;
        self
    }

    /// The policy for files named inside the image (backing file, data file).
    pub fn policy(mut self, policy: ImplicitOpenPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Do not open the backing file the image names (QEMU's `BDRV_O_NO_BACKING`, which
    /// `qemu-img info` uses): the image opens even when its backing file is missing, its
    /// description still names it, and ranges it does not allocate read as zeros. Writes
    /// that copy on write would copy those zeros too: open writable this way only to change
    /// the header (as `rebase -u` does).
    pub fn no_backing(mut self, no_backing: bool) -> Self {
        self.no_backing = no_backing;
        self
    }

    /// Use `backing` as the backing image, whatever the image names.
    pub fn backing(mut self, backing: Image) -> Self {
        self.backing = Some(backing);
        self
    }

    /// Use `data_file` as the external data file, whatever the image names.
    pub fn data_file(mut self, data_file: Arc<dyn Storage>) -> Self {
        self.data_file = Some(data_file);
        self
    }

    /// Whether images open writable.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Whether files open with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Whether sync requests are ignored.
    pub fn is_no_sync(&self) -> bool {
        self.no_sync
    }

    /// The lock mode files open with.
    pub fn lock_mode(&self) -> LockMode {
        self.locking
    }
}

/// Opens an image of a named format, or of a probed one.
///
/// ```no_run
/// # async fn f() -> vmimg::Result<()> {
/// use vmimg::{Format, ImageOpen};
/// let image = ImageOpen::path("disk.raw").format(Format::RAW).writable(true).open().await?;
/// image.write(0, b"hello").await?;
/// image.flush().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ImageOpen {
    source: Source,
    format: Option<Format>,
    opts: OpenOptions,
}

impl ImageOpen {
    /// Opens the file at `path`.
    pub fn path(path: impl Into<PathBuf>) -> Self {
        ImageOpen {
            source: Source::Path(path.into()),
            format: None,
            opts: OpenOptions::default(),
        }
    }

    /// Opens an image held in `storage`.
    pub fn storage(storage: Arc<dyn Storage>) -> Self {
        ImageOpen {
            source: Source::Storage(storage),
            format: None,
            opts: OpenOptions::default(),
        }
    }

    /// The image's format. Without it the format is probed, which is **unsafe for untrusted
    /// images** (see [`Format::probe`]).
    pub fn format(mut self, format: Format) -> Self {
        self.format = Some(format);
        self
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

    /// Ignore sync requests (see [`OpenOptions::no_sync`]).
    pub fn no_sync(mut self, no_sync: bool) -> Self {
        self.opts = self.opts.no_sync(no_sync);
        self
    }

    /// Do file I/O on the calling thread (see [`OpenOptions::inline_io`]).
    pub fn inline_io(mut self, inline_io: bool) -> Self {
        self.opts = self.opts.inline_io(inline_io);
        self
    }

    /// Replaces all options at once.
    pub fn options(mut self, opts: OpenOptions) -> Self {
        self.opts = opts;
        self
    }

    /// Share everything with other users (see [`OpenOptions::force_share`]).
    pub fn force_share(mut self, force_share: bool) -> Self {
        self.opts = self.opts.force_share(force_share);
        self
    }

    /// Lock mode for the files opened (see [`OpenOptions::locking`]).
    pub fn locking(mut self, mode: LockMode) -> Self {
        self.opts = self.opts.locking(mode);
        self
    }

    /// The policy for files named inside the image (see [`OpenOptions::policy`]).
    pub fn policy(mut self, policy: ImplicitOpenPolicy) -> Self {
        self.opts = self.opts.policy(policy);
        self
    }

    /// Open an internal snapshot read-only (see [`OpenOptions::snapshot`]).
    pub fn snapshot(mut self, id_or_name: impl Into<String>) -> Self {
        self.opts = self.opts.snapshot(id_or_name);
        self
    }

    /// Opens the image.
    pub async fn open(self) -> Result<Image> {
        let path = match &self.source {
            Source::Path(p) => Some(p.clone()),
            Source::Storage(_) => None,
        };
        let result = async {
            let storage = self.source.open(&self.opts).await?;
            open_chain(storage, self.format, &self.opts).await
        }
        .await;
        result.map_err(|e| match path {
            Some(p) => e.within("open", Some(&p)),
            None => e.with_operation("open"),
        })
    }
}

/// `e` as the error of a layer `depth` backing files down: "Could not open backing file: "
/// once per layer, as QEMU nests them.
fn nest(mut e: Error, depth: usize) -> Error {
    for _ in 0..depth {
        e = e.within("open backing file", None);
    }
    e
}

/// The file behind a storage, canonicalised, for backing-loop detection.
fn identity(storage: &dyn Storage) -> Option<PathBuf> {
    let p = storage.path()?;
    Some(std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()))
}

/// How files named inside an image are opened, from the open options.
fn files(opts: &OpenOptions) -> FileOpen<'_> {
    FileOpen {
        policy: &opts.policy,
        direct: opts.direct,
        no_sync: opts.no_sync,
        inline_io: opts.inline_io,
        locking: opts.locking,
    }
}

/// What a layer's user holds and shares: the top layer as its format and the options say,
/// backing files as QEMU's backing role (read, and nobody writes or resizes them).
fn layer_permissions(
    format: Format,
    top: bool,
    writable: bool,
    opts: &OpenOptions,
) -> Result<(Permissions, Permissions)> {
    if top {
        let (perm, shared) = format.permissions(writable, opts.share, opts.force_share)?;
        if opts.metadata_only && !writable {
            return Ok((Permissions::NONE, shared));
        }
        return Ok((perm, shared));
    }
    let shared = if opts.force_share {
        Permissions::ALL
    } else {
        Permissions::ALL.without(Permissions::WRITE | Permissions::RESIZE)
    };
    Ok((Permissions::CONSISTENT_READ, shared))
}

/// Opens `storage` as an image of `format` (probed when `None`) and, layer by layer, the
/// backing files it names, through the implicit-open policy. Iterative: chain depth costs no
/// stack. Refuses loops and chains deeper than [`OpenOptions::max_chain_depth`].
pub(crate) async fn open_chain(
    storage: Arc<dyn Storage>,
    format: Option<Format>,
    opts: &OpenOptions,
) -> Result<Image> {
    let mut layers: Vec<Arc<dyn FormatDriver>> = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    let mut current = Some((storage, format));
    // The identity the layer about to be opened must have (its overlay recorded one).
    let mut expected_id: Option<Vec<u8>> = None;
    while let Some((storage, format)) = current.take() {
        let top = layers.is_empty();
        if layers.len() >= opts.max_chain_depth {
            return Err(Error::new(
                ErrorKind::InvalidFormat,
                format!(
                    "backing chain is deeper than {} layers",
                    opts.max_chain_depth
                ),
            ));
        }
        if let Some(id) = identity(storage.as_ref()) {
            if seen.contains(&id) {
                // qemu-img's words (its info --backing-chain detects loops).
                let name = storage.path().unwrap_or(&id);
                return Err(Error::new(
                    ErrorKind::InvalidFormat,
                    format!(
                        "Backing file '{}' creates an infinite loop.",
                        name.display()
                    ),
                ));
            }
            seen.push(id);
        }
        let probed = format.is_none();
        let format = match format {
            Some(f) => f,
            None if opts.untrusted => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "untrusted images need their format named: probing is unsafe on them",
                ))
            }
            None => Format::probe(storage.as_ref()).await?,
        };
        let writable = top && opts.writable;
        // Errors of a backing layer nest as QEMU's do, once per layer above it.
        let depth = layers.len();
        let layer_err = |e: Error| nest(e, depth);
        let permissions = layer_permissions(format, top, writable, opts)?;
        storage
            .set_permissions(permissions.0, permissions.1)
            .map_err(layer_err)?;
        let entry = format.entry();
        if top && opts.backing.is_some() && !entry.has_backing() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{format} images cannot have a backing file"),
            ));
        }
        let opened = entry
            .open(LayerOpen {
                storage: Arc::clone(&storage),
                top,
                writable,
                probed,
                probe: probe_bytes,
                permissions,
                cache_bytes: opts.l2_cache_bytes,
                snapshot: if top { opts.snapshot.as_deref() } else { None },
                data_file: if top { opts.data_file.clone() } else { None },
                files: files(opts),
            })
            .await
            .map_err(layer_err)?;
        if let (true, Some(b)) = (top, &opts.backing) {
            // An explicit backing image replaces whatever the image names.
            return Ok(Image::from_driver(opened.driver, Some(b.clone())));
        }
        if let Some(want) = expected_id.take() {
            if opened.driver.unique_id().as_ref() != Some(&want) {
                return Err(layer_err(Error::new(
                    ErrorKind::InvalidFormat,
                    "the backing file is not the parent its overlay was made from (its \
                     identity differs)",
                )));
            }
        }
        layers.push(opened.driver);
        if top && opts.no_backing {
            break;
        }
        if let Some(backing) = opened.backing {
            let resolved = storage.resolve_name(&backing.name).map_err(layer_err)?;
            let kind = ImplicitOpenKind::BackingFile;
            let file = files(opts)
                .open(kind, &backing.name, &resolved.path, storage.path(), false)
                .await
                .map_err(|e| {
                    nest(
                        e.with_operation("open").with_path(&resolved.path),
                        depth + 1,
                    )
                })?;
            let backing_format = backing
                .format
                .as_deref()
                .map(Format::from_name)
                .transpose()
                .map_err(|e| nest(e, depth + 1))?;
            current = Some((file, backing_format));
            expected_id = backing.expected_id;
        }
    }
    Ok(Image::from_layers(layers, true))
}

/// Defines a per-format open builder that shares [`OpenOptions`] and the chain opener.
macro_rules! format_open_builder {
    ($(#[$doc:meta])* $name:ident, $format:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug)]
        pub struct $name {
            source: $crate::image::open::Source,
            opts: $crate::image::OpenOptions,
        }

        impl $name {
            /// Opens the file at `path`.
            pub fn path(path: impl Into<std::path::PathBuf>) -> Self {
                $name {
                    source: $crate::image::open::Source::Path(path.into()),
                    opts: $crate::image::OpenOptions::default(),
                }
            }

            /// Opens an image held in `storage`.
            pub fn storage(storage: std::sync::Arc<dyn $crate::storage::Storage>) -> Self {
                $name {
                    source: $crate::image::open::Source::Storage(storage),
                    opts: $crate::image::OpenOptions::default(),
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

            /// Ignore sync requests (see [`OpenOptions::no_sync`](crate::image::OpenOptions::no_sync)).
            pub fn no_sync(mut self, no_sync: bool) -> Self {
                self.opts = self.opts.no_sync(no_sync);
                self
            }

            /// Do file I/O on the calling thread (see [`OpenOptions::inline_io`](crate::image::OpenOptions::inline_io)).
            pub fn inline_io(mut self, inline_io: bool) -> Self {
                self.opts = self.opts.inline_io(inline_io);
                self
            }

            /// Replaces all options at once.
            pub fn options(mut self, opts: $crate::image::OpenOptions) -> Self {
                self.opts = opts;
                self
            }

            /// Share everything with other users (see [`OpenOptions::force_share`](crate::image::OpenOptions::force_share)).
            pub fn force_share(mut self, force_share: bool) -> Self {
                self.opts = self.opts.force_share(force_share);
                self
            }

            /// Lock mode for the files opened (see [`OpenOptions::locking`](crate::image::OpenOptions::locking)).
            pub fn locking(mut self, mode: $crate::storage::LockMode) -> Self {
                self.opts = self.opts.locking(mode);
                self
            }

            /// Opens the image (and its backing chain, through the implicit-open policy).
            pub async fn open(self) -> $crate::Result<$crate::image::Image> {
                let storage = self.source.open(&self.opts).await?;
                $crate::image::open::open_chain(storage, Some($format), &self.opts).await
            }
        }
    };
}

format_open_builder!(
    /// Opens a raw image. A raw image has no backing file nor data file: asking for one is an
    /// error.
    RawOpen,
    crate::raw::RAW
);

format_open_builder!(
    /// Opens a qcow2 image and its backing chain.
    ///
    /// Files the image names (backing file, external data file) are opened through the
    /// [`ImplicitOpenPolicy`](crate::ImplicitOpenPolicy) of the options.
    Qcow2Open,
    crate::qcow2::QCOW2
);
