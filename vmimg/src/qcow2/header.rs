//! The qcow2 header, its extensions, and their validation with QEMU's limits.
//!
//! ```text
//!  cluster 0:  | header (72 B v2, >= 104 B v3) | extensions ... | end (type 0) | backing name |
//!  extension:  | type u32 | length u32 | data (length bytes) | zero padding to 8 |
//! ```
//! All numbers are big-endian. Each rejection names the rule broken and the numbers.

use super::types::Geometry;
use crate::{Error, ErrorKind};
use thiserror::Error as ThisError;

/// "QFI\xfb".
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Smallest cluster size: 512 bytes.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size QEMU opens: 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limit on the L1 table: 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table: 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's limit on the number of snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;
/// QEMU's limit on the number of bitmaps.
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's limit on the bitmap directory size.
pub const MAX_BITMAP_DIRECTORY: u64 = 64 << 20;

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be inconsistent (lazy refcounts in use).
    pub const DIRTY: u64 = 1 << 0;
    /// Metadata may be corrupt; no writes.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// `compression_type` is not deflate.
    pub const COMPRESSION: u64 = 1 << 3;
    /// L2 entries are 128 bits with a subcluster bitmap.
    pub const EXTL2: u64 = 1 << 4;
    /// Every bit this code knows.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}

/// Compatible feature bits.
pub mod compat {
    /// Lazy refcounts.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a consistent raw image.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
}

/// Header extension types.
pub mod ext {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    /// Bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const CRYPTO: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// Compression method of compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (RFC 1951), called "zlib" by QEMU.
    Deflate,
    /// Zstandard.
    Zstd,
}

impl CompressionType {
    /// QEMU's name: `zlib` or `zstd`.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Deflate => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// An entry of the feature name table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number 0..=63.
    pub bit: u8,
    /// The name.
    pub name: String,
}

/// The bitmaps extension (kept as found; bitmaps are not maintained by this code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps (1..=65535).
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Offset of the bitmap directory (cluster aligned).
    pub directory_offset: u64,
}

/// The full-disk-encryption header pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CryptoExt {
    /// Offset of the encryption header (cluster aligned).
    pub offset: u64,
    /// Length of the encryption header.
    pub length: u64,
}

