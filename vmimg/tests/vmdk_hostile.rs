//! VMDK files that qemu-img cannot write, and VMDK files written to hurt.
//!
//! Part A writes, from the format notes (header layout, markers, COWD and SESparse
//! structures), files that only VMware products make — a stream with its grain directory
//! behind a footer, an ESX sparse (COWD) extent, an SESparse extent, a descriptor mixing
//! flat, zero, read-only and no-access extents — and proves the reader returns exactly the
//! bytes written, and refuses the writes it must refuse.
//!
//! Part B crafts hostile files: bad header numbers, directories past the end, huge
//! capacities, broken footers, compressed grains with bad sizes or bad zlib data, grain
//! entries far past the end, extents opened on their own, oversized or malformed
//! descriptors, descriptors naming files the caller's policy refuses, and 2000 random
//! mutations of a small image. Each is refused with a clear error of the right kind (the
//! driver's words are asserted), or read without a panic, a hang or an allocation
//! proportional to a number in the file; nothing a descriptor names is opened unless the
//! policy allows it.
//!
//! Part C: a write where the grain directory entry is 0 allocates a grain table (QEMU
//! writes over the header there) and changes nothing but the entries it must.
//!
//! Every image is generated at test time, in memory or in a temporary directory.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmimg::format::{ImplicitOpenKind, Repair};
use vmimg::vmdk::header::{
    marker, CowdHeader, Marker, SparseHeader, COMPRESS_DEFLATE, COWD, FLAG_COMPRESSED,
    FLAG_MARKERS, FLAG_NL_DETECT, FLAG_RGD, GD_AT_END, SECTOR,
};
use vmimg::vmdk::{Descriptor, Subformat, VmdkCreate};
use vmimg::{
    BlockStatusKind, ErrorKind, Format, Image, ImageOpen, ImplicitOpenPolicy, MemoryStorage,
    OpenOptions, PolicyDecision, Storage, StorageExt,
};

/// Bytes per sector, as `usize` for indexing.
const S: usize = SECTOR as usize;
/// Bytes per grain of every hosted image here (128 sectors).
const GRAIN: u64 = 64 * 1024;

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

fn get32(b: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn put32(b: &mut [u8], at: u64, v: u32) {
    let at = at as usize;
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: u64, v: u64) {
    let at = at as usize;
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Pads `f` with zeros to a whole number of sectors.
fn pad_to_sector(f: &mut Vec<u8>) {
    f.resize(f.len().next_multiple_of(S), 0);
}

/// `len` bytes of noise (incompressible), reproducible from `seed`.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

/// `len` bytes of text (compresses well), different for each `seed`.
fn text(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(format!("grain {seed} line {i}: the quick brown fox\n").as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// Adler-32 (RFC 1950), for the zlib trailer.
fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

/// A zlib stream (RFC 1950) holding `data` in stored (uncompressed) deflate blocks: a
/// valid stream any inflater reads, written without a compressor.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    // CMF 0x78 (deflate, 32 KiB window), FLG 0x01: 0x7801 is a multiple of 31.
    let mut out = vec![0x78, 0x01];
    out.extend_from_slice(&raw_deflate_stored(data));
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

/// Stored deflate blocks (RFC 1951) without the zlib wrapper.
fn raw_deflate_stored(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let chunks: Vec<&[u8]> = data.chunks(0xffff).collect();
    if chunks.is_empty() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    for (i, c) in chunks.iter().enumerate() {
        out.push(u8::from(i + 1 == chunks.len()));
        let n = c.len() as u16;
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&(!n).to_le_bytes());
        out.extend_from_slice(c);
    }
    out
}

/// A descriptor file's text with these extent lines.
fn descriptor_text(create_type: &str, extents: &[&str]) -> String {
    format!(
        "# Disk DescriptorFile\nversion=1\nCID=2a2b2c2d\nparentCID=ffffffff\n\
         createType=\"{create_type}\"\n\n# Extent description\n{}\n\n\
         # The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\n\
         ddb.adapterType = \"lsilogic\"\n",
        extents.join("\n")
    )
}

async fn open_storage(
    storage: Arc<dyn Storage>,
    writable: bool,
    policy: ImplicitOpenPolicy,
) -> vmimg::Result<Image> {
    ImageOpen::storage(storage)
        .format(Format::VMDK)
        .options(OpenOptions::new().policy(policy).writable(writable))
        .open()
        .await
}

/// Opens `bytes` (in memory) with the deny policy.
async fn open_bytes(bytes: &[u8], writable: bool) -> vmimg::Result<Image> {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(bytes));
    open_storage(storage, writable, ImplicitOpenPolicy::deny()).await
}

/// Opens the file at `path` with the default (permissive) policy.
async fn open_path(path: &Path, writable: bool) -> vmimg::Result<Image> {
    ImageOpen::path(path)
        .format(Format::VMDK)
        .options(OpenOptions::new().writable(writable))
        .open()
        .await
}

fn assert_error<T: std::fmt::Debug>(r: vmimg::Result<T>, kind: ErrorKind, words: &str) {
    let err = r.unwrap_err();
    assert_eq!(err.kind(), kind, "{err}");
    assert!(err.to_string().contains(words), "{err:?} lacks {words:?}");
}

/// `bytes` opened read-only must fail with `kind` and a message containing `words`.
async fn refused(bytes: &[u8], kind: ErrorKind, words: &str) {
    assert_error(open_bytes(bytes, false).await, kind, words);
}

/// A one-file image made by vmimg, as bytes.
async fn library_image(size: u64, subformat: Subformat) -> Vec<u8> {
    let s = MemoryStorage::new();
    VmdkCreate::new(size)
        .subformat(subformat)
        .create_on(&s, "t.vmdk")
        .await
        .unwrap();
    s.to_vec()
}

/// A one-file image made by vmimg, then written by `fill`, as bytes.
async fn written_image<F, Fut>(size: u64, subformat: Subformat, fill: F) -> Vec<u8>
where
    F: FnOnce(Image) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let s = Arc::new(MemoryStorage::from_bytes(
        &library_image(size, subformat).await,
    ));
    let image = open_storage(s.clone(), true, ImplicitOpenPolicy::deny())
        .await
        .unwrap();
    fill(image).await;
    s.to_vec()
}

fn header_of(b: &[u8]) -> SparseHeader {
    SparseHeader::parse(b).expect("a KDMV header")
}

/// Rewrites the header at 0 after `edit`.
fn edit_header(b: &mut [u8], edit: impl FnOnce(&mut SparseHeader)) {
    let mut h = header_of(b);
    edit(&mut h);
    b[..S].copy_from_slice(&h.to_bytes());
}

/// File byte offset of the primary grain-table entry of grain `g` (its table allocated).
fn gte_at(b: &[u8], g: u64) -> u64 {
    let h = header_of(b);
    let gtes = u64::from(h.gtes_per_gt);
    let gt = get32(b, h.gd_offset * SECTOR + (g / gtes) * 4);
    assert_ne!(gt, 0, "grain {g} has no grain table");
    u64::from(gt) * SECTOR + (g % gtes) * 4
}

/// The descriptor text embedded at sector 1 of a one-file image.
fn embedded_text(b: &[u8]) -> String {
    let area = &b[S..21 * S];
    let end = area.iter().position(|&x| x == 0).unwrap_or(area.len());
    String::from_utf8_lossy(&area[..end]).into_owned()
}

/// The zlib payload vmimg writes for `grain` (a whole 64 KiB grain): written with
/// `write_compressed` into a new streamOptimized image, then lifted out of its marker.
async fn library_zlib(grain: &[u8]) -> Vec<u8> {
    assert_eq!(grain.len() as u64, GRAIN);
    let b = written_image(1 << 20, Subformat::StreamOptimized, |image| async move {
        image.write_compressed(0, grain).await.unwrap();
        image.flush().await.unwrap();
    })
    .await;
    let sector = u64::from(get32(&b, gte_at(&b, 0)));
    let at = (sector * SECTOR) as usize;
    let m = Marker::parse(&b[at..at + 16]);
    assert_eq!(m.val, 0, "the marker names the grain's first sector");
    let payload = b[at + 12..at + 12 + m.size as usize].to_vec();
    assert_eq!(payload[0], 0x78, "a zlib stream");
    payload
}

// ---------------------------------------------------------------------------------------
// Writers for what qemu-img cannot write
// ---------------------------------------------------------------------------------------

/// A VMware stream-optimized file (technote 1.1, §4.3 of the notes): header with gdOffset =
/// GD_AT_END, version 3, flags 0x30001, no redundant directory; embedded descriptor; grain
/// markers with zlib data from sector 128 on, each grain table after the grains it covers
/// (GT marker + GT), tables without grains omitted (GDE 0); GD marker + GD; footer marker,
/// footer (the header with the real gdOffset) and end-of-stream marker as the last three
/// sectors. `grains` are (grain index, zlib payload), ascending.
fn vmware_stream(capacity: u64, cid: u32, grains: &[(u64, Vec<u8>)]) -> Vec<u8> {
    const GRAIN_SECTORS: u64 = 128;
    const GTES: u64 = 512;
    let mut h = SparseHeader {
        version: 3,
        flags: FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS,
        capacity,
        grain_size: GRAIN_SECTORS,
        desc_offset: 1,
        desc_size: 20,
        gtes_per_gt: GTES as u32,
        rgd_offset: 0,
        gd_offset: GD_AT_END,
        overhead: 128,
        unclean_shutdown: false,
        compress_algorithm: COMPRESS_DEFLATE,
    };
    assert_eq!(h.flags, 0x30001);
    let mut f = vec![0u8; 128 * S];
    f[..S].copy_from_slice(&h.to_bytes());
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID={cid:08x}\n\
         parentCID=ffffffff\ncreateType=\"streamOptimized\"\n\n# Extent description\n\
         RW {capacity} SPARSE \"vmware.vmdk\"\n\n# The Disk Data Base\n#DDB\n\n\
         ddb.adapterType = \"lsilogic\"\nddb.geometry.cylinders = \"8\"\n\
         ddb.geometry.heads = \"255\"\nddb.geometry.sectors = \"63\"\n\
         ddb.virtualHWVersion = \"14\"\n"
    );
    f[S..S + desc.len()].copy_from_slice(desc.as_bytes());
    let entries = capacity.div_ceil(GRAIN_SECTORS * GTES);
    let mut gd = vec![0u32; entries as usize];
    let mut i = 0;
    while i < grains.len() {
        let table = grains[i].0 / GTES;
        let mut gt = vec![0u32; GTES as usize];
        while i < grains.len() && grains[i].0 / GTES == table {
            let (g, zlib) = &grains[i];
            gt[(g % GTES) as usize] = (f.len() / S) as u32;
            f.extend_from_slice(&(g * GRAIN_SECTORS).to_le_bytes());
            f.extend_from_slice(&(zlib.len() as u32).to_le_bytes());
            f.extend_from_slice(zlib);
            pad_to_sector(&mut f);
            i += 1;
        }
        f.extend_from_slice(&Marker::metadata(marker::GT, GTES * 4 / SECTOR));
        gd[table as usize] = (f.len() / S) as u32;
        for e in gt {
            f.extend_from_slice(&e.to_le_bytes());
        }
    }
    let gd_sectors = (entries * 4).div_ceil(SECTOR);
    f.extend_from_slice(&Marker::metadata(marker::GD, gd_sectors));
    h.gd_offset = (f.len() / S) as u64;
    for e in gd {
        f.extend_from_slice(&e.to_le_bytes());
    }
    pad_to_sector(&mut f);
    f.extend_from_slice(&Marker::metadata(marker::FOOTER, 1));
    f.extend_from_slice(&h.to_bytes());
    f.extend_from_slice(&Marker::metadata(marker::EOS, 0));
    f
}

