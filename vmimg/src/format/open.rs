//! Open builders shared by every format, and the format-dispatching [`ImageOpen`].

use super::{Format, Image, ImplicitOpenPolicy};
use crate::raw::RawOpen;
use crate::storage::{FileStorageOpen, Storage};
use crate::{Error, ErrorKind, Result};
use std::path::PathBuf;
use std::sync::Arc;

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
            Source::Path(p) => Ok(Arc::new(
                FileStorageOpen::new(p)
                    .writable(opts.writable)
                    .direct(opts.direct)
                    .open()
                    .await?,
            )),
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
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    pub(crate) writable: bool,
    pub(crate) direct: bool,
    pub(crate) policy: ImplicitOpenPolicy,
    pub(crate) backing: Option<Image>,
    pub(crate) data_file: Option<Arc<dyn Storage>>,
}

impl OpenOptions {
    /// Read-only, buffered, permissive implicit-open policy, backing as the image names it.
    pub fn new() -> Self {
        Self::default()
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

    /// The policy for files named inside the image (backing file, data file).
    pub fn policy(mut self, policy: ImplicitOpenPolicy) -> Self {
        self.policy = policy;
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
}

/// Opens an image of a named format, or of a probed one.
///
/// ```no_run
/// # async fn f() -> vmimg::Result<()> {
/// use vmimg::{Format, ImageOpen};
/// let image = ImageOpen::path("disk.raw").format(Format::Raw).writable(true).open().await?;
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

    /// Replaces all options at once.
    pub fn options(mut self, opts: OpenOptions) -> Self {
        self.opts = opts;
        self
    }

    /// Opens the image.
    pub async fn open(self) -> Result<Image> {
        let path = match &self.source {
            Source::Path(p) => Some(p.clone()),
            Source::Storage(_) => None,
        };
        let storage = self.source.open(&self.opts).await?;
        let format = match self.format {
            Some(f) => f,
            None => Format::probe(storage.as_ref()).await?,
        };
        let result = match format {
            Format::Raw => RawOpen::storage(storage).options(self.opts).open().await,
            Format::Qcow2 => Err(Error::new(
                ErrorKind::Unsupported,
                "qcow2 images are not supported yet",
            )),
        };
        result.map_err(|e| match path {
            Some(p) => e.with_operation("open").with_path(p),
            None => e.with_operation("open"),
        })
    }
}
