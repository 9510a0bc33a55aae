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
    // dd too (qemu-img dd would truncate its input here).
    for extra in [&[][..], &["-U"]] {
        let mut args = vec!["dd", "-f", "raw"];
        args.extend(extra);
        let (i, o) = (format!("if={}", s(&raw)), format!("of={}", s(&raw)));
        args.extend([i.as_str(), o.as_str()]);
        let r = vmimg(&args);
        assert_eq!(r.status, 1, "{args:?}: {r:?}");
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

/// Images of every format QEMU's probe knows but vmimg cannot open yet, made by qemu-img
/// where it can and from the formats' magic otherwise.
fn foreign_images(dir: &Path) -> Vec<(String, std::path::PathBuf)> {
    let luks = dir.join("img.luks");
    qemu_img([
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        "secret,id=s0,data=secret",
        "-o",
        "key-secret=s0,iter-time=10",
        s(&luks),
        "1M",
    ])
    .ok();
    vec![("luks".into(), luks)]
}

/// A format vmimg cannot open is refused by name, never read as raw: no command reads it
/// (convert would copy its metadata as data) or writes it (a write at 0 would overwrite
/// its header), and the file is left as it was. QEMU's probe agrees on every name.
#[test]
fn probing_refuses_every_format_it_cannot_open() {
    let dir = tempdir();
    for (name, path) in foreign_images(dir.path()) {
        let before = std::fs::read(&path).unwrap();
        let trace = qemu_img(["--trace", "bdrv_open_common", "info", s(&path)]);
        assert!(
            trace.stderr.contains(&format!("format_name \"{name}\"")),
            "qemu-img does not probe {name}: {}",
            trace.stderr
        );
        let want = format!("format '{name}' is not supported");
        let out = dir.path().join("out.raw");
        for args in [
            vec!["info", s(&path)],
            vec!["convert", "-O", "raw", s(&path), s(&out)],
            vec!["io", "-c", "write 0 512", s(&path)],
            vec!["map", s(&path)],
            vec!["check", s(&path)],
            vec!["compare", s(&path), s(&path)],
        ] {
            let r = vmimg(&args);
            assert_ne!(r.status, 0, "{args:?}: {r:?}");
            assert!(r.stderr.contains(&want), "{args:?}: {}", r.stderr);
        }
        assert!(!out.exists(), "convert of {name} created an output");
        assert!(std::fs::read(&path).unwrap() == before, "{name} changed");
        // Named as raw, it is read as raw (the user asked for it).
        vmimg(["info", "-f", "raw", s(&path)]).ok();
    }
}

/// As QEMU's raw driver: a writable image whose format was probed (raw) refuses writes that
/// would make block 0 probe as another format (EPERM), whether the write is whole or the
/// last bytes of a header already half there; named `-f raw`, the same write goes through.
#[test]
fn block_0_of_a_probed_raw_image_cannot_become_another_format() {
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let hdr = dir.path().join("qcow2-header.bin");
    let mut h = b"QFI\xfb\0\0\0\x03".to_vec();
    h.resize(512, 0);
    std::fs::write(&hdr, &h).unwrap();
    let r = vmimg(["io", "-c", &format!("write -s {} 0 512", s(&hdr)), s(&img)]);
    assert_eq!(r.status, 1, "{r:?}");
    assert!(r.stdout.contains("Operation not permitted"), "{r:?}");
    assert!(
        r.stderr
            .contains("WARNING: Image format was not specified for"),
        "{}",
        r.stderr
    );
    // The same through qemu-io, for comparison.
    let q = qemu_io(["-c", &format!("write -s {} 0 512", s(&hdr)), s(&img)]);
    assert!(q.stdout.contains("Operation not permitted"), "{q:?}");
    // A header built in two writes: the magic alone still probes raw (version 0), the
    // version that completes it is refused (the whole new sector is checked).
    let magic = dir.path().join("magic.bin");
    std::fs::write(&magic, b"QFI\xfb").unwrap();
    let version = dir.path().join("version.bin");
    std::fs::write(&version, [0, 0, 0, 3]).unwrap();
    vmimg(["io", "-c", &format!("write -s {} 0 4", s(&magic)), s(&img)]).ok();
    let r = vmimg([
        "io",
        "-c",
        &format!("write -s {} 4 4", s(&version)),
        s(&img),
    ]);
    assert!(r.stdout.contains("Operation not permitted"), "{r:?}");
    // Zeros, data past block 0 and plain data are fine.
    vmimg([
        "io",
        "-c",
        "write -P 0x55 0 4k",
        "-c",
        &format!("write -s {} 512 512", s(&hdr)),
        "-c",
        "write -z 0 512",
        s(&img),
    ])
    .ok();
    let info = vmimg(["info", "--output=json", s(&img)]).ok();
    assert!(
        info.stdout.contains("\"format\": \"raw\""),
        "{}",
        info.stdout
    );
    // Named raw: the user's call.
    vmimg([
        "io",
        "-f",
        "raw",
        "-c",
        &format!("write -s {} 0 512", s(&hdr)),
        s(&img),
    ])
    .ok();
    assert_eq!(std::fs::read(&img).unwrap()[..8], h[..8]);
}

/// The attack the protection stops: a client of an export whose format was probed writes a
/// qcow2 header naming a host file into block 0; the next convert of the image would have
/// copied that host file out.
#[test]
fn an_nbd_client_cannot_turn_a_probed_export_into_a_qcow2_naming_a_host_file() {
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let secret = dir.path().join("secret.raw");
    std::fs::write(&secret, vec![0x5eu8; 1 << 20]).unwrap();
    // A qcow2 header naming the secret as its backing file, made by qemu-img.
    let evil = dir.path().join("evil.qcow2");
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&secret),
        "-F",
        "raw",
        s(&evil),
        "1M",
    ])
    .ok();
    let header = dir.path().join("header.bin");
    std::fs::write(&header, &std::fs::read(&evil).unwrap()[..512]).unwrap();
    let socket = dir.path().join("s.sock");
    let server = Holder::start(vmimg_bin(), &["serve", "-k", s(&socket), s(&img)], None);
    let start = std::time::Instant::now();
    while !socket.exists() {
        assert!(start.elapsed() < std::time::Duration::from_secs(20));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", s(&socket));
    let r = qemu_io([
        "-f",
        "raw",
        "-c",
        &format!("write -s {} 0 512", s(&header)),
        &uri,
    ]);
    assert!(r.stdout.contains("write failed"), "{r:?}");
    drop(server);
    let out = dir.path().join("out.raw");
    vmimg(["convert", "-O", "raw", s(&img), s(&out)]).ok();
    assert!(std::fs::read(&out).unwrap().iter().all(|&b| b == 0));
}

