//! The VDI header (VirtualBox's "Virtual Disk Image", version 1.1): a 64-byte text line,
//! then little-endian fields, 512 bytes in all; the block map follows at `offset_bmap`.

use crate::{Error, ErrorKind, Result};

/// The magic at byte 0x40.
pub const SIGNATURE: u32 = 0xbeda_107f;
/// Version 1.1, the only one QEMU and VirtualBox write.
pub const VERSION_1_1: u32 = 0x0001_0001;
/// The text line qemu-img writes.
pub const QEMU_TEXT: &[u8] = b"<<< QEMU VM Virtual Disk Image >>>\n";
/// Block size (the only one QEMU reads).
pub const BLOCK_SIZE: u32 = 1 << 20;
/// A block-map entry for a block not in the file (reads as zeros).
pub const UNALLOCATED: u32 = 0xffff_ffff;
/// A block-map entry for a discarded block (reads as zeros).
pub const DISCARDED: u32 = 0xffff_fffe;
/// Dynamic image type.
pub const TYPE_DYNAMIC: u32 = 1;
/// Static (preallocated) image type.
pub const TYPE_STATIC: u32 = 2;
/// The most blocks QEMU opens.
pub const MAX_BLOCKS: u32 = 0x3fff_ffff;
/// The largest image qemu-img creates.
pub const MAX_CREATE_SIZE: u64 = 0x1_ffff_f800_0000;

/// Whether a block-map entry names a block in the file.
pub fn allocated(entry: u32) -> bool {
    entry < DISCARDED
}

/// The header's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VdiHeader {
    /// The whole 512 bytes as read (fields below are kept in sync on write).
    raw: [u8; 512],
    /// 1: dynamic, 2: static.
    pub image_type: u32,
    /// Byte offset of the block map.
    pub offset_bmap: u32,
    /// Byte offset of the first block.
    pub offset_data: u32,
    /// Virtual size in bytes.
    pub disk_size: u64,
    /// Bytes per block.
    pub block_size: u32,
    /// Extra bytes before each block (always 0 in practice).
    pub block_extra: u32,
    /// Entries of the block map.
    pub blocks_in_image: u32,
    /// Blocks in the file.
    pub blocks_allocated: u32,
    /// The image's UUID.
    pub uuid_image: [u8; 16],
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn bad(msg: String) -> Error {
    Error::new(ErrorKind::InvalidFormat, msg)
}

fn unsupported(msg: String) -> Error {
    Error::new(ErrorKind::Unsupported, msg)
}

impl VdiHeader {
    /// Parses and checks a header as QEMU does, in QEMU's order and words; a size that is
    /// not a whole number of sectors is rounded up, as QEMU does.
    pub fn parse(b: &[u8; 512]) -> Result<Self> {
        let signature = le32(b, 0x40);
        if signature != SIGNATURE {
            return Err(bad(format!(
                "Image not in VDI format (bad signature {signature:08x})"
            )));
        }
        let version = le32(b, 0x44);
        if version != VERSION_1_1 {
            return Err(unsupported(format!(
                "unsupported VDI image (version {}.{})",
                version >> 16,
                version & 0xffff
            )));
        }
        let h = VdiHeader {
            raw: *b,
            image_type: le32(b, 0x4c),
            offset_bmap: le32(b, 0x154),
            offset_data: le32(b, 0x158),
            // A size near 2^64 cannot round up; it fails the room check below.
            disk_size: u64::from_le_bytes(b[0x170..0x178].try_into().expect("8 bytes"))
                .checked_next_multiple_of(512)
                .unwrap_or(u64::MAX),
            block_size: le32(b, 0x178),
            block_extra: le32(b, 0x17c),
            blocks_in_image: le32(b, 0x180),
            blocks_allocated: le32(b, 0x184),
            uuid_image: b[0x188..0x198].try_into().expect("16 bytes"),
        };
        let sector_size = le32(b, 0x168);
        let room = u64::from(h.blocks_in_image) * u64::from(h.block_size);
        if h.offset_bmap % 512 != 0 {
            Err(unsupported(format!(
                "unsupported VDI image (unaligned block map offset 0x{:x})",
                h.offset_bmap
            )))
        } else if h.offset_data % 512 != 0 {
            Err(unsupported(format!(
                "unsupported VDI image (unaligned data offset 0x{:x})",
                h.offset_data
            )))
        } else if sector_size != 512 {
            Err(unsupported(format!(
                "unsupported VDI image (sector size {sector_size} is not 512)"
            )))
        } else if h.block_size != BLOCK_SIZE {
            Err(unsupported(format!(
                "unsupported VDI image (block size {} is not {BLOCK_SIZE})",
                h.block_size
            )))
        } else if h.disk_size > room {
            Err(unsupported(format!(
                "unsupported VDI image (disk size {}, image bitmap has room for {room})",
                h.disk_size
            )))
        } else if b[0x1a8..0x1b8].iter().any(|&x| x != 0) {
            Err(unsupported(
                "unsupported VDI image (non-NULL link UUID)".into(),
            ))
        } else if b[0x1b8..0x1c8].iter().any(|&x| x != 0) {
            Err(unsupported(
                "unsupported VDI image (non-NULL parent UUID)".into(),
            ))
        } else if h.blocks_in_image > MAX_BLOCKS {
            Err(unsupported(format!(
                "unsupported VDI image (too many blocks {}, max is {MAX_BLOCKS})",
                h.blocks_in_image
            )))
        } else if h.block_extra != 0 {
            // QEMU ignores it and would read every block from the wrong place.
            Err(unsupported(format!(
                "unsupported VDI image ({} extra bytes per block)",
                h.block_extra
            )))
        } else {
            Ok(h)
        }
    }

