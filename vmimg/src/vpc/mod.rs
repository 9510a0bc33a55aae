//! The VHD format (QEMU's `vpc`): fixed, dynamic and differencing disks.
//!
//! ```text
//!  guest offset --/ block_size--> BAT[block]: unallocated | sector of the block
//!     block: [sector bitmap][data]   dynamic: data read as is (QEMU ignores the bitmap);
//!                                    differencing: bit 0 = the parent's sector
//! ```
//!
//! One file per role: `disk` (footer, dynamic header, geometry), `create` (new images),
//! this file (opening, mapping, allocation). Read as QEMU 10 reads VHDs (the footer copy at
//! offset 0 for dynamic disks, the end of the file for fixed ones; QEMU's creator-app rule
//! for the size), plus differencing disks, which QEMU opens as plain dynamic disks: here
//! their parent is found through the parent locators (through the implicit-open policy)
//! and checked by its UUID.

mod create;
mod disk;

pub use create::VpcCreate;
pub use disk::{geometry_for, rounded_size, DiskType, DynamicHeader, Footer};

use crate::format::{
    BackingName, ChainView, DiscardMode, Format, FormatDriver, FormatOptions, ImageDescription,
    ImageFormat, LayerOpen, MapKind, MapQuery, Mapping, OpenedLayer, OptionSpec, WriteCommit,
    WriteTarget,
};
use crate::storage::{BoxFuture, PreallocMode, Storage, StorageExt};
use crate::{Error, ErrorKind, Result};
use disk::{FOOTER_SIZE, HEADER_SIZE, MAX_BAT_ENTRIES, UNALLOCATED};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};

/// The VHD format's entry points.
#[derive(Debug)]
pub struct VpcFormat;

/// The VHD format (QEMU's name: `vpc`).
pub const VPC: Format = Format::new(&VpcFormat);

impl ImageFormat for VpcFormat {
    fn name(&self) -> &'static str {
        "vpc"
    }

    /// QEMU's `vpc_probe`: the footer copy at offset 0. A fixed VHD has its only footer at
    /// the end and probes as raw, as in QEMU.
    fn probe(&self, first: &[u8], _filename: Option<&str>, _file_size: u64) -> u32 {
        if first.starts_with(disk::FOOTER_COOKIE) {
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

    fn open<'a>(&'a self, layer: LayerOpen<'a>) -> BoxFuture<'a, Result<OpenedLayer>> {
        Box::pin(VpcDriver::open(layer))
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
        Box::pin(async move { VpcCreate::from_options(options)?.create(path).await })
    }
}

fn corrupt(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Corrupt, msg)
}

/// What a dynamic or differencing disk adds to a fixed one.
#[derive(Debug)]
struct Blocks {
    header: DynamicHeader,
    block_size: u64,
    bitmap_size: u64,
    /// Sector numbers of the blocks (or [`UNALLOCATED`]).
    bat: RwLock<Vec<u32>>,
    /// Allocation: serialised (one block at a time), with where the next block goes.
    alloc: tokio::sync::Mutex<AllocState>,
    /// Recently read sector bitmaps (differencing disks), by block.
    bitmaps: Mutex<Vec<(u32, Arc<Vec<u8>>)>>,
}

#[derive(Debug)]
struct AllocState {
    /// Where the next block goes (and the footer meanwhile): after the BAT and the last
    /// block, as QEMU computes it.
    free_offset: u64,
    /// Blocks of a dynamic disk whose bitmap is known to be all ones (QEMU sets it so
    /// before writing into a block, for readers that honour the bitmap).
    full_bitmaps: HashSet<u32>,
}

/// An open VHD layer.
#[derive(Debug)]
pub struct VpcDriver {
    file: Arc<dyn Storage>,
    footer: Footer,
    kind: DiskType,
    size: u64,
    writable: bool,
    blocks: Option<Blocks>,
}

/// Cached sector bitmaps of a differencing disk.
const BITMAP_CACHE: usize = 64;

