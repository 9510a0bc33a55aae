//! On-disk structures of VMDK extent files: the hosted sparse header (`KDMV`, VMware's
//! "Virtual Disk Format" technote 1.1 and 5.0), the ESX sparse header (`COWD`), the
//! stream-optimized markers, and the SESparse headers (as QEMU reads them: there is no
//! public specification).
//!
//! All integers are little-endian; sector numbers count 512-byte sectors from the start of
//! the extent file.

use crate::{Error, ErrorKind, Result};

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// Magic of a hosted sparse extent.
pub const KDMV: &[u8; 4] = b"KDMV";
/// Magic of an ESX sparse extent (VMDK3).
pub const COWD: &[u8; 4] = b"COWD";
/// `gdOffset` of a stream whose grain directory is found through the footer.
pub const GD_AT_END: u64 = u64::MAX;

/// The newline-detection bytes are valid.
pub const FLAG_NL_DETECT: u32 = 1;
/// A redundant grain directory exists.
pub const FLAG_RGD: u32 = 2;
/// A grain-table entry of 1 means "reads as zeros" (technote 5.0).
pub const FLAG_ZEROED_GRAIN: u32 = 4;
/// Grains are compressed.
pub const FLAG_COMPRESSED: u32 = 0x1_0000;
/// Grains and metadata carry markers (stream-optimized).
pub const FLAG_MARKERS: u32 = 0x2_0000;
/// `compressAlgorithm` value for deflate (zlib-wrapped, as every writer does it).
pub const COMPRESS_DEFLATE: u16 = 1;

/// Entries per grain table QEMU and VMware's hosted products write.
pub const GTES_PER_GT: u32 = 512;
/// Grain size QEMU and VMware's hosted products write, in sectors (64 KiB).
pub const GRAIN_SECTORS: u64 = 128;
/// QEMU's largest grain: 1 GiB.
pub const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
/// QEMU's largest grain directory, in entries.
pub const MAX_GD_ENTRIES: u64 = 32 * 1024 * 1024;
/// Entries of a COWD grain table (fixed).
pub const COWD_GTES: u32 = 4096;

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The 512-byte header of a hosted sparse extent (`KDMV`), also the stream footer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SparseHeader {
    /// 1 (plain), 2 (zeroed-grain entries), 3 (stream-optimized, change tracking).
    pub version: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Sectors of this extent.
    pub capacity: u64,
    /// Sectors per grain.
    pub grain_size: u64,
    /// Sector of the embedded descriptor (0: none).
    pub desc_offset: u64,
    /// Sectors reserved for the embedded descriptor.
    pub desc_size: u64,
    /// Entries per grain table.
    pub gtes_per_gt: u32,
    /// Sector of the redundant grain directory.
    pub rgd_offset: u64,
    /// Sector of the grain directory ([`GD_AT_END`]: see the footer).
    pub gd_offset: u64,
    /// Sectors of metadata before the first grain.
    pub overhead: u64,
    /// Left open by a crash (VMware's flag; QEMU neither reads nor writes it).
    pub unclean_shutdown: bool,
    /// 0: none, 1: deflate.
    pub compress_algorithm: u16,
}

impl SparseHeader {
    /// Bytes of the header.
    pub const SIZE: usize = 512;

    /// Parses a header; `None` without the `KDMV` magic.
    pub fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < Self::SIZE || &b[..4] != KDMV {
            return None;
        }
        Some(SparseHeader {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            grain_size: le64(b, 20),
            desc_offset: le64(b, 28),
            desc_size: le64(b, 36),
            gtes_per_gt: le32(b, 44),
            rgd_offset: le64(b, 48),
            gd_offset: le64(b, 56),
            overhead: le64(b, 64),
            unclean_shutdown: b[72] != 0,
            compress_algorithm: u16::from_le_bytes([b[77], b[78]]),
        })
    }

    /// The header's bytes, with the newline-detection characters VMware checks.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[..4].copy_from_slice(KDMV);
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.grain_size.to_le_bytes());
        b[28..36].copy_from_slice(&self.desc_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.desc_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        b[72] = u8::from(self.unclean_shutdown);
        b[73..77].copy_from_slice(b"\n \r\n");
        b[77..79].copy_from_slice(&self.compress_algorithm.to_le_bytes());
        b
    }

    /// Whether grains are compressed (QEMU decides by the algorithm alone, not the flag).
    pub fn compressed(&self) -> bool {
        self.compress_algorithm == COMPRESS_DEFLATE
    }
}

