//! Behaviour a qemu-img user relies on, checked side by side with QEMU's tools: backing
//! files, data bugs found by QEMU's test suite, convert's options, bad input, and messages.

mod common;

use common::*;

/// `info` on an overlay whose backing file is missing shows the image, naming the backing
/// file, as qemu-img does (which opens no backing file for info); `--backing-chain` fails
/// in both.
#[test]
fn info_works_when_the_backing_file_is_missing() {
    let dir = tempdir();
    let img = dir.path().join("top.qcow2");
    qemu_img([
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "/nonexistent/base.raw",
        "-F",
        "raw",
        s(&img),
        "1M",
    ])
    .ok();
    let ours = vmimg(["info", "--output=json", s(&img)]).ok();
    let theirs = qemu_img(["info", "--output=json", s(&img)]).ok();
    let ours: serde_json::Value = serde_json::from_str(&ours.stdout).unwrap();
    let theirs: serde_json::Value = serde_json::from_str(&theirs.stdout).unwrap();
    for key in [
        "backing-filename",
        "full-backing-filename",
        "backing-filename-format",
        "virtual-size",
        "format",
    ] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    let human = vmimg(["info", s(&img)]).ok();
    assert!(
        human.stdout.contains("backing file: /nonexistent/base.raw"),
        "{}",
        human.stdout
    );
    assert_eq!(vmimg(["info", "--backing-chain", s(&img)]).status, 1);
    assert_eq!(qemu_img(["info", "--backing-chain", s(&img)]).status, 1);
}

/// qemu-img 10 refuses a backing file without its format, in create (with the probed
/// format as a hint), rebase (safe and -u) and convert -B; so does vmimg, with the same
/// words, and nothing is created or changed.
#[test]
fn a_backing_file_needs_its_format() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]).ok();
    qemu_img_in(d, ["create", "-q", "-f", "qcow2", "top.qcow2", "1M"]).ok();
    let top_before = std::fs::read(d.join("top.qcow2")).unwrap();
    let cases: &[&[&str]] = &[
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "new.qcow2",
            "1M",
        ],
        &[
            "create",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "new.qcow2",
            "1M",
        ],
        &["rebase", "-b", "base.qcow2", "top.qcow2"],
        &["rebase", "-u", "-b", "base.qcow2", "top.qcow2"],
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "top.qcow2",
            "new.qcow2",
        ],
    ];
    for args in cases {
        let q = qemu_img_in(d, *args);
        let v = vmimg_in(d, *args);
        assert_eq!(q.status, 1, "{args:?}: {q:?}");
        assert_eq!(v.status, 1, "{args:?}: {v:?}");
        // The same words after each tool's prefix.
        let strip = |e: &str, tool: &str| e.trim().trim_start_matches(tool).to_string();
        assert_eq!(
            strip(&v.stderr, "vmimg: "),
            strip(&q.stderr, "qemu-img: "),
            "{args:?}"
        );
        assert!(!d.join("new.qcow2").exists(), "{args:?} created a file");
    }
    assert!(std::fs::read(d.join("top.qcow2")).unwrap() == top_before);
}

/// `convert -c -B base`: zero clusters of the source over data in the base are written as
/// zeros (before, they were left out and the output read the base's data there).
#[test]
fn compressed_convert_with_a_backing_file_keeps_the_sources_zeros() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]).ok();
    qemu_io_in(d, ["-f", "qcow2", "-c", "write -P 0x11 0 4M", "base.qcow2"]).ok();
    qemu_img_in(
        d,
        [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "src.qcow2",
        ],
    )
    .ok();
    qemu_io_in(
        d,
        [
            "-f",
            "qcow2",
            "-c",
            "write -z 0 1M",
            "-c",
            "write -P 0x33 1M 64k",
            "-c",
            "write -P 0x11 2M 64k",
            "src.qcow2",
        ],
    )
    .ok();
    for compress in [true, false] {
        let mut args = vec!["convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"];
        if compress {
            args.push("-c");
        }
        args.extend(["src.qcow2", "out.qcow2"]);
        vmimg_in(d, &args).ok();
        qemu_img_in(d, ["compare", "src.qcow2", "out.qcow2"]).ok();
        qemu_img_in(d, ["check", "out.qcow2"]).ok();
        // The zeros are the output's own; what equals the base is not copied.
        let map = qemu_img_in(d, ["map", "--output=json", "out.qcow2"]).ok();
        assert!(
            map.stdout.contains(
                "\"start\": 0, \"length\": 1048576, \"depth\": 0, \"present\": true, \"zero\": true"
            ) && map.stdout.contains("\"depth\": 1"),
            "{}",
            map.stdout
        );
    }
}

/// `discard` on a compat=0.10 overlay keeps the data (v2 has no zero clusters, and
/// unmapping would show the backing file's data), as qemu-io does.
#[test]
fn discard_on_a_v2_overlay_keeps_the_data_like_qemu_io() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(
        d,
        [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "base.qcow2",
            "4M",
        ],
    )
    .ok();
    qemu_io_in(d, ["-f", "qcow2", "-c", "write -P 0x11 0 4M", "base.qcow2"]).ok();
    for (tool, name) in [("qemu", "q.qcow2"), ("vmimg", "v.qcow2")] {
        qemu_img_in(
            d,
            [
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                name,
            ],
        )
        .ok();
        qemu_io_in(d, ["-f", "qcow2", "-c", "write -P 0x22 0 1M", name]).ok();
        let cmds = [
            "-f",
            "qcow2",
            "-c",
            "discard 0 1M",
            "-c",
            "discard 0 64k",
            name,
        ];
        match tool {
            "qemu" => qemu_io_in(d, cmds).ok(),
            _ => vmimg_in(d, ["io"].iter().chain(cmds.iter())).ok(),
        };
        qemu_io_in(d, ["-f", "qcow2", "-c", "read -P 0x22 0 1M", name]).ok();
    }
    qemu_img_in(d, ["compare", "q.qcow2", "v.qcow2"]).ok();
}