/// The 2048-byte header of an ESX sparse (COWD) extent: magic, version 1, flags 3,
/// numSectors, grainSize, gdOffset, numGDEntries, freeSector, then the root geometry.
fn cowd_header(capacity: u32, grain: u32, gd_offset: u32, gd_entries: u32, free: u32) -> Vec<u8> {
    let mut h = vec![0u8; 2048];
    h[..4].copy_from_slice(COWD);
    for (at, v) in [
        (4, 1),
        (8, 3),
        (12, capacity),
        (16, grain),
        (20, gd_offset),
        (24, gd_entries),
        (28, free),
        (32, capacity / (16 * 63)),
        (36, 16),
        (40, 63),
    ] {
        put32(&mut h, at, v);
    }
    h
}

/// SESparse layout used here (sectors): constant header 0, volatile header 1, journal
/// header 2, journal 3..11, grain directory 11 (one sector), two grain tables from 12 (64
/// sectors each), free bitmap 140, backmap 141, grains from `grains_offset`.
const SES_GD: u64 = 11;
const SES_GT: u64 = 12;

/// The pieces (byte offset, bytes) of an SESparse extent of `capacity` sectors: the two
/// headers, the directory `gd`, the grain table at index 1 holding `gt1` (index, entry),
/// junk in the unused table 0, and the clusters (number, 4 KiB of data).
fn sesparse_pieces(
    capacity: u64,
    grains_offset: u64,
    gd: &[u64],
    gt1: &[(usize, u64)],
    clusters: &[(u64, Vec<u8>)],
) -> Vec<(u64, Vec<u8>)> {
    let mut c = vec![0u8; S];
    let fields: [u64; 26] = [
        0xCAFE_BABE,
        0x2_0000_0001,
        capacity,
        8,
        64,
        0,
        0,
        0,
        0,
        0,
        1, // volatile header
        1,
        2, // journal header
        1,
        3, // journal
        8,
        SES_GD,
        1,
        SES_GT,
        128,
        140, // free bitmap
        1,
        141, // backmap
        1,
        grains_offset,
        capacity,
    ];
    for (i, v) in fields.iter().enumerate() {
        put64(&mut c, (i * 8) as u64, *v);
    }
    let mut v = vec![0u8; S];
    put64(&mut v, 0, 0xCAFE_CAFE);
    put64(&mut v, 8, 2); // free_gt_number
    put64(&mut v, 16, 7); // next_txn_seq_number
    let mut dir = vec![0u8; S];
    for (i, e) in gd.iter().enumerate() {
        put64(&mut dir, (i * 8) as u64, *e);
    }
    let junk_table = vec![0xEEu8; 64 * S];
    let mut table = vec![0u8; 64 * S];
    for (i, e) in gt1 {
        put64(&mut table, (*i * 8) as u64, *e);
    }
    let mut pieces = vec![
        (0, c),
        (SECTOR, v),
        (SES_GD * SECTOR, dir),
        (SES_GT * SECTOR, junk_table),
        ((SES_GT + 64) * SECTOR, table),
    ];
    for (cluster, data) in clusters {
        pieces.push(((grains_offset + cluster * 8) * SECTOR, data.clone()));
    }
    pieces
}

