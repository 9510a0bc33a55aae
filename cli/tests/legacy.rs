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
