//! Image locks: vmimg and QEMU's tools exclude each other exactly as QEMU's tools exclude
//! one another. Every case runs the QEMU command and the vmimg command side by side while a
//! third process (QEMU's or vmimg's) holds the image, and asserts the same outcome.

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// The lock message line of a failed open (`Failed to get "write" lock`), if any.
fn lock_line(stderr: &str) -> Option<String> {
    let line = stderr.lines().find(|l| l.contains("Failed to get"))?;
    Some(line[line.find("Failed to get")?..].to_string())
}

/// A process holding `img`: a tool reading commands, or an NBD server.
fn hold(kind: &str, fmt: &str, img: &Path, dir: &Path) -> Holder {
    let socket = dir.join(format!("{kind}.sock"));
    let _ = std::fs::remove_file(&socket);
    let (prog, args): (std::path::PathBuf, Vec<&str>) = match kind {
        "qemu-io" => return Holder::qemu_io(&["-f", fmt, s(img)]),
        "qemu-io -r" => return Holder::qemu_io(&["-r", "-f", fmt, s(img)]),
        "vmimg io" => return Holder::vmimg_io(&["-f", fmt, s(img)]),
        "vmimg io -r" => return Holder::vmimg_io(&["-r", "-f", fmt, s(img)]),
        "qemu-nbd" => (
            qemu_tool("qemu-nbd"),
            vec!["-k", s(&socket), "-f", fmt, s(img)],
        ),
        "qemu-nbd -r" => (
            qemu_tool("qemu-nbd"),
            vec!["-r", "-k", s(&socket), "-f", fmt, s(img)],
        ),
        "vmimg serve" => (
            vmimg_bin(),
            vec!["serve", "-k", s(&socket), "-f", fmt, s(img)],
        ),
        "vmimg serve -r" => (
            vmimg_bin(),
            vec!["serve", "-r", "-k", s(&socket), "-f", fmt, s(img)],
        ),
        // A user that refuses others consistent reads (as QEMU's block jobs do on the
        // images they commit): QEMU's lock byte 200, held by a small script.
        "refuses consistent read" => {
            let script = "import fcntl, struct, sys\n\
                          f = open(sys.argv[1], 'rb')\n\
                          fl = struct.pack('hhqqi', fcntl.F_RDLCK, 0, 200, 1, 0)\n\
                          fcntl.fcntl(f, fcntl.F_OFD_SETLK, fl)\n\
                          for line in sys.stdin:\n    print('ok', flush=True)\n";
            return Holder::start("python3".into(), &["-c", script, s(img)], Some("probe"));
        }
        other => panic!("unknown holder {other}"),
    };
    let h = Holder::start(prog, &args, None);
    let start = Instant::now();
    while !socket.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{kind}: no socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    h
}

/// One command in QEMU's and in vmimg's spelling.
struct Case {
    name: &'static str,
    qemu: fn(&str, &str, &Path) -> Run,
    vmimg: fn(&str, &str, &Path) -> Run,
}

fn out(dir: &Path, tool: &str) -> String {
    s(&dir.join(format!("out-{tool}.raw"))).to_string()
}

const CASES: &[Case] = &[
    Case {
        name: "info",
        qemu: |f, i, _| qemu_img(["info", "-f", f, i]),
        vmimg: |f, i, _| vmimg(["info", "-f", f, i]),
    },
    Case {
        name: "info -U",
        qemu: |f, i, _| qemu_img(["info", "-U", "-f", f, i]),
        vmimg: |f, i, _| vmimg(["info", "-U", "-f", f, i]),
    },
    Case {
        name: "read",
        qemu: |f, i, _| qemu_io(["-r", "-f", f, "-c", "read 0 512", i]),
        vmimg: |f, i, _| vmimg(["io", "-r", "-f", f, "-c", "read 0 512", i]),
    },
    Case {
        name: "read -U",
        qemu: |f, i, _| qemu_io(["-r", "-U", "-f", f, "-c", "read 0 512", i]),
        vmimg: |f, i, _| vmimg(["io", "-r", "-U", "-f", f, "-c", "read 0 512", i]),
    },
    Case {
        name: "write",
        qemu: |f, i, _| qemu_io(["-f", f, "-c", "write 64k 512", i]),
        vmimg: |f, i, _| vmimg(["io", "-f", f, "-c", "write 64k 512", i]),
    },
    Case {
        name: "convert",
        qemu: |f, i, d| qemu_img(["convert", "-f", f, "-O", "raw", i, &out(d, "q")]),
        vmimg: |f, i, d| vmimg(["convert", "-f", f, "-O", "raw", i, &out(d, "v")]),
    },
    Case {
        name: "convert -U",
        qemu: |f, i, d| qemu_img(["convert", "-U", "-f", f, "-O", "raw", i, &out(d, "q")]),
        vmimg: |f, i, d| vmimg(["convert", "-U", "-f", f, "-O", "raw", i, &out(d, "v")]),
    },
    Case {
        name: "resize",
        qemu: |f, i, _| qemu_img(["resize", "-f", f, i, "+1M"]),
        vmimg: |f, i, _| vmimg(["resize", "-f", f, i, "+1M"]),
    },
    Case {
        name: "map",
        qemu: |f, i, _| qemu_img(["map", "-f", f, i]),
        vmimg: |f, i, _| vmimg(["map", "-f", f, i]),
    },
    Case {
        name: "create over it",
        qemu: |f, i, _| qemu_img(["create", "-f", f, i, "1M"]),
        vmimg: |f, i, _| vmimg(["create", "-f", f, i, "1M"]),
    },
];

