//! VDI both ways with QEMU's tools: the files qemu-img makes (but the UUIDs), images each
//! tool writes read alike in the other, the same maps, info and check reports.

mod common;

use common::*;
use std::path::Path;

/// A raw file with data, zero runs and holes over several 1 MiB blocks.
fn patterned_raw(path: &Path, size: u64) {
    let mut data = vec![0u8; size as usize];
    let mut rng = fastrand::Rng::with_seed(21);
    for (i, chunk) in data.chunks_mut(700 << 10).enumerate() {
        if i % 3 != 1 {
            let n = chunk.len().min(100_000);
            rng.fill(&mut chunk[..n]);
        }
    }
    std::fs::write(path, &data).unwrap();
}

/// The file without its two random UUIDs (bytes 0x188..0x1a8).
fn without_uuids(path: &Path) -> Vec<u8> {
    let mut b = std::fs::read(path).unwrap();
    b[0x188..0x1a8].fill(0);
    b
}

/// `create` makes qemu-img's file, byte for byte but the UUIDs.
#[test]
fn create_matches_qemu_img_but_the_uuids() {
    let dir = tempdir();
    let d = dir.path();
    let mut cases = 0;
    for size in ["0", "1000", "1M", "10M", "3G", "100G"] {
        for opts in ["static=off", "static=on"] {
            if opts == "static=on" && size.ends_with('G') {
                continue; // full-size files; the layout is the same
            }
            qemu_img_in(d, ["create", "-q", "-f", "vdi", "-o", opts, "q.vdi", size]).ok();
            vmimg_in(d, ["create", "-q", "-f", "vdi", "-o", opts, "v.vdi", size]).ok();
            assert!(
                without_uuids(&d.join("v.vdi")) == without_uuids(&d.join("q.vdi")),
                "{size} {opts}"
            );
            cases += 1;
        }
    }
    assert_eq!(cases, 10);
    // Too large: qemu-img's words, no file.
    let q = qemu_img_in(d, ["create", "-f", "vdi", "big1.vdi", "1P"]).expect_status(1);
    let v = vmimg_in(d, ["create", "-f", "vdi", "big2.vdi", "1P"]).expect_status(1);
    let tail = |s: &str| s.trim_end().rsplit(": ").next().unwrap().to_string();
    assert_eq!(tail(&v.stderr), tail(&q.stderr));
    assert!(!d.join("big2.vdi").exists());
}

/// Each tool's conversion reads in the other as the source; maps and info agree.
#[test]
fn convert_both_ways() {
    let dir = tempdir();
    let d = dir.path();
    patterned_raw(&d.join("src.raw"), 9 << 20);
    for opts in ["static=off", "static=on"] {
        let conv = ["convert", "-f", "raw", "-O", "vdi", "-o", opts, "src.raw"];
        let (mut q, mut v) = (conv.to_vec(), conv.to_vec());
        q.push("q.vdi");
        v.push("v.vdi");
        qemu_img_in(d, &q).ok();
        vmimg_in(d, &v).ok();
        if opts == "static=off" {
            // The same blocks in the same order.
            assert!(without_uuids(&d.join("v.vdi")) == without_uuids(&d.join("q.vdi")));
        }
        for img in ["q.vdi", "v.vdi"] {
            qemu_img_in(d, ["compare", "-f", "vdi", "-F", "raw", img, "src.raw"]).ok();
            vmimg_in(d, ["compare", "-f", "vdi", "-F", "raw", img, "src.raw"]).ok();
            let qm = qemu_img_in(d, ["map", "--output=json", "-f", "vdi", img]).ok();
            let vm = vmimg_in(d, ["map", "--output=json", "-f", "vdi", img]).ok();
            assert_eq!(vm.stdout, qm.stdout, "{opts} {img}");
            let strip = |s: &str| {
                let mut j: serde_json::Value = serde_json::from_str(s).unwrap();
                j["actual-size"] = 0.into();
                j["children"][0]["info"]["actual-size"] = 0.into();
                j
            };
            let qi = qemu_img_in(d, ["info", "--output=json", img]).ok();
            let vi = vmimg_in(d, ["info", "--output=json", img]).ok();
            assert_eq!(strip(&vi.stdout), strip(&qi.stdout), "{opts} {img}");
            let c = qemu_img_in(d, ["check", img]).ok();
            assert_eq!(c.stdout, "No errors were found on the image.\n");
        }
    }
}