/// Why a header was refused.
#[derive(Clone, Debug, PartialEq, Eq, ThisError)]
#[non_exhaustive]
pub enum HeaderError {
    /// The file is too short to hold a header.
    #[error("image is too short for a qcow2 header ({len} bytes)")]
    Truncated {
        /// Bytes available.
        len: u64,
    },
    /// Wrong magic.
    #[error("not a qcow2 image (bad magic)")]
    BadMagic,
    /// Version other than 2 or 3.
    #[error("unsupported qcow2 version {0}")]
    Version(u32),
    /// cluster_bits out of 9..=21.
    #[error("cluster size 2^{0} is out of range (512 B to 2 MiB)")]
    ClusterBits(u32),
    /// header_length invalid for the version.
    #[error("header length {len} is invalid for version {version}")]
    HeaderLength {
        /// header_length.
        len: u32,
        /// version.
        version: u32,
    },
    /// refcount_order above 6.
    #[error("refcount order {0} is out of range (0 to 6)")]
    RefcountOrder(u32),
    /// Encrypted image.
    #[error("encrypted images are not supported yet (crypt method {0})")]
    Encrypted(u32),
    /// Unknown crypt method.
    #[error("invalid crypt method {0}")]
    CryptMethod(u32),
    /// Incompatible features this code does not know.
    #[error("Unsupported qcow2 feature(s): {names}")]
    UnknownIncompatible {
        /// The bits.
        bits: u64,
        /// Their names from the feature table, then "Unknown incompatible feature: MASK".
        names: String,
    },
    /// Compression type field and bit disagree, or the type is unknown.
    #[error("invalid compression type {value} (incompatible bit {bit})")]
    CompressionType {
        /// Field value.
        value: u8,
        /// Whether the compression-type bit is set.
        bit: bool,
    },
    /// Extended L2 entries need clusters of at least 16 KiB.
    #[error("extended L2 entries need clusters of at least 16 KiB (cluster size 2^{0})")]
    ExtendedL2ClusterBits(u32),
    /// data_file_raw without a data file.
    #[error("data-file-raw is set but the image has no external data file")]
    DataFileRawWithoutDataFile,
    /// L1 table larger than QEMU's limit.
    #[error("Active L1 table too large ({entries} entries; the limit is 32 MiB)")]
    L1TooLarge {
        /// l1_size.
        entries: u32,
    },
    /// A virtual size whose L1 table would have more than `i32::MAX` entries.
    #[error("Image is too big")]
    TooBig,
    /// L1 table too small for the virtual size.
    #[error("L1 table is too small ({entries} entries for the virtual size {size:#x})")]
    L1TooSmall {
        /// l1_size.
        entries: u32,
        /// size.
        size: u64,
    },
    /// A table offset is unaligned or overflows.
    #[error("{table} offset {offset:#x} is invalid (unaligned or overflowing)")]
    TableOffset {
        /// Which table.
        table: &'static str,
        /// The offset.
        offset: u64,
    },
    /// Refcount table larger than QEMU's limit.
    #[error("refcount table of {clusters} clusters is too large (limit 8 MiB)")]
    RefcountTableTooLarge {
        /// refcount_table_clusters.
        clusters: u32,
    },
    /// Too many snapshots.
    #[error("{0} snapshots is too many (limit 65536)")]
    TooManySnapshots(u32),
    /// Backing file name too long.
    #[error("backing file name of {0} bytes is too long (limit 1023)")]
    BackingNameTooLong(u32),
    /// Backing file name outside the first cluster.
    #[error("backing file name at {offset:#x} (+{len}) is outside the header cluster")]
    BackingNameOutside {
        /// backing_file_offset.
        offset: u64,
        /// backing_file_size.
        len: u32,
    },
    /// A string is not UTF-8.
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    /// A header extension runs past its area.
    #[error("header extension {ext_type:#010x} at {offset:#x} with length {len} overruns the header area")]
    ExtensionOverrun {
        /// Extension type.
        ext_type: u32,
        /// Offset of the extension.
        offset: u64,
        /// Its length.
        len: u32,
    },
    /// A header extension has a length its type does not allow.
    #[error("header extension {ext_type:#010x} has invalid length {len}")]
    ExtensionLength {
        /// Extension type.
        ext_type: u32,
        /// Its length.
        len: u32,
    },
    /// The bitmaps extension is invalid.
    #[error("invalid bitmaps extension: {0}")]
    Bitmaps(String),
    /// Virtual size too large.
    #[error("virtual size {0:#x} is too large")]
    SizeTooLarge(u64),
}

impl From<HeaderError> for Error {
    fn from(e: HeaderError) -> Self {
        let kind = match e {
            HeaderError::Encrypted(_)
            | HeaderError::UnknownIncompatible { .. }
            | HeaderError::Version(_) => ErrorKind::Unsupported,
            HeaderError::CompressionType { value, .. } if value > 1 => ErrorKind::Unsupported,
            _ => ErrorKind::InvalidFormat,
        };
        Error::new(kind, e.to_string()).with_source(e)
    }
}

/// A parsed, validated qcow2 header with its extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS (only 0 is accepted).
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table (cluster aligned).
    pub l1_table_offset: u64,
    /// Offset of the refcount table (cluster aligned).
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table (cluster aligned).
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (4 for v2).
    pub refcount_order: u32,
    /// Header length (72 for v2).
    pub header_length: u32,
    /// Compression type.
    pub compression_type: CompressionType,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing format (extension).
    pub backing_format: Option<String>,
    /// External data file name (extension).
    pub data_file: Option<String>,
    /// Feature name table (extension).
    pub feature_names: Vec<FeatureName>,
    /// Bitmaps extension.
    pub bitmaps: Option<BitmapsExt>,
    /// Encryption header pointer.
    pub crypto: Option<CryptoExt>,
    /// Extensions this code does not know: (type, data), kept to rewrite them unchanged.
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn utf8(bytes: &[u8], what: &'static str) -> Result<String, HeaderError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| HeaderError::NotUtf8(what))
}

impl Header {
    /// Bytes to read first to learn the cluster size.
    pub const PROBE_LEN: usize = 512;

    /// The cluster size announced by a header prefix (validated later by [`Header::parse`]).
    pub fn peek_cluster_bits(prefix: &[u8]) -> Option<u32> {
        (prefix.len() >= 24).then(|| be32(prefix, 20))
    }