/// `amend` checks every option before changing anything: a refused amend leaves the image
/// byte for byte as it was (before, `size=2M,refcount_bits=3` failed after resizing).
/// qemu-img refuses the same combinations.
#[test]
fn a_refused_amend_changes_nothing() {
    let dir = tempdir();
    let img = dir.path().join("img.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&img), "1M"]).ok();
    qemu_io(["-f", "qcow2", "-c", "write -P 0x5 0 64k", s(&img)]).ok();
    let refused = [
        "size=2M,refcount_bits=3",
        "size=2M,compat=0.10,refcount_bits=8",
        "size=2M,compat=0.10,lazy_refcounts=on",
        "size=2M,compat=2.0",
    ];
    for opts in refused {
        let before = std::fs::read(&img).unwrap();
        let q = qemu_img(["amend", "-o", opts, s(&img)]);
        assert_eq!(q.status, 1, "qemu-img accepted {opts}");
        assert!(std::fs::read(&img).unwrap() == before);
        let v = vmimg(["amend", "-o", opts, s(&img)]);
        assert_eq!(v.status, 1, "vmimg accepted {opts}");
        assert!(
            std::fs::read(&img).unwrap() == before,
            "a refused amend ({opts}) changed the image"
        );
    }
    // The first one in qemu-img's words.
    let v = vmimg(["amend", "-o", "size=2M,refcount_bits=3", s(&img)]);
    assert!(
        v.stderr
            .contains("Refcount width must be a power of two and may not exceed 64 bits"),
        "{}",
        v.stderr
    );
    vmimg(["amend", "-o", "size=2M,refcount_bits=8", s(&img)]).ok();
    qemu_img(["check", s(&img)]).ok();
}

/// After a vmimg write, QEMU considers the image's persistent bitmaps stale (their
/// autoclear bit is cleared) and lists none: neither does `vmimg info`, in a new process
/// or in the one that wrote.
#[test]
fn info_lists_the_bitmaps_qemu_will_see() {
    let dir = tempdir();
    let img = dir.path().join("img.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&img), "16M"]).ok();
    qemu_img(["bitmap", "--add", s(&img), "b0"]).ok();
    let before = vmimg(["info", s(&img)]).ok();
    assert!(before.stdout.contains("name: b0"), "{}", before.stdout);
    vmimg(["io", "-c", "write 0 64k", s(&img)]).ok();
    let theirs = qemu_img(["info", "-U", s(&img)]).ok();
    let ours = vmimg(["info", s(&img)]).ok();
    assert!(!theirs.stdout.contains("bitmaps:"), "{}", theirs.stdout);
    assert!(!ours.stdout.contains("bitmaps:"), "{}", ours.stdout);

    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let img2 = dir.path().join("img2.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&img2), "16M"]).ok();
    qemu_img(["bitmap", "--add", s(&img2), "b1"]).ok();
    rt.block_on(async {
        let image = vmimg::ImageOpen::path(&img2)
            .format(vmimg::Format::QCOW2)
            .writable(true)
            .open()
            .await
            .unwrap();
        let bitmaps = |image: &vmimg::Image| {
            let desc = image.describe();
            let listed = desc
                .format_specific
                .as_ref()
                .and_then(|f| f.get("bitmaps"))
                .is_some();
            assert_eq!(listed, !desc.bitmaps.is_empty());
            desc.bitmaps.len()
        };
        assert_eq!(bitmaps(&image), 1);
        image.write(0, &[1u8; 512]).await.unwrap();
        assert_eq!(bitmaps(&image), 0, "the writer still lists stale bitmaps");
        image.flush().await.unwrap();
    });
}

/// `-p` prints qemu-img's progress lines on stdout, also into a pipe.
#[test]
fn convert_progress_is_qemu_imgs() {
    let dir = tempdir();
    let src = dir.path().join("src.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&src), "16M"]).ok();
    qemu_io(["-f", "qcow2", "-c", "write -P 1 0 8M", s(&src)]).ok();
    for extra in [&[][..], &["-c"]] {
        let mut args = vec!["convert", "-p", "-O", "qcow2"];
        args.extend(extra);
        let out = dir.path().join("out.qcow2");
        args.extend([s(&src), s(&out)]);
        let r = vmimg(&args).ok();
        assert!(r.stdout.starts_with("    (0.00/100%)\r"), "{:?}", r.stdout);
        assert!(
            r.stdout
                .ends_with("    (100.00/100%)\r    (100.00/100%)\r\n"),
            "{:?}",
            r.stdout
        );
        for piece in r.stdout.trim_end_matches('\n').split('\r') {
            if piece.is_empty() {
                continue;
            }
            let pct = piece
                .strip_prefix("    (")
                .and_then(|p| p.strip_suffix("/100%)"))
                .unwrap_or_else(|| panic!("not a progress line: {piece:?}"));
            let v: f64 = pct.parse().unwrap();
            assert!((0.0..=100.0).contains(&v));
        }
    }
}

/// `-S 0` writes every byte: the target is fully allocated, as qemu-img makes it.
#[test]
fn convert_s0_allocates_everything() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "qcow2", "src.qcow2", "4M"]).ok();
    qemu_io_in(d, ["-f", "qcow2", "-c", "write -P 1 1M 64k", "src.qcow2"]).ok();
    for (tool, out) in [("q", "q.qcow2"), ("v", "v.qcow2"), ("v", "v.raw")] {
        let fmt = if out.ends_with("raw") { "raw" } else { "qcow2" };
        let args = ["convert", "-S", "0", "-O", fmt, "src.qcow2", out];
        match tool {
            "q" => qemu_img_in(d, args).ok(),
            _ => vmimg_in(d, args).ok(),
        };
    }
    let map = |f: &str| qemu_img_in(d, ["map", "--output=json", f]).ok().stdout;
    assert_eq!(map("v.qcow2"), map("q.qcow2"));
    assert!(map("v.qcow2").contains("\"zero\": false, \"data\": true"));
    assert!(allocated(&d.join("v.raw")) >= 4 << 20);
    qemu_img_in(d, ["compare", "src.qcow2", "v.qcow2"]).ok();
}

/// `-o backing_file=..,backing_fmt=..` is `-B`/`-F`: the same output as with -B.
#[test]
fn convert_backing_options_behave_as_b() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]).ok();
    qemu_io_in(d, ["-f", "qcow2", "-c", "write -P 0x11 0 4M", "base.qcow2"]).ok();
    qemu_img_in(d, ["create", "-q", "-f", "qcow2", "src.qcow2", "4M"]).ok();
    qemu_io_in(
        d,
        [
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 4M",
            "-c",
            "write -P 0x22 1M 64k",
            "src.qcow2",
        ],
    )
    .ok();
    vmimg_in(
        d,
        [
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "src.qcow2",
            "b.qcow2",
        ],
    )
    .ok();
    vmimg_in(
        d,
        [
            "convert",
            "-O",
            "qcow2",
            "-o",
            "backing_file=base.qcow2,backing_fmt=qcow2",
            "src.qcow2",
            "o.qcow2",
        ],
    )
    .ok();
    let map = |f: &str| qemu_img_in(d, ["map", "--output=json", f]).ok().stdout;
    assert_eq!(map("o.qcow2"), map("b.qcow2"));
    qemu_img_in(d, ["compare", "src.qcow2", "o.qcow2"]).ok();
    let info = qemu_img_in(d, ["info", "o.qcow2"]).ok();
    assert!(info.stdout.contains("backing file: base.qcow2"));
}

