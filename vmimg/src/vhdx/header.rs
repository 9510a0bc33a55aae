//! VHDX's fixed structures ([MS-VHDX] 2.2–2.6): the file identifier, the two headers, the
//! region table, the metadata table and its items, BAT entries. Little-endian throughout;
//! every checksum is CRC-32C over the structure with its checksum field zeroed.

use crate::{Error, ErrorKind, Result};

/// A GUID as stored (Microsoft's mixed-endian layout); compared byte for byte.
pub type Guid = [u8; 16];

/// Parses `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX` (braces allowed) into the stored layout.
pub fn guid_from_str(s: &str) -> Option<Guid> {
    let s = s.trim().trim_start_matches('{').trim_end_matches('}');
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || s.len() != 36 {
        return None;
    }
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    // The first three groups are little-endian on disk.
    b[..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    Some(b)
}

/// The text form of a stored GUID, lowercase, in braces (as `parent_linkage` holds it).
pub fn guid_to_string(g: &Guid) -> String {
    let mut b = *g;
    b[..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{{{}-{}-{}-{}-{}}}",
        h[..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..].concat()
    )
}

const fn guid(s: &str) -> Guid {
    // Compile-time parse of a canonical GUID string.
    let b = s.as_bytes();
    let mut out = [0u8; 16];
    let mut i = 0;
    let mut n = 0;
    while i < b.len() {
        if b[i] != b'-' {
            let v = match b[i] {
                b'0'..=b'9' => b[i] - b'0',
                b'a'..=b'f' => b[i] - b'a' + 10,
                _ => b[i] - b'A' + 10,
            };
            if n % 2 == 0 {
                out[n / 2] = v << 4;
            } else {
                out[n / 2] |= v;
            }
            n += 1;
        }
        i += 1;
    }
    let (a0, a1, a2, a3) = (out[0], out[1], out[2], out[3]);
    out[0] = a3;
    out[1] = a2;
    out[2] = a1;
    out[3] = a0;
    let (c0, c1) = (out[4], out[5]);
    out[4] = c1;
    out[5] = c0;
    let (d0, d1) = (out[6], out[7]);
    out[6] = d1;
    out[7] = d0;
    out
}

/// The BAT region.
pub const BAT_REGION: Guid = guid("2DC27766-F623-4200-9D64-115E9BFD4A08");
/// The metadata region.
pub const METADATA_REGION: Guid = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E");
/// Metadata: block size and flags.
pub const FILE_PARAMETERS: Guid = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
/// Metadata: virtual size.
pub const VIRTUAL_DISK_SIZE: Guid = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
/// Metadata: SCSI page 83 identifier.
pub const PAGE_83: Guid = guid("BECA12AB-B2E6-4523-93EF-C309E000C746");
/// Metadata: logical sector size.
pub const LOGICAL_SECTOR: Guid = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
/// Metadata: physical sector size.
pub const PHYSICAL_SECTOR: Guid = guid("CDA348C7-445D-4471-9CC9-E9885251C556");
/// Metadata: parent locator (differencing disks).
pub const PARENT_LOCATOR: Guid = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");
/// The VHDX parent locator type.
pub const VHDX_LOCATOR_TYPE: Guid = guid("B04AEFB7-D19E-4A81-B789-25B8E9445913");

/// Offsets of the fixed structures.
pub const HEADER1: u64 = 64 << 10;
/// The second header.
pub const HEADER2: u64 = 128 << 10;
/// The region table (QEMU reads only this copy).
pub const REGION_TABLE: u64 = 192 << 10;
/// The region table's copy.
pub const REGION_TABLE2: u64 = 256 << 10;
/// One MiB: the unit of region and block placement.
pub const MIB: u64 = 1 << 20;

/// CRC-32C of `b` with the 4 bytes at `at` taken as zero.
pub fn checksum(b: &[u8], at: usize) -> u32 {
    let c = crc32c::crc32c(&b[..at]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &b[at + 4..])
}

/// Writes the checksum of `b` into its field at `at`.
pub fn seal(b: &mut [u8], at: usize) {
    let c = checksum(b, at);
    b[at..at + 4].copy_from_slice(&c.to_le_bytes());
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// A little-endian u32 at `at`.
pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// A little-endian u64 at `at`.
pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn guid_at(b: &[u8], at: usize) -> Guid {
    b[at..at + 16].try_into().expect("16 bytes")
}

pub(crate) fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidFormat, msg)
}