/// The header of an ESX sparse extent (`COWD`, 2048 bytes; only the fields readers use).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CowdHeader {
    /// Sectors of the extent.
    pub capacity: u32,
    /// Sectors per grain.
    pub grain_size: u32,
    /// Sector of the grain directory.
    pub gd_offset: u32,
    /// Entries of the grain directory.
    pub gd_entries: u32,
}

impl CowdHeader {
    /// Bytes of the header.
    pub const SIZE: usize = 2048;

    /// Parses a header; `None` without the `COWD` magic.
    pub fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < 28 || &b[..4] != COWD {
            return None;
        }
        Some(CowdHeader {
            capacity: le32(b, 12),
            grain_size: le32(b, 16),
            gd_offset: le32(b, 20),
            gd_entries: le32(b, 24),
        })
    }
}

/// Stream marker types (the `type` of a metadata marker).
pub mod marker {
    /// End of stream.
    pub const EOS: u32 = 0;
    /// A grain table follows.
    pub const GT: u32 = 1;
    /// A grain directory follows.
    pub const GD: u32 = 2;
    /// The footer follows.
    pub const FOOTER: u32 = 3;
}

/// A stream marker: a grain marker (`size` > 0: that many compressed bytes follow the 12
/// bytes of `val` (the grain's sector) and `size`) or a 512-byte metadata marker (`size` 0,
/// `kind` from [`marker`], `val` the sectors of metadata after it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Marker {
    /// The grain's first sector in the extent, or the metadata's length in sectors.
    pub val: u64,
    /// Compressed bytes (0: a metadata marker).
    pub size: u32,
    /// Metadata marker type.
    pub kind: u32,
}

impl Marker {
    /// Parses the first 16 bytes of a sector.
    pub fn parse(b: &[u8]) -> Self {
        Marker {
            val: le64(b, 0),
            size: le32(b, 8),
            kind: le32(b, 12),
        }
    }

    /// A metadata marker sector.
    pub fn metadata(kind: u32, sectors: u64) -> [u8; SECTOR as usize] {
        let mut b = [0u8; SECTOR as usize];
        b[..8].copy_from_slice(&sectors.to_le_bytes());
        b[12..16].copy_from_slice(&kind.to_le_bytes());
        b
    }
}

/// SESparse's constant header (sector 0), as QEMU checks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeSparseHeader {
    /// Sectors of the extent.
    pub capacity: u64,
    /// Sector of the volatile header.
    pub volatile_offset: u64,
    /// Sector and sectors of the grain directory.
    pub gd_offset: u64,
    /// Sectors of the grain directory.
    pub gd_size: u64,
    /// Sector of the first grain table.
    pub gt_offset: u64,
    /// Sector of the first grain.
    pub grains_offset: u64,
}

/// SESparse's grain size in sectors (the only one QEMU accepts).
pub const SESPARSE_GRAIN: u64 = 8;
/// SESparse's grain-table size in sectors (4096 entries of 8 bytes).
pub const SESPARSE_GT_SECTORS: u64 = 64;

