//! QED both ways with QEMU's tools: the files qemu-img makes byte for byte, the same files
//! after the same writes and conversions, the same maps, info and check reports, and the
//! need-check bit kept as QEMU keeps it.

mod common;

use common::*;
use std::path::Path;

/// A raw file with data, zero runs and holes over several clusters.
fn patterned_raw(path: &Path, size: u64) {
    let mut data = vec![0u8; size as usize];
    let mut rng = fastrand::Rng::with_seed(33);
    for (i, chunk) in data.chunks_mut(300 << 10).enumerate() {
        if i % 3 != 1 {
            let n = chunk.len().min(70_000);
            rng.fill(&mut chunk[..n]);
        }
    }
    std::fs::write(path, &data).unwrap();
}

fn same_file(d: &Path, a: &str, b: &str, what: &str) {
    compare_files(&d.join(a), &d.join(b)).unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// The stderr message without the tool's prefix and the file name.
fn tail(s: &str) -> String {
    s.trim_end().rsplit(": ").next().unwrap_or("").to_string()
}

/// `create` makes qemu-img's file byte for byte, with and without backing files; refusals
/// in qemu-img's words leave no file.
#[test]
fn create_matches_qemu_img_byte_for_byte() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "raw", "base.raw", "3M"]).ok();
    qemu_img_in(d, ["create", "-q", "-f", "qcow2", "base.qcow2", "5M"]).ok();
    let mut cases = 0;
    for size in ["0", "1", "1000", "10M", "3G", "64T"] {
        for opts in [
            "",
            "cluster_size=4096",
            "cluster_size=4096,table_size=2",
            "table_size=16",
            "cluster_size=1M",
            "cluster_size=2M,table_size=8",
        ] {
            let mut args = vec!["create", "-f", "qed"];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            let (mut q, mut v) = (args.clone(), args.clone());
            q.extend(["q.qed", size]);
            v.extend(["v.qed", size]);
            let qo = qemu_img_in(d, &q);
            let vo = vmimg_in(d, &v);
            assert_eq!(vo.status, qo.status, "{size} {opts}: {}", vo.stderr);
            if qo.status == 0 {
                assert_eq!(
                    vo.stdout.replace("v.qed", "q.qed"),
                    qo.stdout,
                    "{size} {opts}"
                );
                same_file(d, "v.qed", "q.qed", &format!("{size} {opts}"));
                cases += 1;
            } else {
                assert_eq!(tail(&vo.stderr), tail(&qo.stderr), "{size} {opts}");
            }
        }
    }
    assert!(cases >= 30, "{cases}");
    for (b, f) in [("base.raw", "raw"), ("base.qcow2", "qcow2")] {
        for size in [None, Some("8M")] {
            let mut args = vec!["create", "-f", "qed", "-b", b, "-F", f];
            let (mut q, mut v) = (args.clone(), args.split_off(0));
            q.push("q.qed");
            v.push("v.qed");
            if let Some(s) = size {
                q.push(s);
                v.push(s);
            }
            let qo = qemu_img_in(d, &q).ok();
            let vo = vmimg_in(d, &v).ok();
            assert_eq!(vo.stdout.replace("v.qed", "q.qed"), qo.stdout);
            same_file(d, "v.qed", "q.qed", &format!("backing {b}"));
            let qi = qemu_img_in(d, ["info", "--output=json", "q.qed"]).ok();
            let vi = vmimg_in(d, ["info", "--output=json", "v.qed"]).ok();
            let fields = |s: &str| {
                let v: serde_json::Value = serde_json::from_str(s).unwrap();
                (
                    v["virtual-size"].clone(),
                    v["backing-filename"].clone(),
                    v["backing-filename-format"].clone(),
                    v["cluster-size"].clone(),
                    v["dirty-flag"].clone(),
                )
            };
            assert_eq!(fields(&vi.stdout), fields(&qi.stdout), "{b}");
        }
    }
    // Deliberately refused: one-cluster tables, which QEMU writes and cannot open.
    let v = vmimg_in(
        d,
        ["create", "-f", "qed", "-o", "table_size=1", "t1.qed", "1M"],
    );
    assert_eq!(v.status, 1);
    assert!(v.stderr.contains("QEMU cannot open"), "{}", v.stderr);
    assert!(!d.join("t1.qed").exists());
    for args in [
        &[
            "create",
            "-f",
            "qed",
            "-o",
            "cluster_size=3000",
            "x.qed",
            "1M",
        ][..],
        &["create", "-f", "qed", "-o", "table_size=32", "x.qed", "1M"],
        &["create", "-f", "qed", "x.qed", "65T"],
        &[
            "create",
            "-f",
            "qed",
            "-o",
            "cluster_size=64M",
            "x.qed",
            "1M",
        ],
    ] {
        let q = qemu_img_in(d, args);
        let v = vmimg_in(d, args);
        assert_eq!((v.status, tail(&v.stderr)), (q.status, tail(&q.stderr)));
        assert!(
            !d.join("x.qed").exists() || std::fs::metadata(d.join("x.qed")).unwrap().len() == 0
        );
        let _ = std::fs::remove_file(d.join("x.qed"));
    }
}

