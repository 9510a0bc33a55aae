//! Sparse extents: hosted sparse (`KDMV`, stream-optimized included) and ESX sparse
//! (`COWD`) files, and the read-only SESparse files of newer ESXi.
//!
//! ```text
//!  extent sector s --/ (gtes * grain)--> GD[i]: sector of a grain table (0: none)
//!                  --/ grain % gtes ---> GT[j]: 0 unallocated | 1 zeroed (flag) | sector
//!  compressed grain at that sector: [lba u64][size u32][zlib data][pad to a sector]
//! ```
//!
//! Grain tables are read on demand and cached (bounded). New grains are appended at the
//! end of the file (QEMU's place), their rest filled from the parent or with zeros, and
//! published by writing the grain-table entry (primary, then redundant) after the data.

use super::header::{
    CowdHeader, Marker, SeSparseHeader, SparseHeader, COWD_GTES, FLAG_MARKERS, FLAG_RGD,
    FLAG_ZEROED_GRAIN, GD_AT_END, MAX_GD_ENTRIES, MAX_GRAIN_SECTORS, SECTOR, SESPARSE_GRAIN,
    SESPARSE_GT_SECTORS,
};
use crate::format::TableCache;
use crate::storage::{Storage, StorageExt};
use crate::{Error, ErrorKind, Result};
use std::cell::RefCell;
use std::sync::{Arc, Mutex, RwLock};

fn corrupt(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Corrupt, msg)
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidFormat, msg)
}

/// The largest grain of a compressed extent (2 MiB): a grain is decoded in memory, from up
/// to twice its size of compressed data.
const MAX_COMPRESSED_GRAIN: u64 = 4096;

/// Where a grain lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grain {
    /// Not in this extent: the parent's data (zeros without one).
    Unallocated,
    /// Reads as zeros (a zeroed-grain entry).
    Zero,
    /// At this sector of the file.
    At(u64),
}

/// The last decoded compressed grain (reads smaller than a grain decode it once).
type DecodedGrain = Option<(u64, Arc<Vec<u8>>)>;

/// A hosted sparse or ESX sparse extent file.
#[derive(Debug)]
pub struct SparseExtent {
    /// The file.
    pub file: Arc<dyn Storage>,
    /// Sectors of the extent.
    pub capacity: u64,
    /// Sectors per grain.
    pub grain: u64,
    /// Entries per grain table.
    gtes: u64,
    /// Sector of the grain directory and of the redundant one (0: none).
    gd_offset: u64,
    rgd_offset: u64,
    gd: RwLock<Vec<u32>>,
    rgd: RwLock<Vec<u32>>,
    /// Entries of 1 read as zeros.
    pub zeroed_grain: bool,
    /// Grains are zlib-compressed.
    pub compressed: bool,
    /// Compressed grains carry a 12-byte marker.
    markers: bool,
    /// A stream whose directory was found through its footer (VMware's streams): QEMU
    /// appends after the footer and breaks such files, so it is never written.
    pub footer: bool,
    /// The header version (QEMU refuses to write an uncompressed version 3).
    pub version: u32,
    cache: Mutex<TableCache<u32>>,
    decoded: Mutex<DecodedGrain>,
    /// Where the next grain goes, in sectors; held while a new grain is written.
    alloc: tokio::sync::Mutex<u64>,
}