/// Writes `pieces` into a new file of at least `len` bytes (sparse where nothing is).
fn write_pieces(path: &Path, len: u64, pieces: &[(u64, Vec<u8>)]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(len).unwrap();
    for (at, b) in pieces {
        f.write_all_at(b, *at).unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// A. Files only VMware writes, read back
// ---------------------------------------------------------------------------------------

/// A VMware stream: its grain directory is found through the footer; GT 1 has no grains
/// (GDE 0); grain 0 holds vmimg's own deflate output, grain 5 a stored zlib stream larger
/// than a grain, the last grain (100 sectors of a 128-sector grain) a short stream.
#[tokio::test]
async fn vmware_stream_with_footer_reads_back_and_refuses_writable_open() {
    let capacity = 2 * 512 * 128 + 100;
    let g0 = text(0, GRAIN as usize);
    let g5 = noise(5, GRAIN as usize);
    let last = noise(1024, 100 * S);
    let z5 = zlib_stored(&g5);
    assert!(z5.len() as u64 > GRAIN, "incompressible: more than a grain");
    let grains = vec![
        (0, library_zlib(&g0).await),
        (5, z5),
        (1024, zlib_stored(&last)),
    ];
    let file = vmware_stream(capacity, 0x0bad_cafe, &grains);
    // The footer and end-of-stream marker really are the last sectors.
    let n = file.len();
    assert_eq!(Marker::parse(&file[n - 3 * S..]).kind, marker::FOOTER);
    assert_eq!(&file[n - S..], &[0u8; S][..]);
    assert_eq!(header_of(&file).gd_offset, GD_AT_END);

    let image = open_bytes(&file, false).await.unwrap();
    assert_eq!(image.size(), capacity * SECTOR);
    let mut want = vec![0u8; (capacity * SECTOR) as usize];
    want[..GRAIN as usize].copy_from_slice(&g0);
    want[5 * GRAIN as usize..6 * GRAIN as usize].copy_from_slice(&g5);
    want[1024 * GRAIN as usize..].copy_from_slice(&last);
    let mut got = vec![0u8; want.len()];
    image.read(0, &mut got).await.unwrap();
    assert!(got == want, "the stream reads back as written");
    // Small unaligned reads inside a compressed grain.
    let mut piece = vec![0u8; 1000];
    image.read(5 * GRAIN + 777, &mut piece).await.unwrap();
    assert_eq!(piece, g5[777..1777]);
    // Allocation: compressed grains, an unallocated range where GDE is 0.
    let st = image.block_status(0, GRAIN).await.unwrap();
    assert_eq!(st.kind, BlockStatusKind::Compressed);
    let st = image.block_status(512 * GRAIN, 4096).await.unwrap();
    assert_eq!(st.kind, BlockStatusKind::Unallocated);
    let d = image.describe();
    let f = d.format_specific.unwrap();
    assert_eq!(
        f.get("create-type"),
        Some(&vmimg::format::InfoValue::Str("streamOptimized".into()))
    );
    assert_eq!(
        f.get("cid"),
        Some(&vmimg::format::InfoValue::Int(0x0bad_cafe))
    );
    // QEMU appends after the footer and breaks such files: vmimg opens them read-only.
    assert_error(
        open_bytes(&file, true).await,
        ErrorKind::ReadOnly,
        "can only be opened read-only",
    );
    // The same stream with the directory named in the header too (as open-vmdk writes
    // streams it does not stream) reads the same without the footer's help.
    let mut up_front = file.clone();
    let footer = header_of(&file[n - 2 * S..]);
    edit_header(&mut up_front, |h| h.gd_offset = footer.gd_offset);
    let image = open_bytes(&up_front, false).await.unwrap();
    let mut got = vec![0u8; 100 * S];
    image.read(1024 * GRAIN, &mut got).await.unwrap();
    assert_eq!(got, last);
}

/// A vmfsSparse descriptor naming a COWD extent (ESX sparse: 2048-byte header, 4096-entry
/// grain tables, grain 16 sectors): reads, in-place writes, new grains appended at
/// ROUND_UP(file sectors, grain) as QEMU does, a grain table made where the GDE is 0.
#[tokio::test]
async fn cowd_extent_through_a_vmfs_sparse_descriptor_reads_and_writes() {
    const GR: u64 = 16; // sectors per grain
    const GB: u64 = GR * SECTOR; // 8 KiB
    let capacity: u32 = 2 * 4096 * GR as u32; // two grain tables: 64 MiB
    let dir = tempfile::tempdir().unwrap();
    let ext = dir.path().join("disk-delta.vmdk");
    let desc = dir.path().join("disk.vmdk");
    // Header 0..4, GD at 4 (2 entries, the second 0), GT 0 at 5..37, grains at 48 and 64,
    // freeSector 80.
    let mut f = cowd_header(capacity, GR as u32, 4, 2, 80);
    let parsed = CowdHeader::parse(&f).unwrap();
    assert_eq!(
        (
            parsed.capacity,
            parsed.grain_size,
            parsed.gd_offset,
            parsed.gd_entries
        ),
        (capacity, 16, 4, 2)
    );
    f.resize(80 * S, 0);
    put32(&mut f, 4 * SECTOR, 5);
    put32(&mut f, 4 * SECTOR + 4, 0);
    put32(&mut f, 5 * SECTOR, 48); // grain 0
    put32(&mut f, 5 * SECTOR + 3 * 4, 64); // grain 3
    let a = noise(10, GB as usize);
    let b = noise(11, GB as usize);
    f[48 * S..64 * S].copy_from_slice(&a);
    f[64 * S..80 * S].copy_from_slice(&b);
    std::fs::write(&ext, &f).unwrap();
    let text = descriptor_text(
        "vmfsSparse",
        &[&format!("RW {capacity} VMFSSPARSE \"disk-delta.vmdk\"")],
    );
    std::fs::write(&desc, &text).unwrap();

    let image = open_path(&desc, false).await.unwrap();
    assert_eq!(image.size(), u64::from(capacity) * SECTOR);
    assert_eq!(image.cluster_size(), Some(GB));
    let mut got = vec![0u8; (5 * GB) as usize];
    image.read(0, &mut got).await.unwrap();
    let mut want = vec![0u8; (5 * GB) as usize];
    want[..GB as usize].copy_from_slice(&a);
    want[(3 * GB) as usize..(4 * GB) as usize].copy_from_slice(&b);
    assert!(got == want);
    let mut far = vec![0xffu8; 4096];
    image.read(4096 * GB + 4096, &mut far).await.unwrap();
    assert!(far.iter().all(|&x| x == 0), "no grain table: zeros");
    let st = image.block_status(3 * GB, GB).await.unwrap();
    assert_eq!(
        st.kind,
        BlockStatusKind::Data {
            host_offset: 64 * SECTOR
        }
    );

    // Writes: a new grain in table 0, a grain in table 1 (GDE 0), in place over grain 3.
    drop(image);
    let image = open_path(&desc, true).await.unwrap();
    let w1 = noise(12, GB as usize);
    let w2 = noise(13, 4096);
    let w3 = noise(14, 512);
    image.write(GB, &w1).await.unwrap();
    image.write(4096 * GB + 4096, &w2).await.unwrap();
    image.write(3 * GB + 1024, &w3).await.unwrap();
    image.flush().await.unwrap();
    drop(image);

    let raw = std::fs::read(&ext).unwrap();
    assert_eq!(raw[..2048], f[..2048], "the COWD header is not touched");
    assert_eq!(get32(&raw, 5 * SECTOR), 48);
    assert_eq!(get32(&raw, 5 * SECTOR + 12), 64, "grain 3 written in place");
    let g1 = u64::from(get32(&raw, 5 * SECTOR + 4));
    assert_eq!(g1, 80, "a new grain goes to ROUND_UP(file sectors, grain)");
    assert_eq!(
        &raw[(g1 * SECTOR) as usize..(g1 * SECTOR + GB) as usize],
        &w1[..]
    );
    let gt1 = u64::from(get32(&raw, 4 * SECTOR + 4));
    assert!(
        gt1 >= 96,
        "the new grain table lies past the old end and grain 1"
    );
    let g4096 = u64::from(get32(&raw, gt1 * SECTOR));
    assert!(g4096 >= gt1 + 32, "grain after its table: {g4096} vs {gt1}");
    let grain = &raw[(g4096 * SECTOR) as usize..(g4096 * SECTOR + GB) as usize];
    assert!(grain[..4096].iter().all(|&x| x == 0));
    assert_eq!(&grain[4096..], &w2[..]);
    // The rest of the new table is empty.
    let table = &raw[(gt1 * SECTOR) as usize..(gt1 * SECTOR) as usize + 4096 * 4];
    assert!(table[4..].iter().all(|&x| x == 0));
    let new_text = std::fs::read_to_string(&desc).unwrap();
    let new = Descriptor::parse(new_text.trim_end_matches('\0')).unwrap();
    let old = Descriptor::parse(&text).unwrap();
    assert_ne!(new.cid, old.cid, "the first write renews the CID");
    assert_eq!(new.extents, old.extents);

    let image = open_path(&desc, false).await.unwrap();
    let mut got = vec![0u8; GB as usize];
    image.read(GB, &mut got).await.unwrap();
    assert_eq!(got, w1);
    let mut got = vec![0u8; 4096];
    image.read(4096 * GB + 4096, &mut got).await.unwrap();
    assert_eq!(got, w2);
    let mut got = vec![0u8; GB as usize];
    image.read(3 * GB, &mut got).await.unwrap();
    let mut want = b.clone();
    want[1024..1536].copy_from_slice(&w3);
    assert_eq!(got, want);
}

/// An seSparse descriptor naming an SESparse extent (constant header 0xCAFEBABE, volatile
/// header 0xCAFECAFE, GD entries 0x10000000_xxxxxxxx naming grain table 1, grain entries
/// 3 (allocated, the cluster split across bits 48..59 and 0..47), 1 and 2 (zero), 0).
#[tokio::test]
async fn sesparse_extent_reads_back_and_refuses_writes() {
    let capacity = 2 * 4096 * 8; // two grain tables
    let grains_offset = 142;
    let a = noise(20, 4096);
    let b = noise(21, 4096);
    let c = noise(22, 4096);
    let pieces = sesparse_pieces(
        capacity,
        grains_offset,
        &[0x1000_0000_0000_0001, 0],
        &[
            (0, 0x3000_0000_0000_0000), // cluster 0
            (1, 0x3002_0000_0000_0000), // cluster 2
            (2, 0x3001_0000_0000_0001), // cluster 1 | 1 << 12 = 4097
            (3, 0x1000_0000_0000_0000), // unmapped: zeros
            (4, 0x2000_0000_0000_0000), // zero
        ],
        &[
            (0, a.clone()),
            (1, vec![0xDD; 4096]),
            (2, b.clone()),
            (4097, c.clone()),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let ext = dir.path().join("snap-sesparse.vmdk");
    let desc = dir.path().join("snap.vmdk");
    write_pieces(&ext, (grains_offset + 4098 * 8) * SECTOR, &pieces);
    std::fs::write(
        &desc,
        descriptor_text(
            "seSparse",
            &[&format!("RW {capacity} SESPARSE \"snap-sesparse.vmdk\"")],
        ),
    )
    .unwrap();

    let image = open_path(&desc, false).await.unwrap();
    assert_eq!(image.size(), capacity * SECTOR);
    let mut got = vec![0xffu8; 8 * 4096];
    image.read(0, &mut got).await.unwrap();
    let mut want = vec![0u8; 8 * 4096];
    want[..4096].copy_from_slice(&a);
    want[4096..8192].copy_from_slice(&b);
    want[8192..12288].copy_from_slice(&c);
    assert!(got == want, "SESparse grains read back");
    let mut rest = vec![0xffu8; (capacity * SECTOR) as usize - 8 * 4096];
    image.read(8 * 4096, &mut rest).await.unwrap();
    assert!(rest.iter().all(|&x| x == 0));
    let st = image.block_status(0, 4096).await.unwrap();
    assert_eq!(
        st.kind,
        BlockStatusKind::Data {
            host_offset: grains_offset * SECTOR
        }
    );
    let st = image.block_status(3 * 4096, 4096).await.unwrap();
    assert!(matches!(st.kind, BlockStatusKind::Zero { .. }), "{st:?}");
    let st = image.block_status(4 * 4096, 4096).await.unwrap();
    assert!(matches!(st.kind, BlockStatusKind::Zero { .. }), "{st:?}");
    let st = image.block_status(5 * 4096, 4096).await.unwrap();
    assert_eq!(st.kind, BlockStatusKind::Unallocated);
    assert_eq!(image.cluster_size(), Some(4096));
    drop(image);

    assert_error(
        open_path(&desc, true).await,
        ErrorKind::ReadOnly,
        "No write support for seSparse images available",
    );
    let image = open_path(&desc, false).await.unwrap();
    assert_eq!(
        image.write(0, &[1u8; 512]).await.unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
}

/// A custom descriptor: FLAT at an offset, ZERO, RDONLY FLAT, NOACCESS FLAT, FLAT again.
/// vmimg keeps every extent in place (QEMU drops all but RW ones and gets a smaller disk).
#[tokio::test]
async fn custom_descriptor_keeps_zero_rdonly_and_noaccess_extents_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let a = noise(30, 200 * S);
    let b = noise(31, 30 * S);
    let c = noise(32, 20 * S);
    std::fs::write(dir.path().join("a.bin"), &a).unwrap();
    std::fs::write(dir.path().join("b.bin"), &b).unwrap();
    std::fs::write(dir.path().join("c.bin"), &c).unwrap();
    std::fs::write(dir.path().join("d.bin"), &a).unwrap();
    let desc = dir.path().join("mixed.vmdk");
    std::fs::write(
        &desc,
        descriptor_text(
            "custom",
            &[
                "RW 100 FLAT \"a.bin\" 10",
                "RW 50 ZERO",
                "RDONLY 30 FLAT \"b.bin\" 0",
                "NOACCESS 20 FLAT \"c.bin\" 0",
                "RW 16 FLAT \"d.bin\" 150",
            ],
        ),
    )
    .unwrap();
    let sec = |n: u64| n * SECTOR;
    let image = open_path(&desc, false).await.unwrap();
    assert_eq!(image.size(), sec(100 + 50 + 30 + 20 + 16));
    let mut got = vec![0u8; S * 180];
    image.read(0, &mut got).await.unwrap();
    assert_eq!(&got[..100 * S], &a[10 * S..110 * S]);
    assert!(
        got[100 * S..150 * S].iter().all(|&x| x == 0),
        "ZERO reads zeros"
    );
    assert_eq!(&got[150 * S..], &b[..]);
    let mut tail = vec![0u8; 16 * S];
    image.read(sec(200), &mut tail).await.unwrap();
    assert_eq!(&tail[..], &a[150 * S..166 * S]);
    let mut one = vec![0u8; S];
    assert_error(
        image.read(sec(185), &mut one).await,
        ErrorKind::PermissionDenied,
        "NOACCESS",
    );
    // A read that only crosses into the NOACCESS extent fails too.
    let mut two = vec![0u8; 2 * S];
    assert_eq!(
        image.read(sec(179), &mut two).await.unwrap_err().kind(),
        ErrorKind::PermissionDenied
    );
    let st = image.block_status(sec(120), sec(10)).await.unwrap();
    assert!(matches!(st.kind, BlockStatusKind::Zero { .. }), "{st:?}");
    drop(image);

    let image = open_path(&desc, true).await.unwrap();
    let w = noise(33, S);
    image.write(sec(5), &w).await.unwrap();
    image.write(sec(205), &w).await.unwrap();
    assert_error(
        image.write(sec(160), &w).await,
        ErrorKind::ReadOnly,
        "cannot be written",
    );
    assert_eq!(
        image.write(sec(120), &w).await.unwrap_err().kind(),
        ErrorKind::ReadOnly,
        "a ZERO extent takes no data"
    );
    assert!(image.write(sec(190), &w).await.is_err(), "NOACCESS");
    image.flush().await.unwrap();
    drop(image);
    let a2 = std::fs::read(dir.path().join("a.bin")).unwrap();
    assert_eq!(&a2[15 * S..16 * S], &w[..], "extent 0 starts at sector 10");
    assert_eq!(&a2[..15 * S], &a[..15 * S]);
    assert_eq!(&a2[16 * S..], &a[16 * S..]);
    let d2 = std::fs::read(dir.path().join("d.bin")).unwrap();
    assert_eq!(
        &d2[155 * S..156 * S],
        &w[..],
        "the last extent starts at 150"
    );
    assert_eq!(&d2[..155 * S], &a[..155 * S]);
    assert_eq!(&d2[156 * S..], &a[156 * S..]);
    assert_eq!(std::fs::read(dir.path().join("b.bin")).unwrap(), b);
    assert_eq!(std::fs::read(dir.path().join("c.bin")).unwrap(), c);
}

// ---------------------------------------------------------------------------------------
// B. Hostile files
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn header_numbers_out_of_range_are_refused_with_the_drivers_words() {
    let base = library_image(1 << 20, Subformat::MonolithicSparse).await;
    let case = |edit: fn(&mut SparseHeader)| {
        let mut b = base.clone();
        edit_header(&mut b, edit);
        b
    };
    refused(
        &case(|h| h.grain_size = 0),
        ErrorKind::InvalidFormat,
        "L1 entry size is invalid",
    )
    .await;
    refused(
        &case(|h| h.gtes_per_gt = 0),
        ErrorKind::InvalidFormat,
        "L1 entry size is invalid",
    )
    .await;
    refused(
        &case(|h| h.gtes_per_gt = 513),
        ErrorKind::InvalidFormat,
        "L2 table size too big",
    )
    .await;
    refused(
        &case(|h| h.gtes_per_gt = u32::MAX),
        ErrorKind::InvalidFormat,
        "L2 table size too big",
    )
    .await;
    refused(
        &case(|h| h.grain_size = 0x20_0001),
        ErrorKind::InvalidFormat,
        "Invalid granularity, image may be corrupt",
    )
    .await;
    // A grain so large that one table covers more than 2^32 sectors.
    refused(
        &case(|h| h.grain_size = 1 << 30),
        ErrorKind::InvalidFormat,
        "L1 entry size is invalid",
    )
    .await;
    refused(
        &case(|h| h.version = 4),
        ErrorKind::Unsupported,
        "Unsupported VMDK version 4",
    )
    .await;
    refused(
        &case(|h| h.version = u32::MAX),
        ErrorKind::Unsupported,
        "Unsupported VMDK version",
    )
    .await;
    refused(
        &case(|h| h.overhead = 1 << 20),
        ErrorKind::InvalidFormat,
        "File truncated, expecting at least 536870912 bytes",
    )
    .await;
    refused(
        &case(|h| h.overhead = u64::MAX),
        ErrorKind::InvalidFormat,
        "File truncated",
    )
    .await;
    // A compressed grain may not be so large that decoding it needs gigabytes.
    refused(
        &case(|h| {
            h.compress_algorithm = COMPRESS_DEFLATE;
            h.grain_size = 0x20_0000;
        }),
        ErrorKind::Unsupported,
        "compressed grains of 2097152 sectors are not supported",
    )
    .await;
}

/// grainSize above 2^55 sectors: numGTEsPerGT * grainSize overflows 64 bits (regression:
/// the product was unchecked and panicked with overflow checks).
#[tokio::test]
async fn grain_sizes_whose_table_cover_overflows_64_bits_are_refused() {
    let base = library_image(1 << 20, Subformat::MonolithicSparse).await;
    for grain in [1 << 55, (1 << 55) + 1, u64::MAX / 2, u64::MAX] {
        let mut b = base.clone();
        edit_header(&mut b, |h| h.grain_size = grain);
        let err = open_bytes(&b, false).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidFormat, "{grain:#x}: {err}");
    }
}

#[tokio::test]
async fn grain_directories_past_the_end_or_too_large_are_refused_without_allocating() {
    let base = library_image(1 << 20, Subformat::MonolithicSparse).await;
    for gd in [1 << 40, u64::MAX / 512, u64::MAX - 1] {
        let mut b = base.clone();
        edit_header(&mut b, |h| h.gd_offset = gd);
        refused(
            &b,
            ErrorKind::InvalidFormat,
            "Could not read l1 table: it lies beyond the end of the file",
        )
        .await;
    }
    let mut b = base.clone();
    edit_header(&mut b, |h| h.rgd_offset = 1 << 40);
    refused(&b, ErrorKind::InvalidFormat, "l1 backup table").await;
    // 2^42 sectors with 64 KiB grains: 64 Mi directory entries (QEMU's limit is 32 Mi).
    let mut b = base.clone();
    edit_header(&mut b, |h| h.capacity = 1 << 42);
    refused(&b, ErrorKind::InvalidFormat, "L1 size too big").await;
    let mut b = base.clone();
    edit_header(&mut b, |h| h.capacity = u64::MAX);
    refused(&b, ErrorKind::InvalidFormat, "L1 size too big").await;
    // 32 Mi entries exactly pass that check, but must lie inside this 64 KiB file.
    let mut b = base.clone();
    edit_header(&mut b, |h| h.capacity = (32 << 20) * 512 * 128);
    refused(
        &b,
        ErrorKind::InvalidFormat,
        "lies beyond the end of the file",
    )
    .await;
}

#[tokio::test]
async fn version_3_without_compression_opens_read_only_only() {
    let mut b = written_image(1 << 20, Subformat::MonolithicSparse, |image| async move {
        image.write(0, &[0x42u8; 4096]).await.unwrap();
        image.flush().await.unwrap();
    })
    .await;
    edit_header(&mut b, |h| h.version = 3);
    let image = open_bytes(&b, false).await.unwrap();
    let mut got = vec![0u8; 4096];
    image.read(0, &mut got).await.unwrap();
    assert!(got.iter().all(|&x| x == 0x42));
    assert_error(
        open_bytes(&b, true).await,
        ErrorKind::ReadOnly,
        "VMDK version 3 must be read only",
    );
}

#[tokio::test]
async fn streams_whose_footer_is_missing_or_broken_are_refused() {
    // gdOffset says "see the footer" in an image that has none.
    let mut b = library_image(1 << 20, Subformat::MonolithicSparse).await;
    edit_header(&mut b, |h| h.gd_offset = GD_AT_END);
    refused(&b, ErrorKind::InvalidFormat, "Invalid footer").await;

    let good = vmware_stream(
        512 * 128,
        7,
        &[(3, zlib_stored(&noise(40, GRAIN as usize)))],
    );
    let n = good.len();
    assert!(open_bytes(&good, false).await.is_ok());
    // The end-of-stream marker cut off.
    refused(&good[..n - S], ErrorKind::InvalidFormat, "Invalid footer").await;
    // The end-of-stream marker and part of the footer cut off (the size is rounded up to a
    // sector: the footer is looked for in the wrong place).
    refused(
        &good[..n - S - 100],
        ErrorKind::InvalidFormat,
        "Invalid footer",
    )
    .await;
    // The footer marker has the wrong type, or a size (a grain marker).
    let mut b = good.clone();
    put32(&mut b, (n - 3 * S + 12) as u64, marker::GT);
    refused(&b, ErrorKind::InvalidFormat, "Invalid footer").await;
    let mut b = good.clone();
    put32(&mut b, (n - 3 * S + 8) as u64, 12);
    refused(&b, ErrorKind::InvalidFormat, "Invalid footer").await;
    // The footer is not a header.
    let mut b = good.clone();
    b[n - 2 * S] = b'X';
    refused(&b, ErrorKind::InvalidFormat, "Invalid footer").await;
    // The footer sends the reader to the footer again.
    let mut b = good.clone();
    put64(&mut b, (n - 2 * S + 56) as u64, GD_AT_END);
    refused(&b, ErrorKind::InvalidFormat, "Invalid footer").await;
    // Garbage in the end-of-stream sector.
    let mut b = good.clone();
    b[n - S] = 1;
    refused(&b, ErrorKind::InvalidFormat, "Invalid footer").await;
    // The footer's own numbers are checked like a header's.
    let mut b = good.clone();
    put32(&mut b, (n - 2 * S + 4) as u64, 4);
    refused(&b, ErrorKind::Unsupported, "Unsupported VMDK version 4").await;
    let mut b = good.clone();
    put64(&mut b, (n - 2 * S + 56) as u64, 1 << 40);
    refused(
        &b,
        ErrorKind::InvalidFormat,
        "lies beyond the end of the file",
    )
    .await;
    // A file shorter than three sectors.
    refused(&good[..2 * S], ErrorKind::InvalidFormat, "Invalid footer").await;
}

/// A stream image made by vmimg with grains 0 and 1 written compressed.
async fn two_grain_stream() -> Vec<u8> {
    written_image(1 << 20, Subformat::StreamOptimized, |image| async move {
        image
            .write_compressed(0, &text(0, GRAIN as usize))
            .await
            .unwrap();
        image
            .write_compressed(GRAIN, &text(1, GRAIN as usize))
            .await
            .unwrap();
        image.flush().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn compressed_grains_with_bad_sizes_or_bad_zlib_fail_their_reads_only() {
    let base = two_grain_stream().await;
    let marker_at = u64::from(get32(&base, gte_at(&base, 0))) * SECTOR;
    let check = |bytes: Vec<u8>, words: &'static str| async move {
        let image = open_bytes(&bytes, false).await.unwrap();
        let mut buf = vec![0u8; 4096];
        assert_error(image.read(0, &mut buf).await, ErrorKind::Corrupt, words);
        // The other grain still reads.
        let mut other = vec![0u8; GRAIN as usize];
        image.read(GRAIN, &mut other).await.unwrap();
        assert_eq!(other, text(1, GRAIN as usize));
    };
    for size in [0, 2 * GRAIN as u32 + 1, u32::MAX] {
        let mut b = base.clone();
        put32(&mut b, marker_at + 8, size);
        check(b, "has an invalid size").await;
    }
    // Garbage instead of zlib data.
    let mut b = base.clone();
    let size = get32(&b, marker_at + 8) as usize;
    let at = marker_at as usize + 12;
    b[at..at + size].fill(0xA5);
    check(b, "cannot be decoded").await;
    // Raw deflate without the zlib wrapper (QEMU refuses it too).
    let mut b = base.clone();
    let raw = raw_deflate_stored(&[7u8; 300]);
    put32(&mut b, marker_at + 8, raw.len() as u32);
    b[at..at + raw.len()].copy_from_slice(&raw);
    check(b, "cannot be decoded").await;
    // A valid zlib stream that inflates to more than a grain (appended at the end, grain
    // 0's entry pointing at it).
    let big = zlib_stored(&vec![9u8; GRAIN as usize + 1]);
    let mut b = base.clone();
    let sector = (b.len() / S) as u32;
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&(big.len() as u32).to_le_bytes());
    b.extend_from_slice(&big);
    pad_to_sector(&mut b);
    let entry = gte_at(&b, 0);
    put32(&mut b, entry, sector);
    check(b, "cannot be decoded").await;
    // A truncated zlib stream.
    let mut b = base.clone();
    put32(&mut b, marker_at + 8, 20);
    check(b, "cannot be decoded").await;
}

#[tokio::test]
async fn grain_entries_far_past_the_end_read_zeros_and_check_reports_them() {
    let mut b = written_image(1 << 20, Subformat::MonolithicSparse, |image| async move {
        image.write(0, &[0x11u8; GRAIN as usize]).await.unwrap();
        image.flush().await.unwrap();
    })
    .await;
    let at = gte_at(&b, 0);
    put32(&mut b, at, 0xFFFF_FF00);
    let image = open_bytes(&b, false).await.unwrap();
    let mut got = vec![0xffu8; GRAIN as usize];
    image.read(0, &mut got).await.unwrap();
    assert!(got.iter().all(|&x| x == 0), "past the end reads zeros");
    let st = image.block_status(0, GRAIN).await.unwrap();
    assert_eq!(
        st.kind,
        BlockStatusKind::Data {
            host_offset: 0xFFFF_FF00 * SECTOR
        }
    );
    let report = image.driver().check(Repair::None).await.unwrap();
    assert_eq!(
        report.messages,
        vec!["ERROR: cluster offset for sector 0 points after EOF".to_string()]
    );

    // In a stream, the marker past the end reads as zeros: a size of 0, refused.
    let mut b = two_grain_stream().await;
    let at = gte_at(&b, 1);
    put32(&mut b, at, 0xFFFF_FFFF);
    let image = open_bytes(&b, false).await.unwrap();
    let mut got = vec![0u8; 4096];
    assert_error(
        image.read(GRAIN, &mut got).await,
        ErrorKind::Corrupt,
        "invalid size (0 bytes)",
    );
    image.read(0, &mut got).await.unwrap();
}

#[tokio::test]
async fn extents_opened_on_their_own_are_refused_naming_the_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let desc = dir.path().join("split.vmdk");
    VmdkCreate::new(1 << 20)
        .subformat(Subformat::TwoGbMaxExtentSparse)
        .create(&desc)
        .await
        .unwrap();
    let ext = dir.path().join("split-s001.vmdk");
    assert!(open_path(&desc, false).await.is_ok());
    assert_error(
        open_path(&ext, false).await,
        ErrorKind::InvalidFormat,
        "open the descriptor file that names it",
    );
    let err = open_path(&ext, false).await.unwrap_err();
    assert!(err.to_string().contains("split-s001.vmdk"), "{err}");
    // A monolithic file whose header says there is no descriptor.
    let mut b = library_image(1 << 20, Subformat::MonolithicSparse).await;
    edit_header(&mut b, |h| h.desc_offset = 0);
    refused(
        &b,
        ErrorKind::InvalidFormat,
        "without a descriptor of its own",
    )
    .await;
    // A descriptor area past the end of the file.
    let mut b = library_image(1 << 20, Subformat::MonolithicSparse).await;
    edit_header(&mut b, |h| h.desc_offset = u64::MAX / 4);
    refused(&b, ErrorKind::InvalidFormat, "beyond the end of the file").await;
    // A descriptor size claiming far more than the file: only what is there is read.
    let mut b = library_image(1 << 20, Subformat::MonolithicSparse).await;
    edit_header(&mut b, |h| h.desc_size = u64::MAX);
    let image = open_bytes(&b, false).await.unwrap();
    assert_eq!(image.size(), 1 << 20);
    // An ESX sparse extent opened directly.
    let mut cowd = cowd_header(2048, 16, 4, 1, 8);
    cowd.resize(8 * S, 0);
    refused(&cowd, ErrorKind::InvalidFormat, "ESX sparse (COWD) extent").await;
}

#[tokio::test]
async fn descriptor_files_over_one_mib_are_refused_and_just_under_open() {
    let body = descriptor_text("monolithicFlat", &["RW 2048 ZERO"]);
    let mut under = body.clone().into_bytes();
    under.resize((1 << 20) - 1, b'#');
    let image = open_bytes(&under, false).await.unwrap();
    assert_eq!(image.size(), 2048 * SECTOR);
    let mut over = body.into_bytes();
    over.resize(1 << 20, b'#');
    refused(
        &over,
        ErrorKind::InvalidFormat,
        "File too large for a VMDK descriptor (1048576 bytes)",
    )
    .await;
    // A 1 TiB descriptor (a sparse file) is refused without reading it.
    let storage = MemoryStorage::with_size(1 << 40);
    storage
        .write_at(0, b"# Disk DescriptorFile\nversion=1\n")
        .await
        .unwrap();
    assert_error(
        open_storage(Arc::new(storage), false, ImplicitOpenPolicy::deny()).await,
        ErrorKind::InvalidFormat,
        "File too large",
    );
    // Text without a CID or a createType.
    refused(
        b"version=1\ncreateType=\"vmfs\"\n",
        ErrorKind::InvalidFormat,
        "no CID",
    )
    .await;
    refused(
        b"version=1\nCID=1\n",
        ErrorKind::InvalidFormat,
        "no createType",
    )
    .await;
    refused(
        b"version=1\nCID=nothex\ncreateType=\"vmfs\"\n",
        ErrorKind::InvalidFormat,
        "bad CID",
    )
    .await;
    // Binary garbage after a plausible start: parsed as text, refused.
    let mut junk = b"version=1\n".to_vec();
    junk.extend(noise(50, 4096).iter().map(|&x| x | 1));
    assert!(open_bytes(&junk, false).await.is_err());
}

#[tokio::test]
async fn malformed_extent_lines_are_refused_before_any_file_is_opened() {
    for line in [
        "RW 2048 FLAT flat.bin 0",
        "RW 2048 FLAT \"flat.bin",
        "RW 2048 FLAT \"flat.bin\" -1",
        "RW 2048 FLAT \"flat.bin\" 0 extra",
        "RW -5 FLAT \"flat.bin\" 0",
        "RW x ZERO",
        "RW 2048 SPARSE",
        "NOACCESS 99999999999999999999 ZERO",
    ] {
        refused(
            descriptor_text("monolithicFlat", &[line]).as_bytes(),
            ErrorKind::InvalidFormat,
            "Invalid extent line",
        )
        .await;
    }
    // Lines the grammar takes that make no sense for their type (checked before the policy
    // is asked: the deny policy would say PermissionDenied otherwise).
    for line in [
        "RW 2048 FLAT \"flat.bin\"",
        "RW 2048 SPARSE \"x.vmdk\" 5",
        "RW 2048 VMFS \"x\" 0",
        "RW 2048 SESPARSE \"x\" 0",
        // Sizes that overflow 64-bit byte counts.
        "RW 36028797018963968 ZERO",
    ] {
        refused(
            descriptor_text("vmfs", &[line]).as_bytes(),
            ErrorKind::InvalidFormat,
            "Invalid extent line",
        )
        .await;
    }
    refused(
        descriptor_text(
            "vmfs",
            &["RW 36028797018963967 ZERO", "RW 36028797018963967 ZERO"],
        )
        .as_bytes(),
        ErrorKind::InvalidFormat,
        "Invalid extent line",
    )
    .await;
    // Unknown extent and disk types.
    for kind in ["VMFSRDM", "VMFSRAW", "FOO"] {
        refused(
            descriptor_text("vmfs", &[&format!("RW 2048 {kind} \"x.vmdk\"")]).as_bytes(),
            ErrorKind::Unsupported,
            &format!("extent type '{kind}' is not supported"),
        )
        .await;
    }
    for t in ["fullDevice", "monolithicSparse", "streamOptimized", ""] {
        refused(
            descriptor_text(t, &["RW 2048 ZERO"]).as_bytes(),
            ErrorKind::Unsupported,
            &format!("Unsupported image type '{t}'"),
        )
        .await;
    }
    // A flat extent whose offset overflows, with the file supplied by the policy.
    let text = descriptor_text("vmfs", &["RW 1 FLAT \"/x/flat.bin\" 36028797018963967"]);
    let policy = ImplicitOpenPolicy::custom(|_| {
        PolicyDecision::Use(Arc::new(MemoryStorage::with_size(4096)))
    });
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(text.as_bytes()));
    assert_error(
        open_storage(storage, false, policy).await,
        ErrorKind::InvalidFormat,
        "Invalid extent line",
    );
}

/// Huge ZERO extents whose sum fits: the disk opens and its last sectors read as zeros.
#[tokio::test]
async fn a_disk_of_nearly_two_to_the_64_bytes_of_zero_extents_reads_its_last_sector() {
    let text = descriptor_text("vmfs", &["RW 36028797018963967 ZERO"]);
    let image = open_bytes(text.as_bytes(), false).await.unwrap();
    let size = image.size();
    assert_eq!(size, u64::MAX - 511);
    let mut buf = vec![0xffu8; S];
    image.read(size - SECTOR, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    assert!(image.read(size, &mut buf).await.is_err());
    let st = image.block_status(size - SECTOR, SECTOR).await.unwrap();
    assert!(matches!(st.kind, BlockStatusKind::Zero { .. }), "{st:?}");
}

#[tokio::test]
async fn the_deny_policy_opens_no_extent_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("flat.bin"), vec![1u8; 2048 * S]).unwrap();
    let desc = dir.path().join("d.vmdk");
    std::fs::write(
        &desc,
        descriptor_text("monolithicFlat", &["RW 2048 FLAT \"flat.bin\" 0"]),
    )
    .unwrap();
    for opts in [
        OpenOptions::new().policy(ImplicitOpenPolicy::deny()),
        OpenOptions::new().untrusted(true),
    ] {
        let err = ImageOpen::path(&desc)
            .format(Format::VMDK)
            .options(opts)
            .open()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
        let msg = err.to_string();
        let flat = dir.path().join("flat.bin");
        assert!(msg.contains(&flat.display().to_string()), "{msg}");
        assert!(msg.contains("extent file"), "{msg}");
        assert!(msg.contains(&desc.display().to_string()), "{msg}");
    }
    // A missing extent gives PermissionDenied, not NotFound: nothing was tried.
    let desc2 = dir.path().join("missing.vmdk");
    std::fs::write(
        &desc2,
        descriptor_text("monolithicFlat", &["RW 2048 FLAT \"nowhere.bin\" 0"]),
    )
    .unwrap();
    let err = ImageOpen::path(&desc2)
        .format(Format::VMDK)
        .options(OpenOptions::new().policy(ImplicitOpenPolicy::deny()))
        .open()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    // And with the permissive policy the same descriptors open (or miss their file).
    assert!(open_path(&desc, false).await.is_ok());
    assert_eq!(
        open_path(&desc2, false).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

/// What a recording policy saw.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    kind: ImplicitOpenKind,
    name: String,
    path: PathBuf,
    named_by: Option<PathBuf>,
    writable: bool,
}

/// A policy that records every request and answers with `answer`.
fn recording(
    answer: impl Fn() -> PolicyDecision + Send + Sync + 'static,
) -> (ImplicitOpenPolicy, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let policy = ImplicitOpenPolicy::custom(move |req| {
        log.lock().unwrap().push(Seen {
            kind: req.kind,
            name: req.name.to_string(),
            path: req.path.to_path_buf(),
            named_by: req.named_by.map(Path::to_path_buf),
            writable: req.writable,
        });
        answer()
    });
    (policy, seen)
}

#[tokio::test]
async fn extents_naming_host_files_go_to_the_policy_as_extent_requests() {
    let dir = tempfile::tempdir().unwrap();
    let desc = dir.path().join("evil.vmdk");
    std::fs::write(
        &desc,
        descriptor_text(
            "monolithicFlat",
            &[
                "RW 2048 FLAT \"/etc/shadow\" 0",
                "RW 2048 FLAT \"../../../etc/passwd\" 0",
            ],
        ),
    )
    .unwrap();
    let (policy, seen) = recording(|| PolicyDecision::Deny("not on my watch".into()));
    let err = ImageOpen::path(&desc)
        .format(Format::VMDK)
        .options(OpenOptions::new().policy(policy))
        .open()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    assert!(err.to_string().contains("not on my watch"), "{err}");
    assert!(err.to_string().contains("/etc/shadow"), "{err}");
    assert_eq!(
        *seen.lock().unwrap(),
        vec![Seen {
            kind: ImplicitOpenKind::Extent,
            name: "/etc/shadow".into(),
            path: PathBuf::from("/etc/shadow"),
            named_by: Some(desc.clone()),
            writable: false,
        }],
        "one request, and the open stops at the refusal"
    );

    // A policy that substitutes storage: every extent comes from it, relative names are
    // resolved against the descriptor's directory, writability follows the access.
    std::fs::write(
        &desc,
        descriptor_text(
            "monolithicFlat",
            &[
                "RW 8 FLAT \"../../../etc/passwd\" 0",
                "RDONLY 8 FLAT \"/etc/shadow\" 0",
            ],
        ),
    )
    .unwrap();
    let (policy, seen) =
        recording(|| PolicyDecision::Use(Arc::new(MemoryStorage::from_bytes(&[0x77u8; 4096]))));
    let image = ImageOpen::path(&desc)
        .format(Format::VMDK)
        .options(OpenOptions::new().policy(policy).writable(true))
        .open()
        .await
        .unwrap();
    let mut got = vec![0u8; 16 * S];
    image.read(0, &mut got).await.unwrap();
    assert!(got.iter().all(|&x| x == 0x77), "the substitutes' bytes");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].kind, ImplicitOpenKind::Extent);
    assert_eq!(seen[0].path, dir.path().join("../../../etc/passwd"));
    assert!(seen[0].writable);
    assert_eq!(seen[1].path, PathBuf::from("/etc/shadow"));
    assert!(
        !seen[1].writable,
        "RDONLY extents are not opened for writing"
    );
    image.flush().await.unwrap();

    // The parent a monolithic file names goes to the policy as a backing file.
    let mut b = library_image(1 << 20, Subformat::MonolithicSparse).await;
    let t = embedded_text(&b).replace(
        "createType=\"monolithicSparse\"\n",
        "createType=\"monolithicSparse\"\nparentFileNameHint=\"/etc/shadow\"",
    );
    b[S..21 * S].fill(0);
    b[S..S + t.len()].copy_from_slice(t.as_bytes());
    let (policy, seen) = recording(|| PolicyDecision::Deny("no".into()));
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(&b));
    let err = open_storage(storage, false, policy).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].kind, ImplicitOpenKind::BackingFile);
    assert_eq!(seen[0].path, PathBuf::from("/etc/shadow"));
}