/// A small tmpfs mounted for one test, unmounted (and removed) when dropped. These machines
/// run tests as root; where mounting is refused the test fails saying why.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> SmallFs {
        let dir = tempdir();
        let r = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            r.status.success(),
            "this test needs a small tmpfs (root and mount(8)); the machine refused: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        SmallFs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// Offsets of the writes qemu-io's output confirms (`wrote N/N bytes at offset X`).
fn confirmed_writes(stdout: &str) -> Vec<(u64, u64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("wrote ")?;
            let (n, rest) = rest.split_once('/')?;
            let off = rest.rsplit(' ').next()?;
            Some((off.parse().ok()?, n.parse().ok()?))
        })
        .collect()
}

/// Writes until the file system is full: every write confirmed before the first failure
/// is in the image after exit, and the image passes qemu-img check (leaks allowed), as with
/// qemu-io. Before the fix, new L2 tables and refcount blocks lay in holes that the final
/// flush could not fill, and the image read all zeros.
#[test]
fn confirmed_writes_survive_a_full_disk() {
    full_disk_keeps_confirmed_writes("65536");
}

/// The same with 512-byte clusters, where the refcount table has to grow (first at 8 MiB of
/// file) while the disk fills up.
#[test]
fn confirmed_writes_survive_a_full_disk_while_the_refcount_table_grows() {
    full_disk_keeps_confirmed_writes("512");
}