/// Options qemu-img refuses are refused with its words, and nothing is created.
#[test]
fn convert_refuses_what_qemu_img_refuses() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "qcow2", "src.qcow2", "1M"]).ok();
    let cases: &[&[&str]] = &[
        &["convert", "-m", "0", "-O", "raw", "src.qcow2", "out"],
        &["convert", "-m", "17", "-O", "raw", "src.qcow2", "out"],
        &[
            "convert",
            "-c",
            "-o",
            "preallocation=metadata",
            "-O",
            "qcow2",
            "src.qcow2",
            "out",
        ],
        &["convert", "-c", "-O", "raw", "src.qcow2", "out"],
        // Concatenation is refused before the missing backing format (iotest 122).
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "src.qcow2",
            "src.qcow2",
            "src.qcow2",
            "out",
        ],
        &[
            "convert",
            "-n",
            "-O",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "src.qcow2",
            "out",
        ],
    ];
    for args in cases {
        let q = qemu_img_in(d, *args);
        let v = vmimg_in(d, *args);
        assert_eq!(q.status, 1, "{args:?}");
        assert_eq!(v.status, 1, "{args:?}");
        assert_eq!(
            v.stderr.trim().trim_start_matches("vmimg: "),
            q.stderr.trim().trim_start_matches("qemu-img: "),
            "{args:?}"
        );
        assert!(!d.join("out").exists(), "{args:?} created the output");
    }
}

/// A size no file can have is refused before anything is printed or created (before, a
/// 0-byte file was left after "Formatting ...").
#[test]
fn create_validates_before_creating() {
    let dir = tempdir();
    for fmt in ["raw", "qcow2"] {
        for size in ["8E", "9E"] {
            let f = dir.path().join(format!("x.{fmt}"));
            let r = vmimg(["create", "-f", fmt, s(&f), size]);
            assert_eq!(r.status, 1);
            assert!(r.stdout.is_empty(), "{}", r.stdout);
            assert!(
                r.stderr.contains(
                    "Invalid image size specified. Must be between 0 and 9223372036854775807."
                ),
                "{}",
                r.stderr
            );
            assert!(!f.exists(), "{fmt} {size} left a file");
        }
        let f = dir.path().join(format!("y.{fmt}"));
        let opt = if fmt == "raw" {
            "preallocation=bogus"
        } else {
            "cluster_size=3k"
        };
        assert_eq!(
            vmimg(["create", "-f", fmt, "-o", opt, s(&f), "1M"]).status,
            1
        );
        assert!(!f.exists(), "{fmt} -o {opt} left a file");
    }
}

/// `--untrusted` holds for every command: check does not probe either.
#[test]
fn untrusted_check_does_not_probe() {
    let dir = tempdir();
    let img = dir.path().join("img.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&img), "1M"]).ok();
    let r = vmimg(["--untrusted", "check", s(&img)]);
    assert_eq!(r.status, 1, "{r:?}");
    assert!(r.stderr.contains("probing is unsafe"), "{}", r.stderr);
    vmimg(["--untrusted", "check", "-f", "qcow2", s(&img)]).ok();
}

/// qemu-io's request limit, with its words, instead of a buffer of the asked size; zeroing
/// with -n may cover terabytes, in bounded memory.
#[test]
fn io_refuses_requests_qemu_io_refuses_and_zeroes_terabytes() {
    let dir = tempdir();
    let img = dir.path().join("img.qcow2");
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M",
        s(&img),
        "4T",
    ])
    .ok();
    for cmd in [
        "write 0 3G",
        "read 0 3G",
        "writev 0 1G 1G 1G",
        "readv 0 1G 1G 1G",
        "discard 0 1T",
        "write -z 0 1T",
    ] {
        let q = qemu_io(["-f", "qcow2", "-c", cmd, s(&img)]);
        let v = vmimg(["io", "-f", "qcow2", "-c", cmd, s(&img)]);
        assert_eq!(v.stdout, q.stdout, "{cmd}");
    }
    let v = vmimg([
        "io",
        "-f",
        "qcow2",
        "-c",
        "write -P 5 1T 1M",
        "-c",
        "write -P 6 3T 1M",
        "-c",
        "write -z -n 0 3T",
        "-c",
        "read -P 0 1T 1M",
        "-c",
        "read -P 6 3T 1M",
        s(&img),
    ])
    .ok();
    assert!(!v.stdout.contains("verification failed"), "{}", v.stdout);
    qemu_img(["check", s(&img)]).ok();
}