#[tokio::test]
async fn a_descriptor_naming_itself_as_a_sparse_extent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let desc = dir.path().join("self.vmdk");
    std::fs::write(
        &desc,
        descriptor_text("vmfsSparse", &["RW 2048 VMFSSPARSE \"self.vmdk\""]),
    )
    .unwrap();
    assert_error(
        open_path(&desc, false).await,
        ErrorKind::InvalidFormat,
        "Image not in VMDK format",
    );
}

/// SESparse numbers chosen to overflow: grain offsets near 2^64, tables past the end,
/// directory entries without the 0x10000000 tag, unknown entry kinds. Reads fail with an
/// error (a grain table past the end reads as zeros: unallocated); nothing panics.
#[tokio::test]
async fn sesparse_offsets_near_the_top_of_the_address_space_fail_cleanly() {
    let capacity = 2 * 4096 * 8;
    // (grains offset, directory, entries of grain table 1, whether reading 0 fails)
    type Case = (u64, Vec<u64>, Vec<(usize, u64)>, bool);
    let cases: Vec<Case> = vec![
        // The grain's first byte at 2^64 - 512: the reads of the grain fail.
        (
            (1 << 55) - 1,
            vec![0x1000_0000_0000_0001, 0],
            vec![(0, 0x3000_0000_0000_0000)],
            true,
        ),
        // The largest cluster number.
        (
            142,
            vec![0x1000_0000_0000_0001, 0],
            vec![(0, 0x3FFF_FFFF_FFFF_FFFF)],
            true,
        ),
        // A grain table index far past the end.
        (
            142,
            vec![0x1000_0000_FFFF_FFFF, 0],
            vec![(0, 0x3000_0000_0000_0000)],
            false,
        ),
        // A directory entry without its tag, an entry of kind 4, a kind-0 entry with bits.
        (
            142,
            vec![0x2000_0000_0000_0001, 0x1000_0000_0000_0001],
            vec![(0, 0x4000_0000_0000_0000), (1, 0x0000_0000_0000_0001)],
            true,
        ),
    ];
    for (i, (grains_offset, gd, gt1, fails)) in cases.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let ext = dir.path().join("s.vmdk.bin");
        let desc = dir.path().join("s.vmdk");
        write_pieces(
            &ext,
            200 * SECTOR,
            &sesparse_pieces(capacity, grains_offset, &gd, &gt1, &[]),
        );
        std::fs::write(
            &desc,
            descriptor_text(
                "seSparse",
                &[&format!("RW {capacity} SESPARSE \"s.vmdk.bin\"")],
            ),
        )
        .unwrap();
        let image = open_path(&desc, false).await.unwrap();
        let mut buf = vec![0u8; 8192];
        let r = image.read(0, &mut buf).await;
        assert_eq!(r.is_err(), fails, "case {i}: {r:?}");
        if !fails {
            assert!(buf.iter().all(|&x| x == 0));
        }
        let r = image.read(4096 * 4096, &mut buf).await;
        assert_eq!(r.is_err(), i == 3, "case {i}: {r:?}");
        let _ = image.block_status(0, capacity * SECTOR).await;
    }
}

