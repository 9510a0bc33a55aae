//! Twin workloads on qcow2: the same random qemu-io commands applied by `vmimg io` to one
//! image and by `qemu-io` to its twin; then `qemu-img check` must find ours clean and
//! `qemu-img compare` must find the twins equal.

mod common;

use common::*;
use std::path::Path;

/// Applies `cmds` to `ours` with vmimg and to `theirs` with qemu-io and checks the outcome.
///
/// Both tools run with `dir` as the current directory: QEMU resolves a relative data file
/// name against it (vmimg against the image's directory, which is the same here).
fn twin(dir: &Path, ours: &str, theirs: &str, cmds: &[String]) {
    let mut a = vec!["io".to_string(), "-f".into(), "qcow2".into()];
    let mut b = vec!["-f".to_string(), "qcow2".into()];
    for c in cmds {
        a.extend(["-c".to_string(), c.clone()]);
        b.extend(["-c".to_string(), c.clone()]);
    }
    a.push(ours.to_string());
    b.push(theirs.to_string());
    let ra = vmimg_in(dir, &a).ok();
    let rb = qemu_io_in(dir, &b).ok();
    assert_eq!(io_data_lines(&ra.stdout), io_data_lines(&rb.stdout));
    let check = qemu_img_in(dir, ["check", "-f", "qcow2", ours]);
    assert_eq!(
        check.status, 0,
        "qemu-img check of vmimg's image:\n{}{}",
        check.stdout, check.stderr
    );
    qemu_img_in(dir, ["compare", "-f", "qcow2", "-F", "qcow2", ours, theirs]).ok();
}

fn commands(seed: u64, size: u64, n: usize) -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| random_command(&mut rng, size)).collect()
}

/// Creates twin images with `opts` (and `extra` args such as -b) of `size` bytes.
fn create_twins(dir: &Path, opts: &str, extra: &[&str], size: &str) {
    for name in ["ours.qcow2", "theirs.qcow2"] {
        let mut args = vec!["create", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend(extra);
        let p = dir.join(name);
        args.push(s(&p));
        args.push(size);
        qemu_img(&args).ok();
    }
}

#[test]
fn random_workloads_for_every_creation_option_stay_clean_and_equal_to_qemu() {
    let cases = [
        "",
        "compat=0.10",
        "cluster_size=512",
        "cluster_size=4k,refcount_bits=1",
        "cluster_size=2M",
        "refcount_bits=64,cluster_size=1k",
        "refcount_bits=2",
        "refcount_bits=8",
        "refcount_bits=32",
        "extended_l2=on",
        "extended_l2=on,cluster_size=2M",
        "lazy_refcounts=on",
        "compression_type=zstd",
        "preallocation=metadata",
        "preallocation=full,cluster_size=16k",
        "data_file=ours.data",
        "data_file=ours.data,data_file_raw=on",
    ];
    for (i, opts) in cases.iter().enumerate() {
        let dir = tempdir();
        let size = 8u64 << 20;
        if opts.contains("data_file") {
            // Each twin needs its own data file.
            qemu_img_in(
                dir.path(),
                ["create", "-f", "qcow2", "-o", opts, "ours.qcow2", "8M"],
            )
            .ok();
            let theirs_opts = opts.replace("ours.data", "theirs.data");
            qemu_img_in(
                dir.path(),
                [
                    "create",
                    "-f",
                    "qcow2",
                    "-o",
                    &theirs_opts,
                    "theirs.qcow2",
                    "8M",
                ],
            )
            .ok();
        } else {
            create_twins(dir.path(), opts, &[], "8M");
        }
        eprintln!("case {i}: {opts}");
        let cmds = commands(1000 + i as u64, size, 120);
        twin(dir.path(), "ours.qcow2", "theirs.qcow2", &cmds);
    }
}

#[test]
fn writes_over_a_raw_backing_file_copy_on_write_partial_clusters() {
    let dir = tempdir();
    let base = dir.path().join("base.raw");
    qemu_img(["create", "-f", "raw", s(&base), "6M"]).ok();
    qemu_io(["-f", "raw", "-c", "write -P 0x5a 0 6M", s(&base)]).ok();
    create_twins(dir.path(), "", &["-b", "base.raw", "-F", "raw"], "8M");
    twin(
        dir.path(),
        "ours.qcow2",
        "theirs.qcow2",
        &commands(7, 8 << 20, 150),
    );
}

#[test]
fn writes_over_a_qcow2_backing_file_with_extended_l2_keep_subclusters_right() {
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    qemu_img(["create", "-f", "qcow2", s(&base), "8M"]).ok();
    qemu_io(["-f", "qcow2", "-c", "write -P 0x11 0 8M", s(&base)]).ok();
    create_twins(
        dir.path(),
        "extended_l2=on",
        &["-b", "base.qcow2", "-F", "qcow2"],
        "8M",
    );
    twin(
        dir.path(),
        "ours.qcow2",
        "theirs.qcow2",
        &commands(8, 8 << 20, 150),
    );
}

#[test]
fn writes_over_compressed_clusters_copy_them_and_free_the_old_extents() {
    let dir = tempdir();
    let raw = dir.path().join("src.raw");
    qemu_img(["create", "-f", "raw", s(&raw), "4M"]).ok();
    qemu_io(["-f", "raw", "-c", "write -P 0x21 0 4M", s(&raw)]).ok();
    for (name, ct) in [("ours.qcow2", "zlib"), ("theirs.qcow2", "zlib")] {
        let p = dir.path().join(name);
        qemu_img([
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ct}"),
            s(&raw),
            s(&p),
        ])
        .ok();
    }
    twin(
        dir.path(),
        "ours.qcow2",
        "theirs.qcow2",
        &commands(9, 4 << 20, 100),
    );
}