    /// A new header as qemu-img writes it, with random UUIDs.
    pub fn new(size: u64, fixed: bool) -> Self {
        let disk_size = size.next_multiple_of(512);
        let blocks = u32::try_from(disk_size.div_ceil(u64::from(BLOCK_SIZE))).unwrap_or(u32::MAX);
        let bmap_bytes = (u64::from(blocks) * 4).next_multiple_of(512) as u32;
        let mut b = [0u8; 512];
        b[..QEMU_TEXT.len()].copy_from_slice(QEMU_TEXT);
        let put =
            |b: &mut [u8; 512], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put(&mut b, 0x40, SIGNATURE);
        put(&mut b, 0x44, VERSION_1_1);
        put(&mut b, 0x48, 0x180);
        let image_type = if fixed { TYPE_STATIC } else { TYPE_DYNAMIC };
        put(&mut b, 0x4c, image_type);
        put(&mut b, 0x154, 512);
        put(&mut b, 0x158, 512 + bmap_bytes);
        put(&mut b, 0x168, 512);
        b[0x170..0x178].copy_from_slice(&disk_size.to_le_bytes());
        put(&mut b, 0x178, BLOCK_SIZE);
        put(&mut b, 0x180, blocks);
        let allocated = if fixed { blocks } else { 0 };
        put(&mut b, 0x184, allocated);
        let mut ids = [0u8; 32];
        crate::format::random_bytes(&mut ids);
        for id in ids.chunks_exact_mut(16) {
            id[6] = (id[6] & 0x0f) | 0x40;
            id[8] = (id[8] & 0x3f) | 0x80;
        }
        b[0x188..0x1a8].copy_from_slice(&ids);
        VdiHeader {
            raw: b,
            image_type,
            offset_bmap: 512,
            offset_data: 512 + bmap_bytes,
            disk_size,
            block_size: BLOCK_SIZE,
            block_extra: 0,
            blocks_in_image: blocks,
            blocks_allocated: allocated,
            uuid_image: ids[..16].try_into().expect("16 bytes"),
        }
    }

    /// The header's bytes, with the current count of allocated blocks.
    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = self.raw;
        b[0x184..0x188].copy_from_slice(&self.blocks_allocated.to_le_bytes());
        b
    }

    /// Whether the image is static (all blocks allocated at creation).
    pub fn is_static(&self) -> bool {
        self.image_type == TYPE_STATIC
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_headers_match_qemu_img_fields_and_parse_back() {
        let h = VdiHeader::new(10 << 20, false);
        let b = h.to_bytes();
        assert!(b.starts_with(b"<<< QEMU VM Virtual Disk Image >>>\n"));
        assert_eq!(le32(&b, 0x158), 1024);
        assert_eq!(le32(&b, 0x180), 10);
        let back = VdiHeader::parse(&b).unwrap();
        assert_eq!(back, h);
        let mut odd = b;
        odd[0x170..0x178].copy_from_slice(&1000u64.to_le_bytes());
        assert_eq!(VdiHeader::parse(&odd).unwrap().disk_size, 1024);
        let mut wrong = b;
        wrong[0x178..0x17c].copy_from_slice(&(2u32 << 20).to_le_bytes());
        assert_eq!(
            VdiHeader::parse(&wrong).unwrap_err().to_string(),
            "unsupported VDI image (block size 2097152 is not 1048576)"
        );
    }
}
