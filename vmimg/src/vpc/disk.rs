//! VHD on-disk structures (Microsoft's Virtual Hard Disk Image Format Specification): the
//! hard disk footer, the dynamic disk header with its parent locators, and QEMU's rules for
//! the virtual size and the CHS geometry. All integers are big-endian.
//!
//! ```text
//!  fixed:        [data ......................................][footer 512]
//!  dynamic /     [footer copy 512][dynamic header 1024][(parent locators)][BAT]
//!  differencing:   [block: sector bitmap (512-padded) | block_size data] ... [footer 512]
//! ```

use crate::{Error, ErrorKind, Result};

/// Bytes of the footer.
pub const FOOTER_SIZE: usize = 512;
/// Bytes of the dynamic disk header.
pub const HEADER_SIZE: usize = 1024;
/// The footer's cookie.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// The dynamic header's cookie.
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
/// A BAT entry for a block not allocated.
pub const UNALLOCATED: u32 = 0xffff_ffff;
/// The largest virtual size QEMU opens: 0xff000000 sectors (2040 GiB).
pub const MAX_SECTORS: u64 = 0xff00_0000;
/// The largest geometry: 65535 cylinders, 16 heads, 255 sectors per track.
pub const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;
/// Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH: u64 = 946_684_800;
/// Largest BAT this code loads (16 Mi entries, 64 MiB): a 2040 GiB disk needs 1 Mi entries
/// with 2 MiB blocks; a crafted header must not make it allocate gigabytes.
pub const MAX_BAT_ENTRIES: u32 = 16 << 20;

/// The disk types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskType {
    /// Data at the start of the file, the footer after it.
    Fixed,
    /// Blocks allocated on first write, listed in the BAT.
    Dynamic,
    /// Dynamic, with a parent whose data shows where the sector bitmap says so.
    Differencing,
}

impl DiskType {
    fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidFormat, msg)
}

/// The VHD checksum: the one's complement of the byte sum, with the checksum field (4 bytes
/// at `field`) counted as zeros.
pub fn checksum(bytes: &[u8], field: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |s, (_, &b)| s.wrapping_add(u32::from(b)));
    !sum
}

/// The hard disk footer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Offset of the dynamic header (all ones for fixed disks).
    pub data_offset: u64,
    /// Seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// The application that made the image (`qemu`, `qem2`, `vpc `, `win `, ...).
    pub creator_app: [u8; 4],
    /// Its version.
    pub creator_version: u32,
    /// `Wi2k` or `Mac `.
    pub creator_os: u32,
    /// Size at creation.
    pub original_size: u64,
    /// Current virtual size.
    pub current_size: u64,
    /// Cylinders, heads, sectors per track.
    pub geometry: (u16, u8, u8),
    /// The disk type code as stored.
    pub disk_type: u32,
    /// The image's unique ID.
    pub unique_id: [u8; 16],
    /// Saved-state flag.
    pub saved_state: u8,
}

impl Footer {
    /// Parses a footer, checking its cookie and checksum (QEMU refuses a bad checksum).
    pub fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < FOOTER_SIZE || &b[..8] != FOOTER_COOKIE {
            return Err(invalid("invalid VPC image"));
        }
        if be32(b, 64) != checksum(&b[..FOOTER_SIZE], 64) {
            return Err(invalid("Incorrect header checksum"));
        }
        Ok(Footer {
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app: b[28..32].try_into().expect("4 bytes"),
            creator_version: be32(b, 32),
            creator_os: be32(b, 36),
            original_size: be64(b, 40),
            current_size: be64(b, 48),
            geometry: (be16(b, 56), b[58], b[59]),
            disk_type: be32(b, 60),
            unique_id: b[68..84].try_into().expect("16 bytes"),
            saved_state: b[84],
        })
    }

    /// The 512 bytes, checksum included.
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[..8].copy_from_slice(FOOTER_COOKIE);
        b[8..12].copy_from_slice(&2u32.to_be_bytes());
        b[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_os.to_be_bytes());
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.geometry.0.to_be_bytes());
        b[58] = self.geometry.1;
        b[59] = self.geometry.2;
        b[60..64].copy_from_slice(&self.disk_type.to_be_bytes());
        b[68..84].copy_from_slice(&self.unique_id);
        b[84] = self.saved_state;
        let sum = checksum(&b, 64);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// A new footer as qemu-img writes it.
    pub fn new(disk_type: DiskType, size: u64, geometry: (u16, u8, u8), force_size: bool) -> Self {
        Footer {
            data_offset: if disk_type == DiskType::Fixed {
                u64::MAX
            } else {
                FOOTER_SIZE as u64
            },
            timestamp: vhd_now(),
            creator_app: if force_size { *b"qem2" } else { *b"qemu" },
            creator_version: 0x0005_0003,
            creator_os: u32::from_be_bytes(*b"Wi2k"),
            original_size: size,
            current_size: size,
            geometry,
            disk_type: disk_type.code(),
            unique_id: new_uuid(),
            saved_state: 0,
        }
    }

    /// The virtual size as QEMU 10 reads it: the CHS geometry for images made by Virtual PC
    /// (`vpc `) or older QEMU (`qemu`), unless the geometry is the largest there is; the
    /// current size field for every other creator. At most 2040 GiB.
    pub fn virtual_size(&self) -> Result<u64> {
        let (c, h, s) = self.geometry;
        let chs = u64::from(c) * u64::from(h) * u64::from(s);
        let use_chs = matches!(&self.creator_app, b"vpc " | b"qemu") && chs != MAX_CHS_SECTORS;
        let sectors = if use_chs {
            chs
        } else {
            self.current_size / 512
        };
        if sectors > MAX_SECTORS {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("the virtual size of {sectors} sectors is above the 2040 GiB VHD limit"),
            ));
        }
        Ok(sectors * 512)
    }
}