/// Each tool's conversion is the other's, byte for byte; both read back as the source.
#[test]
fn convert_both_ways_byte_for_byte() {
    let dir = tempdir();
    let d = dir.path();
    patterned_raw(&d.join("src.raw"), 7 << 20);
    for opts in ["cluster_size=65536", "cluster_size=4096,table_size=2"] {
        let conv = ["convert", "-f", "raw", "-O", "qed", "-o", opts, "src.raw"];
        let (mut q, mut v) = (conv.to_vec(), conv.to_vec());
        q.push("q.qed");
        v.push("v.qed");
        qemu_img_in(d, &q).ok();
        vmimg_in(d, &v).ok();
        same_file(d, "v.qed", "q.qed", opts);
        let qm = qemu_img_in(d, ["map", "--output=json", "-f", "qed", "q.qed"]).ok();
        let vm = vmimg_in(d, ["map", "--output=json", "-f", "qed", "q.qed"]).ok();
        assert_eq!(vm.stdout, qm.stdout, "{opts}");
        let qm = qemu_img_in(d, ["map", "-f", "qed", "q.qed"]).ok();
        let vm = vmimg_in(d, ["map", "-f", "qed", "q.qed"]).ok();
        assert_eq!(vm.stdout, qm.stdout, "{opts}");
        let qi = qemu_img_in(d, ["info", "-f", "qed", "q.qed"]).ok();
        let vi = vmimg_in(d, ["info", "-f", "qed", "q.qed"]).ok();
        assert_eq!(vi.stdout, qi.stdout, "{opts}");
        vmimg_in(
            d,
            ["convert", "-f", "qed", "-O", "raw", "q.qed", "back.raw"],
        )
        .ok();
        same_file(d, "back.raw", "src.raw", opts);
        qemu_img_in(d, ["check", "v.qed"]).ok();
        let qc = qemu_img_in(d, ["check", "--output=json", "v.qed"]).ok();
        let vc = vmimg_in(d, ["check", "--output=json", "v.qed"]).ok();
        assert_eq!(vc.stdout, qc.stdout, "{opts}");
    }
    // Probed by its magic, as QEMU probes it.
    let vi = vmimg_in(d, ["info", "--output=json", "v.qed"]).ok();
    assert!(vi.stdout.contains("\"format\": \"qed\""), "{}", vi.stdout);
    // Compression is not a QED feature.
    let q = qemu_img_in(d, ["convert", "-c", "-O", "qed", "src.raw", "c1.qed"]);
    let v = vmimg_in(d, ["convert", "-c", "-O", "qed", "src.raw", "c2.qed"]);
    assert_eq!((v.status, tail(&v.stderr)), (q.status, tail(&q.stderr)));
}

