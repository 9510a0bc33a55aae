//! The implicit-open policy: the one gate through which any file named *inside* an image
//! (a backing file, an external data file) is opened.
//!
//! A crafted image can name any path on the host. Nothing it names is opened except through
//! this object, which the caller chooses: [`ImplicitOpenPolicy::permissive`] (qemu-img's
//! behaviour), [`ImplicitOpenPolicy::deny`] (untrusted images), or a custom decision.

use crate::storage::{AlignedStorage, FileStorageOpen, LockMode, Storage};
use crate::{Error, ErrorKind, Result};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// Why an image wants another file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImplicitOpenKind {
    /// The image names a backing file.
    BackingFile,
    /// The image names an external data file.
    DataFile,
    /// The image's descriptor names one of its extents (VMDK).
    Extent,
}

impl fmt::Display for ImplicitOpenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImplicitOpenKind::BackingFile => "backing file",
            ImplicitOpenKind::DataFile => "data file",
            ImplicitOpenKind::Extent => "extent file",
        })
    }
}

/// A request to open a file an image names.
#[derive(Clone, Copy, Debug)]
pub struct ImplicitOpenRequest<'a> {
    /// Why the file is wanted.
    pub kind: ImplicitOpenKind,
    /// The name exactly as stored in the image.
    pub name: &'a str,
    /// The path the name resolves to (relative names are taken relative to the image).
    pub path: &'a Path,
    /// The image that names it, when it is a file.
    pub named_by: Option<&'a Path>,
    /// Whether the file would be opened for writing.
    pub writable: bool,
    /// Whether direct I/O was asked for.
    pub direct: bool,
    /// Whether sync requests are to be ignored (`cache=unsafe`).
    pub no_sync: bool,
    /// Whether file I/O is to run on the calling thread (`OpenOptions::inline_io`).
    pub inline_io: bool,
    /// Whether the file is to be locked (`OpenOptions::locking`).
    pub locking: LockMode,
}

/// What a custom policy decides.
pub enum PolicyDecision {
    /// Open `path` as a file.
    Open,
    /// Refuse, with a reason for the error message.
    Deny(String),
    /// Use this storage instead of opening anything.
    Use(Arc<dyn Storage>),
}

type Decider = dyn Fn(&ImplicitOpenRequest<'_>) -> PolicyDecision + Send + Sync;

#[derive(Clone)]
enum Rule {
    Permissive,
    Deny,
    Custom(Arc<Decider>),
}

/// Decides whether files named inside images may be opened (see the module docs).
///
/// The default is [`ImplicitOpenPolicy::permissive`], which matches qemu-img. Use
/// [`ImplicitOpenPolicy::deny`] for images from untrusted sources.
#[derive(Clone)]
pub struct ImplicitOpenPolicy {
    rule: Rule,
}

impl Default for ImplicitOpenPolicy {
    fn default() -> Self {
        Self::permissive()
    }
}

impl fmt::Debug for ImplicitOpenPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.rule {
            Rule::Permissive => "ImplicitOpenPolicy::Permissive",
            Rule::Deny => "ImplicitOpenPolicy::Deny",
            Rule::Custom(_) => "ImplicitOpenPolicy::Custom",
        })
    }
}

impl ImplicitOpenPolicy {
    /// Open whatever an image names, as qemu-img does.
    pub fn permissive() -> Self {
        ImplicitOpenPolicy {
            rule: Rule::Permissive,
        }
    }

    /// Open nothing an image names: such opens fail with
    /// [`ErrorKind::PermissionDenied`]. Files given explicitly by the caller still work.
    pub fn deny() -> Self {
        ImplicitOpenPolicy { rule: Rule::Deny }
    }

    /// Decide each request with `decide`.
    pub fn custom(
        decide: impl Fn(&ImplicitOpenRequest<'_>) -> PolicyDecision + Send + Sync + 'static,
    ) -> Self {
        ImplicitOpenPolicy {
            rule: Rule::Custom(Arc::new(decide)),
        }
    }

    /// Applies the policy to `req`: opens the file, returns the substitute, or refuses.
    pub async fn open(&self, req: &ImplicitOpenRequest<'_>) -> Result<Arc<dyn Storage>> {
        let decision = match &self.rule {
            Rule::Permissive => PolicyDecision::Open,
            Rule::Deny => PolicyDecision::Deny("the implicit-open policy denies it".into()),
            Rule::Custom(decide) => decide(req),
        };
        match decision {
            PolicyDecision::Open => {
                let storage = FileStorageOpen::new(req.path)
                    .writable(req.writable)
                    .direct(req.direct)
                    .no_sync(req.no_sync)
                    .inline_io(req.inline_io)
                    .locking(req.locking)
                    .open()
                    .await?;
                Ok(AlignedStorage::wrap(Arc::new(storage)))
            }
            PolicyDecision::Use(storage) => Ok(storage),
            PolicyDecision::Deny(reason) => {
                let by = req
                    .named_by
                    .map(|p| format!(" named by '{}'", p.display()))
                    .unwrap_or_default();
                Err(Error::new(
                    ErrorKind::PermissionDenied,
                    format!(
                        "not opening {} '{}'{by}: {reason}",
                        req.kind,
                        req.path.display()
                    ),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    fn request(path: &Path) -> ImplicitOpenRequest<'_> {
        ImplicitOpenRequest {
            kind: ImplicitOpenKind::BackingFile,
            name: "base.raw",
            path,
            named_by: Some(Path::new("/images/top.qcow2")),
            writable: false,
            direct: false,
            no_sync: false,
            inline_io: false,
            locking: LockMode::Auto,
        }
    }

    #[tokio::test]
    async fn deny_refuses_with_permission_denied_naming_the_file() {
        let err = ImplicitOpenPolicy::deny()
            .open(&request(Path::new("/etc/shadow")))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied);
        let msg = err.to_string();
        assert!(
            msg.contains("/etc/shadow") && msg.contains("top.qcow2"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn permissive_opens_the_resolved_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("base.raw");
        std::fs::write(&p, [1u8; 512]).unwrap();
        let s = ImplicitOpenPolicy::permissive()
            .open(&request(&p))
            .await
            .unwrap();
        assert_eq!(s.size().unwrap(), 512);
        assert!(!s.is_writable());
    }

    #[tokio::test]
    async fn custom_policy_can_substitute_a_storage_and_sees_the_request() {
        let policy = ImplicitOpenPolicy::custom(|req| {
            assert_eq!(req.name, "base.raw");
            PolicyDecision::Use(Arc::new(MemoryStorage::with_size(777)))
        });
        let s = policy.open(&request(Path::new("/nowhere"))).await.unwrap();
        assert_eq!(s.size().unwrap(), 777);
    }
}
