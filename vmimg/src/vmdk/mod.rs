//! The VMDK format: VMware's virtual disks, as QEMU 10 reads and writes them, and the
//! VMware files QEMU mishandles.
//!
//! ```text
//!  monolithicSparse / streamOptimized:  one file  [KDMV header][descriptor][GDs, GTs][grains]
//!  descriptor file (.vmdk text) --names--> extents, in disk order:
//!     FLAT / VMFS        raw data at a sector offset of a file
//!     SPARSE / VMFSSPARSE a KDMV (hosted sparse) or COWD (ESX sparse) file
//!     SESPARSE           ESXi's space-efficient sparse file (read only)
//!     ZERO               reads as zeros, no file
//!  parentFileNameHint + parentCID --> the parent disk, whose CID must match
//! ```
//!
//! One file per role: `header` (on-disk structures), `descriptor` (the text), `sparse`
//! (grain directories and tables, compressed grains), `create` (new images), this file
//! (opening, mapping, writing). Extent files are opened through the implicit-open policy.
//!
//! Where vmimg differs from QEMU on purpose: `ZERO`, `RDONLY` and `NOACCESS` extents keep
//! their place (QEMU drops them and computes a smaller disk); a parent whose CID differs is
//! refused when the chain is opened (QEMU fails the reads that reach it, VMware refuses to
//! open); writes to a region without a grain table allocate one (QEMU overwrites the header);
//! VMware streams (footer at the end) open read-only (QEMU's writes break them); zero writes
//! over allocated grains zero them in place instead of leaking them.

mod create;
mod descriptor;
pub mod header;
mod sparse;

pub use create::{Subformat, VmdkCreate};
pub use descriptor::{Access, Descriptor, ExtentLine, NO_PARENT};
pub use header::{CowdHeader, Marker, SparseHeader};

use crate::format::{
    BackingName, ChainView, CheckReport, DiscardMode, Format, FormatDriver, FormatOptions,
    FormatSpecific, ImageDescription, ImageFormat, ImplicitOpenKind, InfoValue, LayerOpen, MapKind,
    MapQuery, Mapping, OpenedLayer, OptionSpec, Repair, WriteCommit, WriteTarget,
};
use crate::storage::{BoxFuture, HostExtent, PreallocMode, Storage, StorageExt};
use crate::{Error, ErrorKind, Result};
use header::{COWD, KDMV, SECTOR};
use sparse::{Grain, SeSparseExtent, SparseExtent};
use std::sync::{Arc, Mutex};

/// The VMDK format's entry points.
#[derive(Debug)]
pub struct VmdkFormat;

/// The VMDK format.
pub const VMDK: Format = Format::new(&VmdkFormat);

impl ImageFormat for VmdkFormat {
    fn name(&self) -> &'static str {
        "vmdk"
    }

    /// QEMU's `vmdk_probe`: a sparse magic, or a text descriptor whose first line that is
    /// not a comment or blank is `version=1|2|3`.
    fn probe(&self, first: &[u8], _filename: Option<&str>, _file_size: u64) -> u32 {
        if first.starts_with(KDMV) || first.starts_with(COWD) || crate::format::vmdk_text(first) {
            100
        } else {
            0
        }
    }

    fn owns_metadata(&self) -> bool {
        true
    }

    fn has_backing(&self) -> bool {
        true
    }

    fn compressed_writes(&self) -> bool {
        true
    }

    fn open<'a>(&'a self, layer: LayerOpen<'a>) -> BoxFuture<'a, Result<OpenedLayer>> {
        Box::pin(VmdkDriver::open(layer))
    }

    fn create_options(&self) -> &'static [OptionSpec] {
        create::CREATE_OPTIONS
    }

    fn create_summary(&self, options: &FormatOptions) -> String {
        create::summary(options)
    }

    fn create<'a>(
        &'a self,
        path: &'a std::path::Path,
        options: &'a FormatOptions,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { VmdkCreate::from_options(options)?.create(path).await })
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidFormat, msg)
}

/// createTypes of descriptor files that list their extents.
const DESCRIPTOR_TYPES: &[&str] = &[
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "vmfs",
    "vmfsSparse",
    "vmfsThin",
    "vmfsPreallocated",
    "vmfsEagerZeroedThick",
    "seSparse",
    "custom",
];

