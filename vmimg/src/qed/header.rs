//! The QED header: 64 little-endian bytes at offset 0, the backing file name after them
//! (inside the header cluster, without a NUL), checked as QEMU 10 checks it on open.

use crate::{Error, ErrorKind, Result};

/// "QED\0".
pub const MAGIC: &[u8; 4] = b"QED\0";
/// Bytes of the header's fields.
pub const HEADER_BYTES: usize = 64;
/// The backing-file fields are valid.
pub const F_BACKING_FILE: u64 = 0x1;
/// The metadata may be inconsistent: check before use (set while allocating writes are in
/// flight, cleared when the image is consistent again).
pub const F_NEED_CHECK: u64 = 0x2;
/// The backing file is raw: do not probe it.
pub const F_BACKING_FORMAT_NO_PROBE: u64 = 0x4;
/// Every feature bit QEMU knows.
pub const F_ALL: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;
/// Smallest cluster size.
pub const MIN_CLUSTER_SIZE: u32 = 4096;
/// Largest cluster size.
pub const MAX_CLUSTER_SIZE: u32 = 64 << 20;
/// Largest table size, in clusters.
pub const MAX_TABLE_SIZE: u32 = 16;
/// QEMU reads backing names into a buffer of this size: longer ones fail to open.
pub const MAX_BACKING_NAME: u32 = 4096;
/// An L2 entry for a cluster that reads as zeros without a host cluster.
pub const ZERO_CLUSTER: u64 = 1;

/// The header's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QedHeader {
    /// Bytes per cluster (a power of two, 4 KiB to 64 MiB).
    pub cluster_size: u32,
    /// Clusters per table (L1 and every L2; a power of two, 1 to 16).
    pub table_size: u32,
    /// Clusters of the header.
    pub header_size: u32,
    /// Feature bits (`F_*`).
    pub features: u64,
    /// Compatible feature bits (none defined; kept).
    pub compat_features: u64,
    /// Auto-clear feature bits (none defined; cleared by writers).
    pub autoclear_features: u64,
    /// Byte offset of the L1 table.
    pub l1_table_offset: u64,
    /// Virtual size in bytes (a multiple of 512).
    pub image_size: u64,
    /// Byte offset of the backing file name.
    pub backing_filename_offset: u32,
    /// Bytes of the backing file name.
    pub backing_filename_size: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidFormat, msg)
}

/// Whether `v` is a power of two in `[min, max]`.
fn pow2_in(v: u32, min: u32, max: u32) -> bool {
    v.is_power_of_two() && (min..=max).contains(&v)
}

/// The largest virtual size of an image with these clusters and tables: entries per
/// table, squared, times the cluster size, wrapping at 2^64 as QEMU computes it (so large
/// geometries allow nothing but 0).
pub fn max_image_size(cluster_size: u32, table_size: u32) -> u64 {
    let entries = u64::from(table_size) * u64::from(cluster_size) / 8;
    entries
        .wrapping_mul(entries)
        .wrapping_mul(u64::from(cluster_size))
}

/// Whether the cluster size is one QEMU accepts.
pub fn valid_cluster_size(cs: u32) -> bool {
    pow2_in(cs, MIN_CLUSTER_SIZE, MAX_CLUSTER_SIZE)
}

/// Whether the table size is one QEMU accepts.
pub fn valid_table_size(ts: u32) -> bool {
    pow2_in(ts, 1, MAX_TABLE_SIZE)
}

impl QedHeader {
    /// A new header as qemu-img writes it (the size rounded up to 512 by the caller).
    pub fn new(cluster_size: u32, table_size: u32, image_size: u64) -> Self {
        QedHeader {
            cluster_size,
            table_size,
            header_size: 1,
            features: 0,
            compat_features: 0,
            autoclear_features: 0,
            l1_table_offset: u64::from(cluster_size),
            image_size,
            backing_filename_offset: 0,
            backing_filename_size: 0,
        }
    }

