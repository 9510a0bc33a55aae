//! Parallels both ways with QEMU's tools: the files qemu-img makes byte for byte, the same
//! files after the same writes and conversions (the old "WithoutFreeSpace" layout too), the
//! same maps, info and check reports, and `inuse` kept so that QEMU repairs what a crash
//! leaves.

mod common;

use common::*;
use std::path::Path;

fn same_file(d: &Path, a: &str, b: &str, what: &str) {
    compare_files(&d.join(a), &d.join(b)).unwrap_or_else(|e| panic!("{what}: {e}"));
}

fn tail(s: &str) -> String {
    s.trim_end().rsplit(": ").next().unwrap_or("").to_string()
}

fn patterned_raw(path: &Path, size: u64) {
    let mut data = vec![0u8; size as usize];
    let mut rng = fastrand::Rng::with_seed(47);
    for (i, chunk) in data.chunks_mut(300 << 10).enumerate() {
        if i % 3 != 1 {
            let n = chunk.len().min(70_000);
            rng.fill(&mut chunk[..n]);
        }
    }
    std::fs::write(path, &data).unwrap();
}

/// An old-layout image ("WithoutFreeSpace": BAT entries in sectors, 63-sector clusters,
/// the data right after the BAT) of `clusters` clusters, with the clusters listed in
/// `data` stored in that order, each filled with its index + 1.
fn old_layout(path: &Path, clusters: u32, data: &[u32]) {
    let tracks = 63u32;
    let cs = tracks as usize * 512;
    let bat_end = 64 + 4 * clusters as usize;
    let data_off = bat_end.div_ceil(512);
    let mut f = vec![0u8; data_off * 512];
    f[..16].copy_from_slice(b"WithoutFreeSpace");
    let put = |f: &mut [u8], at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put(&mut f, 16, 2);
    put(&mut f, 20, 16);
    put(&mut f, 28, tracks);
    put(&mut f, 32, clusters);
    put(&mut f, 36, clusters * tracks);
    put(&mut f, 48, 0); // the data starts after the BAT
    for (n, &c) in data.iter().enumerate() {
        let sector = (data_off + n * tracks as usize) as u32;
        put(&mut f, 64 + 4 * c as usize, sector);
        f.resize(f.len() + cs, c as u8 + 1);
    }
    std::fs::write(path, f).unwrap();
}

/// `create` makes qemu-img's file byte for byte; refusals in qemu-img's words.
#[test]
fn create_matches_qemu_img_byte_for_byte() {
    let dir = tempdir();
    let d = dir.path();
    let mut cases = 0;
    for size in ["0", "1", "1000", "10M", "3G", "1T"] {
        for opts in [
            "",
            "cluster_size=65536",
            "cluster_size=4096",
            "cluster_size=1000",
        ] {
            if size == "1T" && !opts.is_empty() {
                continue; // catalogs of 64 MiB and more; the same layout
            }
            let mut args = vec!["create", "-f", "parallels"];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            let (mut q, mut v) = (args.clone(), args.clone());
            q.extend(["q.par", size]);
            v.extend(["v.par", size]);
            let qo = qemu_img_in(d, &q).ok();
            let vo = vmimg_in(d, &v).ok();
            assert_eq!(
                vo.stdout.replace("v.par", "q.par"),
                qo.stdout,
                "{size} {opts}"
            );
            same_file(d, "v.par", "q.par", &format!("{size} {opts}"));
            cases += 1;
        }
    }
    assert_eq!(cases, 21);
    for args in [
        &[
            "create",
            "-f",
            "parallels",
            "-o",
            "cluster_size=2G",
            "x.par",
            "1M",
        ][..],
        &[
            "create",
            "-f",
            "parallels",
            "-o",
            "cluster_size=0",
            "x.par",
            "1M",
        ],
        &["create", "-f", "parallels", "x.par", "5P"],
        &[
            "create",
            "-f",
            "parallels",
            "-b",
            "a.raw",
            "-F",
            "raw",
            "x.par",
            "1M",
        ],
    ] {
        let q = qemu_img_in(d, args);
        let v = vmimg_in(d, args);
        assert_eq!(
            (v.status, tail(&v.stderr)),
            (q.status, tail(&q.stderr)),
            "{args:?}"
        );
        let _ = std::fs::remove_file(d.join("x.par"));
    }
    // Deliberately refused: catalogs QEMU writes but cannot open.
    let v = vmimg_in(
        d,
        [
            "create",
            "-f",
            "parallels",
            "-o",
            "cluster_size=512",
            "y.par",
            "1T",
        ],
    );
    assert_eq!(v.status, 1);
    assert!(!d.join("y.par").exists());
    let info = |tool: &str| {
        let args = ["info", "--output=json", "q.par"];
        let out = if tool == "q" {
            qemu_img_in(d, args).ok()
        } else {
            vmimg_in(d, args).ok()
        };
        let mut v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v.as_object_mut().unwrap().remove("children");
        v.as_object_mut().unwrap().remove("actual-size");
        v
    };
    assert_eq!(info("v"), info("q"));
    let qi = qemu_img_in(d, ["info", "q.par"]).ok();
    let vi = vmimg_in(d, ["info", "q.par"]).ok();
    assert_eq!(vi.stdout, qi.stdout);
}

