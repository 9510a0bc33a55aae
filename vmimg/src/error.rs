//! The crate-boundary error: a small kind to branch on, context to read, and the cause chain.
//!
//! ```text
//!  Error { kind, message, context: { operation, path, offset }, source }
//!    |                                                            |
//!    +-- kind(): what code branches on (ErrorKind)                +-- the cause chain
//! ```

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What went wrong, coarsely: code branches on this, people read the message and the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The medium failed (EIO and friends).
    Io,
    /// The medium is full (ENOSPC, EDQUOT), or the file would grow past its limit (EFBIG).
    NoSpace,
    /// A file does not exist.
    NotFound,
    /// The operating system or the implicit-open policy refused access.
    PermissionDenied,
    /// The bytes are not a valid image of the requested format.
    InvalidFormat,
    /// The image uses a feature this code does not implement.
    Unsupported,
    /// The image is damaged: metadata contradicts itself.
    Corrupt,
    /// A request reaches outside the image or the storage.
    OutOfBounds,
    /// The caller passed an argument that cannot be honoured (alignment, zero size, ...).
    InvalidArgument,
    /// A write was attempted on an image or storage opened read-only.
    ReadOnly,
    /// Another user holds the image in a way that excludes this one (QEMU's image locks).
    Locked,
}

impl ErrorKind {
    /// The errno that best describes this kind (used by the NBD server and the CLI).
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::Io | ErrorKind::InvalidFormat | ErrorKind::Corrupt => libc::EIO,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::PermissionDenied => libc::EACCES,
            ErrorKind::Unsupported => libc::ENOTSUP,
            ErrorKind::OutOfBounds | ErrorKind::InvalidArgument => libc::EINVAL,
            ErrorKind::ReadOnly => libc::EROFS,
            ErrorKind::Locked => libc::EAGAIN,
        }
    }

    /// A short description of the kind ("no space left on device", ...).
    pub fn describe(self) -> &'static str {
        match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::NoSpace => "no space left on device",
            ErrorKind::NotFound => "not found",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::InvalidFormat => "invalid image format",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Corrupt => "image is corrupt",
            ErrorKind::OutOfBounds => "out of bounds",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::Locked => "the image is in use by another process",
        }
    }
}

impl From<io::ErrorKind> for ErrorKind {
    fn from(kind: io::ErrorKind) -> Self {
        match kind {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            io::ErrorKind::InvalidInput => ErrorKind::InvalidArgument,
            io::ErrorKind::Unsupported => ErrorKind::Unsupported,
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => ErrorKind::NoSpace,
            io::ErrorKind::ReadOnlyFilesystem => ErrorKind::ReadOnly,
            _ => ErrorKind::Io,
        }
    }
}

/// The error type of every fallible vmimg operation.
pub struct Error {
    kind: ErrorKind,
    message: String,
    operation: Option<&'static str>,
    path: Option<PathBuf>,
    offset: Option<u64>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// `Result` with vmimg's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a human-readable `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            operation: None,
            path: None,
            offset: None,
            source: None,
        }
    }

    /// Wraps an operating-system error; its kind is derived from the errno.
    pub fn from_io(err: io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ErrorKind::NoSpace,
            Some(libc::EROFS) => ErrorKind::ReadOnly,
            Some(libc::EOPNOTSUPP) => ErrorKind::Unsupported,
            _ => ErrorKind::from(err.kind()),
        };
        Error {
            kind,
            message: String::new(),
            operation: None,
            path: None,
            offset: None,
            source: Some(Box::new(err)),
        }
    }

    /// Attaches a cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Names the operation that failed (e.g. `"read"`, `"open"`), unless one is already named.
    pub fn with_operation(mut self, operation: &'static str) -> Self {
        self.operation.get_or_insert(operation);
        self
    }

    /// Names the file involved, unless one is already named.
    pub fn with_path(mut self, path: impl AsRef<Path>) -> Self {
        if self.path.is_none() {
            self.path = Some(path.as_ref().to_path_buf());
        }
        self
    }

    /// Wraps this error in a higher-level one that names its own operation and file, as
    /// QEMU nests its messages: `open` of the image around the `open` of its backing file
    /// reads "Could not open 'top': Could not open backing file: Could not open 'base':
    /// No such file or directory". The kind and errno stay the inner error's.
    pub fn within(self, operation: &'static str, path: Option<&Path>) -> Self {
        Error {
            kind: self.kind,
            message: String::new(),
            operation: Some(operation),
            path: path.map(Path::to_path_buf),
            offset: None,
            source: Some(Box::new(self)),
        }
    }

    /// The error this one wraps (see [`Error::within`]).
    pub fn inner(&self) -> Option<&Error> {
        self.source.as_ref()?.downcast_ref::<Error>()
    }

    /// Names the offset involved, unless one is already named.
    pub fn with_offset(mut self, offset: u64) -> Self {
        self.offset.get_or_insert(offset);
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The errno that best describes this error: the OS error when there is one, else the kind's.
    pub fn errno(&self) -> i32 {
        if let Some(inner) = self.inner() {
            return inner.errno();
        }
        self.source
            .as_ref()
            .and_then(|s| s.downcast_ref::<io::Error>())
            .and_then(io::Error::raw_os_error)
            .unwrap_or_else(|| self.kind.errno())
    }

    /// The operation named in the context, if any.
    pub fn operation(&self) -> Option<&'static str> {
        self.operation
    }

    /// The file named in the context, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The offset named in the context, if any.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if let Some(op) = self.operation {
            // QEMU's words for a file that did not open, which its tests and users match.
            let op = match (op, &self.path) {
                ("open", Some(_)) => "Could not open",
                ("open backing file", _) => "Could not open backing file",
                _ => op,
            };
            write!(f, "{op}")?;
            sep = " ";
        }
        if let Some(path) = &self.path {
            write!(f, "{sep}'{}'", path.display())?;
            sep = " ";
        }
        if let Some(offset) = self.offset {
            write!(f, "{sep}at offset {offset:#x}")?;
            sep = " ";
        }
        if !sep.is_empty() {
            f.write_str(": ")?;
        }
        self.fmt_reason(f)
    }
}