fn full_disk_keeps_confirmed_writes(cluster_size: &str) {
    let fs = SmallFs::mount("24M");
    let img = fs.path().join("img.qcow2");
    let opt = format!("cluster_size={cluster_size}");
    vmimg(["create", "-q", "-f", "qcow2", "-o", &opt, s(&img), "64G"]).ok();
    // Sequential 1 MiB writes, and writes 600 MiB apart that each need a new L2 table
    // (64 KiB clusters: one table covers 512 MiB), interleaved.
    let mut cmds = Vec::new();
    for i in 0..40u64 {
        cmds.push(format!("write -P {} {} 1M", 1 + i % 200, i << 20));
        cmds.push(format!(
            "write -P {} {} 64k",
            1 + i % 200,
            (i + 1) * (600 << 20)
        ));
    }
    let mut args = vec!["io".to_string(), "-f".into(), "qcow2".into()];
    for c in &cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(s(&img).into());
    let r = vmimg(&args);
    assert_eq!(r.status, 1, "the disk never filled up: {r:?}");
    assert!(r.stdout.contains("No space left on device"), "{}", r.stdout);
    let done = confirmed_writes(&r.stdout);
    assert!(done.len() > 10, "too few writes went through: {}", r.stdout);
    let check = qemu_img(["check", "-f", "qcow2", s(&img)]);
    assert!(
        check.status == 0 || check.status == 3,
        "check found corruption: {check:?}"
    );
    // Every confirmed write reads back with its pattern.
    let mut reads = vec!["-f".to_string(), "qcow2".into()];
    for (off, len) in &done {
        let cmd = cmds
            .iter()
            .find(|c| c.contains(&format!(" {off} ")))
            .unwrap();
        let pattern = cmd.split(' ').nth(2).unwrap();
        reads.push("-c".into());
        reads.push(format!("read -P {pattern} {off} {len}"));
    }
    reads.push(s(&img).into());
    let back = qemu_io(&reads);
    assert!(
        !back.stdout.contains("Pattern verification failed"),
        "{}",
        back.stdout
    );
    back.ok();
}

/// Sends `sig` to process `pid`.
fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a child of this test that has not been reaped yet.
    let r = unsafe { libc::kill(pid, sig) };
    assert_eq!(r, 0, "kill({pid}, {sig})");
}

/// `vmimg io` reading commands from a pipe gets a signal after some writes were confirmed:
/// it stops between commands, flushes, exits 128 + the signal number, and every confirmed
/// write is in an image that passes check (before, SIGTERM left an empty image).
#[test]
fn a_signal_keeps_every_write_vmimg_io_confirmed() {
    use std::io::{BufRead, Write};
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        let dir = tempdir();
        let img = dir.path().join("img.qcow2");
        vmimg(["create", "-q", "-f", "qcow2", s(&img), "1G"]).ok();
        let mut child = std::process::Command::new(vmimg_bin())
            .args(["io", "-f", "qcow2", s(&img)])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || {
            for i in 0..5000u64 {
                let cmd = format!("write -P {} {} 64k\n", 1 + i % 250, i << 16);
                if stdin.write_all(cmd.as_bytes()).is_err() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        });
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut confirmed = Vec::new();
        let mut line = String::new();
        while out.read_line(&mut line).unwrap() > 0 {
            if let Some(off) = line.strip_prefix("wrote 65536/65536 bytes at offset ") {
                confirmed.push(off.trim().parse::<u64>().unwrap());
                if confirmed.len() == 300 {
                    kill(child.id() as i32, sig);
                }
            }
            line.clear();
        }
        let status = child.wait().unwrap();
        let _ = writer.join();
        assert_eq!(status.code(), Some(128 + sig), "signal {sig}");
        assert!(confirmed.len() >= 300);
        qemu_img(["check", "-f", "qcow2", s(&img)]).ok();
        let mut reads = vec!["-f".to_string(), "qcow2".into()];
        for off in &confirmed {
            reads.push("-c".into());
            reads.push(format!("read -P {} {off} 64k", 1 + (off >> 16) % 250));
        }
        reads.push(s(&img).into());
        let back = qemu_io(&reads);
        assert!(
            !back.stdout.contains("verification failed"),
            "signal {sig}: {}",
            back.stdout
        );
        back.ok();
    }
}

