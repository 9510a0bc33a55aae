//! Finding a DMG's chunk tables as QEMU 10 finds them: the `koly` trailer near the end of
//! the file, then the `mish` tables in the resource fork (when it has a length) or in the
//! `<data>` elements of the XML property list (GLib's lenient base64), every table's chunks
//! in file order, with QEMU's limits and words.

use crate::storage::{Storage, StorageExt};
use crate::{Error, ErrorKind, Result};

/// Largest compressed chunk QEMU takes.
pub const MAX_LENGTH: u64 = 64 << 20;
/// Most sectors a chunk that holds data may have.
pub const MAX_SECTORS: u64 = MAX_LENGTH / 512;
/// Largest XML property list QEMU reads.
const MAX_XML: u64 = 16 << 20;
/// Bytes of a `mish` table before its entries.
const MISH_HEADER: usize = 204;
/// Bytes of one chunk entry.
const ENTRY: usize = 40;

/// How a chunk stores its sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkKind {
    /// Zeros (zero-fill and "ignore" chunks alike).
    Zero,
    /// Stored as they are.
    Raw,
    /// A zlib stream.
    Zlib,
    /// A bzip2 stream.
    Bzip2,
    /// An LZFSE stream.
    Lzfse,
}

/// One chunk: guest sectors `[sector, sector + count)` from `length` bytes at `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// How it is stored.
    pub kind: ChunkKind,
    /// First guest sector.
    pub sector: u64,
    /// Sectors.
    pub count: u64,
    /// Byte offset in the file.
    pub offset: u64,
    /// Bytes in the file.
    pub length: u64,
}

/// What the trailer and tables say.
#[derive(Debug)]
pub struct Tables {
    /// Virtual size in sectors.
    pub sectors: u64,
    /// Chunks in file order (QEMU searches them as if sorted, without sorting them).
    pub chunks: Vec<Chunk>,
    /// Chunk types dropped (read as I/O errors), for warnings.
    pub dropped: Vec<u32>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidFormat, msg)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads `len` bytes at `offset`; bytes past the end of the file read as zeros.
async fn read(file: &dyn Storage, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    file.read_at(offset, &mut b).await?;
    Ok(b)
}

/// Reads the trailer and every chunk table of the DMG in `file`.
pub async fn read_tables(file: &dyn Storage) -> Result<Tables> {
    // QEMU sees the file in whole sectors, and looks for the trailer's magic in a window
    // of 515 bytes ending 512 bytes before that end.
    let len = file.size()?.next_multiple_of(512);
    if len == 0 {
        return Err(invalid("dmg file must be at least 512 bytes long"));
    }
    let window = len.saturating_sub(1023);
    let scan = read(file, window, len.min(515) as usize).await?;
    let k = scan
        .windows(4)
        .position(|w| w == b"koly")
        .ok_or_else(|| invalid("Could not locate UDIF trailer in dmg file"))? as u64
        + window;
    let t = read(file, k, 512).await?;
    let data_fork = be64(&t, 0x18);
    let (rsrc, rsrc_len) = (be64(&t, 0x28), be64(&t, 0x30));
    let (xml, xml_len) = (be64(&t, 0xd8), be64(&t, 0xe0));
    let sectors = be64(&t, 0x1ec);
    if data_fork > k {
        return Err(invalid("the DMG data fork starts after the trailer"));
    }
    if rsrc >= k || rsrc_len > k - rsrc {
        return Err(invalid(
            "the DMG resource fork does not lie before the trailer",
        ));
    }
    if xml >= k || xml_len > k - xml {
        return Err(invalid(
            "the DMG property list does not lie before the trailer",
        ));
    }
    if sectors > (i64::MAX as u64) / 512 {
        return Err(Error::new(
            ErrorKind::InvalidFormat,
            "Could not refresh total sector count: File too large",
        ));
    }
    let mut t = Tables {
        sectors,
        chunks: Vec::new(),
        dropped: Vec::new(),
    };
    if rsrc_len != 0 {
        resource_fork(file, rsrc, rsrc_len, data_fork, &mut t).await?;
    } else if xml_len != 0 {
        plist(file, xml, xml_len, data_fork, &mut t).await?;
    } else {
        return Err(invalid(
            "the DMG has neither a resource fork nor a property list",
        ));
    }
    Ok(t)
}

/// The resource fork's data area: `u32 length` + blob, again and again; every blob is
/// offered to the `mish` parser (QEMU reads no resource map).
async fn resource_fork(
    file: &dyn Storage,
    at: u64,
    len: u64,
    data_fork: u64,
    t: &mut Tables,
) -> Result<()> {
    let bad = || invalid("the DMG resource fork is corrupt");
    let h = read(file, at, 16).await?;
    let data_off = u64::from(be32(&h, 0));
    let data_len = u64::from(be32(&h, 8));
    if data_off > len || data_len == 0 || data_off + data_len > len {
        return Err(bad());
    }
    let mut pos = at + data_off;
    let end = pos + data_len;
    while pos < end {
        let n = u64::from(be32(&read(file, pos, 4).await?, 0));
        if n == 0 || n > end - pos {
            return Err(bad());
        }
        let blob = read(file, pos + 4, n as usize).await?;
        mish(&blob, data_fork, t)?;
        pos += 4 + n;
    }
    Ok(())
}