/// An SESparse grain at sector 2^55 - 1 (byte 2^64 - 512): a read starting 512 bytes or
/// more into it must fail, not overflow (regression: the grain's end was unchecked).
#[tokio::test]
async fn sesparse_reads_inside_a_grain_at_the_top_of_the_address_space_fail_cleanly() {
    let capacity = 2 * 4096 * 8;
    let dir = tempfile::tempdir().unwrap();
    let ext = dir.path().join("s.vmdk.bin");
    let desc = dir.path().join("s.vmdk");
    write_pieces(
        &ext,
        200 * SECTOR,
        &sesparse_pieces(
            capacity,
            (1 << 55) - 1,
            &[0x1000_0000_0000_0001, 0],
            &[(0, 0x3000_0000_0000_0000)],
            &[],
        ),
    );
    std::fs::write(
        &desc,
        descriptor_text(
            "seSparse",
            &[&format!("RW {capacity} SESPARSE \"s.vmdk.bin\"")],
        ),
    )
    .unwrap();
    let image = open_path(&desc, false).await.unwrap();
    let mut buf = vec![0u8; 512];
    assert!(image.read(512, &mut buf).await.is_err());
    assert!(image.block_status(1024, 512).await.is_err());
}

#[tokio::test]
async fn sesparse_headers_are_checked_with_qemus_words() {
    let capacity = 2 * 4096 * 8;
    let good = sesparse_pieces(capacity, 142, &[0, 0], &[], &[]);
    let cases: Vec<(u64, u64, &str)> = vec![
        (0, 0xCAFE_BABF, "Bad const header magic"),
        (8, 0x1_0000_0001, "Unsupported version"),
        (24, 16, "Unsupported grain size: 16"),
        (32, 32, "Unsupported grain table size: 32"),
        (40, 1, "Unsupported flags"),
        (56, 1, "Unsupported reserved bits"),
        (300, 1, "Unsupported non-zero const header padding"),
        (512, 0xCAFE_CAFF, "Bad volatile header magic"),
        (
            512 + 24,
            1,
            "Image is dirty, Replaying journal not supported",
        ),
        (512 + 100, 1, "Unsupported non-zero volatile header padding"),
        // Volatile header past the end of the file (reads zeros: no magic).
        (80, 1 << 40, "Bad volatile header magic"),
        (80, u64::MAX, "Bad volatile header magic"),
        // A directory too small for the capacity, or huge.
        (136, 0, "does not fit the capacity"),
        (136, u64::MAX, "does not fit the capacity"),
        (128, 1 << 50, "lies beyond the end of the file"),
    ];
    for (at, value, words) in cases {
        let mut pieces = good.clone();
        let (head, vol) = pieces.split_at_mut(1);
        if at < 512 {
            put64(&mut head[0].1, at, value);
        } else {
            put64(&mut vol[0].1, at - 512, value);
        }
        let dir = tempfile::tempdir().unwrap();
        write_pieces(&dir.path().join("s.bin"), 200 * SECTOR, &pieces);
        let desc = dir.path().join("s.vmdk");
        std::fs::write(
            &desc,
            descriptor_text("seSparse", &[&format!("RW {capacity} SESPARSE \"s.bin\"")]),
        )
        .unwrap();
        let err = open_path(&desc, false).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidFormat, "{words}: {err}");
        assert!(err.to_string().contains(words), "{words}: {err}");
    }
}