impl SparseExtent {
    /// Opens a `KDMV` extent whose first sector is `first` (the header), checking it as
    /// QEMU does; a stream's footer replaces the header. `cache_bytes` bounds the cached
    /// grain tables.
    pub async fn open_hosted(
        file: Arc<dyn Storage>,
        first: &[u8],
        cache_bytes: u64,
    ) -> Result<Self> {
        let mut h =
            SparseHeader::parse(first).ok_or_else(|| invalid("Not a VMDK sparse extent"))?;
        let file_size = file.size()?;
        let mut footer = false;
        if h.gd_offset == GD_AT_END {
            h = read_footer(file.as_ref(), file_size).await?;
            footer = true;
        }
        if h.version > 3 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("Unsupported VMDK version {}", h.version),
            ));
        }
        if h.gtes_per_gt > 512 {
            return Err(invalid("L2 table size too big"));
        }
        // QEMU keeps the sectors one table covers in 32 bits.
        let gt_cover = u64::from(h.gtes_per_gt)
            .checked_mul(h.grain_size)
            .filter(|&c| c != 0 && c <= u64::from(u32::MAX))
            .ok_or_else(|| invalid("L1 entry size is invalid"))?;
        if h.grain_size > MAX_GRAIN_SECTORS {
            return Err(invalid("Invalid granularity, image may be corrupt"));
        }
        if h.compressed() && h.grain_size > MAX_COMPRESSED_GRAIN {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "compressed grains of {} sectors are not supported (at most {MAX_COMPRESSED_GRAIN})",
                    h.grain_size
                ),
            ));
        }
        if file_size.div_ceil(SECTOR) < h.overhead {
            return Err(invalid(format!(
                "File truncated, expecting at least {} bytes",
                h.overhead.saturating_mul(SECTOR)
            )));
        }
        let entries = h.capacity.div_ceil(gt_cover);
        if entries > MAX_GD_ENTRIES {
            return Err(invalid("L1 size too big"));
        }
        let gd = read_dir(file.as_ref(), h.gd_offset, entries, file_size, "l1 table").await?;
        let rgd_offset = if h.flags & FLAG_RGD != 0 {
            h.rgd_offset
        } else {
            0
        };
        let rgd = if rgd_offset != 0 {
            read_dir(
                file.as_ref(),
                rgd_offset,
                entries,
                file_size,
                "l1 backup table",
            )
            .await?
        } else {
            Vec::new()
        };
        let next = file_size.div_ceil(SECTOR).next_multiple_of(h.grain_size);
        Ok(SparseExtent {
            capacity: h.capacity,
            grain: h.grain_size,
            gtes: u64::from(h.gtes_per_gt),
            gd_offset: h.gd_offset,
            rgd_offset,
            gd: RwLock::new(gd),
            rgd: RwLock::new(rgd),
            zeroed_grain: h.flags & FLAG_ZEROED_GRAIN != 0,
            compressed: h.compressed(),
            markers: h.flags & FLAG_MARKERS != 0,
            footer,
            version: h.version,
            cache: Mutex::new(TableCache::new(gt_slots(
                cache_bytes,
                u64::from(h.gtes_per_gt),
            ))),
            decoded: Mutex::new(None),
            alloc: tokio::sync::Mutex::new(next),
            file,
        })
    }

    /// Opens a `COWD` extent (4096-entry grain tables, no redundancy, no compression).
    pub async fn open_cowd(file: Arc<dyn Storage>, first: &[u8], cache_bytes: u64) -> Result<Self> {
        let h = CowdHeader::parse(first).ok_or_else(|| invalid("Not a VMDK sparse extent"))?;
        let file_size = file.size()?;
        let grain = u64::from(h.grain_size);
        if grain == 0 || grain > MAX_GRAIN_SECTORS {
            return Err(invalid("Invalid granularity, image may be corrupt"));
        }
        let capacity = u64::from(h.capacity);
        let needed = capacity.div_ceil(u64::from(COWD_GTES) * grain);
        let entries = u64::from(h.gd_entries);
        if entries > MAX_GD_ENTRIES {
            return Err(invalid("L1 size too big"));
        }
        if entries < needed {
            return Err(corrupt(format!(
                "the grain directory has {entries} entries; the extent needs {needed}"
            )));
        }
        let gd = read_dir(
            file.as_ref(),
            u64::from(h.gd_offset),
            entries,
            file_size,
            "l1 table",
        )
        .await?;
        let next = file_size.div_ceil(SECTOR).next_multiple_of(grain);
        Ok(SparseExtent {
            capacity,
            grain,
            gtes: u64::from(COWD_GTES),
            gd_offset: u64::from(h.gd_offset),
            rgd_offset: 0,
            gd: RwLock::new(gd),
            rgd: RwLock::new(Vec::new()),
            zeroed_grain: false,
            compressed: false,
            markers: false,
            footer: false,
            version: 1,
            cache: Mutex::new(TableCache::new(gt_slots(cache_bytes, u64::from(COWD_GTES)))),
            decoded: Mutex::new(None),
            alloc: tokio::sync::Mutex::new(next),
            file,
        })
    }

    /// Bytes per grain.
    pub fn grain_bytes(&self) -> u64 {
        self.grain * SECTOR
    }

    fn gt_bytes(&self) -> u64 {
        self.gtes * 4
    }

    /// The grain table at directory index `i` (cached), or `None` when the directory
    /// entry is 0.
    async fn table(&self, i: u64) -> Result<Option<Arc<Vec<u32>>>> {
        let sector = {
            let gd = self.gd.read().unwrap();
            let Some(&s) = gd.get(i as usize) else {
                return Err(corrupt(format!("grain directory index {i} out of range")));
            };
            s
        };
        if sector == 0 {
            return Ok(None);
        }
        if let Some(gt) = self.cache.lock().unwrap().get(i) {
            return Ok(Some(gt));
        }
        let mut raw = vec![0u8; self.gt_bytes() as usize];
        self.file
            .read_at(u64::from(sector) * SECTOR, &mut raw)
            .await?;
        let gt: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let gt = Arc::new(gt);
        self.cache.lock().unwrap().put(i, Arc::clone(&gt));
        Ok(Some(gt))
    }

    fn decode(&self, e: u32) -> Grain {
        match e {
            0 => Grain::Unallocated,
            1 if self.zeroed_grain => Grain::Zero,
            s => Grain::At(u64::from(s)),
        }
    }

    /// Where grain `g` lives.
    pub async fn grain(&self, g: u64) -> Result<Grain> {
        let Some(gt) = self.table(g / self.gtes).await? else {
            return Ok(Grain::Unallocated);
        };
        Ok(self.decode(gt[(g % self.gtes) as usize]))
    }

    /// Where grain `g` lives, and how many grains from `g` on (at most `max`) continue it:
    /// unallocated or zero alike, or allocated at consecutive sectors (uncompressed).
    pub async fn run(&self, g: u64, max: u64) -> Result<(Grain, u64)> {
        let i = g / self.gtes;
        let Some(gt) = self.table(i).await? else {
            let left = self.gtes - g % self.gtes;
            return Ok((Grain::Unallocated, left.min(max)));
        };
        let first = (g % self.gtes) as usize;
        let kind = self.decode(gt[first]);
        let mut n = 1u64;
        while n < max && first + (n as usize) < gt.len() {
            let next = self.decode(gt[first + n as usize]);
            let continues = match (kind, next) {
                (Grain::At(a), Grain::At(b)) => !self.compressed && b == a + n * self.grain,
                (a, b) => a == b,
            };
            if !continues {
                break;
            }
            n += 1;
        }
        Ok((kind, n))
    }

    /// Decodes the compressed grain `g` stored at `sector` into `out` (the grain's bytes
    /// from `within` on).
    pub async fn read_compressed(
        &self,
        g: u64,
        sector: u64,
        within: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let key = sector;
        let cached = self.decoded.lock().unwrap().clone();
        let data = match cached {
            Some((k, d)) if k == key => d,
            _ => {
                let d = Arc::new(self.decode_grain(g, sector).await?);
                *self.decoded.lock().unwrap() = Some((key, Arc::clone(&d)));
                d
            }
        };
        let start = within as usize;
        let avail = data.len().saturating_sub(start).min(out.len());
        out[..avail].copy_from_slice(&data[start..start + avail]);
        out[avail..].fill(0);
        Ok(())
    }

    async fn decode_grain(&self, g: u64, sector: u64) -> Result<Vec<u8>> {
        let grain_bytes = self.grain_bytes();
        let at = sector * SECTOR;
        let (start, len) = if self.markers {
            let mut m = [0u8; 12];
            self.file.read_at(at, &mut m).await?;
            let size = u64::from(u32::from_le_bytes(m[8..12].try_into().expect("4 bytes")));
            if size == 0 || size > 2 * grain_bytes {
                return Err(corrupt(format!(
                    "compressed grain at sector {sector} has an invalid size ({size} bytes)"
                )));
            }
            (at + 12, size)
        } else {
            (at, grain_bytes)
        };
        let mut input = vec![0u8; len as usize];
        self.file.read_at(start, &mut input).await?;
        // The last grain of an extent may be short.
        let want = grain_bytes.min((self.capacity - g * self.grain) * SECTOR) as usize;
        crate::cpu::run_cpu(move || {
            let mut out = vec![0u8; grain_bytes as usize];
            let n = inflate_zlib(&input, &mut out).ok_or_else(|| {
                corrupt(format!(
                    "compressed grain at sector {sector} cannot be decoded"
                ))
            })?;
            if n < want {
                out[n..].fill(0);
            }
            Ok(out)
        })
        .await?
    }

    /// Updates the entry of grain `g` to `value` in the grain table and its redundant copy
    /// (in this order, as QEMU), then in the cache.
    async fn set_entry(&self, g: u64, value: u32) -> Result<()> {
        let (i, j) = (g / self.gtes, g % self.gtes);
        let (gt_sector, rgt_sector) = {
            let gd = self.gd.read().unwrap();
            let rgd = self.rgd.read().unwrap();
            (gd[i as usize], rgd.get(i as usize).copied().unwrap_or(0))
        };
        let bytes = value.to_le_bytes();
        self.file
            .write_at(u64::from(gt_sector) * SECTOR + j * 4, &bytes)
            .await?;
        if rgt_sector != 0 {
            self.file
                .write_at(u64::from(rgt_sector) * SECTOR + j * 4, &bytes)
                .await?;
        }
        self.cache.lock().unwrap().update(i, j as usize, value);
        Ok(())
    }

    /// Makes sure grain `g` has a grain table (and a redundant one where the extent keeps
    /// them), appending new ones: QEMU never does, and writes over the header instead.
    async fn ensure_table(&self, next: &mut u64, g: u64) -> Result<()> {
        let i = g / self.gtes;
        let (has, has_r) = {
            let gd = self.gd.read().unwrap();
            let rgd = self.rgd.read().unwrap();
            (
                gd[i as usize] != 0,
                rgd.get(i as usize).is_none_or(|&s| s != 0),
            )
        };
        if has && has_r {
            return Ok(());
        }
        let gt_sectors = self.gt_bytes().div_ceil(SECTOR);
        let mut place = |dir_offset: u64| -> Result<(u64, u32)> {
            let at = *next;
            *next = (at + gt_sectors).next_multiple_of(self.grain);
            let sector = u32::try_from(at).map_err(|_| full())?;
            Ok((dir_offset * SECTOR + i * 4, sector))
        };
        let mut updates = Vec::new();
        if !has {
            updates.push((false, place(self.gd_offset)?));
        }
        if !has_r {
            updates.push((true, place(self.rgd_offset)?));
        }
        for (redundant, (entry_at, sector)) in updates {
            self.file
                .write_at(
                    u64::from(sector) * SECTOR,
                    &vec![0u8; self.gt_bytes() as usize],
                )
                .await?;
            self.file.write_at(entry_at, &sector.to_le_bytes()).await?;
            let dir = if redundant { &self.rgd } else { &self.gd };
            dir.write().unwrap()[i as usize] = sector;
        }
        Ok(())
    }

    /// Takes the allocation lock: new grains are made one at a time.
    pub async fn lock_alloc(&self) -> tokio::sync::MutexGuard<'_, u64> {
        self.alloc.lock().await
    }

    /// Reserves a new grain for `g` at the end of the file (with its grain table), and
    /// returns its sector. The entry is written by [`SparseExtent::publish`].
    pub async fn reserve(&self, next: &mut u64, g: u64) -> Result<u64> {
        self.ensure_table(next, g).await?;
        let at = *next;
        if at + self.grain > u64::from(u32::MAX) {
            return Err(full());
        }
        *next = at + self.grain;
        Ok(at)
    }

    /// Publishes grain `g` at `sector` (its data written), and pushes it to the system.
    pub async fn publish(&self, g: u64, sector: u64) -> Result<()> {
        self.set_entry(g, sector as u32).await?;
        self.file.flush().await
    }

    /// Marks grain `g` as reading zeros (zeroed-grain extents only).
    pub async fn set_zero(&self, next: &mut u64, g: u64) -> Result<()> {
        self.ensure_table(next, g).await?;
        self.set_entry(g, 1).await
    }

    /// Drops grain `g` from the extent (it reads from the parent again; its space is not
    /// reused, as in every VMDK writer).
    pub async fn set_unallocated(&self, g: u64) -> Result<()> {
        if self.table(g / self.gtes).await?.is_none() {
            return Ok(());
        }
        self.set_entry(g, 0).await
    }

    /// Stores grain `g` compressed: `data` is its bytes (short for the extent's last
    /// grain). Allocated grains cannot be rewritten, as in QEMU.
    pub async fn write_compressed(&self, g: u64, data: Vec<u8>) -> Result<()> {
        if self.grain(g).await? != Grain::Unallocated {
            return Err(Error::new(
                ErrorKind::Io,
                "Could not write to allocated cluster for streamOptimized",
            ));
        }
        let lba = g * self.grain;
        let markers = self.markers;
        let record = crate::cpu::run_cpu(move || {
            let mut out = vec![0u8; 12 + zlib_bound(data.len())];
            let start = if markers { 12 } else { 0 };
            let n = deflate_zlib(&data, &mut out[start..])?;
            out.truncate(start + n);
            if markers {
                out[..8].copy_from_slice(&lba.to_le_bytes());
                out[8..12].copy_from_slice(&(n as u32).to_le_bytes());
            }
            // Padded to a sector, and an end-of-stream marker (a zero sector) after it,
            // which the next grain overwrites.
            out.resize(
                out.len().next_multiple_of(SECTOR as usize) + SECTOR as usize,
                0,
            );
            Some(out)
        })
        .await?
        .ok_or_else(|| Error::new(ErrorKind::Io, "grain compression failed"))?;
        let mut next = self.lock_alloc().await;
        if self.grain(g).await? != Grain::Unallocated {
            return Err(Error::new(
                ErrorKind::Io,
                "Could not write to allocated cluster for streamOptimized",
            ));
        }
        self.ensure_table(&mut next, g).await?;
        let at = *next;
        let sectors = record.len() as u64 / SECTOR - 1;
        if at + sectors > u64::from(u32::MAX) {
            return Err(full());
        }
        self.file.write_at(at * SECTOR, &record).await?;
        *next = at + sectors;
        self.set_entry(g, at as u32).await
    }

    /// Every allocated grain's sector and its index (for `check`).
    pub async fn allocated(&self) -> Result<Vec<(u64, u64)>> {
        let n = self.gd.read().unwrap().len() as u64;
        let mut out = Vec::new();
        for i in 0..n {
            if let Some(gt) = self.table(i).await? {
                for (j, &e) in gt.iter().enumerate() {
                    if let Grain::At(s) = self.decode(e) {
                        out.push((i * self.gtes + j as u64, s));
                    }
                }
            }
        }
        Ok(out)
    }
}

