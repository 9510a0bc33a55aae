//! `vmimg serve` against QEMU's NBD clients (qemu-img, qemu-io), side by side with qemu-nbd.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process listening on a Unix socket; killed (SIGTERM) when dropped.
struct Server {
    child: Option<Child>,
    socket: PathBuf,
}

impl Server {
    fn start(program: PathBuf, args: &[&str], socket: &Path) -> Server {
        let child = Command::new(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the NBD server");
        let mut server = Server {
            child: Some(child),
            socket: socket.to_path_buf(),
        };
        let start = Instant::now();
        while !socket.exists() {
            if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
                let out = server.child.take().unwrap().wait_with_output().unwrap();
                panic!(
                    "the server exited ({status}) before listening:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no socket after 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// `vmimg serve -k SOCKET ARGS...`.
    fn vmimg(socket: &Path, args: &[&str]) -> Server {
        let mut all = vec!["serve", "-k", s(socket)];
        all.extend(args);
        Server::start(vmimg_bin(), &all, socket)
    }

    /// `qemu-nbd -k SOCKET ARGS...`.
    fn qemu(socket: &Path, args: &[&str]) -> Server {
        let mut all = vec!["-k", s(socket)];
        all.extend(args);
        Server::start(qemu_tool("qemu-nbd"), &all, socket)
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// Stops the server (SIGTERM) and returns its exit status and stderr.
    fn stop(mut self) -> (i32, String) {
        let child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        wait(child)
    }

    /// Waits (at most 20 s) for the server to exit by itself.
    fn wait_exit(mut self) -> (i32, String) {
        wait(self.child.take().unwrap())
    }
}

fn wait(mut child: Child) -> (i32, String) {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the server did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// qemu-io on `uri` reading its commands from a pipe: the connection stays open while the
/// test sends commands (and while other clients come and go).
fn interactive_qemu_io(uri: &str) -> (Child, std::process::ChildStdin) {
    let mut child = Command::new(qemu_tool("qemu-io"))
        .args(["-f", "raw", uri])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    (child, stdin)
}

/// A qcow2 image with data, zeroed and unallocated stretches, made by qemu-io.
fn sample(path: &Path) {
    qemu_img(["create", "-q", "-f", "qcow2", s(path), "64M"]).ok();
    qemu_io([
        "-f",
        "qcow2",
        "-c",
        "write -P 0x11 0 1M",
        "-c",
        "write -z 4M 1M",
        "-c",
        "write -P 0x22 9M 100k",
        s(path),
    ])
    .ok();
}

/// The same random qemu-io workload through vmimg serve and through qemu-nbd, on twin
/// images: the same qemu-io output, the same allocation map over NBD, and images that
/// compare equal (ours also passes `qemu-img check`).
#[test]
fn qemu_io_workload_through_vmimg_serve_matches_qemu_nbd() {
    let dir = tempdir();
    let (ours, theirs) = (
        dir.path().join("ours.qcow2"),
        dir.path().join("theirs.qcow2"),
    );
    sample(&ours);
    sample(&theirs);
    let a = Server::vmimg(&dir.path().join("a.sock"), &["-t", "-f", "qcow2", s(&ours)]);
    let b = Server::qemu(
        &dir.path().join("b.sock"),
        &["-t", "-f", "qcow2", s(&theirs)],
    );
    let mut rng = fastrand::Rng::with_seed(11);
    for round in 0..3 {
        let mut args = vec!["-f".to_string(), "raw".into()];
        for _ in 0..40 {
            args.extend(["-c".to_string(), random_command(&mut rng, 64 << 20)]);
        }
        let ra = qemu_io(args.iter().cloned().chain([a.uri()])).ok();
        let rb = qemu_io(args.iter().cloned().chain([b.uri()])).ok();
        assert_eq!(
            io_data_lines(&ra.stdout),
            io_data_lines(&rb.stdout),
            "round {round}"
        );
        qemu_img(["compare", "-f", "raw", "-F", "raw", &a.uri(), &b.uri()]).ok();
    }
    let (status, err) = a.stop();
    assert_eq!(status, 0, "vmimg serve after SIGTERM: {err}");
    b.stop();
    qemu_img(["check", "-f", "qcow2", s(&ours)]).ok();
    qemu_img([
        "compare",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        s(&ours),
        s(&theirs),
    ])
    .ok();

    // Both servers on the same images, read-only: the same allocation map over NBD.
    for (i, img) in [&ours, &theirs].into_iter().enumerate() {
        let (c, d) = (format!("c{i}.sock"), format!("d{i}.sock"));
        let a = Server::vmimg(&dir.path().join(c), &["-t", "-r", "-f", "qcow2", s(img)]);
        let b = Server::qemu(&dir.path().join(d), &["-t", "-r", "-f", "qcow2", s(img)]);
        let map = |uri: String| {
            qemu_img(["map", "--output=json", "-f", "raw", &uri])
                .ok()
                .stdout
        };
        assert_eq!(
            map(a.uri()),
            map(b.uri()),
            "NBD allocation maps of {}",
            img.display()
        );
    }
}

/// qemu-img reads the export (info, convert out of it) and writes into it (convert -n).
#[test]
fn qemu_img_converts_out_of_and_into_the_export() {
    let dir = tempdir();
    let img = dir.path().join("img.qcow2");
    sample(&img);
    let server = Server::vmimg(&dir.path().join("s.sock"), &["-t", "-f", "qcow2", s(&img)]);
    let info = qemu_img(["info", "--output=json", &server.uri()]).ok();
    assert!(
        info.stdout.contains("\"virtual-size\": 67108864"),
        "{}",
        info.stdout
    );
    let out = dir.path().join("out.raw");
    qemu_img(["convert", "-f", "raw", "-O", "raw", &server.uri(), s(&out)]).ok();
    // The server holds the image (its locks refuse a plain reader): -U.
    qemu_img([
        "compare",
        "-U",
        "-f",
        "raw",
        "-F",
        "qcow2",
        s(&out),
        s(&img),
    ])
    .ok();

    let src = dir.path().join("src.raw");
    let mut data = vec![0u8; 64 << 20];
    let mut rng = fastrand::Rng::with_seed(3);
    for chunk in data.chunks_mut(1 << 20).step_by(3) {
        rng.fill(chunk);
    }
    std::fs::write(&src, &data).unwrap();
    qemu_img([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        s(&src),
        &server.uri(),
    ])
    .ok();
    qemu_img(["compare", "-f", "raw", "-F", "raw", s(&src), &server.uri()]).ok();
    let (status, err) = server.stop();
    assert_eq!(status, 0, "{err}");
    qemu_img(["check", "-f", "qcow2", s(&img)]).ok();
    qemu_img(["compare", "-f", "raw", "-F", "qcow2", s(&src), s(&img)]).ok();
}

#[test]
fn read_only_exports_refuse_writes() {
    let dir = tempdir();
    let img = dir.path().join("img.qcow2");
    sample(&img);
    let before = std::fs::read(&img).unwrap();
    let server = Server::vmimg(
        &dir.path().join("s.sock"),
        &["-t", "-r", "-f", "qcow2", s(&img)],
    );
    // QEMU's client sees the read-only flag and refuses to open the export for writing
    // (the server's own refusal, NBD_EPERM, is covered by the library's tests).
    let r = qemu_io(["-f", "raw", "-c", "write -P 1 0 4k", &server.uri()]);
    assert!(
        r.status != 0 && r.stderr.contains("Permission denied"),
        "a write to a read-only export must fail:\n{}{}",
        r.stdout,
        r.stderr
    );
    qemu_io(["-f", "raw", "-r", "-c", "read -P 0x11 0 1M", &server.uri()]).ok();
    server.stop();
    assert!(std::fs::read(&img).unwrap() == before, "the image changed");
}

/// Without -t the server serves one client and exits when it leaves (qemu-nbd's default),
/// removing its socket; a wrong export name is refused.
#[test]
fn one_shot_server_exits_after_its_client_and_names_are_checked() {
    let dir = tempdir();
    let img = dir.path().join("img.qcow2");
    sample(&img);
    let sock = dir.path().join("s.sock");
    let server = Server::vmimg(&sock, &["-x", "disk", "-f", "qcow2", s(&img)]);
    let wrong = qemu_img([
        "info",
        &format!("nbd+unix:///other?socket={}", sock.display()),
    ]);
    assert_ne!(wrong.status, 0, "an unknown export name must be refused");
    let right = format!("nbd+unix:///disk?socket={}", sock.display());
    qemu_io(["-f", "raw", "-c", "read -P 0x22 9M 100k", &right]).ok();
    let (status, err) = server.wait_exit();
    assert_eq!(status, 0, "{err}");
    assert!(!sock.exists(), "the socket is removed at exit");
}

#[test]
fn bad_options_are_refused_before_listening() {
    let dir = tempdir();
    let img = dir.path().join("img.qcow2");
    sample(&img);
    let r = vmimg([
        "serve",
        "-k",
        s(&dir.path().join("s.sock")),
        "--discard",
        "bogus",
        s(&img),
    ]);
    assert_eq!(r.status, 1);
    assert!(
        r.stderr.contains("Invalid discard option: bogus"),
        "{}",
        r.stderr
    );
    let missing = vmimg([
        "serve",
        "-k",
        s(&dir.path().join("t.sock")),
        s(&dir.path().join("nope")),
    ]);
    assert_eq!(missing.status, 1);
    assert!(!dir.path().join("t.sock").exists());
}

/// `-e 2`: two clients at once, each seeing the other's writes (one image handle; the
/// export then advertises multi-connection support).
#[test]
fn two_clients_at_once_share_the_image() {
    let dir = tempdir();
    let img = dir.path().join("img.qcow2");
    sample(&img);
    let server = Server::vmimg(
        &dir.path().join("s.sock"),
        &["-t", "-e", "2", "-f", "qcow2", s(&img)],
    );
    // qemu-io keeps its connection open while a second one writes and reads.
    let (first, mut stdin) = interactive_qemu_io(&server.uri());
    use std::io::Write;
    writeln!(stdin, "write -P 0x33 2M 64k").unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    qemu_io([
        "-f",
        "raw",
        "-c",
        "read -P 0x33 2M 64k",
        "-c",
        "write -P 0x44 3M 4k",
        &server.uri(),
    ])
    .ok();
    writeln!(stdin, "read -P 0x44 3M 4k").unwrap();
    drop(stdin);
    let out = first.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("Pattern verification failed"), "{stdout}");
    let (status, err) = server.stop();
    assert_eq!(status, 0, "{err}");
    qemu_io(["-f", "qcow2", "-c", "read -P 0x44 3M 4k", s(&img)]).ok();
}

/// SIGTERM while a client is writing: what the client was told is written survives, and
/// the image is left clean (metadata flushed before exit).
#[test]
fn sigterm_during_writes_leaves_a_clean_image() {
    let dir = tempdir();
    let img = dir.path().join("img.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&img), "256M"]).ok();
    let server = Server::vmimg(&dir.path().join("s.sock"), &["-t", "-f", "qcow2", s(&img)]);
    let (writer, mut stdin) = interactive_qemu_io(&server.uri());
    use std::io::Write;
    writeln!(stdin, "write -P 0x5a 0 8M").unwrap();
    for i in 0..200u64 {
        let _ = writeln!(stdin, "write -P 0x5b {} 64k", (8 << 20) + i * 131072);
    }
    let _ = stdin.flush();
    std::thread::sleep(Duration::from_millis(200));
    let (status, err) = server.stop();
    assert_eq!(status, 0, "{err}");
    drop(stdin);
    let _ = writer.wait_with_output();
    qemu_img(["check", "-f", "qcow2", s(&img)]).ok();
}

/// A socket file left by a killed server is replaced; a regular file in the way is not.
#[test]
fn a_stale_socket_is_replaced_but_other_files_are_not() {
    let dir = tempdir();
    let img = dir.path().join("img.qcow2");
    sample(&img);
    let sock = dir.path().join("s.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let server = Server::start(
        vmimg_bin(),
        &["serve", "-t", "-k", s(&sock), "-f", "qcow2", s(&img)],
        &sock,
    );
    // The stale file existed before: wait until the server really listens.
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "not listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    qemu_io(["-f", "raw", "-c", "read -P 0x11 0 64k", &server.uri()]).ok();
    server.stop();

    let file = dir.path().join("f.sock");
    std::fs::write(&file, b"not a socket").unwrap();
    let r = vmimg(["serve", "-k", s(&file), "-f", "qcow2", s(&img)]);
    assert_eq!(r.status, 1, "{}", r.stderr);
    assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");
}

/// `--discard=unmap` carries out trims (the space is released); the default ignores them.
#[test]
fn discard_unmap_releases_space_and_ignore_keeps_it() {
    let dir = tempdir();
    for (mode, released) in [("unmap", true), ("ignore", false)] {
        let img = dir.path().join(format!("{mode}.qcow2"));
        sample(&img);
        let sock = dir.path().join(format!("{mode}.sock"));
        let server = Server::vmimg(&sock, &["-t", "--discard", mode, "-f", "qcow2", s(&img)]);
        qemu_io(["-f", "raw", "-c", "discard 0 1M", &server.uri()]).ok();
        server.stop();
        let map = qemu_img(["map", "--output=json", "-f", "qcow2", s(&img)])
            .ok()
            .stdout;
        let first = map.lines().next().unwrap().to_string();
        assert_eq!(
            !first.contains("\"data\": true"),
            released,
            "{mode}: first extent {first}"
        );
        qemu_img(["check", "-f", "qcow2", s(&img)]).ok();
    }
}

/// TCP: qemu-img reaches the export as nbd://127.0.0.1:PORT.
#[test]
fn serves_over_tcp() {
    let dir = tempdir();
    let img = dir.path().join("img.qcow2");
    sample(&img);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(vmimg_bin())
        .args([
            "serve",
            "-t",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-f",
            "qcow2",
            s(&img),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "the server exited");
        assert!(start.elapsed() < Duration::from_secs(20), "not listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd://127.0.0.1:{port}");
    qemu_io(["-f", "raw", "-c", "read -P 0x22 9M 100k", &uri]).ok();
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let (status, err) = wait(child);
    assert_eq!(status, 0, "{err}");
}