#[test]
fn writes_after_an_internal_snapshot_leave_the_snapshot_unchanged() {
    let dir = tempdir();
    create_twins(dir.path(), "", &[], "4M");
    for name in ["ours.qcow2", "theirs.qcow2"] {
        let p = dir.path().join(name);
        qemu_io(["-f", "qcow2", "-c", "write -P 0x31 0 4M", s(&p)]).ok();
        qemu_img(["snapshot", "-c", "s1", s(&p)]).ok();
    }
    let before = dir.path().join("before.raw");
    qemu_img([
        "convert",
        "-l",
        "snapshot.name=s1",
        "-O",
        "raw",
        s(&dir.path().join("ours.qcow2")),
        s(&before),
    ])
    .ok();
    twin(
        dir.path(),
        "ours.qcow2",
        "theirs.qcow2",
        &commands(10, 4 << 20, 100),
    );
    let after = dir.path().join("after.raw");
    qemu_img([
        "convert",
        "-l",
        "snapshot.name=s1",
        "-O",
        "raw",
        s(&dir.path().join("ours.qcow2")),
        s(&after),
    ])
    .ok();
    assert!(
        std::fs::read(&before).unwrap() == std::fs::read(&after).unwrap(),
        "the snapshot changed"
    );
}

#[test]
fn images_created_by_vmimg_take_writes_and_pass_check() {
    let dir = tempdir();
    for (i, opts) in ["", "cluster_size=512,refcount_bits=64", "extended_l2=on"]
        .iter()
        .enumerate()
    {
        let ours = dir.path().join(format!("c{i}.qcow2"));
        let mut args = vec!["create", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&ours), "16M"]);
        vmimg(&args).ok();
        let theirs = dir.path().join(format!("t{i}.qcow2"));
        std::fs::copy(&ours, &theirs).unwrap();
        let name_o = format!("c{i}.qcow2");
        let name_t = format!("t{i}.qcow2");
        twin(
            dir.path(),
            &name_o,
            &name_t,
            &commands(20 + i as u64, 16 << 20, 150),
        );
    }
}

/// Writes into new clusters leave a file that is qemu-io's to the byte: the unwritten zero
/// tail of the last new cluster still becomes part of the file (at the flush), so the file
/// ends on a cluster boundary as QEMU's does, and the zero parts are allocated as QEMU's are.
#[test]
fn partial_cluster_writes_leave_qemus_file_byte_for_byte() {
    let dir = tempdir();
    for (i, opts) in ["", "cluster_size=4k", "cluster_size=2M"]
        .iter()
        .enumerate()
    {
        create_twins(dir.path(), opts, &[], "64M");
        let cmds: Vec<String> = [
            "write -P 1 0 4k",
            "write -P 2 1M 100k",
            "write -P 3 5000 3000",
            "write -P 4 40M 64k",
            "write -P 5 63M 512",
        ]
        .iter()
        .map(|c| c.to_string())
        .collect();
        twin(dir.path(), "ours.qcow2", "theirs.qcow2", &cmds);
        let ours = std::fs::read(dir.path().join("ours.qcow2")).unwrap();
        let theirs = std::fs::read(dir.path().join("theirs.qcow2")).unwrap();
        assert_eq!(ours.len(), theirs.len(), "case {i} ({opts}): file lengths");
        assert!(ours == theirs, "case {i} ({opts}): the files differ");
        // The zero-filled parts of new clusters are allocated, as QEMU's are: the same disk
        // usage, and QEMU does not take ours for a metadata-preallocated image (whose holes
        // it would report as zeros in its map).
        let (o, t) = (
            dir.path().join("ours.qcow2"),
            dir.path().join("theirs.qcow2"),
        );
        // (Within 16 KiB: the file system's own extent blocks depend on fragmentation.)
        let (ao, at) = (allocated(&o), allocated(&t));
        assert!(
            ao.abs_diff(at) <= 16 << 10,
            "case {i} ({opts}): disk usage {ao} vs {at}"
        );
        let map = |f: &std::path::Path| {
            qemu_img(["map", "--output=json", "-f", "qcow2", s(f)])
                .ok()
                .stdout
        };
        assert_eq!(map(&o), map(&t), "case {i} ({opts}): qemu-img map");
    }
}