/// The same random qemu-io workload through each tool leaves the same file, byte for byte
/// (the same clusters allocated in the same order, zero clusters and all).
#[test]
fn twin_workloads_leave_identical_files() {
    let dir = tempdir();
    let d = dir.path();
    for (i, opts) in ["cluster_size=65536", "cluster_size=4096,table_size=2"]
        .into_iter()
        .enumerate()
    {
        qemu_img_in(d, ["create", "-q", "-f", "qed", "-o", opts, "q.qed", "24M"]).ok();
        vmimg_in(d, ["create", "-q", "-f", "qed", "-o", opts, "v.qed", "24M"]).ok();
        let mut rng = fastrand::Rng::with_seed(90 + i as u64);
        let mut q = vec!["-f".to_string(), "qed".into()];
        let mut v = vec!["io".to_string(), "-f".into(), "qed".into()];
        for _ in 0..80 {
            let c = random_command(&mut rng, 24 << 20);
            q.extend(["-c".into(), c.clone()]);
            v.extend(["-c".into(), c]);
        }
        q.push("q.qed".into());
        v.push("v.qed".into());
        let qo = qemu_io_in(d, &q).ok();
        let vo = vmimg_in(d, &v).ok();
        assert_eq!(
            io_data_lines(&vo.stdout),
            io_data_lines(&qo.stdout),
            "{opts}"
        );
        same_file(d, "v.qed", "q.qed", opts);
        for img in ["q.qed", "v.qed"] {
            let qc = qemu_img_in(d, ["check", img]).ok();
            let vc = vmimg_in(d, ["check", img]).ok();
            assert_eq!(vc.stdout, qc.stdout, "{opts}");
        }
    }
}

/// Over a backing file: the same copy-on-write (the backing data around each write), the
/// same files and maps; and where QEMU 10 differs, vmimg keeps zeros the guest wrote.
#[test]
fn backing_files_copy_on_write_as_qemu() {
    let dir = tempdir();
    let d = dir.path();
    patterned_raw(&d.join("base.raw"), 6 << 20);
    qemu_img_in(d, ["convert", "-O", "qcow2", "base.raw", "base.qcow2"]).ok();
    for (i, (b, f)) in [("base.raw", "raw"), ("base.qcow2", "qcow2")]
        .into_iter()
        .enumerate()
    {
        for (tool, img) in [("q", "q.qed"), ("v", "v.qed")] {
            let args = ["create", "-q", "-f", "qed", "-b", b, "-F", f, img, "8M"];
            if tool == "q" {
                qemu_img_in(d, args).ok();
            } else {
                vmimg_in(d, args).ok();
            }
        }
        // Writes and flushes only: zero writes into zero clusters meet a QEMU bug, tested
        // on their own below.
        let mut rng = fastrand::Rng::with_seed(140 + i as u64);
        let mut q = vec!["-f".to_string(), "qed".into()];
        let mut v = vec!["io".to_string(), "-f".into(), "qed".into()];
        for _ in 0..40 {
            let len = rng.u64(1..200_000);
            let off = rng.u64(0..(8 << 20) - len);
            let c = match rng.u8(0..4) {
                0 => "flush".to_string(),
                1 => format!("read {off} {len}"),
                _ => format!("write -P {} {off} {len}", rng.u8(..)),
            };
            q.extend(["-c".into(), c.clone()]);
            v.extend(["-c".into(), c]);
        }
        q.push("q.qed".into());
        v.push("v.qed".into());
        let qo = qemu_io_in(d, &q).ok();
        let vo = vmimg_in(d, &v).ok();
        assert_eq!(io_data_lines(&vo.stdout), io_data_lines(&qo.stdout), "{b}");
        same_file(d, "v.qed", "q.qed", b);
        let qm = qemu_img_in(d, ["map", "--output=json", "q.qed"]).ok();
        let vm = vmimg_in(d, ["map", "--output=json", "q.qed"]).ok();
        assert_eq!(vm.stdout, qm.stdout, "{b}");
        qemu_img_in(d, ["compare", "q.qed", "v.qed"]).ok();
    }
    // A zero cluster over backing data, then a write inside it: vmimg keeps the rest of
    // the cluster zero. QEMU 10 fills it from the backing file (the zeros come back as the
    // backing data), a difference kept on purpose.
    vmimg_in(
        d,
        [
            "create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", "z.qed",
        ],
    )
    .ok();
    let v = vmimg_in(
        d,
        [
            "io",
            "-c",
            "write -z 0 64k",
            "-c",
            "write -P 0x5a 8k 4k",
            "-c",
            "read -P 0 0 8k",
            "-c",
            "read -P 0x5a 8k 4k",
            "-c",
            "read -P 0 12k 52k",
            "z.qed",
        ],
    )
    .ok();
    assert!(
        !v.stdout.contains("Pattern verification failed"),
        "{}",
        v.stdout
    );
    qemu_io_in(
        d,
        ["-c", "read -P 0 0 8k", "-c", "read -P 0 12k 52k", "z.qed"],
    )
    .ok();
}