/// `snapshot -l` prints nothing for an image without snapshots, as qemu-img.
#[test]
fn snapshot_list_of_an_image_without_snapshots_is_empty() {
    let dir = tempdir();
    let img = dir.path().join("img.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&img), "1M"]).ok();
    let q = qemu_img(["snapshot", "-l", s(&img)]).ok();
    let v = vmimg(["snapshot", "-l", s(&img)]).ok();
    assert_eq!(v.stdout, q.stdout);
    assert!(v.stdout.is_empty());
}

/// Each cause of an error is said once: no line of the error repeats another's text.
#[test]
fn errors_say_each_cause_once() {
    let dir = tempdir();
    let d = dir.path();
    // A qcow2 header with an impossible cluster size, a missing file, a missing backing
    // file, a read-only target directory.
    let mut bad = b"QFI\xfb\0\0\0\x03".to_vec();
    bad.resize(512, 0);
    bad[20..24].copy_from_slice(&3u32.to_be_bytes());
    std::fs::write(d.join("bad.qcow2"), &bad).unwrap();
    qemu_img_in(
        d,
        [
            "create",
            "-q",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "gone.raw",
            "-F",
            "raw",
            "top.qcow2",
            "1M",
        ],
    )
    .ok();
    let runs = [
        vmimg_in(d, ["info", "bad.qcow2"]),
        vmimg_in(d, ["info", "missing.qcow2"]),
        vmimg_in(d, ["convert", "-O", "raw", "top.qcow2", "out.raw"]),
        vmimg_in(d, ["info", "--backing-chain", "top.qcow2"]),
        vmimg_in(d, ["convert", "-O", "raw", "bad.qcow2", "/proc/out.raw"]),
    ];
    for r in runs {
        assert_ne!(r.status, 0);
        let lines: Vec<&str> = r.stderr.lines().collect();
        let first = lines[0];
        for l in &lines[1..] {
            let cause = l.trim().trim_start_matches("caused by: ");
            assert!(
                !first.contains(cause),
                "the cause is said twice:\n{}",
                r.stderr
            );
        }
    }
}

/// `Image::invalidate_cache` re-reads what another process changed: header (size, backing
/// file), L1 and L2 tables, snapshots. Before, it only dropped cached L2 tables.
#[test]
fn invalidate_cache_rereads_what_another_process_changed() {
    let dir = tempdir();
    let img = dir.path().join("img.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&img), "16M"]).ok();
    qemu_io(["-f", "qcow2", "-c", "write -P 1 0 64k", s(&img)]).ok();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let image = vmimg::ImageOpen::path(&img)
            .format(vmimg::Format::QCOW2)
            .force_share(true)
            .open()
            .await
            .unwrap();
        let mut buf = vec![0u8; 65536];
        image.read(0, &mut buf).await.unwrap();
        assert!(buf.iter().all(|&b| b == 1));
        // Another process resizes, writes (a new L2 table beyond the old end, in place at
        // 0), takes a snapshot and renames the backing file.
        qemu_img(["resize", "-f", "qcow2", s(&img), "1G"]).ok();
        qemu_io([
            "-f",
            "qcow2",
            "-c",
            "write -P 2 0 64k",
            "-c",
            "write -P 3 900M 64k",
            s(&img),
        ])
        .ok();
        qemu_img(["snapshot", "-c", "s1", s(&img)]).ok();
        qemu_img([
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "other.raw",
            "-F",
            "raw",
            s(&img),
        ])
        .ok();
        assert_eq!(
            image.size(),
            16 << 20,
            "the handle saw the change by itself"
        );
        image.invalidate_cache().await.unwrap();
        assert_eq!(image.size(), 1 << 30);
        image.read(0, &mut buf).await.unwrap();
        assert!(buf.iter().all(|&b| b == 2));
        image.read(900 << 20, &mut buf).await.unwrap();
        assert!(buf.iter().all(|&b| b == 3));
        let desc = image.describe();
        assert_eq!(desc.snapshots.len(), 1);
        assert_eq!(desc.snapshots[0].name, "s1");
        assert_eq!(desc.backing_filename.as_deref(), Some("other.raw"));
    });
}

/// Format options go through each format's schema: unknown names, values of the wrong type
/// and bad lists are refused with qemu-img's words (before "Formatting" and before any
/// file exists), and `-o help` lists what qemu-img lists (vmimg writes no encryption).
#[test]
fn format_options_are_checked_like_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    let cases: &[&[&str]] = &[
        &["create", "-f", "qcow2", "-o", "foo=bar", "x.qcow2", "1M"],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "cluster_size=4k",
            "x.raw",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=abc",
            "x.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=maybe",
            "x.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=x",
            "x.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            ",cluster_size=4k",
            "x.qcow2",
            "1M",
        ],
        &["create", "-f", "qcow2", "-o", "size=2M", "x.qcow2", "1M"],
        &["create", "-f", "qcow2", "-o", "compat=9", "x.qcow2", "1M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compression_type=lz4",
            "x.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=bogus",
            "x.qcow2",
            "1M",
        ],
        &["create", "-f", "foo", "x.foo", "1M"],
        &[
            "create", "-f", "raw", "-b", "base", "-F", "raw", "x.raw", "1M",
        ],
    ];
    for args in cases {
        let q = qemu_img_in(d, *args);
        let v = vmimg_in(d, *args);
        assert_eq!(q.status, 1, "{args:?}: {q:?}");
        assert_eq!(v.status, 1, "{args:?}: {v:?}");
        assert_eq!(v.stdout, q.stdout, "{args:?}");
        assert_eq!(
            v.stderr.trim().trim_start_matches("vmimg: "),
            q.stderr.trim().trim_start_matches("qemu-img: "),
            "{args:?}"
        );
        for f in ["x.qcow2", "x.raw", "x.foo"] {
            assert!(!d.join(f).exists(), "{args:?} left {f}");
        }
    }
    // -o help: qemu-img's lines, less the encryption options vmimg does not write.
    for fmt in ["qcow2", "raw"] {
        let q = qemu_img(["create", "-f", fmt, "-o", "help"]).ok();
        let v = vmimg(["create", "-f", fmt, "-o", "help"]).ok();
        let theirs: Vec<&str> = q
            .stdout
            .lines()
            .filter(|l| l.starts_with("  ") && !l.contains("encrypt"))
            .collect();
        let ours: Vec<&str> = v.stdout.lines().filter(|l| l.starts_with("  ")).collect();
        if fmt == "raw" {
            // vmimg's raw creation takes preallocation itself (qemu-img's file protocol).
            assert!(ours.contains(&theirs[0]) && ours.len() == 2, "{}", v.stdout);
        } else {
            assert_eq!(ours, theirs);
        }
    }
}