/// Each tool's conversion is the other's, byte for byte; both read back as the source.
#[test]
fn convert_both_ways_byte_for_byte() {
    let dir = tempdir();
    let d = dir.path();
    patterned_raw(&d.join("src.raw"), 7 << 20);
    for opts in ["cluster_size=1M", "cluster_size=65536", "cluster_size=4096"] {
        let conv = [
            "convert",
            "-f",
            "raw",
            "-O",
            "parallels",
            "-o",
            opts,
            "src.raw",
        ];
        let (mut q, mut v) = (conv.to_vec(), conv.to_vec());
        q.push("q.par");
        v.push("v.par");
        qemu_img_in(d, &q).ok();
        vmimg_in(d, &v).ok();
        same_file(d, "v.par", "q.par", opts);
        for out in ["--output=json", "--output=human"] {
            let qm = qemu_img_in(d, ["map", out, "-f", "parallels", "q.par"]).ok();
            let vm = vmimg_in(d, ["map", out, "-f", "parallels", "q.par"]).ok();
            assert_eq!(vm.stdout, qm.stdout, "{opts}");
        }
        vmimg_in(d, ["convert", "-O", "raw", "q.par", "back.raw"]).ok();
        same_file(d, "back.raw", "src.raw", opts);
        let qc = qemu_img_in(d, ["check", "--output=json", "v.par"]).ok();
        let vc = vmimg_in(d, ["check", "--output=json", "v.par"]).ok();
        assert_eq!(vc.stdout, qc.stdout, "{opts}");
    }
}

/// The same random qemu-io workload through each tool leaves the same file, byte for byte
/// (clusters released by zero writes reused in the same order).
#[test]
fn twin_workloads_leave_identical_files() {
    let dir = tempdir();
    let d = dir.path();
    for (i, opts) in ["cluster_size=65536", "cluster_size=4096"]
        .into_iter()
        .enumerate()
    {
        qemu_img_in(
            d,
            [
                "create",
                "-q",
                "-f",
                "parallels",
                "-o",
                opts,
                "q.par",
                "24M",
            ],
        )
        .ok();
        vmimg_in(
            d,
            [
                "create",
                "-q",
                "-f",
                "parallels",
                "-o",
                opts,
                "v.par",
                "24M",
            ],
        )
        .ok();
        let mut rng = fastrand::Rng::with_seed(30 + i as u64);
        let mut q = vec!["-f".to_string(), "parallels".into()];
        let mut v = vec!["io".to_string(), "-f".into(), "parallels".into()];
        for _ in 0..80 {
            let mut c = random_command(&mut rng, 24 << 20);
            if rng.u8(0..4) == 0 {
                // Whole clusters now and then: those are released.
                let n = rng.u64(1..20) * 65536;
                let off = rng.u64(0..(24 << 20) / 65536 - 20) * 65536;
                c = format!("write -z {off} {n}");
            }
            q.extend(["-c".into(), c.clone()]);
            v.extend(["-c".into(), c]);
        }
        q.push("q.par".into());
        v.push("v.par".into());
        let qo = qemu_io_in(d, &q).ok();
        let vo = vmimg_in(d, &v).ok();
        assert_eq!(
            io_data_lines(&vo.stdout),
            io_data_lines(&qo.stdout),
            "{opts}"
        );
        same_file(d, "v.par", "q.par", opts);
        for img in ["q.par", "v.par"] {
            let qc = qemu_img_in(d, ["check", img]);
            let vc = vmimg_in(d, ["check", img]);
            assert_eq!((vc.status, &vc.stdout), (qc.status, &qc.stdout), "{opts}");
        }
    }
}

