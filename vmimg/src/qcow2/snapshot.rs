//! The internal snapshot table.
//!
//! ```text
//!  entry: | l1_table_offset u64 | l1_size u32 | id_len u16 | name_len u16 | date_sec u32 |
//!         | date_nsec u32 | vm_clock_nsec u64 | vm_state_size u32 | extra_size u32 |
//!         | extra (vm_state_size_large u64, disk_size u64, icount u64, ...) | id | name |
//!         | padding to 8 |
//! ```

use super::header::MAX_L1_BYTES;
use super::types::Geometry;
use thiserror::Error as ThisError;

/// QEMU's limit on the total size of the snapshot table.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
/// QEMU's limit on extra data per entry.
pub const MAX_EXTRA: u32 = 1024;

/// One internal snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Seconds since the Epoch when taken.
    pub date_sec: u32,
    /// Nanoseconds part of that time.
    pub date_nsec: u32,
    /// Guest run time in nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size in bytes.
    pub vm_state_size: u64,
    /// Virtual disk size when taken, if recorded.
    pub disk_size: Option<u64>,
    /// Record/replay instruction count, if recorded (`-1` when disabled).
    pub icount: Option<i64>,
    /// Extra data as found, kept to rewrite it unchanged.
    pub extra: Vec<u8>,
}

/// Why a snapshot table was refused.
#[derive(Clone, Debug, PartialEq, Eq, ThisError)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The table runs past its bound.
    #[error("snapshot table entry {index} at {offset:#x} runs past the end of the table area")]
    Truncated {
        /// Entry index.
        index: u32,
        /// Offset of the entry.
        offset: u64,
    },
    /// Extra data too large.
    #[error("snapshot {index} has {len} bytes of extra data (limit 1024)")]
    ExtraTooLarge {
        /// Entry index.
        index: u32,
        /// Extra data length.
        len: u32,
    },
    /// A snapshot L1 table is unaligned or too large.
    #[error("snapshot {index} L1 table at {offset:#x} with {entries} entries is invalid")]
    L1 {
        /// Entry index.
        index: u32,
        /// Offset.
        offset: u64,
        /// Entries.
        entries: u32,
    },
    /// The table is too large.
    #[error("snapshot table is larger than 64 MiB")]
    TooLarge,
    /// A name is not UTF-8.
    #[error("snapshot {0} has an ID or name that is not valid UTF-8")]
    NotUtf8(u32),
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses `count` entries from `table` (bytes read from the snapshot table offset; a short
/// buffer means the table runs past the end of the file).
pub fn parse_table(
    table: &[u8],
    count: u32,
    geometry: Geometry,
) -> Result<Vec<Snapshot>, SnapshotError> {
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let mut pos = 0usize;
    for index in 0..count {
        let truncated = SnapshotError::Truncated {
            index,
            offset: pos as u64,
        };
        let fixed = table.get(pos..pos + 40).ok_or(truncated.clone())?;
        let id_len = usize::from(be16(fixed, 12));
        let name_len = usize::from(be16(fixed, 14));
        let extra_len = be32(fixed, 36);
        if extra_len > MAX_EXTRA {
            return Err(SnapshotError::ExtraTooLarge {
                index,
                len: extra_len,
            });
        }
        let extra_start = pos + 40;
        let id_start = extra_start + extra_len as usize;
        let name_start = id_start + id_len;
        let end = name_start + name_len;
        let entry = table.get(pos..end).ok_or(truncated)?;
        let extra = &table[extra_start..id_start];
        let field = |at: usize| (extra.len() >= at + 8).then(|| be64(extra, at));
        let l1_table_offset = be64(entry, 0);
        let l1_size = be32(entry, 8);
        if l1_table_offset % geometry.cluster_size() != 0 || u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(SnapshotError::L1 {
                index,
                offset: l1_table_offset,
                entries: l1_size,
            });
        }
        let text = |r: std::ops::Range<usize>| {
            String::from_utf8(table[r].to_vec()).map_err(|_| SnapshotError::NotUtf8(index))
        };
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id: text(id_start..name_start)?,
            name: text(name_start..end)?,
            date_sec: be32(entry, 16),
            date_nsec: be32(entry, 20),
            vm_clock_nsec: be64(entry, 24),
            vm_state_size: field(0).unwrap_or(u64::from(be32(entry, 32))),
            disk_size: field(8),
            icount: field(16).map(|v| v as i64),
            extra: extra.to_vec(),
        });
        pos = end.div_ceil(8) * 8;
        if pos as u64 > MAX_TABLE_BYTES {
            return Err(SnapshotError::TooLarge);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, name: &str, extra: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 40];
        e[0..8].copy_from_slice(&0x50000u64.to_be_bytes());
        e[8..12].copy_from_slice(&2u32.to_be_bytes());
        e[12..14].copy_from_slice(&(id.len() as u16).to_be_bytes());
        e[14..16].copy_from_slice(&(name.len() as u16).to_be_bytes());
        e[16..20].copy_from_slice(&1_700_000_000u32.to_be_bytes());
        e[32..36].copy_from_slice(&77u32.to_be_bytes());
        e[36..40].copy_from_slice(&(extra.len() as u32).to_be_bytes());
        e.extend_from_slice(extra);
        e.extend_from_slice(id.as_bytes());
        e.extend_from_slice(name.as_bytes());
        while e.len() % 8 != 0 {
            e.push(0);
        }
        e
    }

    fn g() -> Geometry {
        Geometry::new(16, false)
    }

    #[test]
    fn parses_entries_with_and_without_extra_data() {
        let mut extra = vec![0u8; 24];
        extra[0..8].copy_from_slice(&5000u64.to_be_bytes());
        extra[8..16].copy_from_slice(&(1u64 << 30).to_be_bytes());
        extra[16..24].copy_from_slice(&(-1i64).to_be_bytes());
        let mut t = entry("1", "first", &extra);
        t.extend(entry("2", "second", &[]));
        let s = parse_table(&t, 2, g()).unwrap();
        assert_eq!((s[0].id.as_str(), s[0].name.as_str()), ("1", "first"));
        assert_eq!(s[0].vm_state_size, 5000);
        assert_eq!(s[0].disk_size, Some(1 << 30));
        assert_eq!(s[0].icount, Some(-1));
        assert_eq!(s[1].vm_state_size, 77);
        assert_eq!(s[1].disk_size, None);
        assert_eq!(s[1].l1_table_offset, 0x50000);
    }

    #[test]
    fn truncated_table_is_refused() {
        let t = entry("1", "first", &[]);
        assert!(matches!(
            parse_table(&t[..30], 1, g()),
            Err(SnapshotError::Truncated { index: 0, .. })
        ));
        assert!(matches!(
            parse_table(&t, 2, g()),
            Err(SnapshotError::Truncated { index: 1, .. })
        ));
    }

    #[test]
    fn oversized_extra_and_bad_l1_are_refused() {
        let mut t = entry("1", "x", &[]);
        t[36..40].copy_from_slice(&2000u32.to_be_bytes());
        assert!(matches!(
            parse_table(&t, 1, g()),
            Err(SnapshotError::ExtraTooLarge { .. })
        ));
        let mut t = entry("1", "x", &[]);
        t[0..8].copy_from_slice(&0x50001u64.to_be_bytes());
        assert!(matches!(
            parse_table(&t, 1, g()),
            Err(SnapshotError::L1 { .. })
        ));
    }
}