/// check on damaged images: qemu-img's counts, words and statuses, with and without
/// repair, and the repaired file is the one qemu-img repairs.
#[test]
fn check_and_repair_match_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "qed", "a.qed", "16M"]).ok();
    qemu_io_in(
        d,
        [
            "-f",
            "qed",
            "-c",
            "write -P 1 0 4k",
            "-c",
            "write -P 2 3M 128k",
            "-c",
            "write -z 5M 64k",
            "a.qed",
        ],
    )
    .ok();
    let good = std::fs::read(d.join("a.qed")).unwrap();
    let cs = 65536usize;
    let l1 = cs;
    let l2 = u64::from_le_bytes(good[l1..l1 + 8].try_into().unwrap()) as usize;
    let entry = |i: usize| l2 + i * 8;
    let len = good.len() as u64;
    // What, the 8-byte patches (offset, value), bytes added at the end.
    type Damage<'a> = (&'a str, Vec<(usize, u64)>, usize);
    let damage: Vec<Damage> = vec![
        ("entry past the end", vec![(entry(48), len + 65536)], 0),
        ("misaligned entry", vec![(entry(48), 0x50000 + 8)], 0),
        ("duplicate", vec![(entry(49), 0x50000)], 0),
        ("entry into the L1", vec![(entry(50), 0x10000)], 0),
        ("L1 past the end", vec![(l1, len * 2)], 0),
        ("misaligned L1", vec![(l1, l2 as u64 + 512)], 0),
        ("leak", vec![], 65536),
    ];
    for (what, patches, grow) in &damage {
        let mut b = good.clone();
        for (at, v) in patches {
            b[*at..*at + 8].copy_from_slice(&v.to_le_bytes());
        }
        b.resize(b.len() + grow, 0);
        for out in ["human", "json"] {
            let f = format!("--output={out}");
            std::fs::write(d.join("q.qed"), &b).unwrap();
            let q = qemu_img_in(d, ["check", &f, "q.qed"]);
            let v = vmimg_in(d, ["check", &f, "q.qed"]);
            assert_eq!(v.status, q.status, "{what} {out}: {}", v.stderr);
            assert_eq!(v.stdout, q.stdout, "{what} {out}");
        }
        for mode in ["leaks", "all"] {
            std::fs::write(d.join("q.qed"), &b).unwrap();
            std::fs::write(d.join("v.qed"), &b).unwrap();
            let q = qemu_img_in(d, ["check", "-r", mode, "q.qed"]);
            let v = vmimg_in(d, ["check", "-r", mode, "v.qed"]);
            assert_eq!(v.status, q.status, "{what} -r {mode}: {}", v.stderr);
            assert_eq!(v.stdout, q.stdout, "{what} -r {mode}");
            same_file(d, "v.qed", "q.qed", &format!("{what} -r {mode}"));
        }
    }
}