/// A raw source with compressible, long-distance-repetitive, incompressible and zero data.
fn varied_source(path: &Path) {
    let mut rng = fastrand::Rng::with_seed(77);
    let block: Vec<u8> = (0..8192).map(|_| rng.u8(..)).collect();
    let mut data = Vec::new();
    for _ in 0..64 {
        for _ in 0..8 {
            data.extend_from_slice(&block);
        }
    }
    for i in 0..32u8 {
        data.extend(std::iter::repeat_n(i, 65536));
    }
    data.extend(std::iter::repeat_n(0u8, 3 << 20));
    data.extend((0..(1 << 20)).map(|_| rng.u8(..)));
    data.extend(b"tail".repeat(1000));
    std::fs::write(path, data).unwrap();
}

#[test]
fn convert_to_qcow2_passes_check_and_compare_for_several_layouts() {
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    varied_source(&src);
    for (i, opts) in [
        "",
        "cluster_size=4k",
        "cluster_size=2M,extended_l2=on",
        "compat=0.10",
    ]
    .iter()
    .enumerate()
    {
        let out = dir.path().join(format!("out{i}.qcow2"));
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&src), s(&out)]);
        vmimg(&args).ok();
        qemu_img(["check", "-f", "qcow2", s(&out)]).ok();
        qemu_img(["compare", "-f", "raw", "-F", "qcow2", s(&src), s(&out)]).ok();
    }
}

/// Writes go in guest order by default, as qemu-img's do, so a converted image's layout is
/// qemu-img's to the byte; `-W` (out-of-order writes) still gives the same content.
#[test]
fn convert_to_qcow2_matches_qemu_img_byte_for_byte_and_w_keeps_the_content() {
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    // 40 MiB: many more 2 MiB jobs than run at once, data and zero stretches at odd places.
    let mut rng = fastrand::Rng::with_seed(5);
    let mut data = Vec::new();
    while data.len() < 40 << 20 {
        let len = rng.usize(1..(3 << 20));
        if rng.u8(..4) == 0 {
            data.extend(std::iter::repeat_n(0u8, len));
        } else {
            data.extend((0..len).map(|_| rng.u8(..)));
        }
    }
    std::fs::write(&src, &data).unwrap();
    let theirs = dir.path().join("qemu.qcow2");
    qemu_img(["convert", "-f", "raw", "-O", "qcow2", s(&src), s(&theirs)]).ok();
    let expected = std::fs::read(&theirs).unwrap();
    for run in 0..3 {
        let ours = dir.path().join(format!("ours{run}.qcow2"));
        vmimg(["convert", "-f", "raw", "-O", "qcow2", s(&src), s(&ours)]).ok();
        let got = std::fs::read(&ours).unwrap();
        assert_eq!(got.len(), expected.len(), "run {run}: file sizes differ");
        if let Some(at) = got.iter().zip(&expected).position(|(a, b)| a != b) {
            panic!("run {run}: first difference from qemu-img's output at byte {at:#x}");
        }
    }
    let any_order = dir.path().join("w.qcow2");
    vmimg([
        "convert",
        "-W",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&src),
        s(&any_order),
    ])
    .ok();
    qemu_img(["check", "-f", "qcow2", s(&any_order)]).ok();
    qemu_img([
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        s(&src),
        s(&any_order),
    ])
    .ok();
}

