//! `vmimg`: qemu-img's language over the vmimg library.

mod amend;
mod bench;
mod blockopts;
mod chain;
mod check;
mod compare;
mod convert;
mod create;
mod dd;
mod info;
mod io;
mod map;
mod measure;
mod progress;
mod resize;
mod serve;
mod signals;
mod size;
mod snapshot;

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use vmimg::{Error, ErrorKind, Format, Image, ImageOpen, OpenOptions};

/// Disk-image toolkit: inspect, create, convert, compare and exercise VM disk images.
#[derive(Parser, Debug)]
#[command(
    name = "vmimg",
    version,
    about,
    propagate_version = true,
    args_override_self = true
)]
struct Cli {
    /// Treat images as hostile: the format must be given with -f, and no file named inside
    /// an image (backing file, data file) is opened.
    #[arg(long, global = true)]
    untrusted: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

/// The tool this process is: `vmimg`, or the QEMU tool whose name it was invoked under
/// (a symlink named `qemu-img`, `qemu-io` or `qemu-nbd`); messages start with it.
static PROG: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// The name messages start with (`vmimg`, or the personality's: `qemu-img`, ...).
pub fn prog() -> &'static str {
    PROG.get().copied().unwrap_or("vmimg")
}

/// The command line as vmimg's own: under a QEMU tool's name, the arguments of that tool
/// become those of the matching subcommand (`qemu-io ARGS` is `vmimg io ARGS`, `qemu-nbd
/// ARGS` is `vmimg serve ARGS`, `qemu-img ARGS` is `vmimg ARGS`).
fn personality(mut args: Vec<std::ffi::OsString>) -> (&'static str, Vec<std::ffi::OsString>) {
    let name = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("vmimg");
    let (prog, sub) = match name {
        "qemu-img" => ("qemu-img", None),
        "qemu-io" => ("qemu-io", Some("io")),
        "qemu-nbd" => ("qemu-nbd", Some("serve")),
        _ => ("vmimg", None),
    };
    if let Some(sub) = sub {
        args.insert(1, sub.into());
    }
    (prog, args)
}

/// Set from `--untrusted` before any command runs.
static UNTRUSTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// qemu-img's `--image-opts`: image arguments are block-node option lists.
static IMAGE_OPTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether qemu-img's `--image-opts` was given.
pub fn image_opts() -> bool {
    IMAGE_OPTS.load(std::sync::atomic::Ordering::Relaxed)
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show information about an image (like `qemu-img info`).
    Info(info::InfoArgs),
    /// Create a new image (like `qemu-img create`).
    Create(create::CreateArgs),
    /// Convert images between formats, keeping holes (like `qemu-img convert`).
    Convert(convert::ConvertArgs),
    /// Compare the guest contents of two images (like `qemu-img compare`).
    Compare(compare::CompareArgs),
    /// Run qemu-io commands on an image (like `qemu-io`).
    Io(io::IoArgs),
    /// Show the allocation map of an image (like `qemu-img map`).
    Map(map::MapArgs),
    /// Write an image's data into its backing file (like `qemu-img commit`).
    Commit(chain::CommitArgs),
    /// Change the backing file, keeping the content (like `qemu-img rebase`).
    Rebase(chain::RebaseArgs),
    /// Run a simple I/O benchmark (like `qemu-img bench`).
    Bench(bench::BenchArgs),
    /// Change options of an existing image (like `qemu-img amend`).
    Amend(amend::AmendArgs),
    /// Compute the size a new or converted image needs (like `qemu-img measure`).
    Measure(measure::MeasureArgs),
    /// Grow or shrink an image (like `qemu-img resize`).
    Resize(resize::ResizeArgs),
    /// Copy with dd's operands (like `qemu-img dd`).
    Dd(dd::DdArgs),
    /// List internal snapshots (like `qemu-img snapshot -l`).
    Snapshot(snapshot::SnapshotArgs),
    /// Check (and repair) the consistency of an image (like `qemu-img check`).
    Check(check::CheckArgs),
    /// Export an image over NBD (like `qemu-nbd`).
    Serve(serve::ServeArgs),
}

/// The result every command returns: an exit status, or an error.
pub type CmdResult = Result<u8, Error>;

