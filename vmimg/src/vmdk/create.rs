//! New VMDK images, laid out byte for byte as qemu-img 10 lays them out (but the CID).
//!
//! ```text
//!  sparse extent: 0 header | 1..20 descriptor (monolithic) | 21 redundant GD | its GTs
//!                 | GD | GTs | grains from overHead (rounded up to a grain)
//!  monolithicSparse, streamOptimized: one sparse file        (stream: compressed grains)
//!  twoGbMaxExtentSparse: descriptor file + NAME-s001.vmdk ... (2 GiB each)
//!  monolithicFlat: descriptor file + NAME-flat.vmdk; twoGbMaxExtentFlat: NAME-f001.vmdk ...
//! ```
//!
//! Every grain table is allocated up front, as QEMU does (QEMU cannot add one later).

use super::descriptor::{self, NewDescriptor, NO_PARENT};
use super::header::{
    SparseHeader, COMPRESS_DEFLATE, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NL_DETECT, FLAG_RGD,
    FLAG_ZEROED_GRAIN, GRAIN_SECTORS, GTES_PER_GT, KDMV, SECTOR,
};
use crate::format::{FormatOptions, OptionKind, OptionSpec};
use crate::storage::{FileStorageOpen, NewFile, Permissions, PreallocMode, Storage, StorageExt};
use crate::{Error, ErrorKind, Result};
use std::path::{Path, PathBuf};

const fn spec(name: &'static str, kind: OptionKind, help: &'static str) -> OptionSpec {
    OptionSpec { name, kind, help }
}

/// qemu-img's vmdk options.
pub const CREATE_OPTIONS: &[OptionSpec] = &[
    spec("size", OptionKind::Size, "Virtual disk size"),
    spec(
        "adapter_type",
        OptionKind::Str,
        "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX",
    ),
    spec("backing_file", OptionKind::Str, "File name of a base image"),
    spec("backing_fmt", OptionKind::Str, "Must be 'vmdk' if present"),
    spec("compat6", OptionKind::Bool, "VMDK version 6 image"),
    spec("hwversion", OptionKind::Str, "VMDK hardware version"),
    spec(
        "subformat",
        OptionKind::Str,
        "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | \
         twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} ",
    ),
    spec(
        "toolsversion",
        OptionKind::Str,
        "VMware guest tools version",
    ),
    spec(
        "zeroed_grain",
        OptionKind::Bool,
        "Enable efficient zero writes using the zeroed-grain GTE feature",
    ),
];

/// qemu-img's "Formatting" line after `fmt=vmdk`.
pub fn summary(o: &FormatOptions) -> String {
    let mut s = format!("size={}", o.size("size").unwrap_or(0));
    let onoff = |b: bool| if b { "on" } else { "off" };
    for k in ["backing_file", "backing_fmt", "adapter_type"] {
        if let Some(v) = o.str(k) {
            s += &format!(" {k}={v}");
        }
    }
    s += &format!(" compat6={}", onoff(o.bool("compat6").unwrap_or(false)));
    s += &format!(" hwversion={}", o.str("hwversion").unwrap_or("undefined"));
    for k in ["toolsversion", "subformat"] {
        if let Some(v) = o.str(k) {
            s += &format!(" {k}={v}");
        }
    }
    if let Some(z) = o.bool("zeroed_grain") {
        s += &format!(" zeroed_grain={}", onoff(z));
    }
    s
}

/// The kinds of VMDK image qemu-img makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subformat {
    /// One sparse file with its descriptor inside (the default).
    MonolithicSparse,
    /// A descriptor file and one flat (raw) file.
    MonolithicFlat,
    /// A descriptor file and sparse files of 2 GiB.
    TwoGbMaxExtentSparse,
    /// A descriptor file and flat files of 2 GiB.
    TwoGbMaxExtentFlat,
    /// One sparse file of compressed grains, written once each (for OVAs, uploads).
    StreamOptimized,
}