// ---------------------------------------------------------------------------------------
// Random mutations
// ---------------------------------------------------------------------------------------

/// Values that make parsers take unusual paths.
const INTERESTING: [u64; 24] = [
    0,
    1,
    2,
    3,
    0x7f,
    0x80,
    0xff,
    128,
    129,
    512,
    513,
    0xffff,
    0x1_0000,
    0x20_0000,
    0x20_0001,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ff00,
    0xffff_ffff,
    0x1_0000_0000,
    u64::MAX / 512,
    i64::MAX as u64,
    u64::MAX - 1,
    u64::MAX,
];

/// Header field offsets of a KDMV header.
const FIELDS: [usize; 12] = [4, 8, 12, 20, 28, 36, 44, 48, 56, 64, 72, 77];

/// One random change inside `b[..limit]`: a random byte, or an interesting value of 1, 2,
/// 4 or 8 bytes, aimed mostly at the header and the directories and tables (sectors 21 to
/// 31 in a 1 MiB image made by vmimg). Returns (offset, width, value) for the report.
fn mutate(rng: &mut fastrand::Rng, b: &mut [u8], limit: usize) -> (usize, usize, u64) {
    let limit = limit.min(b.len());
    let pos = match rng.u8(0..10) {
        0..=2 => FIELDS[rng.usize(0..FIELDS.len())],
        3 => rng.usize(0..80),
        4 => rng.usize(512..1024),
        5..=7 => rng.usize(21 * S..32 * S).min(limit - 1),
        _ => rng.usize(0..limit),
    };
    if rng.bool() {
        let v = rng.u8(..);
        b[pos] = v;
        (pos, 1, u64::from(v))
    } else {
        let width = [1usize, 2, 4, 8][rng.usize(0..4)];
        let v = INTERESTING[rng.usize(0..INTERESTING.len())];
        let n = width.min(b.len() - pos);
        b[pos..pos + n].copy_from_slice(&v.to_le_bytes()[..n]);
        (pos, n, v)
    }
}