/// amend checks its options against what the format can change, with qemu-img's words.
#[test]
fn amend_options_are_checked_like_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]).ok();
    qemu_img_in(d, ["create", "-q", "-f", "raw", "a.raw", "1M"]).ok();
    let cases: &[&[&str]] = &[
        &["amend", "-o", "cluster_size=4k", "a.qcow2"],
        &["amend", "-o", "foo=bar", "a.qcow2"],
        &["amend", "-o", "backing_file=x", "a.qcow2"],
        &["amend", "-o", "preallocation=full", "a.qcow2"],
        &["amend", "-f", "raw", "-o", "size=2M", "a.raw"],
    ];
    for args in cases {
        let before = std::fs::read(d.join(args[args.len() - 1])).unwrap();
        let q = qemu_img_in(d, *args);
        let v = vmimg_in(d, *args);
        assert_eq!((q.status, v.status), (1, 1), "{args:?}");
        assert_eq!(
            v.stderr.trim().trim_start_matches("vmimg: "),
            q.stderr.trim().trim_start_matches("qemu-img: "),
            "{args:?}"
        );
        assert!(std::fs::read(d.join(args[args.len() - 1])).unwrap() == before);
    }
    let q = qemu_img(["amend", "-f", "qcow2", "-o", "help"]).ok();
    let v = vmimg(["amend", "-f", "qcow2", "-o", "help"]).ok();
    let theirs: Vec<&str> = q
        .stdout
        .lines()
        .filter(|l| !l.contains("encrypt"))
        .collect();
    assert_eq!(v.stdout.lines().collect::<Vec<_>>(), theirs);
}

/// qemu-img's size rounding and compare's size warning, as QEMU's own test suite checks
/// them (iotests 104 and 048): a qcow2 image of 1234 bytes is 1536; "Image size mismatch"
/// comes only once the common part compared equal.
#[test]
fn sizes_round_to_sectors_and_compare_warns_after_the_common_part() {
    let dir = tempdir();
    let d = dir.path();
    for tool in ["q", "v"] {
        let args = ["create", "-q", "-f", "qcow2", "small.qcow2", "1234"];
        if tool == "q" {
            qemu_img_in(d, args).ok();
        } else {
            vmimg_in(d, args).ok();
        }
        let out = qemu_img_in(d, ["info", "small.qcow2"]).ok();
        assert!(
            out.stdout.contains("virtual size: 1.5 KiB (1536 bytes)"),
            "{tool}: {}",
            out.stdout
        );
    }
    qemu_img_in(d, ["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]).ok();
    qemu_img_in(d, ["create", "-q", "-f", "qcow2", "b.qcow2", "2M"]).ok();
    let mut cases = vec![];
    for writes in [&[][..], &["write -P 1 0 4k"], &["write -P 1 1536k 4k"]] {
        let mut args = vec!["-c".to_string(), "write -P 0 0 1".to_string()];
        for w in writes {
            args.extend(["-c".to_string(), w.to_string()]);
        }
        args.push("b.qcow2".into());
        qemu_io_in(d, &args).ok();
        let q = qemu_img_in(d, ["compare", "a.qcow2", "b.qcow2"]);
        let v = vmimg_in(d, ["compare", "a.qcow2", "b.qcow2"]);
        assert_eq!((v.status, &v.stdout), (q.status, &q.stdout), "{writes:?}");
        cases.push(q.stdout);
    }
    assert!(cases[0].contains("Warning: Image size mismatch!"));
    assert!(!cases[1].contains("Warning"), "{}", cases[1]);
}

/// resize's messages as qemu-img's (iotest 292): `--shrink` shrinks without a warning;
/// without it, the refusal and then the warning.
#[test]
fn resize_shrink_messages_match_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    for img in ["q.qcow2", "v.qcow2"] {
        qemu_img_in(d, ["create", "-q", "-f", "qcow2", img, "8M"]).ok();
    }
    for args in [
        &["resize", "IMG", "4M"][..],
        &["resize", "--shrink", "IMG", "4M"],
    ] {
        let with = |img: &'static str| -> Vec<&str> {
            args.iter()
                .map(|a| if *a == "IMG" { img } else { *a })
                .collect()
        };
        let q = qemu_img_in(d, with("q.qcow2"));
        let v = vmimg_in(d, with("v.qcow2"));
        assert_eq!((v.status, &v.stdout), (q.status, &q.stdout), "{args:?}");
        assert_eq!(v.stderr.replace("vmimg", "qemu-img"), q.stderr, "{args:?}");
    }
}

