//! Block-node options as QEMU's tools take them (`json:` file names, `--image-opts`,
//! qemu-io's `open -o`, `blkdebug:` error injection) and QEMU's words for images that do
//! not open: each case runs vmimg (as `qemu-img`/`qemu-io` through symlinks) and QEMU's own
//! tool on the same files and compares what they print.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

/// Exit status and both outputs (stderr first), with qemu-io's timing lines removed.
fn run(tool: &Path, args: &[&str], cwd: &Path) -> (i32, String) {
    let out = Command::new(tool)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let text = text
        .lines()
        .filter(|l| !l.contains("ops/sec"))
        .collect::<Vec<_>>()
        .join("\n");
    (out.status.code().unwrap_or(-1), text)
}

/// Runs `tool` (qemu-img or qemu-io) with `args` as vmimg and as QEMU, in `d`; asserts the
/// same status and output, and returns the output.
fn same(d: &Path, tool: &str, args: &[&str]) -> String {
    let mine = run(&d.join("bin").join(tool), args, d);
    let theirs = run(&qemu_tool(tool), args, d);
    assert_eq!(mine, theirs, "{tool} {args:?}: vmimg, then QEMU");
    mine.1
}

fn setup() -> tempfile::TempDir {
    let dir = tempdir();
    let d = dir.path();
    qemu_named_symlinks(d);
    qemu_img_in(d, ["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]).ok();
    qemu_io_in(d, ["-c", "write -P 0x5a 0 64k", "a.qcow2"]).ok();
    dir
}

#[test]
fn json_names_and_image_opts_open_the_image_they_describe() {
    let dir = setup();
    let d = dir.path();
    let json = "json:{'driver': 'qcow2', 'file': {'driver': 'file', 'filename': 'a.qcow2'}}";
    let out = same(d, "qemu-io", &["-c", "read -P 0x5a 0 64k", json]);
    assert!(out.contains("read 65536/65536 bytes at offset 0"), "{out}");
    let flat = "json:{\"driver\": \"qcow2\", \"file.filename\": \"a.qcow2\"}";
    same(d, "qemu-io", &["-r", "-c", "read -P 0 64k 64k", flat]);
    let opts = "driver=qcow2,file.driver=file,file.filename=a.qcow2";
    let out = same(
        d,
        "qemu-img",
        &["map", "--output=json", "--image-opts", opts],
    );
    assert!(out.contains("\"data\": true"), "{out}");
    same(
        d,
        "qemu-io",
        &["--image-opts", "-c", "read -P 0x5a 0 4k", opts],
    );
    same(
        d,
        "qemu-io",
        &[
            "-c",
            "open -o driver=qcow2 a.qcow2",
            "-c",
            "read -P 0x5a 0 4k",
        ],
    );
    // What does not open is refused with QEMU's words.
    same(
        d,
        "qemu-io",
        &[
            "-c",
            "read 0 4k",
            "json:{'driver': 'qcow2', 'file': {'driver': 'file', 'filename': 'nope'}}",
        ],
    );
    same(
        d,
        "qemu-io",
        &[
            "--image-opts",
            "-c",
            "read 0 4k",
            "driver=qcow2,file.driver=file,file.filename=a.qcow2,bogus=1",
        ],
    );
    same(d, "qemu-img", &["info", "nope:a.qcow2"]);
}

#[test]
fn blkdebug_fails_the_requests_its_rules_name() {
    let dir = setup();
    let d = dir.path();
    std::fs::write(
        d.join("read.conf"),
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nonce = \"on\"\n",
    )
    .unwrap();
    let out = same(
        d,
        "qemu-io",
        &[
            "-c",
            "read 0 4k",
            "-c",
            "read -P 0x5a 0 4k",
            "blkdebug:read.conf:a.qcow2",
        ],
    );
    assert!(out.contains("read failed: Input/output error"), "{out}");
    std::fs::write(
        d.join("write.conf"),
        "[inject-error]\nevent = \"write_aio\"\nerrno = \"28\"\nonce = \"on\"\n",
    )
    .unwrap();
    let out = same(
        d,
        "qemu-io",
        &[
            "-c",
            "open -o driver=qcow2,file.driver=blkdebug,file.config=write.conf a.qcow2",
            "-c",
            "write 0 4k",
            "-c",
            "read -P 0x5a 0 4k",
        ],
    );
    assert!(
        out.contains("write failed: No space left on device"),
        "{out}"
    );
    // compare: a read failure is status 4 with qemu-img's message.
    qemu_img_in(d, ["convert", "-O", "qcow2", "a.qcow2", "b.qcow2"]).ok();
    std::fs::write(
        d.join("all.conf"),
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\n",
    )
    .unwrap();
    let (st, out) = run(
        &d.join("bin/qemu-img"),
        &["compare", "blkdebug:all.conf:a.qcow2", "b.qcow2"],
        d,
    );
    assert_eq!(st, 4, "{out}");
    same(
        d,
        "qemu-img",
        &["compare", "blkdebug:all.conf:a.qcow2", "b.qcow2"],
    );
}

/// QEMU's nesting: "Could not open 'top': Could not open backing file: Could not open
/// 'base': No such file or directory", and qemu-io's "can't open device".
#[test]
fn open_failures_are_worded_as_qemu_words_them() {
    let dir = setup();
    let d = dir.path();
    qemu_img_in(
        d,
        [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            "-u",
            "t.qcow2",
            "1M",
        ],
    )
    .ok();
    same(d, "qemu-img", &["info", "--backing-chain", "t.qcow2"]);
    same(d, "qemu-img", &["check", "missing.qcow2"]);
    same(d, "qemu-io", &["-c", "read 0 4k", "t.qcow2"]);
    same(d, "qemu-io", &["-c", "read 0 4k", "missing.qcow2"]);
    same(
        d,
        "qemu-img",
        &["create", "-f", "qcow2", "-b", "gone.qcow2", "u.qcow2"],
    );
    same(
        d,
        "qemu-img",
        &["create", "-f", "qcow2", "-b", "a.qcow2", "u.qcow2"],
    );
    // Requests past the end fail with EIO in qemu-io, as in QEMU's block layer.
    same(
        d,
        "qemu-io",
        &["-c", "read 1M 4k", "-c", "writev 1M 4k", "a.qcow2"],
    );
}

/// A new raw file has its first block written, as QEMU's file driver does (and maps so).
#[test]
fn raw_create_writes_the_first_block_as_qemu_does() {
    let dir = tempdir();
    let d = dir.path();
    qemu_named_symlinks(d);
    for size in ["1M", "2048"] {
        run(
            &d.join("bin/qemu-img"),
            &["create", "-f", "raw", "v.raw", size],
            d,
        );
        run(
            &qemu_tool("qemu-img"),
            &["create", "-f", "raw", "q.raw", size],
            d,
        );
        let map = |f: &str| run(&qemu_tool("qemu-img"), &["map", "--output=json", f], d).1;
        assert_eq!(map("v.raw"), map("q.raw"), "{size}");
        assert_eq!(
            allocated(&d.join("v.raw")),
            allocated(&d.join("q.raw")),
            "{size}"
        );
    }
}

/// qemu-io's `info`, a json: name with inline blkdebug rules (qcow2's `l2_load` event),
/// options for the backing file the image names (`backing.driver`), and `file:` names.
#[test]
fn qemu_io_info_inline_rules_backing_options_and_file_names() {
    let dir = setup();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "raw", "r.raw", "1M"]).ok();
    same(d, "qemu-io", &["-c", "info", "a.qcow2"]);
    same(d, "qemu-io", &["-f", "raw", "-c", "info", "r.raw"]);
    let json = "json:{'driver': 'qcow2', 'file': {'driver': 'blkdebug', 'inject-error': \
                [{'event': 'l2_load'}], 'image': {'driver': 'file', 'filename': 'a.qcow2'}}}";
    let out = same(d, "qemu-io", &["-c", "read 0 512", json]);
    assert!(out.contains("read failed: Input/output error"), "{out}");
    qemu_img_in(
        d,
        [
            "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "t.qcow2",
        ],
    )
    .ok();
    same(
        d,
        "qemu-io",
        &[
            "-c",
            "open -o backing.driver=qcow2 t.qcow2",
            "-c",
            "read -P 0x5a 0 64k",
        ],
    );
    let mine = run(
        &d.join("bin/qemu-img"),
        &["create", "-f", "qcow2", "file:x:y.qcow2", "1M"],
        d,
    );
    assert_eq!(mine.0, 0, "{mine:?}");
    assert!(d.join("x:y.qcow2").exists());
    same(d, "qemu-img", &["info", "file:x:y.qcow2"]);
}

