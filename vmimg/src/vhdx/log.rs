//! The VHDX log ([MS-VHDX] 2.3): metadata updates are written here first, then applied;
//! after a crash the newest complete sequence of entries is replayed.
//!
//! ```text
//!  entry: [header "loge" + descriptors ("desc" 4 KiB write, "zero" range)] ... [data sectors]
//!  data sector: "data", sequence high, bytes 8..4092 of the 4 KiB, sequence low;
//!               bytes 0..8 and 4092..4096 travel in the descriptor
//! ```

use super::header::{checksum, invalid, le32, le64, seal, Guid};
use crate::storage::{Storage, StorageExt};
use crate::Result;

/// Bytes of a log sector.
pub const SECTOR: u64 = 4096;
/// The largest entry read (a larger one is not ours to trust: vmimg and QEMU write entries
/// of a few hundred KiB at most).
const MAX_ENTRY: u64 = 32 << 20;

/// One write a log entry carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogWrite {
    /// 4 KiB at a 4 KiB-aligned file offset.
    Data {
        /// Where.
        offset: u64,
        /// What.
        bytes: Vec<u8>,
    },
    /// Zeros over a 4 KiB-aligned range.
    Zero {
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
}

/// A valid log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// Its sequence number.
    pub sequence: u64,
    /// The file must be at least this long for the entry to apply.
    pub flushed: u64,
    /// The file is at least this long after the entry applies.
    pub last: u64,
    /// Its writes, in order.
    pub writes: Vec<LogWrite>,
    /// Bytes of the entry.
    length: u64,
}

/// Reads the circular log at `offset` (`length` bytes) and returns the newest complete
/// sequence of valid entries for `guid` (empty: nothing to replay).
pub async fn find_sequence(
    file: &dyn Storage,
    offset: u64,
    length: u64,
    guid: &Guid,
) -> Result<Vec<LogEntry>> {
    let sectors = length / SECTOR;
    let mut best: Vec<LogEntry> = Vec::new();
    let mut pos = 0u64;
    while pos < sectors {
        let Some(first) = read_entry(file, offset, length, pos * SECTOR, guid).await? else {
            pos += 1;
            continue;
        };
        // Follow consecutive entries with consecutive sequence numbers.
        let mut seq = vec![first];
        let mut at = pos * SECTOR;
        loop {
            let last = seq.last().expect("one entry");
            at = (at + last.length) % length;
            if seq.len() as u64 >= sectors {
                break;
            }
            match read_entry(file, offset, length, at, guid).await? {
                Some(e) if e.sequence == last.sequence + 1 => seq.push(e),
                _ => break,
            }
        }
        let newest = seq.last().map(|e| e.sequence).unwrap_or(0);
        if newest > best.last().map(|e| e.sequence).unwrap_or(0) {
            best = seq;
        }
        pos += 1;
    }
    Ok(best)
}

/// Reads `n` bytes of the circular log from log offset `at`.
async fn read_log(
    file: &dyn Storage,
    offset: u64,
    length: u64,
    at: u64,
    n: u64,
) -> Result<Vec<u8>> {
    let mut b = vec![0u8; n as usize];
    let first = (length - at).min(n);
    file.read_at(offset + at, &mut b[..first as usize]).await?;
    if first < n {
        file.read_at(offset, &mut b[first as usize..]).await?;
    }
    Ok(b)
}

/// The valid entry at log offset `at`, if any.
async fn read_entry(
    file: &dyn Storage,
    offset: u64,
    length: u64,
    at: u64,
    guid: &Guid,
) -> Result<Option<LogEntry>> {
    let head = read_log(file, offset, length, at, SECTOR).await?;
    if &head[..4] != b"loge" {
        return Ok(None);
    }
    let entry_len = u64::from(le32(&head, 8));
    let sequence = le64(&head, 16);
    let count = u64::from(le32(&head, 24));
    if entry_len == 0
        || entry_len % SECTOR != 0
        || entry_len > length
        || entry_len > MAX_ENTRY
        || sequence == 0
        || head[32..48] != guid[..]
        || count * 32 > entry_len
    {
        return Ok(None);
    }
    let b = read_log(file, offset, length, at, entry_len).await?;
    if checksum(&b, 4) != le32(&b, 4) {
        return Ok(None);
    }
    let desc_sectors = (count + 2).div_ceil(128);
    let mut writes = Vec::new();
    let mut data_sector = desc_sectors;
    for i in 0..count {
        let d = &b[(64 + 32 * i) as usize..(96 + 32 * i) as usize];
        let file_offset = le64(d, 16);
        if le64(d, 24) != sequence || file_offset % SECTOR != 0 {
            return Ok(None);
        }
        match &d[..4] {
            b"zero" => {
                let len = le64(d, 8);
                if len % SECTOR != 0 {
                    return Ok(None);
                }
                writes.push(LogWrite::Zero {
                    offset: file_offset,
                    len,
                });
            }
            b"desc" => {
                let start = data_sector * SECTOR;
                if start + SECTOR > entry_len {
                    return Ok(None);
                }
                let s = &b[start as usize..(start + SECTOR) as usize];
                let seq = (u64::from(le32(s, 4)) << 32) | u64::from(le32(s, 4092));
                if &s[..4] != b"data" || seq != sequence {
                    return Ok(None);
                }
                let mut bytes = s.to_vec();
                bytes[..8].copy_from_slice(&d[8..16]);
                bytes[4092..].copy_from_slice(&d[4..8]);
                writes.push(LogWrite::Data {
                    offset: file_offset,
                    bytes,
                });
                data_sector += 1;
            }
            _ => return Ok(None),
        }
    }
    Ok(Some(LogEntry {
        sequence,
        flushed: le64(&head, 48),
        last: le64(&head, 56),
        writes,
        length: entry_len,
    }))
}

