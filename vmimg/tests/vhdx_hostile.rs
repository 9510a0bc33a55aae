//! Crafted VHDX files: each is refused with a clear error, or read without a panic, a hang
//! or an allocation proportional to a number in the file; metadata is never overwritten by
//! guest data; and the layouts QEMU does not open (4096-byte sectors, differencing disks)
//! are read right.

use std::sync::Arc;
use vmimg::vhdx::header::{
    region_table, state, Header, Region, BAT_REGION, FILE_PARAMETERS, HEADER1, HEADER2,
    LOGICAL_SECTOR, METADATA_REGION, PARENT_LOCATOR, REGION_TABLE, VHDX_LOCATOR_TYPE,
};
use vmimg::vhdx::log::build_entry;
use vmimg::vhdx::VhdxCreate;
use vmimg::{
    ErrorKind, Format, ImageOpen, ImplicitOpenPolicy, MemoryStorage, OpenOptions, Storage,
    StorageExt,
};

const MIB: usize = 1 << 20;

/// A dynamic 8 MiB image with 1 MiB blocks made by vmimg, blocks 0 and 2 written (0x11,
/// 0x22), as bytes.
async fn image() -> Vec<u8> {
    let s: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    VhdxCreate::new(8 << 20)
        .block_size(1 << 20)
        .create_on(s.as_ref())
        .await
        .unwrap();
    let img = ImageOpen::storage(Arc::clone(&s))
        .format(Format::VHDX)
        .writable(true)
        .open()
        .await
        .unwrap();
    img.write(0, &vec![0x11; MIB]).await.unwrap();
    img.write(2 << 20, &vec![0x22; 4096]).await.unwrap();
    img.sync().await.unwrap();
    drop(img);
    bytes_of(s.as_ref()).await
}

async fn bytes_of(s: &dyn Storage) -> Vec<u8> {
    let mut out = vec![0u8; s.size().unwrap() as usize];
    s.read_at(0, &mut out).await.unwrap();
    out
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Offsets of the BAT and the metadata region (from the region table vmimg wrote).
fn regions(b: &[u8]) -> (usize, usize) {
    let rt = REGION_TABLE as usize;
    (le64(b, rt + 32) as usize, le64(b, rt + 64) as usize)
}

async fn open(bytes: &[u8], writable: bool) -> vmimg::Result<vmimg::Image> {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(bytes));
    ImageOpen::storage(storage)
        .format(Format::VHDX)
        .options(
            OpenOptions::new()
                .writable(writable)
                .policy(ImplicitOpenPolicy::deny()),
        )
        .open()
        .await
}

async fn refused(bytes: &[u8]) -> vmimg::Error {
    match open(bytes, false).await {
        Ok(_) => panic!("the image opened"),
        Err(e) => e,
    }
}

/// Rewrites header `slot` (0 or 1) after `edit`, resealed.
fn edit_header(b: &mut [u8], slot: usize, edit: impl Fn(&mut Header)) {
    let at = [HEADER1, HEADER2][slot] as usize;
    let mut h = Header::parse(&b[at..at + 4096]).unwrap();
    edit(&mut h);
    h.write_into(&mut b[at..at + 4096]);
}

#[tokio::test]
async fn headers_are_chosen_and_refused_as_qemu_does() {
    let good = image().await;
    // One damaged header: the other serves.
    let mut b = good.clone();
    b[HEADER2 as usize + 100] ^= 1;
    let img = open(&b, false).await.unwrap();
    let mut buf = vec![0u8; 4096];
    img.read(0, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&x| x == 0x11));
    // Both damaged; equal sequence numbers with different contents.
    let mut b = good.clone();
    b[HEADER1 as usize + 100] ^= 1;
    b[HEADER2 as usize + 100] ^= 1;
    assert!(refused(&b)
        .await
        .to_string()
        .contains("No valid VHDX header found"));
    let mut b = good.clone();
    let seq = Header::parse(&b[HEADER2 as usize..]).unwrap().sequence;
    edit_header(&mut b, 0, |h| {
        h.sequence = seq;
        h.file_write_guid = [9; 16];
    });
    assert!(refused(&b)
        .await
        .to_string()
        .contains("No valid VHDX header found"));
    let mut b = good;
    b[..8].copy_from_slice(b"vhdxfilf");
    refused(&b).await;
}