/// The old layout ("WithoutFreeSpace", BAT in sectors, clusters of 63 sectors, data right
/// after the BAT) reads as qemu-img reads it, and takes the same writes.
#[test]
fn old_layout_reads_and_writes_as_qemu() {
    let dir = tempdir();
    let d = dir.path();
    old_layout(&d.join("q.par"), 40, &[3, 0, 17, 39]);
    std::fs::copy(d.join("q.par"), d.join("v.par")).unwrap();
    qemu_img_in(
        d,
        ["convert", "-f", "parallels", "-O", "raw", "q.par", "q.raw"],
    )
    .ok();
    vmimg_in(d, ["convert", "-O", "raw", "v.par", "v.raw"]).ok();
    same_file(d, "v.raw", "q.raw", "old layout read");
    qemu_io_in(
        d,
        [
            "-f",
            "raw",
            "-c",
            &format!("read -P 18 {} 32256", 17 * 32256),
            "v.raw",
        ],
    )
    .ok();
    let qm = qemu_img_in(d, ["map", "--output=json", "q.par"]).ok();
    let vm = vmimg_in(d, ["map", "--output=json", "q.par"]).ok();
    assert_eq!(vm.stdout, qm.stdout);
    let cmds = [
        "-c",
        "write -P 0x44 100000 70000",
        "-c",
        "write -P 0x55 0 512",
        "-c",
        "write -z 1000000 5000",
    ];
    let mut q = vec!["-f", "parallels"];
    q.extend(cmds);
    q.push("q.par");
    let mut v = vec!["io", "-f", "parallels"];
    v.extend(cmds);
    v.push("v.par");
    qemu_io_in(d, &q).ok();
    vmimg_in(d, &v).ok();
    same_file(d, "v.par", "q.par", "old layout written");
}

/// check on damaged images: qemu-img's messages, counts and statuses, with and without
/// repair, and the repaired file is the one qemu-img repairs.
#[test]
fn check_and_repair_match_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(
        d,
        [
            "create",
            "-q",
            "-f",
            "parallels",
            "-o",
            "cluster_size=64k",
            "a.par",
            "4M",
        ],
    )
    .ok();
    qemu_io_in(
        d,
        [
            "-f",
            "parallels",
            "-c",
            "write -P 1 0 4k",
            "-c",
            "write -P 2 1M 128k",
            "-c",
            "write -P 3 3M 64k",
            "a.par",
        ],
    )
    .ok();
    let good = std::fs::read(d.join("a.par")).unwrap();
    let bat = |i: usize| 64 + 4 * i;
    let le = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    // What, the 4-byte patches, bytes added at the end.
    type Damage<'a> = (&'a str, Vec<(usize, u32)>, usize);
    let damage: Vec<Damage> = vec![
        ("unclean", vec![(44, 0x746f_6e59)], 0),
        (
            "unclean with a tail",
            vec![(44, 0x746f_6e59)],
            3 * 65536 + 512,
        ),
        ("tail", vec![], 65536),
        ("bad data_off", vec![(48, 1 << 20)], 0),
        ("duplicate", vec![(bat(20), le(&good, bat(16)))], 0),
    ];
    for (what, patches, grow) in &damage {
        let mut b = good.clone();
        for (at, v) in patches {
            b[*at..*at + 4].copy_from_slice(&v.to_le_bytes());
        }
        b.resize(b.len() + grow, 0);
        for out in ["human", "json"] {
            let f = format!("--output={out}");
            std::fs::write(d.join("q.par"), &b).unwrap();
            let q = qemu_img_in(d, ["check", &f, "q.par"]);
            let v = vmimg_in(d, ["check", &f, "q.par"]);
            assert_eq!(v.status, q.status, "{what} {out}: {}", v.stderr);
            assert_eq!(v.stdout, q.stdout, "{what} {out}");
            assert_eq!(
                v.stderr.replace("vmimg", "qemu-img"),
                q.stderr,
                "{what} {out}"
            );
        }
        std::fs::write(d.join("q.par"), &b).unwrap();
        std::fs::write(d.join("v.par"), &b).unwrap();
        let q = qemu_img_in(d, ["check", "-r", "all", "q.par"]);
        let v = vmimg_in(d, ["check", "-r", "all", "v.par"]);
        assert_eq!(v.status, q.status, "{what}: {}", v.stderr);
        assert_eq!(v.stdout, q.stdout, "{what}");
        same_file(d, "v.par", "q.par", &format!("{what} -r all"));
    }
}