/// Runs every case against `img` while `holder` holds it.
fn parity(holder: &str, fmt: &str) {
    let dir = tempdir();
    let img = dir.path().join(format!("img.{fmt}"));
    qemu_img(["create", "-q", "-f", fmt, s(&img), "16M"]).ok();
    qemu_io(["-f", fmt, "-c", "write -P 0x5a 0 64k", s(&img)]).ok();
    let h = hold(holder, fmt, &img, dir.path());
    compare_cases(holder, fmt, &img, dir.path());
    drop(h);
}

/// Runs every case against the base of a chain while `holder` holds the overlay above it.
fn parity_below(holder: &str, base_fmt: &str) {
    let dir = tempdir();
    let base = dir.path().join(format!("base.{base_fmt}"));
    let top = dir.path().join("top.qcow2");
    qemu_img(["create", "-q", "-f", base_fmt, s(&base), "16M"]).ok();
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        base_fmt,
        s(&top),
    ])
    .ok();
    let h = hold(holder, "qcow2", &top, dir.path());
    compare_cases(
        &format!("{holder} (on the overlay)"),
        base_fmt,
        &base,
        dir.path(),
    );
    drop(h);
}

/// Each case by QEMU's tool and by vmimg: the same outcome, the same lock message.
fn compare_cases(holder: &str, fmt: &str, img: &Path, dir: &Path) {
    let mut report = Vec::new();
    for case in CASES {
        // vmimg first: a qemu-img create that a lock refuses deletes the file it had
        // already truncated (vmimg refuses before truncating), and the next create would
        // make a new file that nobody holds.
        let v = (case.vmimg)(fmt, s(img), dir);
        let q = (case.qemu)(fmt, s(img), dir);
        let (ql, vl) = (lock_line(&q.stderr), lock_line(&v.stderr));
        if (q.status == 0) != (v.status == 0) || ql != vl {
            report.push(format!(
                "{holder} holds {fmt}, '{}': qemu exit {} {:?}, vmimg exit {} {:?}\n  qemu: {}\n  vmimg: {}",
                case.name,
                q.status,
                ql,
                v.status,
                vl,
                q.stderr.trim(),
                v.stderr.trim()
            ));
        }
    }
    assert!(report.is_empty(), "{}", report.join("\n"));
}

#[test]
fn qemu_io_writing_qcow2_excludes_vmimg_like_qemu() {
    parity("qemu-io", "qcow2");
}

#[test]
fn qemu_io_reading_qcow2_excludes_vmimg_like_qemu() {
    parity("qemu-io -r", "qcow2");
}

#[test]
fn qemu_io_writing_raw_is_shared_like_qemu() {
    parity("qemu-io", "raw");
}

#[test]
fn qemu_nbd_exporting_qcow2_excludes_vmimg_like_qemu() {
    parity("qemu-nbd", "qcow2");
}

#[test]
fn qemu_nbd_exporting_raw_read_only_excludes_resizes_like_qemu() {
    parity("qemu-nbd -r", "raw");
}

#[test]
fn vmimg_io_writing_qcow2_excludes_qemu_like_qemu_io() {
    parity("vmimg io", "qcow2");
}

#[test]
fn vmimg_io_reading_qcow2_excludes_qemu_like_qemu_io() {
    parity("vmimg io -r", "qcow2");
}

#[test]
fn vmimg_io_writing_raw_is_shared_like_qemu_io() {
    parity("vmimg io", "raw");
}

#[test]
fn vmimg_serve_exporting_qcow2_excludes_qemu_like_qemu_nbd() {
    parity("vmimg serve", "qcow2");
}

#[test]
fn vmimg_serve_exporting_raw_read_only_excludes_resizes_like_qemu_nbd() {
    parity("vmimg serve -r", "raw");
}

/// info takes no permission (QEMU's BDRV_O_NO_IO), so it works where reading does not.
#[test]
fn a_user_refusing_consistent_reads_stops_readers_but_not_info_like_qemu() {
    parity("refuses consistent read", "qcow2");
    parity("refuses consistent read", "raw");
}