    /// Parses and validates the header from the first cluster of the image (or as much of it
    /// as the file holds).
    pub fn parse(cluster0: &[u8]) -> Result<Header, HeaderError> {
        let b = cluster0;
        if b.len() < 72 {
            return Err(HeaderError::Truncated {
                len: b.len() as u64,
            });
        }
        if b[0..4] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let version = be32(b, 4);
        if version != 2 && version != 3 {
            return Err(HeaderError::Version(version));
        }
        let cluster_bits = be32(b, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(HeaderError::ClusterBits(cluster_bits));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            cluster_bits,
            size: be64(b, 24),
            crypt_method: be32(b, 32),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 72,
            compression_type: CompressionType::Deflate,
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
            crypto: None,
            unknown_extensions: Vec::new(),
        };
        let mut compression_field = 0u8;
        if version == 3 {
            if b.len() < 104 {
                return Err(HeaderError::Truncated {
                    len: b.len() as u64,
                });
            }
            h.incompatible_features = be64(b, 72);
            h.compatible_features = be64(b, 80);
            h.autoclear_features = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            if h.header_length < 104
                || h.header_length % 8 != 0
                || u64::from(h.header_length) > cluster_size
            {
                return Err(HeaderError::HeaderLength {
                    len: h.header_length,
                    version,
                });
            }
            if h.header_length as usize > b.len() {
                return Err(HeaderError::Truncated {
                    len: b.len() as u64,
                });
            }
            if h.header_length > 104 {
                compression_field = b[104];
            }
        }
        if h.refcount_order > 6 {
            return Err(HeaderError::RefcountOrder(h.refcount_order));
        }
        match h.crypt_method {
            0 => {}
            1 | 2 => return Err(HeaderError::Encrypted(h.crypt_method)),
            m => return Err(HeaderError::CryptMethod(m)),
        }
        let comp_bit = h.incompatible_features & incompat::COMPRESSION != 0;
        h.compression_type = match (comp_bit, compression_field) {
            (false, 0) => CompressionType::Deflate,
            (true, 1) => CompressionType::Zstd,
            (bit, value) => return Err(HeaderError::CompressionType { value, bit }),
        };
        if h.incompatible_features & incompat::EXTL2 != 0 && cluster_bits < 14 {
            return Err(HeaderError::ExtendedL2ClusterBits(cluster_bits));
        }
        if h.size > i64::MAX as u64 {
            return Err(HeaderError::SizeTooLarge(h.size));
        }
        h.check_tables(cluster_size)?;
        h.parse_extensions(b, cluster_size)?;
        // Feature names come from the table, so unknown bits are checked after extensions.
        let unknown = h.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            // QEMU's report: the table's names in table order (up to its first unnamed
            // entry), then the bits left unnamed as one hexadecimal mask.
            let mut left = unknown;
            let mut names = Vec::new();
            for f in h.feature_names.iter().take_while(|f| !f.name.is_empty()) {
                if f.kind == 0 && f.bit < 64 && left & (1 << f.bit) != 0 {
                    names.push(f.name.clone());
                    left &= !(1 << f.bit);
                }
            }
            if left != 0 {
                names.push(format!("Unknown incompatible feature: {left:x}"));
            }
            let names = names.join(", ");
            return Err(HeaderError::UnknownIncompatible {
                bits: unknown,
                names,
            });
        }
        if h.autoclear_features & autoclear::DATA_FILE_RAW != 0
            && h.incompatible_features & incompat::DATA_FILE == 0
        {
            return Err(HeaderError::DataFileRawWithoutDataFile);
        }
        h.parse_backing_name(b, cluster_size)?;
        Ok(h)
    }

    fn check_tables(&self, cluster_size: u64) -> Result<(), HeaderError> {
        let geometry = self.geometry();
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(HeaderError::L1TooLarge {
                entries: self.l1_size,
            });
        }
        let needed = geometry
            .l1_entries_for(self.size)
            .ok_or(HeaderError::SizeTooLarge(self.size))?;
        if needed > i32::MAX as u64 {
            return Err(HeaderError::TooBig);
        }
        if u64::from(self.l1_size) < needed {
            return Err(HeaderError::L1TooSmall {
                entries: self.l1_size,
                size: self.size,
            });
        }
        let table = |name, offset: u64, bytes: u64| {
            let end = offset.checked_add(bytes);
            if offset % cluster_size != 0 || end.is_none_or(|e| e > i64::MAX as u64) {
                Err(HeaderError::TableOffset {
                    table: name,
                    offset,
                })
            } else {
                Ok(())
            }
        };
        if self.l1_size > 0 {
            table(
                "L1 table",
                self.l1_table_offset,
                u64::from(self.l1_size) * 8,
            )?;
        }
        let reftable_bytes = u64::from(self.refcount_table_clusters) * cluster_size;
        if reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(HeaderError::RefcountTableTooLarge {
                clusters: self.refcount_table_clusters,
            });
        }
        table("refcount table", self.refcount_table_offset, reftable_bytes)?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(HeaderError::TooManySnapshots(self.nb_snapshots));
        }
        if self.nb_snapshots > 0 {
            table("snapshot table", self.snapshots_offset, 0)?;
        }
        Ok(())
    }

    fn parse_extensions(&mut self, b: &[u8], cluster_size: u64) -> Result<(), HeaderError> {
        if self.version < 3 {
            // v2 images may carry extensions too, right after the 72-byte header.
        }
        // The extension area ends at the backing file name, or at the end of the cluster.
        let area_end = if self.backing_file_offset != 0 {
            self.backing_file_offset.min(cluster_size)
        } else {
            cluster_size
        }
        .min(b.len() as u64);
        let mut pos = u64::from(self.header_length);
        while pos + 8 <= area_end {
            let at = pos as usize;
            let ext_type = be32(b, at);
            let len = be32(b, at + 4);
            if ext_type == ext::END {
                break;
            }
            let data_start = pos + 8;
            let data_end = data_start + u64::from(len);
            if data_end > area_end {
                return Err(HeaderError::ExtensionOverrun {
                    ext_type,
                    offset: pos,
                    len,
                });
            }
            let data = &b[data_start as usize..data_end as usize];
            match ext_type {
                ext::BACKING_FORMAT => {
                    self.backing_format = Some(utf8(data, "backing format name")?)
                }
                ext::DATA_FILE => self.data_file = Some(utf8(data, "data file name")?),
                ext::FEATURE_TABLE => {
                    // A last partial entry reads as if padded with zeros, as QEMU reads it.
                    let mut padded = data.to_vec();
                    padded.resize(data.len().next_multiple_of(48), 0);
                    self.feature_names = padded
                        .chunks_exact(48)
                        .map(|e| {
                            let name = &e[2..];
                            let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                            FeatureName {
                                kind: e[0],
                                bit: e[1],
                                name: String::from_utf8_lossy(&name[..end]).into_owned(),
                            }
                        })
                        .collect();
                }
                ext::BITMAPS => {
                    if len < 24 {
                        return Err(HeaderError::ExtensionLength { ext_type, len });
                    }
                    let bm = BitmapsExt {
                        nb_bitmaps: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                    };
                    if bm.nb_bitmaps == 0 || bm.nb_bitmaps > MAX_BITMAPS {
                        return Err(HeaderError::Bitmaps(format!(
                            "{} bitmaps (must be 1 to 65535)",
                            bm.nb_bitmaps
                        )));
                    }
                    if be32(data, 4) != 0 {
                        return Err(HeaderError::Bitmaps("reserved field is not zero".into()));
                    }
                    if bm.directory_size > MAX_BITMAP_DIRECTORY {
                        return Err(HeaderError::Bitmaps(format!(
                            "directory of {} bytes is too large",
                            bm.directory_size
                        )));
                    }
                    if bm.directory_offset % cluster_size != 0 {
                        return Err(HeaderError::Bitmaps(format!(
                            "directory offset {:#x} is not cluster aligned",
                            bm.directory_offset
                        )));
                    }
                    self.bitmaps = Some(bm);
                }
                ext::CRYPTO => {
                    if len != 16 {
                        return Err(HeaderError::ExtensionLength { ext_type, len });
                    }
                    self.crypto = Some(CryptoExt {
                        offset: be64(data, 0),
                        length: be64(data, 8),
                    });
                }
                _ => self.unknown_extensions.push((ext_type, data.to_vec())),
            }
            pos = data_start + u64::from(len).div_ceil(8) * 8;
        }
        Ok(())
    }

    fn parse_backing_name(&mut self, b: &[u8], cluster_size: u64) -> Result<(), HeaderError> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        if self.backing_file_size > MAX_BACKING_NAME {
            return Err(HeaderError::BackingNameTooLong(self.backing_file_size));
        }
        let end = self
            .backing_file_offset
            .checked_add(u64::from(self.backing_file_size))
            .filter(|&end| end <= cluster_size && end <= b.len() as u64);
        let Some(end) = end else {
            return Err(HeaderError::BackingNameOutside {
                offset: self.backing_file_offset,
                len: self.backing_file_size,
            });
        };
        let name = &b[self.backing_file_offset as usize..end as usize];
        self.backing_file = Some(utf8(name, "backing file name")?);
        Ok(())
    }

    /// The cluster geometry.
    pub fn geometry(&self) -> Geometry {
        Geometry::new(
            self.cluster_bits,
            self.incompatible_features & incompat::EXTL2 != 0,
        )
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether the dirty bit is set.
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }

    /// Whether the corrupt bit is set.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }

    /// Whether an external data file holds guest data.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }

    /// Whether the data file is a consistent raw image.
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & autoclear::DATA_FILE_RAW != 0
    }

    /// Whether lazy refcounts are enabled.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & compat::LAZY_REFCOUNTS != 0
    }

    /// Whether the bitmaps extension is marked consistent.
    pub fn bitmaps_consistent(&self) -> bool {
        self.autoclear_features & autoclear::BITMAPS != 0
    }

    /// The feature name table QEMU writes into v3 images.
    pub fn standard_feature_names() -> Vec<FeatureName> {
        [
            (0, 0, "dirty bit"),
            (0, 1, "corrupt bit"),
            (0, 2, "external data file"),
            (0, 3, "compression type"),
            (0, 4, "extended L2 entries"),
            (1, 0, "lazy refcounts"),
            (2, 0, "bitmaps"),
            (2, 1, "raw external data"),
        ]
        .into_iter()
        .map(|(kind, bit, name)| FeatureName {
            kind,
            bit,
            name: name.to_string(),
        })
        .collect()
    }

    /// Serialises the header, its extensions and the backing file name into the bytes of
    /// the header cluster prefix (`backing_file_offset` and `backing_file_size` are
    /// recomputed). Fails if it does not fit in one cluster.
    pub fn to_bytes(&self) -> Result<Vec<u8>, HeaderError> {
        let cluster_size = 1usize << self.cluster_bits;
        let mut b = vec![0u8; self.header_length as usize];
        let put32 =
            |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        b[0..4].copy_from_slice(&MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        if self.version >= 3 {
            put64(&mut b, 72, self.incompatible_features);
            put64(&mut b, 80, self.compatible_features);
            put64(&mut b, 88, self.autoclear_features);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, self.header_length);
            if self.header_length > 104 {
                b[104] = match self.compression_type {
                    CompressionType::Deflate => 0,
                    CompressionType::Zstd => 1,
                };
            }
        }
        let ext = |b: &mut Vec<u8>, ext_type: u32, data: &[u8]| {
            b.extend_from_slice(&ext_type.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        };
        if let Some(f) = &self.backing_format {
            ext(&mut b, ext::BACKING_FORMAT, f.as_bytes());
        }
        if let Some(d) = &self.data_file {
            ext(&mut b, ext::DATA_FILE, d.as_bytes());
        }
        if let Some(c) = &self.crypto {
            let mut data = c.offset.to_be_bytes().to_vec();
            data.extend_from_slice(&c.length.to_be_bytes());
            ext(&mut b, ext::CRYPTO, &data);
        }
        // QEMU's order: the feature table, then the bitmaps, then the extensions it does
        // not know, kept as the image had them.
        let mut tail = Vec::new();
        if let Some(bm) = &self.bitmaps {
            let mut data = bm.nb_bitmaps.to_be_bytes().to_vec();
            data.extend_from_slice(&[0; 4]);
            data.extend_from_slice(&bm.directory_size.to_be_bytes());
            data.extend_from_slice(&bm.directory_offset.to_be_bytes());
            ext(&mut tail, ext::BITMAPS, &data);
        }
        for (t, data) in &self.unknown_extensions {
            ext(&mut tail, *t, data);
        }
        if !self.feature_names.is_empty() {
            let mut data = Vec::with_capacity(self.feature_names.len() * 48);
            for f in &self.feature_names {
                let mut e = [0u8; 48];
                e[0] = f.kind;
                e[1] = f.bit;
                let n = f.name.len().min(46);
                e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                data.extend_from_slice(&e);
            }
            // QEMU leaves the table out when it would not fit; so do we.
            let with_table = b.len()
                + 8
                + data.len()
                + tail.len()
                + 8
                + self.backing_file.as_ref().map_or(0, String::len);
            if with_table <= cluster_size {
                ext(&mut b, ext::FEATURE_TABLE, &data);
            }
        }
        b.extend_from_slice(&tail);
        b.extend_from_slice(&[0u8; 8]); // end of extensions
        if let Some(name) = &self.backing_file {
            let at = b.len() as u64;
            put64(&mut b, 8, at);
            put32(&mut b, 16, name.len() as u32);
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() > cluster_size {
            return Err(HeaderError::HeaderLength {
                len: b.len() as u32,
                version: self.version,
            });
        }
        Ok(b)
    }

    /// `compat` as qemu-img prints it: `0.10` or `1.1`.
    pub fn compat_name(&self) -> &'static str {
        if self.version == 2 {
            "0.10"
        } else {
            "1.1"
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An annotated minimal valid v3 header in a 64 KiB cluster: 1 MiB virtual size, L1 at
    /// 0x30000 with one entry, refcount table at 0x10000 (one cluster), no snapshots.
    pub(crate) fn valid_v3() -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes()); // version
        b[20..24].copy_from_slice(&16u32.to_be_bytes()); // cluster_bits: 64 KiB
        b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes()); // size: 1 MiB
        b[36..40].copy_from_slice(&1u32.to_be_bytes()); // l1_size
        b[40..48].copy_from_slice(&0x30000u64.to_be_bytes()); // l1_table_offset
        b[48..56].copy_from_slice(&0x10000u64.to_be_bytes()); // refcount_table_offset
        b[56..60].copy_from_slice(&1u32.to_be_bytes()); // refcount_table_clusters
        b[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount_order: 16 bits
        b[100..104].copy_from_slice(&112u32.to_be_bytes()); // header_length
        b
    }

    fn set32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn set64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    fn err(b: &[u8]) -> HeaderError {
        Header::parse(b).unwrap_err()
    }

    #[test]
    fn valid_header_parses() {
        let h = Header::parse(&valid_v3()).unwrap();
        assert_eq!((h.version, h.cluster_bits, h.size), (3, 16, 1 << 20));
        assert_eq!(h.refcount_bits(), 16);
        assert_eq!(h.compression_type, CompressionType::Deflate);
    }

    #[test]
    fn bad_magic_is_refused() {
        let mut b = valid_v3();
        b[3] = 0;
        assert_eq!(err(&b), HeaderError::BadMagic);
    }

    #[test]
    fn version_4_is_refused_as_unsupported() {
        let mut b = valid_v3();
        set32(&mut b, 4, 4);
        assert_eq!(err(&b), HeaderError::Version(4));
        assert_eq!(Error::from(err(&b)).kind(), ErrorKind::Unsupported);
    }

    #[test]
    fn cluster_bits_below_9_or_above_21_are_refused() {
        for bits in [0, 8, 22, 63] {
            let mut b = valid_v3();
            set32(&mut b, 20, bits);
            assert_eq!(err(&b), HeaderError::ClusterBits(bits));
        }
    }

    #[test]
    fn header_length_rules() {
        for len in [0, 100, 108 + 1, 65536 + 8] {
            let mut b = valid_v3();
            set32(&mut b, 100, len);
            assert!(matches!(err(&b), HeaderError::HeaderLength { .. }), "{len}");
        }
    }

    #[test]
    fn refcount_order_above_6_is_refused() {
        let mut b = valid_v3();
        set32(&mut b, 96, 7);
        assert_eq!(err(&b), HeaderError::RefcountOrder(7));
    }

    #[test]
    fn encrypted_images_are_refused_clearly() {
        for m in [1, 2] {
            let mut b = valid_v3();
            set32(&mut b, 32, m);
            let e = Error::from(err(&b));
            assert_eq!(e.kind(), ErrorKind::Unsupported);
            assert!(e
                .to_string()
                .contains("encrypted images are not supported yet"));
        }
        let mut b = valid_v3();
        set32(&mut b, 32, 3);
        assert_eq!(err(&b), HeaderError::CryptMethod(3));
    }

    #[test]
    fn unknown_incompatible_bit_is_named_from_the_feature_table() {
        let mut b = valid_v3();
        set64(&mut b, 72, 1 << 9);
        assert!(err(&b)
            .to_string()
            .contains("Unknown incompatible feature: 200"));
        // Feature name table extension with one entry naming bit 9.
        set32(&mut b, 112, ext::FEATURE_TABLE);
        set32(&mut b, 116, 48);
        b[120] = 0;
        b[121] = 9;
        b[122..122 + 11].copy_from_slice(b"time-travel");
        let e = err(&b);
        assert!(e.to_string().contains("time-travel"), "{e}");
    }

    #[test]
    fn unknown_compatible_bits_and_unknown_extensions_are_ignored() {
        let mut b = valid_v3();
        set64(&mut b, 80, 1 << 40);
        set64(&mut b, 88, 1 << 30);
        set32(&mut b, 112, 0x1234_5678);
        set32(&mut b, 116, 3);
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.unknown_extensions, vec![(0x1234_5678, vec![0, 0, 0])]);
    }

    #[test]
    fn compression_type_field_and_bit_must_agree() {
        let mut b = valid_v3();
        b[104] = 1;
        assert_eq!(
            err(&b),
            HeaderError::CompressionType {
                value: 1,
                bit: false
            }
        );
        let mut b = valid_v3();
        set64(&mut b, 72, incompat::COMPRESSION);
        assert_eq!(
            err(&b),
            HeaderError::CompressionType {
                value: 0,
                bit: true
            }
        );
        b[104] = 2;
        assert_eq!(Error::from(err(&b)).kind(), ErrorKind::Unsupported);
        b[104] = 1;
        assert_eq!(
            Header::parse(&b).unwrap().compression_type,
            CompressionType::Zstd
        );
    }

    #[test]
    fn extended_l2_needs_16k_clusters() {
        let mut b = valid_v3();
        set64(&mut b, 72, incompat::EXTL2);
        set32(&mut b, 20, 13);
        // 8 KiB clusters: the buffer is larger than the cluster, which is fine.
        assert_eq!(err(&b), HeaderError::ExtendedL2ClusterBits(13));
    }

    #[test]
    fn l1_size_limits() {
        let mut b = valid_v3();
        set32(&mut b, 36, (MAX_L1_BYTES / 8 + 1) as u32);
        assert!(matches!(err(&b), HeaderError::L1TooLarge { .. }));
        let mut b = valid_v3();
        set64(&mut b, 24, 1 << 40);
        assert!(matches!(err(&b), HeaderError::L1TooSmall { .. }));
        let mut b = valid_v3();
        set64(&mut b, 40, 0x30001);
        assert!(matches!(
            err(&b),
            HeaderError::TableOffset {
                table: "L1 table",
                ..
            }
        ));
        let mut b = valid_v3();
        set64(&mut b, 40, u64::MAX - 0xffff);
        assert!(matches!(err(&b), HeaderError::TableOffset { .. }));
    }

    #[test]
    fn refcount_table_limits() {
        let mut b = valid_v3();
        set32(&mut b, 56, (MAX_REFTABLE_BYTES / 65536 + 1) as u32);
        assert!(matches!(err(&b), HeaderError::RefcountTableTooLarge { .. }));
        let mut b = valid_v3();
        set64(&mut b, 48, 0x10200);
        assert!(matches!(
            err(&b),
            HeaderError::TableOffset {
                table: "refcount table",
                ..
            }
        ));
    }

    #[test]
    fn snapshot_table_limits() {
        let mut b = valid_v3();
        set32(&mut b, 60, MAX_SNAPSHOTS + 1);
        assert_eq!(err(&b), HeaderError::TooManySnapshots(MAX_SNAPSHOTS + 1));
        let mut b = valid_v3();
        set32(&mut b, 60, 1);
        set64(&mut b, 64, 0x123);
        assert!(matches!(
            err(&b),
            HeaderError::TableOffset {
                table: "snapshot table",
                ..
            }
        ));
    }

    #[test]
    fn backing_name_limits() {
        let mut b = valid_v3();
        set64(&mut b, 8, 0x200);
        set32(&mut b, 16, 8);
        b[0x200..0x208].copy_from_slice(b"base.raw");
        assert_eq!(
            Header::parse(&b).unwrap().backing_file.as_deref(),
            Some("base.raw")
        );
        set32(&mut b, 16, 1024);
        assert_eq!(err(&b), HeaderError::BackingNameTooLong(1024));
        set64(&mut b, 8, 65536 - 4);
        set32(&mut b, 16, 8);
        assert!(matches!(err(&b), HeaderError::BackingNameOutside { .. }));
        set64(&mut b, 8, 0x200);
        b[0x200] = 0xff;
        assert_eq!(err(&b), HeaderError::NotUtf8("backing file name"));
    }

    /// Regression: an offset near `u64::MAX` made `offset + size` wrap and the slice panic.
    #[test]
    fn backing_name_offset_near_u64_max_is_refused_not_a_panic() {
        let mut b = valid_v3();
        set64(&mut b, 8, u64::MAX - 10);
        set32(&mut b, 16, 20);
        assert!(matches!(err(&b), HeaderError::BackingNameOutside { .. }));
    }

    #[test]
    fn extension_overrunning_the_area_is_refused() {
        let mut b = valid_v3();
        set32(&mut b, 112, ext::BACKING_FORMAT);
        set32(&mut b, 116, 70_000);
        assert!(matches!(err(&b), HeaderError::ExtensionOverrun { .. }));
    }

    #[test]
    fn bitmaps_extension_rules() {
        let mut b = valid_v3();
        set32(&mut b, 112, ext::BITMAPS);
        set32(&mut b, 116, 8);
        assert!(matches!(err(&b), HeaderError::ExtensionLength { .. }));
        set32(&mut b, 116, 24);
        assert!(matches!(err(&b), HeaderError::Bitmaps(_)), "zero bitmaps");
        set32(&mut b, 120, 1);
        set64(&mut b, 128, 64);
        set64(&mut b, 136, 0x50000);
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.bitmaps.unwrap().directory_offset, 0x50000);
        set64(&mut b, 136, 0x50001);
        assert!(matches!(err(&b), HeaderError::Bitmaps(_)));
    }

    #[test]
    fn crypto_extension_needs_16_bytes() {
        let mut b = valid_v3();
        set32(&mut b, 112, ext::CRYPTO);
        set32(&mut b, 116, 8);
        assert!(matches!(err(&b), HeaderError::ExtensionLength { .. }));
    }

    #[test]
    fn data_file_raw_needs_a_data_file() {
        let mut b = valid_v3();
        set64(&mut b, 88, autoclear::DATA_FILE_RAW);
        assert_eq!(err(&b), HeaderError::DataFileRawWithoutDataFile);
    }

    #[test]
    fn truncated_headers_are_refused() {
        assert!(matches!(
            err(&valid_v3()[..50]),
            HeaderError::Truncated { .. }
        ));
        assert!(matches!(
            err(&valid_v3()[..90]),
            HeaderError::Truncated { .. }
        ));
    }

    #[test]
    fn v2_header_defaults() {
        let mut b = valid_v3();
        set32(&mut b, 4, 2);
        b[72..112].fill(0);
        let h = Header::parse(&b).unwrap();
        assert_eq!((h.header_length, h.refcount_order), (72, 4));
        assert_eq!(h.compat_name(), "0.10");
    }

    #[test]
    fn serialised_header_parses_back_identically() {
        let mut h = Header::parse(&valid_v3()).unwrap();
        h.backing_file = Some("base.qcow2".into());
        h.backing_format = Some("qcow2".into());
        h.data_file = None;
        h.feature_names = Header::standard_feature_names();
        h.unknown_extensions = vec![(0x1234, vec![1, 2, 3])];
        let mut bytes = h.to_bytes().unwrap();
        bytes.resize(65536, 0);
        let mut back = Header::parse(&bytes).unwrap();
        back.backing_file_offset = h.backing_file_offset;
        back.backing_file_size = h.backing_file_size;
        assert_eq!(back.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(back.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(back.feature_names, h.feature_names);
        assert_eq!(back.unknown_extensions, h.unknown_extensions);
        assert_eq!(back.size, h.size);
    }

    #[test]
    fn huge_virtual_size_is_refused() {
        let mut b = valid_v3();
        set64(&mut b, 24, u64::MAX);
        assert!(matches!(err(&b), HeaderError::SizeTooLarge(_)));
    }
}