/// Seconds since the VHD epoch, now.
fn vhd_now() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    u32::try_from(unix.saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX)
}

/// A random (version 4) UUID.
pub fn new_uuid() -> [u8; 16] {
    let mut id = [0u8; 16];
    crate::format::random_bytes(&mut id);
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

/// A parent locator entry of the dynamic header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locator {
    /// Platform code: `W2ru`, `W2ku`, `MacX`, ...
    pub code: [u8; 4],
    /// Space reserved for the data, as stored.
    pub space: u32,
    /// Bytes of locator data.
    pub len: u32,
    /// File offset of the data.
    pub offset: u64,
}

/// The dynamic disk header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynamicHeader {
    /// File offset of the BAT.
    pub table_offset: u64,
    /// Entries of the BAT.
    pub max_table_entries: u32,
    /// Bytes of data per block (a power of two, at least 512).
    pub block_size: u32,
    /// The parent's unique ID (differencing disks).
    pub parent_id: [u8; 16],
    /// The parent's time stamp.
    pub parent_timestamp: u32,
    /// The parent's file name (UTF-16 big-endian in the file).
    pub parent_name: String,
    /// The parent locators in use.
    pub locators: Vec<Locator>,
}

fn utf16_be(b: &[u8]) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

impl DynamicHeader {
    /// Parses a dynamic header; checks what QEMU checks (cookie, block size), with its
    /// messages.
    pub fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < HEADER_SIZE || &b[..8] != HEADER_COOKIE {
            return Err(invalid("Invalid header magic"));
        }
        let block_size = be32(b, 32);
        if !block_size.is_power_of_two() || block_size < 512 {
            return Err(invalid(format!("Invalid block size {block_size}")));
        }
        let locators = (0..8)
            .map(|i| {
                let e = &b[576 + i * 24..576 + (i + 1) * 24];
                Locator {
                    code: e[..4].try_into().expect("4 bytes"),
                    space: be32(e, 4),
                    len: be32(e, 8),
                    offset: be64(e, 16),
                }
            })
            .filter(|l| l.code != [0; 4] && l.len > 0)
            .collect();
        Ok(DynamicHeader {
            table_offset: be64(b, 16),
            max_table_entries: be32(b, 28),
            block_size,
            parent_id: b[40..56].try_into().expect("16 bytes"),
            parent_timestamp: be32(b, 56),
            parent_name: utf16_be(&b[64..576]),
            locators,
        })
    }

    /// The 1024 bytes, checksum included.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[..8].copy_from_slice(HEADER_COOKIE);
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(&self.parent_id);
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        let name: Vec<u8> = self
            .parent_name
            .encode_utf16()
            .take(255)
            .flat_map(u16::to_be_bytes)
            .collect();
        b[64..64 + name.len()].copy_from_slice(&name);
        for (i, l) in self.locators.iter().take(8).enumerate() {
            let e = &mut b[576 + i * 24..576 + (i + 1) * 24];
            e[..4].copy_from_slice(&l.code);
            e[4..8].copy_from_slice(&l.space.to_be_bytes());
            e[8..12].copy_from_slice(&l.len.to_be_bytes());
            e[16..24].copy_from_slice(&l.offset.to_be_bytes());
        }
        let sum = checksum(&b, 36);
        b[36..40].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Bytes of a block's sector bitmap, padded to a sector (QEMU's rounding).
    pub fn bitmap_size(&self) -> u64 {
        (u64::from(self.block_size) / 4096).div_ceil(512).max(1) * 512
    }
}