/// The need-check bit as QEMU keeps it: set (durably) while allocations are unflushed, so
/// that an image a crash leaves behind is repaired by the next writable open (QEMU's or
/// vmimg's); cleared by a flush, absent after a clean exit.
#[test]
fn need_check_bit_covers_unflushed_allocations() {
    let dir = tempdir();
    let d = dir.path();
    vmimg_in(d, ["create", "-q", "-f", "qed", "a.qed", "16M"]).ok();
    let features = |p: &Path| {
        let b = std::fs::read(p).unwrap();
        u64::from_le_bytes(b[16..24].try_into().unwrap())
    };
    let img = d.join("a.qed");
    let mut h = Holder::vmimg_io(&["-f", "qed", s(&img)]);
    // Quiet commands, each followed by one that answers with one line: done when it does.
    let mut run = |cmd: &str| {
        h.send(&format!("{cmd}\nlength"));
    };
    run("write -q -P 7 0 4k");
    assert_eq!(
        features(&img) & 2,
        2,
        "no need-check bit after an allocation"
    );
    // What a crash now would leave: QEMU repairs it on a writable open and reads the data.
    std::fs::copy(&img, d.join("crash.qed")).unwrap();
    run("flush");
    assert_eq!(features(&img) & 2, 0, "the bit survived a flush");
    run("write -q -P 8 4k 4k");
    assert_eq!(features(&img) & 2, 0, "an overwrite set the bit");
    run("write -q -P 9 1M 4k");
    assert_eq!(features(&img) & 2, 2);
    assert_eq!(h.finish(), Some(0));
    assert_eq!(features(&img) & 2, 0, "the bit survived a clean exit");
    qemu_io_in(
        d,
        ["-c", "read -P 9 1M 4k", "-c", "read -P 8 4k 4k", "a.qed"],
    )
    .ok();

    assert_eq!(features(&d.join("crash.qed")) & 2, 2);
    std::fs::copy(d.join("crash.qed"), d.join("crash2.qed")).unwrap();
    qemu_io_in(d, ["-c", "read -P 7 0 4k", "crash.qed"]).ok();
    assert_eq!(features(&d.join("crash.qed")) & 2, 0);
    vmimg_in(d, ["io", "-c", "read -P 7 0 4k", "crash2.qed"]).ok();
    assert_eq!(features(&d.join("crash2.qed")) & 2, 0);
    same_file(d, "crash2.qed", "crash.qed", "repaired crash images");
    // Read-only opens leave the bit alone, as QEMU's.
    std::fs::copy(d.join("crash2.qed"), d.join("ro.qed")).unwrap();
    let mut b = std::fs::read(d.join("ro.qed")).unwrap();
    b[16] |= 2;
    std::fs::write(d.join("ro.qed"), &b).unwrap();
    vmimg_in(d, ["info", "ro.qed"]).ok();
    vmimg_in(d, ["io", "-r", "-c", "read 0 4k", "ro.qed"]).ok();
    assert!(std::fs::read(d.join("ro.qed")).unwrap() == b);
}

/// resize, rebase -u, amend and measure as qemu-img does them on QED.
#[test]
fn resize_rebase_and_refusals_match_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "raw", "base.raw", "1M"]).ok();
    qemu_img_in(d, ["create", "-q", "-f", "qed", "q.qed", "8M"]).ok();
    qemu_io_in(d, ["-c", "write -P 3 0 100k", "q.qed"]).ok();
    std::fs::copy(d.join("q.qed"), d.join("v.qed")).unwrap();
    for args in [
        &["resize", "-f", "qed", "IMG", "65T"][..],
        &["resize", "-f", "qed", "IMG", "4M"],
        &["resize", "-f", "qed", "IMG", "--shrink", "4M"],
        &["resize", "-f", "qed", "IMG", "--preallocation=full", "30M"],
        &["resize", "-f", "qed", "IMG", "30M"],
        &["rebase", "-u", "-b", "base.raw", "-F", "raw", "IMG"],
        &["rebase", "-u", "-b", "base.raw", "-F", "qcow2", "IMG"],
        &["rebase", "-u", "-b", "", "IMG"],
        &["amend", "-f", "qed", "-o", "cluster_size=4096", "IMG"],
        &["measure", "-O", "qed", "base.raw"],
    ] {
        let with = |img: &'static str| -> Vec<&str> {
            args.iter()
                .map(|a| if *a == "IMG" { img } else { *a })
                .collect()
        };
        let q = qemu_img_in(d, with("q.qed"));
        let v = vmimg_in(d, with("v.qed"));
        assert_eq!(v.status, q.status, "{args:?}: {}", v.stderr);
        assert_eq!(tail(&v.stderr), tail(&q.stderr), "{args:?}");
        same_file(d, "v.qed", "q.qed", &format!("{args:?}"));
    }
    // Grown over a longer backing file, the new space reads as zeros.
    patterned_raw(&d.join("long.raw"), 4 << 20);
    vmimg_in(
        d,
        [
            "create", "-q", "-f", "qed", "-b", "long.raw", "-F", "raw", "g.qed", "1M",
        ],
    )
    .ok();
    vmimg_in(d, ["resize", "g.qed", "4M"]).ok();
    qemu_io_in(d, ["-c", "read -P 0 1M 3M", "g.qed"]).ok();
}