/// `info --backing-chain` on a chain that loops (iotest 043): qemu-img's words, naming
/// the backing file met a second time, and no image printed.
#[test]
fn info_backing_chain_loop_message_matches_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    let abs = |n: &str| s(&d.join(n)).to_string();
    for (img, backing) in [("self.qcow2", "self.qcow2"), ("b.qcow2", "a.qcow2")] {
        qemu_img_in(d, ["create", "-q", "-f", "qcow2", img, "1M"]).ok();
        if img == "b.qcow2" {
            qemu_img_in(d, ["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]).ok();
            qemu_img_in(
                d,
                [
                    "rebase",
                    "-u",
                    "-F",
                    "qcow2",
                    "-b",
                    &abs("b.qcow2"),
                    "a.qcow2",
                ],
            )
            .ok();
        }
        qemu_img_in(d, ["rebase", "-u", "-F", "qcow2", "-b", &abs(backing), img]).ok();
        for name in [img.to_string(), abs(img)] {
            let q = qemu_img_in(d, ["info", "--backing-chain", &name]);
            let v = vmimg_in(d, ["info", "--backing-chain", &name]);
            assert_eq!(q.status, 1, "{q:?}");
            assert_eq!((v.status, &v.stdout), (q.status, &q.stdout), "{name}");
            assert_eq!(
                v.stderr.strip_prefix("vmimg: "),
                q.stderr.strip_prefix("qemu-img: "),
                "{name}"
            );
        }
    }
}

/// commit of zeros releases the base's clusters, as qemu-img 10 does (iotest 313): check
/// then counts no allocated cluster, and map agrees.
#[test]
fn commit_of_zeros_unmaps_the_bases_clusters() {
    let dir = tempdir();
    let d = dir.path();
    for tool in ["q", "v"] {
        let base = format!("{tool}.base.qcow2");
        let top = format!("{tool}.qcow2");
        qemu_img_in(d, ["create", "-q", "-f", "qcow2", &base, "1M"]).ok();
        qemu_io_in(d, ["-f", "qcow2", "-c", "write -P 1 0 1M", &base]).ok();
        qemu_img_in(
            d,
            [
                "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &base, &top,
            ],
        )
        .ok();
        qemu_io_in(d, ["-f", "qcow2", "-c", "write -z 0 768k", &top]).ok();
        let args = ["commit", "-q", top.as_str()];
        match tool {
            "q" => qemu_img_in(d, args).ok(),
            _ => vmimg_in(d, args).ok(),
        };
    }
    for cmd in [&["check"][..], &["map", "--output=json"]] {
        let run = |img: &str| {
            let mut args = cmd.to_vec();
            args.push(img);
            qemu_img_in(d, args).ok().stdout
        };
        assert_eq!(run("v.base.qcow2"), run("q.base.qcow2"), "{cmd:?}");
    }
}

/// The file options qemu-img takes with any format's (iotest 243): `extent_size_hint` and
/// `nocow` are accepted, shown in the "Formatting" line where qemu-img shows them, and a
/// hint above 4 GiB is refused after it. The new files are qemu-img's byte for byte (a
/// qcow2 image without preallocation ends right after its L1 table).
#[test]
fn create_takes_the_file_options_as_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    let cases: &[&[&str]] = &[
        &[
            "-f",
            "qcow2",
            "-o",
            "preallocation=off,extent_size_hint=0",
            "IMG",
            "64M",
        ],
        &[
            "-f",
            "qcow2",
            "-o",
            "nocow=on,extent_size_hint=4k",
            "IMG",
            "1T",
        ],
        &[
            "-f",
            "qcow2",
            "-o",
            "data_file=IMG.data,extent_size_hint=0",
            "IMG",
            "64M",
        ],
        &["-f", "qcow2", "-o", "preallocation=metadata", "IMG", "4M"],
        &["-f", "qcow2", "IMG", "0"],
        &[
            "-f",
            "raw",
            "-o",
            "size=1M,nocow=on,preallocation=off,extent_size_hint=0",
            "IMG",
        ],
        &["-f", "raw", "-o", "extent_size_hint=8G", "IMG", "1M"],
        &["-f", "vpc", "-o", "extent_size_hint=1M", "IMG", "1M"],
        &["-f", "qcow2", "-o", "extent_size_hint=x", "IMG", "1M"],
    ];
    let (qd, vd) = (d.join("q"), d.join("v"));
    for sub in [&qd, &vd] {
        std::fs::create_dir(sub).unwrap();
    }
    for args in cases {
        let args: Vec<&str> = std::iter::once("create")
            .chain(args.iter().copied())
            .collect();
        let args: Vec<String> = args.iter().map(|a| a.replace("IMG", "t.img")).collect();
        let q = qemu_img_in(&qd, &args);
        let v = vmimg_in(&vd, &args);
        assert_eq!((v.status, &v.stdout), (q.status, &q.stdout), "{args:?}");
        assert_eq!(
            v.stderr.strip_prefix("vmimg: "),
            q.stderr.strip_prefix("qemu-img: "),
            "{args:?}"
        );
        for name in ["t.img", "t.img.data"] {
            let (ours, theirs) = (vd.join(name), qd.join(name));
            assert_eq!(ours.exists(), theirs.exists(), "{args:?}");
            if theirs.exists() && !args.contains(&"vpc".to_string()) {
                compare_files(&ours, &theirs).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            }
            let _ = (std::fs::remove_file(ours), std::fs::remove_file(theirs));
        }
    }
}

/// convert -n -B: the backing file needs no format, since nothing is created (iotest
/// 122); and -c -S 0 allocates everything, zeros as compressed clusters, as qemu-img.
#[test]
fn convert_n_with_b_and_compressed_s0_match_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]).ok();
    qemu_img_in(d, ["create", "-q", "-f", "qcow2", "src.qcow2", "1000k"]).ok();
    let writes = ["-c", "write -P 0x22 0 100k", "-c", "write -z 300k 64k"];
    qemu_io_in(d, [&writes[..], &["src.qcow2"]].concat()).ok();
    for tool in ["q", "v"] {
        let out = format!("{tool}.qcow2");
        qemu_img_in(d, ["create", "-q", "-f", "qcow2", &out, "1000k"]).ok();
        let n_b = [
            "convert",
            "-n",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "src.qcow2",
            &out,
        ];
        let c_s0 = ["convert", "-c", "-S", "0", "-O", "qcow2", "src.qcow2", &out];
        for args in [&n_b[..], &c_s0] {
            let r = match tool {
                "q" => qemu_img_in(d, args),
                _ => vmimg_in(d, args),
            };
            assert_eq!((r.status, r.stderr.as_str()), (0, ""), "{tool} {args:?}");
        }
    }
    for cmd in [&["check"][..], &["map", "--output=json"]] {
        let run = |img: &str| qemu_img_in(d, [cmd, &[img]].concat()).ok().stdout;
        assert_eq!(run("v.qcow2"), run("q.qcow2"), "{cmd:?}");
    }
}

/// rebase -c (iotest 314): the clusters the rebase copies are written compressed, those
/// past the old backing file's end as zeros; formats without compressed clusters refuse
/// it with qemu-img's words. The results equal qemu-img's in check, map and content.
#[test]
fn rebase_compressed_matches_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "raw", "r.raw", "1M"]).ok();
    let refuse = ["rebase", "-c", "-f", "raw", "-b", "", "r.raw"];
    let (q, v) = (qemu_img_in(d, refuse), vmimg_in(d, refuse));
    assert_eq!((v.status, &v.stdout), (q.status, &q.stdout));
    assert_eq!(
        v.stderr.strip_prefix("vmimg: "),
        q.stderr.strip_prefix("qemu-img: ")
    );
    // base: compressed data in the first half and a short raw tail; top: the second half,
    // one cluster of which is only partly backed (the base is shorter than the top).
    for tool in ["q", "v"] {
        let (base, top) = (format!("{tool}.base"), format!("{tool}.top"));
        qemu_img_in(d, ["create", "-q", "-f", "qcow2", &base, "1000k"]).ok();
        let w = [
            "-c",
            "write -c -P 0xaa 0 256k",
            "-c",
            "write -P 0xab 900k 1k",
        ];
        qemu_io_in(d, [&w[..], &[base.as_str()]].concat()).ok();
        qemu_img_in(
            d,
            [
                "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &base, &top, "2M",
            ],
        )
        .ok();
        qemu_io_in(d, ["-c", "write -c -P 0xbb 512k 128k", &top]).ok();
        let args = ["rebase", "-c", "-f", "qcow2", "-b", "", top.as_str()];
        let r = match tool {
            "q" => qemu_img_in(d, args),
            _ => vmimg_in(d, args),
        };
        assert_eq!((r.status, r.stderr.as_str()), (0, ""), "{tool}");
    }
    for cmd in [&["check"][..], &["map", "--output=json"]] {
        let run = |img: &str| qemu_img_in(d, [cmd, &[img]].concat()).ok().stdout;
        assert_eq!(run("v.top"), run("q.top"), "{cmd:?}");
    }
    qemu_img_in(
        d,
        ["compare", "-f", "qcow2", "-F", "qcow2", "v.top", "q.top"],
    )
    .ok();
}