/// The CHS geometry of the VHD specification's appendix for `total` sectors (rounded down:
/// C×H×S may be below `total`).
pub fn geometry_for(total: u64) -> (u16, u8, u8) {
    let total = total.min(MAX_CHS_SECTORS);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / 255;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

/// The size qemu-img gives an image asked to be `size` bytes, and its geometry: rounded
/// up to a sector, then (without `force_size`) up to the next geometry product; with
/// `force_size`, or when the size needs the largest geometry, the size itself with that
/// geometry. Above 2040 GiB: refused.
pub fn rounded_size(size: u64, force_size: bool) -> Result<(u64, (u16, u8, u8))> {
    let sectors = size.div_ceil(512);
    let too_large = || {
        Error::new(
            ErrorKind::InvalidArgument,
            "Disk size is too large, max size is 2040 GiB",
        )
    };
    let max_geometry = (65535, 16, 255);
    if force_size {
        if sectors > MAX_SECTORS {
            return Err(too_large());
        }
        return Ok((sectors * 512, max_geometry));
    }
    let want = sectors.min(MAX_CHS_SECTORS);
    if want == 0 {
        // qemu-img leaves the geometry at zero for an empty disk.
        return Ok((0, (0, 0, 0)));
    }
    let mut n = want;
    let geometry = loop {
        let g = geometry_for(n);
        let chs = u64::from(g.0) * u64::from(g.1) * u64::from(g.2);
        if chs >= want || chs == MAX_CHS_SECTORS {
            break g;
        }
        n += 1;
    };
    let chs = u64::from(geometry.0) * u64::from(geometry.1) * u64::from(geometry.2);
    if chs == MAX_CHS_SECTORS {
        if sectors > MAX_SECTORS {
            return Err(too_large());
        }
        return Ok((sectors * 512, geometry));
    }
    Ok((chs * 512, geometry))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A requested size, force_size, and the size and geometry qemu-img gives.
    type SizeCase = (u64, bool, u64, (u16, u8, u8));

    /// qemu-img 10.0.2's sizes and geometries for `qemu-img create -f vpc NAME SIZE`.
    #[test]
    fn sizes_round_like_qemu_img() {
        let cases: &[SizeCase] = &[
            (1, false, 34_816, (1, 4, 17)),
            (65536, false, 69_632, (2, 4, 17)),
            (1 << 20, false, 1_079_296, (31, 4, 17)),
            (10 << 20, false, 10_514_432, (302, 4, 17)),
            (100 << 20, false, 104_865_792, (1004, 12, 17)),
            (1000 << 20, false, 1_048_707_072, (2032, 16, 63)),
            (1 << 30, false, 1_073_995_776, (2081, 16, 63)),
            (20 << 30, false, 21_475_270_656, (41611, 16, 63)),
            (127 << 30, false, 136_365_219_840, (65279, 16, 255)),
            (128 << 30, false, 137_438_953_472, (65535, 16, 255)),
            (0, false, 0, (0, 0, 0)),
            (1 << 30, true, 1 << 30, (65535, 16, 255)),
            (1_000_001, true, 1_000_448, (65535, 16, 255)),
        ];
        for &(size, force, want, geometry) in cases {
            assert_eq!(
                rounded_size(size, force).unwrap(),
                (want, geometry),
                "{size} force={force}"
            );
        }
        assert!(rounded_size(2041 << 30, false).is_err());
        assert!(rounded_size(2041 << 30, true).is_err());
    }

    #[test]
    fn footer_round_trips_and_a_bad_checksum_is_refused() {
        let f = Footer::new(DiskType::Dynamic, 1 << 30, (2081, 16, 63), false);
        let mut b = f.to_bytes();
        assert_eq!(Footer::parse(&b).unwrap(), f);
        b[100] ^= 1;
        assert_eq!(
            Footer::parse(&b).unwrap_err().to_string(),
            "Incorrect header checksum"
        );
        b[0] = b'x';
        assert_eq!(
            Footer::parse(&b).unwrap_err().to_string(),
            "invalid VPC image"
        );
    }

    #[test]
    fn virtual_size_follows_qemus_creator_rules() {
        let mut f = Footer::new(DiskType::Dynamic, 1 << 30, (2081, 16, 63), false);
        assert_eq!(f.virtual_size().unwrap(), 1_073_995_776, "qemu: CHS");
        f.creator_app = *b"vpc ";
        assert_eq!(f.virtual_size().unwrap(), 1_073_995_776, "vpc: CHS");
        for app in [b"qem2", b"win ", b"d2v ", b"tap\0", b"abcd"] {
            f.creator_app = *app;
            assert_eq!(f.virtual_size().unwrap(), 1 << 30, "{app:?}: current size");
        }
        f.creator_app = *b"qemu";
        f.geometry = (65535, 16, 255);
        assert_eq!(
            f.virtual_size().unwrap(),
            1 << 30,
            "max geometry: current size"
        );
        f.current_size = 2041 << 30;
        assert!(f.virtual_size().is_err());
    }

    #[test]
    fn header_round_trips_with_locators_and_checks_block_size() {
        let h = DynamicHeader {
            table_offset: 0x600,
            max_table_entries: 513,
            block_size: 2 << 20,
            parent_id: [7; 16],
            parent_timestamp: 42,
            parent_name: "base.vhd".into(),
            locators: vec![Locator {
                code: *b"W2ru",
                space: 512,
                len: 16,
                offset: 0x600,
            }],
        };
        let mut b = h.to_bytes();
        assert_eq!(DynamicHeader::parse(&b).unwrap(), h);
        assert_eq!(h.bitmap_size(), 512);
        b[32..36].copy_from_slice(&3_145_728u32.to_be_bytes());
        assert_eq!(
            DynamicHeader::parse(&b).unwrap_err().to_string(),
            "Invalid block size 3145728"
        );
    }
}