impl Subformat {
    /// qemu-img's name.
    pub fn name(self) -> &'static str {
        match self {
            Subformat::MonolithicSparse => "monolithicSparse",
            Subformat::MonolithicFlat => "monolithicFlat",
            Subformat::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            Subformat::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
            Subformat::StreamOptimized => "streamOptimized",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            Subformat::MonolithicSparse,
            Subformat::MonolithicFlat,
            Subformat::TwoGbMaxExtentSparse,
            Subformat::TwoGbMaxExtentFlat,
            Subformat::StreamOptimized,
        ]
        .into_iter()
        .find(|f| f.name() == s)
    }

    fn flat(self) -> bool {
        matches!(
            self,
            Subformat::MonolithicFlat | Subformat::TwoGbMaxExtentFlat
        )
    }

    fn split(self) -> bool {
        matches!(
            self,
            Subformat::TwoGbMaxExtentSparse | Subformat::TwoGbMaxExtentFlat
        )
    }
}

/// Builder for new VMDK images.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> vmimg::Result<()> {
/// use vmimg::vmdk::{Subformat, VmdkCreate};
/// use vmimg::{Format, ImageOpen};
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("disk.vmdk");
/// // A split disk: disk.vmdk (the descriptor), disk-s001.vmdk, disk-s002.vmdk.
/// VmdkCreate::new(3 << 30)
///     .subformat(Subformat::TwoGbMaxExtentSparse)
///     .create(&path)
///     .await?;
/// let image = ImageOpen::path(&path)
///     .format(Format::VMDK)
///     .writable(true)
///     .open()
///     .await?;
/// image.write(2 << 30, b"crosses into the second extent").await?;
/// image.flush().await?;
/// assert_eq!(image.size(), 3 << 30);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct VmdkCreate {
    size: u64,
    subformat: Subformat,
    adapter: String,
    hw_version: String,
    tools_version: String,
    zeroed_grain: bool,
    parent: Option<String>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

/// Bytes per extent of the split subformats (qemu-img's: exactly 2 GiB).
const SPLIT_BYTES: u64 = 2 << 30;

impl VmdkCreate {
    /// A monolithicSparse image of `size` bytes (rounded up to a sector).
    pub fn new(size: u64) -> Self {
        VmdkCreate {
            size,
            subformat: Subformat::MonolithicSparse,
            adapter: "ide".into(),
            hw_version: "4".into(),
            tools_version: "2147483647".into(),
            zeroed_grain: false,
            parent: None,
        }
    }

    /// The subformat.
    pub fn subformat(mut self, f: Subformat) -> Self {
        self.subformat = f;
        self
    }

    /// Zeroed-grain entries (efficient zero writes; sparse subformats only).
    pub fn zeroed_grain(mut self, on: bool) -> Self {
        self.zeroed_grain = on;
        self
    }

    /// Make the image over the VMDK `name` (relative names resolve against the new image's
    /// directory); its CID is recorded.
    pub fn parent(mut self, name: impl Into<String>) -> Self {
        self.parent = Some(name.into());
        self
    }

