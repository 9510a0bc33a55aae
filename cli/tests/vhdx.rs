//! VHDX both ways with QEMU's tools: the layout qemu-img makes (but the random GUIDs,
//! sequence numbers and creator), images each tool writes read alike in the other, twin
//! workloads, refusals in qemu-img's words. Crash images with logs to replay, both ways,
//! are in `vmimg/tests/vhdx_crash.rs`.

mod common;

use common::*;
use std::path::Path;

/// A raw file with data, zero runs and holes over several blocks.
fn patterned_raw(path: &Path, size: u64) {
    let mut data = vec![0u8; size as usize];
    let mut rng = fastrand::Rng::with_seed(31);
    for (i, chunk) in data.chunks_mut(3 << 20).enumerate() {
        if i % 3 != 1 {
            let n = chunk.len().min(200_000);
            rng.fill(&mut chunk[..n]);
        }
    }
    std::fs::write(path, &data).unwrap();
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The parts of a VHDX file that must match qemu-img's: the region tables, the headers but
/// their checksum, sequence number and GUIDs, and everything from 1 MiB on but the page 83
/// identifier (random).
fn comparable(path: &Path) -> Vec<u8> {
    let b = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    out.extend(&b[192 << 10..320 << 10]);
    for h in [64usize << 10, 128 << 10] {
        out.extend(&b[h..h + 4]);
        out.extend(&b[h + 64..h + 4096]);
    }
    let mut rest = b[1 << 20..].to_vec();
    let meta = le64(&b, (192 << 10) + 16 + 32 + 16) as usize;
    let p83 = meta - (1 << 20) + 0x10010;
    rest[p83..p83 + 16].fill(0);
    out.extend(rest);
    out
}

/// `create` lays the file out as qemu-img does for every option set and size (but the
/// empty disk, where qemu-img's 32-bit arithmetic makes a 64 MiB BAT).
#[test]
fn create_matches_qemu_img_layout() {
    let dir = tempdir();
    let d = dir.path();
    let mut cases = 0;
    for size in ["1000", "64M", "1G", "10G", "101G", "33T"] {
        for opts in [
            "",
            "block_size=1M",
            "block_size=3000K",
            "log_size=1500K",
            "block_state_zero=off",
            "subformat=fixed",
            "subformat=fixed,block_state_zero=off",
        ] {
            // Fixed images are full-size files: small ones show the layout as well.
            if opts.contains("fixed") && (size.ends_with('G') || size.ends_with('T')) {
                continue;
            }
            let mut q = vec!["create", "-q", "-f", "vhdx"];
            if !opts.is_empty() {
                q.extend(["-o", opts]);
            }
            let mut v = q.clone();
            q.extend(["q.vhdx", size]);
            v.extend(["v.vhdx", size]);
            let qr = qemu_img_in(d, &q);
            let vr = vmimg_in(d, &v);
            assert_eq!(vr.status, qr.status, "{size} {opts}: {}", vr.stderr);
            if qr.status != 0 {
                continue;
            }
            assert!(
                comparable(&d.join("v.vhdx")) == comparable(&d.join("q.vhdx")),
                "{size} {opts}: layouts differ"
            );
            cases += 1;
        }
    }
    assert!(cases >= 28, "{cases}");
}

/// Option errors in qemu-img's words, and nothing left behind.
#[test]
fn create_refusals_match_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    for (opts, size) in [
        ("block_size=3M", "1G"),
        ("log_size=0", "1G"),
        ("log_size=5G", "1G"),
        ("subformat=foo", "1G"),
        ("", "65T"),
    ] {
        let mut args = vec!["create", "-q", "-f", "vhdx"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend(["e.vhdx", size]);
        let q = qemu_img_in(d, &args).expect_status(1);
        // (qemu-img leaves an empty file for some of these.)
        let _ = std::fs::remove_file(d.join("e.vhdx"));
        let v = vmimg_in(d, &args).expect_status(1);
        let words = |s: &str| {
            s.lines()
                .next()
                .unwrap_or("")
                .split_once(": ")
                .map(|(_, w)| w.to_owned())
        };
        assert_eq!(words(&v.stderr), words(&q.stderr), "{opts} {size}");
        assert!(!d.join("e.vhdx").exists(), "{opts}: vmimg left a file");
    }
}

/// Each tool's conversion, in every subformat, reads in the other as the source, with the
/// same virtual size; qemu-img checks vmimg's clean.
#[test]
fn convert_both_ways() {
    let dir = tempdir();
    let d = dir.path();
    patterned_raw(&d.join("src.raw"), 20 << 20);
    for opts in [
        "subformat=dynamic",
        "subformat=fixed",
        "block_state_zero=off",
        "subformat=fixed,block_state_zero=off",
        "block_size=1M",
    ] {
        let conv = ["convert", "-f", "raw", "-O", "vhdx", "-o", opts, "src.raw"];
        let (mut q, mut v) = (conv.to_vec(), conv.to_vec());
        q.push("q.vhdx");
        v.push("v.vhdx");
        qemu_img_in(d, &q).ok();
        vmimg_in(d, &v).ok();
        for img in ["q.vhdx", "v.vhdx"] {
            qemu_img_in(d, ["compare", "-f", "vhdx", "-F", "raw", img, "src.raw"]).ok();
            vmimg_in(d, ["compare", "-f", "vhdx", "-F", "raw", img, "src.raw"]).ok();
            let c = qemu_img_in(d, ["check", img]).ok();
            assert_eq!(
                c.stdout, "No errors were found on the image.\n",
                "{opts} {img}"
            );
            let size = |out: &str| {
                let j: serde_json::Value = serde_json::from_str(out).unwrap();
                (j["virtual-size"].clone(), j["cluster-size"].clone())
            };
            let qi = qemu_img_in(d, ["info", "--output=json", img]).ok();
            let vi = vmimg_in(d, ["info", "--output=json", img]).ok();
            assert_eq!(size(&vi.stdout), size(&qi.stdout), "{opts} {img}");
        }
        qemu_img_in(d, ["convert", "-O", "raw", "q.vhdx", "by-qemu.raw"]).ok();
        vmimg_in(d, ["convert", "-O", "raw", "q.vhdx", "by-vmimg.raw"]).ok();
        compare_files(&d.join("by-vmimg.raw"), &d.join("by-qemu.raw")).unwrap();
    }
}

/// The same random qemu-io workload on images made by each tool, run by each: the same
/// outputs, the same content, clean checks.
#[test]
fn twin_workloads_match_qemu_io() {
    let dir = tempdir();
    let d = dir.path();
    for (i, opts) in [
        "block_size=1M",
        "subformat=fixed,block_size=1M",
        "block_state_zero=off,block_size=2M",
    ]
    .into_iter()
    .enumerate()
    {
        qemu_img_in(
            d,
            ["create", "-q", "-f", "vhdx", "-o", opts, "q.vhdx", "24M"],
        )
        .ok();
        vmimg_in(
            d,
            ["create", "-q", "-f", "vhdx", "-o", opts, "v.vhdx", "24M"],
        )
        .ok();
        let mut rng = fastrand::Rng::with_seed(90 + i as u64);
        let mut q = vec!["-f".to_string(), "vhdx".into()];
        let mut v = vec!["io".to_string(), "-f".into(), "vhdx".into()];
        for _ in 0..60 {
            let c = random_command(&mut rng, 24 << 20);
            q.extend(["-c".into(), c.clone()]);
            v.extend(["-c".into(), c]);
        }
        q.push("q.vhdx".into());
        v.push("v.vhdx".into());
        let qo = qemu_io_in(d, &q).ok();
        let vo = vmimg_in(d, &v).ok();
        assert_eq!(
            io_data_lines(&vo.stdout),
            io_data_lines(&qo.stdout),
            "{opts}"
        );
        qemu_img_in(
            d,
            ["compare", "-f", "vhdx", "-F", "vhdx", "q.vhdx", "v.vhdx"],
        )
        .ok();
        for img in ["q.vhdx", "v.vhdx"] {
            qemu_img_in(d, ["check", img]).ok();
        }
        // Each tool goes on writing the other's image.
        qemu_io_in(d, ["-f", "vhdx", "-c", "write -P 0x71 5M 3M", "v.vhdx"]).ok();
        vmimg_in(
            d,
            ["io", "-f", "vhdx", "-c", "write -P 0x71 5M 3M", "q.vhdx"],
        )
        .ok();
        qemu_img_in(d, ["compare", "q.vhdx", "v.vhdx"]).ok();
        vmimg_in(d, ["compare", "q.vhdx", "v.vhdx"]).ok();
    }
}

/// What VHDX cannot do, refused in qemu-img's words.
#[test]
fn resize_amend_and_measure_are_refused_like_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "vhdx", "a.vhdx", "16M"]).ok();
    let cases: [&[&str]; 3] = [
        &["resize", "a.vhdx", "32M"],
        &[
            "amend",
            "-f",
            "vhdx",
            "-o",
            "block_state_zero=off",
            "a.vhdx",
        ],
        &["measure", "-O", "vhdx", "--size", "1G"],
    ];
    for args in cases {
        let q = qemu_img_in(d, args).expect_status(1);
        let v = vmimg_in(d, args).expect_status(1);
        let tail = |s: &str| s.trim_end().rsplit(": ").next().unwrap().to_string();
        assert_eq!(tail(&v.stderr), tail(&q.stderr), "{args:?}");
    }
}