/// commit -b takes a relative name relative to each overlay's directory, as qemu-img
/// does (not to the working directory), with qemu-img's words when it matches no layer.
#[test]
fn commit_base_names_resolve_as_qemu_img_resolves_them() {
    for tool in ["ours", "qemu"] {
        let dir = tempdir();
        let d = dir.path();
        qemu_named_symlinks(d);
        std::fs::create_dir(d.join("sub")).unwrap();
        qemu_img_in(d, ["create", "-q", "-f", "qcow2", "sub/b.qcow2", "1M"]).ok();
        for (img, back) in [("sub/m.qcow2", "b.qcow2"), ("sub/t.qcow2", "m.qcow2")] {
            qemu_img_in(
                d,
                [
                    "create", "-q", "-f", "qcow2", "-b", back, "-F", "qcow2", img,
                ],
            )
            .ok();
        }
        let exe = if tool == "ours" {
            d.join("bin/qemu-img")
        } else {
            qemu_tool("qemu-img")
        };
        let (st, out) = run(&exe, &["commit", "-b", "sub/m.qcow2", "sub/t.qcow2"], d);
        assert_eq!(
            (st, out.as_str()),
            (
                1,
                "qemu-img: Did not find 'sub/m.qcow2' in the backing chain of 'sub/t.qcow2'"
            ),
            "{tool}"
        );
        let (st, out) = run(&exe, &["commit", "-b", "m.qcow2", "sub/t.qcow2"], d);
        assert_eq!((st, out.as_str()), (0, "Image committed."), "{tool}");
    }
}