    /// A creation from checked options, refused with qemu-img's words.
    pub fn from_options(o: &FormatOptions) -> Result<Self> {
        let size = o
            .size("size")
            .ok_or_else(|| invalid("Image creation needs a size parameter"))?;
        let mut c = VmdkCreate::new(size);
        if let Some(v) = o.str("subformat") {
            c.subformat = Subformat::parse(v)
                .ok_or_else(|| invalid(format!("invalid parameter value: {v}")))?;
        }
        if let Some(a) = o.str("adapter_type") {
            if !["ide", "buslogic", "lsilogic", "legacyESX"].contains(&a) {
                return Err(invalid(format!("invalid parameter value: {a}")));
            }
            c.adapter = a.into();
        }
        let compat6 = o.bool("compat6").unwrap_or(false);
        match o.str("hwversion") {
            Some(_) if compat6 => {
                return Err(invalid("compat6 cannot be enabled with hwversion set"))
            }
            Some(h) => c.hw_version = h.into(),
            None if compat6 => c.hw_version = "6".into(),
            None => {}
        }
        if let Some(t) = o.str("toolsversion") {
            c.tools_version = t.into();
        }
        c.zeroed_grain = o.bool("zeroed_grain").unwrap_or(false);
        if c.subformat.flat() && c.zeroed_grain {
            return Err(invalid("Flat image can't enable zeroed grain"));
        }
        if let Some(b) = o.str("backing_file") {
            if c.subformat.flat() {
                return Err(invalid("Flat image can't have backing file"));
            }
            if o.str("backing_fmt").is_some_and(|f| f != "vmdk") {
                return Err(invalid("backing_file must be a vmdk image"));
            }
            c.parent = Some(b.into());
        }
        Ok(c)
    }

    /// Creates the image at `path` (and its extent files beside it). A create that fails
    /// removes the files it made.
    pub async fn create(&self, path: &Path) -> Result<()> {
        let sectors = self.size.div_ceil(SECTOR);
        let parent_cid = match &self.parent {
            Some(p) => parent_cid(path, p).await?,
            None => NO_PARENT,
        };
        let (perm, shared) = super::VMDK.permissions(true, Permissions::ALL, false)?;
        let mut made: Vec<NewFile> = Vec::new();
        let result = async {
            let open = |p: PathBuf| async move {
                FileStorageOpen::new(&p)
                    .create(true)
                    .create_permissions(perm, shared)
                    .open()
                    .await
            };
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if matches!(
                self.subformat,
                Subformat::MonolithicSparse | Subformat::StreamOptimized
            ) {
                made.push(NewFile::new(path));
                let file = open(path.to_path_buf()).await?;
                let text = self.descriptor(parent_cid, vec![(sectors, "SPARSE", name, None)]);
                write_sparse(&file, sectors, self.header_flags(), Some(&text)).await?;
                return file.sync().await;
            }
            // A descriptor file and its extents.
            let pieces: Vec<u64> = if self.subformat.split() {
                let per = SPLIT_BYTES / SECTOR;
                (0..sectors.div_ceil(per))
                    .map(|i| (sectors - i * per).min(per))
                    .collect()
            } else if sectors > 0 {
                vec![sectors]
            } else {
                // As qemu-img: an empty disk has no extent.
                Vec::new()
            };
            let mut lines = Vec::new();
            for (i, &n) in pieces.iter().enumerate() {
                let suffix = match self.subformat {
                    Subformat::MonolithicFlat => "-flat".to_string(),
                    Subformat::TwoGbMaxExtentFlat => format!("-f{:03}", i + 1),
                    _ => format!("-s{:03}", i + 1),
                };
                let ext_path = extent_path(path, &suffix);
                let ext_name = ext_path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                made.push(NewFile::new(&ext_path));
                let file = open(ext_path).await?;
                if self.subformat.flat() {
                    file.resize(0, PreallocMode::Off).await?;
                    file.resize(n * SECTOR, PreallocMode::Off).await?;
                    lines.push((n, "FLAT", ext_name, Some(0)));
                } else {
                    write_sparse(&file, n, self.header_flags(), None).await?;
                    lines.push((n, "SPARSE", ext_name, None));
                }
                file.sync().await?;
            }
            made.push(NewFile::new(path));
            let file = open(path.to_path_buf()).await?;
            let text = self.descriptor(parent_cid, lines);
            file.resize(0, PreallocMode::Off).await?;
            file.write_at(0, text.as_bytes()).await?;
            file.sync().await
        }
        .await
        .map_err(|e| e.with_operation("create").with_path(path));
        if result.is_err() {
            for f in &made {
                f.remove_if_new();
            }
        }
        result
    }