#[tokio::test]
async fn damaged_regions_and_metadata_are_refused() {
    let good = image().await;
    let (bat, meta) = regions(&good);
    let table = |regions: &[Region]| region_table(regions);
    let std = [
        Region {
            guid: BAT_REGION,
            offset: bat as u64,
            length: MIB as u32,
            required: false,
        },
        Region {
            guid: METADATA_REGION,
            offset: meta as u64,
            length: MIB as u32,
            required: false,
        },
    ];
    let with = |rt: Vec<u8>| {
        let mut b = good.clone();
        b[REGION_TABLE as usize..REGION_TABLE as usize + rt.len()].copy_from_slice(&rt);
        b
    };
    // A bad checksum, an unknown required region, a missing metadata region, a region
    // past the end, the BAT over the log.
    let mut b = good.clone();
    b[REGION_TABLE as usize + 40] ^= 1;
    refused(&b).await;
    let mut extra = std.to_vec();
    extra.push(Region {
        guid: [5; 16],
        offset: 0,
        length: 0,
        required: true,
    });
    assert_eq!(
        refused(&with(table(&extra))).await.kind(),
        ErrorKind::Unsupported
    );
    refused(&with(table(&std[..1]))).await;
    let far = [
        std[0],
        Region {
            offset: 1 << 40,
            ..std[1]
        },
    ];
    assert!(refused(&with(table(&far)))
        .await
        .to_string()
        .contains("beyond the end"));
    let over = [
        Region {
            offset: 1 << 20,
            ..std[0]
        },
        std[1],
    ];
    assert!(refused(&with(table(&over)))
        .await
        .to_string()
        .contains("overlaps"));
    // Metadata: a missing item, a block size that is not a power of two, an odd sector.
    let mut b = good.clone();
    b[meta + 32..meta + 48].fill(0xaa); // the file-parameters entry's GUID
    assert_eq!(refused(&b).await.kind(), ErrorKind::Unsupported);
    let fp = meta + 0x10000;
    let mut b = good.clone();
    b[fp..fp + 4].copy_from_slice(&(3u32 << 20).to_le_bytes());
    assert!(refused(&b).await.to_string().contains("block size"));
    let ls = meta + 0x10020;
    let mut b = good;
    b[ls..ls + 4].copy_from_slice(&1234u32.to_le_bytes());
    assert_eq!(refused(&b).await.kind(), ErrorKind::Unsupported);
}

/// BAT entries naming places outside the file or over the metadata fail their reads with
/// QEMU's words, and a write there is refused: the metadata is never overwritten.
#[tokio::test]
async fn bat_entries_outside_the_data_fail_and_never_overwrite_metadata() {
    let good = image().await;
    let (bat, meta) = regions(&good);
    let set = |b: &mut Vec<u8>, idx: usize, v: u64| {
        b[bat + 8 * idx..bat + 8 * idx + 8].copy_from_slice(&v.to_le_bytes())
    };
    let mut b = good.clone();
    set(&mut b, 0, (1u64 << 40) | state::FULLY_PRESENT);
    set(&mut b, 1, meta as u64 | state::FULLY_PRESENT);
    set(&mut b, 3, 4); // a reserved state
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(&b));
    let img = ImageOpen::storage(Arc::clone(&storage))
        .format(Format::VHDX)
        .writable(true)
        .open()
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let e = img.read(0, &mut buf).await.unwrap_err();
    assert!(e.to_string().contains("points after end of file"), "{e}");
    let e = img.read(1 << 20, &mut buf).await.unwrap_err();
    assert!(e.to_string().contains("overlaps"), "{e}");
    assert!(img.write(1 << 20, &[0xee; 4096]).await.is_err());
    assert!(img.read(3 << 20, &mut buf).await.is_err());
    drop(img);
    let after = bytes_of(storage.as_ref()).await;
    assert!(
        after[meta..meta + MIB] == b[meta..meta + MIB],
        "the metadata was overwritten"
    );
    // check counts both.
    let report = Format::VHDX
        .entry()
        .check(storage.as_ref(), vmimg::format::Repair::None)
        .await
        .unwrap();
    assert_eq!(report.corruptions, 3, "{:?}", report.messages);
}