/// SIGTERM in the middle of a compressing convert: the jobs in flight finish, the target
/// is flushed, and it passes check with no leak; the exit status is 143.
#[test]
fn sigterm_during_convert_leaves_a_target_that_passes_check() {
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    let mut data = vec![0u8; 256 << 20];
    let mut rng = fastrand::Rng::with_seed(11);
    for chunk in data.chunks_mut(4096) {
        // Compressible but not trivially: a few random bytes per block.
        chunk[..64].iter_mut().for_each(|b| *b = rng.u8(..));
    }
    std::fs::write(&src, &data).unwrap();
    drop(data);
    let dst = dir.path().join("dst.qcow2");
    let child = std::process::Command::new(vmimg_bin())
        .args([
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&src),
            s(&dst),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the copy is under way (the target holds some compressed data).
    let start = std::time::Instant::now();
    while std::fs::metadata(&dst).map(|m| m.len()).unwrap_or(0) < (1 << 20) {
        assert!(start.elapsed() < std::time::Duration::from_secs(30));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    kill(child.id() as i32, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = qemu_img(["check", "-f", "qcow2", s(&dst)]).ok();
    assert!(check.stdout.contains("No errors"), "{}", check.stdout);
    let map = qemu_img(["map", "--output=json", "-f", "qcow2", s(&dst)]).ok();
    assert!(
        map.stdout.contains("\"data\": true") && map.stdout.contains("\"data\": false"),
        "the convert was not interrupted midway: {}",
        map.stdout
    );
}

/// A loop device over a file of `size` bytes, detached when dropped. These machines run
/// tests as root; where losetup is refused the test fails saying why.
struct LoopDev {
    dev: String,
    _dir: tempfile::TempDir,
}

impl LoopDev {
    fn attach(size: u64) -> LoopDev {
        let dir = tempdir();
        let backing = dir.path().join("loop.img");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(size)
            .unwrap();
        let r = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&backing)
            .output()
            .expect("run losetup");
        assert!(
            r.status.success(),
            "this test needs a loop device (root and losetup); the machine refused: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        LoopDev {
            dev: String::from_utf8_lossy(&r.stdout).trim().to_string(),
            _dir: dir,
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
    }
}

/// Block devices: the size comes from the device (not st_size, which is 0), convert reads
/// from and writes onto it (-n), io writes, zeroes and discards on it, resize is refused
/// unless the size stays, and a qcow2 image can be created on it; qemu-img agrees on all.
#[test]
fn block_devices_are_images_of_their_own_size() {
    let lo = LoopDev::attach(16 << 20);
    let dev = lo.dev.as_str();
    let dir = tempdir();
    let info = vmimg(["info", "-f", "raw", "--output=json", dev]).ok();
    assert!(
        info.stdout.contains("\"virtual-size\": 16777216")
            && info.stdout.contains("\"format\": \"host_device\""),
        "{}",
        info.stdout
    );
    let src = dir.path().join("src.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&src), "16M"]).ok();
    qemu_io([
        "-f",
        "qcow2",
        "-c",
        "write -P 0x42 0 4M",
        "-c",
        "write -P 0x43 9M 1M",
        s(&src),
    ])
    .ok();
    vmimg(["convert", "-n", "-f", "qcow2", "-O", "raw", s(&src), dev]).ok();
    qemu_img(["compare", "-f", "qcow2", "-F", "raw", s(&src), dev]).ok();
    let back = dir.path().join("back.qcow2");
    vmimg(["convert", "-f", "raw", "-O", "qcow2", dev, s(&back)]).ok();
    qemu_img(["compare", "-f", "qcow2", "-F", "qcow2", s(&src), s(&back)]).ok();
    vmimg([
        "io",
        "-f",
        "raw",
        "-c",
        "write -P 0x7 0 1M",
        "-c",
        "write -z 1M 1M",
        "-c",
        "write -z -u 2M 1M",
        "-c",
        "discard 3M 1M",
        dev,
    ])
    .ok();
    qemu_io([
        "-f",
        "raw",
        "-c",
        "read -P 0x7 0 1M",
        "-c",
        "read -P 0 1M 2M",
        "-c",
        "read -P 0x43 9M 1M",
        dev,
    ])
    .ok();
    let r = vmimg(["resize", "-f", "raw", dev, "32M"]);
    assert_eq!(r.status, 1, "{r:?}");
    assert!(
        r.stderr.contains("Cannot resize device files"),
        "{}",
        r.stderr
    );
    vmimg(["resize", "-f", "raw", dev, "16M"]).ok();
    vmimg(["create", "-q", "-f", "qcow2", dev, "8M"]).ok();
    qemu_img(["check", "-f", "qcow2", dev]).ok();
    qemu_io(["-f", "qcow2", "-c", "read -P 0 0 8M", dev]).ok();
    vmimg(["io", "-f", "qcow2", "-c", "write -P 0x9 1M 64k", dev]).ok();
    qemu_io(["-f", "qcow2", "-c", "read -P 0x9 1M 64k", dev]).ok();
}
