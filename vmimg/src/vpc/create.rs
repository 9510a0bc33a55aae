//! New VHD images as qemu-img writes them (dynamic and fixed), and differencing disks over a
//! VHD parent (which qemu-img cannot make).
//!
//! ```text
//!  dynamic:       0 footer copy | 0x200 dynamic header | 0x600 BAT (all ones) | footer
//!  differencing:  0 footer copy | 0x200 header | 0x600 locators (W2ku, W2ru) | BAT | footer
//!  fixed:         data (a hole) | footer
//! ```

use super::disk::{
    rounded_size, DiskType, DynamicHeader, Footer, Locator, FOOTER_SIZE, HEADER_SIZE,
};
use crate::format::{FormatOptions, OptionKind, OptionSpec};
use crate::storage::{FileStorageOpen, NewFile, Permissions, PreallocMode, Storage, StorageExt};
use crate::{Error, ErrorKind, Result};
use std::path::Path;

const fn spec(name: &'static str, kind: OptionKind, help: &'static str) -> OptionSpec {
    OptionSpec { name, kind, help }
}

/// qemu-img's vpc options, and a backing file for differencing disks (vmimg's addition).
pub const CREATE_OPTIONS: &[OptionSpec] = &[
    spec("size", OptionKind::Size, "Virtual disk size"),
    spec(
        "subformat",
        OptionKind::Str,
        "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} ",
    ),
    spec(
        "force_size",
        OptionKind::Bool,
        "Force disk size calculation to use the actual size specified, rather than using the \
         nearest CHS-based calculation",
    ),
    spec(
        "backing_file",
        OptionKind::Str,
        "File name of a parent VHD (makes a differencing disk)",
    ),
    spec(
        "backing_fmt",
        OptionKind::Str,
        "Image format of the parent (vpc)",
    ),
];

/// qemu-img's "Formatting" line after `fmt=vpc`.
pub fn summary(o: &FormatOptions) -> String {
    let mut s = format!("size={}", o.size("size").unwrap_or(0));
    for k in ["subformat", "backing_file", "backing_fmt"] {
        if let Some(v) = o.str(k) {
            s += &format!(" {k}={v}");
        }
    }
    if let Some(f) = o.bool("force_size") {
        s += &format!(" force_size={}", if f { "on" } else { "off" });
    }
    s
}

/// Builder for new VHD images.
#[derive(Clone, Debug)]
pub struct VpcCreate {
    size: u64,
    fixed: bool,
    force_size: bool,
    parent: Option<String>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

/// The 2 MiB blocks qemu-img uses.
const BLOCK_SIZE: u32 = 2 << 20;

impl VpcCreate {
    /// A dynamic disk of `size` bytes (rounded as qemu-img rounds it, see
    /// [`rounded_size`]).
    pub fn new(size: u64) -> Self {
        VpcCreate {
            size,
            fixed: false,
            force_size: false,
            parent: None,
        }
    }

    /// A fixed disk (the data first, the footer after it).
    pub fn fixed(mut self, fixed: bool) -> Self {
        self.fixed = fixed;
        self
    }

    /// Keep the exact size (rounded up to a sector) instead of the next CHS geometry, as
    /// Hyper-V and Azure want it (qemu-img's `force_size`).
    pub fn force_size(mut self, on: bool) -> Self {
        self.force_size = on;
        self
    }

    /// Make a differencing disk over the VHD `name` (relative names resolve against the new
    /// image's directory).
    pub fn parent(mut self, name: impl Into<String>) -> Self {
        self.parent = Some(name.into());
        self
    }

    /// A creation from checked options.
    pub fn from_options(o: &FormatOptions) -> Result<Self> {
        let size = o
            .size("size")
            .ok_or_else(|| invalid("Image creation needs a size parameter"))?;
        let fixed = match o.str("subformat") {
            None | Some("dynamic") => false,
            Some("fixed") => true,
            Some(v) => {
                return Err(invalid(format!(
                    "Parameter 'subformat' does not accept value '{v}'"
                )))
            }
        };
        if let Some(f) = o.str("backing_fmt") {
            if f != "vpc" {
                return Err(invalid(format!(
                    "the parent of a differencing VHD must be a VHD, not {f}"
                )));
            }
        }
        let mut c = VpcCreate::new(size)
            .fixed(fixed)
            .force_size(o.bool("force_size").unwrap_or(false));
        if let Some(b) = o.str("backing_file") {
            if fixed {
                return Err(invalid("a fixed VHD cannot have a parent"));
            }
            c = c.parent(b);
        }
        Ok(c)
    }

    /// The size the image will have, and its geometry.
    pub fn size(&self) -> Result<(u64, (u16, u8, u8))> {
        rounded_size(self.size, self.force_size)
    }

