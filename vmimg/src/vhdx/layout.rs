//! Reading a VHDX file's structure: the current header, the log to replay, the regions,
//! the metadata items; checked as QEMU 10 checks them (its messages where it has its own),
//! with every table bounded by the file.

use super::header::{
    invalid, le32, le64, parse_metadata_table, parse_regions, unsupported, Guid, Header,
    BAT_REGION, FILE_PARAMETERS, HEADER1, HEADER2, LOGICAL_SECTOR, METADATA_REGION, MIB, PAGE_83,
    PARENT_LOCATOR, PHYSICAL_SECTOR, REGION_TABLE, VHDX_LOCATOR_TYPE, VIRTUAL_DISK_SIZE,
};
use super::log::{find_sequence, LogEntry};
use crate::storage::{Storage, StorageExt};
use crate::Result;

/// The file's signature.
pub const SIGNATURE: &[u8; 8] = b"vhdxfile";

/// The two headers as read, and which is current.
#[derive(Clone, Debug)]
pub struct Headers {
    /// The 4 KiB of each slot as read (reserved bytes are kept when rewritten).
    pub raw: [Vec<u8>; 2],
    /// The current header's slot.
    pub current: usize,
    /// The current header.
    pub header: Header,
}

/// Reads both headers and picks the current one, as QEMU does.
pub async fn read_headers(file: &dyn Storage) -> Result<Headers> {
    let mut sig = [0u8; 8];
    file.read_at(0, &mut sig).await?;
    if &sig != SIGNATURE {
        return Err(invalid("Image not in VHDX format (bad file identifier)"));
    }
    let mut raw = [vec![0u8; Header::SIZE], vec![0u8; Header::SIZE]];
    file.read_at(HEADER1, &mut raw[0]).await?;
    file.read_at(HEADER2, &mut raw[1]).await?;
    let h1 = Header::parse(&raw[0]);
    let h2 = Header::parse(&raw[1]);
    let none = || invalid("No valid VHDX header found");
    let (current, header) = match (h1, h2) {
        (Some(a), Some(b)) if a.sequence > b.sequence => (0, a),
        (Some(a), Some(b)) if b.sequence > a.sequence => (1, b),
        // Equal sequence numbers: only identical headers (Disk2VHD writes them so).
        (Some(a), Some(b)) if a == b => (0, a),
        (Some(_), Some(_)) => return Err(none()),
        (Some(a), None) => (0, a),
        (None, Some(b)) => (1, b),
        (None, None) => return Err(none()),
    };
    if Header::log_version(&raw[current]) != 0 {
        return Err(invalid("unsupported VHDX log version"));
    }
    if header.log_offset < MIB || header.log_offset % MIB != 0 {
        return Err(invalid(format!(
            "the VHDX log offset 0x{:x} is not a whole MiB past the first",
            header.log_offset
        )));
    }
    Ok(Headers {
        raw,
        current,
        header,
    })
}

/// The log entries to replay (empty when there are none, including a log GUID with no
/// valid entry, which QEMU also opens).
pub async fn pending_log(file: &dyn Storage, h: &Header) -> Result<Vec<LogEntry>> {
    if h.log_guid == [0; 16] || h.log_length == 0 {
        return Ok(Vec::new());
    }
    if u64::from(h.log_length) % MIB != 0 {
        return Err(invalid("the VHDX log length is not a whole number of MiB"));
    }
    if h.log_offset + u64::from(h.log_length) > file.size()?.next_multiple_of(MIB) {
        return Err(invalid("the VHDX log lies beyond the end of the file"));
    }
    find_sequence(file, h.log_offset, u64::from(h.log_length), &h.log_guid).await
}

/// A differencing disk's parent, as its locator names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentLocator {
    /// The parent's DataWriteGuid when this disk was made.
    pub linkage: Guid,
    /// Paths to try, in order (relative first), with `\` turned into `/`.
    pub paths: Vec<String>,
}