fn full() -> Error {
    Error::new(
        ErrorKind::NoSpace,
        "the VMDK extent is full: grains cannot start beyond 2 TiB",
    )
}

/// How many grain tables of `gtes` entries fit in `cache_bytes` (at least 16, QEMU's
/// count).
fn gt_slots(cache_bytes: u64, gtes: u64) -> usize {
    TableCache::<u32>::slots(cache_bytes, gtes, 4, 16)
}

/// Reads a grain directory of `entries` entries at sector `offset`; it must lie within
/// the file.
async fn read_dir(
    file: &dyn Storage,
    offset: u64,
    entries: u64,
    file_size: u64,
    what: &str,
) -> Result<Vec<u32>> {
    let bytes = entries * 4;
    let start = offset.checked_mul(SECTOR);
    if start
        .and_then(|s| s.checked_add(bytes))
        .is_none_or(|end| end > file_size.next_multiple_of(SECTOR))
    {
        return Err(invalid(format!(
            "Could not read {what}: it lies beyond the end of the file"
        )));
    }
    let mut raw = vec![0u8; bytes as usize];
    file.read_at(offset * SECTOR, &mut raw).await?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect())
}

/// A stream's footer: the header copy in the second-to-last sector, after a footer marker
/// and before an end-of-stream marker, as QEMU requires.
async fn read_footer(file: &dyn Storage, file_size: u64) -> Result<SparseHeader> {
    let end = file_size.next_multiple_of(SECTOR);
    let bad = || invalid("Invalid footer");
    if end < 3 * SECTOR {
        return Err(bad());
    }
    let mut b = vec![0u8; 3 * SECTOR as usize];
    file.read_at(end - 3 * SECTOR, &mut b).await?;
    let marker = Marker::parse(&b[..16]);
    let eos = Marker::parse(&b[1024..1040]);
    let h = SparseHeader::parse(&b[512..1024]).ok_or_else(bad)?;
    if marker.size != 0
        || marker.kind != super::header::marker::FOOTER
        || eos
            != (Marker {
                val: 0,
                size: 0,
                kind: super::header::marker::EOS,
            })
        || h.gd_offset == GD_AT_END
    {
        return Err(bad());
    }
    Ok(h)
}