/// A source cluster that cannot be read ends the copy with the read's error, whether jobs
/// write in order (one writer) or as they finish (-W): no hang, no panic.
#[test]
fn convert_stops_with_the_error_of_an_unreadable_source_cluster() {
    let dir = tempdir();
    let raw = dir.path().join("t.raw");
    let text: Vec<u8> = (0..120_000)
        .flat_map(|i| format!("line {i:08} of compressible text\n").into_bytes())
        .collect();
    std::fs::write(&raw, text).unwrap();
    let bad = dir.path().join("bad.qcow2");
    qemu_img([
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&raw),
        s(&bad),
    ])
    .ok();
    // The last compressed cluster's stream is at the end of the file: make it garbage.
    let mut bytes = std::fs::read(&bad).unwrap();
    let n = bytes.len();
    bytes[n - 600..].fill(0xff);
    std::fs::write(&bad, bytes).unwrap();
    for extra in [&[][..], &["-W"][..]] {
        let out = dir.path().join("out.raw");
        let mut args = vec!["convert"];
        args.extend(extra);
        args.extend(["-f", "qcow2", "-O", "raw", s(&bad), s(&out)]);
        let r = vmimg(&args).expect_status(1);
        assert!(
            r.stderr.contains("deflate stream is malformed"),
            "{extra:?}: {}",
            r.stderr
        );
    }
}

#[test]
fn convert_cache_modes_all_give_the_same_image_and_bad_modes_are_refused() {
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    varied_source(&src);
    for (i, (t, src_t)) in [
        ("unsafe", "writeback"),
        ("writeback", "none"),
        ("writethrough", "writeback"),
        ("none", "writeback"),
        ("directsync", "writeback"),
    ]
    .iter()
    .enumerate()
    {
        let out = dir.path().join(format!("out{i}.qcow2"));
        vmimg([
            "convert",
            "-t",
            t,
            "-T",
            src_t,
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&src),
            s(&out),
        ])
        .ok();
        qemu_img(["check", "-f", "qcow2", s(&out)]).ok();
        qemu_img(["compare", "-f", "raw", "-F", "qcow2", s(&src), s(&out)]).ok();
    }
    let out = dir.path().join("bad.qcow2");
    let r = vmimg(["convert", "-t", "bogus", "-O", "qcow2", s(&src), s(&out)]).expect_status(1);
    assert!(
        r.stderr.contains("Invalid cache option: bogus"),
        "{}",
        r.stderr
    );
}

#[test]
fn convert_c_output_is_readable_by_qemu_and_within_10_percent_of_its_size() {
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    varied_source(&src);
    for ct in ["zlib", "zstd"] {
        let ours = dir.path().join(format!("ours-{ct}.qcow2"));
        let theirs = dir.path().join(format!("theirs-{ct}.qcow2"));
        let o = format!("compression_type={ct}");
        vmimg([
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &o,
            s(&src),
            s(&ours),
        ])
        .ok();
        qemu_img([
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &o,
            s(&src),
            s(&theirs),
        ])
        .ok();
        qemu_img(["check", "-f", "qcow2", s(&ours)]).ok();
        qemu_img(["compare", "-f", "raw", "-F", "qcow2", s(&src), s(&ours)]).ok();
        let (a, b) = (
            std::fs::metadata(&ours).unwrap().len(),
            std::fs::metadata(&theirs).unwrap().len(),
        );
        assert!(
            a as f64 <= b as f64 * 1.1,
            "{ct}: vmimg {a} bytes vs qemu-img {b} bytes"
        );
        let map = qemu_img(["map", "--output=json", "-f", "qcow2", s(&ours)])
            .ok()
            .stdout;
        assert!(
            map.contains("\"compressed\": true"),
            "{ct}: no compressed clusters"
        );
    }
}

#[test]
fn qemu_io_reads_and_rewrites_clusters_vmimg_compressed() {
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    varied_source(&src);
    let ours = dir.path().join("c.qcow2");
    vmimg([
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&src),
        s(&ours),
    ])
    .ok();
    // Overwrite parts of compressed clusters with QEMU, then check both tools agree.
    qemu_io([
        "-f",
        "qcow2",
        "-c",
        "write -P 9 70000 5000",
        "-c",
        "write -P 8 1M 64k",
        s(&ours),
    ])
    .ok();
    qemu_io([
        "-f",
        "raw",
        "-c",
        "write -P 9 70000 5000",
        "-c",
        "write -P 8 1M 64k",
        s(&src),
    ])
    .ok();
    qemu_img(["check", "-f", "qcow2", s(&ours)]).ok();
    qemu_img(["compare", "-f", "raw", "-F", "qcow2", s(&src), s(&ours)]).ok();
}