/// A log GUID with no entry (a crash before the entry was written) is cleared by a
/// writable open, so that QEMU can allocate afterwards; a log that claims a longer file
/// than there is, or lies past the end, is refused.
#[tokio::test]
async fn stale_and_impossible_logs() {
    let good = image().await;
    let mut b = good.clone();
    for slot in 0..2 {
        edit_header(&mut b, slot, |h| h.log_guid = [3; 16]);
    }
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(&b));
    drop(
        ImageOpen::storage(Arc::clone(&storage))
            .format(Format::VHDX)
            .writable(true)
            .open()
            .await
            .unwrap(),
    );
    let after = bytes_of(storage.as_ref()).await;
    for at in [HEADER1, HEADER2] {
        let h = Header::parse(&after[at as usize..]).unwrap();
        assert_eq!(h.log_guid, [0; 16]);
    }
    let mut b = good;
    for slot in 0..2 {
        edit_header(&mut b, slot, |h| {
            h.log_guid = [3; 16];
            h.log_length = 1 << 30;
        });
    }
    assert!(refused(&b).await.to_string().contains("beyond the end"));
}

/// A sealed log entry that asks for a file of 2^64 - 1 bytes, or writes a page at the
/// end of the 64-bit range, is refused on read-only and writable opens (the fuzzer found
/// an overflow panic when rounding the claimed length up to 1 MiB).
#[tokio::test]
async fn logs_claiming_impossible_file_lengths_are_refused() {
    let good = image().await;
    let h = Header::parse(&good[HEADER1 as usize..]).unwrap();
    let guid = [5u8; 16];
    let file_len = good.len() as u64;
    let page = vec![0x77u8; 4096];
    let mut cases = Vec::new();
    // The claimed length (bytes 56..64 of the entry header) patched and resealed.
    let mut e = build_entry(&guid, 1, 0, file_len, &[(4096, page.clone())]);
    e[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
    vmimg::vhdx::header::seal(&mut e, 4);
    cases.push(("asks for a file", e));
    cases.push((
        "writes at",
        build_entry(&guid, 1, 0, file_len, &[(u64::MAX - 4095, page)]),
    ));
    for (words, entry) in cases {
        let mut b = good.clone();
        let at = h.log_offset as usize;
        b[at..at + entry.len()].copy_from_slice(&entry);
        for slot in 0..2 {
            edit_header(&mut b, slot, |h| h.log_guid = guid);
        }
        for writable in [false, true] {
            let Err(err) = open(&b, writable).await else {
                panic!("the image opened ({writable})");
            };
            assert!(err.to_string().contains(words), "{writable}: {err}");
            assert!(
                err.to_string().contains("beyond what a file can hold"),
                "{err}"
            );
        }
    }
}

/// 4096-byte logical sectors (QEMU refuses them): the chunk ratio follows the sector size.
#[tokio::test]
async fn logical_sectors_of_4096_bytes_read_and_write() {
    let s: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    VhdxCreate::new(8 << 20)
        .block_size(1 << 20)
        .create_on(s.as_ref())
        .await
        .unwrap();
    let mut b = bytes_of(s.as_ref()).await;
    let (_, meta) = regions(&b);
    b[meta + 0x10020..meta + 0x10024].copy_from_slice(&4096u32.to_le_bytes());
    assert_eq!(&b[meta + 32 * 4..meta + 32 * 4 + 16], &LOGICAL_SECTOR);
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(&b));
    let img = ImageOpen::storage(Arc::clone(&storage))
        .format(Format::VHDX)
        .writable(true)
        .open()
        .await
        .unwrap();
    img.write(5 << 20, &[0x4b; 8192]).await.unwrap();
    img.sync().await.unwrap();
    drop(img);
    let img = ImageOpen::storage(storage)
        .format(Format::VHDX)
        .open()
        .await
        .unwrap();
    let mut buf = vec![0u8; 8192];
    img.read(5 << 20, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&x| x == 0x4b));
}