    /// Writes a one-file image (monolithicSparse or streamOptimized, without a parent)
    /// over `file`, named `name` in its descriptor; other subformats need files beside it
    /// ([`VmdkCreate::create`]).
    pub async fn create_on(&self, file: &dyn Storage, name: &str) -> Result<()> {
        if !matches!(
            self.subformat,
            Subformat::MonolithicSparse | Subformat::StreamOptimized
        ) || self.parent.is_some()
        {
            return Err(invalid(
                "only one-file images without a parent can be written to a storage",
            ));
        }
        let sectors = self.size.div_ceil(SECTOR);
        let text = self.descriptor(NO_PARENT, vec![(sectors, "SPARSE", name.into(), None)]);
        write_sparse(file, sectors, self.header_flags(), Some(&text)).await?;
        file.sync().await
    }

    fn header_flags(&self) -> (u32, u32, u16) {
        let stream = self.subformat == Subformat::StreamOptimized;
        let mut flags = FLAG_NL_DETECT | FLAG_RGD;
        if self.zeroed_grain {
            flags |= FLAG_ZEROED_GRAIN;
        }
        if stream {
            flags |= FLAG_COMPRESSED | FLAG_MARKERS;
        }
        let version = if stream {
            3
        } else if self.zeroed_grain {
            2
        } else {
            1
        };
        (version, flags, if stream { COMPRESS_DEFLATE } else { 0 })
    }

