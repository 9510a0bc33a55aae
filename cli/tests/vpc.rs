//! VHD (`vpc`) both ways with QEMU's tools: images qemu-img makes read here as qemu-img
//! reads them, images vmimg makes read in QEMU as vmimg meant them, the same sizes and
//! layouts, and differencing disks (which QEMU cannot open as such).

mod common;

use common::*;
use std::path::Path;

/// A raw file with data, zeros and holes in several 2 MiB blocks.
fn patterned_raw(path: &Path, size: u64) {
    let mut data = vec![0u8; size as usize];
    let mut rng = fastrand::Rng::with_seed(7);
    for (i, chunk) in data.chunks_mut(300 << 10).enumerate() {
        if i % 3 != 1 {
            let n = chunk.len().min(70_000);
            rng.fill(&mut chunk[..n]);
        }
    }
    std::fs::write(path, &data).unwrap();
}

/// Footer fields that must agree (all but the UUID, time stamp and checksum).
fn footer_fields(path: &Path, fixed: bool) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let f = if fixed {
        &bytes[bytes.len() - 512..]
    } else {
        &bytes[..512]
    };
    let mut v = f[..24].to_vec();
    v.extend_from_slice(&f[28..64]);
    v
}

/// `create` makes the file qemu-img makes: the same length, footer fields, header, BAT.
#[test]
fn create_matches_qemu_img_byte_for_byte_but_uuid_and_time() {
    let dir = tempdir();
    let d = dir.path();
    let sizes = [
        "0", "1", "64k", "1M", "10M", "100M", "1G", "20G", "127G", "128G",
    ];
    for size in sizes {
        for opts in [
            "",
            "subformat=fixed",
            "force_size=on",
            "subformat=fixed,force_size=on",
        ] {
            // Large fixed images are slow to make; a 0-byte fixed one QEMU cannot reopen.
            if opts.contains("fixed") && (size.ends_with('G') && size != "1G" || size == "0") {
                continue;
            }
            let mut q = vec!["create", "-q", "-f", "vpc"];
            let mut v = q.clone();
            if !opts.is_empty() {
                q.extend(["-o", opts]);
                v.extend(["-o", opts]);
            }
            q.extend(["q.vhd", size]);
            v.extend(["v.vhd", size]);
            qemu_img_in(d, &q).ok();
            vmimg_in(d, &v).ok();
            let fixed = opts.contains("fixed");
            let (qb, vb) = (
                std::fs::metadata(d.join("q.vhd")).unwrap().len(),
                std::fs::metadata(d.join("v.vhd")).unwrap().len(),
            );
            assert_eq!(vb, qb, "{size} {opts}: file length");
            assert_eq!(
                footer_fields(&d.join("v.vhd"), fixed),
                footer_fields(&d.join("q.vhd"), fixed),
                "{size} {opts}: footer"
            );
            if !fixed {
                let (qa, va) = (
                    std::fs::read(d.join("q.vhd")).unwrap(),
                    std::fs::read(d.join("v.vhd")).unwrap(),
                );
                let n = qa.len() - 512;
                assert!(qa[512..n] == va[512..n], "{size} {opts}: header+BAT");
            }
            let qi = qemu_img_in(d, ["info", "-f", "vpc", "--output=json", "v.vhd"]).ok();
            let vi = vmimg_in(d, ["info", "-f", "vpc", "--output=json", "q.vhd"]).ok();
            let size_of = |s: &str| {
                let v: serde_json::Value = serde_json::from_str(s).unwrap();
                v["virtual-size"].as_u64().unwrap()
            };
            assert_eq!(size_of(&qi.stdout), size_of(&vi.stdout), "{size} {opts}");
        }
    }
}

