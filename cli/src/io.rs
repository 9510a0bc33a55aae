//! `vmimg io`: qemu-io's command language.
//!
//! Each command prints qemu-io's lines as soon as it completes (stdout is flushed after
//! every command, pipe or not). The exit status is 1 if any command failed, like qemu-io.

use crate::size::{io_size, parse_size};
use crate::{open_image_with, CmdResult};
use clap::Args;
use std::io::{BufRead, Write};
use std::time::Instant;
use vmimg::{BlockStatus, DiscardMode, Error, Image, OpenOptions, PreallocMode};

#[derive(Args, Debug)]
#[command(args_override_self = true)]
pub struct IoArgs {
    /// Image format (probed when absent; do not probe untrusted images).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Open read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Bypass the host page cache (O_DIRECT).
    #[arg(short = 'n', long = "nocache")]
    nocache: bool,
    /// Cache mode, as qemu-io's: none, directsync (O_DIRECT), writeback, writethrough,
    /// unsafe (syncs ignored).
    #[arg(short = 't', long = "cache")]
    cache: Option<String>,
    /// AIO mode, as qemu-io's (threads, native, io_uring): accepted; vmimg picks its own
    /// I/O path.
    #[arg(short = 'i', long = "aio", value_parser = ["threads", "native", "io_uring"])]
    aio: Option<String>,
    /// Force share: open even if another process writes the image (read-only use only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Snapshot mode: writes go to a temporary overlay, the image is left as it was.
    #[arg(short = 's', long = "snapshot")]
    snapshot: bool,
    /// Copy-on-read: what reads take from the backing chain is written into the image.
    #[arg(short = 'C', long = "copy-on-read")]
    copy_on_read: bool,
    /// The file name is a list of block-node options (`driver=qcow2,file.filename=F`).
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// QEMU objects (`secret,id=...`): accepted and unused until encryption exists.
    #[arg(long = "object")]
    object: Vec<String>,
    /// Command to run (repeatable); without any, commands are read from standard input.
    #[arg(short = 'c', long = "cmd")]
    commands: Vec<String>,
    /// The image (none: start without one, for `open`).
    filename: Option<String>,
}

/// A parsed command line: flags with their values, then positional words.
struct Parsed<'a> {
    flags: Vec<(char, Option<&'a str>)>,
    args: Vec<&'a str>,
}

impl Parsed<'_> {
    fn has(&self, c: char) -> bool {
        self.flags.iter().any(|(f, _)| *f == c)
    }
    fn value(&self, c: char) -> Option<&str> {
        self.flags
            .iter()
            .rev()
            .find(|(f, _)| *f == c)
            .and_then(|(_, v)| *v)
    }
}

/// getopt-style parsing: `-abc`, `-P 5`, `-P5`; options end at the first positional word.
fn parse_words<'a>(
    words: &[&'a str],
    with_value: &str,
    allowed: &str,
) -> Result<Parsed<'a>, String> {
    let mut flags = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = words[i];
        if !w.starts_with('-') || w.len() < 2 || w == "--" {
            if w == "--" {
                i += 1;
            }
            break;
        }
        for (pos, c) in w[1..].char_indices() {
            if !allowed.contains(c) && !with_value.contains(c) {
                return Err(format!("invalid option -- '{c}'"));
            }
            if with_value.contains(c) {
                let rest = &w[1 + pos + c.len_utf8()..];
                let value = if !rest.is_empty() {
                    rest
                } else {
                    i += 1;
                    *words
                        .get(i)
                        .ok_or_else(|| format!("option requires an argument -- '{c}'"))?
                };
                flags.push((c, Some(value)));
                break;
            }
            flags.push((c, None));
        }
        i += 1;
    }
    Ok(Parsed {
        flags,
        args: words[i..].to_vec(),
    })
}

/// Parses a pattern byte like qemu-io (decimal, `0x` hex or `0` octal; 0..=255).
fn parse_pattern(s: &str) -> Result<u8, String> {
    let v = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        i64::from_str_radix(h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        i64::from_str_radix(&s[1..], 8)
    } else {
        s.parse::<i64>()
    };
    match v {
        Ok(v) if (0..=255).contains(&v) => Ok(v as u8),
        _ => Err(format!("{s} is not a valid pattern byte")),
    }
}

fn parse_num(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|_| {
        format!("Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {s}")
    })
}

/// qemu-io's timing line.
fn timing_line(bytes: u64, ops: u64, elapsed: f64) -> String {
    let t = if elapsed >= 60.0 {
        format!("{:02}:{:05.2}", (elapsed / 60.0) as u64, elapsed % 60.0)
    } else {
        format!("{elapsed:05.2}")
    };
    let (rate, ops_rate) = if elapsed > 0.0 {
        (bytes as f64 / elapsed, ops as f64 / elapsed)
    } else {
        (0.0, 0.0)
    };
    format!(
        "{}, {ops} ops; {t} sec ({}/sec and {ops_rate:.4} ops/sec)",
        io_size(bytes as f64),
        io_size(rate)
    )
}