/// Opens `bytes` and reads it: the whole disk up to 2 MiB and its last 64 KiB, allocation
/// status, check; writable opens also write, zero and write compressed. Errors are fine.
async fn exercise(bytes: Vec<u8>, writable: bool) -> bool {
    let Ok(image) = open_bytes(&bytes, writable).await else {
        return false;
    };
    let size = image.size();
    let _ = image.describe();
    let head = size.min(2 << 20);
    let mut buf = vec![0u8; head as usize];
    let _ = image.read(0, &mut buf).await;
    if size > head {
        let tail = (size - head).min(64 << 10);
        let mut t = vec![0u8; tail as usize];
        let _ = image.read(size - tail, &mut t).await;
    }
    let mut off = 0;
    for _ in 0..8 {
        if off >= size {
            break;
        }
        match image.block_status(off, size - off).await {
            Ok(st) => off += st.len,
            Err(_) => break,
        }
    }
    // The check reads every grain table; above 64 GiB (2048 tables) that is slow in debug
    // builds and adds nothing the smaller cases do not cover.
    if size <= 64 << 30 {
        let _ = image.driver().check(Repair::None).await;
    }
    if writable && head >= 2 * GRAIN {
        let _ = image.write(head / 3 / 512 * 512, &[0x5a; 4096]).await;
        let _ = image.write(1000, &[0xa5; 3000]).await;
        let _ = image.write_zeroes(GRAIN, GRAIN, false).await;
        let _ = image.write_compressed(0, &buf[..GRAIN as usize]).await;
        let _ = image.read(0, &mut buf).await;
        let _ = image.flush().await;
    }
    true
}