impl SeSparseHeader {
    /// Parses and checks sector 0 of an SESparse extent, with QEMU's messages.
    pub fn parse(b: &[u8]) -> Result<Self> {
        let bad = |m: String| Error::new(ErrorKind::InvalidFormat, m);
        let f = |i: usize| le64(b, i * 8);
        if b.len() < 512 {
            return Err(bad("SESparse header truncated".into()));
        }
        if f(0) != 0xCAFE_BABE {
            return Err(bad(format!("Bad const header magic: 0x{:016x}", f(0))));
        }
        if f(1) != 0x2_0000_0001 {
            return Err(bad(format!("Unsupported version: 0x{:016x}", f(1))));
        }
        if f(3) != SESPARSE_GRAIN {
            return Err(bad(format!("Unsupported grain size: {}", f(3))));
        }
        if f(4) != SESPARSE_GT_SECTORS {
            return Err(bad(format!("Unsupported grain table size: {}", f(4))));
        }
        if f(5) != 0 {
            return Err(bad(format!("Unsupported flags: 0x{:016x}", f(5))));
        }
        if (6..10).any(|i| f(i) != 0) {
            return Err(bad(format!(
                "Unsupported reserved bits: 0x{:016x} 0x{:016x} 0x{:016x} 0x{:016x}",
                f(6),
                f(7),
                f(8),
                f(9)
            )));
        }
        // Ten (offset, size) pairs follow; the header ends with zero padding.
        if b[208..512].iter().any(|&x| x != 0) {
            return Err(bad("Unsupported non-zero const header padding".into()));
        }
        Ok(SeSparseHeader {
            capacity: f(2),
            volatile_offset: f(10),
            gd_offset: f(16),
            gd_size: f(17),
            gt_offset: f(18),
            grains_offset: f(24),
        })
    }
}

/// Checks SESparse's volatile header: a journal to replay is refused, as in QEMU.
pub fn check_sesparse_volatile(b: &[u8]) -> Result<()> {
    let bad = |m: &str| Error::new(ErrorKind::InvalidFormat, m.to_string());
    if le64(b, 0) != 0xCAFE_CAFE {
        return Err(bad("Bad volatile header magic"));
    }
    if le64(b, 24) != 0 {
        return Err(bad("Image is dirty, Replaying journal not supported"));
    }
    if b[32..512].iter().any(|&x| x != 0) {
        return Err(bad("Unsupported non-zero volatile header padding"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_matches_qemu_bytes() {
        // The first 80 bytes of `qemu-img create -f vmdk disk.vmdk 1G` (qemu-img 10.0.2).
        let qemu: [u8; 80] = [
            0x4b, 0x44, 0x4d, 0x56, 1, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0x80, 0, 0,
            0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0x15, 0,
            0, 0, 0, 0, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0x80, 1, 0, 0, 0, 0, 0, 0, 0, 0x0a, 0x20,
            0x0d, 0x0a, 0, 0, 0,
        ];
        let mut sector = [0u8; 512];
        sector[..80].copy_from_slice(&qemu);
        let h = SparseHeader::parse(&sector).unwrap();
        assert_eq!(h.capacity, 2 * 1024 * 1024);
        assert_eq!((h.gd_offset, h.rgd_offset, h.overhead), (150, 21, 384));
        assert_eq!(h.to_bytes(), sector);
        assert!(SparseHeader::parse(&[0u8; 512]).is_none());
    }

    #[test]
    fn sesparse_header_checks_like_qemu() {
        let mut b = [0u8; 512];
        let set = |b: &mut [u8; 512], i: usize, v: u64| {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes())
        };
        set(&mut b, 0, 0xCAFE_BABE);
        set(&mut b, 1, 0x2_0000_0001);
        set(&mut b, 2, 2048);
        set(&mut b, 3, 8);
        set(&mut b, 4, 64);
        assert_eq!(SeSparseHeader::parse(&b).unwrap().capacity, 2048);
        set(&mut b, 3, 16);
        let e = SeSparseHeader::parse(&b).unwrap_err();
        assert_eq!(e.to_string(), "Unsupported grain size: 16");
    }
}