/// The property list: every `<data>...</data>`, base64-decoded, is offered to the `mish`
/// parser (QEMU scans the text; it parses no XML).
async fn plist(
    file: &dyn Storage,
    at: u64,
    len: u64,
    data_fork: u64,
    t: &mut Tables,
) -> Result<()> {
    if len > MAX_XML {
        return Err(invalid("the DMG property list is larger than 16 MiB"));
    }
    let mut text = read(file, at, len as usize).await?;
    if let Some(nul) = text.iter().position(|&b| b == 0) {
        text.truncate(nul);
    }
    let find = |hay: &[u8], needle: &[u8], from: usize| {
        hay.get(from..)?
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + from)
    };
    let mut pos = 0;
    while let Some(open) = find(&text, b"<data>", pos) {
        let start = open + b"<data>".len();
        let close = find(&text, b"</data>", start)
            .ok_or_else(|| invalid("the DMG property list has a <data> element without its end"))?;
        mish(&glib_base64(&text[start..close]), data_fork, t)?;
        pos = close + b"</data>".len();
    }
    Ok(())
}

/// Base64 decoded as GLib decodes it: characters outside the alphabet are skipped, `=`
/// counts as a zero group that drops the bytes it pads, an incomplete last group yields
/// nothing.
pub fn glib_base64(text: &[u8]) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        b'=' => Some(0),
        _ => None,
    };
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut group = [0u8; 4];
    let mut pad = [false; 4];
    let mut n = 0;
    for &c in text {
        let Some(v) = value(c) else { continue };
        group[n] = v;
        pad[n] = c == b'=';
        n += 1;
        if n == 4 {
            out.push(group[0] << 2 | group[1] >> 4);
            if !pad[2] {
                out.push(group[1] << 4 | group[2] >> 2);
            }
            if !pad[3] {
                out.push(group[2] << 6 | group[3]);
            }
            n = 0;
        }
    }
    out
}

/// One `mish` table: entries from byte 204, as many as the blob holds (QEMU reads past
/// the terminator and ignores the count field). Blobs that are no `mish` table are skipped.
fn mish(blob: &[u8], data_fork: u64, t: &mut Tables) -> Result<()> {
    if blob.len() < MISH_HEADER + ENTRY || &blob[..4] != b"mish" {
        return Ok(());
    }
    let first = be64(blob, 8);
    let data = be64(blob, 0x18);
    for e in blob[MISH_HEADER..].chunks_exact(ENTRY) {
        let ty = be32(e, 0);
        let kind = match ty {
            0 | 2 => ChunkKind::Zero,
            1 => ChunkKind::Raw,
            0x8000_0005 => ChunkKind::Zlib,
            0x8000_0006 if cfg!(feature = "dmg-bzip2") => ChunkKind::Bzip2,
            0x8000_0007 if cfg!(feature = "dmg-lzfse") => ChunkKind::Lzfse,
            // Comments and terminators.
            0x7fff_fffe | 0xffff_ffff => continue,
            _ => {
                if !t.dropped.contains(&ty) {
                    t.dropped.push(ty);
                }
                continue;
            }
        };
        let index = t.chunks.len();
        let count = be64(e, 0x10);
        let length = be64(e, 0x20);
        if kind != ChunkKind::Zero && count > MAX_SECTORS {
            return Err(invalid(format!(
                "sector count {count} for chunk {index} is larger than max ({MAX_SECTORS})"
            )));
        }
        if length > MAX_LENGTH {
            return Err(invalid(format!(
                "length {length} for chunk {index} is larger than max ({MAX_LENGTH})"
            )));
        }
        t.chunks.push(Chunk {
            kind,
            sector: be64(e, 8).wrapping_add(first),
            count,
            offset: be64(e, 0x18).wrapping_add(data_fork).wrapping_add(data),
            length,
        });
    }
    Ok(())
}

/// QEMU's search for the chunk holding `sector`: a binary search over the chunks in file
/// order (right for the sorted tables real images have; on others it misses as QEMU's
/// does).
pub fn search(chunks: &[Chunk], sector: u64) -> Option<usize> {
    let n = chunks.len();
    let (mut lo, mut hi) = (0usize, n);
    while lo <= hi {
        let mid = (lo + hi) / 2;
        let c = chunks.get(mid)?;
        if c.sector > sector {
            if mid == 0 {
                return None;
            }
            hi = mid - 1;
        } else if c.sector.wrapping_add(c.count) > sector {
            return Some(mid);
        } else {
            lo = mid + 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_as_glib_decodes_it() {
        assert_eq!(glib_base64(b"bWlz\naA=="), b"mish");
        assert_eq!(glib_base64(b" b W l z a A = = "), b"mish");
        assert_eq!(glib_base64(b"bWlzaA"), b"mis");
        assert_eq!(glib_base64(b""), b"");
        assert_eq!(glib_base64(b"!!!!"), b"");
    }

    #[test]
    fn search_finds_sorted_chunks_and_misses_as_qemu_on_others() {
        let c = |sector, count| Chunk {
            kind: ChunkKind::Zero,
            sector,
            count,
            offset: 0,
            length: 0,
        };
        let sorted = [c(0, 2), c(2, 3), c(5, 1), c(8, 2)];
        assert_eq!(search(&sorted, 0), Some(0));
        assert_eq!(search(&sorted, 4), Some(1));
        assert_eq!(search(&sorted, 5), Some(2));
        assert_eq!(search(&sorted, 6), None);
        assert_eq!(search(&sorted, 9), Some(3));
        assert_eq!(search(&sorted, 10), None);
        assert_eq!(search(&[], 0), None);
        // Unsorted: QEMU's search misses sectors 2 and 3 here.
        let unsorted = [c(2, 2), c(0, 2), c(4, 2)];
        assert_eq!(search(&unsorted, 2), None);
        assert_eq!(search(&unsorted, 3), None);
        assert_eq!(search(&unsorted, 0), Some(1));
        assert_eq!(search(&unsorted, 4), Some(2));
    }
}