#[test]
fn resize_grows_like_qemu_img_including_l1_growth() {
    let dir = tempdir();
    // 512-byte clusters: one L1 cluster covers 2 MiB, so growing to 64 MiB moves the L1.
    for (opts, first, grow) in [
        ("cluster_size=512", "1M", "64M"),
        ("", "10M", "+3G"),
        ("extended_l2=on", "3M", "+5M"),
        ("compat=0.10", "3M", "+5M"),
    ] {
        create_twins(dir.path(), opts, &[], first);
        for name in ["ours.qcow2", "theirs.qcow2"] {
            qemu_io_in(dir.path(), ["-f", "qcow2", "-c", "write -P 7 0 700k", name]).ok();
        }
        vmimg_in(dir.path(), ["resize", "-f", "qcow2", "ours.qcow2", grow]).ok();
        qemu_img_in(dir.path(), ["resize", "-f", "qcow2", "theirs.qcow2", grow]).ok();
        qemu_img_in(dir.path(), ["check", "ours.qcow2"]).ok();
        qemu_img_in(dir.path(), ["compare", "-s", "ours.qcow2", "theirs.qcow2"]).ok();
        // The image stays writable past the old end.
        let cmds = commands(30, 8 << 20, 60);
        twin(dir.path(), "ours.qcow2", "theirs.qcow2", &cmds);
    }
}

#[test]
fn shrink_needs_the_flag_and_regrown_space_reads_zeros() {
    let dir = tempdir();
    create_twins(dir.path(), "", &[], "4M");
    let img = "ours.qcow2";
    qemu_io_in(dir.path(), ["-f", "qcow2", "-c", "write -P 7 0 4M", img]).ok();
    let r = vmimg_in(dir.path(), ["resize", "-f", "qcow2", img, "1000k"]);
    assert_eq!(r.status, 1);
    assert!(r.stderr.contains("--shrink"), "{}", r.stderr);
    vmimg_in(
        dir.path(),
        ["resize", "-f", "qcow2", "--shrink", img, "1000k"],
    )
    .ok();
    qemu_img_in(dir.path(), ["check", img]).ok();
    vmimg_in(dir.path(), ["resize", "-f", "qcow2", img, "+3M"]).ok();
    qemu_img_in(dir.path(), ["check", img]).ok();
    // Unlike qemu-img (which exposes the stale tail of the last cluster), every byte past
    // the shrunken end reads as zero after growing again.
    qemu_io_in(
        dir.path(),
        [
            "-f",
            "qcow2",
            "-r",
            "-c",
            "read -P 7 0 1000k",
            "-c",
            "read -P 0 1000k 3M",
            img,
        ],
    )
    .ok();
    // Shrinking frees the clusters past the end.
    let info = qemu_img_in(dir.path(), ["check", "--output=json", img]).ok();
    let v: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    assert!(
        v["allocated-clusters"].as_u64().unwrap() <= 16,
        "{}",
        info.stdout
    );
}

/// Twin chains: base.qcow2 (2M, data in the middle) <- top.qcow2 (3M, data, zeros).
fn twin_chains(dir: &Path) {
    for p in ["a", "b"] {
        let base = format!("base-{p}.qcow2");
        let top = format!("top-{p}.qcow2");
        qemu_img_in(dir, ["create", "-f", "qcow2", &base, "2M"]).ok();
        qemu_io_in(dir, ["-f", "qcow2", "-c", "write -P 5 512k 1M", &base]).ok();
        qemu_img_in(
            dir,
            [
                "create", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top, "3M",
            ],
        )
        .ok();
        qemu_io_in(
            dir,
            [
                "-f",
                "qcow2",
                "-c",
                "write -P 1 0 700k",
                "-c",
                "write -z 1500k 100k",
                "-c",
                "write -P 2 2500k 10k",
                &top,
            ],
        )
        .ok();
    }
}

#[test]
fn commit_gives_the_same_images_as_qemu_img_commit() {
    let dir = tempdir();
    let d = dir.path();
    twin_chains(d);
    vmimg_in(d, ["commit", "top-a.qcow2"]).ok();
    qemu_img_in(d, ["commit", "top-b.qcow2"]).ok();
    for name in ["base", "top"] {
        let (a, b) = (format!("{name}-a.qcow2"), format!("{name}-b.qcow2"));
        qemu_img_in(d, ["check", &a]).ok();
        qemu_img_in(d, ["compare", &a, &b]).ok();
    }
    // The top was emptied: everything now comes from the base.
    let map = qemu_img_in(d, ["map", "--output=json", "top-a.qcow2"])
        .ok()
        .stdout;
    assert!(!map.contains("\"depth\": 0, \"present\": true"), "{map}");
}