pub(crate) fn unsupported(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unsupported, msg)
}

/// One of the two headers (the 80 bytes that matter; the rest of the 4 KiB is kept as read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Higher is newer.
    pub sequence: u64,
    /// Changes once per session that writes the file.
    pub file_write_guid: Guid,
    /// Changes when the disk's content may have changed (a child records its parent's).
    pub data_write_guid: Guid,
    /// Non-zero: the log holds entries to replay.
    pub log_guid: Guid,
    /// Bytes of the log.
    pub log_length: u32,
    /// Where the log is.
    pub log_offset: u64,
}

impl Header {
    /// Bytes of a header structure.
    pub const SIZE: usize = 4096;

    /// Parses a header; `None` when it is not valid (signature, checksum, version 1, log
    /// version 0 are checked here as QEMU checks them for validity).
    pub fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < Self::SIZE || &b[..4] != b"head" || le16(b, 66) != 1 {
            return None;
        }
        if checksum(&b[..Self::SIZE], 4) != le32(b, 4) {
            return None;
        }
        Some(Header {
            sequence: le64(b, 8),
            file_write_guid: guid_at(b, 16),
            data_write_guid: guid_at(b, 32),
            log_guid: guid_at(b, 48),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        })
    }

    /// The log version field (0: the only one).
    pub fn log_version(b: &[u8]) -> u16 {
        le16(b, 64)
    }

    /// Writes this header over `b` (the 4 KiB as read, whose other bytes are kept), sealed.
    pub fn write_into(&self, b: &mut [u8]) {
        b[..4].copy_from_slice(b"head");
        b[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid);
        b[32..48].copy_from_slice(&self.data_write_guid);
        b[48..64].copy_from_slice(&self.log_guid);
        b[64..66].copy_from_slice(&0u16.to_le_bytes());
        b[66..68].copy_from_slice(&1u16.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        seal(&mut b[..Self::SIZE], 4);
    }
}

/// A region table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// What the region is.
    pub guid: Guid,
    /// Where it is.
    pub offset: u64,
    /// Its bytes.
    pub length: u32,
    /// Readers that do not know it must refuse the file.
    pub required: bool,
}

/// Parses the region table (64 KiB).
pub fn parse_regions(b: &[u8]) -> Result<Vec<Region>> {
    if &b[..4] != b"regi" || checksum(&b[..64 << 10], 4) != le32(b, 4) {
        return Err(invalid(
            "the VHDX region table is damaged (signature or checksum)",
        ));
    }
    let count = le32(b, 8);
    if count > 2047 {
        return Err(invalid(format!(
            "the VHDX region table has {count} entries (at most 2047)"
        )));
    }
    Ok((0..count as usize)
        .map(|i| {
            let at = 16 + 32 * i;
            Region {
                guid: guid_at(b, at),
                offset: le64(b, at + 16),
                length: le32(b, at + 24),
                required: le32(b, at + 28) & 1 != 0,
            }
        })
        .collect())
}

/// A region table (64 KiB) holding `regions`.
pub fn region_table(regions: &[Region]) -> Vec<u8> {
    let mut b = vec![0u8; 64 << 10];
    b[..4].copy_from_slice(b"regi");
    b[8..12].copy_from_slice(&(regions.len() as u32).to_le_bytes());
    for (i, r) in regions.iter().enumerate() {
        let at = 16 + 32 * i;
        b[at..at + 16].copy_from_slice(&r.guid);
        b[at + 16..at + 24].copy_from_slice(&r.offset.to_le_bytes());
        b[at + 24..at + 28].copy_from_slice(&r.length.to_le_bytes());
        b[at + 28..at + 32].copy_from_slice(&u32::from(r.required).to_le_bytes());
    }
    seal(&mut b, 4);
    b
}