thread_local! {
    static ZLIB_C: RefCell<libdeflater::Compressor> = RefCell::new(libdeflater::Compressor::new(
        libdeflater::CompressionLvl::new(6).expect("level 6 is valid"),
    ));
    static ZLIB_D: RefCell<libdeflater::Decompressor> =
        RefCell::new(libdeflater::Decompressor::new());
}

fn zlib_bound(n: usize) -> usize {
    ZLIB_C.with(|c| c.borrow_mut().zlib_compress_bound(n))
}

/// zlib-wraps and deflates `input` into `out`; the bytes written.
fn deflate_zlib(input: &[u8], out: &mut [u8]) -> Option<usize> {
    ZLIB_C.with(|c| c.borrow_mut().zlib_compress(input, out).ok())
}

/// Inflates a zlib stream into `out`; the bytes produced.
fn inflate_zlib(input: &[u8], out: &mut [u8]) -> Option<usize> {
    ZLIB_D.with(|d| d.borrow_mut().zlib_decompress(input, out).ok())
}

/// A read-only SESparse extent (ESXi 6.5+ snapshots), read as QEMU reads it.
#[derive(Debug)]
pub struct SeSparseExtent {
    /// The file.
    pub file: Arc<dyn Storage>,
    /// Sectors of the extent.
    pub capacity: u64,
    gd: Vec<u64>,
    gt_offset: u64,
    grains_offset: u64,
    cache: Mutex<TableCache<u64>>,
}