/// Images qemu-img writes (dynamic, fixed, force_size) read here exactly as qemu-img reads
/// them, and qemu-img reads what vmimg writes in each subformat as the source.
#[test]
fn convert_both_ways_with_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    let src = d.join("src.raw");
    patterned_raw(&src, 9 << 20);
    for opts in [
        "subformat=dynamic",
        "subformat=fixed",
        "subformat=fixed,force_size=on",
        "force_size=on",
    ] {
        let fixed = opts.contains("fixed");
        qemu_img_in(
            d,
            [
                "convert", "-f", "raw", "-O", "vpc", "-o", opts, "src.raw", "q.vhd",
            ],
        )
        .ok();
        vmimg_in(
            d,
            [
                "convert", "-f", "raw", "-O", "vpc", "-o", opts, "src.raw", "v.vhd",
            ],
        )
        .ok();
        // vmimg reads qemu-img's image as qemu-img does.
        qemu_img_in(
            d,
            [
                "convert",
                "-f",
                "vpc",
                "-O",
                "raw",
                "q.vhd",
                "q-by-qemu.raw",
            ],
        )
        .ok();
        vmimg_in(
            d,
            [
                "convert",
                "-f",
                "vpc",
                "-O",
                "raw",
                "q.vhd",
                "q-by-vmimg.raw",
            ],
        )
        .ok();
        compare_files(&d.join("q-by-vmimg.raw"), &d.join("q-by-qemu.raw"))
            .unwrap_or_else(|e| panic!("{opts}: {e}"));
        // qemu-img reads vmimg's image as the source (and its twin).
        qemu_img_in(d, ["compare", "-f", "raw", "-F", "vpc", "src.raw", "v.vhd"]).ok();
        qemu_img_in(d, ["compare", "-f", "vpc", "-F", "vpc", "q.vhd", "v.vhd"]).ok();
        let qi = qemu_img_in(d, ["info", "-f", "vpc", "--output=json", "v.vhd"]).ok();
        let ti = qemu_img_in(d, ["info", "-f", "vpc", "--output=json", "q.vhd"]).ok();
        let size =
            |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()["virtual-size"].clone();
        assert_eq!(size(&qi.stdout), size(&ti.stdout), "{opts}");
        if !fixed {
            // The same blocks allocated, in the same order.
            let map = |f: &str| {
                qemu_img_in(d, ["map", "-f", "vpc", "--output=json", f])
                    .ok()
                    .stdout
            };
            assert_eq!(map("v.vhd"), map("q.vhd"), "{opts}");
        }
    }
}

/// The same random qemu-io workload on a dynamic VHD made by each tool, run by each tool:
/// the same outputs and the same content.
#[test]
fn twin_workloads_match_qemu_io() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "vpc", "q.vhd", "32M"]).ok();
    vmimg_in(d, ["create", "-q", "-f", "vpc", "v.vhd", "32M"]).ok();
    let mut rng = fastrand::Rng::with_seed(12);
    let size = 32 << 20;
    let mut cmds = Vec::new();
    for _ in 0..60 {
        let c = random_command(&mut rng, size);
        // vpc has no discard (QEMU keeps the data); write -z -u zeroes as -z.
        cmds.push(c.replace("write -z -u", "write -z"));
    }
    let mut q = vec!["-f".to_string(), "vpc".into()];
    let mut v = vec!["io".to_string(), "-f".into(), "vpc".into()];
    for c in &cmds {
        q.extend(["-c".into(), c.clone()]);
        v.extend(["-c".into(), c.clone()]);
    }
    q.push("q.vhd".into());
    v.push("v.vhd".into());
    let qo = qemu_io_in(d, &q).ok();
    let vo = vmimg_in(d, &v).ok();
    assert_eq!(io_data_lines(&vo.stdout), io_data_lines(&qo.stdout));
    qemu_img_in(d, ["compare", "-f", "vpc", "-F", "vpc", "q.vhd", "v.vhd"]).ok();
}