/// qemu-io's `-v` hex dump.
fn dump(buf: &[u8], offset: u64) -> String {
    let mut out = String::new();
    for (i, line) in buf.chunks(16).enumerate() {
        out += &format!("{:08x}: ", offset + i as u64 * 16);
        for b in line {
            out += &format!(" {b:02x}");
        }
        out += "  ";
        out.extend(line.iter().map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        }));
        out.push('\n');
    }
    out
}

/// The longest request qemu-io takes (QEMU's `BDRV_REQUEST_MAX_BYTES`).
const MAX_REQUEST: u64 = 2_147_483_136;

struct Session {
    /// The open image (none before `open`, after `close`, or when started without a file).
    image: Option<Image>,
    out: std::io::Stdout,
    /// The format given on the command line, for `open`.
    format: Option<String>,
    /// The open options given on the command line, for `open`.
    opts: OpenOptions,
    /// The file the open image was opened from, for `reopen`.
    file: Option<String>,
    /// The block-node options it was opened with (`open -o`, `--image-opts`), for `reopen`.
    node: Option<crate::blockopts::Node>,
    /// Copy-on-read (`open -C`, the `copy-on-read` driver): what a read takes from the
    /// backing chain is written into the image.
    cor: bool,
}

/// Commands that run without an open image.
const NO_FILE_OK: &[&str] = &["open", "o", "close", "c", "help", "sigraise", "sleep"];

/// Commands that need write permission on the image (qemu-io refuses them on a read-only
/// one before parsing them).
const NEEDS_WRITE: &[&str] = &[
    "write",
    "w",
    "writev",
    "aio_write",
    "discard",
    "d",
    "truncate",
    "t",
];

impl Session {
    /// The open image (commands needing one are only run when there is one).
    fn image(&self) -> &Image {
        self.image
            .as_ref()
            .expect("run_line checks that an image is open")
    }

    /// qemu-io's `info`: format name, cluster size, the offset of the VM state (qcow2's:
    /// the first L1 entry past the disk), then the format's own information.
    /// `Err(name)` for a driver without information (null-co), which qemu-io reports by
    /// its name and a failure.
    fn info(&self) -> Result<String, String> {
        let image = self.image();
        let desc = image.describe();
        let cluster = desc.cluster_size.unwrap_or(0);
        let specific = desc.format_specific.as_ref().map(|f| f.human(4));
        let vm_state = if image.format() == vmimg::Format::QCOW2 && cluster > 0 {
            let entry = if extended_l2(image) { 16 } else { 8 };
            let coverage = cluster * (cluster / entry);
            image.size().div_ceil(coverage) * coverage
        } else {
            0
        };
        // A protocol driver on top (null-co, blkdebug, file) is named as such, as QEMU does.
        let top = match (&self.node, &self.file) {
            (Some(node), _) => node.driver().map(str::to_string),
            (None, Some(f)) if crate::blockopts::is_special(f) => {
                crate::blockopts::with_name(Default::default(), Some(f))
                    .ok()
                    .and_then(|n| n.driver().map(str::to_string))
                    .or_else(|| self.format.clone())
            }
            _ => None,
        };
        let name = top
            .filter(|d| crate::blockopts::is_protocol(d))
            .unwrap_or_else(|| image.format().name().to_string());
        if matches!(name.as_str(), "null-co" | "null-aio") {
            return Err(format!("format name: {name}"));
        }
        let mut s = format!(
            "format name: {}\ncluster size: {}\nvm state offset: {}\n",
            name,
            io_size(cluster as f64),
            io_size(vm_state as f64)
        );
        if let Some(f) = specific {
            s += "Format specific information:\n";
            s += &f;
        }
        Ok(s)
    }