/// Entries of an SESparse grain table.
const SES_GTES: u64 = SESPARSE_GT_SECTORS * SECTOR / 8;
/// Cached SESparse grain tables (32 KiB each).
const SES_CACHE: usize = 64;

impl SeSparseExtent {
    /// Opens an SESparse extent (checked as QEMU checks it).
    pub async fn open(file: Arc<dyn Storage>, first: &[u8]) -> Result<Self> {
        let h = SeSparseHeader::parse(first)?;
        let file_size = file.size()?;
        let mut vol = vec![0u8; SECTOR as usize];
        let vat = h
            .volatile_offset
            .checked_mul(SECTOR)
            .ok_or_else(|| invalid("Bad volatile header magic"))?;
        file.read_at(vat, &mut vol).await?;
        super::header::check_sesparse_volatile(&vol)?;
        let entries = h.gd_size.saturating_mul(SECTOR / 8);
        let needed = h.capacity.div_ceil(SES_GTES * SESPARSE_GRAIN);
        if entries < needed || entries > MAX_GD_ENTRIES {
            return Err(invalid(format!(
                "SESparse grain directory of {entries} entries does not fit the capacity"
            )));
        }
        let bytes = needed * 8;
        if h.gd_offset
            .checked_mul(SECTOR)
            .and_then(|s| s.checked_add(bytes))
            .is_none_or(|e| e > file_size.next_multiple_of(SECTOR))
        {
            return Err(invalid(
                "Could not read l1 table: it lies beyond the end of the file",
            ));
        }
        let mut raw = vec![0u8; bytes as usize];
        file.read_at(h.gd_offset * SECTOR, &mut raw).await?;
        let gd = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Ok(SeSparseExtent {
            file,
            capacity: h.capacity,
            gd,
            gt_offset: h.gt_offset,
            grains_offset: h.grains_offset,
            cache: Mutex::new(TableCache::new(SES_CACHE)),
        })
    }