/// What an extent holds.
#[derive(Debug)]
enum ExtentData {
    /// Raw data at a byte offset of a file.
    Flat { file: Arc<dyn Storage>, start: u64 },
    /// Zeros.
    Zero,
    /// Grains (hosted or ESX sparse).
    Sparse(SparseExtent),
    /// SESparse grains (read only).
    SeSparse(SeSparseExtent),
}

/// One extent of the disk.
#[derive(Debug)]
struct Extent {
    /// Guest byte offset of its first byte.
    start: u64,
    /// Bytes.
    len: u64,
    access: Access,
    /// The descriptor's type (empty for a monolithic file, as qemu-img shows it).
    kind: String,
    /// The file, as `info` shows it.
    filename: String,
    data: ExtentData,
}

impl Extent {
    fn file(&self) -> Option<&Arc<dyn Storage>> {
        match &self.data {
            ExtentData::Flat { file, .. } => Some(file),
            ExtentData::Zero => None,
            ExtentData::Sparse(s) => Some(&s.file),
            ExtentData::SeSparse(s) => Some(&s.file),
        }
    }
}

/// Where the descriptor lives.
#[derive(Clone, Copy, Debug)]
enum DescriptorPlace {
    /// Inside a sparse file: byte offset and bytes reserved.
    Embedded { offset: u64, len: u64 },
    /// The whole file.
    File,
}

/// An open VMDK layer.
#[derive(Debug)]
pub struct VmdkDriver {
    file: Arc<dyn Storage>,
    place: DescriptorPlace,
    descriptor: Descriptor,
    create_type: String,
    extents: Vec<Extent>,
    size: u64,
    writable: bool,
    /// The current CID, and whether this open changed it already (QEMU changes it once per
    /// open, on the first write).
    cid: tokio::sync::Mutex<(u32, bool)>,
    cid_now: Mutex<u32>,
}