/// An entry that writes `pages` (4 KiB each at 4 KiB-aligned offsets), for a log of
/// `guid`, placed at log offset `tail`, for a file `file_len` bytes long.
pub fn build_entry(
    guid: &Guid,
    sequence: u64,
    tail: u64,
    file_len: u64,
    pages: &[(u64, Vec<u8>)],
) -> Vec<u8> {
    let count = pages.len() as u64;
    let desc_sectors = (count + 2).div_ceil(128);
    let len = (desc_sectors + count) * SECTOR;
    let mut b = vec![0u8; len as usize];
    b[..4].copy_from_slice(b"loge");
    b[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    b[12..16].copy_from_slice(&(tail as u32).to_le_bytes());
    b[16..24].copy_from_slice(&sequence.to_le_bytes());
    b[24..28].copy_from_slice(&(count as u32).to_le_bytes());
    b[32..48].copy_from_slice(guid);
    b[48..56].copy_from_slice(&file_len.to_le_bytes());
    b[56..64].copy_from_slice(&file_len.to_le_bytes());
    for (i, (offset, page)) in pages.iter().enumerate() {
        let d = 64 + 32 * i;
        b[d..d + 4].copy_from_slice(b"desc");
        b[d + 4..d + 8].copy_from_slice(&page[4092..]);
        b[d + 8..d + 16].copy_from_slice(&page[..8]);
        b[d + 16..d + 24].copy_from_slice(&offset.to_le_bytes());
        b[d + 24..d + 32].copy_from_slice(&sequence.to_le_bytes());
        let s = ((desc_sectors + i as u64) * SECTOR) as usize;
        b[s..s + 4].copy_from_slice(b"data");
        b[s + 4..s + 8].copy_from_slice(&((sequence >> 32) as u32).to_le_bytes());
        b[s + 8..s + 4092].copy_from_slice(&page[8..4092]);
        b[s + 4092..s + 4096].copy_from_slice(&(sequence as u32).to_le_bytes());
    }
    seal(&mut b, 4);
    b
}

/// The most pages one entry carries in a log of `log_length` bytes.
pub fn pages_per_entry(log_length: u64) -> usize {
    let sectors = log_length / SECTOR;
    // n pages need ceil((n + 2) / 128) descriptor sectors more.
    let mut n = sectors.saturating_sub(1);
    while n > 0 && n + (n + 2).div_ceil(128) > sectors {
        n -= 1;
    }
    n.min(1024) as usize
}

/// Checks that `entries` can be applied to a file of `file_len` bytes.
pub fn check_applicable(entries: &[LogEntry], file_len: u64) -> Result<()> {
    // The largest file a log may ask for: `i64::MAX` rounded down to the 1 MiB the file
    // is extended by (QEMU refuses beyond `INT64_MAX` too).
    const LIMIT: u64 = (i64::MAX as u64) & !((1 << 20) - 1);
    for e in entries {
        if e.flushed > file_len {
            return Err(invalid(format!(
                "the VHDX log entry {} expects a file of {} bytes; the file has {file_len}",
                e.sequence, e.flushed
            )));
        }
        if e.last > LIMIT {
            return Err(invalid(format!(
                "the VHDX log entry {} asks for a file of {} bytes, beyond what a file can hold",
                e.sequence, e.last
            )));
        }
        for w in &e.writes {
            let (offset, len) = match w {
                LogWrite::Data { offset, bytes } => (*offset, bytes.len() as u64),
                LogWrite::Zero { offset, len } => (*offset, *len),
            };
            if offset.checked_add(len).is_none_or(|end| end > LIMIT) {
                return Err(invalid(format!(
                    "the VHDX log entry {} writes at {offset}, beyond what a file can hold",
                    e.sequence
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    #[tokio::test]
    async fn entries_round_trip_and_the_newest_sequence_wins() {
        let guid = [7u8; 16];
        let log = MemoryStorage::new();
        let page = |b: u8| (0..4096).map(|i| b ^ (i as u8)).collect::<Vec<u8>>();
        let e1 = build_entry(&guid, 5, 0, 1 << 20, &[(8192, page(1))]);
        let e2 = build_entry(&guid, 6, 0, 1 << 20, &[(4096, page(2)), (0, page(3))]);
        log.write_at(0, &e1).await.unwrap();
        log.write_at(e1.len() as u64, &e2).await.unwrap();
        // An older, unrelated sequence elsewhere.
        let old = build_entry(&[9u8; 16], 99, 0, 0, &[(0, page(4))]);
        log.write_at(64 << 10, &old).await.unwrap();
        let seq = find_sequence(&log, 0, 1 << 20, &guid).await.unwrap();
        assert_eq!(seq.len(), 2);
        assert_eq!(seq[1].sequence, 6);
        assert_eq!(
            seq[1].writes[1],
            LogWrite::Data {
                offset: 0,
                bytes: page(3)
            }
        );
        // A damaged second entry leaves the first alone.
        log.write_at(e1.len() as u64 + 5000, &[0xee]).await.unwrap();
        let seq = find_sequence(&log, 0, 1 << 20, &guid).await.unwrap();
        assert_eq!(seq.len(), 1);
        assert_eq!(seq[0].sequence, 5);
    }

    #[test]
    fn entry_sizes_fit_the_log() {
        assert_eq!(pages_per_entry(1 << 20), 254);
        let e = build_entry(&[1; 16], 1, 0, 0, &vec![(0, vec![0u8; 4096]); 254]);
        assert!(e.len() as u64 <= 1 << 20);
    }
}