/// raw's `offset` and `size` options, qemu-io's `reopen -o` (and what it refuses), and the
/// protocol drivers' file-type checks, each as QEMU's tools do them.
#[test]
fn raw_windows_reopen_options_and_file_types() {
    let dir = setup();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "raw", "r.raw", "4096"]).ok();
    qemu_io_in(d, ["-f", "raw", "-c", "write -P 0x0a 512 1024", "r.raw"]).ok();
    let win = "json:{'driver': 'raw', 'offset': '512', 'size': '1024', \
               'file': {'driver': 'file', 'filename': 'r.raw'}}";
    for cmd in [
        "read -P 0x0a 0 1024",
        "write 1023 1",
        "write 1023 2",
        "read 1024 1",
    ] {
        same(d, "qemu-io", &["-c", cmd, win]);
    }
    let bad = "json:{'driver': 'raw', 'offset': '4000', 'size': '1024', \
               'file': {'driver': 'file', 'filename': 'r.raw'}}";
    same(d, "qemu-io", &["-c", "read 0 1", bad]);
    same(
        d,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "reopen -o driver=raw,offset=1536,size=1024",
            "-c",
            "read -v 0 4",
            "r.raw",
        ],
    );
    for reopen in [
        "reopen -o node-name=foo",
        "reopen -o file.driver=qcow2",
        "reopen -o driver=raw",
        "reopen -o driver=qcow2",
        "reopen -r -o read-only=on",
        "reopen -c none -o cache.direct=on",
        "reopen -o read-only=foo",
        "reopen -o cache.direct=baz",
    ] {
        same(d, "qemu-io", &["-c", reopen, "a.qcow2"]);
    }
    same(
        d,
        "qemu-io",
        &[
            "-c",
            "open -o node-name=foo a.qcow2",
            "-c",
            "reopen -o node-name=foo",
        ],
    );
    // A protocol on top reopens as itself and is named so by info.
    let null = "json:{'driver': 'null-co', 'size': 65536}";
    same(
        d,
        "qemu-io",
        &["-f", "null-co", "-c", "reopen", "-c", "info", null],
    );
    let zeros = "json:{'driver': 'null-co', 'size': 65536, 'read-zeroes': true}";
    same(d, "qemu-io", &["-c", "read -P 0 0 64k", zeros]);
    std::fs::create_dir(d.join("dir")).unwrap();
    for proto in ["file", "host_device"] {
        for target in ["dir", "/dev/null,locking=off"] {
            for ro in ["-r ", ""] {
                let cmd = format!("open {ro}-o driver={proto},filename={target}");
                same(d, "qemu-io", &["-c", &cmd]);
            }
        }
    }
}