/// What the rest of the driver needs to know of the file.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Virtual size.
    pub size: u64,
    /// Bytes per payload block.
    pub block_size: u64,
    /// Logical sector size (512 or 4096).
    pub logical_sector: u64,
    /// Payload blocks per sector-bitmap block.
    pub chunk_ratio: u64,
    /// Where the BAT is, and its entries.
    pub bat_offset: u64,
    /// BAT entries.
    pub bat_entries: u64,
    /// Where the log is, and its bytes.
    pub log_offset: u64,
    /// Bytes of the log.
    pub log_length: u64,
    /// Ranges no payload block may overlap: headers, log, BAT, metadata.
    pub reserved: Vec<(u64, u64)>,
    /// The parent, for differencing disks.
    pub parent: Option<ParentLocator>,
}

impl Layout {
    /// Reads the region table and the metadata of `file` whose current header is `h`.
    pub async fn read(file: &dyn Storage, h: &Header) -> Result<Self> {
        let file_len = file.size()?;
        let mut rt = vec![0u8; 64 << 10];
        file.read_at(REGION_TABLE, &mut rt).await?;
        let regions = parse_regions(&rt)?;
        let mut bat = None;
        let mut meta = None;
        for r in &regions {
            let slot = if r.guid == BAT_REGION {
                &mut bat
            } else if r.guid == METADATA_REGION {
                &mut meta
            } else if r.required {
                return Err(unsupported("the VHDX file has an unknown required region"));
            } else {
                continue;
            };
            if slot.replace(*r).is_some() {
                return Err(invalid("the VHDX region table names a region twice"));
            }
        }
        let (Some(bat), Some(meta)) = (bat, meta) else {
            return Err(invalid(
                "the VHDX region table lacks the BAT or the metadata",
            ));
        };
        // Regions may not overlap each other, the headers or the log, nor leave the file.
        let log = (h.log_offset, h.log_offset + u64::from(h.log_length));
        let mut reserved = vec![(0, MIB), log];
        for r in [bat, meta] {
            let end = r.offset.checked_add(u64::from(r.length));
            let Some(end) = end.filter(|&e| e <= file_len.next_multiple_of(MIB)) else {
                return Err(invalid("a VHDX region lies beyond the end of the file"));
            };
            let range = (r.offset, end);
            if let Some(o) = reserved
                .iter()
                .find(|&&(s, e)| s < range.1 && range.0 < e && range.0 < range.1)
            {
                return Err(invalid(format!(
                    "VHDX region {}-{} overlaps with region {}-{}",
                    range.0, range.1, o.0, o.1
                )));
            }
            reserved.push(range);
        }
        let items = read_metadata(file, meta.offset, u64::from(meta.length)).await?;
        let fp = items.get(&FILE_PARAMETERS);
        let (Some(fp), Some(vs), Some(_), Some(ls), Some(_)) = (
            fp,
            items.get(&VIRTUAL_DISK_SIZE),
            items.get(&PAGE_83),
            items.get(&LOGICAL_SECTOR),
            items.get(&PHYSICAL_SECTOR),
        ) else {
            return Err(unsupported("a required VHDX metadata item is missing"));
        };
        if fp.len() < 8 || vs.len() < 8 || ls.len() < 4 {
            return Err(invalid("a VHDX metadata item is too short"));
        }
        let block_size = u64::from(le32(fp, 0));
        let has_parent = le32(fp, 4) & 2 != 0;
        if !(MIB..=256 * MIB).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(invalid(format!("unsupported VHDX block size {block_size}")));
        }
        let logical_sector = u64::from(le32(ls, 0));
        if logical_sector != 512 && logical_sector != 4096 {
            return Err(unsupported(format!(
                "unsupported VHDX logical sector size {logical_sector}"
            )));
        }
        let size = le64(vs, 0) / 512 * 512;
        if size > 64 << 40 {
            return Err(unsupported("VHDX images are at most 64 TiB"));
        }
        let parent = if has_parent {
            let Some(loc) = items.get(&PARENT_LOCATOR) else {
                return Err(invalid("a differencing VHDX without a parent locator"));
            };
            Some(parse_locator(loc)?)
        } else {
            None
        };
        let chunk_ratio = (1u64 << 23) * logical_sector / block_size;
        let blocks = size.div_ceil(block_size);
        let bat_entries = if has_parent {
            blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else if blocks == 0 {
            0
        } else {
            blocks + (blocks - 1) / chunk_ratio
        };
        if bat_entries * 8 > u64::from(bat.length) {
            return Err(invalid("the VHDX BAT region is too small for the disk"));
        }
        Ok(Layout {
            size,
            block_size,
            logical_sector,
            chunk_ratio,
            bat_offset: bat.offset,
            bat_entries,
            log_offset: h.log_offset,
            log_length: u64::from(h.log_length),
            reserved,
            parent,
        })
    }

