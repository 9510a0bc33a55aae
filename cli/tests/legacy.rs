//! The legacy formats `convert` takes images out of, read here as qemu-img reads them: the
//! same content, maps and info for files QEMU's tools made (or, for formats qemu-img cannot
//! write, files written here from the format's documentation and read by qemu-img too).

mod common;

use common::*;
use std::path::Path;

/// A raw file with incompressible data, a zero run and compressible data.
fn patterned_raw(path: &Path, size: u64) {
    let mut data = vec![0u8; size as usize];
    let mut rng = fastrand::Rng::with_seed(5);
    rng.fill(&mut data[..300 << 10]);
    let text = b"legacy image text, compressible; ".repeat(20_000);
    data[500 << 10..900 << 10].copy_from_slice(&text[..400 << 10]);
    rng.fill(&mut data[2 << 20..(2 << 20) + 5000]);
    // Written sparse: qemu-img 10's `convert -c -O qcow` fails, silently, on a source
    // whose zeros are allocated.
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, chunk) in data.chunks(4096).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            f.write_at(chunk, i as u64 * 4096).unwrap();
        }
    }
}

/// `img` read by both tools: identical raw conversions, maps and info.
fn reads_like_qemu(d: &Path, img: &str, fmt: &str) {
    qemu_img_in(d, ["convert", "-f", fmt, "-O", "raw", img, "by-qemu.raw"]).ok();
    vmimg_in(d, ["convert", "-f", fmt, "-O", "raw", img, "by-vmimg.raw"]).ok();
    compare_files(&d.join("by-vmimg.raw"), &d.join("by-qemu.raw")).unwrap();
    let qm = qemu_img_in(d, ["map", "--output=json", "-f", fmt, img]).ok();
    let vm = vmimg_in(d, ["map", "--output=json", "-f", fmt, img]).ok();
    assert_eq!(vm.stdout, qm.stdout, "{img}: map");
    let stable = |s: &str| {
        s.lines()
            .filter(|l| !l.contains("disk size"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let qi = qemu_img_in(d, ["info", "-f", fmt, img]).ok();
    let vi = vmimg_in(d, ["info", "-f", fmt, img]).ok();
    assert_eq!(stable(&vi.stdout), stable(&qi.stdout), "{img}: info");
}

/// qcow (version 1) images qemu-img writes, plain, compressed and over a backing file,
/// read as qemu-img reads them; the format is probed; writes are refused.
#[test]
fn qcow_version_1_reads_like_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    patterned_raw(&d.join("src.raw"), 3 << 20);
    qemu_img_in(d, ["convert", "-O", "qcow", "src.raw", "plain.qcow"]).ok();
    // qemu-img 10 writes the whole compressed image, then (here, not always) exits 1 with
    // no message; qemu-img's own compare vouches for the file.
    qemu_img_in(d, ["convert", "-c", "-O", "qcow", "src.raw", "packed.qcow"]);
    qemu_img_in(
        d,
        [
            "compare",
            "-f",
            "qcow",
            "-F",
            "raw",
            "packed.qcow",
            "src.raw",
        ],
    )
    .ok();
    qemu_img_in(
        d,
        [
            "create",
            "-q",
            "-f",
            "qcow",
            "-b",
            "plain.qcow",
            "-F",
            "qcow",
            "top.qcow",
        ],
    )
    .ok();
    qemu_io_in(
        d,
        ["-f", "qcow", "-c", "write -P 0x44 600k 70k", "top.qcow"],
    )
    .ok();
    for img in ["plain.qcow", "packed.qcow", "top.qcow"] {
        reads_like_qemu(d, img, "qcow");
    }
    let packed = qemu_img_in(d, ["map", "--output=json", "packed.qcow"]).ok();
    assert!(
        packed.stdout.contains("\"compressed\": true"),
        "{}",
        packed.stdout
    );
    let probed = vmimg_in(d, ["info", "--output=json", "top.qcow"]).ok();
    assert!(
        probed.stdout.contains("\"format\": \"qcow\""),
        "{}",
        probed.stdout
    );
    let w = vmimg_in(d, ["io", "-f", "qcow", "-c", "write 0 512", "plain.qcow"]);
    assert_ne!(w.status, 0);
    assert!(w.stderr.contains("read-only"), "{}", w.stderr);
}

/// A Bochs growing image written from the format's layout (qemu-img cannot write one):
/// `extents` stored extents of 64 KiB, `version` 1 or 2. Returns its bytes and the disk it
/// holds.
fn bochs(version: u32) -> (Vec<u8>, Vec<u8>) {
    const EXTENT: usize = 64 << 10;
    let extents = 8usize;
    let disk_size = extents * EXTENT - 3 * 512; // not a whole extent at the end
    let mut disk = vec![0u8; disk_size];
    let mut h = vec![0u8; 512];
    h[..22].copy_from_slice(b"Bochs Virtual HD Image");
    h[32..39].copy_from_slice(b"Redolog");
    h[48..55].copy_from_slice(b"Growing");
    h[64..68].copy_from_slice(&(version << 16).to_le_bytes());
    h[68..72].copy_from_slice(&512u32.to_le_bytes()); // header size: the catalog follows
    h[72..76].copy_from_slice(&(extents as u32).to_le_bytes());
    h[76..80].copy_from_slice(&512u32.to_le_bytes()); // bitmap bytes
    h[80..84].copy_from_slice(&(EXTENT as u32).to_le_bytes());
    let at = if version == 1 { 84 } else { 88 };
    h[at..at + 8].copy_from_slice(&(disk_size as u64).to_le_bytes());
    // Extents 1, 3 and 6 stored (in the order 6, 1, 3), each with some sectors present.
    let stored = [6usize, 1, 3];
    let mut catalog = vec![0xffu8; extents * 4];
    let mut data = Vec::new();
    let mut rng = fastrand::Rng::with_seed(11);
    for (n, &e) in stored.iter().enumerate() {
        catalog[e * 4..e * 4 + 4].copy_from_slice(&(n as u32).to_le_bytes());
        let mut bitmap = vec![0u8; 512];
        let mut block = vec![0u8; EXTENT];
        rng.fill(&mut block);
        for s in 0..EXTENT / 512 {
            let present = (s / 7 + n) % 3 != 0;
            let guest = e * EXTENT + s * 512;
            if present && guest < disk_size {
                bitmap[s / 8] |= 1 << (s % 8);
                disk[guest..guest + 512].copy_from_slice(&block[s * 512..s * 512 + 512]);
            }
        }
        data.extend(bitmap);
        data.extend(block);
    }
    let mut file = h;
    file.extend(catalog);
    file.extend(data);
    (file, disk)
}

/// Bochs images of both header versions read here as qemu-img reads them, and as written.
#[test]
fn bochs_images_read_like_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    for version in [1u32, 2] {
        let (file, disk) = bochs(version);
        std::fs::write(d.join("b.img"), &file).unwrap();
        std::fs::write(d.join("want.raw"), &disk).unwrap();
        qemu_img_in(
            d,
            [
                "convert",
                "-f",
                "bochs",
                "-O",
                "raw",
                "b.img",
                "by-qemu.raw",
            ],
        )
        .ok();
        vmimg_in(d, ["convert", "-O", "raw", "b.img", "by-vmimg.raw"]).ok();
        compare_files(&d.join("by-qemu.raw"), &d.join("want.raw")).unwrap();
        compare_files(&d.join("by-vmimg.raw"), &d.join("want.raw")).unwrap();
        let q = qemu_img_in(d, ["info", "--output=json", "b.img"]).ok();
        let v = vmimg_in(d, ["info", "--output=json", "b.img"]).ok();
        let field =
            |s: &str, k: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()[k].clone();
        for k in ["format", "virtual-size", "dirty-flag", "cluster-size"] {
            assert_eq!(field(&v.stdout, k), field(&q.stdout, k), "{k}");
        }
    }
}

/// A cloop image written from the format's layout: the V2.0 script, block size and count,
/// offsets, zlib blocks. Returns its bytes and the disk it holds.
fn cloop() -> (Vec<u8>, Vec<u8>) {
    const BLOCK: usize = 64 << 10;
    let mut disk = vec![0u8; 5 * BLOCK];
    let mut rng = fastrand::Rng::with_seed(12);
    rng.fill(&mut disk[..BLOCK / 2]);
    for (i, b) in disk[2 * BLOCK..4 * BLOCK].iter_mut().enumerate() {
        *b = b"cloop test text "[i % 16];
    }
    let script =
        b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
    let mut file = script.to_vec();
    file.resize(128, 0);
    file.extend((BLOCK as u32).to_be_bytes());
    file.extend(5u32.to_be_bytes());
    let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
    let blocks: Vec<Vec<u8>> = disk
        .chunks(BLOCK)
        .map(|b| {
            let mut out = vec![0u8; c.zlib_compress_bound(b.len())];
            let n = c.zlib_compress(b, &mut out).unwrap();
            out.truncate(n);
            out
        })
        .collect();
    let mut offset = (136 + 6 * 8) as u64;
    let mut offsets = vec![offset];
    for b in &blocks {
        offset += b.len() as u64;
        offsets.push(offset);
    }
    for o in offsets {
        file.extend(o.to_be_bytes());
    }
    for b in blocks {
        file.extend(b);
    }
    (file, disk)
}

/// A cloop image reads here as qemu-img reads it, and as written; it is probed.
#[test]
fn cloop_images_read_like_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    let (file, disk) = cloop();
    std::fs::write(d.join("c.img"), &file).unwrap();
    std::fs::write(d.join("want.raw"), &disk).unwrap();
    qemu_img_in(
        d,
        [
            "convert",
            "-f",
            "cloop",
            "-O",
            "raw",
            "c.img",
            "by-qemu.raw",
        ],
    )
    .ok();
    vmimg_in(d, ["convert", "-O", "raw", "c.img", "by-vmimg.raw"]).ok();
    compare_files(&d.join("by-qemu.raw"), &d.join("want.raw")).unwrap();
    compare_files(&d.join("by-vmimg.raw"), &d.join("want.raw")).unwrap();
    let v = vmimg_in(d, ["info", "c.img"]).ok();
    assert!(v.stdout.contains("file format: cloop"), "{}", v.stdout);
    // No dirty flag, no cluster size: QEMU's cloop driver gives no driver info.
    let q = qemu_img_in(d, ["info", "--output=json", "c.img"]).ok();
    let v = vmimg_in(d, ["info", "--output=json", "c.img"]).ok();
    let keys = |s: &str| {
        let v: serde_json::Value = serde_json::from_str(s).unwrap();
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&v.stdout), keys(&q.stdout));
}