/// Applies a qemu-img cache mode (`-t`/`-T`): `none` and `directsync` bypass the page
/// cache (`O_DIRECT`), `unsafe` ignores sync requests, `writeback` and `writethrough` use
/// the page cache and honour syncs.
pub fn cache_mode(opts: OpenOptions, mode: &str) -> Result<OpenOptions, Error> {
    let (direct, no_sync) = match mode {
        "writeback" | "writethrough" => (false, false),
        "none" | "directsync" => (true, false),
        "unsafe" => (false, true),
        other => return Err(usage_error(format!("Invalid cache option: {other}"))),
    };
    Ok(opts.direct(direct).no_sync(no_sync))
}

/// Opens an image read-only or writable, with the named format or a probed one.
pub async fn open_image(
    path: &str,
    format: Option<&str>,
    writable: bool,
    direct: bool,
) -> Result<Image, Error> {
    open_image_with(
        path,
        format,
        OpenOptions::new().writable(writable).direct(direct),
    )
    .await
}

/// Opens an image with the given options, with the named format or a probed one.
pub async fn open_image_with(
    path: &str,
    format: Option<&str>,
    opts: OpenOptions,
) -> Result<Image, Error> {
    if image_opts() {
        let opts = untrusted_if_asked(opts);
        let mut node = blockopts::Node::parse_keyval(path)?;
        if let Some(f) = format {
            node.insert("driver", blockopts::Val::Str(f.to_string()))?;
        }
        let image = blockopts::open(node, opts).await?;
        signals::track(&image);
        return Ok(image);
    }
    open_named_image(path, format, opts).await
}

/// `opts` for untrusted images when `--untrusted` was given.
fn untrusted_if_asked(opts: OpenOptions) -> OpenOptions {
    if UNTRUSTED.load(std::sync::atomic::Ordering::Relaxed) {
        opts.untrusted(true)
    } else {
        opts
    }
}

/// Opens the image file `path` (or the image a `json:` or protocol name describes), also
/// under `--image-opts` (the files an image names are file names).
pub async fn open_named_image(
    path: &str,
    format: Option<&str>,
    opts: OpenOptions,
) -> Result<Image, Error> {
    let opts = untrusted_if_asked(opts);
    let image = if blockopts::is_special(path) {
        // json:, blkdebug:, file: and the other names QEMU gives block-node options.
        blockopts::open_name(path, format, opts)
            .await
            .map_err(|e| opening(path, e))?
    } else {
        let mut open = ImageOpen::path(path).options(opts);
        if let Some(f) = format {
            open = open.format(Format::from_name(f)?);
        }
        open.open().await?
    };
    let probed =
        format.is_none() && !(blockopts::is_special(path) && blockopts::names_format(path));
    if probed && image.format() == Format::RAW && image.is_writable() {
        warn_probed_raw(path);
    }
    signals::track(&image);
    Ok(image)
}

/// Why an image did not open, without the "Could not open 'FILE'" around it (qemu-io's
/// "can't open device FILE: REASON", qemu-img create's "Could not open backing image").
pub fn open_reason(e: &Error) -> &Error {
    match e.inner() {
        Some(inner) if e.operation() == Some("open") => inner,
        _ => e,
    }
}

/// `e` as an error of opening the image `path`: "Could not open 'PATH': " around it, as
/// qemu-img reports every failure to open an image (once: an error that already says so
/// is left as it is).
pub fn opening(path: &str, e: Error) -> Error {
    if e.operation() == Some("open")
        && e.path() == Some(std::path::Path::new(path))
        && e.inner().is_some()
    {
        return e;
    }
    e.within("open", Some(std::path::Path::new(path)))
}

/// QEMU's warning for a writable image whose format was probed as raw.
pub fn warn_probed_raw(path: &str) {
    eprintln!(
        "WARNING: Image format was not specified for '{path}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on \
         block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove \
         the restrictions."
    );
}

/// Probes the format of `storage`, unless `--untrusted` forbids probing.
pub async fn probe_format(storage: &dyn vmimg::Storage) -> Result<Format, Error> {
    if UNTRUSTED.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(usage_error(
            "untrusted images need their format named: probing is unsafe on them",
        ));
    }
    Format::probe(storage).await
}