    /// qemu-io's `open [-rsnCkU] [-t CACHE] [-o OPTIONS] [FILE]` (OPTIONS: `driver=FMT`,
    /// `file.filename=FILE` or `filename=FILE`, `file.driver=file`).
    async fn open(&mut self, words: &[&str]) -> Result<(), String> {
        if self.image.is_some() {
            eprintln!("{}: file open already, try 'help close'", crate::prog());
            return Err(String::new());
        }
        let usage = "open [-rsCnkU] [-t cache] [-d discard] [-o options] [path] -- open the file \
                     specified by path";
        // As qemu-io (getopt): the complaint on stderr, the usage on stdout.
        let p = parse_words(words, "tdo", "rsnCkU").map_err(|e| {
            eprintln!("open: {e}");
            usage.to_string()
        })?;
        let file = p.args.first().map(|f| f.to_string());
        let node = match p.value('o') {
            Some(list) => Some(
                crate::blockopts::Node::parse_keyval(list)
                    .and_then(|n| crate::blockopts::with_name(n, file.as_deref()))
                    .map_err(|e| {
                        eprintln!("{}: {e}", crate::prog());
                        String::new()
                    })?,
            ),
            None => None,
        };
        if file.is_none() && node.is_none() {
            return Err("open: no file name given".into());
        }
        let mut opts = self.opts.clone();
        if p.has('r') {
            opts = opts.writable(false);
        }
        if p.has('n') {
            opts = opts.direct(true);
        }
        if p.has('U') {
            opts = opts.force_share(true);
        }
        if let Some(mode) = p.value('t') {
            opts = crate::cache_mode(opts, mode).map_err(|e| e.to_string())?;
        }
        let cor = p.has('C') || node.as_ref().is_some_and(is_cor);
        if p.has('C') && !opts.is_writable() {
            let e = vmimg::Error::new(
                vmimg::ErrorKind::ReadOnly,
                "Can't use copy-on-read on read-only device",
            );
            cant_open(file.as_deref(), &e);
            return Err(String::new());
        }
        let opened = match (&node, &file) {
            (Some(node), _) => crate::blockopts::open(node.clone(), opts).await,
            (None, Some(file)) => open_image_with(file, self.format.as_deref(), opts).await,
            (None, None) => unreachable!("checked above"),
        };
        let image = opened.map_err(|e| {
            cant_open(file.as_deref(), &e);
            String::new()
        })?;
        if cor && !image.is_writable() {
            cant_open(
                file.as_deref(),
                &vmimg::Error::new(vmimg::ErrorKind::ReadOnly, "Block node is read-only"),
            );
            return Err(String::new());
        }
        self.image = Some(image);
        self.file = file;
        self.node = node;
        self.cor = cor;
        Ok(())
    }

    /// Copy-on-read after a read of `[off, off + len)`: the clusters around it that the
    /// image does not allocate itself are written into it with what they read (zeros as
    /// zero writes), as QEMU's copy-on-read does.
    async fn copy_on_read(&self, off: u64, len: u64) -> Result<(), String> {
        let img = self.image();
        // QEMU copies whole subclusters (1/32 of a cluster with extended L2 entries).
        let cs = img.cluster_size().unwrap_or(512).max(512) / if extended_l2(img) { 32 } else { 1 };
        let (start, end) = (
            off / cs * cs,
            (off + len).div_ceil(cs).saturating_mul(cs).min(img.size()),
        );
        let mut pos = start;
        while pos < end {
            let st = img
                .block_status(pos, end - pos)
                .await
                .map_err(|e| failed("read", &e))?;
            let n = st.len;
            if st.depth != 0 || !st.present() {
                let mut buf = vec![0u8; n as usize];
                img.read(pos, &mut buf)
                    .await
                    .map_err(|e| failed("read", &e))?;
                let r = if vmimg::io_buf::is_zero(&buf) {
                    img.write_zeroes(pos, n, false).await
                } else {
                    img.write(pos, &buf).await
                };
                r.map_err(|e| failed("read", &e))?;
            }
            pos += n;
        }
        Ok(())
    }