impl VpcDriver {
    async fn open(layer: LayerOpen<'_>) -> Result<OpenedLayer> {
        let file = layer.storage;
        let file_size = file.size()?;
        if file_size == 0 {
            return Err(Error::new(
                ErrorKind::InvalidFormat,
                "File too small for a VHD header",
            ));
        }
        let mut first = [0u8; FOOTER_SIZE];
        file.read_at(0, &mut first).await?;
        let (footer, kind) = if first.starts_with(disk::FOOTER_COOKIE) {
            let footer = Footer::parse(&first)?;
            let kind = if footer.disk_type == 4 {
                DiskType::Differencing
            } else {
                DiskType::Dynamic
            };
            (footer, kind)
        } else {
            // A fixed disk: the footer is the last sector (of the sector-rounded length).
            let end = file_size.div_ceil(512) * 512;
            let mut last = [0u8; FOOTER_SIZE];
            file.read_at(end - FOOTER_SIZE as u64, &mut last).await?;
            let footer = Footer::parse(&last)?;
            if footer.disk_type != 2 {
                return Err(Error::new(ErrorKind::InvalidFormat, "invalid VPC image"));
            }
            (footer, DiskType::Fixed)
        };
        let size = footer.virtual_size()?;
        let writable = layer.writable && file.is_writable();
        if kind == DiskType::Fixed {
            let driver = VpcDriver {
                file,
                footer,
                kind,
                size,
                writable,
                blocks: None,
            };
            return Ok(OpenedLayer {
                driver: Arc::new(driver),
                backing: None,
            });
        }
        let blocks = Self::load_blocks(file.as_ref(), &footer, size, file_size).await?;
        let backing = if kind == DiskType::Differencing {
            let name = Self::parent_name(file.as_ref(), &blocks.header).await?;
            Some(BackingName {
                name,
                format: Some("vpc".into()),
                expected_id: Some(blocks.header.parent_id.to_vec()),
            })
        } else {
            None
        };
        let driver = VpcDriver {
            file,
            footer,
            kind,
            size,
            writable,
            blocks: Some(blocks),
        };
        Ok(OpenedLayer {
            driver: Arc::new(driver),
            backing,
        })
    }

