//! vmimg: virtual-machine disk images — storage, formats and one access layer.
//!
//! ```text
//!  image::   Image (access: split on mappings, backing fall-through, alignment,
//!            concurrency), ImageOpen/OpenOptions, the registry of formats
//!    |
//!  raw:: | qcow2::   each format: its ImageFormat entry points and its FormatDriver
//!    |
//!  format::  the driver contract: FormatDriver, ImageFormat, mappings, the chain reader,
//!            the implicit-open policy, QEMU's probe, options and info trees
//!    |
//!  storage:: file | memory | null | ...   -- host bytes on a medium
//! ```
//!
//! Open an image with [`ImageOpen`] (any format) or a format's own builder ([`RawOpen`]);
//! create one with a format's create builder ([`RawCreate`]), or by name with options as
//! qemu-img takes them ([`Format::from_name`], [`ImageFormat::create`](format::ImageFormat::create)). Every file an image names
//! itself is opened through an [`ImplicitOpenPolicy`]. All futures are `Send`; file I/O runs
//! on tokio's blocking pool, so the crate must be used inside a tokio runtime (or through
//! [`BlockingImage`]).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> vmimg::Result<()> {
//! use std::sync::Arc;
//! use vmimg::{MemoryStorage, RawCreate, RawOpen};
//!
//! let storage = Arc::new(MemoryStorage::new());
//! RawCreate::new(1 << 20).create_on(storage.as_ref()).await?;
//! let image = RawOpen::storage(storage).writable(true).open().await?;
//! image.write(4096, b"hello").await?;
//! let mut buf = [0u8; 5];
//! image.read(4096, &mut buf).await?;
//! assert_eq!(&buf, b"hello");
//! image.flush().await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod bochs;
pub mod cloop;
mod cpu;
pub mod dmg;
mod error;
pub mod format;
pub mod image;
pub mod io_buf;
pub mod nbd;
pub mod parallels;
pub mod qcow1;
pub mod qcow2;
pub mod qed;
pub mod raw;
pub mod storage;
pub mod vdi;
pub mod vhdx;
pub mod vmdk;
pub mod vpc;

pub use error::{Error, ErrorKind, Result};
pub use format::{
    DiscardMode, Format, FormatDriver, ImageDescription, ImplicitOpenPolicy, PolicyDecision,
};
pub use image::{
    BlockStatus, BlockStatusKind, BlockingImage, Image, ImageOpen, OpenOptions, Qcow2Open, RawOpen,
};
pub use qcow2::Qcow2Create;
pub use raw::RawCreate;
pub use storage::{
    FaultKind, FaultOp, FaultStorage, FileStorage, FileStorageOpen, HookStorage, LockMode,
    MemoryStorage, NullStorage, Permissions, PreallocMode, Storage, StorageExt, StorageHook,
    StorageOp,
};