#[test]
fn rebase_safe_and_unsafe_give_the_same_content_as_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    twin_chains(d);
    qemu_img_in(d, ["create", "-f", "qcow2", "other.qcow2", "3M"]).ok();
    qemu_io_in(d, ["-f", "qcow2", "-c", "write -P 9 0 3M", "other.qcow2"]).ok();
    vmimg_in(
        d,
        ["rebase", "-b", "other.qcow2", "-F", "qcow2", "top-a.qcow2"],
    )
    .ok();
    qemu_img_in(
        d,
        ["rebase", "-b", "other.qcow2", "-F", "qcow2", "top-b.qcow2"],
    )
    .ok();
    qemu_img_in(d, ["check", "top-a.qcow2"]).ok();
    qemu_img_in(d, ["compare", "top-a.qcow2", "top-b.qcow2"]).ok();
    let info = vmimg_in(d, ["info", "top-a.qcow2"]).ok().stdout;
    assert!(info.contains("backing file: other.qcow2"), "{info}");
    // Removing the backing file keeps the content.
    vmimg_in(d, ["rebase", "-b", "", "top-a.qcow2"]).ok();
    qemu_img_in(d, ["compare", "top-a.qcow2", "top-b.qcow2"]).ok();
    // Unsafe mode only renames, even when the named file does not exist.
    vmimg_in(
        d,
        [
            "rebase",
            "-u",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            "top-b.qcow2",
        ],
    )
    .ok();
    let info = qemu_img_in(d, ["info", "-U", "--output=json", "top-b.qcow2"]);
    assert!(info.stdout.contains("gone.qcow2") || info.stderr.contains("gone.qcow2"));
}

#[test]
fn measure_prints_the_same_numbers_as_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    let src = d.join("src.raw");
    varied_source(&src);
    qemu_img_in(d, ["create", "-f", "qcow2", "img.qcow2", "8M"]).ok();
    qemu_io_in(
        d,
        [
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 100k",
            "-c",
            "write -z 1M 64k",
            "img.qcow2",
        ],
    )
    .ok();
    qemu_img_in(d, ["bitmap", "--add", "img.qcow2", "bm0"]).ok();
    qemu_img_in(d, ["create", "-f", "qcow2", "big.qcow2", "4T"]).ok();
    qemu_io_in(d, ["-f", "qcow2", "-c", "write 1T 64k", "big.qcow2"]).ok();
    let cases: &[&[&str]] = &[
        &["-O", "qcow2", "--size", "10G"],
        &["-O", "qcow2", "-o", "cluster_size=512", "--size", "3G"],
        &["-O", "qcow2", "-o", "preallocation=full", "--size", "1G"],
        &["-O", "raw", "--size", "1G"],
        &["-O", "qcow2", "-f", "raw", "src.raw"],
        &[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-f",
            "raw",
            "src.raw",
        ],
        &["-O", "raw", "-f", "raw", "src.raw"],
        &["-O", "qcow2", "-f", "qcow2", "img.qcow2"],
        &[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=2M,refcount_bits=64",
            "-f",
            "qcow2",
            "img.qcow2",
        ],
        &[
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-f",
            "qcow2",
            "img.qcow2",
        ],
        &[
            "-O",
            "qcow2",
            "-o",
            "compat=0.10",
            "-f",
            "qcow2",
            "img.qcow2",
        ],
        &["-O", "qcow2", "--output=json", "-f", "qcow2", "img.qcow2"],
        &["-O", "qcow2", "-f", "qcow2", "big.qcow2"],
    ];
    for args in cases {
        let mut ours = vec!["measure"];
        ours.extend_from_slice(args);
        let mut theirs = vec!["measure"];
        theirs.extend_from_slice(args);
        let a = vmimg_in(d, &ours).ok().stdout;
        let b = qemu_img_in(d, &theirs).ok().stdout;
        assert_eq!(a, b, "measure {args:?}");
    }
}