    /// The BAT index of payload block `n`.
    pub fn payload_index(&self, n: u64) -> u64 {
        n + n / self.chunk_ratio
    }

    /// The BAT index of the sector bitmap block covering payload block `n`.
    pub fn bitmap_index(&self, n: u64) -> u64 {
        (n / self.chunk_ratio) * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// The reserved range `[start, start + len)` overlaps, if any.
    pub fn overlaps(&self, start: u64, len: u64) -> Option<(u64, u64)> {
        let end = start.saturating_add(len);
        self.reserved
            .iter()
            .copied()
            .find(|&(s, e)| s < end && start < e)
    }
}

/// The known metadata items, by GUID, each read whole (at most 1 MiB, inside the region).
async fn read_metadata(
    file: &dyn Storage,
    offset: u64,
    length: u64,
) -> Result<std::collections::HashMap<Guid, Vec<u8>>> {
    let mut table = vec![0u8; 64 << 10];
    file.read_at(offset, &mut table).await?;
    let entries = parse_metadata_table(&table)?;
    let known = [
        FILE_PARAMETERS,
        VIRTUAL_DISK_SIZE,
        PAGE_83,
        LOGICAL_SECTOR,
        PHYSICAL_SECTOR,
        PARENT_LOCATOR,
    ];
    let mut items = std::collections::HashMap::new();
    for e in entries {
        if !known.contains(&e.guid) {
            if e.required {
                return Err(unsupported(
                    "the VHDX file has an unknown required metadata item",
                ));
            }
            continue;
        }
        let end = u64::from(e.offset) + u64::from(e.length);
        if e.length > MIB as u32 || end > length {
            return Err(invalid("a VHDX metadata item lies outside its region"));
        }
        let mut b = vec![0u8; e.length as usize];
        file.read_at(offset + u64::from(e.offset), &mut b).await?;
        if items.insert(e.guid, b).is_some() {
            return Err(invalid("the VHDX metadata names an item twice"));
        }
    }
    Ok(items)
}

/// Parses a VHDX parent locator: its `parent_linkage` and paths.
fn parse_locator(b: &[u8]) -> Result<ParentLocator> {
    let bad = || invalid("the VHDX parent locator is damaged");
    if b.len() < 20 || b[..16] != VHDX_LOCATOR_TYPE {
        return Err(unsupported("unsupported VHDX parent locator type"));
    }
    let count = usize::from(u16::from_le_bytes([b[18], b[19]]));
    let utf16 = |off: u32, len: u16| -> Result<String> {
        let (s, n) = (off as usize, usize::from(len));
        let raw = b.get(s..s + n).filter(|_| n % 2 == 0).ok_or_else(bad)?;
        let units: Vec<u16> = raw
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        Ok(String::from_utf16_lossy(&units))
    };
    let mut linkage = None;
    let mut by_key = std::collections::HashMap::new();
    for i in 0..count {
        let at = 20 + 12 * i;
        let e = b.get(at..at + 12).ok_or_else(bad)?;
        let key = utf16(le32(e, 0), u16::from_le_bytes([e[8], e[9]]))?;
        let value = utf16(le32(e, 4), u16::from_le_bytes([e[10], e[11]]))?;
        if key == "parent_linkage" {
            linkage = super::header::guid_from_str(&value);
        }
        by_key.insert(key, value);
    }
    let linkage =
        linkage.ok_or_else(|| invalid("the VHDX parent locator has no parent_linkage"))?;
    let paths: Vec<String> = ["relative_path", "volume_path", "absolute_win32_path"]
        .iter()
        .filter_map(|k| by_key.get(*k))
        .map(|p| {
            let p = p.replace('\\', "/");
            let p = p.strip_prefix("//?/").unwrap_or(&p).to_string();
            p.strip_prefix("./").unwrap_or(&p).to_string()
        })
        .collect();
    if paths.is_empty() {
        return Err(invalid("the VHDX parent locator names no path"));
    }
    Ok(ParentLocator { linkage, paths })
}