    /// Parses the first 64 bytes of a file of `file_len` bytes and checks them as QEMU
    /// does, in its order and words.
    pub fn parse(b: &[u8; HEADER_BYTES], file_len: u64) -> Result<Self> {
        if &b[..4] != MAGIC {
            return Err(invalid("Image not in QED format"));
        }
        let h = QedHeader {
            cluster_size: le32(b, 4),
            table_size: le32(b, 8),
            header_size: le32(b, 12),
            features: le64(b, 16),
            compat_features: le64(b, 24),
            autoclear_features: le64(b, 32),
            l1_table_offset: le64(b, 40),
            image_size: le64(b, 48),
            backing_filename_offset: le32(b, 56),
            backing_filename_size: le32(b, 60),
        };
        if h.features & !F_ALL != 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("Unsupported QED features: {:x}", h.features & !F_ALL),
            ));
        }
        if !valid_cluster_size(h.cluster_size) {
            return Err(invalid("QED cluster size is invalid"));
        }
        if !valid_table_size(h.table_size) {
            return Err(invalid("QED table size is invalid"));
        }
        if h.image_size % 512 != 0 || h.image_size > max_image_size(h.cluster_size, h.table_size) {
            return Err(invalid("QED image size is invalid"));
        }
        if !h.table_offset_ok(h.l1_table_offset, h.file_end(file_len)) {
            return Err(invalid("QED table offset is invalid"));
        }
        if u64::from(h.header_size) > u64::from(u32::MAX / h.cluster_size) {
            return Err(invalid("QED header size is too large"));
        }
        if h.features & F_BACKING_FILE != 0 {
            let end = u64::from(h.backing_filename_offset) + u64::from(h.backing_filename_size);
            if end > h.header_bytes() {
                return Err(invalid("QED backing filename offset is invalid"));
            }
            if h.backing_filename_size >= MAX_BACKING_NAME {
                return Err(invalid("Failed to read backing filename"));
            }
        }
        Ok(h)
    }

    /// The 64 bytes of the header.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.table_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.header_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.features.to_le_bytes());
        b[24..32].copy_from_slice(&self.compat_features.to_le_bytes());
        b[32..40].copy_from_slice(&self.autoclear_features.to_le_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.image_size.to_le_bytes());
        b[56..60].copy_from_slice(&self.backing_filename_offset.to_le_bytes());
        b[60..64].copy_from_slice(&self.backing_filename_size.to_le_bytes());
        b
    }

    /// Bytes per cluster.
    pub fn cs(&self) -> u64 {
        u64::from(self.cluster_size)
    }

    /// Bytes of one table.
    pub fn table_bytes(&self) -> u64 {
        u64::from(self.table_size) * self.cs()
    }

    /// Entries of one table.
    pub fn table_entries(&self) -> u64 {
        self.table_bytes() / 8
    }

    /// Bytes of the header clusters.
    pub fn header_bytes(&self) -> u64 {
        u64::from(self.header_size) * self.cs()
    }

    /// Guest bytes one L2 table covers.
    pub fn l2_span(&self) -> u64 {
        self.table_entries() * self.cs()
    }

    /// The end of the file as QEMU sees it: its length rounded down to a cluster.
    pub fn file_end(&self, file_len: u64) -> u64 {
        file_len - file_len % self.cs()
    }

    /// QEMU's test for a cluster offset: aligned, after the header, before `file_end`.
    pub fn cluster_ok(&self, offset: u64, file_end: u64) -> bool {
        offset % self.cs() == 0 && offset >= self.header_bytes() && offset < file_end
    }

    /// QEMU's test for a table offset: its first and last clusters pass
    /// [`QedHeader::cluster_ok`], and the last lies after the first (so one-cluster tables
    /// never pass, as in QEMU).
    pub fn table_offset_ok(&self, offset: u64, file_end: u64) -> bool {
        let Some(last) = offset.checked_add(self.table_bytes() - self.cs()) else {
            return false;
        };
        last > offset && self.cluster_ok(offset, file_end) && self.cluster_ok(last, file_end)
    }

    /// Entries of the L1 table that can map guest data of this size (the rest stay zero).
    pub fn l1_entries_used(&self) -> u64 {
        self.image_size
            .div_ceil(self.l2_span())
            .min(self.table_entries())
    }

    /// Whether the backing file is named.
    pub fn has_backing(&self) -> bool {
        self.features & F_BACKING_FILE != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_img_default_header_round_trips() {
        let h = QedHeader::new(65536, 4, 1 << 30);
        let b = h.to_bytes();
        assert_eq!(&b[..16], b"QED\0\0\0\x01\0\x04\0\0\0\x01\0\0\0");
        assert_eq!(QedHeader::parse(&b, 327_680).unwrap(), h);
        assert_eq!(h.l2_span(), 2 << 30);
        assert_eq!(h.l1_entries_used(), 1);
    }

    #[test]
    fn limits_wrap_as_qemu_computes_them() {
        assert_eq!(max_image_size(65536, 4), 64 << 40);
        assert_eq!(max_image_size(4096, 2), 4 << 30);
        assert_eq!(max_image_size(4 << 20, 4), 0);
        assert_eq!(max_image_size(64 << 20, 16), 0);
    }

    #[test]
    fn one_cluster_tables_never_pass_as_in_qemu() {
        let h = QedHeader::new(65536, 1, 1 << 20);
        assert!(!h.table_offset_ok(65536, 1 << 20));
        let h = QedHeader::new(65536, 2, 1 << 20);
        assert!(h.table_offset_ok(65536, 3 * 65536));
        assert!(!h.table_offset_ok(65536, 2 * 65536));
        assert!(!h.table_offset_ok(0, 3 * 65536));
        assert!(!h.table_offset_ok(65536 + 8, 3 * 65536));
        assert!(!h.table_offset_ok(u64::MAX - 65535, u64::MAX));
    }

    #[test]
    fn open_checks_come_in_qemu_order() {
        let mut b = QedHeader::new(65536, 4, 1 << 20).to_bytes();
        b[16] = 0x8;
        b[4] = 1; // a bad cluster size too: the features are checked first
        let e = QedHeader::parse(&b, 327_680).unwrap_err();
        assert_eq!(e.to_string(), "Unsupported QED features: 8");
        b[16] = 0;
        let e = QedHeader::parse(&b, 327_680).unwrap_err();
        assert_eq!(e.to_string(), "QED cluster size is invalid");
    }
}