#[test]
fn amend_sequences_match_qemu_img_amend() {
    let sequences: &[&[&str]] = &[
        &["compat=0.10"],
        &["compat=0.10", "compat=1.1"],
        &["refcount_bits=4"],
        &["refcount_bits=64"],
        &["refcount_bits=1"],
        &["lazy_refcounts=on"],
        &["size=8M"],
        &["refcount_bits=2", "refcount_bits=16", "compat=0.10"],
    ];
    for backing in [false, true] {
        for seq in sequences {
            let dir = tempdir();
            let d = dir.path();
            let extra: &[&str] = if backing {
                qemu_img_in(d, ["create", "-f", "raw", "base.raw", "4M"]).ok();
                qemu_io_in(d, ["-f", "raw", "-c", "write -P 3 0 4M", "base.raw"]).ok();
                &["-b", "base.raw", "-F", "raw"]
            } else {
                &[]
            };
            create_twins(d, "", extra, "4M");
            for name in ["ours.qcow2", "theirs.qcow2"] {
                qemu_io_in(
                    d,
                    [
                        "-f",
                        "qcow2",
                        "-c",
                        "write -P 1 0 1M",
                        "-c",
                        "write -z 2M 64k",
                        "-c",
                        "write -z 1M 64k",
                        "-c",
                        "write -z -u 3M 64k",
                        name,
                    ],
                )
                .ok();
            }
            for step in seq.iter() {
                vmimg_in(d, ["amend", "-f", "qcow2", "-o", step, "ours.qcow2"]).ok();
                qemu_img_in(d, ["amend", "-f", "qcow2", "-o", step, "theirs.qcow2"]).ok();
            }
            qemu_img_in(d, ["check", "ours.qcow2"]).ok();
            qemu_img_in(d, ["compare", "ours.qcow2", "theirs.qcow2"]).ok();
            let info = |name: &str| -> serde_json::Value {
                let out = qemu_img_in(d, ["info", "--output=json", name]).ok().stdout;
                let v: serde_json::Value = serde_json::from_str(&out).unwrap();
                v["format-specific"].clone()
            };
            assert_eq!(
                info("ours.qcow2"),
                info("theirs.qcow2"),
                "{seq:?} backing {backing}"
            );
        }
    }
}

#[test]
fn amend_refuses_what_the_target_version_cannot_hold() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(
        d,
        [
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "x.qcow2",
            "1M",
        ],
    )
    .ok();
    let r = vmimg_in(d, ["amend", "-o", "compat=0.10", "x.qcow2"]).expect_status(1);
    assert!(r.stderr.contains("extended L2"), "{}", r.stderr);
    let r = vmimg_in(d, ["amend", "-o", "cluster_size=4k", "x.qcow2"]).expect_status(1);
    assert!(
        r.stderr.contains("only supported for image creation"),
        "{}",
        r.stderr
    );
    qemu_img_in(d, ["check", "x.qcow2"]).ok();
}

#[test]
fn extended_l2_allocates_and_zeroes_only_the_subclusters_written_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-f", "raw", "base.raw", "4M"]).ok();
    qemu_io_in(d, ["-f", "raw", "-c", "write -P 3 0 4M", "base.raw"]).ok();
    create_twins(d, "extended_l2=on", &["-b", "base.raw", "-F", "raw"], "4M");
    let cmds: Vec<String> = [
        "write -P 5 1000 3000",
        "write -P 6 70000 100",
        "write -z 200k 2k",
        "write -P 7 300k 200k",
        "write -P 8 1500 10",
        "write -z 301k 10k",
        "write -z -u 2M 64k",
        "discard 3M 64k",
    ]
    .iter()
    .map(|c| c.to_string())
    .collect();
    twin(d, "ours.qcow2", "theirs.qcow2", &cmds);
    let map = |name: &str| -> Vec<serde_json::Value> {
        let out = qemu_img_in(d, ["map", "--output=json", name]).ok().stdout;
        let mut v: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        for e in &mut v {
            e.as_object_mut().unwrap().remove("offset");
        }
        v
    };
    assert_eq!(map("ours.qcow2"), map("theirs.qcow2"));
}

#[test]
fn convert_with_b_writes_only_the_differences_from_the_backing_file() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-f", "qcow2", "base.qcow2", "8M"]).ok();
    qemu_io_in(d, ["-f", "qcow2", "-c", "write -P 1 0 8M", "base.qcow2"]).ok();
    qemu_img_in(d, ["create", "-f", "raw", "src.raw", "8M"]).ok();
    qemu_io_in(
        d,
        [
            "-f",
            "raw",
            "-c",
            "write -P 1 0 8M",
            "-c",
            "write -P 2 1M 10k",
            "-c",
            "write -z 3M 64k",
            "src.raw",
        ],
    )
    .ok();
    vmimg_in(
        d,
        [
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "src.raw",
            "out.qcow2",
        ],
    )
    .ok();
    qemu_img_in(d, ["check", "out.qcow2"]).ok();
    qemu_img_in(
        d,
        [
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            "src.raw",
            "out.qcow2",
        ],
    )
    .ok();
    let check = qemu_img_in(d, ["check", "--output=json", "out.qcow2"])
        .ok()
        .stdout;
    let v: serde_json::Value = serde_json::from_str(&check).unwrap();
    // Only the two changed areas (one or two clusters each) are allocated in the output.
    assert!(v["allocated-clusters"].as_u64().unwrap() <= 4, "{check}");
}