impl VmdkDriver {
    async fn open(layer: LayerOpen<'_>) -> Result<OpenedLayer> {
        let file = Arc::clone(&layer.storage);
        let file_size = file.size()?;
        let mut first = vec![0u8; 2048];
        file.read_at(0, &mut first).await?;
        let writable = layer.writable && file.is_writable();
        let filename = file
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let (descriptor, place, create_type, extents) = if first.starts_with(KDMV) {
            let h = SparseHeader::parse(&first).expect("KDMV magic");
            let (text, place) = embedded_descriptor(file.as_ref(), &h, file_size).await?;
            if text.trim().is_empty() {
                return Err(invalid(format!(
                    "'{filename}' is an extent of a VMDK disk without a descriptor of its \
                     own: open the descriptor file that names it"
                )));
            }
            let descriptor = Descriptor::parse(&text)?;
            let sparse =
                SparseExtent::open_hosted(Arc::clone(&file), &first, layer.cache_bytes).await?;
            let create_type = if sparse.compressed {
                "streamOptimized"
            } else {
                "monolithicSparse"
            };
            let extent = Extent {
                start: 0,
                len: sparse.capacity.saturating_mul(SECTOR),
                access: Access::ReadWrite,
                kind: String::new(),
                filename: filename.clone(),
                data: ExtentData::Sparse(sparse),
            };
            (descriptor, place, create_type.to_string(), vec![extent])
        } else if first.starts_with(COWD) {
            return Err(invalid(format!(
                "'{filename}' is an ESX sparse (COWD) extent: open the descriptor file that \
                 names it"
            )));
        } else {
            if file_size > descriptor::MAX_DESCRIPTOR {
                return Err(invalid(format!(
                    "File too large for a VMDK descriptor ({file_size} bytes)"
                )));
            }
            let mut bytes = vec![0u8; file_size as usize];
            file.read_at(0, &mut bytes).await?;
            let descriptor = Descriptor::parse(&descriptor::text_of(&bytes))?;
            if !DESCRIPTOR_TYPES.contains(&descriptor.create_type.as_str()) {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("Unsupported image type '{}'", descriptor.create_type),
                ));
            }
            let extents = open_extents(&layer, &descriptor, writable).await?;
            let ct = descriptor.create_type.clone();
            (descriptor, DescriptorPlace::File, ct, extents)
        };
        for e in &extents {
            if let ExtentData::Sparse(s) = &e.data {
                if writable && s.footer {
                    return Err(Error::new(
                        ErrorKind::ReadOnly,
                        "a VMware stream (its grain directory found through the footer) can \
                         only be opened read-only: convert it to write",
                    ));
                }
                if writable && s.version == 3 && !s.compressed {
                    return Err(Error::new(
                        ErrorKind::ReadOnly,
                        "VMDK version 3 must be read only",
                    ));
                }
            }
            if writable && matches!(e.data, ExtentData::SeSparse(_)) {
                return Err(Error::new(
                    ErrorKind::ReadOnly,
                    "No write support for seSparse images available",
                ));
            }
        }
        let size = extents.last().map_or(0, |e| e.start + e.len);
        let backing = descriptor.parent_hint.clone().map(|name| BackingName {
            name,
            format: Some("vmdk".into()),
            expected_id: Some(descriptor.parent_cid.to_be_bytes().to_vec()),
        });
        let cid = descriptor.cid;
        let driver = VmdkDriver {
            file,
            place,
            descriptor,
            create_type,
            extents,
            size,
            writable,
            cid: tokio::sync::Mutex::new((cid, false)),
            cid_now: Mutex::new(cid),
        };
        Ok(OpenedLayer {
            driver: Arc::new(driver),
            backing,
        })
    }

    /// The extent holding guest byte `offset` (below the size), with its index.
    fn extent_at(&self, offset: u64) -> (usize, &Extent) {
        let i = self
            .extents
            .partition_point(|e| e.start + e.len <= offset)
            .min(self.extents.len() - 1);
        (i, &self.extents[i])
    }

    fn check_write(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::ReadOnly, "image is opened read-only"))
        }
    }

    fn writable_extent(e: &Extent) -> Result<()> {
        match (e.access, &e.data) {
            (Access::ReadWrite, ExtentData::Flat { .. } | ExtentData::Sparse(_)) => Ok(()),
            _ => Err(Error::new(
                ErrorKind::ReadOnly,
                format!(
                    "the {} extent '{}' cannot be written",
                    if e.kind.is_empty() { "sparse" } else { &e.kind },
                    e.filename
                ),
            )),
        }
    }

    /// On the first write of this open: a new CID in the descriptor, as QEMU and VMware do,
    /// so that disks made over this one see it changed.
    async fn touch(&self) -> Result<()> {
        let mut cid = self.cid.lock().await;
        if cid.1 {
            return Ok(());
        }
        let new = descriptor::new_cid();
        match self.place {
            DescriptorPlace::Embedded { offset, len } => {
                let mut bytes = vec![0u8; len as usize];
                self.file.read_at(offset, &mut bytes).await?;
                let text = descriptor::with_cid(&descriptor::text_of(&bytes), new);
                if text.len() > bytes.len() {
                    return Err(invalid("the new CID does not fit in the descriptor"));
                }
                let mut out = text.into_bytes();
                out.resize(bytes.len(), 0);
                self.file.write_at(offset, &out).await?;
            }
            DescriptorPlace::File => {
                let len = self.file.size()?.min(descriptor::MAX_DESCRIPTOR);
                let mut bytes = vec![0u8; len as usize];
                self.file.read_at(0, &mut bytes).await?;
                let text = descriptor::with_cid(&descriptor::text_of(&bytes), new);
                // NUL-padded to whole sectors (and over the old text), as QEMU leaves it.
                let mut out = text.into_bytes();
                out.resize(out.len().next_multiple_of(512).max(bytes.len()), 0);
                self.file.write_at(0, &out).await?;
            }
        }
        self.file.flush().await?;
        *cid = (new, true);
        *self.cid_now.lock().unwrap() = new;
        Ok(())
    }

    /// A write target inside sparse extent `s` (not compressed) at extent byte `within`,
    /// allocating the grain (its rest from `below` or zeros) if needed.
    async fn sparse_target<'a>(
        &'a self,
        e: &'a Extent,
        s: &'a SparseExtent,
        within: u64,
        len: u64,
        below: ChainView<'a>,
    ) -> Result<WriteTarget<'a>> {
        let gb = s.grain_bytes();
        let g = within / gb;
        let gin = within % gb;
        let piece = len.min(gb - gin);
        let in_place = |sector: u64| WriteTarget {
            len: piece,
            storage: s.file.as_ref(),
            offset: sector * SECTOR + gin,
            commit: None,
            hold: None,
        };
        if let Grain::At(sector) = s.grain(g).await? {
            return Ok(in_place(sector));
        }
        let mut next = s.lock_alloc().await;
        let old = s.grain(g).await?;
        if let Grain::At(sector) = old {
            return Ok(in_place(sector));
        }
        let sector = s.reserve(&mut next, g).await?;
        let base = sector * SECTOR;
        let guest_grain = e.start + g * gb;
        let parts = [(0, gin), (gin + piece, gb - gin - piece)];
        for (at, n) in parts {
            if n == 0 {
                continue;
            }
            if old == Grain::Unallocated && !below.is_empty() {
                let mut tmp = vec![0u8; n as usize];
                below.read(guest_grain + at, &mut tmp).await?;
                s.file.write_at(base + at, &tmp).await?;
            } else {
                s.file.write_zeroes(base + at, n, false).await?;
            }
        }
        let commit: WriteCommit<'a> = Box::new(move || {
            Box::pin(async move {
                let _next = next;
                s.publish(g, sector).await
            })
        });
        Ok(WriteTarget {
            len: piece,
            storage: s.file.as_ref(),
            offset: base + gin,
            commit: Some(commit),
            hold: None,
        })
    }

    /// Distinct files of the disk: the descriptor's, then the extents'.
    fn files(&self) -> Vec<&Arc<dyn Storage>> {
        let mut out: Vec<&Arc<dyn Storage>> = vec![&self.file];
        for f in self.extents.iter().filter_map(Extent::file) {
            if !out.iter().any(|o| Arc::ptr_eq(o, f)) {
                out.push(f);
            }
        }
        out
    }

    /// `qemu-img check`: every allocated grain must start inside its file. Returns the
    /// errors found, with QEMU's words.
    pub async fn check_grains(&self) -> Result<Vec<String>> {
        let mut errors = Vec::new();
        for e in &self.extents {
            let ExtentData::Sparse(s) = &e.data else {
                continue;
            };
            let end = s.file.size()?;
            for (g, sector) in s.allocated().await? {
                if sector * SECTOR >= end {
                    errors.push(format!(
                        "ERROR: cluster offset for sector {} points after EOF",
                        (e.start / SECTOR) + g * s.grain
                    ));
                }
            }
        }
        Ok(errors)
    }
}