/// `inuse` as a crash needs it: set (durably) while BAT changes are unflushed, so that an
/// image a crash leaves is repaired by the next writable open (QEMU's and vmimg's alike);
/// clear after a flush and after a clean exit; a read-only open changes nothing.
#[test]
fn inuse_covers_unflushed_allocations() {
    let dir = tempdir();
    let d = dir.path();
    vmimg_in(
        d,
        [
            "create",
            "-q",
            "-f",
            "parallels",
            "-o",
            "cluster_size=64k",
            "a.par",
            "16M",
        ],
    )
    .ok();
    let inuse = |p: &Path| {
        let b = std::fs::read(p).unwrap();
        u32::from_le_bytes(b[44..48].try_into().unwrap())
    };
    let img = d.join("a.par");
    let mut h = Holder::vmimg_io(&["-f", "parallels", s(&img)]);
    let mut run = |cmd: &str| {
        h.send(&format!("{cmd}\nlength"));
    };
    run("write -q -P 7 0 4k");
    assert_eq!(
        inuse(&img),
        0x746f_6e59,
        "not marked in use after an allocation"
    );
    std::fs::copy(&img, d.join("crash.par")).unwrap();
    run("flush");
    assert_eq!(inuse(&img), 0, "still in use after a flush");
    run("write -q -P 8 4k 4k");
    assert_eq!(inuse(&img), 0, "an overwrite marked it");
    run("write -q -P 9 1M 4k");
    assert_eq!(h.finish(), Some(0));
    assert_eq!(inuse(&img), 0);
    qemu_io_in(
        d,
        ["-c", "read -P 9 1M 4k", "-c", "read -P 8 4k 4k", "a.par"],
    )
    .ok();
    qemu_img_in(d, ["check", "a.par"]).ok();

    std::fs::copy(d.join("crash.par"), d.join("crash2.par")).unwrap();
    std::fs::copy(d.join("crash.par"), d.join("ro.par")).unwrap();
    let q = qemu_img_in(d, ["check", "crash.par"]);
    assert_eq!(q.status, 2, "{q:?}");
    qemu_io_in(d, ["-c", "read -P 7 0 4k", "crash.par"]).ok();
    vmimg_in(d, ["io", "-c", "read -P 7 0 4k", "crash2.par"]).ok();
    same_file(d, "crash2.par", "crash.par", "repaired crash images");
    let before = std::fs::read(d.join("ro.par")).unwrap();
    vmimg_in(d, ["io", "-r", "-c", "read -P 7 0 4k", "ro.par"]).ok();
    vmimg_in(d, ["info", "ro.par"]).ok();
    assert!(std::fs::read(d.join("ro.par")).unwrap() == before);
}

/// resize, amend, measure and rebase are refused as qemu-img refuses them; an image with a
/// Format Extension opens read-only only.
#[test]
fn refusals_match_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "parallels", "q.par", "8M"]).ok();
    for args in [
        &["resize", "-f", "parallels", "q.par", "16M"][..],
        &[
            "amend",
            "-f",
            "parallels",
            "-o",
            "cluster_size=4096",
            "q.par",
        ],
        &["measure", "-O", "parallels", "q.par"],
    ] {
        let q = qemu_img_in(d, args);
        let v = vmimg_in(d, args);
        assert_eq!(
            (v.status, tail(&v.stderr)),
            (q.status, tail(&q.stderr)),
            "{args:?}"
        );
    }
    let mut b = std::fs::read(d.join("q.par")).unwrap();
    b[56..64].copy_from_slice(&2048u64.to_le_bytes());
    b.resize(b.len() + (1 << 20), 0);
    std::fs::write(d.join("e.par"), &b).unwrap();
    let v = vmimg_in(d, ["io", "-c", "write 0 4k", "e.par"]);
    assert_eq!(v.status, 1);
    assert!(v.stderr.contains("Format Extension"), "{}", v.stderr);
    assert!(std::fs::read(d.join("e.par")).unwrap() == b);
}