    /// The dynamic header and the BAT, checked as QEMU checks them (with its messages),
    /// and bounded: the BAT is read only as far as the file holds it.
    async fn load_blocks(
        file: &dyn Storage,
        footer: &Footer,
        size: u64,
        file_size: u64,
    ) -> Result<Blocks> {
        let mut hb = [0u8; HEADER_SIZE];
        if footer
            .data_offset
            .checked_add(HEADER_SIZE as u64)
            .is_none_or(|end| end > file_size)
        {
            return Err(Error::new(
                ErrorKind::InvalidFormat,
                "Error reading dynamic VHD header",
            ));
        }
        file.read_at(footer.data_offset, &mut hb).await?;
        let header = DynamicHeader::parse(&hb)?;
        let block_size = u64::from(header.block_size);
        if size.div_ceil(block_size) > u64::from(header.max_table_entries) {
            return Err(Error::new(ErrorKind::InvalidFormat, "Page table too small"));
        }
        if header.max_table_entries > MAX_BAT_ENTRIES {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "Max Table Entries too large ({}): at most {MAX_BAT_ENTRIES} are supported",
                    header.max_table_entries
                ),
            ));
        }
        let entries = header.max_table_entries as usize;
        let bat_bytes = entries as u64 * 4;
        let bat_end = header
            .table_offset
            .checked_add(bat_bytes)
            .ok_or_else(|| corrupt("the BAT offset overflows"))?;
        let truncated = || {
            Error::new(
                ErrorKind::InvalidFormat,
                "block-vpc: free_data_block_offset points after the end of file. The image \
                 has been truncated.",
            )
        };
        let rounded_file = file_size.div_ceil(512) * 512;
        let bat_end = bat_end
            .checked_next_multiple_of(512)
            .filter(|&e| e <= rounded_file)
            .ok_or_else(truncated)?;
        let mut raw = vec![0u8; bat_bytes as usize];
        file.read_at(header.table_offset, &mut raw).await?;
        let bat: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let bitmap_size = header.bitmap_size();
        let mut free_offset = bat_end;
        for &e in &bat {
            if e != UNALLOCATED {
                let end = u64::from(e) * 512 + bitmap_size + block_size;
                free_offset = free_offset.max(end);
            }
        }
        if free_offset > rounded_file {
            return Err(truncated());
        }
        Ok(Blocks {
            header,
            block_size,
            bitmap_size,
            bat: RwLock::new(bat),
            alloc: tokio::sync::Mutex::new(AllocState {
                free_offset,
                full_bitmaps: HashSet::new(),
            }),
            bitmaps: Mutex::new(Vec::new()),
        })
    }

    /// The parent's name from the locators: a relative Windows path (`W2ru`) first, then
    /// an absolute one (`W2ku`), a file URL (`MacX`), and the parent name field last.
    async fn parent_name(file: &dyn Storage, header: &DynamicHeader) -> Result<String> {
        for code in [b"W2ru", b"W2ku", b"MacX"] {
            let Some(l) = header.locators.iter().find(|l| &l.code == code) else {
                continue;
            };
            if l.len == 0 || l.len > 64 << 10 {
                continue;
            }
            let mut data = vec![0u8; l.len as usize];
            file.read_at(l.offset, &mut data).await?;
            let name = if code == b"MacX" {
                let url = String::from_utf8_lossy(&data)
                    .trim_end_matches('\0')
                    .to_string();
                let path = url.strip_prefix("file://").unwrap_or(&url);
                path.strip_prefix("localhost").unwrap_or(path).to_string()
            } else {
                let units: Vec<u16> = data
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .take_while(|&u| u != 0)
                    .collect();
                windows_path(&String::from_utf16_lossy(&units))
            };
            if !name.is_empty() {
                return Ok(name);
            }
        }
        if header.parent_name.is_empty() {
            return Err(corrupt(
                "the differencing disk names no parent (no locator, no parent name)",
            ));
        }
        Ok(windows_path(&header.parent_name))
    }

    fn blocks(&self) -> &Blocks {
        self.blocks
            .as_ref()
            .expect("only dynamic and differencing disks have blocks")
    }

    /// The BAT entry of `block` (unallocated past the table).
    fn entry(&self, block: u64) -> u32 {
        let bat = self.blocks().bat.read().unwrap();
        usize::try_from(block)
            .ok()
            .and_then(|i| bat.get(i).copied())
            .unwrap_or(UNALLOCATED)
    }

    /// File offset of the data of the block starting at sector `entry`.
    fn data_start(&self, entry: u32) -> u64 {
        u64::from(entry) * 512 + self.blocks().bitmap_size
    }

    /// The sector bitmap of the block at sector `entry` (cached).
    async fn bitmap(&self, block: u32, entry: u32) -> Result<Arc<Vec<u8>>> {
        let b = self.blocks();
        if let Some((_, m)) = b.bitmaps.lock().unwrap().iter().find(|(k, _)| *k == block) {
            return Ok(Arc::clone(m));
        }
        let mut bytes = vec![0u8; b.bitmap_size as usize];
        self.file
            .read_at(u64::from(entry) * 512, &mut bytes)
            .await?;
        let bytes = Arc::new(bytes);
        let mut cache = b.bitmaps.lock().unwrap();
        cache.retain(|(k, _)| *k != block);
        if cache.len() >= BITMAP_CACHE {
            cache.remove(0);
        }
        cache.push((block, Arc::clone(&bytes)));
        Ok(bytes)
    }

    fn forget_bitmap(&self, block: u32) {
        self.blocks()
            .bitmaps
            .lock()
            .unwrap()
            .retain(|(k, _)| *k != block);
    }

    /// Sets (or clears) the bitmap bits of sectors `[first, end)` of a block at `entry`.
    async fn set_bits(&self, block: u32, entry: u32, first: u64, end: u64, on: bool) -> Result<()> {
        let mut bits = (*self.bitmap(block, entry).await?).clone();
        for s in first..end {
            let (byte, mask) = ((s / 8) as usize, 0x80u8 >> (s % 8));
            if on {
                bits[byte] |= mask;
            } else {
                bits[byte] &= !mask;
            }
        }
        let lo = (first / 8 / 512 * 512) as usize;
        let hi = ((end.div_ceil(8)).div_ceil(512) * 512) as usize;
        self.file
            .write_at(
                u64::from(entry) * 512 + lo as u64,
                &bits[lo..hi.min(bits.len())],
            )
            .await?;
        self.forget_bitmap(block);
        Ok(())
    }

    /// Whether sector `s` of a bitmap is in this file.
    fn bit(bits: &[u8], s: u64) -> bool {
        bits.get((s / 8) as usize)
            .is_some_and(|b| b & (0x80 >> (s % 8)) != 0)
    }

    /// Allocates the block `block` at the end of the data (QEMU's place: where the footer
    /// was), with its bitmap all ones (dynamic) or all zeros (differencing: nothing of it
    /// is in this file yet), and returns its sector. The BAT entry and the footer at the
    /// new end are written by `publish`.
    async fn allocate(&self, state: &mut AllocState) -> Result<u32> {
        let b = self.blocks();
        let start = state.free_offset;
        let entry = u32::try_from(start / 512)
            .ok()
            .filter(|&e| e != UNALLOCATED)
            .ok_or_else(|| {
                Error::new(ErrorKind::NoSpace, "the VHD file is full (4 TiB of blocks)")
            })?;
        let fill = if self.kind == DiskType::Differencing {
            0
        } else {
            0xff
        };
        self.file
            .write_at(start, &vec![fill; b.bitmap_size as usize])
            .await?;
        // Data past the old end reads as zeros; bytes a previous writer left there must not
        // show through unwritten parts of the block.
        let data = start + b.bitmap_size;
        let file_end = self.file.size()?;
        if file_end > data {
            let n = (file_end - data).min(b.block_size);
            self.file.write_zeroes(data, n, false).await?;
        }
        state.free_offset = data + b.block_size;
        Ok(entry)
    }

    /// Publishes a new block: the footer at the new end of the file, then the BAT entry.
    async fn publish(&self, state: &AllocState, block: u64, entry: u32) -> Result<()> {
        let b = self.blocks();
        self.file
            .write_at(state.free_offset, &self.footer.to_bytes())
            .await?;
        let at = b.header.table_offset + block * 4;
        self.file.write_at(at, &entry.to_be_bytes()).await?;
        b.bat.write().unwrap()[block as usize] = entry;
        Ok(())
    }

    /// Before writing into a block a previous writer made: QEMU sets all its bitmap bits
    /// (for readers that honour them) once per block.
    async fn fill_bitmap(&self, block: u32, entry: u32) -> Result<()> {
        let b = self.blocks();
        let mut state = b.alloc.lock().await;
        if state.full_bitmaps.contains(&block) {
            return Ok(());
        }
        let bits = self.bitmap(block, entry).await?;
        if bits.iter().any(|&x| x != 0xff) {
            self.file
                .write_at(u64::from(entry) * 512, &vec![0xff; b.bitmap_size as usize])
                .await?;
            self.forget_bitmap(block);
        }
        state.full_bitmaps.insert(block);
        Ok(())
    }

    fn check_write(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::ReadOnly, "image is opened read-only"))
        }
    }
}