/// qemu-io's write -c: whole clusters written compressed; unaligned requests and formats
/// without compressed clusters refused as qemu-io refuses them.
#[test]
fn io_write_compressed_matches_qemu_io() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "raw", "r.raw", "1M"]).ok();
    for img in ["q.qcow2", "v.qcow2"] {
        qemu_img_in(d, ["create", "-q", "-f", "qcow2", img, "1000k"]).ok();
    }
    let cmds = [
        "write -c 512 64k",
        "write -c 0 1000",
        "write -c 1000 512",
        "write -c -P 0x11 960k 40k",
        "write -c -z 0 64k",
        "write -c -P 0x22 64k 128k",
    ];
    for cmd in cmds {
        let q = qemu_io_in(d, ["-f", "qcow2", "-c", cmd, "q.qcow2"]);
        let v = vmimg_in(d, ["io", "-f", "qcow2", "-c", cmd, "v.qcow2"]);
        assert_eq!(io_data_lines(&v.stdout), io_data_lines(&q.stdout), "{cmd}");
    }
    let cmd = "write -c 0 64k";
    let q = qemu_io_in(d, ["-f", "raw", "-c", cmd, "r.raw"]);
    let v = vmimg_in(d, ["io", "-f", "raw", "-c", cmd, "r.raw"]);
    assert_eq!(io_data_lines(&v.stdout), io_data_lines(&q.stdout));
    for cmd in [&["check"][..], &["map", "--output=json"]] {
        let run = |img: &str| qemu_img_in(d, [cmd, &[img]].concat()).ok().stdout;
        assert_eq!(run("v.qcow2"), run("q.qcow2"), "{cmd:?}");
    }
}

/// A refcount table entry that is not cluster-aligned, met while allocating (iotest 305):
/// the image is marked corrupt with qemu-io's notice on stderr and the write fails with
/// EIO, as in QEMU.
#[test]
fn unaligned_refblock_marks_the_image_corrupt_as_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let bin = d.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(vmimg_bin(), bin.join("qemu-io")).unwrap();
    for img in ["q.qcow2", "v.qcow2"] {
        let o = "refcount_bits=64,cluster_size=1k";
        qemu_img_in(d, ["create", "-q", "-f", "qcow2", "-o", o, img, "1M"]).ok();
        for cmd in ["write 0 124k", "discard 121k 1k", "discard 123k 1k"] {
            qemu_io_in(d, ["-c", cmd, img]).ok();
        }
        let path = d.join(img);
        let mut bytes = std::fs::read(&path).unwrap();
        let table = u64::from_be_bytes(bytes[48..56].try_into().unwrap()) as usize;
        bytes[table + 14] = 6;
        std::fs::write(&path, bytes).unwrap();
    }
    let args = |img: &'static str| ["-c", "write 121k 3k", img];
    let q = qemu_io_in(d, args("q.qcow2"));
    let v: Run = std::process::Command::new(bin.join("qemu-io"))
        .args(args("v.qcow2"))
        .current_dir(d)
        .output()
        .unwrap()
        .into();
    assert!(
        q.stderr.contains("Refblock offset 0x20600 unaligned"),
        "{}",
        q.stderr
    );
    assert_eq!(v.stderr, q.stderr);
    assert_eq!(io_data_lines(&v.stdout), io_data_lines(&q.stdout));
    assert_eq!(v.status, q.status);
    // The corrupt bit is set in the header, as QEMU sets it.
    let features = |img: &str| std::fs::read(d.join(img)).unwrap()[72..80].to_vec();
    assert_eq!(features("v.qcow2"), features("q.qcow2"));
}

/// rebase compares and copies whole clusters, as qemu-img: a cluster whose old content
/// differs from the new backing file's is written with its old content (zeros as data
/// when the run read is not all zero, iotest 024), and only the clusters that differ
/// (iotest 252, where a cluster past the new backing file's data stays unallocated).
#[test]
fn rebase_copies_the_clusters_qemu_img_copies() {
    let dir = tempdir();
    let d = dir.path();
    // Size, then qemu-io commands for the old backing file, the new one and the image.
    type Case<'a> = (&'a str, &'a [&'a str], &'a [&'a str], &'a [&'a str]);
    let setups: [Case; 3] = [
        // 024: old 11 11 -- 11, new -- 22 22 11.
        (
            "1M",
            &["write -P 0x11 0 128k", "write -P 0x11 192k 64k"],
            &["write -P 0x22 64k 128k", "write -P 0x11 192k 64k"],
            &[],
        ),
        // 252: no old backing file; the new one has data in clusters 0, 2 and 4.
        (
            "384k",
            &[],
            &[
                "write -P 0x11 0 64k",
                "write -P 0x11 128k 64k",
                "write -P 0x11 256k 64k",
            ],
            &["write -P 0x22 0 128k", "write -P 0x11 128k 128k"],
        ),
        // Smaller than a copy chunk, the unallocated run made of several backing runs.
        (
            "384k",
            &["write -P 0x11 0 64k", "write -P 0x11 256k 64k"],
            &["write -P 0x11 0 64k"],
            &["write -P 0x33 320k 64k"],
        ),
    ];
    for (i, (size, old, new, top)) in setups.iter().enumerate() {
        for tool in ["q", "v"] {
            let name = |n: &str| format!("{tool}{i}.{n}");
            for (img, cmds) in [(name("old"), old), (name("new"), new)] {
                qemu_img_in(d, ["create", "-q", "-f", "qcow2", &img, size]).ok();
                for cmd in cmds.iter() {
                    qemu_io_in(d, ["-c", cmd, &img]).ok();
                }
            }
            let top_img = name("top");
            let mut create = vec!["create", "-q", "-f", "qcow2"];
            let old_name = name("old");
            if !old.is_empty() {
                create.extend(["-b", &old_name, "-F", "qcow2"]);
            }
            create.extend([&top_img[..], size]);
            qemu_img_in(d, &create).ok();
            for cmd in top.iter() {
                qemu_io_in(d, ["-c", cmd, &top_img]).ok();
            }
            let args = [
                "rebase",
                "-f",
                "qcow2",
                "-b",
                &name("new"),
                "-F",
                "qcow2",
                &top_img,
            ];
            if tool == "q" {
                qemu_img_in(d, args).ok();
            } else {
                vmimg_in(d, args).ok();
            }
        }
        let map = |t: &str| {
            qemu_img_in(d, ["map", "--output=json", &format!("{t}{i}.top")])
                .ok()
                .stdout
                .replace(&format!("{t}{i}."), "")
        };
        assert_eq!(map("v"), map("q"), "case {i}");
    }
}