/// The descriptor inside a sparse file (QEMU reads at most 1 MiB of it).
async fn embedded_descriptor(
    file: &dyn Storage,
    h: &SparseHeader,
    file_size: u64,
) -> Result<(String, DescriptorPlace)> {
    if h.desc_offset == 0 || h.desc_size == 0 {
        return Ok((String::new(), DescriptorPlace::File));
    }
    let offset = h
        .desc_offset
        .checked_mul(SECTOR)
        .filter(|&o| o < file_size)
        .ok_or_else(|| invalid("the embedded descriptor lies beyond the end of the file"))?;
    let len = h
        .desc_size
        .saturating_mul(SECTOR)
        .min(descriptor::MAX_DESCRIPTOR + 1)
        .min(file_size - offset);
    let mut bytes = vec![0u8; len as usize];
    file.read_at(offset, &mut bytes).await?;
    Ok((
        descriptor::text_of(&bytes),
        DescriptorPlace::Embedded { offset, len },
    ))
}

/// Opens the extents a descriptor file lists, through the implicit-open policy.
async fn open_extents(
    layer: &LayerOpen<'_>,
    d: &Descriptor,
    writable: bool,
) -> Result<Vec<Extent>> {
    let own = &layer.storage;
    let mut out: Vec<Extent> = Vec::new();
    let mut start = 0u64;
    for line in &d.extents {
        if line.sectors == 0 {
            continue;
        }
        let bad_line = || {
            let mut s = format!("{:?} {} {}", line.access, line.sectors, line.kind);
            if let Some(f) = &line.file {
                s += &format!(" \"{f}\"");
            }
            invalid(format!("Invalid extent line: {s}"))
        };
        let kind = line.kind.as_str();
        if kind == "ZERO" {
            let len = line.sectors.checked_mul(SECTOR).ok_or_else(bad_line)?;
            out.push(Extent {
                start,
                len,
                access: line.access,
                kind: line.kind.clone(),
                filename: String::new(),
                data: ExtentData::Zero,
            });
            start = start.checked_add(len).ok_or_else(bad_line)?;
            continue;
        }
        let flat = matches!(kind, "FLAT" | "VMFS");
        let sparse = matches!(kind, "SPARSE" | "VMFSSPARSE" | "SESPARSE");
        if !flat && !sparse {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("extent type '{kind}' is not supported"),
            ));
        }
        if (kind == "FLAT" && line.offset.is_none()) || (kind != "FLAT" && line.offset.is_some()) {
            return Err(bad_line());
        }
        let name = line.file.as_deref().ok_or_else(bad_line)?;
        let resolved = own.resolve_name(name).map_err(|e| {
            Error::new(
                e.kind(),
                format!("Cannot use relative paths with VMDK descriptor file: {e}"),
            )
        })?;
        let ext_writable = writable && line.access == Access::ReadWrite && kind != "SESPARSE";
        let file = layer
            .files
            .open(
                ImplicitOpenKind::Extent,
                name,
                &resolved.path,
                own.path(),
                ext_writable,
            )
            .await?;
        let (perm, shared) = layer.permissions;
        file.set_permissions(perm, shared)?;
        let filename = resolved.path.display().to_string();
        let (data, len) = if flat {
            let off = line.offset.unwrap_or(0);
            let start_byte = off.checked_mul(SECTOR).ok_or_else(bad_line)?;
            let len = line.sectors.checked_mul(SECTOR).ok_or_else(bad_line)?;
            start_byte.checked_add(len).ok_or_else(bad_line)?;
            (
                ExtentData::Flat {
                    file,
                    start: start_byte,
                },
                len,
            )
        } else {
            let mut first = vec![0u8; 2048];
            file.read_at(0, &mut first).await?;
            if kind == "SESPARSE" {
                let s = SeSparseExtent::open(file, &first)
                    .await
                    .map_err(|e| e.with_path(&resolved.path))?;
                let len = s.capacity.checked_mul(SECTOR).ok_or_else(bad_line)?;
                (ExtentData::SeSparse(s), len)
            } else {
                let s = if first.starts_with(KDMV) {
                    SparseExtent::open_hosted(file, &first, layer.cache_bytes).await
                } else if first.starts_with(COWD) {
                    SparseExtent::open_cowd(file, &first, layer.cache_bytes).await
                } else {
                    Err(invalid("Image not in VMDK format"))
                }
                .map_err(|e| e.with_path(&resolved.path))?;
                // A sparse extent's size is its own header's, as in QEMU.
                let len = s.capacity.checked_mul(SECTOR).ok_or_else(bad_line)?;
                (ExtentData::Sparse(s), len)
            }
        };
        if len == 0 {
            continue;
        }
        out.push(Extent {
            start,
            len,
            access: line.access,
            kind: line.kind.clone(),
            filename,
            data,
        });
        start = start.checked_add(len).ok_or_else(bad_line)?;
    }
    // No extent: an empty disk (which qemu-img makes for size 0, and then cannot open).
    Ok(out)
}