/// Differencing disks: made with -b, they read through their parent (found by its locator,
/// checked by UUID); a parent that is not the one recorded is refused; QEMU (which opens
/// them as plain dynamic disks) reads the child's own sectors.
#[test]
fn differencing_disks_read_through_their_parent() {
    let dir = tempdir();
    let d = dir.path();
    vmimg_in(d, ["create", "-q", "-f", "vpc", "base.vhd", "16M"]).ok();
    vmimg_in(
        d,
        ["io", "-f", "vpc", "-c", "write -P 0x11 0 8M", "base.vhd"],
    )
    .ok();
    vmimg_in(
        d,
        [
            "create",
            "-q",
            "-f",
            "vpc",
            "-b",
            "base.vhd",
            "-F",
            "vpc",
            "child.vhd",
        ],
    )
    .ok();
    vmimg_in(
        d,
        [
            "io",
            "-f",
            "vpc",
            "-c",
            "write -P 0x22 1M 4k",
            "-c",
            "write -P 0x33 10M 1k",
            "child.vhd",
        ],
    )
    .ok();
    let r = vmimg_in(
        d,
        [
            "io",
            "-f",
            "vpc",
            "-c",
            "read -P 0x11 0 1M",
            "-c",
            "read -P 0x22 1M 4k",
            "-c",
            "read -P 0x11 1052672 1M",
            "-c",
            "read -P 0x33 10M 1k",
            "-c",
            "read -P 0 11M 1M",
            "child.vhd",
        ],
    )
    .ok();
    assert!(!r.stdout.contains("verification failed"), "{}", r.stdout);
    let info = vmimg_in(d, ["info", "child.vhd"]).ok();
    assert!(
        info.stdout.contains("backing file: base.vhd"),
        "{}",
        info.stdout
    );
    // The parent is the base's bytes under the child's: compare with a raw of the same.
    vmimg_in(d, ["convert", "-O", "raw", "child.vhd", "child.raw"]).ok();
    qemu_io_in(
        d,
        [
            "-f",
            "raw",
            "-c",
            "read -P 0x11 0 1M",
            "-c",
            "read -P 0x22 1M 4k",
            "child.raw",
        ],
    )
    .ok();
    // QEMU opens it as a plain dynamic disk: the child's own sectors are there.
    qemu_io_in(d, ["-f", "vpc", "-c", "read -P 0x22 1M 4k", "child.vhd"]).ok();
    // Another VHD in the parent's place is refused.
    std::fs::rename(d.join("base.vhd"), d.join("base-old.vhd")).unwrap();
    vmimg_in(d, ["create", "-q", "-f", "vpc", "base.vhd", "16M"]).ok();
    let r = vmimg_in(d, ["io", "-f", "vpc", "-c", "read 0 512", "child.vhd"]);
    assert_eq!(r.status, 1, "{r:?}");
    assert!(r.stderr.contains("not the parent"), "{}", r.stderr);
}

/// The conversion Azure asks for: a fixed VHD whose size is the raw image's exact size (a
/// whole number of MiB), as `qemu-img convert -o subformat=fixed,force_size` makes it.
#[test]
fn azure_fixed_vhd_keeps_the_exact_size() {
    let dir = tempdir();
    let d = dir.path();
    let src = d.join("disk.raw");
    patterned_raw(&src, 30 << 20);
    let args = [
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed,force_size",
        "disk.raw",
        "disk.vhd",
    ];
    vmimg_in(d, args).ok();
    let len = std::fs::metadata(d.join("disk.vhd")).unwrap().len();
    assert_eq!(len, (30 << 20) + 512);
    let bytes = std::fs::read(d.join("disk.vhd")).unwrap();
    let footer = &bytes[bytes.len() - 512..];
    assert_eq!(&footer[..8], b"conectix");
    assert_eq!(&footer[60..64], &[0, 0, 0, 2], "fixed");
    assert_eq!(
        u64::from_be_bytes(footer[48..56].try_into().unwrap()),
        30 << 20
    );
    let info = qemu_img_in(d, ["info", "-f", "vpc", "--output=json", "disk.vhd"]).ok();
    assert!(
        info.stdout.contains("\"virtual-size\": 31457280"),
        "{}",
        info.stdout
    );
    qemu_img_in(
        d,
        ["compare", "-f", "raw", "-F", "vpc", "disk.raw", "disk.vhd"],
    )
    .ok();
}

/// What qemu-img refuses for vpc, vmimg refuses with its words.
#[test]
fn resize_and_check_are_refused_like_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "vpc", "a.vhd", "16M"]).ok();
    let q = qemu_img_in(d, ["resize", "-f", "vpc", "a.vhd", "32M"]);
    let v = vmimg_in(d, ["resize", "-f", "vpc", "a.vhd", "32M"]);
    assert_eq!((q.status, v.status), (1, 1));
    assert!(
        v.stderr
            .contains("Image format driver does not support resize"),
        "{}",
        v.stderr
    );
    let q = qemu_img_in(d, ["check", "-f", "vpc", "a.vhd"]);
    let v = vmimg_in(d, ["check", "-f", "vpc", "a.vhd"]);
    assert_eq!((q.status, v.status), (63, 63));
}
