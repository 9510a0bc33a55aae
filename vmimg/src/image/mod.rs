//! The user's handle: opening images (builders, options, the backing chain, the registry of
//! formats), the access handle that does the I/O for every format, and a blocking wrapper.
//!
//! ```text
//!   ImageOpen / OpenOptions --open_chain--> Image (access: splitting, backing fall-through,
//!        |                                  |      alignment, concurrency)
//!        '-- registry: the formats           '-- layer 0, 1, ...: dyn FormatDriver
//! ```

mod access;
mod blocking;
pub(crate) mod open;
mod registry;

pub use access::{BlockStatus, BlockStatusKind, Image};
pub use blocking::BlockingImage;
pub use open::{
    ImageOpen, OpenOptions, Qcow2Open, RawOpen, DEFAULT_CACHE_BYTES, DEFAULT_MAX_CHAIN_DEPTH,
};
pub use registry::{probe_bytes, probed_names, FORMATS};
