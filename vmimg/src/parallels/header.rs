//! The Parallels header: 64 little-endian bytes at offset 0, the BAT (one u32 per cluster)
//! right after it, checked as QEMU 10 checks them on open.

use crate::{Error, ErrorKind, Result};

/// The magic of images whose BAT counts clusters (what QEMU writes).
pub const MAGIC_EXT: &[u8; 16] = b"WithouFreSpacExt";
/// The original magic: BAT entries count sectors.
pub const MAGIC_OLD: &[u8; 16] = b"WithoutFreeSpace";
/// The only version.
pub const VERSION: u32 = 2;
/// `inuse` while a writer has the image open.
pub const INUSE_OPEN: u32 = 0x746f_6e59;
/// Bytes of the header.
pub const HEADER_BYTES: usize = 64;
/// QEMU refuses larger catalogs.
pub const MAX_BAT_ENTRIES: u32 = (i32::MAX / 4) as u32;
/// QEMU refuses clusters of more sectors than this.
pub const MAX_TRACKS: u32 = (i32::MAX / 513) as u32;
const SECTOR: u64 = 512;

/// The header's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParallelsHeader {
    /// BAT entries count clusters (`WithouFreSpacExt`), not sectors.
    pub ext: bool,
    /// Geometry: heads (ignored).
    pub heads: u32,
    /// Geometry: cylinders (ignored).
    pub cylinders: u32,
    /// Sectors per cluster.
    pub tracks: u32,
    /// Entries of the BAT.
    pub bat_entries: u32,
    /// Virtual size in sectors (only the low 32 bits count with the old magic).
    pub nb_sectors: u64,
    /// [`INUSE_OPEN`] while a writer has the image open, else 0.
    pub inuse: u32,
    /// First sector of the data area.
    pub data_off: u32,
    /// Flags (kept as found).
    pub flags: u32,
    /// Sector of the Format Extension cluster, 0 for none.
    pub ext_off: u64,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn invalid(msg: &str) -> Error {
    Error::new(ErrorKind::InvalidFormat, msg)
}

/// QEMU's `ROUND_UP`: a mask, right for powers of two only (and reproduced for others,
/// since QEMU's data-offset test uses it so).
pub fn round_up_mask(n: u64, d: u64) -> u64 {
    n.wrapping_add(d - 1) & d.wrapping_neg()
}

impl ParallelsHeader {
    /// A header as qemu-img writes it for `size` bytes and `cs`-byte clusters (both whole
    /// sectors).
    pub fn new(size: u64, cs: u64) -> Self {
        let bat = size.div_ceil(cs) as u32;
        let data = (HEADER_BYTES as u64 + 4 * u64::from(bat)).div_ceil(cs) * cs;
        ParallelsHeader {
            ext: true,
            heads: 16,
            cylinders: (size / SECTOR / 16 / 32) as u32,
            tracks: (cs / SECTOR) as u32,
            bat_entries: bat,
            nb_sectors: size.div_ceil(SECTOR),
            inuse: 0,
            data_off: (data / SECTOR) as u32,
            flags: 0,
            ext_off: 0,
        }
    }

    /// Parses the first 64 bytes and checks them as QEMU does, in its order and words.
    pub fn parse(b: &[u8; HEADER_BYTES]) -> Result<Self> {
        let magic = &b[..16];
        let ext = magic == MAGIC_EXT;
        if le32(b, 16) != VERSION || !(ext || magic == MAGIC_OLD) {
            return Err(invalid("Image not in Parallels format"));
        }
        let mut nb_sectors = le64(b, 36);
        if !ext {
            nb_sectors &= 0xffff_ffff;
        }
        let h = ParallelsHeader {
            ext,
            heads: le32(b, 20),
            cylinders: le32(b, 24),
            tracks: le32(b, 28),
            bat_entries: le32(b, 32),
            nb_sectors,
            inuse: le32(b, 44),
            data_off: le32(b, 48),
            flags: le32(b, 52),
            ext_off: le64(b, 56),
        };
        if h.tracks == 0 {
            return Err(invalid("Invalid image: Zero sectors per track"));
        }
        if h.tracks > MAX_TRACKS {
            return Err(invalid("Invalid image: Too big cluster"));
        }
        if h.bat_entries > MAX_BAT_ENTRIES {
            return Err(invalid("Catalog too large"));
        }
        if h.ext_off >= (i64::MAX >> 9) as u64 {
            return Err(invalid("Invalid image: Too big offset"));
        }
        if h.nb_sectors > (i64::MAX as u64) / SECTOR {
            // What QEMU's block layer then says.
            return Err(invalid(
                "Could not refresh total sector count: File too large",
            ));
        }
        Ok(h)
    }