/// Real process kills: `vmimg io` killed with SIGKILL at random moments during a workload
/// leaves an image that `qemu-img check` finds free of corruption, with everything written
/// before the last completed `flush` intact.
#[test]
fn sigkill_during_a_workload_keeps_flushed_writes_and_consistency() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempdir();
    let d = dir.path();
    let mut rng = fastrand::Rng::with_seed(4242);
    let size = 16u64 << 20;
    for round in 0..12 {
        let img = d.join(format!("k{round}.qcow2"));
        let _ = std::fs::remove_file(&img);
        let opts = ["cluster_size=4k", "lazy_refcounts=on", "", "extended_l2=on"][round % 4];
        let mut args = vec!["create", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&img), "16M"]);
        vmimg(&args).ok();
        // Writes of distinct bytes; after every few, a flush followed by `length`, whose
        // output line proves the flush completed.
        let mut cmds: Vec<(u64, u64, u8)> = Vec::new();
        let mut lines = Vec::new();
        for i in 0..400u64 {
            let len = rng.u64(1..40_000);
            let off = rng.u64(0..size - len);
            let byte = (i % 250 + 1) as u8;
            cmds.push((off, len, byte));
            lines.push(format!("write -P {byte} {off} {len}"));
            if i % 5 == 4 {
                lines.push("flush".into());
                lines.push("length".into());
            }
        }
        let mut cmd = Command::new(vmimg_bin());
        cmd.args(["io", "-f", "qcow2"]);
        for l in &lines {
            cmd.args(["-c", l]);
        }
        let mut child = cmd
            .arg(&img)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let delay = std::time::Duration::from_millis(rng.u64(5..200));
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => out.push(l),
                    Err(_) => break,
                }
            }
            out
        });
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        let out = reader.join().unwrap();
        // Writes completed, and how many of them a completed flush covers.
        let mut completed = 0usize;
        let mut synced = 0usize;
        for l in &out {
            if l.starts_with("wrote ") {
                completed += 1;
            } else if l.ends_with("MiB") && !l.contains("ops") {
                synced = completed;
            }
        }
        eprintln!("round {round}: {completed} writes done, {synced} synced, delay {delay:?}");
        let check = qemu_img(["check", "-f", "qcow2", s(&img)]);
        // A lazy-refcount image killed mid-write is dirty: QEMU repairs it on open, so
        // check it with repair like QEMU would; others must be clean but may leak.
        if opts.contains("lazy") {
            qemu_img(["check", "-r", "all", "-f", "qcow2", s(&img)]);
            let again = qemu_img(["check", "-f", "qcow2", s(&img)]);
            assert!(
                matches!(again.status, 0 | 3),
                "round {round}: {}",
                again.stdout
            );
        } else {
            assert!(
                matches!(check.status, 0 | 3),
                "round {round} ({opts}): {}{}",
                check.stdout,
                check.stderr
            );
        }
        // Every synced write not overwritten by any later (possibly partial) write.
        let mut qio = vec!["-r".to_string(), "-f".into(), "qcow2".into()];
        for (i, &(off, len, byte)) in cmds.iter().enumerate().take(synced) {
            let mut ranges = vec![(off, off + len)];
            for &(o2, l2, _) in &cmds[i + 1..(completed + 1).min(cmds.len())] {
                ranges = ranges
                    .into_iter()
                    .flat_map(|(a, b)| {
                        let (c, e) = (o2, o2 + l2);
                        let mut v = Vec::new();
                        if a < c.min(b) {
                            v.push((a, c.min(b)));
                        }
                        if e.max(a) < b {
                            v.push((e.max(a), b));
                        }
                        v
                    })
                    .collect();
            }
            for (a, b) in ranges {
                qio.extend(["-c".into(), format!("read -q -P {byte} {a} {}", b - a)]);
            }
        }
        if qio.len() > 3 {
            qio.push(s(&img).to_string());
            let r = qemu_io(&qio);
            assert_eq!(
                r.status, 0,
                "round {round} ({opts}): {synced} synced writes of {completed}: {}",
                r.stdout
            );
        }
    }
}