#[test]
fn backing_files_are_locked_like_qemus_when_a_writer_holds_the_overlay() {
    parity_below("qemu-io", "qcow2");
    parity_below("qemu-io", "raw");
    parity_below("vmimg io", "qcow2");
    parity_below("vmimg io", "raw");
}

/// Two `vmimg io` writers: the second is refused, the first keeps writing, and what it
/// wrote is all there afterwards (before locks, both wrote and `check` saw nothing wrong).
#[test]
fn a_second_vmimg_writer_is_refused_and_the_first_loses_nothing() {
    let dir = tempdir();
    let img = dir.path().join("img.qcow2");
    vmimg(["create", "-q", "-f", "qcow2", s(&img), "64M"]).ok();
    let mut first = Holder::vmimg_io(&["-f", "qcow2", s(&img)]);
    first.send("write -P 0x11 0 1M");
    let second = vmimg(["io", "-f", "qcow2", "-c", "write -P 0x22 0 1M", s(&img)]);
    assert_eq!(second.status, 1, "{second:?}");
    assert_eq!(
        lock_line(&second.stderr).as_deref(),
        Some("Failed to get \"write\" lock"),
        "{}",
        second.stderr
    );
    assert!(
        second.stderr.contains(&format!(
            "Is another process using the image [{}]?",
            s(&img)
        )),
        "{}",
        second.stderr
    );
    first.send("write -P 0x33 1M 1M");
    assert_eq!(first.finish(), Some(0));
    qemu_img(["check", "-f", "qcow2", s(&img)]).ok();
    qemu_io([
        "-f",
        "qcow2",
        "-c",
        "read -P 0x11 0 1M",
        "-c",
        "read -P 0x33 1M 1M",
        s(&img),
    ])
    .ok();
}

/// Locks are on the file, not the name: a hard link or a symlink to an image in use is
/// refused as well.
#[test]
fn other_names_for_an_image_in_use_are_refused() {
    let dir = tempdir();
    let img = dir.path().join("img.qcow2");
    let link = dir.path().join("link.qcow2");
    let sym = dir.path().join("sym.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&img), "16M"]).ok();
    std::fs::hard_link(&img, &link).unwrap();
    std::os::unix::fs::symlink(&img, &sym).unwrap();
    let h = Holder::qemu_io(&["-f", "qcow2", s(&img)]);
    for name in [&link, &sym] {
        let r = vmimg(["io", "-f", "qcow2", "-c", "write 0 512", s(name)]);
        assert_eq!(r.status, 1, "{r:?}");
        assert!(r.stderr.contains("Failed to get \"write\" lock"), "{r:?}");
    }
    drop(h);
}

/// The library: `OpenOptions::locking(Off)` opens what another process locks; `On` and
/// the default refuse it with `ErrorKind::Locked`.
#[test]
fn library_lock_modes() {
    use vmimg::{ErrorKind, Format, ImageOpen, LockMode};
    let dir = tempdir();
    let img = dir.path().join("img.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&img), "16M"]).ok();
    let h = Holder::qemu_io(&["-f", "qcow2", s(&img)]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for mode in [None, Some(LockMode::Auto), Some(LockMode::On)] {
            let mut open = ImageOpen::path(&img).format(Format::QCOW2);
            if let Some(m) = mode {
                open = open.locking(m);
            }
            let err = open.open().await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Locked, "{mode:?}: {err}");
        }
        let img = ImageOpen::path(&img)
            .format(Format::QCOW2)
            .locking(LockMode::Off)
            .open()
            .await
            .unwrap();
        assert_eq!(img.size(), 16 << 20);
    });
    drop(h);
}

/// A create over an image in use is refused before anything is truncated: the holder's
/// image is left byte for byte. (qemu-img truncates first when only consistent reads are
/// refused, then deletes the file when its open fails.)
#[test]
fn a_refused_create_leaves_the_image_it_would_have_replaced() {
    let dir = tempdir();
    let img = dir.path().join("img.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&img), "16M"]).ok();
    qemu_io(["-f", "qcow2", "-c", "write -P 0x5a 0 64k", s(&img)]).ok();
    let before = std::fs::read(&img).unwrap();
    for holder in ["qemu-io", "qemu-io -r", "refuses consistent read"] {
        let h = hold(holder, "qcow2", &img, dir.path());
        for fmt in ["qcow2", "raw"] {
            if holder == "refuses consistent read" && fmt == "raw" {
                // A raw create takes no read permission (as qemu-img's): it would go on.
                continue;
            }
            let r = vmimg(["create", "-f", fmt, s(&img), "1M"]);
            assert_eq!(r.status, 1, "{holder}, {fmt}: {r:?}");
            assert!(std::fs::read(&img).unwrap() == before, "{holder}, {fmt}");
        }
        drop(h);
    }
}