    /// The 64 bytes of the header.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[..16].copy_from_slice(if self.ext { MAGIC_EXT } else { MAGIC_OLD });
        b[16..20].copy_from_slice(&VERSION.to_le_bytes());
        b[20..24].copy_from_slice(&self.heads.to_le_bytes());
        b[24..28].copy_from_slice(&self.cylinders.to_le_bytes());
        b[28..32].copy_from_slice(&self.tracks.to_le_bytes());
        b[32..36].copy_from_slice(&self.bat_entries.to_le_bytes());
        b[36..44].copy_from_slice(&self.nb_sectors.to_le_bytes());
        b[44..48].copy_from_slice(&self.inuse.to_le_bytes());
        b[48..52].copy_from_slice(&self.data_off.to_le_bytes());
        b[52..56].copy_from_slice(&self.flags.to_le_bytes());
        b[56..64].copy_from_slice(&self.ext_off.to_le_bytes());
        b
    }

    /// Bytes per cluster.
    pub fn cs(&self) -> u64 {
        u64::from(self.tracks) * SECTOR
    }

    /// Sectors one BAT unit counts (1 with the old magic, a cluster with the new).
    pub fn off_multiplier(&self) -> u64 {
        if self.ext {
            u64::from(self.tracks)
        } else {
            1
        }
    }

    /// Bytes of the header and the BAT.
    pub fn bat_end(&self) -> u64 {
        HEADER_BYTES as u64 + 4 * u64::from(self.bat_entries)
    }

    /// QEMU's data-offset test for a file of `file_sectors` sectors: the sector the data
    /// starts at, and whether `data_off` said so (false: QEMU repairs it).
    pub fn data_start(&self, file_sectors: u64) -> (u64, bool) {
        let mut min = self.bat_end().div_ceil(SECTOR);
        if self.ext {
            min = round_up_mask(min, u64::from(self.tracks));
        }
        let off = u64::from(self.data_off);
        if !self.ext && off == 0 {
            return (min, true);
        }
        if off >= min && off <= file_sectors {
            (off, true)
        } else {
            (min, false)
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.nb_sectors * SECTOR
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_img_1g_header() {
        let h = ParallelsHeader::new(1 << 30, 1 << 20);
        let b = h.to_bytes();
        assert_eq!(&b[..16], MAGIC_EXT);
        assert_eq!(le32(&b, 24), 4096);
        assert_eq!(le32(&b, 28), 2048);
        assert_eq!(le32(&b, 32), 1024);
        assert_eq!(le64(&b, 36), 0x20_0000);
        assert_eq!(le32(&b, 48), 2048);
        assert_eq!(ParallelsHeader::parse(&b).unwrap(), h);
        assert_eq!(h.data_start(2048), (2048, true));
        assert_eq!(h.data_start(2047), (2048, false));
        assert_eq!(ParallelsHeader::new(1 << 40, 1 << 20).data_off, 10240);
    }

    #[test]
    fn old_magic_counts_32_bit_sizes_and_may_omit_the_data_offset() {
        let mut h = ParallelsHeader::new(1 << 20, 63 * 512);
        h.ext = false;
        h.data_off = 0;
        h.nb_sectors = 0x1_0000_1000;
        let p = ParallelsHeader::parse(&h.to_bytes()).unwrap();
        assert_eq!(p.size(), 0x1000 * 512);
        assert_eq!(p.off_multiplier(), 1);
        assert_eq!(p.data_start(0).0, p.bat_end().div_ceil(512));
    }

    #[test]
    fn refusals_in_qemu_order() {
        let mut b = ParallelsHeader::new(1 << 20, 4096).to_bytes();
        b[28..32].copy_from_slice(&0u32.to_le_bytes());
        b[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = ParallelsHeader::parse(&b).unwrap_err();
        assert_eq!(e.to_string(), "Invalid image: Zero sectors per track");
        b[28..32].copy_from_slice(&8u32.to_le_bytes());
        let e = ParallelsHeader::parse(&b).unwrap_err();
        assert_eq!(e.to_string(), "Catalog too large");
        b[16] = 1;
        let e = ParallelsHeader::parse(&b).unwrap_err();
        assert_eq!(e.to_string(), "Image not in Parallels format");
    }
}