/// A differencing disk (QEMU cannot open one) written from [MS-VHDX]: a parent locator,
/// a block not present (the parent's), a partially present one with its sector bitmap.
#[tokio::test]
async fn differencing_disks_read_through_their_parent() {
    let dir = tempfile::tempdir().unwrap();
    let base = image().await;
    std::fs::write(dir.path().join("base.vhdx"), &base).unwrap();
    let parent = Header::parse(&base[HEADER1 as usize..])
        .into_iter()
        .chain(Header::parse(&base[HEADER2 as usize..]))
        .max_by_key(|h| h.sequence)
        .unwrap();
    let child = |linkage: [u8; 16]| {
        let mut b = base.clone();
        let (bat, meta) = regions(&b);
        // HasParent, and a sixth metadata item: the locator.
        let fp = meta + 0x10004;
        let flags = le32(&b, fp) | 2;
        b[fp..fp + 4].copy_from_slice(&flags.to_le_bytes());
        b[meta + 10..meta + 12].copy_from_slice(&6u16.to_le_bytes());
        let utf16 = |s: &str| {
            s.encode_utf16()
                .flat_map(u16::to_le_bytes)
                .collect::<Vec<u8>>()
        };
        let link = utf16(&vmimg::vhdx::header::guid_to_string(&linkage));
        let (k1, k2, v2) = (
            utf16("parent_linkage"),
            utf16("relative_path"),
            utf16(".\\base.vhdx"),
        );
        let mut loc = VHDX_LOCATOR_TYPE.to_vec();
        loc.extend(0u16.to_le_bytes());
        loc.extend(2u16.to_le_bytes());
        let mut off = 20 + 24;
        let mut strings: Vec<u8> = Vec::new();
        for (k, v) in [(&k1, &link), (&k2, &v2)] {
            loc.extend((off as u32).to_le_bytes());
            loc.extend(((off + k.len()) as u32).to_le_bytes());
            loc.extend((k.len() as u16).to_le_bytes());
            loc.extend((v.len() as u16).to_le_bytes());
            off += k.len() + v.len();
            strings.extend_from_slice(k);
            strings.extend_from_slice(v);
        }
        loc.extend(strings);
        let item = 0x10028;
        let e = meta + 32 + 32 * 5;
        b[e..e + 16].copy_from_slice(&PARENT_LOCATOR);
        b[e + 16..e + 20].copy_from_slice(&(item as u32).to_le_bytes());
        b[e + 20..e + 24].copy_from_slice(&(loc.len() as u32).to_le_bytes());
        b[e + 24..e + 28].copy_from_slice(&4u32.to_le_bytes());
        b[meta + item..meta + item + loc.len()].copy_from_slice(&loc);
        // The BAT: everything the parent's but block 1, partially present.
        let set = |b: &mut Vec<u8>, idx: usize, v: u64| {
            b[bat + 8 * idx..bat + 8 * idx + 8].copy_from_slice(&v.to_le_bytes())
        };
        for n in 0..8 {
            set(&mut b, n, state::NOT_PRESENT);
        }
        let data = b.len().next_multiple_of(MIB);
        let bitmap = data + MIB;
        b.resize(bitmap + MIB, 0);
        b[data..data + 8 * 512].fill(0x99);
        set(&mut b, 1, data as u64 | state::PARTIALLY_PRESENT);
        set(&mut b, 4096, bitmap as u64 | state::FULLY_PRESENT); // chunk 0's bitmap
        b[bitmap + 2048 / 8] = 0xff; // block 1 (bits 2048..4095): its first 8 sectors
        let _ = FILE_PARAMETERS;
        b
    };
    let path = dir.path().join("child.vhdx");
    std::fs::write(&path, child(parent.data_write_guid)).unwrap();
    let img = ImageOpen::path(&path)
        .format(Format::VHDX)
        .open()
        .await
        .unwrap();
    let mut buf = vec![0u8; 2 * MIB];
    img.read(0, &mut buf).await.unwrap();
    assert!(
        buf[..MIB].iter().all(|&x| x == 0x11),
        "block 0 from the parent"
    );
    assert!(
        buf[MIB..MIB + 4096].iter().all(|&x| x == 0x99),
        "the child's sectors"
    );
    assert!(
        buf[MIB + 4096..].iter().all(|&x| x == 0),
        "the parent's zeros"
    );
    let mut two = vec![0u8; 4096];
    img.read(2 << 20, &mut two).await.unwrap();
    assert!(two.iter().all(|&x| x == 0x22));
    assert_eq!(
        img.describe().backing_filename.as_deref(),
        Some("base.vhdx")
    );
    drop(img);
    // A parent that is not the one recorded, and a writable open, are refused.
    std::fs::write(&path, child([1; 16])).unwrap();
    let e = ImageOpen::path(&path)
        .format(Format::VHDX)
        .open()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not the parent"), "{e}");
    std::fs::write(&path, child(parent.data_write_guid)).unwrap();
    let e = ImageOpen::path(&path)
        .format(Format::VHDX)
        .writable(true)
        .open()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    // Untrusted: the parent is not opened.
    let e = ImageOpen::path(&path)
        .format(Format::VHDX)
        .options(OpenOptions::new().policy(ImplicitOpenPolicy::deny()))
        .open()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
}