/// Runs `cases` mutated copies of `base` (1 to 6 changes each, inside `limit` bytes), each
/// on its own task with a time limit, reporting the case and its changes on a panic.
async fn fuzz(base: Vec<u8>, seed: u64, cases: usize, limit: usize) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut opened = 0;
    for case in 0..cases {
        let mut b = base.clone();
        let changes: Vec<_> = (0..rng.usize(1..=6))
            .map(|_| mutate(&mut rng, &mut b, limit))
            .collect();
        let writable = case % 4 == 3;
        let task = tokio::spawn(exercise(b, writable));
        match tokio::time::timeout(Duration::from_secs(20), task).await {
            Err(_) => panic!("case {case} (seed {seed:#x}) hung; changes {changes:x?}"),
            Ok(Err(e)) => {
                panic!("case {case} (seed {seed:#x}) panicked: {e}; changes {changes:x?}")
            }
            Ok(Ok(open)) => opened += usize::from(open),
        }
    }
    eprintln!("{cases} cases: {opened} opened");
    // Enough mutants must open for the reads to be exercised at all.
    assert!(
        opened * 5 > cases,
        "only {opened} of {cases} mutants opened"
    );
}

#[tokio::test]
async fn random_mutations_of_a_monolithic_sparse_image_never_panic() {
    let base = written_image(1 << 20, Subformat::MonolithicSparse, |image| async move {
        image.write(0, &noise(60, GRAIN as usize)).await.unwrap();
        image
            .write(5 * GRAIN + 512, &noise(61, 4096))
            .await
            .unwrap();
        image
            .write(15 * GRAIN, &noise(62, GRAIN as usize))
            .await
            .unwrap();
        image.flush().await.unwrap();
    })
    .await;
    assert!(base.len() > 64 << 10);
    fuzz(base, 0x766d_646b_0001, 2000, 64 << 10).await;
}

#[tokio::test]
async fn random_mutations_of_a_stream_optimized_image_never_panic() {
    let base = written_image(1 << 20, Subformat::StreamOptimized, |image| async move {
        image
            .write_compressed(0, &text(0, GRAIN as usize))
            .await
            .unwrap();
        image
            .write_compressed(3 * GRAIN, &noise(63, GRAIN as usize))
            .await
            .unwrap();
        image
            .write_compressed(15 * GRAIN, &text(15, GRAIN as usize))
            .await
            .unwrap();
        image.flush().await.unwrap();
    })
    .await;
    let len = base.len();
    fuzz(base, 0x766d_646b_0002, 500, len).await;
}

// ---------------------------------------------------------------------------------------
// C. A write where the grain directory entry is 0
// ---------------------------------------------------------------------------------------

/// QEMU writes the guest data over the header when the GDE is 0 (spec §2.3); vmimg appends
/// a grain table (and a redundant one when that directory's entry is 0 too), then the
/// grain, and changes nothing else but the CID.
#[tokio::test]
async fn a_write_where_the_directory_entry_is_zero_allocates_a_table_and_keeps_the_header() {
    for zero_redundant in [false, true] {
        let made = library_image(64 << 20, Subformat::MonolithicSparse).await;
        let h = header_of(&made);
        assert_eq!(h.flags & FLAG_RGD, FLAG_RGD);
        let gde1 = h.gd_offset * SECTOR + 4;
        let rgde1 = h.rgd_offset * SECTOR + 4;
        let old_rgt1 = u64::from(get32(&made, rgde1));
        let mut before = made.clone();
        put32(&mut before, gde1, 0);
        if zero_redundant {
            put32(&mut before, rgde1, 0);
        }
        let storage = Arc::new(MemoryStorage::from_bytes(&before));
        let image = open_storage(storage.clone(), true, ImplicitOpenPolicy::deny())
            .await
            .unwrap();
        let at = (32 << 20) + 3 * GRAIN + 1024; // grain 515: table 1, entry 3
        let mut zeros = vec![0xffu8; 4096];
        image.read(at, &mut zeros).await.unwrap();
        assert!(zeros.iter().all(|&x| x == 0));
        let data = noise(70, 5000);
        image.write(at, &data).await.unwrap();
        image.flush().await.unwrap();
        drop(image);

        let after = storage.to_vec();
        let old_end = before.len() as u64;
        assert_eq!(after[..S], before[..S], "the header is untouched");
        let gt1 = u64::from(get32(&after, gde1));
        assert!(gt1 * SECTOR >= old_end, "a new table past the old end");
        let grain = u64::from(get32(&after, gt1 * SECTOR + 3 * 4));
        assert!(grain >= gt1 + 4, "the grain after its table");
        let rgt1 = u64::from(get32(&after, rgde1));
        if zero_redundant {
            assert!(
                rgt1 * SECTOR >= old_end && rgt1 != gt1,
                "a new redundant table"
            );
        } else {
            assert_eq!(rgt1, old_rgt1, "the redundant directory is kept");
        }
        assert_eq!(
            u64::from(get32(&after, rgt1 * SECTOR + 3 * 4)),
            grain,
            "the redundant table names the grain too"
        );
        // Both new tables hold exactly one entry.
        for t in [gt1, rgt1] {
            let table = &after[(t * SECTOR) as usize..(t * SECTOR) as usize + 2048];
            let used = table.chunks(4).filter(|e| *e != [0u8; 4]).count();
            assert_eq!(used, 1, "table at sector {t}");
        }
        // The grain: zeros around the data.
        let g = &after[(grain * SECTOR) as usize..(grain * SECTOR + GRAIN) as usize];
        assert!(g[..1024].iter().all(|&x| x == 0));
        assert_eq!(&g[1024..6024], &data[..]);
        assert!(g[6024..].iter().all(|&x| x == 0));
        // Every old metadata byte past the descriptor is as before, but the entries named.
        let mut expect = before.clone();
        put32(&mut expect, gde1, gt1 as u32);
        put32(&mut expect, rgde1, rgt1 as u32);
        if !zero_redundant {
            put32(&mut expect, rgt1 * SECTOR + 12, grain as u32);
        }
        assert!(after[21 * S..old_end as usize] == expect[21 * S..]);
        // The descriptor: a new CID, nothing else.
        let (old, new) = (embedded_text(&before), embedded_text(&after));
        let (old_d, new_d) = (
            Descriptor::parse(&old).unwrap(),
            Descriptor::parse(&new).unwrap(),
        );
        assert_ne!(old_d.cid, new_d.cid);
        let strip = |t: &str| {
            t.lines()
                .filter(|l| !l.starts_with("CID="))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(strip(&old), strip(&new));

        // Reopened: the data is there and table 0 still works.
        let image = open_bytes(&after, true).await.unwrap();
        let mut got = vec![0u8; 5000];
        image.read(at, &mut got).await.unwrap();
        assert_eq!(got, data);
        let st = image.block_status(at, 100).await.unwrap();
        assert_eq!(
            st.kind,
            BlockStatusKind::Data {
                host_offset: grain * SECTOR + 1024
            }
        );
        image.write(0, &[3u8; 512]).await.unwrap();
        let mut first = vec![0u8; 512];
        image.read(0, &mut first).await.unwrap();
        assert_eq!(first, vec![3u8; 512]);
        image.flush().await.unwrap();
    }
}