impl FormatDriver for VmdkDriver {
    fn format(&self) -> Format {
        VMDK
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn storage(&self) -> &dyn Storage {
        self.file.as_ref()
    }

    fn map(&self, offset: u64, len: u64, query: MapQuery) -> BoxFuture<'_, Result<Mapping<'_>>> {
        Box::pin(async move {
            let (i, e) = self.extent_at(offset);
            let within = offset - e.start;
            let run = len.min(e.len - within);
            if e.access == Access::NoAccess {
                return Err(Error::new(
                    ErrorKind::PermissionDenied,
                    format!("the extent '{}' is marked NOACCESS", e.filename),
                ));
            }
            match &e.data {
                ExtentData::Zero => Ok(Mapping {
                    len: run,
                    kind: MapKind::Zero { offset: None },
                }),
                ExtentData::Flat { file, start } => {
                    let host = start + within;
                    let data = Mapping {
                        len: run,
                        kind: MapKind::Data {
                            storage: file.as_ref(),
                            offset: host,
                        },
                    };
                    if query == MapQuery::Read {
                        return Ok(data);
                    }
                    let fsize = file.size()?;
                    if host >= fsize {
                        return Ok(Mapping {
                            len: run,
                            kind: MapKind::Zero { offset: None },
                        });
                    }
                    let (ext, n) = file.extent(host, run.min(fsize - host)).await?;
                    Ok(match ext {
                        HostExtent::Data => Mapping { len: n, ..data },
                        // As QEMU: the extent maps it (data), the file says zeros.
                        HostExtent::Hole => Mapping {
                            len: n,
                            kind: MapKind::DataZero {
                                storage: file.as_ref(),
                                offset: host,
                            },
                        },
                    })
                }
                ExtentData::Sparse(s) => {
                    let gb = s.grain_bytes();
                    let g = within / gb;
                    let gin = within % gb;
                    let max = (gin + run).div_ceil(gb);
                    let (grain, n) = s.run(g, max).await?;
                    let n = (n * gb - gin).min(run);
                    let kind = match grain {
                        Grain::Unallocated => MapKind::Unallocated,
                        Grain::Zero => MapKind::Zero { offset: None },
                        Grain::At(sector) if s.compressed => {
                            MapKind::Compressed(((i as u64) << 32) | sector)
                        }
                        Grain::At(sector) => MapKind::Data {
                            storage: s.file.as_ref(),
                            offset: sector * SECTOR + gin,
                        },
                    };
                    Ok(Mapping { len: n, kind })
                }
                ExtentData::SeSparse(s) => {
                    let gb = s.grain_bytes();
                    let g = within / gb;
                    let gin = within % gb;
                    let n = run.min(gb - gin);
                    let kind = match s.grain(g).await? {
                        Grain::Unallocated => MapKind::Unallocated,
                        Grain::Zero => MapKind::Zero { offset: None },
                        Grain::At(sector) => MapKind::Data {
                            storage: s.file.as_ref(),
                            offset: sector * SECTOR + gin,
                        },
                    };
                    Ok(Mapping { len: n, kind })
                }
            }
        })
    }

    fn read_compressed<'a>(
        &'a self,
        descriptor: u64,
        guest_offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let i = (descriptor >> 32) as usize;
            let sector = descriptor & 0xffff_ffff;
            let Some(Extent {
                start,
                data: ExtentData::Sparse(s),
                ..
            }) = self.extents.get(i)
            else {
                return Err(invalid("bad compressed grain descriptor"));
            };
            let within = guest_offset - start;
            let gb = s.grain_bytes();
            s.read_compressed(within / gb, sector, within % gb, buf)
                .await
        })
    }

    fn map_for_write<'a>(
        &'a self,
        offset: u64,
        len: u64,
        below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<WriteTarget<'a>>> {
        Box::pin(async move {
            self.check_write()?;
            let (_, e) = self.extent_at(offset);
            Self::writable_extent(e)?;
            self.touch().await?;
            let within = offset - e.start;
            let run = len.min(e.len - within);
            match &e.data {
                ExtentData::Flat { file, start } => Ok(WriteTarget {
                    len: run,
                    storage: file.as_ref(),
                    offset: start + within,
                    commit: None,
                    hold: None,
                }),
                ExtentData::Sparse(s) if s.compressed => Err(Error::new(
                    ErrorKind::Unsupported,
                    "a streamOptimized image takes whole grains, compressed, once each \
                     (qemu-img convert writes it so)",
                )),
                ExtentData::Sparse(s) => self.sparse_target(e, s, within, run, below).await,
                _ => unreachable!("checked by writable_extent"),
            }
        })
    }

    fn write_compressed<'a>(
        &'a self,
        offset: u64,
        buf: &'a [u8],
        below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_write()?;
            let (_, e) = self.extent_at(offset);
            Self::writable_extent(e)?;
            let ExtentData::Sparse(s) = &e.data else {
                return crate::format::write_through(self, offset, buf, below).await;
            };
            if !s.compressed {
                return crate::format::write_through(self, offset, buf, below).await;
            }
            let within = offset - e.start;
            let gb = s.grain_bytes();
            if within % gb != 0 || buf.len() as u64 > gb {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "compressed writes take one whole grain",
                ));
            }
            self.touch().await?;
            let want = gb.min(e.len - within) as usize;
            let mut data = buf[..buf.len().min(want)].to_vec();
            data.resize(want, 0);
            s.write_compressed(within / gb, data).await
        })
    }

    fn needs_compressed_writes(&self) -> bool {
        self.extents
            .iter()
            .any(|e| matches!(&e.data, ExtentData::Sparse(s) if s.compressed))
    }

    fn write_zeroes<'a>(
        &'a self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_write()?;
            let end = offset + len;
            let mut pos = offset;
            while pos < end {
                let (_, e) = self.extent_at(pos);
                let within = pos - e.start;
                let run = (end - pos).min(e.len - within);
                if matches!(e.data, ExtentData::Zero) {
                    pos += run;
                    continue;
                }
                Self::writable_extent(e)?;
                self.touch().await?;
                let s = match &e.data {
                    ExtentData::Flat { file, start } => {
                        file.write_zeroes(start + within, run, may_unmap).await?;
                        pos += run;
                        continue;
                    }
                    ExtentData::Sparse(s) => s,
                    _ => unreachable!("checked by writable_extent"),
                };
                let gb = s.grain_bytes();
                let g = within / gb;
                let gin = within % gb;
                let piece = run.min(gb - gin);
                let whole = gin == 0 && (piece == gb || within + piece == e.len);
                match s.grain(g).await? {
                    Grain::Zero => {}
                    Grain::At(_) if s.compressed => {
                        return Err(Error::new(
                            ErrorKind::Io,
                            "Could not write to allocated cluster for streamOptimized",
                        ))
                    }
                    Grain::At(sector) => {
                        // In place (a hole in the file where unmapping is allowed): a new
                        // zeroed entry, as QEMU makes, would leak this grain for good.
                        s.file
                            .write_zeroes(sector * SECTOR + gin, piece, may_unmap)
                            .await?;
                    }
                    Grain::Unallocated if below.is_empty() && !s.zeroed_grain => {}
                    Grain::Unallocated if s.zeroed_grain && whole => {
                        let mut next = s.lock_alloc().await;
                        if s.grain(g).await? == Grain::Unallocated {
                            s.set_zero(&mut next, g).await?;
                        } else {
                            drop(next);
                            continue;
                        }
                    }
                    Grain::Unallocated if s.compressed => {
                        if !whole {
                            return Err(Error::new(
                                ErrorKind::InvalidArgument,
                                "a streamOptimized image takes whole grains only",
                            ));
                        }
                        let want = gb.min(e.len - within) as usize;
                        s.write_compressed(g, vec![0u8; want]).await?;
                    }
                    Grain::Unallocated => {
                        let t = self.sparse_target(e, s, within, piece, below).await?;
                        t.storage.write_zeroes(t.offset, t.len, false).await?;
                        drop(t.hold);
                        if let Some(c) = t.commit {
                            c().await?;
                        }
                    }
                }
                pos += piece;
            }
            Ok(())
        })
    }

    fn discard<'a>(
        &'a self,
        offset: u64,
        len: u64,
        mode: DiscardMode,
        below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_write()?;
            match mode {
                // As QEMU: VMDK has no discard, the data stays.
                DiscardMode::ReadsAnything => Ok(()),
                DiscardMode::ReadsZero => self.write_zeroes(offset, len, true, below).await,
                DiscardMode::ReadsBacking => {
                    // Whole grains of uncompressed sparse extents only, checked first.
                    let end = offset + len;
                    let mut pos = offset;
                    let mut grains = Vec::new();
                    while pos < end {
                        let (_, e) = self.extent_at(pos);
                        let within = pos - e.start;
                        let run = (end - pos).min(e.len - within);
                        let s = match &e.data {
                            ExtentData::Sparse(s) if !s.compressed => s,
                            _ => {
                                return Err(Error::new(
                                    ErrorKind::Unsupported,
                                    "this VMDK extent cannot fall back to its parent",
                                ))
                            }
                        };
                        let gb = s.grain_bytes();
                        if within % gb != 0 || (run % gb != 0 && within + run != e.len) {
                            return Err(Error::new(
                                ErrorKind::Unsupported,
                                "VMDK falls back to its parent in whole grains only",
                            ));
                        }
                        for g in within / gb..(within + run).div_ceil(gb) {
                            grains.push((s, g));
                        }
                        pos += run;
                    }
                    self.touch().await?;
                    for (s, g) in grains {
                        let _next = s.lock_alloc().await;
                        s.set_unallocated(g).await?;
                    }
                    Ok(())
                }
            }
        })
    }

    fn resize<'a>(
        &'a self,
        _new_size: u64,
        _prealloc: PreallocMode,
        _below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async {
            Err(Error::new(
                ErrorKind::Unsupported,
                "Image format driver does not support resize",
            ))
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            for f in self.files() {
                f.flush().await?;
            }
            Ok(())
        })
    }

    fn sync(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            for f in self.files() {
                f.flush().await?;
                f.sync().await?;
            }
            Ok(())
        })
    }

    fn check(&self, repair: Repair) -> BoxFuture<'_, Result<CheckReport>> {
        Box::pin(async move {
            if repair != Repair::None {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "This image format does not support checks",
                ));
            }
            // As QEMU: the first bad grain ends the check.
            let mut report = CheckReport::default();
            if let Some(first) = self.check_grains().await?.into_iter().next() {
                report.messages.push(first);
                report.failure = Some("Invalid argument".into());
            }
            Ok(report)
        })
    }

    fn unique_id(&self) -> Option<Vec<u8>> {
        Some(self.cid_now.lock().unwrap().to_be_bytes().to_vec())
    }

    fn cluster_size(&self) -> Option<u64> {
        self.extents.iter().find_map(|e| match &e.data {
            ExtentData::Sparse(s) => Some(s.grain_bytes()),
            ExtentData::SeSparse(s) => Some(s.grain_bytes()),
            _ => None,
        })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn describe(&self) -> ImageDescription {
        let grain = |e: &Extent| match &e.data {
            ExtentData::Sparse(s) => Some(s.grain_bytes()),
            ExtentData::SeSparse(s) => Some(s.grain_bytes()),
            _ => None,
        };
        // As qemu-img: a cluster size only when every extent is sparse alike.
        let first = self.extents.first().and_then(grain);
        let cluster_size = first.filter(|_| {
            self.extents
                .iter()
                .all(|e| grain(e) == first && e.kind == self.extents[0].kind)
        });
        let mut f = FormatSpecific::new("vmdk");
        f.push(
            "cid",
            InfoValue::Int(u64::from(*self.cid_now.lock().unwrap())),
        );
        f.push(
            "parent-cid",
            InfoValue::Int(u64::from(self.descriptor.parent_cid)),
        );
        f.push("create-type", InfoValue::Str(self.create_type.clone()));
        let extents = self
            .extents
            .iter()
            .map(|e| {
                let mut m = Vec::new();
                if matches!(&e.data, ExtentData::Sparse(s) if s.compressed) {
                    m.push(("compressed".to_string(), InfoValue::Bool(true)));
                }
                m.push(("virtual-size".into(), InfoValue::Int(e.len)));
                m.push(("filename".into(), InfoValue::Str(e.filename.clone())));
                if let Some(c) = grain(e) {
                    m.push(("cluster-size".into(), InfoValue::Int(c)));
                }
                m.push(("format".into(), InfoValue::Str(e.kind.clone())));
                InfoValue::Map(m)
            })
            .collect();
        f.push("extents", InfoValue::List(extents));
        let files = self.files();
        let actual: Option<u64> = files.iter().map(|f| f.allocated_size()).sum();
        let hint = self.descriptor.parent_hint.clone();
        ImageDescription {
            filename: self.file.path().map(|p| p.display().to_string()),
            actual_size: actual,
            cluster_size,
            full_backing_filename: hint.as_ref().map(|h| {
                self.file
                    .resolve_name(h)
                    .map(|r| r.path.display().to_string())
                    .unwrap_or_else(|_| h.clone())
            }),
            backing_filename: hint,
            backing_format: self.descriptor.parent_hint.as_ref().map(|_| "vmdk".into()),
            format_specific: Some(f),
            children: self
                .extents
                .iter()
                .enumerate()
                .filter(|(_, e)| e.file().is_some_and(|f| !Arc::ptr_eq(f, &self.file)))
                .map(|(i, e)| crate::format::ChildFile {
                    name: format!("extents.{i}"),
                    storage: Arc::clone(e.file().expect("filtered")),
                })
                .collect(),
            ..ImageDescription::default()
        }
    }
}