#[tokio::test]
async fn random_mutations_never_panic() {
    let base = image().await;
    let (bat, meta) = regions(&base);
    let hot = [
        0usize,
        HEADER1 as usize,
        HEADER2 as usize,
        REGION_TABLE as usize,
        bat,
        meta,
        meta + 0x10000,
    ];
    let mut rng = fastrand::Rng::with_seed(0x7d);
    let mut opened = 0;
    for case in 0..800 {
        let mut b = base.clone();
        for _ in 0..rng.usize(1..=4) {
            let at = hot[rng.usize(0..hot.len())] + rng.usize(0..128);
            b[at] = rng.u8(..);
        }
        // Damaged checksummed structures would just be refused: reseal some headers.
        if case % 2 == 0 {
            for slot in 0..2 {
                let at = [HEADER1, HEADER2][slot] as usize;
                vmimg::vhdx::header::seal(&mut b[at..at + 4096], 4);
            }
        }
        let writable = case % 3 == 0;
        let task = tokio::spawn(async move {
            let Ok(img) = open(&b, writable).await else {
                return false;
            };
            let size = img.size().min(16 << 20);
            let mut buf = vec![0u8; MIB];
            let mut at = 0;
            while at < size {
                let n = (MIB as u64).min(size - at) as usize;
                let _ = img.read(at, &mut buf[..n]).await;
                let _ = img.block_status(at, n as u64).await;
                at += n as u64;
            }
            if writable && size > 0 {
                let _ = img.write(size / 2, &[1u8; 512]).await;
                let _ = img.sync().await;
            }
            true
        });
        match tokio::time::timeout(std::time::Duration::from_secs(20), task).await {
            Err(_) => panic!("case {case} hung"),
            Ok(Err(e)) => panic!("case {case} panicked: {e}"),
            Ok(Ok(o)) => opened += usize::from(o),
        }
    }
    assert!(opened > 100, "only {opened} mutants opened");
}