/// A metadata table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetadataEntry {
    /// The item.
    pub guid: Guid,
    /// Offset from the region's start.
    pub offset: u32,
    /// Bytes.
    pub length: u32,
    /// Readers that do not know it must refuse the file.
    pub required: bool,
}

/// Parses the metadata table (the region's first 64 KiB).
pub fn parse_metadata_table(b: &[u8]) -> Result<Vec<MetadataEntry>> {
    if &b[..8] != b"metadata" {
        return Err(invalid("the VHDX metadata table has a bad signature"));
    }
    let count = usize::from(le16(b, 10));
    if count * 32 > (64 << 10) - 32 {
        return Err(invalid(format!(
            "the VHDX metadata table has {count} entries (at most 2047)"
        )));
    }
    Ok((0..count)
        .map(|i| {
            let at = 32 + 32 * i;
            MetadataEntry {
                guid: guid_at(b, at),
                offset: le32(b, at + 16),
                length: le32(b, at + 20),
                required: le32(b, at + 24) & 4 != 0,
            }
        })
        .collect())
}

/// BAT entry states.
pub mod state {
    /// Not in this file (zeros, or the parent's data).
    pub const NOT_PRESENT: u64 = 0;
    /// Undefined content (zeros here).
    pub const UNDEFINED: u64 = 1;
    /// Zeros.
    pub const ZERO: u64 = 2;
    /// Unmapped (zeros, or the parent's data).
    pub const UNMAPPED: u64 = 3;
    /// Unmapped, in version 0.95 of the specification.
    pub const UNMAPPED_V095: u64 = 5;
    /// In this file.
    pub const FULLY_PRESENT: u64 = 6;
    /// Partly in this file: the sector bitmap says which sectors (differencing disks).
    pub const PARTIALLY_PRESENT: u64 = 7;
}

/// The file offset a BAT entry names.
pub fn bat_offset(entry: u64) -> u64 {
    entry & !0xF_FFFF
}

/// A GUID made of random bytes (version 4).
pub fn new_guid() -> Guid {
    let mut g = [0u8; 16];
    crate::format::random_bytes(&mut g);
    // Version 4, RFC 4122 variant, in the stored layout (data3's high nibble is byte 7).
    g[7] = (g[7] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_use_microsofts_layout() {
        // The BAT GUID as QEMU stores it (observed bytes).
        assert_eq!(
            BAT_REGION,
            [
                0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd,
                0x4a, 0x08
            ]
        );
        let s = guid_to_string(&BAT_REGION);
        assert_eq!(s, "{2dc27766-f623-4200-9d64-115e9bfd4a08}");
        assert_eq!(guid_from_str(&s), Some(BAT_REGION));
        assert_eq!(
            guid_from_str("2DC27766-F623-4200-9D64-115E9BFD4A08"),
            Some(BAT_REGION)
        );
        assert_eq!(guid_from_str("nonsense"), None);
    }

    #[test]
    fn headers_round_trip_and_fail_on_damage() {
        let h = Header {
            sequence: 7,
            file_write_guid: new_guid(),
            data_write_guid: new_guid(),
            log_guid: [0; 16],
            log_length: 1 << 20,
            log_offset: 1 << 20,
        };
        let mut b = vec![0u8; 4096];
        h.write_into(&mut b);
        assert_eq!(Header::parse(&b), Some(h));
        b[100] ^= 1;
        assert_eq!(Header::parse(&b), None);
    }

    #[test]
    fn checksum_is_crc32c_with_the_field_zeroed() {
        // CRC-32C of "123456789" is 0xE3069283.
        let mut b = b"1234\x00\x00\x00\x0056789".to_vec();
        assert_eq!(
            checksum(&b, 4),
            crc32c::crc32c(b"1234\x00\x00\x00\x0056789")
        );
        b[4] = 0xff;
        assert_eq!(
            checksum(&b, 4),
            crc32c::crc32c(b"1234\x00\x00\x00\x0056789")
        );
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }
}
