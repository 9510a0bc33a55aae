//! Test helpers: run vmimg and QEMU's tools in temporary directories.
//!
//! QEMU's tools are required: when one is missing, the test fails with a message naming the
//! Debian package (`qemu-utils`) rather than passing quietly.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `dir/bin` holding symlinks to vmimg named as QEMU's tools (its personalities).
pub fn qemu_named_symlinks(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for t in ["qemu-img", "qemu-io", "qemu-nbd"] {
        std::os::unix::fs::symlink(vmimg_bin(), bin.join(t)).unwrap();
    }
    bin
}

/// The vmimg binary under test.
pub fn vmimg_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmimg"))
}

/// Finds a QEMU tool on PATH or fails the test naming the package that provides it.
pub fn qemu_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` is not installed: these interop tests need QEMU's tools. \
         Install the Debian package `qemu-utils` (apt-get install -y qemu-utils)."
    );
}

/// Result of running a command, with helpers for assertions.
#[derive(Debug)]
pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            status: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    /// Panics with both output streams unless the exit status is `expected`.
    pub fn expect_status(self, expected: i32) -> Self {
        assert_eq!(
            self.status, expected,
            "unexpected exit status\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    pub fn ok(self) -> Self {
        self.expect_status(0)
    }
}

fn run(mut cmd: Command) -> Run {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out.into()
}

/// Runs `vmimg ARGS...`.
pub fn vmimg<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut c = Command::new(vmimg_bin());
    c.args(args);
    run(c)
}

/// Runs `qemu-img ARGS...`.
pub fn qemu_img<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut c = Command::new(qemu_tool("qemu-img"));
    c.args(args);
    run(c)
}

/// Runs `qemu-io ARGS...`.
pub fn qemu_io<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut c = Command::new(qemu_tool("qemu-io"));
    c.args(args);
    run(c)
}

/// A temporary directory for one test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmimg-test-")
        .tempdir()
        .expect("create temp dir")
}

/// `path` as a &str (test paths are always UTF-8).
pub fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 test path")
}

/// Bytes allocated on disk for a file.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// The data lines of qemu-io output (without the timing lines, which differ run to run).
pub fn io_data_lines(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| !l.contains(" ops; ") && !l.trim().is_empty())
        .collect()
}

/// Runs `program ARGS...` with `dir` as the current directory (relative names inside images,
/// such as backing files, are then written and resolved as the tools see them from `dir`).
fn run_in<I, S>(program: PathBuf, dir: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut c = Command::new(program);
    c.args(args).current_dir(dir);
    run(c)
}

/// Runs `vmimg ARGS...` in `dir`.
pub fn vmimg_in<I, S>(dir: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    run_in(vmimg_bin(), dir, args)
}

/// Runs `qemu-img ARGS...` in `dir`.
pub fn qemu_img_in<I, S>(dir: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    run_in(qemu_tool("qemu-img"), dir, args)
}

/// Runs `qemu-io ARGS...` in `dir`.
pub fn qemu_io_in<I, S>(dir: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    run_in(qemu_tool("qemu-io"), dir, args)
}

/// Compares two files byte for byte; the error names the length mismatch or the first
/// differing offset with both bytes.
pub fn compare_files(ours: &Path, theirs: &Path) -> Result<(), String> {
    let a = std::fs::read(ours).map_err(|e| format!("cannot read {}: {e}", ours.display()))?;
    let b = std::fs::read(theirs).map_err(|e| format!("cannot read {}: {e}", theirs.display()))?;
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        return Err(format!(
            "contents differ first at byte {i} ({i:#x}): {} has {:#04x}, {} has {:#04x}",
            ours.display(),
            a[i],
            theirs.display(),
            b[i]
        ));
    }
    if a.len() != b.len() {
        return Err(format!(
            "lengths differ: {} is {} bytes, {} is {} bytes (common prefix identical)",
            ours.display(),
            a.len(),
            theirs.display(),
            b.len()
        ));
    }
    Ok(())
}

/// One random qemu-io command over an image of `size` bytes.
pub fn random_command(rng: &mut fastrand::Rng, size: u64) -> String {
    let len = match rng.u8(0..4) {
        0 => rng.u64(1..600),
        1 => rng.u64(1..70_000),
        2 => 4096 * rng.u64(1..40),
        _ => rng.u64(1..300_000),
    }
    .min(size);
    let mut off = rng.u64(0..=size - len);
    if rng.bool() {
        off = off / 4096 * 4096;
    }
    match rng.u8(0..10) {
        0..=3 => format!("write -P {} {off} {len}", rng.u8(..)),
        4 => format!("write -z {off} {len}"),
        5 => format!("write -z -u {off} {len}"),
        6 => format!("discard {off} {len}"),
        7 => "flush".to_string(),
        _ => format!("read {off} {len}"),
    }
}

/// A tool that holds an image open, reading its commands from a pipe (qemu-io, `vmimg io`,
/// a server): killed when dropped.
pub struct Holder {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Holder {
    /// Starts `program ARGS...`; when `probe` is given (a command such as `length`), sends
    /// it and waits for its answer, so that the image is open when this returns.
    pub fn start(program: PathBuf, args: &[&str], probe: Option<&str>) -> Holder {
        use std::process::Stdio;
        let mut child = Command::new(&program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let stdin = child.stdin.take();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut h = Holder {
            child,
            stdin,
            stdout,
        };
        if let Some(cmd) = probe {
            h.send(cmd);
        }
        h
    }

    /// `qemu-io ARGS...` holding its image.
    pub fn qemu_io(args: &[&str]) -> Holder {
        Holder::start(qemu_tool("qemu-io"), args, Some("length"))
    }

    /// `vmimg io ARGS...` holding its image.
    pub fn vmimg_io(args: &[&str]) -> Holder {
        let mut all = vec!["io"];
        all.extend(args);
        Holder::start(vmimg_bin(), &all, Some("length"))
    }

    /// Sends one command and waits for its first line of output; panics with the tool's
    /// stderr if it exits instead.
    pub fn send(&mut self, cmd: &str) -> String {
        use std::io::{BufRead, Write};
        let stdin = self.stdin.as_mut().expect("stdin is open");
        writeln!(stdin, "{cmd}").and_then(|()| stdin.flush()).ok();
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).unwrap_or(0);
        if n == 0 {
            let status = self.child.wait().unwrap();
            let mut err = String::new();
            use std::io::Read;
            self.child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .ok();
            panic!("the holder exited ({status}) instead of answering '{cmd}':\n{err}");
        }
        line
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Closes its stdin (tools that read commands then exit by themselves) and waits at
    /// most 20 s for it to exit; returns its exit status (`None` if killed by a signal).
    pub fn finish(mut self) -> Option<i32> {
        drop(self.stdin.take());
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "the holder did not exit within 20 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
