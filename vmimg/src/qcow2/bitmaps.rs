//! The bitmap directory, parsed for `info` (bitmaps are kept, not maintained).
//!
//! ```text
//!  entry: | table_offset u64 | table_size u32 | flags u32 | type u8 | granularity_bits u8 |
//!         | name_size u16 | extra_data_size u32 | extra | name | padding to 8 |
//! ```

/// One bitmap directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapEntry {
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flags: bit 0 in_use, bit 1 auto, bit 2 extra_data_compatible.
    pub flags: u32,
    /// 1: dirty tracking bitmap.
    pub kind: u8,
    /// log2 of the bytes one bit covers.
    pub granularity_bits: u8,
    /// Name.
    pub name: String,
}

impl BitmapEntry {
    /// Bytes of guest data one bit covers.
    pub fn granularity(&self) -> u64 {
        1u64.checked_shl(u32::from(self.granularity_bits))
            .unwrap_or(0)
    }

    /// Flag names as qemu-img prints them.
    pub fn flag_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.flags & 1 != 0 {
            v.push("in-use");
        }
        if self.flags & 2 != 0 {
            v.push("auto");
        }
        v
    }
}

/// Parses `count` entries; `None` if the directory is malformed.
pub fn parse_directory(dir: &[u8], count: u32) -> Option<Vec<BitmapEntry>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    for _ in 0..count {
        let fixed = dir.get(pos..pos + 24)?;
        let name_size = usize::from(u16::from_be_bytes([fixed[18], fixed[19]]));
        let extra = u32::from_be_bytes(fixed[20..24].try_into().ok()?) as usize;
        let name_start = pos + 24 + extra;
        let name = dir.get(name_start..name_start + name_size)?;
        out.push(BitmapEntry {
            table_offset: u64::from_be_bytes(fixed[0..8].try_into().ok()?),
            table_size: u32::from_be_bytes(fixed[8..12].try_into().ok()?),
            flags: u32::from_be_bytes(fixed[12..16].try_into().ok()?),
            kind: fixed[16],
            granularity_bits: fixed[17],
            name: String::from_utf8(name.to_vec()).ok()?,
        });
        pos = (name_start + name_size).div_ceil(8) * 8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_entry_and_refuses_truncation() {
        let mut e = vec![0u8; 24];
        e[0..8].copy_from_slice(&0x70000u64.to_be_bytes());
        e[8..12].copy_from_slice(&1u32.to_be_bytes());
        e[12..16].copy_from_slice(&2u32.to_be_bytes());
        e[16] = 1;
        e[17] = 16;
        e[18..20].copy_from_slice(&3u16.to_be_bytes());
        e.extend_from_slice(b"bm0");
        e.resize(32, 0);
        let v = parse_directory(&e, 1).unwrap();
        assert_eq!(v[0].name, "bm0");
        assert_eq!(v[0].granularity(), 65536);
        assert_eq!(v[0].flag_names(), vec!["auto"]);
        assert!(parse_directory(&e[..25], 1).is_none());
        assert!(parse_directory(&e, 2).is_none());
    }
}
