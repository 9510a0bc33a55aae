//! New VHDX images, laid out as qemu-img 10 lays them out (the same offsets, items and BAT
//! states; random GUIDs and sequence numbers differ, as between two qemu-img runs).
//!
//! ```text
//!  0 "vhdxfile" + creator | 64K header 1 (seq r) | 128K header 2 (seq r + 1) | 192K, 256K
//!  region tables {BAT, metadata} | 1M log | BAT (whole MiB) | metadata (1 MiB) | 4 MiB gap |
//!  payload blocks
//! ```

use super::header::{
    new_guid, region_table, Header, Region, BAT_REGION, FILE_PARAMETERS, HEADER1, HEADER2,
    LOGICAL_SECTOR, METADATA_REGION, MIB, PAGE_83, PHYSICAL_SECTOR, REGION_TABLE, REGION_TABLE2,
    VIRTUAL_DISK_SIZE,
};
use crate::format::{FormatOptions, OptionKind, OptionSpec};
use crate::storage::{FileStorageOpen, NewFile, Permissions, PreallocMode, Storage, StorageExt};
use crate::{Error, ErrorKind, Result};
use std::path::Path;

const fn spec(name: &'static str, kind: OptionKind, help: &'static str) -> OptionSpec {
    OptionSpec { name, kind, help }
}

/// qemu-img's vhdx options.
pub const CREATE_OPTIONS: &[OptionSpec] = &[
    spec("size", OptionKind::Size, "Virtual disk size; max of 64TB."),
    spec("log_size", OptionKind::Size, "Log size; min 1MB."),
    spec(
        "block_size",
        OptionKind::Size,
        "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size.",
    ),
    spec(
        "subformat",
        OptionKind::Str,
        "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'.",
    ),
    spec(
        "block_state_zero",
        OptionKind::Bool,
        "Force use of payload blocks of type 'ZERO'. Non-standard, but default.  Do not set to \
         'off' when using 'qemu-img convert' with subformat=dynamic.",
    ),
];