    /// qemu-io's `reopen [-r|-w] [-t CACHE]`: the image closed and opened again, read-only
    /// or writable (as it was without either flag).
    async fn reopen(&mut self, words: &[&str]) -> Result<(), String> {
        let usage = "reopen [-d] [-r|-w] [-c cache] [-o options] -- reopens an image with new \
                     options";
        let p = parse_words(words, "cto", "rw").map_err(|e| {
            eprintln!("reopen: {e}");
            usage.to_string()
        })?;
        if p.has('r') && p.has('w') {
            eprintln!("{}: Only one -r/-w option may be given", crate::prog());
            return Err(String::new());
        }
        let (file, mut node) = (self.file.clone(), self.node.clone());
        if file.is_none() && node.is_none() {
            return Err("reopen: the image was not opened from a file".into());
        }
        let image = self.image();
        if let Some(list) = p.value('o') {
            // New options over those the image was opened with; its driver stays.
            let fail = |e: vmimg::Error| {
                eprintln!("{}: {e}", crate::prog());
                String::new()
            };
            let extra = crate::blockopts::Node::parse_keyval(list).map_err(fail)?;
            let refuse = |msg: &str| {
                eprintln!("{}: {msg}", crate::prog());
                Err(String::new())
            };
            if (p.has('r') || p.has('w')) && list.split(',').any(|o| o.starts_with("read-only=")) {
                return refuse("Cannot set both -r/-w and 'read-only'");
            }
            if (p.has('c') || p.has('t')) && list.split(',').any(|o| o.starts_with("cache.")) {
                return refuse("Cannot set both -c and the cache options");
            }
            let mut base = match node.take() {
                Some(n) => n,
                None => crate::blockopts::with_name(Default::default(), file.as_deref())
                    .map_err(fail)?,
            };
            let file_driver = base.file_driver();
            let backing = image.backing().map(|b| b.format().name());
            if let Err(msg) = crate::blockopts::check_reopen(
                &base,
                &extra,
                [Some(image.format().name()), Some(&file_driver), backing],
            ) {
                return refuse(&msg);
            }
            if base.driver().is_none() {
                base.insert(
                    "driver",
                    crate::blockopts::Val::Str(image.format().name().into()),
                )
                .map_err(fail)?;
            }
            base.merge(extra);
            node = Some(base);
        }
        let writable = if p.has('r') {
            false
        } else {
            p.has('w') || image.is_writable()
        };
        // A json: or protocol name gives its drivers itself (or with -f); a plain file
        // reopens in the format it has.
        let format = match &file {
            Some(f) if crate::blockopts::is_special(f) => self.format.clone(),
            _ => Some(image.format().name().to_string()),
        };
        let mut opts = self.opts.clone().writable(writable);
        if let Some(mode) = p.value('c').or(p.value('t')) {
            opts = crate::cache_mode(opts, mode).map_err(|e| e.to_string())?;
        }
        self.close().await?;
        // The closed handle's file (and its locks) goes away once the last request of it
        // has finished on the I/O threads: wait for that a little.
        let mut tries = 0;
        let image = loop {
            let opened = match (&node, &file) {
                (Some(node), _) => crate::blockopts::open(node.clone(), opts.clone()).await,
                (None, Some(file)) => open_image_with(file, format.as_deref(), opts.clone()).await,
                (None, None) => unreachable!("checked above"),
            };
            match opened {
                Err(e) if e.kind() == vmimg::ErrorKind::Locked && tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                r => break r.map_err(|e| format!("reopen failed: {e}"))?,
            }
        };
        self.image = Some(image);
        self.file = file;
        self.node = node;
        Ok(())
    }

    /// qemu-io's `close`: flushes and closes the image.
    async fn close(&mut self) -> Result<(), String> {
        if let Some(image) = self.image.take() {
            crate::signals::untrack(&image);
            if image.is_writable() {
                image
                    .flush()
                    .await
                    .map_err(|e| format!("close: flush failed: {e}"))?;
            }
        }
        Ok(())
    }

    fn say(&mut self, s: &str) {
        // A closed stdout must not abort the workload: ignore write errors.
        let mut lock = self.out.lock();
        let _ = writeln!(lock, "{s}");
        let _ = lock.flush();
    }

    fn report(&mut self, verb: &str, done: u64, off: u64, quiet: bool, start: Instant) {
        if quiet {
            return;
        }
        let elapsed = start.elapsed().as_secs_f64();
        self.say(&format!("{verb} {done}/{done} bytes at offset {off}"));
        self.say(&timing_line(done, 1, elapsed));
    }