/// QEMU's `compress` filter: writes through it reach the image compressed, partial
/// clusters filled from what the image reads, as in qemu-io (same map, same check counts).
#[test]
fn the_compress_filter_writes_compressed_clusters() {
    let dir = tempdir();
    let d = dir.path();
    qemu_named_symlinks(d);
    let opts = |f: &str| {
        format!("driver=compress,file.driver=qcow2,file.file.driver=file,file.file.filename={f}")
    };
    let mut outs = Vec::new();
    for (f, tool) in [
        ("v.qcow2", d.join("bin/qemu-io")),
        ("q.qcow2", qemu_tool("qemu-io")),
    ] {
        // A new image: QEMU refuses compressed writes over allocated clusters.
        qemu_img_in(d, ["create", "-q", "-f", "qcow2", f, "2M"]).ok();
        let (st, out) = run(
            &tool,
            &["--image-opts", "-c", "write -P 0xbb 4096 229376", &opts(f)],
            d,
        );
        assert_eq!(st, 0, "{out}");
        let map = run(&qemu_tool("qemu-img"), &["map", "--output=json", f], d).1;
        let check = run(&qemu_tool("qemu-img"), &["check", f], d).1;
        let data = run(
            &qemu_tool("qemu-io"),
            &[
                "-c",
                "read -P 0 0 4096",
                "-c",
                "read -P 0xbb 4096 229376",
                "-c",
                "read -P 0 233472 32768",
                f,
            ],
            d,
        )
        .1;
        outs.push((out, map.replace(f, "F"), check, data));
    }
    assert_eq!(outs[0], outs[1], "vmimg, then QEMU");
    assert!(outs[0].2.contains("compressed clusters"), "{:?}", outs[0]);
}

/// Copy-on-read (`open -C`, qemu-io's `-C`): what reads take from the backing file lands in
/// the overlay at QEMU's granularity (subclusters with extended L2), the same map as
/// QEMU's; refused on read-only images with qemu-io's words.
#[test]
fn copy_on_read_allocates_what_reads_take_from_the_backing_file() {
    let dir = tempdir();
    let d = dir.path();
    qemu_named_symlinks(d);
    qemu_img_in(d, ["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]).ok();
    qemu_io_in(d, ["-c", "write -P 0x33 64k 1M", "base.qcow2"]).ok();
    let mut maps = Vec::new();
    for (f, tool) in [
        ("v.qcow2", d.join("bin/qemu-io")),
        ("q.qcow2", qemu_tool("qemu-io")),
    ] {
        for (name, extl2) in [(format!("a-{f}"), "off"), (format!("b-{f}"), "on")] {
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
                    "-o",
                    &format!("extended_l2={extl2}"),
                    &name,
                ],
            )
            .ok();
            let open = format!("open -C {name}");
            let (st, out) = run(
                &tool,
                &[
                    "-c",
                    &open,
                    "-c",
                    "read -P 0x33 100k 3k",
                    "-c",
                    "read 2M 1k",
                ],
                d,
            );
            assert_eq!(st, 0, "{out}");
            let map = run(&qemu_tool("qemu-img"), &["map", "--output=json", &name], d).1;
            maps.push(map.replace(&name, "F"));
        }
        let (_, out) = run(
            &tool,
            &["-r", "-C", "-c", "read 0 1k", &format!("a-{f}")],
            d,
        );
        maps.push(out.replace(f, "F"));
    }
    assert_eq!(maps[..3], maps[3..], "vmimg, then QEMU");
    assert!(
        maps[2].contains("Can't use copy-on-read on read-only device"),
        "{}",
        maps[2]
    );
}

/// compare's report comes after its errors when both go to one pipe, as qemu-img's
/// buffered standard output puts it (iotest 074).
#[test]
fn compare_reports_after_its_errors_on_one_pipe() {
    let dir = setup();
    let d = dir.path();
    qemu_img_in(d, ["create", "-q", "-f", "qcow2", "empty.qcow2", "0"]).ok();
    std::fs::write(d.join("all.conf"), "[inject-error]\nevent = \"read_aio\"\n").unwrap();
    let both = |tool: &Path| {
        let cmd = format!(
            "'{}' compare blkdebug:all.conf:a.qcow2 empty.qcow2 2>&1; echo status $?",
            tool.display()
        );
        let out = Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .current_dir(d)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mine = both(&d.join("bin/qemu-img"));
    assert_eq!(mine, both(&qemu_tool("qemu-img")));
    assert!(
        mine.ends_with("Warning: Image size mismatch!\nstatus 4\n"),
        "{mine}"
    );
}

/// qemu-io's `alloc` counts bytes at any offset, and cuts a count that runs past the end.
#[test]
fn alloc_takes_byte_offsets_and_cuts_at_the_end() {
    let dir = setup();
    let d = dir.path();
    qemu_img_in(
        d,
        [
            "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "t.qcow2",
        ],
    )
    .ok();
    qemu_io_in(d, ["-c", "write 4k 8k", "t.qcow2"]).ok();
    for cmd in [
        "alloc 1 1",
        "alloc 4095 1000",
        "alloc 0x2ff0 100",
        "alloc 1000k 5P",
        "alloc 0",
    ] {
        same(d, "qemu-io", &["-c", cmd, "t.qcow2"]);
    }
}