impl Error {
    /// What went wrong, without the operation, file and offset the error names: for
    /// callers that print the file their own way (qemu-img's "FILE: reason").
    pub fn reason(&self) -> String {
        struct Reason<'a>(&'a Error);
        impl fmt::Display for Reason<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt_reason(f)
            }
        }
        Reason(self).to_string()
    }

    fn fmt_reason(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            match &self.source {
                // An I/O error with no message of our own: show the OS text in place,
                // without the " (os error N)" suffix the standard library adds.
                Some(source) => {
                    let text = source.to_string();
                    let text = match text.rfind(" (os error ") {
                        Some(i) if text.ends_with(')') => &text[..i],
                        _ => &text,
                    };
                    f.write_str(text)
                }
                None => f.write_str(self.kind.describe()),
            }
        } else {
            f.write_str(&self.message)
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self} [{:?}]", self.kind)?;
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            write!(f, "\n  caused by: {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        let source = self.source.as_ref()?;
        if self.message.is_empty() || self.message.contains(&source.to_string()) {
            // The source's text is already part of our Display: report its own cause
            // instead, so that a chain never says the same thing twice.
            source.source()
        } else {
            Some(source.as_ref() as &(dyn std::error::Error + 'static))
        }
    }
}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        Error::from_io(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_maps_to_no_space_with_errno() {
        let e = Error::from_io(io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(e.errno(), libc::ENOSPC);
    }

    #[test]
    fn display_carries_operation_path_and_hex_offset() {
        let e = Error::new(ErrorKind::OutOfBounds, "request ends past 0x1000")
            .with_operation("read")
            .with_path("/tmp/x.raw")
            .with_offset(0x2000);
        assert_eq!(
            e.to_string(),
            "read '/tmp/x.raw' at offset 0x2000: request ends past 0x1000"
        );
    }

    #[test]
    fn first_context_wins() {
        let e = Error::new(ErrorKind::Io, "x")
            .with_offset(1)
            .with_offset(2)
            .with_operation("a")
            .with_operation("b");
        assert_eq!(e.offset(), Some(1));
        assert_eq!(e.operation(), Some("a"));
    }

    /// Regression: an error whose message quotes its cause printed that text twice (once
    /// as the message, once as "caused by").
    #[test]
    fn a_cause_quoted_in_the_message_is_not_reported_again() {
        let inner = Error::from_io(io::Error::from_raw_os_error(libc::EIO));
        let outer =
            Error::new(ErrorKind::Io, format!("reading the header: {inner}")).with_source(inner);
        assert!(std::error::Error::source(&outer).is_none());
        assert!(!format!("{outer:?}").contains("caused by"), "{outer:?}");
        let quoted = Error::new(ErrorKind::InvalidFormat, "bad header");
        let same = Error::new(ErrorKind::InvalidFormat, "bad header").with_source(quoted);
        assert!(std::error::Error::source(&same).is_none());
        // A cause that adds something is still reported.
        let other = Error::new(ErrorKind::Io, "copy failed")
            .with_source(io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(std::error::Error::source(&other).is_some());
    }

    /// QEMU's nesting of open errors: the image around its backing file around the file.
    #[test]
    fn open_errors_nest_in_qemus_words() {
        let file = Error::from_io(io::Error::from_raw_os_error(libc::ENOENT))
            .with_operation("open")
            .with_path("/b");
        assert_eq!(
            file.to_string(),
            "Could not open '/b': No such file or directory"
        );
        let top = file
            .within("open backing file", None)
            .within("open", Some(Path::new("/t")));
        assert_eq!(
            top.to_string(),
            "Could not open '/t': Could not open backing file: Could not open '/b': No such \
             file or directory"
        );
        assert_eq!(top.kind(), ErrorKind::NotFound);
        assert_eq!(top.errno(), libc::ENOENT);
        assert_eq!(top.path(), Some(Path::new("/t")));
        let inner = top.inner().unwrap();
        assert!(inner
            .to_string()
            .starts_with("Could not open backing file: "));
        assert!(!format!("{top:?}").contains("caused by"), "{top:?}");
    }

    #[test]
    fn io_error_without_message_shows_os_text() {
        let e = Error::from_io(io::Error::from_raw_os_error(libc::ENOENT)).with_operation("open");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.to_string(), "open: No such file or directory");
    }
}
