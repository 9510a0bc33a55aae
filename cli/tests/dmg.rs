//! DMG (UDIF), read only: images written here from the format's layout (koly trailer,
//! mish tables in an XML property list or a resource fork, raw, zero, zlib, bzip2 and
//! LZFSE chunks) read by vmimg and qemu-img alike, with the same maps, info, errors and
//! refusals.

mod common;

use common::*;
use std::io::Write;
use std::path::Path;

/// One chunk of a test image.
enum C {
    Raw(Vec<u8>),
    Zero(u64),
    Ignore(u64),
    Zlib(Vec<u8>),
    Bzip2(Vec<u8>),
    Lzfse(Vec<u8>),
    /// A chunk of a type QEMU does not read (ADC) over this many sectors.
    Adc(u64),
    Comment,
    Terminator,
}

/// A partition: its first sector and its chunks, in order.
struct Part {
    first: u64,
    chunks: Vec<C>,
}

fn b64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for (i, g) in data.chunks(3).enumerate() {
        if i > 0 && i % 18 == 0 {
            s.push_str("\n\t\t\t");
        }
        let n = g.len();
        let v = (u32::from(g[0]) << 16)
            | (u32::from(*g.get(1).unwrap_or(&0)) << 8)
            | u32::from(*g.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= n {
                s.push(A[(v >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
    let mut out = vec![0u8; c.zlib_compress_bound(data.len())];
    let n = c.zlib_compress(data, &mut out).unwrap();
    out.truncate(n);
    out
}

fn bzip2(data: &[u8]) -> Vec<u8> {
    let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn lzfse(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    lzfse_rust::encode_bytes(data, &mut out).unwrap();
    out
}

/// Sector data that compresses a little.
fn pattern(sectors: u64, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..sectors * 512)
        .map(|i| {
            if i % 7 < 3 {
                rng.u8(..)
            } else {
                (i / 512) as u8
            }
        })
        .collect()
}

/// Builds a DMG of `parts` (tables in a resource fork when `rsrc`, else in an XML
/// property list), its data fork after `junk` bytes. Returns the file and the disk it
/// holds (sectors no chunk covers are left zero in the disk).
fn build(parts: &[Part], rsrc: bool, junk: usize) -> (Vec<u8>, Vec<u8>) {
    let mut file = vec![0x5au8; junk];
    let mut disk = Vec::new();
    let mut blobs = Vec::new();
    for p in parts {
        let data_offset = (file.len() - junk) as u64;
        let mut entries = Vec::new();
        let mut sector = 0u64;
        for c in &p.chunks {
            let at = (file.len() - junk) as u64 - data_offset;
            let (ty, count, payload, content): (u32, u64, Vec<u8>, Option<Vec<u8>>) = match c {
                C::Raw(d) => (1, d.len() as u64 / 512, d.clone(), Some(d.clone())),
                C::Zero(n) => (0, *n, vec![], Some(vec![0; (*n * 512) as usize])),
                C::Ignore(n) => (2, *n, vec![], Some(vec![0; (*n * 512) as usize])),
                C::Zlib(d) => (0x8000_0005, d.len() as u64 / 512, zlib(d), Some(d.clone())),
                C::Bzip2(d) => (0x8000_0006, d.len() as u64 / 512, bzip2(d), Some(d.clone())),
                C::Lzfse(d) => (0x8000_0007, d.len() as u64 / 512, lzfse(d), Some(d.clone())),
                C::Adc(n) => (0x8000_0004, *n, vec![0xee; 100], None),
                C::Comment => (0x7fff_fffe, 0, vec![], None),
                C::Terminator => (0xffff_ffff, 0, vec![], None),
            };
            let mut e = Vec::new();
            e.extend(ty.to_be_bytes());
            e.extend(0u32.to_be_bytes());
            e.extend(sector.to_be_bytes());
            e.extend(count.to_be_bytes());
            e.extend(at.to_be_bytes());
            e.extend((payload.len() as u64).to_be_bytes());
            entries.push(e);
            file.extend(&payload);
            let start = ((p.first + sector) * 512) as usize;
            let bytes = (count * 512) as usize;
            if disk.len() < start + bytes {
                disk.resize(start + bytes, 0);
            }
            if let Some(content) = content {
                disk[start..start + bytes].copy_from_slice(&content);
            }
            sector += count;
        }
        let mut m = Vec::new();
        m.extend(b"mish");
        m.extend(1u32.to_be_bytes());
        m.extend(p.first.to_be_bytes());
        m.extend(sector.to_be_bytes());
        m.extend(data_offset.to_be_bytes());
        m.extend(0x208u32.to_be_bytes());
        m.extend(0u32.to_be_bytes());
        m.extend([0u8; 24]);
        m.extend(2u32.to_be_bytes());
        m.extend(32u32.to_be_bytes());
        m.extend([0u8; 128]);
        m.extend((entries.len() as u32).to_be_bytes());
        for e in entries {
            m.extend(e);
        }
        blobs.push(m);
    }
    let data_len = (file.len() - junk) as u64;
    let (mut rsrc_at, mut rsrc_len, mut xml_at, mut xml_len) = (0u64, 0u64, 0u64, 0u64);
    if rsrc {
        let mut data = Vec::new();
        for b in &blobs {
            data.extend((b.len() as u32).to_be_bytes());
            data.extend(b);
        }
        let map = [0u8; 30];
        let mut fork = Vec::new();
        fork.extend(256u32.to_be_bytes());
        fork.extend((256 + data.len() as u32).to_be_bytes());
        fork.extend((data.len() as u32).to_be_bytes());
        fork.extend((map.len() as u32).to_be_bytes());
        fork.resize(256, 0);
        fork.extend(&data);
        fork.extend(map);
        rsrc_at = file.len() as u64;
        rsrc_len = fork.len() as u64;
        file.extend(fork);
    } else {
        let mut xml = String::from(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\">\n<dict>\n\
             \t<key>resource-fork</key>\n\t<dict>\n\t\t<key>blkx</key>\n\t\t<array>\n",
        );
        for (i, b) in blobs.iter().enumerate() {
            xml += &format!(
                "\t\t\t<dict>\n\t\t\t\t<key>Attributes</key>\n\t\t\t\t<string>0x0050</string>\n\
                 \t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n\t\t\t{}\n\t\t\t\t</data>\n\
                 \t\t\t\t<key>ID</key>\n\t\t\t\t<string>{i}</string>\n\t\t\t</dict>\n",
                b64(b)
            );
        }
        xml += "\t\t</array>\n\t</dict>\n</dict>\n</plist>\n";
        xml_at = file.len() as u64;
        xml_len = xml.len() as u64;
        file.extend(xml.as_bytes());
    }
    let mut k = vec![0u8; 512];
    let put = |k: &mut [u8], at: usize, v: &[u8]| k[at..at + v.len()].copy_from_slice(v);
    put(&mut k, 0, b"koly");
    put(&mut k, 4, &4u32.to_be_bytes());
    put(&mut k, 8, &512u32.to_be_bytes());
    put(&mut k, 12, &1u32.to_be_bytes());
    put(&mut k, 0x18, &(junk as u64).to_be_bytes());
    put(&mut k, 0x20, &data_len.to_be_bytes());
    put(&mut k, 0x28, &rsrc_at.to_be_bytes());
    put(&mut k, 0x30, &rsrc_len.to_be_bytes());
    put(&mut k, 0xd8, &xml_at.to_be_bytes());
    put(&mut k, 0xe0, &xml_len.to_be_bytes());
    put(&mut k, 0x1e8, &1u32.to_be_bytes());
    put(&mut k, 0x1ec, &(disk.len() as u64 / 512).to_be_bytes());
    file.extend(k);
    (file, disk)
}

fn write(d: &Path, name: &str, parts: &[Part], rsrc: bool) -> Vec<u8> {
    let (file, disk) = build(parts, rsrc, 1000);
    std::fs::write(d.join(name), file).unwrap();
    disk
}

fn tail(s: &str) -> String {
    s.trim_end().rsplit(": ").next().unwrap_or("").to_string()
}

/// Raw, zero, ignore and zlib chunks over two partitions, with comments and terminators,
/// through an XML property list and through a resource fork: both tools read the disk
/// written, probe the file by its name, and show the same map and info.
#[test]
fn chunks_read_as_qemu_reads_them() {
    let dir = tempdir();
    let d = dir.path();
    for rsrc in [false, true] {
        let parts = [
            Part {
                first: 0,
                chunks: vec![
                    C::Raw(pattern(2, 1)),
                    C::Zero(3),
                    C::Zlib(pattern(8, 2)),
                    C::Ignore(1),
                    C::Comment,
                    C::Raw(pattern(1, 3)),
                    C::Terminator,
                ],
            },
            Part {
                first: 15,
                chunks: vec![C::Zlib(pattern(300, 4)), C::Zero(100), C::Terminator],
            },
        ];
        let disk = write(d, "img.dmg", &parts, rsrc);
        std::fs::write(d.join("want.raw"), &disk).unwrap();
        qemu_img_in(d, ["convert", "-f", "dmg", "-O", "raw", "img.dmg", "q.raw"]).ok();
        vmimg_in(d, ["convert", "-O", "raw", "img.dmg", "v.raw"]).ok();
        compare_files(&d.join("q.raw"), &d.join("want.raw")).unwrap();
        compare_files(&d.join("v.raw"), &d.join("want.raw")).unwrap();
        vmimg_in(d, ["compare", "img.dmg", "want.raw"]).ok();
        for args in [
            &["map", "--output=json", "img.dmg"][..],
            &["info", "img.dmg"],
            &["info", "--output=json", "img.dmg"],
        ] {
            let q = qemu_img_in(d, args).ok();
            let v = vmimg_in(d, args).ok();
            assert_eq!(v.stdout, q.stdout, "rsrc {rsrc}: {args:?}");
        }
        // Human maps need host offsets: both refuse.
        let q = qemu_img_in(d, ["map", "img.dmg"]);
        let v = vmimg_in(d, ["map", "img.dmg"]);
        assert_eq!((v.status, tail(&v.stderr)), (q.status, tail(&q.stderr)));
        // The same bytes under another name are raw, for both.
        std::fs::copy(d.join("img.dmg"), d.join("img.bin")).unwrap();
        for out in [
            qemu_img_in(d, ["info", "img.bin"]).ok(),
            vmimg_in(d, ["info", "img.bin"]).ok(),
        ] {
            assert!(out.stdout.contains("file format: raw"), "{}", out.stdout);
        }
    }
}

/// bzip2 and LZFSE chunks read as QEMU reads them with its dmg-bz2 and dmg-lzfse modules
/// (this machine's qemu-img has neither: it must then say so).
#[test]
fn bzip2_and_lzfse_chunks_are_read() {
    let dir = tempdir();
    let d = dir.path();
    let parts = [Part {
        first: 0,
        chunks: vec![
            C::Bzip2(pattern(40, 5)),
            C::Raw(pattern(1, 6)),
            C::Lzfse(pattern(64, 7)),
            C::Bzip2(vec![0; 512 * 9]),
            C::Lzfse(vec![7; 512 * 3]),
            C::Terminator,
        ],
    }];
    let disk = write(d, "c.dmg", &parts, false);
    std::fs::write(d.join("want.raw"), &disk).unwrap();
    vmimg_in(d, ["convert", "-O", "raw", "c.dmg", "v.raw"]).ok();
    compare_files(&d.join("v.raw"), &d.join("want.raw")).unwrap();
    let q = qemu_img_in(d, ["convert", "-f", "dmg", "-O", "raw", "c.dmg", "q.raw"]);
    if q.status == 0 {
        compare_files(&d.join("q.raw"), &d.join("want.raw")).unwrap();
    } else {
        assert!(q.stderr.contains("module is missing"), "{}", q.stderr);
    }
}

/// Sectors no chunk covers (gaps, ADC chunks) are I/O errors for both tools, around
/// sectors that read; QEMU's limits and trailer errors in its words; writes, checks and
/// creation refused as qemu-img refuses them.
#[test]
fn unreadable_sectors_and_refusals_match_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let adc = [Part {
        first: 0,
        chunks: vec![C::Raw(pattern(2, 8)), C::Adc(2), C::Zlib(pattern(2, 9))],
    }];
    write(d, "adc.dmg", &adc, false);
    // Sectors 2 and 3 in no chunk.
    let parts = [
        Part {
            first: 0,
            chunks: vec![C::Raw(pattern(2, 8))],
        },
        Part {
            first: 4,
            chunks: vec![C::Zlib(pattern(2, 9))],
        },
    ];
    write(d, "gap.dmg", &parts, false);
    for img in ["adc.dmg", "gap.dmg"] {
        let q = qemu_img_in(d, ["convert", "-f", "dmg", "-O", "raw", img, "q.raw"]);
        let v = vmimg_in(d, ["convert", "-O", "raw", img, "v.raw"]);
        assert_eq!((v.status, q.status), (1, 1), "{img}: {}", v.stderr);
        for (cmd, ok) in [
            ("read 0 1024", true),
            ("read 1024 512", false),
            ("read 1536 512", false),
            ("read 2048 1024", true),
        ] {
            let q = qemu_io_in(d, ["-f", "dmg", "-r", "-c", cmd, img]);
            let v = vmimg_in(d, ["io", "-f", "dmg", "-r", "-c", cmd, img]);
            let failed = |out: &str| out.contains("read failed");
            assert_eq!(failed(&q.stdout), !ok, "{img} {cmd}: qemu-io {}", q.stdout);
            assert_eq!(failed(&v.stdout), !ok, "{img} {cmd}: vmimg {}", v.stdout);
        }
    }
    // A chunk over QEMU's limit.
    let big = [Part {
        first: 0,
        chunks: vec![C::Raw(vec![1; 512 * 131_073])],
    }];
    write(d, "big.dmg", &big, false);
    let q = qemu_img_in(d, ["info", "big.dmg"]);
    let v = vmimg_in(d, ["info", "big.dmg"]);
    assert_eq!((v.status, q.status), (1, 1));
    let msg = "sector count 131073 for chunk 0 is larger than max (131072)";
    assert!(
        q.stderr.contains(msg) && v.stderr.contains(msg),
        "{}",
        v.stderr
    );
    // No trailer, an empty file.
    std::fs::write(d.join("none.dmg"), vec![1u8; 5000]).unwrap();
    std::fs::write(d.join("empty.dmg"), b"").unwrap();
    for (img, msg) in [
        ("none.dmg", "Could not locate UDIF trailer in dmg file"),
        ("empty.dmg", "dmg file must be at least 512 bytes long"),
    ] {
        let q = qemu_img_in(d, ["info", "-f", "dmg", img]);
        let v = vmimg_in(d, ["info", "-f", "dmg", img]);
        assert_eq!(
            (v.status, tail(&v.stderr)),
            (q.status, tail(&q.stderr)),
            "{img}"
        );
        assert_eq!(tail(&v.stderr), msg);
    }
    // Read only.
    let good = [Part {
        first: 0,
        chunks: vec![C::Raw(pattern(4, 10))],
    }];
    write(d, "ro.dmg", &good, false);
    let before = std::fs::read(d.join("ro.dmg")).unwrap();
    for args in [
        &["create", "-f", "dmg", "new.dmg", "1M"][..],
        &["convert", "-O", "dmg", "ro.dmg", "out.dmg"],
        &["check", "ro.dmg"],
        &["resize", "ro.dmg", "1M"],
    ] {
        let q = qemu_img_in(d, args);
        let v = vmimg_in(d, args);
        assert_eq!(v.status, q.status, "{args:?}: {}", v.stderr);
        assert_eq!(v.stdout, q.stdout, "{args:?}");
    }
    let q = qemu_io_in(d, ["-c", "write 0 512", "ro.dmg"]);
    let v = vmimg_in(d, ["io", "-c", "write 0 512", "ro.dmg"]);
    assert_eq!((v.status, q.status), (1, 1));
    assert!(std::fs::read(d.join("ro.dmg")).unwrap() == before);
    assert!(!d.join("out.dmg").exists() && !d.join("new.dmg").exists());
}