    /// Creates (or truncates) the file at `path`. Nothing is created when the size cannot
    /// be represented; a create that fails halfway removes the file it made.
    pub async fn create(&self, path: &Path) -> Result<()> {
        self.size()?;
        let new = NewFile::new(path);
        // Locked as the image will be used, before the file is truncated.
        let (perm, shared) = super::VPC.permissions(true, Permissions::ALL, false)?;
        let file = new.finish(
            FileStorageOpen::new(path)
                .create(true)
                .create_permissions(perm, shared)
                .open()
                .await,
        )?;
        let result = async {
            let parent = match &self.parent {
                Some(name) => Some(read_parent(&file, name).await?),
                None => None,
            };
            self.create_on(&file, parent.as_ref()).await
        }
        .await
        .map_err(|e| e.with_operation("create").with_path(path));
        drop(file);
        new.finish(result)
    }

    /// Writes a new image over `file`; `parent` is the parent's footer and the names to
    /// store for it (differencing disks).
    pub async fn create_on(&self, file: &dyn Storage, parent: Option<&ParentInfo>) -> Result<()> {
        let (size, geometry) = self.size()?;
        if self.fixed {
            let footer = Footer::new(DiskType::Fixed, size, geometry, self.force_size);
            file.resize(0, PreallocMode::Off).await?;
            file.resize(size, PreallocMode::Off).await?;
            file.write_at(size, &footer.to_bytes()).await?;
            return file.sync().await;
        }
        let disk_type = if parent.is_some() {
            DiskType::Differencing
        } else {
            DiskType::Dynamic
        };
        let footer = Footer::new(disk_type, size, geometry, self.force_size);
        let entries = u32::try_from(size.div_ceil(u64::from(BLOCK_SIZE)))
            .map_err(|_| invalid("Disk size is too large, max size is 2040 GiB"))?;
        let mut at = (FOOTER_SIZE + HEADER_SIZE) as u64;
        let mut header = DynamicHeader {
            table_offset: 0,
            max_table_entries: entries,
            block_size: BLOCK_SIZE,
            parent_id: [0; 16],
            parent_timestamp: 0,
            parent_name: String::new(),
            locators: Vec::new(),
        };
        let mut locator_data = Vec::new();
        if let Some(p) = parent {
            header.parent_id = p.footer.unique_id;
            header.parent_timestamp = p.footer.timestamp;
            header.parent_name = p.name.clone();
            // Locators before the BAT: QEMU (which ignores them) puts new blocks after the
            // BAT, so it never overwrites them.
            for (code, path) in [(*b"W2ku", &p.absolute), (*b"W2ru", &p.relative)] {
                let data: Vec<u8> = path.encode_utf16().flat_map(u16::to_le_bytes).collect();
                let space = (data.len() as u64).div_ceil(512).max(1) * 512;
                header.locators.push(Locator {
                    code,
                    space: space as u32,
                    len: data.len() as u32,
                    offset: at,
                });
                locator_data.push((at, data));
                at += space;
            }
        }
        header.table_offset = at;
        let bat_bytes = (u64::from(entries) * 4).div_ceil(512) * 512;
        let end = at + bat_bytes;
        file.resize(0, PreallocMode::Off).await?;
        file.write_at(0, &footer.to_bytes()).await?;
        file.write_at(FOOTER_SIZE as u64, &header.to_bytes())
            .await?;
        for (offset, data) in locator_data {
            file.write_at(offset, &data).await?;
        }
        file.write_at(at, &vec![0xff; bat_bytes as usize]).await?;
        file.write_at(end, &footer.to_bytes()).await?;
        file.sync().await
    }
}

/// What a differencing disk records of its parent.
#[derive(Clone, Debug)]
pub struct ParentInfo {
    /// The parent's footer (its UUID and time stamp are recorded).
    pub footer: Footer,
    /// The name as given (stored as the parent name).
    pub name: String,
    /// The absolute path (the `W2ku` locator).
    pub absolute: String,
    /// The path relative to the new image (the `W2ru` locator).
    pub relative: String,
}

/// Reads the footer of the parent `name` (resolved against the new image's directory).
async fn read_parent(file: &dyn Storage, name: &str) -> Result<ParentInfo> {
    let resolved = file.resolve_name(name)?;
    let parent = FileStorageOpen::new(&resolved.path)
        .open()
        .await
        .map_err(|e| e.with_operation("open backing file"))?;
    let mut first = [0u8; FOOTER_SIZE];
    parent.read_at(0, &mut first).await?;
    if !first.starts_with(super::disk::FOOTER_COOKIE) {
        let end = parent.size()?.div_ceil(512) * 512;
        parent
            .read_at(end.saturating_sub(FOOTER_SIZE as u64), &mut first)
            .await?;
    }
    let footer = Footer::parse(&first).map_err(|e| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("the parent '{name}' is not a VHD: {e}"),
        )
    })?;
    let absolute = std::fs::canonicalize(&resolved.path)
        .unwrap_or(resolved.path.clone())
        .to_string_lossy()
        .into_owned();
    Ok(ParentInfo {
        footer,
        name: name.to_string(),
        absolute,
        relative: name.to_string(),
    })
}
