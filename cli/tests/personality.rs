//! Multi-call personalities: vmimg invoked through symlinks named `qemu-img`, `qemu-io` and
//! `qemu-nbd` behaves as those tools (their argument syntax, their names in messages, exit
//! status 1 for usage errors), as QEMU's own test suite calls them.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

fn run(tool: &Path, args: &[&str], cwd: &Path) -> (i32, String, String) {
    let out = Command::new(tool)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// qemu-io's options as qemu-iotests passes them (`--cache MODE --aio MODE -f FMT`, the
/// format given twice), with its name on errors and exit status 1 on usage errors;
/// qemu-img's messages under its name; vmimg keeps its own name and clap's status.
#[test]
fn symlinks_named_as_qemu_tools_behave_as_them() {
    let dir = tempdir();
    let d = dir.path();
    let bin = qemu_named_symlinks(d);
    let (img, io, nbd) = (
        bin.join("qemu-img"),
        bin.join("qemu-io"),
        bin.join("qemu-nbd"),
    );
    let (st, out, _) = run(&img, &["create", "-f", "qcow2", "a.qcow2", "1M"], d);
    assert_eq!(st, 0);
    assert!(out.starts_with("Formatting 'a.qcow2', fmt=qcow2"), "{out}");
    for cache in ["writeback", "writethrough", "none", "directsync", "unsafe"] {
        let args = [
            "--cache",
            cache,
            "--aio",
            "threads",
            "-f",
            "raw",
            "-f",
            "qcow2",
            "-c",
            "write -P 7 0 4k",
            "-c",
            "read -P 7 0 4k",
            "a.qcow2",
        ];
        let (st, out, err) = run(&io, &args, d);
        assert_eq!(st, 0, "{cache}: {err}");
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
    qemu_io_in(d, ["-c", "read -P 7 0 4k", "a.qcow2"]).ok();
    // Usage errors: the tool's status, not clap's.
    let (st, _, _) = run(&io, &["--bogus", "a.qcow2"], d);
    assert_eq!(st, 1);
    let (st, _, _) = run(&io, &["--aio", "bogus", "a.qcow2"], d);
    assert_eq!(st, 1);
    let (st, _, _) = run(&vmimg_bin(), &["io", "--bogus", "a.qcow2"], d);
    assert_eq!(st, 2, "vmimg keeps clap's usage status");
    // Errors carry the tool's name.
    let (st, _, err) = run(&img, &["info", "missing.qcow2"], d);
    assert_eq!(st, 1);
    assert!(err.starts_with("qemu-img: "), "{err}");
    let (st, _, err) = run(&img, &["check", "-f", "raw", "a.qcow2"], d);
    assert_eq!(st, 63);
    assert!(err.starts_with("qemu-img: "), "{err}");
    let (_, _, err) = run(&vmimg_bin(), &["info", "missing.qcow2"], d);
    assert!(err.starts_with("vmimg: "), "{err}");
    // qemu-nbd is `serve`.
    let (st, out, _) = run(&nbd, &["--help"], d);
    assert_eq!(st, 0);
    assert!(out.contains("--socket") || out.contains("-k"), "{out}");
}

/// qemu-io's asynchronous requests, `alloc` and `write -p` print what qemu-io prints;
/// `sigraise` raises the signal.
#[test]
fn qemu_io_commands_of_the_suite_match_qemu_io() {
    let dir = tempdir();
    let d = dir.path();
    let bin = qemu_named_symlinks(d);
    for img in ["q.qcow2", "v.qcow2"] {
        qemu_img_in(d, ["create", "-q", "-f", "qcow2", img, "4M"]).ok();
    }
    let cmds = [
        "aio_write -P 5 0 64k",
        "aio_write -z 64k 64k",
        "aio_flush",
        "aio_read -P 5 0 64k",
        "aio_read -P 0 64k 64k",
        "alloc 0 128k",
        "alloc 128k",
        "alloc 1M 1M",
        "alloc 0 3M",
        "write -p -P 1 1M 4k",
        "read -p -P 1 1M 4k",
    ];
    let mut args = vec!["-f", "qcow2"];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    let mut q = args.clone();
    q.push("q.qcow2");
    let mut v = args;
    v.push("v.qcow2");
    let qo = qemu_io_in(d, &q).ok();
    let (st, vo, err) = run(&bin.join("qemu-io"), &v, d);
    assert_eq!(st, 0, "{err}");
    // qemu-io prints an asynchronous request's report when it completes (here, some at
    // exit); vmimg completes each before the next command. The same reports either way.
    let sorted = |s: &str| {
        let mut l: Vec<String> = io_data_lines(s).into_iter().map(String::from).collect();
        l.sort();
        l
    };
    assert_eq!(sorted(&vo), sorted(&qo.stdout));
    assert!(vo.contains("bytes allocated at offset"), "{vo}");
    let (st, _, _) = run(&bin.join("qemu-io"), &["-c", "sigraise 9", "v.qcow2"], d);
    assert_eq!(st, -1, "killed by SIGKILL, as qemu-io is");
}

/// qemu-io's `open` and `close`, and a session started without a file: the same reports on
/// stdout and the same complaints on stderr as qemu-io's.
#[test]
fn qemu_io_open_and_close_match_qemu_io() {
    let dir = tempdir();
    let d = dir.path();
    let bin = qemu_named_symlinks(d);
    qemu_img_in(d, ["create", "-q", "-f", "qcow2", "o.qcow2", "1M"]).ok();
    qemu_io_in(d, ["-c", "write -P 0x33 0 4k", "o.qcow2"]).ok();
    let cmds = [
        "read 0 512",
        "open -o driver=qcow2 o.qcow2",
        "read -P 0x33 0 512",
        "open o.qcow2",
        "close",
        "read 0 512",
        "open -r -o driver=raw o.qcow2",
        "read -P 0x51 0 1",
        "close",
        "open -f qcow2 -r o.qcow2",
    ];
    let mut args = vec![];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    let q = qemu_io_in(d, &args);
    let (_, out, err) = run(&bin.join("qemu-io"), &args, d);
    assert_eq!(io_data_lines(&out), io_data_lines(&q.stdout));
    let lines = |s: &str| {
        let mut l: Vec<String> = s.lines().map(String::from).collect();
        l.sort();
        l
    };
    assert_eq!(
        lines(&err).len(),
        lines(&q.stderr).len(),
        "{err} / {}",
        q.stderr
    );
    assert!(err.contains("no file open, try 'help open'"), "{err}");
    assert!(
        err.contains("qemu-io: file open already, try 'help close'"),
        "{err}"
    );
}

/// qemu-io's `-s` (writes to a temporary overlay; the image is left as it was) and
/// `read -P -s -l` (the pattern checked in part of the read), as qemu-io reports them.
#[test]
fn qemu_io_snapshot_mode_and_partial_patterns_match_qemu_io() {
    let dir = tempdir();
    let d = dir.path();
    let bin = qemu_named_symlinks(d);
    for img in ["q.raw", "v.raw"] {
        qemu_img_in(d, ["create", "-q", "-f", "raw", img, "4M"]).ok();
    }
    let cmds = [
        "write -P 65 2048k 4k",
        "read -P 65 -s 4k -l 4k 2044k 8k",
        "read -P 65 -s 0 -l 4k 2044k 8k",
        "read -P 1 -s 4k -l 8k 2044k 8k",
        "read -P 0 -l 4k 0 8k",
    ];
    let mut args = vec!["-s", "-f", "raw"];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    let mut q = args.clone();
    q.push("q.raw");
    let mut v = args;
    v.push("v.raw");
    let qo = qemu_io_in(d, &q);
    let (_, vo, _) = run(&bin.join("qemu-io"), &v, d);
    assert_eq!(io_data_lines(&vo), io_data_lines(&qo.stdout));
    assert!(vo.contains("Pattern verification failed at offset 2093056, 4096 bytes"));
    // Neither image changed.
    for img in ["q.raw", "v.raw"] {
        assert!(
            std::fs::read(d.join(img)).unwrap().iter().all(|&b| b == 0),
            "{img}"
        );
    }
}

/// qemu-io's `reopen -r/-w` and its refusal of writes on a read-only image (iotest 187):
/// the same reports as qemu-io's, and the image reopened writable takes writes.
#[test]
fn qemu_io_reopen_matches_qemu_io() {
    let dir = tempdir();
    let d = dir.path();
    let bin = qemu_named_symlinks(d);
    qemu_img_in(d, ["create", "-q", "-f", "qcow2", "r.qcow2", "64M"]).ok();
    for cmds in [
        &["-r", "-c", "write 0 64k"][..],
        &["-r", "-c", "reopen -w", "-c", "write 0 64k"],
        &[
            "-r",
            "-c",
            "reopen -w",
            "-c",
            "reopen -r",
            "-c",
            "write 0 64k",
        ],
        &["-c", "reopen -r", "-c", "write 0 64k", "-c", "discard 0 4k"],
        &[
            "-c",
            "reopen -r",
            "-c",
            "reopen -w",
            "-c",
            "write -P 9 0 64k",
        ],
    ] {
        let mut args = cmds.to_vec();
        args.push("r.qcow2");
        let q = qemu_io_in(d, &args);
        let (st, out, err) = run(&bin.join("qemu-io"), &args, d);
        assert_eq!(io_data_lines(&out), io_data_lines(&q.stdout), "{cmds:?}");
        assert_eq!(err.replace("vmimg", "qemu-io"), q.stderr, "{cmds:?}");
        assert_eq!(st, q.status, "{cmds:?}");
    }
    qemu_io_in(d, ["-c", "read -P 9 0 64k", "r.qcow2"]).ok();
}
