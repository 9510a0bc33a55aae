//! A drop-in for qemu-img must not lose data where QEMU's tools protect the user: a convert
//! onto its own source, block devices, probing, block 0, full disks, signals.

mod common;

use common::*;
use std::path::Path;

/// A base image with data, an overlay over it, and an overlay over that.
fn chain(dir: &Path) {
    let p = |n: &str| dir.join(n);
    qemu_img(["create", "-q", "-f", "qcow2", s(&p("base.qcow2")), "8M"]).ok();
    qemu_io([
        "-f",
        "qcow2",
        "-c",
        "write -P 0x11 0 2M",
        s(&p("base.qcow2")),
    ])
    .ok();
    for (over, under) in [("mid.qcow2", "base.qcow2"), ("top.qcow2", "mid.qcow2")] {
        qemu_img_in(
            dir,
            [
                "create", "-q", "-f", "qcow2", "-b", under, "-F", "qcow2", over,
            ],
        )
        .ok();
    }
    qemu_io([
        "-f",
        "qcow2",
        "-c",
        "write -P 0x22 1M 1M",
        s(&p("top.qcow2")),
    ])
    .ok();
}

/// Every way a convert target can be a file the source reads is refused, with or without
/// `-U` and `-n`, and every file is left byte for byte as it was.
#[test]
fn convert_never_writes_onto_its_own_source_or_backing_chain() {
    let dir = tempdir();
    let d = dir.path();
    chain(d);
    std::fs::hard_link(d.join("base.qcow2"), d.join("base-link.qcow2")).unwrap();
    std::os::unix::fs::symlink(d.join("mid.qcow2"), d.join("mid-sym.qcow2")).unwrap();
    let files = ["base.qcow2", "mid.qcow2", "top.qcow2"];
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(d.join(f)).unwrap())
        .collect();
    let targets = [
        "top.qcow2",
        "./top.qcow2",
        "mid.qcow2",
        "mid-sym.qcow2",
        "base.qcow2",
        "base-link.qcow2",
    ];
    for target in targets {
        for extra in [&[][..], &["-U"], &["-n"], &["-U", "-n"]] {
            let mut args = vec!["convert", "-f", "qcow2", "-O", "qcow2"];
            args.extend(extra);
            args.extend(["top.qcow2", target]);
            let r = vmimg_in(d, &args);
            assert_eq!(r.status, 1, "{args:?} must fail: {r:?}");
            assert!(
                r.stderr.contains("lock") || r.stderr.contains("would destroy it"),
                "{args:?}: {}",
                r.stderr
            );
        }
    }
    // A raw source converted onto itself, too.
    let raw = d.join("disk.raw");
    std::fs::write(&raw, vec![0x5au8; 1 << 20]).unwrap();
    for extra in [&[][..], &["-U"], &["-n"]] {
        let mut args = vec!["convert", "-f", "raw", "-O", "raw"];
        args.extend(extra);
        args.extend([s(&raw), s(&raw)]);
        assert_eq!(vmimg(&args).status, 1, "{args:?}");
    }
    assert_eq!(std::fs::read(&raw).unwrap(), vec![0x5au8; 1 << 20]);
    for (f, old) in files.iter().zip(&before) {
        assert!(
            std::fs::read(d.join(f)).unwrap() == *old,
            "{f} changed on disk"
        );
    }
    // A real target next to them still works.
    vmimg_in(d, ["convert", "-O", "qcow2", "top.qcow2", "out.qcow2"]).ok();
    qemu_img_in(d, ["compare", "top.qcow2", "out.qcow2"]).ok();
}

/// `commit` writes into a base that the overlay's own chain holds: the base is opened once
/// (writable), not twice, so its locks do not refuse the commit; `-b` keeps the top.
#[test]
fn commit_into_a_locked_chain_works_and_b_implies_d() {
    let dir = tempdir();
    let d = dir.path();
    chain(d);
    let top_present = |d: &Path| {
        let map = qemu_img_in(d, ["map", "--output=json", "top.qcow2"]).ok();
        map.stdout.contains("\"depth\": 0, \"present\": true")
    };
    // -b naming the immediate backing file: committed, and (-b implies -d) the top keeps
    // its data.
    vmimg_in(d, ["commit", "-b", "mid.qcow2", "top.qcow2"]).ok();
    qemu_io_in(d, ["-f", "qcow2", "-c", "read -P 0x22 1M 1M", "mid.qcow2"]).ok();
    assert!(top_present(d), "commit -b emptied the top image");
    // Two layers down: the base gets the top's data through the middle layer.
    vmimg_in(d, ["commit", "-b", "base.qcow2", "top.qcow2"]).ok();
    qemu_img_in(d, ["check", "base.qcow2"]).ok();
    qemu_io_in(
        d,
        [
            "-f",
            "qcow2",
            "-c",
            "read -P 0x11 0 1M",
            "-c",
            "read -P 0x22 1M 1M",
            "base.qcow2",
        ],
    )
    .ok();
    assert!(top_present(d));
    // Without -b the top is emptied into its backing file.
    vmimg_in(d, ["commit", "top.qcow2"]).ok();
    assert!(!top_present(d), "commit without -d kept the top's data");
    qemu_io_in(d, ["-f", "qcow2", "-c", "read -P 0x22 1M 1M", "top.qcow2"]).ok();
}