/// qemu-img's "Formatting" line after `fmt=vhdx`: size, log_size and block_size always (as
/// given), then the options given.
pub fn summary(o: &FormatOptions) -> String {
    let mut s = format!(
        "size={} log_size={} block_size={}",
        o.size("size").unwrap_or(0),
        o.size("log_size").unwrap_or(MIB),
        o.size("block_size").unwrap_or(0)
    );
    if let Some(v) = o.str("subformat") {
        s += &format!(" subformat={v}");
    }
    if let Some(z) = o.bool("block_state_zero") {
        s += &format!(" block_state_zero={}", if z { "on" } else { "off" });
    }
    s
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

/// The largest VHDX (64 TiB).
pub const MAX_SIZE: u64 = 64 << 40;

/// Builder for new VHDX images.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> vmimg::Result<()> {
/// use vmimg::vhdx::VhdxCreate;
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("disk.vhdx");
/// VhdxCreate::new(10 << 30).create(&path).await?;
/// let image = vmimg::ImageOpen::path(&path)
///     .format(vmimg::Format::VHDX)
///     .writable(true)
///     .open()
///     .await?;
/// image.write(1 << 30, b"hello").await?;
/// image.flush().await?; // the block map goes through the log here
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct VhdxCreate {
    size: u64,
    block_size: u64,
    log_size: u64,
    fixed: bool,
    block_state_zero: bool,
}

impl VhdxCreate {
    /// A dynamic image of `size` bytes (rounded up to a sector), with qemu-img's defaults.
    pub fn new(size: u64) -> Self {
        VhdxCreate {
            size,
            block_size: 0,
            log_size: MIB,
            fixed: false,
            block_state_zero: true,
        }
    }

    /// Block size (0: qemu-img's choice by size).
    pub fn block_size(mut self, bytes: u64) -> Self {
        self.block_size = bytes;
        self
    }

    /// A fixed image: the whole size allocated in the file.
    pub fn fixed(mut self, fixed: bool) -> Self {
        self.fixed = fixed;
        self
    }

    /// Blocks start in state ZERO (qemu-img's default) or NOT_PRESENT / fully present.
    pub fn block_state_zero(mut self, on: bool) -> Self {
        self.block_state_zero = on;
        self
    }

    /// A creation from checked options, with qemu-img's words and rounding.
    pub fn from_options(o: &FormatOptions) -> Result<Self> {
        let size = o
            .size("size")
            .ok_or_else(|| invalid("Image creation needs a size parameter"))?;
        let mut c = VhdxCreate::new(size);
        c.log_size = o.size("log_size").unwrap_or(MIB);
        c.block_size = o.size("block_size").unwrap_or(0);
        c.fixed = match o.str("subformat") {
            None | Some("dynamic") => false,
            Some("fixed") => true,
            Some(v) => {
                return Err(invalid(format!(
                    "Parameter 'subformat' does not accept value '{v}'"
                )))
            }
        };
        c.block_state_zero = o.bool("block_state_zero").unwrap_or(true);
        Ok(c)
    }

    /// The geometry qemu-img would use: (size, block size, log size).
    fn geometry(&self) -> Result<(u64, u64, u64)> {
        let size = self.size.next_multiple_of(512);
        if size > MAX_SIZE {
            return Err(invalid("Image size too large; max of 64TB"));
        }
        if self.log_size == 0 {
            return Err(invalid("Log size must be a multiple of 1 MB"));
        }
        let log = self.log_size.next_multiple_of(MIB);
        if log >= 4 << 30 {
            return Err(invalid("Log size must be smaller than 4 GB"));
        }
        let block = if self.block_size == 0 {
            match size {
                s if s > 32 << 40 => 64 * MIB,
                s if s > 100 << 30 => 32 * MIB,
                s if s > 1 << 30 => 16 * MIB,
                _ => 8 * MIB,
            }
        } else {
            self.block_size.next_multiple_of(MIB).clamp(MIB, 256 * MIB)
        };
        if !block.is_power_of_two() {
            return Err(invalid("Block size must be a power of two"));
        }
        Ok((size, block, log))
    }

    /// Creates (or truncates) the file at `path`; a create that fails removes the file it
    /// made.
    pub async fn create(&self, path: &Path) -> Result<()> {
        self.geometry()?;
        let new = NewFile::new(path);
        let (perm, shared) = super::VHDX.permissions(true, Permissions::ALL, false)?;
        let file = new.finish(
            FileStorageOpen::new(path)
                .create(true)
                .create_permissions(perm, shared)
                .open()
                .await,
        )?;
        let result = self
            .create_on(&file)
            .await
            .map_err(|e| e.with_operation("create").with_path(path));
        drop(file);
        new.finish(result)
    }

    /// Writes a new image over `file`.
    pub async fn create_on(&self, file: &dyn Storage) -> Result<()> {
        let (size, block, log) = self.geometry()?;
        let chunk_ratio = (1u64 << 23) * 512 / block;
        let blocks = size.div_ceil(block);
        // qemu-img computes (blocks - 1) / chunk_ratio in 32 bits: an empty disk gets a huge
        // BAT. vmimg writes what the disk needs.
        let entries = if blocks == 0 {
            0
        } else {
            blocks + (blocks - 1) / chunk_ratio
        };
        let bat_offset = (MIB + log).next_multiple_of(MIB);
        let bat_len = (entries * 8).next_multiple_of(MIB).max(MIB);
        let meta_offset = bat_offset + bat_len;
        let data = meta_offset + 5 * MIB;
        file.resize(0, PreallocMode::Off).await?;
        // File identifier and creator.
        let mut id = vec![0u8; 64 << 10];
        id[..8].copy_from_slice(b"vhdxfile");
        let creator: Vec<u8> = concat!("vmimg v", env!("CARGO_PKG_VERSION"))
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        id[8..8 + creator.len()].copy_from_slice(&creator);
        file.write_at(0, &id).await?;
        // Headers: sequence r and r + 1, the same GUIDs, no log.
        let mut r = [0u8; 4];
        crate::format::random_bytes(&mut r);
        let mut h = Header {
            sequence: u64::from(u32::from_le_bytes(r)),
            file_write_guid: new_guid(),
            data_write_guid: new_guid(),
            log_guid: [0; 16],
            log_length: log as u32,
            log_offset: MIB,
        };
        for at in [HEADER1, HEADER2] {
            let mut b = vec![0u8; Header::SIZE];
            h.write_into(&mut b);
            file.write_at(at, &b).await?;
            h.sequence += 1;
        }
        let regions = region_table(&[
            Region {
                guid: BAT_REGION,
                offset: bat_offset,
                length: bat_len as u32,
                required: false,
            },
            Region {
                guid: METADATA_REGION,
                offset: meta_offset,
                length: MIB as u32,
                required: false,
            },
        ]);
        file.write_at(REGION_TABLE, &regions).await?;
        file.write_at(REGION_TABLE2, &regions).await?;
        file.write_at(meta_offset, &metadata(size, block, self.fixed))
            .await?;
        // The BAT: ZERO entries (qemu-img's default), or fully present blocks for a fixed
        // image without it; sector-bitmap entries stay 0.
        let mut bat = vec![0u8; (entries * 8) as usize];
        for n in 0..blocks {
            let idx = n + n / chunk_ratio;
            let value = if self.block_state_zero {
                super::header::state::ZERO
            } else if self.fixed {
                (data + n * block).next_multiple_of(MIB) | super::header::state::FULLY_PRESENT
            } else {
                continue;
            };
            bat[(idx * 8) as usize..(idx * 8 + 8) as usize].copy_from_slice(&value.to_le_bytes());
        }
        if bat.iter().any(|&b| b != 0) {
            file.write_at(bat_offset, &bat).await?;
        }
        let end = if self.fixed { data + size } else { data };
        file.resize(end, PreallocMode::Off).await?;
        file.sync().await
    }
}

/// The metadata region (1 MiB) qemu-img writes: the table, then the five items packed from
/// 64 KiB.
fn metadata(size: u64, block: u64, fixed: bool) -> Vec<u8> {
    let mut m = vec![0u8; MIB as usize];
    m[..8].copy_from_slice(b"metadata");
    m[10..12].copy_from_slice(&5u16.to_le_bytes());
    let items: [(super::header::Guid, u32, u32, Vec<u8>); 5] = [
        (FILE_PARAMETERS, 8, 0x4, {
            let mut v = (block as u32).to_le_bytes().to_vec();
            v.extend(u32::from(fixed).to_le_bytes());
            v
        }),
        (VIRTUAL_DISK_SIZE, 8, 0x6, size.to_le_bytes().to_vec()),
        (PAGE_83, 16, 0x6, new_guid().to_vec()),
        (LOGICAL_SECTOR, 4, 0x6, 512u32.to_le_bytes().to_vec()),
        (PHYSICAL_SECTOR, 4, 0x6, 512u32.to_le_bytes().to_vec()),
    ];
    let mut at = 64 << 10;
    for (i, (guid, len, flags, value)) in items.iter().enumerate() {
        let e = 32 + 32 * i;
        m[e..e + 16].copy_from_slice(guid);
        m[e + 16..e + 20].copy_from_slice(&(at as u32).to_le_bytes());
        m[e + 20..e + 24].copy_from_slice(&len.to_le_bytes());
        m[e + 24..e + 28].copy_from_slice(&flags.to_le_bytes());
        m[at..at + value.len()].copy_from_slice(value);
        at += *len as usize;
    }
    m
}