    /// Bytes per grain (4 KiB).
    pub fn grain_bytes(&self) -> u64 {
        SESPARSE_GRAIN * SECTOR
    }

    /// Where grain `g` lives.
    pub async fn grain(&self, g: u64) -> Result<Grain> {
        let i = g / SES_GTES;
        let e = *self
            .gd
            .get(i as usize)
            .ok_or_else(|| corrupt(format!("grain directory index {i} out of range")))?;
        if e == 0 {
            return Ok(Grain::Unallocated);
        }
        if e >> 32 != 0x1000_0000 {
            return Err(corrupt(format!(
                "invalid SESparse grain directory entry 0x{e:016x}"
            )));
        }
        let gt = self.table(i, e & 0xffff_ffff).await?;
        let entry = gt[(g % SES_GTES) as usize];
        match entry >> 60 {
            0 if entry == 0 => Ok(Grain::Unallocated),
            1 | 2 => Ok(Grain::Zero),
            3 => {
                let cluster = ((entry & 0x0FFF_0000_0000_0000) >> 48)
                    | ((entry & 0x0000_FFFF_FFFF_FFFF) << 12);
                let sector = cluster
                    .checked_mul(SESPARSE_GRAIN)
                    .and_then(|s| s.checked_add(self.grains_offset))
                    // The whole grain must be addressable.
                    .filter(|s| {
                        s.checked_mul(SECTOR)
                            .and_then(|b| b.checked_add(SESPARSE_GRAIN * SECTOR))
                            .is_some()
                    })
                    .ok_or_else(|| {
                        corrupt(format!("invalid SESparse grain entry 0x{entry:016x}"))
                    })?;
                Ok(Grain::At(sector))
            }
            _ => Err(corrupt(format!(
                "invalid SESparse grain entry 0x{entry:016x}"
            ))),
        }
    }