/// A Windows path as a Unix one: backslashes become slashes, a leading `.\` goes.
fn windows_path(p: &str) -> String {
    let p = p.replace('\\', "/");
    p.strip_prefix("./").unwrap_or(&p).to_string()
}

impl FormatDriver for VpcDriver {
    fn format(&self) -> Format {
        VPC
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

    fn request_align(&self) -> usize {
        // A differencing disk's bitmap says, sector by sector, which file holds the data.
        let align = self.file.request_align();
        if self.kind == DiskType::Differencing {
            align.max(512)
        } else {
            align
        }
    }

    fn map(&self, offset: u64, len: u64, _query: MapQuery) -> BoxFuture<'_, Result<Mapping<'_>>> {
        Box::pin(async move {
            if self.kind == DiskType::Fixed {
                return Ok(Mapping {
                    len,
                    kind: MapKind::Data {
                        storage: self.file.as_ref(),
                        offset,
                    },
                });
            }
            let b = self.blocks();
            let block = offset / b.block_size;
            let within = offset % b.block_size;
            let run = len.min(b.block_size - within);
            let entry = self.entry(block);
            if entry == UNALLOCATED {
                // A dynamic disk answers for its own unallocated blocks (zeros, as QEMU
                // reports them); a differencing disk leaves them to its parent.
                let kind = if self.kind == DiskType::Differencing {
                    MapKind::Unallocated
                } else {
                    MapKind::Zero { offset: None }
                };
                return Ok(Mapping { len: run, kind });
            }
            let data = MapKind::Data {
                storage: self.file.as_ref(),
                offset: self.data_start(entry) + within,
            };
            if self.kind == DiskType::Dynamic {
                // As QEMU: an allocated block is read as it is (unwritten sectors are zeros).
                return Ok(Mapping {
                    len: run,
                    kind: data,
                });
            }
            let bits = self.bitmap(block as u32, entry).await?;
            let first = within / 512;
            let end = (within + run).div_ceil(512);
            let here = Self::bit(&bits, first);
            let same = (first..end)
                .find(|&s| Self::bit(&bits, s) != here)
                .unwrap_or(end);
            let n = (same * 512).min(within + run) - within;
            Ok(Mapping {
                len: n,
                kind: if here { data } else { MapKind::Unallocated },
            })
        })
    }

    fn map_for_write<'a>(
        &'a self,
        offset: u64,
        len: u64,
        _below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<WriteTarget<'a>>> {
        Box::pin(async move {
            self.check_write()?;
            if self.kind == DiskType::Fixed {
                return Ok(WriteTarget {
                    len,
                    storage: self.file.as_ref(),
                    offset,
                    commit: None,
                    hold: None,
                });
            }
            let b = self.blocks();
            let block = offset / b.block_size;
            let within = offset % b.block_size;
            let run = len.min(b.block_size - within);
            let entry = self.entry(block);
            let differencing = self.kind == DiskType::Differencing;
            if entry != UNALLOCATED {
                if !differencing {
                    self.fill_bitmap(block as u32, entry).await?;
                    return Ok(WriteTarget {
                        len: run,
                        storage: self.file.as_ref(),
                        offset: self.data_start(entry) + within,
                        commit: None,
                        hold: None,
                    });
                }
                let commit: WriteCommit<'a> = Box::new(move || {
                    Box::pin(async move {
                        let _state = b.alloc.lock().await;
                        let (s0, s1) = (within / 512, (within + run).div_ceil(512));
                        self.set_bits(block as u32, entry, s0, s1, true).await
                    })
                });
                return Ok(WriteTarget {
                    len: run,
                    storage: self.file.as_ref(),
                    offset: self.data_start(entry) + within,
                    commit: Some(commit),
                    hold: None,
                });
            }
            // A new block, one at a time: the allocation lock is held until the data is in
            // and the block published.
            let mut state = b.alloc.lock().await;
            let entry = self.entry(block);
            if entry != UNALLOCATED {
                drop(state);
                return self.map_for_write(offset, len, _below).await;
            }
            let entry = self.allocate(&mut state).await?;
            if !differencing {
                state.full_bitmaps.insert(block as u32);
            }
            let commit: WriteCommit<'a> = Box::new(move || {
                Box::pin(async move {
                    if differencing {
                        let (s0, s1) = (within / 512, (within + run).div_ceil(512));
                        self.set_bits(block as u32, entry, s0, s1, true).await?;
                    }
                    self.publish(&state, block, entry).await
                })
            });
            Ok(WriteTarget {
                len: run,
                storage: self.file.as_ref(),
                offset: self.data_start(entry) + within,
                commit: Some(commit),
                hold: None,
            })
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        offset: u64,
        len: u64,
        _may_unmap: bool,
        below: ChainView<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_write()?;
            let end = offset + len;
            let mut pos = offset;
            while pos < end {
                if self.kind == DiskType::Dynamic {
                    // An unallocated block of a dynamic disk reads as zeros already.
                    let b = self.blocks();
                    let block = pos / b.block_size;
                    if self.entry(block) == UNALLOCATED {
                        pos = ((block + 1) * b.block_size).min(end);
                        continue;
                    }
                }
                let t = self.map_for_write(pos, end - pos, below).await?;
                t.storage.write_zeroes(t.offset, t.len, false).await?;
                drop(t.hold);
                if let Some(commit) = t.commit {
                    commit().await?;
                }
                pos += t.len;
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
                // As QEMU: discard keeps the data.
                DiscardMode::ReadsAnything => Ok(()),
                DiscardMode::ReadsBacking if self.kind == DiskType::Differencing => {
                    // Clear the bits: the sectors show the parent again.
                    let b = self.blocks();
                    let mut pos = offset;
                    let end = offset + len;
                    while pos < end {
                        let block = pos / b.block_size;
                        let within = pos % b.block_size;
                        let run = (end - pos).min(b.block_size - within);
                        let entry = self.entry(block);
                        if entry != UNALLOCATED {
                            let _state = b.alloc.lock().await;
                            let (s0, s1) = (within / 512, (within + run).div_ceil(512));
                            self.set_bits(block as u32, entry, s0, s1, false).await?;
                        }
                        pos += run;
                    }
                    Ok(())
                }
                _ => self.write_zeroes(offset, len, true, below).await,
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
        self.file.flush()
    }

    fn sync(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.file.flush().await?;
            self.file.sync().await
        })
    }

    fn unique_id(&self) -> Option<Vec<u8>> {
        Some(self.footer.unique_id.to_vec())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn describe(&self) -> ImageDescription {
        let backing = self
            .blocks
            .as_ref()
            .filter(|_| self.kind == DiskType::Differencing);
        ImageDescription {
            filename: self.file.path().map(|p| p.display().to_string()),
            actual_size: self.file.allocated_size(),
            cluster_size: self.blocks.as_ref().map(|b| b.block_size),
            backing_filename: backing.map(|b| windows_path(&b.header.parent_name)),
            full_backing_filename: backing.map(|b| {
                let name = windows_path(&b.header.parent_name);
                self.file
                    .resolve_name(&name)
                    .map(|r| r.path.display().to_string())
                    .unwrap_or(name)
            }),
            backing_format: backing.map(|_| "vpc".into()),
            ..ImageDescription::default()
        }
    }
}