/// The same random qemu-io workload on a dynamic and a static image made by each tool:
/// the same outputs, the same content, clean checks.
#[test]
fn twin_workloads_match_qemu_io() {
    let dir = tempdir();
    let d = dir.path();
    for (i, opts) in ["static=off", "static=on"].into_iter().enumerate() {
        qemu_img_in(d, ["create", "-q", "-f", "vdi", "-o", opts, "q.vdi", "24M"]).ok();
        vmimg_in(d, ["create", "-q", "-f", "vdi", "-o", opts, "v.vdi", "24M"]).ok();
        let mut rng = fastrand::Rng::with_seed(70 + i as u64);
        let mut q = vec!["-f".to_string(), "vdi".into()];
        let mut v = vec!["io".to_string(), "-f".into(), "vdi".into()];
        for _ in 0..60 {
            let c = random_command(&mut rng, 24 << 20);
            q.extend(["-c".into(), c.clone()]);
            v.extend(["-c".into(), c]);
        }
        q.push("q.vdi".into());
        v.push("v.vdi".into());
        let qo = qemu_io_in(d, &q).ok();
        let vo = vmimg_in(d, &v).ok();
        assert_eq!(
            io_data_lines(&vo.stdout),
            io_data_lines(&qo.stdout),
            "{opts}"
        );
        qemu_img_in(d, ["compare", "-f", "vdi", "-F", "vdi", "q.vdi", "v.vdi"]).ok();
        for img in ["q.vdi", "v.vdi"] {
            qemu_img_in(d, ["check", img]).ok();
        }
        qemu_img_in(d, ["convert", "-O", "raw", "q.vdi", "by-qemu.raw"]).ok();
        vmimg_in(d, ["convert", "-O", "raw", "q.vdi", "by-vmimg.raw"]).ok();
        compare_files(&d.join("by-vmimg.raw"), &d.join("by-qemu.raw")).unwrap();
    }
}

/// check reports what qemu-img check reports on damaged block maps, in its words and exit
/// status; repairs and resize are refused as qemu-img refuses them.
#[test]
fn check_and_refusals_match_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "vdi", "a.vdi", "10M"]).ok();
    qemu_io_in(
        d,
        [
            "-f",
            "vdi",
            "-c",
            "write -P 1 1M 4k",
            "-c",
            "write 0 512",
            "a.vdi",
        ],
    )
    .ok();
    let good = std::fs::read(d.join("a.vdi")).unwrap();
    let damage: [(usize, u32); 3] = [(0x200 + 8, 0), (0x200 + 8, 7), (0x184, 3)];
    for (at, value) in damage {
        let mut b = good.clone();
        b[at..at + 4].copy_from_slice(&value.to_le_bytes());
        std::fs::write(d.join("bad.vdi"), &b).unwrap();
        for out in ["human", "json"] {
            let f = format!("--output={out}");
            let q = qemu_img_in(d, ["check", &f, "bad.vdi"]);
            let v = vmimg_in(d, ["check", &f, "bad.vdi"]);
            assert_eq!(v.status, q.status, "{at:#x}={value}");
            assert_eq!(v.stdout, q.stdout, "{at:#x}={value}");
            assert_eq!(v.stderr, q.stderr, "{at:#x}={value}");
        }
    }
    for args in [
        &["check", "-r", "all", "a.vdi"][..],
        &["resize", "a.vdi", "20M"],
        &["amend", "-f", "vdi", "-o", "static=on", "a.vdi"],
    ] {
        let q = qemu_img_in(d, args);
        let v = vmimg_in(d, args);
        assert_eq!(v.status, q.status, "{args:?}");
        let tail = |s: &str| s.trim_end().rsplit(": ").next().unwrap_or("").to_string();
        assert_eq!(tail(&v.stderr), tail(&q.stderr), "{args:?}");
    }
}