    fn descriptor(
        &self,
        parent_cid: u32,
        extents: Vec<(u64, &'static str, String, Option<u64>)>,
    ) -> String {
        NewDescriptor {
            cid: descriptor::new_cid(),
            parent_cid,
            create_type: self.subformat.name(),
            parent_hint: self.parent.as_deref(),
            extents,
            hw_version: &self.hw_version,
            size: self.size.div_ceil(SECTOR) * SECTOR,
            adapter: &self.adapter,
            tools_version: &self.tools_version,
        }
        .render()
    }
}

/// `dir/name.ext` with `suffix` before the extension (qemu-img's extent names).
fn extent_path(path: &Path, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (stem, ext) = match name.rfind('.') {
        Some(i) => (&name[..i], &name[i..]),
        None => (name.as_str(), ""),
    };
    path.with_file_name(format!("{stem}{suffix}{ext}"))
}

/// The layout of a new sparse extent of `sectors` sectors: (redundant GD, GD, overhead),
/// in sectors, and the GT count.
pub fn sparse_layout(sectors: u64) -> (u64, u64, u64, u64) {
    let grains = sectors.div_ceil(GRAIN_SECTORS);
    let gts = grains.div_ceil(u64::from(GTES_PER_GT));
    let gt_sectors = u64::from(GTES_PER_GT) * 4 / SECTOR;
    let gd_sectors = (gts * 4).div_ceil(SECTOR);
    let rgd = 21;
    let gd = rgd + gd_sectors + gts * gt_sectors;
    let overhead = (gd + gd_sectors + gts * gt_sectors).next_multiple_of(GRAIN_SECTORS);
    (rgd, gd, overhead, gts)
}

/// Writes a new sparse extent over `file`: header, descriptor (if any), both directories
/// with their (empty) tables, and the file truncated to the first grain.
async fn write_sparse(
    file: &dyn Storage,
    sectors: u64,
    (version, flags, compress): (u32, u32, u16),
    text: Option<&str>,
) -> Result<()> {
    let (rgd, gd, overhead, gts) = sparse_layout(sectors);
    let gt_sectors = u64::from(GTES_PER_GT) * 4 / SECTOR;
    let gd_sectors = (gts * 4).div_ceil(SECTOR);
    let h = SparseHeader {
        version,
        flags,
        capacity: sectors,
        grain_size: GRAIN_SECTORS,
        desc_offset: 1,
        desc_size: 20,
        gtes_per_gt: GTES_PER_GT,
        rgd_offset: rgd,
        gd_offset: gd,
        overhead,
        unclean_shutdown: false,
        compress_algorithm: compress,
    };
    let mut head = vec![0u8; 21 * SECTOR as usize];
    head[..512].copy_from_slice(&h.to_bytes());
    debug_assert_eq!(&head[..4], KDMV);
    if let Some(t) = text {
        if t.len() > 20 * SECTOR as usize {
            return Err(invalid("the descriptor does not fit in 20 sectors"));
        }
        head[512..512 + t.len()].copy_from_slice(t.as_bytes());
    }
    let used = if text.is_some() { head.len() } else { 512 };
    file.resize(0, PreallocMode::Off).await?;
    file.write_at(0, &head[..used]).await?;
    // Both directories, each pointing at its tables; the tables stay holes (zeros).
    for (dir, first_gt) in [(rgd, rgd + gd_sectors), (gd, gd + gd_sectors)] {
        let mut entries = vec![0u8; (gd_sectors * SECTOR) as usize];
        for (i, e) in entries.chunks_exact_mut(4).take(gts as usize).enumerate() {
            let gt = u32::try_from(first_gt + i as u64 * gt_sectors)
                .map_err(|_| invalid("the image is too large for VMDK grain tables"))?;
            e.copy_from_slice(&gt.to_le_bytes());
        }
        file.write_at(dir * SECTOR, &entries).await?;
    }
    file.resize(overhead * SECTOR, PreallocMode::Off).await
}

/// The CID of the parent `name` (resolved against the new image's directory), read from
/// its descriptor.
async fn parent_cid(image: &Path, name: &str) -> Result<u32> {
    let dir = image.parent().unwrap_or(Path::new(""));
    let p = if Path::new(name).is_absolute() {
        PathBuf::from(name)
    } else {
        dir.join(name)
    };
    let fail = |e: Error| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("Could not open backing image: {e}"),
        )
    };
    let file = FileStorageOpen::new(&p)
        .open()
        .await
        .map_err(|e| fail(e.with_path(&p)))?;
    let size = file.size()?;
    let mut first = vec![0u8; 512];
    file.read_at(0, &mut first).await?;
    let text = if let Some(h) = SparseHeader::parse(&first) {
        let off = h.desc_offset.saturating_mul(SECTOR);
        let len = h
            .desc_size
            .saturating_mul(SECTOR)
            .min(descriptor::MAX_DESCRIPTOR)
            .min(size.saturating_sub(off));
        let mut b = vec![0u8; len as usize];
        file.read_at(off, &mut b).await?;
        descriptor::text_of(&b)
    } else {
        let mut b = vec![0u8; size.min(descriptor::MAX_DESCRIPTOR) as usize];
        file.read_at(0, &mut b).await?;
        descriptor::text_of(&b)
    };
    descriptor::Descriptor::parse(&text)
        .map(|d| d.cid)
        .map_err(|_| fail(invalid("invalid VMDK image descriptor")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_qemu_img() {
        // (sectors, gd, overhead) of images qemu-img 10 made.
        assert_eq!(sparse_layout(204800).1, 38);
        assert_eq!(sparse_layout(204800).2, 128);
        assert_eq!(sparse_layout(2097152).1, 150);
        assert_eq!(sparse_layout(2097152).2, 384);
        assert_eq!(sparse_layout(4194304).1, 278);
        assert_eq!(sparse_layout(4194304).2, 640);
    }

    #[test]
    fn extent_names_follow_qemu_img() {
        assert_eq!(
            extent_path(Path::new("/d/x.vmdk"), "-s001"),
            Path::new("/d/x-s001.vmdk")
        );
        assert_eq!(
            extent_path(Path::new("disk"), "-flat"),
            Path::new("disk-flat")
        );
        assert_eq!(
            extent_path(Path::new("a.b.vmdk"), "-f002"),
            Path::new("a.b-f002.vmdk")
        );
    }
}