    async fn table(&self, i: u64, index: u64) -> Result<Arc<Vec<u64>>> {
        if let Some(gt) = self.cache.lock().unwrap().get(i) {
            return Ok(gt);
        }
        let at = index
            .checked_mul(SESPARSE_GT_SECTORS)
            .and_then(|s| s.checked_add(self.gt_offset))
            .and_then(|s| s.checked_mul(SECTOR))
            .ok_or_else(|| corrupt("SESparse grain table offset overflows"))?;
        let mut raw = vec![0u8; (SES_GTES * 8) as usize];
        self.file.read_at(at, &mut raw).await?;
        let gt: Arc<Vec<u64>> = Arc::new(
            raw.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        );
        self.cache.lock().unwrap().put(i, Arc::clone(&gt));
        Ok(gt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zlib_round_trip_has_the_zlib_header_qemu_expects() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 7) as u8).collect();
        let mut out = vec![0u8; zlib_bound(data.len())];
        let n = deflate_zlib(&data, &mut out).unwrap();
        assert_eq!(out[0], 0x78, "a zlib stream starts with CMF 0x78");
        let mut back = vec![0u8; 65536];
        assert_eq!(inflate_zlib(&out[..n], &mut back), Some(65536));
        assert_eq!(back, data);
        // Raw deflate without the zlib wrapper is refused, as QEMU refuses it.
        let mut raw = vec![0u8; 70000];
        let m = libdeflater::Compressor::new(libdeflater::CompressionLvl::default())
            .deflate_compress(&data, &mut raw)
            .unwrap();
        assert_eq!(inflate_zlib(&raw[..m], &mut back), None);
    }
}