/// convert -p moves as qemu-img's: by the data copied, one step per chunk (iotest 086:
/// four 1 MiB extents in 128 MiB print 25, 50, 75 and 100%), for qcow2 and raw sources;
/// an empty image goes from 0% to the last line.
#[test]
fn convert_progress_counts_the_data_copied() {
    let dir = tempdir();
    let d = dir.path();
    for (fmt, writes) in [("qcow2", 4), ("raw", 4), ("qcow2", 0)] {
        let src = format!("src{writes}.{fmt}");
        qemu_img_in(d, ["create", "-q", "-f", fmt, &src, "128M"]).ok();
        for at in ["0", "2M", "4M", "32M"].iter().take(writes) {
            qemu_io_in(d, ["-f", fmt, "-c", &format!("write {at} 1M"), &src]).ok();
        }
        let args = |out: &'static str| {
            ["convert", "-p", "-O", fmt, "-f", fmt, &src, out].map(String::from)
        };
        let theirs = qemu_img_in(d, args("q.out")).ok();
        let ours = vmimg_in(d, args("v.out")).ok();
        assert_eq!(ours.stdout, theirs.stdout, "{fmt}");
    }
}

/// Zeroing part of a cluster whose rest reads as zeros by its status (allocated nowhere,
/// or a zero cluster) zeroes the whole cluster, as QEMU does; data below the rest, or an
/// allocated cluster, makes it write zeros as data (iotests 154, 179).
#[test]
fn partial_zero_writes_zero_whole_clusters_as_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let base_writes = [
        "write -P 0x11 34k 1k",
        "write -P 0x11 43k 1k",
        "write -P 0x11 5k 1k",
    ];
    let top_writes = [
        "write -z 33k 1k",
        "write -z 41k 1k",
        "write -z 5k 2k",
        "write -z 1k 1k",
        "write -P 0x22 64k 4k",
        "write -z 65k 1k",
        "write -z 70k 10k",
        "write -z 128M 512",
    ];
    for tool in ["q", "v"] {
        let (base, top) = (format!("{tool}.base"), format!("{tool}.top"));
        let o = "cluster_size=512";
        qemu_img_in(d, ["create", "-q", "-f", "qcow2", "-o", o, &base, "128M"]).ok();
        for cmd in base_writes {
            qemu_io_in(d, ["-c", cmd, &base]).ok();
        }
        let o = "cluster_size=4k";
        let b = ["-b", &base[..], "-F", "qcow2"];
        qemu_img_in(
            d,
            [
                &["create", "-q", "-f", "qcow2", "-o", o][..],
                &b,
                &[&top, "134219776"],
            ]
            .concat(),
        )
        .ok();
        for cmd in top_writes {
            if tool == "q" {
                qemu_io_in(d, ["-c", cmd, &top]).ok();
            } else {
                vmimg_in(d, ["io", "-c", cmd, &top]).ok();
            }
        }
    }
    let map = |t: &str| {
        qemu_img_in(d, ["map", "--output=json", &format!("{t}.top")])
            .ok()
            .stdout
    };
    let strip = |m: String| {
        m.lines()
            .map(|l| l.split(", \"offset").next().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(map("v")), strip(map("q")));
}

/// iotest 250: a metadata-preallocated image is created with QEMU's bytes and holes, the
/// clusters a discard frees are reused by the next writes of the same session (host
/// offsets as QEMU's), map lists no preallocated zero clusters, and a shrink frees as much
/// space as qemu-img's.
#[test]
fn discarded_clusters_are_reused_and_shrink_frees_as_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let o = "cluster_size=1M,preallocation=metadata";
    qemu_img_in(
        d,
        ["create", "-q", "-f", "qcow2", "-o", o, "q.qcow2", "2100M"],
    )
    .ok();
    vmimg_in(
        d,
        ["create", "-q", "-f", "qcow2", "-o", o, "v.qcow2", "2100M"],
    )
    .ok();
    // The metadata: the first 5 MiB (past them the file is a hole in both).
    let head = |f: &str| {
        use std::io::Read;
        let mut b = vec![0u8; 5 << 20];
        std::fs::File::open(d.join(f))
            .unwrap()
            .read_exact(&mut b)
            .unwrap();
        (b, std::fs::metadata(d.join(f)).unwrap().len())
    };
    assert!(head("v.qcow2") == head("q.qcow2"));
    assert_eq!(allocated(&d.join("v.qcow2")), allocated(&d.join("q.qcow2")));
    let cmds = [
        "-c",
        "discard 0 10M",
        "-c",
        "discard 2090M 10M",
        "-c",
        "write 2090M 10M",
        "-c",
        "write 0 10M",
    ];
    qemu_io_in(d, [&cmds[..], &["q.qcow2"]].concat()).ok();
    vmimg_in(d, [&["io"][..], &cmds, &["v.qcow2"]].concat()).ok();
    let theirs = qemu_img_in(d, ["map", "q.qcow2"]).ok().stdout;
    let ours = vmimg_in(d, ["map", "v.qcow2"]).ok().stdout;
    assert_eq!(ours.replace("v.qcow2", "q.qcow2"), theirs);
    assert!(theirs.contains("0x82f00000"), "{theirs}");
    let before = [allocated(&d.join("q.qcow2")), allocated(&d.join("v.qcow2"))];
    qemu_img_in(d, ["resize", "-q", "--shrink", "q.qcow2", "5M"]).ok();
    vmimg_in(d, ["resize", "-q", "--shrink", "v.qcow2", "5M"]).ok();
    let after = [allocated(&d.join("q.qcow2")), allocated(&d.join("v.qcow2"))];
    assert_eq!(before[1] - after[1], before[0] - after[0]);
}