/// Refuses a target that is one of the files the sources are read from (a source itself
/// under any name, or a file of a source's backing chain): creating or writing it would
/// destroy what is being copied. The image locks refuse this too; this check also holds
/// with `-U` and where the file system has no locks.
pub fn refuse_aliased_target(dst: &str, names: &[String], sources: &[Image]) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let Ok(target) = std::fs::metadata(dst) else {
        return Ok(());
    };
    let id = |m: &std::fs::Metadata| (m.dev(), m.ino());
    for (name, src) in names.iter().zip(sources) {
        let mut layer = Some(src.clone());
        while let Some(img) = layer {
            let same = img
                .driver()
                .storage()
                .path()
                .and_then(|p| std::fs::metadata(p).ok())
                .is_some_and(|m| id(&m) == id(&target));
            if same {
                return Err(usage_error(format!(
                    "'{dst}' is the source image '{name}' or a file of its backing chain: \
                     converting onto it would destroy it"
                )));
            }
            layer = img.backing();
        }
    }
    Ok(())
}

/// An error about the command line itself.
pub fn usage_error(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

/// Caps glibc's malloc arenas at two. By default every thread that allocates may get an arena
/// of its own, and each keeps megabytes of freed memory: with the runtime's and the CPU
/// pool's threads that was over half of `convert -c`'s peak memory.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator tuning; it is called before any other thread
    // exists and takes no pointers.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let (name, mut args) = personality(std::env::args_os().collect());
    let _ = PROG.set(name);
    vmimg::qcow2::set_corruption_reporter(|notice| eprintln!("{notice}"));
    // qemu-img's --image-opts (every image argument is a list of block-node options), taken
    // out here once for all subcommands; qemu-io's is its own option.
    if name != "qemu-io" && args.len() > 2 && args.iter().skip(2).any(|a| a == "--image-opts") {
        args.retain(|a| a != "--image-opts");
        IMAGE_OPTS.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // QEMU's tools exit 1 on usage errors (clap's own status is 2).
            let status = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ if name == "vmimg" => 2,
                _ => 1,
            };
            return ExitCode::from(status);
        }
    };
    UNTRUSTED.store(cli.untrusted, std::sync::atomic::Ordering::Relaxed);
    // Exit status on error: 2 for compare (1 means "different" there), 1 elsewhere.
    let error_status = match cli.cmd {
        Cmd::Compare(_) => 2,
        _ => 1,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{}: cannot start the runtime: {e}", prog());
            return ExitCode::from(error_status);
        }
    };
    let result = rt.block_on(async move {
        if let Cmd::Serve(a) = cli.cmd {
            // The server drains its clients and flushes on signals itself.
            return serve::run(a).await;
        }
        // Commands that stop at their next step on a signal (and flush what they wrote).
        let stops = matches!(
            cli.cmd,
            Cmd::Io(_)
                | Cmd::Convert(_)
                | Cmd::Commit(_)
                | Cmd::Rebase(_)
                | Cmd::Dd(_)
                | Cmd::Bench(_)
        );
        signals::run_guarded(run_command(cli.cmd), stops).await
    });
    // Whatever still runs on the blocking pool (a command a signal dropped) is not waited
    // for: its writes are those of a killed process, which the formats survive.
    rt.shutdown_background();
    match result {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            eprintln!("{}: {e}", prog());
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::from(error_status)
        }
    }
}

async fn run_command(cmd: Cmd) -> CmdResult {
    match cmd {
        Cmd::Info(a) => info::run(a).await,
        Cmd::Create(a) => create::run(a).await,
        Cmd::Convert(a) => convert::run(a).await,
        Cmd::Compare(a) => compare::run(a).await,
        Cmd::Io(a) => io::run(a).await,
        Cmd::Map(a) => map::run(a).await,
        Cmd::Dd(a) => dd::run(a).await,
        Cmd::Resize(a) => resize::run(a).await,
        Cmd::Measure(a) => measure::run(a).await,
        Cmd::Amend(a) => amend::run(a).await,
        Cmd::Bench(a) => bench::run(a).await,
        Cmd::Commit(a) => chain::commit(a).await,
        Cmd::Rebase(a) => chain::rebase(a).await,
        Cmd::Snapshot(a) => snapshot::run(a).await,
        Cmd::Check(a) => check::run(a).await,
        Cmd::Serve(a) => serve::run(a).await,
    }
}