    /// Runs one command line; returns false if it failed.
    async fn run_line(&mut self, line: &str) -> bool {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&cmd, rest)) = words.split_first() else {
            return true;
        };
        if self.image.is_none() && !NO_FILE_OK.contains(&cmd) {
            eprintln!("no file open, try 'help open'");
            return false;
        }
        if NEEDS_WRITE.contains(&cmd) && !self.image().is_writable() {
            eprintln!("{}: Block node is read-only", crate::prog());
            return false;
        }
        let result = match cmd {
            "open" | "o" => self.open(rest).await,
            "close" | "c" => self.close().await,
            "reopen" => self.reopen(rest).await,
            "read" | "r" => self.read(rest, false).await,
            "readv" => self.read(rest, true).await,
            "write" | "w" => self.write(rest, false).await,
            "writev" => self.write(rest, true).await,
            // qemu-io's asynchronous requests, each completed before the next command
            // (their reports therefore come in command order).
            "aio_read" => self.read(rest, true).await,
            "aio_write" => self.write(rest, true).await,
            "aio_flush" => Ok(()),
            "discard" | "d" => self.discard(rest).await,
            "flush" | "f" => self.image().sync().await.map_err(|e| failed("flush", &e)),
            "truncate" | "t" => self.truncate(rest).await,
            "info" | "i" => match self.info() {
                Ok(s) => {
                    self.say(s.trim_end());
                    Ok(())
                }
                Err(name) => {
                    // As qemu-io for a driver without information: the name twice, and
                    // the command fails.
                    self.say(&name);
                    self.say(&name);
                    return false;
                }
            },
            "length" | "l" => {
                let s = io_size(self.image().size() as f64);
                self.say(&s);
                Ok(())
            }
            "map" => self.map().await,
            "alloc" => self.alloc(rest).await,
            "sigraise" => {
                let n = rest.first().and_then(|w| w.parse::<i32>().ok());
                match n {
                    // SAFETY: raise() takes no pointers; the signal's default action (or
                    // this process's handler) runs as for a signal from outside.
                    Some(n) if n > 0 => unsafe {
                        libc::raise(n);
                        Ok(())
                    },
                    _ => Err("sigraise signal -- raises a signal".to_string()),
                }
            }
            _ => {
                eprintln!("command \"{cmd}\" not found");
                return false;
            }
        };
        match result {
            Ok(()) => true,
            Err(msg) => {
                if !msg.is_empty() {
                    self.say(&msg);
                }
                false
            }
        }
    }

    /// Offset and lengths (one for read/write, several for readv/writev).
    /// qemu-io's request limit: requests above it are refused before any buffer is
    /// allocated (`suffix` is " without -n" where `-n` would lift it).
    fn limit(p: &Parsed<'_>, lens: &[u64], vectored: bool, suffix: &str) -> Result<(), String> {
        let total = lens.iter().fold(0u64, |a, &b| a.saturating_add(b));
        if total <= MAX_REQUEST {
            return Ok(());
        }
        Err(if vectored {
            format!("The total number of bytes exceed the maximum size {MAX_REQUEST}")
        } else {
            format!(
                "length cannot exceed {MAX_REQUEST}{suffix}, given {}",
                p.args[1]
            )
        })
    }

    fn off_lens(p: &Parsed<'_>, vectored: bool, usage: &str) -> Result<(u64, Vec<u64>), String> {
        let ok_count = if vectored {
            p.args.len() >= 2
        } else {
            p.args.len() == 2
        };
        if !ok_count {
            return Err(usage.to_string());
        }
        let off = parse_num(p.args[0])?;
        let lens = p.args[1..]
            .iter()
            .map(|s| parse_num(s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((off, lens))
    }

    async fn read(&mut self, words: &[&str], vectored: bool) -> Result<(), String> {
        let usage = if vectored {
            "readv [-Cqv] [-P pattern] off len [len..] -- reads a number of bytes at a specified offset into multiple buffers"
        } else {
            "read [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset"
        };
        let p = parse_words(words, if vectored { "P" } else { "Psl" }, "abCiqvp")?;
        let pattern = p.value('P').map(parse_pattern).transpose()?;
        let (off, lens) = Self::off_lens(&p, vectored, usage)?;
        Self::limit(&p, &lens, vectored, "")?;
        let total: u64 = lens.iter().sum();
        // The part the pattern is checked in: -s (from the start of the read) and -l.
        let check_from = p.value('s').map(parse_num).transpose()?.unwrap_or(0);
        let check_len = match p.value('l') {
            Some(l) => parse_num(l)?,
            None => total.saturating_sub(check_from),
        };
        if check_from.saturating_add(check_len) > total {
            return Err("pattern verification range exceeds end of read data".into());
        }
        let mut buf =
            vec![0u8; usize::try_from(total).map_err(|_| "read failed: too large".to_string())?];
        let start = Instant::now();
        self.image()
            .read(off, &mut buf)
            .await
            .map_err(|e| failed(if vectored { "readv" } else { "read" }, &e))?;
        if self.cor && total > 0 {
            self.copy_on_read(off, total).await?;
        }
        let mut ok = true;
        if let Some(pat) = pattern {
            let range = check_from as usize..(check_from + check_len) as usize;
            if buf[range].iter().any(|&b| b != pat) {
                self.say(&format!(
                    "Pattern verification failed at offset {}, {check_len} bytes",
                    off + check_from
                ));
                ok = false;
            }
        }
        if p.has('v') {
            let d = dump(&buf, off);
            self.say(d.trim_end_matches('\n'));
        }
        self.report("read", total, off, p.has('q'), start);
        if ok {
            Ok(())
        } else {
            // The mismatch was reported above; the command still fails.
            Err(String::new())
        }
    }

    async fn write(&mut self, words: &[&str], vectored: bool) -> Result<(), String> {
        let usage = if vectored {
            "writev [-Cq] [-P pattern] off len [len..] -- writes a number of bytes at a specified offset from multiple buffers"
        } else {
            "write [-bcCfnqruz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset"
        };
        // -i (aio_write: invalidate the cache first) changes nothing here.
        let p = parse_words(words, "Ps", "bcCfinpqruz")?;
        let pattern = p.value('P').map(parse_pattern).transpose()?.unwrap_or(0xcd);
        if p.has('P') && p.has('s') {
            return Err("-P and -s cannot be specified at the same time".into());
        }
        let (off, lens) = Self::off_lens(&p, vectored, usage)?;
        // Zeroing allocates no buffer: with -n it may be as long as the image.
        if !(p.has('z') && p.has('n')) {
            Self::limit(&p, &lens, vectored, " without -n")?;
        }
        let total: u64 = lens.iter().sum();
        if p.has('u') && !p.has('z') {
            return Err("-u requires -z to be specified".into());
        }
        if p.has('b') || p.has('c') {
            for (value, name) in [(off, "offset"), (total, "count")] {
                if value % 512 != 0 {
                    return Err(format!(
                        "{value} is not a sector-aligned value for '{name}'"
                    ));
                }
            }
        }
        let start = Instant::now();
        if p.has('z') {
            if p.has('P') {
                return Err("-z and -P cannot be specified at the same time".into());
            }
            self.image()
                .write_zeroes(off, total, p.has('u'))
                .await
                .map_err(|e| failed("write", &e))?;
        } else {
            let n = usize::try_from(total).map_err(|_| "write failed: too large".to_string())?;
            let buf = match p.value('s') {
                // As qemu-io: the file's bytes, repeated to fill the request.
                Some(file) => {
                    let data =
                        std::fs::read(file).map_err(|e| format!("open {file} failed: {e}"))?;
                    if data.is_empty() {
                        return Err(format!("{file} is empty"));
                    }
                    data.iter().copied().cycle().take(n).collect()
                }
                None => vec![pattern; n],
            };
            if p.has('c') {
                self.write_compressed(off, &buf).await?;
            } else {
                self.image()
                    .write(off, &buf)
                    .await
                    .map_err(|e| failed(if vectored { "writev" } else { "write" }, &e))?;
            }
        }
        self.report("wrote", total, off, p.has('q'), start);
        Ok(())
    }

    /// `write -c`: whole clusters from a cluster boundary (the image's last one may be
    /// partial), each compressed, with qemu-io's errno texts for what it refuses.
    async fn write_compressed(&mut self, off: u64, buf: &[u8]) -> Result<(), String> {
        let img = self.image();
        let errno = |code: i32| {
            let e = Error::from_io(std::io::Error::from_raw_os_error(code));
            format!("write failed: {e}")
        };
        let cs = match img.cluster_size() {
            Some(cs) if img.format().entry().compressed_writes() => cs,
            _ => return Err(errno(libc::ENOTSUP)),
        };
        let end = off + buf.len() as u64;
        if off % cs != 0 || (buf.len() as u64 % cs != 0 && end != img.size()) {
            return Err(errno(libc::EINVAL));
        }
        for (i, cluster) in buf.chunks(cs as usize).enumerate() {
            img.write_compressed(off + i as u64 * cs, cluster)
                .await
                .map_err(|e| failed("write", &e))?;
        }
        Ok(())
    }

    async fn discard(&mut self, words: &[&str]) -> Result<(), String> {
        let p = parse_words(words, "", "Cq")?;
        let (off, lens) = Self::off_lens(
            &p,
            false,
            "discard [-Cq] off len -- discards a number of bytes at a specified offset",
        )?;
        Self::limit(&p, &lens, false, "")?;
        let start = Instant::now();
        self.image()
            .discard(off, lens[0], DiscardMode::ReadsAnything)
            .await
            .map_err(|e| failed("discard", &e))?;
        self.report("discard", lens[0], off, p.has('q'), start);
        Ok(())
    }

    async fn truncate(&mut self, words: &[&str]) -> Result<(), String> {
        let p = parse_words(words, "m", "")?;
        let [size] = p.args[..] else {
            return Err(
                "truncate [-m prealloc_mode] off -- truncates the current file at the given offset"
                    .into(),
            );
        };
        let size = parse_num(size)?;
        let mode = match p.value('m') {
            Some(m) => {
                PreallocMode::parse(m).ok_or_else(|| format!("Invalid preallocation mode '{m}'"))?
            }
            None => PreallocMode::Off,
        };
        self.image()
            .resize(size, mode)
            .await
            .map_err(|e| format!("truncate: {e}"))
    }

    /// qemu-io's `alloc OFFSET [COUNT]`: how many bytes of the range this image itself
    /// allocates (not its backing files), COUNT one sector by default.
    async fn alloc(&mut self, words: &[&str]) -> Result<(), String> {
        if words.is_empty() || words.len() > 2 {
            return Err("alloc offset [count] -- checks if offset is allocated in the file".into());
        }
        let off = parse_num(words[0])?;
        let mut count = match words.get(1) {
            Some(w) => parse_num(w)?,
            None => 512,
        };
        // As qemu-io: bytes, and a count that runs past the end is cut there.
        let end = off.saturating_add(count).min(self.image().size());
        count = end.saturating_sub(off).min(count);
        let (mut at, mut allocated) = (off, 0u64);
        while at < end {
            let st = self
                .image()
                .block_status(at, end - at)
                .await
                .map_err(|e| format!("alloc failed: {e}"))?;
            if st.len == 0 {
                break;
            }
            if st.depth == 0 && st.present() {
                allocated += st.len;
            }
            at += st.len;
        }
        self.say(&format!(
            "{allocated}/{count} bytes allocated at offset {}",
            io_size(off as f64)
        ));
        Ok(())
    }

    async fn map(&mut self) -> Result<(), String> {
        let size = self.image().size();
        let mut off = 0u64;
        let mut run: Option<(bool, u64, u64)> = None;
        let mut lines = Vec::new();
        while off < size {
            let st: BlockStatus = self
                .image()
                .block_status(off, size - off)
                .await
                .map_err(|e| format!("map failed: {e}"))?;
            let allocated = st.depth == 0 && st.present();
            match &mut run {
                Some((a, _, len)) if *a == allocated => *len += st.len,
                _ => {
                    if let Some(r) = run.take() {
                        lines.push(r);
                    }
                    run = Some((allocated, off, st.len));
                }
            }
            off += st.len;
        }
        lines.extend(run);
        for (allocated, start, len) in lines {
            self.say(&format!(
                "{} ({len:#x}) bytes {} allocated at offset {} ({start:#x})",
                io_size(len as f64),
                if allocated { "   " } else { "not" },
                io_size(start as f64),
            ));
        }
        Ok(())
    }
}

pub async fn run(args: IoArgs) -> CmdResult {
    let mut opts = OpenOptions::new()
        .writable(!args.read_only)
        .direct(args.nocache)
        .force_share(args.force_share);
    if let Some(mode) = &args.cache {
        opts = crate::cache_mode(opts, mode)?;
    }
    let _ = &args.aio;
    let _ = &args.object;
    let node = match &args.filename {
        Some(f) if args.image_opts => Some(crate::blockopts::Node::parse_keyval(f)?),
        _ => None,
    };
    let opened = match (&args.filename, &node) {
        (_, Some(node)) => Some(crate::blockopts::open(node.clone(), opts.clone()).await),
        (Some(f), None) if args.snapshot => {
            Some(snapshot_overlay(f, args.format.as_deref(), &opts).await)
        }
        (Some(f), None) => Some(open_image_with(f, args.format.as_deref(), opts.clone()).await),
        (None, None) => None,
    };
    let image = match opened {
        Some(Err(e)) => {
            cant_open(args.filename.as_deref().filter(|_| node.is_none()), &e);
            return Ok(1);
        }
        opened => opened.transpose()?,
    };
    let cor = args.copy_on_read || node.as_ref().is_some_and(is_cor);
    if let (true, Some(image)) = (cor, &image) {
        if !image.is_writable() {
            let why = if args.copy_on_read {
                "Can't use copy-on-read on read-only device"
            } else {
                "Block node is read-only"
            };
            let e = vmimg::Error::new(vmimg::ErrorKind::ReadOnly, why);
            cant_open(args.filename.as_deref().filter(|_| node.is_none()), &e);
            return Ok(1);
        }
    }
    let mut session = Session {
        image,
        out: std::io::stdout(),
        format: args.format.clone(),
        opts,
        // A snapshot overlay has no file to reopen.
        file: args
            .filename
            .clone()
            .filter(|_| !args.snapshot && node.is_none()),
        cor,
        node,
    };
    let mut failed = false;
    let mut lines = command_lines(args.commands);
    loop {
        // A signal stops the session between commands; what was done is flushed.
        let line = tokio::select! {
            biased;
            _ = crate::signals::stopped() => None,
            line = lines.recv() => line,
        };
        let Some(line) = line else { break };
        let line = line.map_err(vmimg::Error::from)?;
        if line.trim() == "quit" || line.trim() == "q" {
            break;
        }
        failed |= !session.run_line(&line).await;
    }
    if let Some(image) = &session.image {
        if image.is_writable() {
            image.flush().await?;
        }
    }
    crate::signals::check()?;
    Ok(u8::from(failed))
}

/// "VERB failed: REASON". As qemu-io, the reason is the errno's text alone (requests past
/// the end fail with EIO, as in QEMU's block layer); vmimg's own `io` says more.
fn failed(verb: &str, e: &vmimg::Error) -> String {
    if crate::prog() != "qemu-io" {
        return format!("{verb} failed: {e}");
    }
    let errno = match e.kind() {
        vmimg::ErrorKind::OutOfBounds | vmimg::ErrorKind::Corrupt => libc::EIO,
        _ => e.errno(),
    };
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    let text = text.split(" (os error").next().unwrap_or_default();
    format!("{verb} failed: {text}")
}

/// Whether the image's L2 entries are extended (subclusters of 1/32 of a cluster), as its
/// format-specific information says.
fn extended_l2(img: &Image) -> bool {
    img.describe()
        .format_specific
        .is_some_and(|f| f.human(0).contains("extended l2: true"))
}

/// Whether block-node options put QEMU's copy-on-read filter on top.
fn is_cor(node: &crate::blockopts::Node) -> bool {
    node.driver() == Some("copy-on-read")
}

/// qemu-io's report of an image that did not open: "can't open device FILE: " and the
/// reason, without the "Could not open 'FILE'" that qemu-img puts around it.
fn cant_open(file: Option<&str>, e: &vmimg::Error) {
    let reason = crate::open_reason(e);
    match file {
        Some(file) => eprintln!("{}: can't open device {file}: {reason}", crate::prog()),
        None => eprintln!("{}: can't open: {reason}", crate::prog()),
    }
}

/// qemu-io's `-s`: `file` read-only under a temporary qcow2 overlay that takes the writes
/// (its file is unlinked once open, so nothing is left behind).
async fn snapshot_overlay(
    file: &str,
    format: Option<&str>,
    opts: &OpenOptions,
) -> Result<Image, vmimg::Error> {
    let base = open_image_with(file, format, opts.clone().writable(false)).await?;
    let (size, base_format) = (base.size(), base.format().name());
    crate::signals::untrack(&base);
    drop(base);
    let abs = std::fs::canonicalize(file).map_err(vmimg::Error::from)?;
    let overlay = std::env::temp_dir().join(format!(
        "vmimg-snapshot-{}-{}.qcow2",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    vmimg::Qcow2Create::new(size)
        .backing_file(abs.to_string_lossy(), Some(base_format.to_string()))
        .create(&overlay)
        .await?;
    let image = open_image_with(
        &overlay.to_string_lossy(),
        Some("qcow2"),
        opts.clone().writable(true),
    )
    .await;
    let _ = std::fs::remove_file(&overlay);
    image
}

/// The commands to run: those given with `-c`, or else the lines of standard input, read
/// on a thread of their own (a blocked read must not hold up a signal's flush) and at most
/// a few lines ahead of the commands run.
fn command_lines(commands: Vec<String>) -> tokio::sync::mpsc::Receiver<std::io::Result<String>> {
    let (tx, rx) = tokio::sync::mpsc::channel(commands.len().max(16));
    if commands.is_empty() {
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                if tx.blocking_send(line).is_err() {
                    break;
                }
            }
        });
    } else {
        for c in commands {
            tx.try_send(Ok(c))
                .expect("the channel holds every -c command");
        }
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getopt_style_words() {
        let p = parse_words(&["-P", "0xab", "-q", "0", "4k"], "P", "q").unwrap();
        assert_eq!(p.value('P'), Some("0xab"));
        assert!(p.has('q'));
        assert_eq!(p.args, vec!["0", "4k"]);
        let p = parse_words(&["-zu", "1M", "64k"], "P", "zu").unwrap();
        assert!(p.has('z') && p.has('u'));
        let p = parse_words(&["-P5", "0", "1"], "P", "").unwrap();
        assert_eq!(p.value('P'), Some("5"));
        assert!(parse_words(&["-x", "0", "1"], "P", "q").is_err());
        assert!(parse_words(&["-P"], "P", "q").is_err());
    }

    #[test]
    fn patterns_like_qemu_io() {
        assert_eq!(parse_pattern("0xab"), Ok(0xab));
        assert_eq!(parse_pattern("255"), Ok(255));
        assert_eq!(parse_pattern("010"), Ok(8));
        assert_eq!(parse_pattern("0"), Ok(0));
        assert_eq!(
            parse_pattern("300"),
            Err("300 is not a valid pattern byte".into())
        );
        assert!(parse_pattern("0x1ff").is_err());
    }

    #[test]
    fn hex_dump_matches_qemu_io_layout() {
        let d = dump(&[0xcd; 20], 0x20);
        assert_eq!(
            d,
            "00000020:  cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd  ................\n\
             00000030:  cd cd cd cd  ....\n"
        );
    }

    #[test]
    fn timing_line_shape() {
        assert_eq!(
            timing_line(4096, 1, 0.5),
            "4 KiB, 1 ops; 00.50 sec (8 KiB/sec and 2.0000 ops/sec)"
        );
    }
}
