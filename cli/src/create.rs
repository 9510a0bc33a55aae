//! `vmimg create`, and the creation step `convert` and `dd` share: options checked against
//! the format's schema (from the registry) before anything is printed or created.

use crate::size::parse_size;
use crate::{usage_error, CmdResult};
use clap::Args;
use vmimg::format::{
    options_help, parse_option_list, FormatOptions, ImageFormat, OptionKind, OptionSpec,
    OptionValue,
};
use vmimg::storage::{set_created_file_options, CreatedFileOptions};
use vmimg::{Error, Format, PreallocMode};

/// Options of the file an image is created in, which qemu-img takes with the format's own
/// (its file protocol's): applied to every file the creation makes.
const FILE_OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "nocow",
        kind: OptionKind::Bool,
        help: "Turn off copy-on-write (valid only on btrfs)",
    },
    OptionSpec {
        name: "extent_size_hint",
        kind: OptionKind::Size,
        help: "Extent size hint for the image file, 0 to disable",
    },
];

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Image format.
    #[arg(short = 'f', default_value = "raw")]
    format: String,
    /// Backing file.
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Do not open the backing file (its size must then be given).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Format options, `key=value[,key=value...]`; `-o help` lists them.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image to create (optional with `-o help`).
    filename: Option<String>,
    /// Virtual size, with optional suffix k, M, G, T, P, E.
    size: Option<String>,
}

/// Parses a `preallocation=` value.
pub fn parse_prealloc(v: &str) -> Result<PreallocMode, Error> {
    PreallocMode::parse(v).ok_or_else(|| usage_error(format!("Invalid preallocation mode: '{v}'")))
}

/// An output format named by `-f`/`-O`: qemu-img's message for names it does not know.
pub fn output_format(name: &str) -> Result<Format, Error> {
    Format::from_name(name).map_err(|e| {
        if e.to_string().starts_with("Unknown driver") {
            usage_error(format!("Unknown file format '{name}'"))
        } else {
            e
        }
    })
}

/// Whether `-o` asks for the option list (`-o help`, `-o ?`).
pub fn wants_help(options: &[String]) -> bool {
    options
        .iter()
        .flat_map(|o| o.split(','))
        .any(|o| o == "help" || o == "?")
}

/// `-o help`: the format's creation options, as qemu-img lists them.
pub fn print_help(format: Format) {
    let specs = format.entry().create_options();
    print!("{}", options_help(format.name(), specs));
}

/// A creation checked and ready: the format and its options (size included).
pub struct CreatePlan {
    pub format: Format,
    pub options: FormatOptions,
    /// The [`FILE_OPTIONS`] given.
    pub file_options: FormatOptions,
}

/// What a creation is made from, besides `-o` options.
pub struct CreateArgsCommon<'a> {
    pub filename: &'a str,
    /// Size given apart from `-o` (the positional size, or a convert's source size).
    pub size: Option<u64>,
    pub backing: Option<&'a str>,
    pub backing_format: Option<&'a str>,
    /// `-u`: do not open the backing file.
    pub unsafe_backing: bool,
}

/// Checks a creation against the format's schema, with qemu-img's rules: the size given
/// once, a backing file only with its format (qemu-img 10), the size taken from the backing
/// file when missing (which is opened unless `-u`). Nothing is created or printed here.
pub async fn plan(
    format: Format,
    items: &[(String, String)],
    a: CreateArgsCommon<'_>,
) -> Result<CreatePlan, Error> {
    let entry: &dyn ImageFormat = format.entry();
    let prefixed = |e: Error| usage_error(format!("{}: {e}", a.filename));
    // The format's own options first; the file's are those the format does not have.
    let (file_items, items): (Vec<_>, Vec<_>) = items.iter().cloned().partition(|(k, _)| {
        !entry.create_options().iter().any(|s| s.name == k)
            && FILE_OPTIONS.iter().any(|s| s.name == k)
    });
    let mut options = FormatOptions::parse(entry.create_options(), &items).map_err(prefixed)?;
    let file_options = FormatOptions::parse(FILE_OPTIONS, &file_items).map_err(prefixed)?;
    if let Some(size) = a.size {
        if options.get("size").is_some() {
            return Err(prefixed(usage_error(
                "The image size must be specified only once",
            )));
        }
        options.set("size", OptionValue::Size(size));
    }
    for (key, value) in [
        ("backing_file", a.backing),
        ("backing_fmt", a.backing_format),
    ] {
        if let Some(v) = value {
            if !entry.create_options().iter().any(|s| s.name == key) {
                return Err(prefixed(usage_error(format!(
                    "Backing file not supported for file format '{}'",
                    format.name()
                ))));
            }
            options.set(key, OptionValue::Str(v.to_string()));
        }
    }
    // qemu-img 10's order: the backing file is opened (its format probed when not named)
    // unless -u; then a missing backing format is refused, naming what the probe found;
    // then the size comes from the backing file when it was not given.
    match (options.str("backing_file"), a.unsafe_backing) {
        (Some(b), false) => {
            let dir = std::path::Path::new(a.filename)
                .parent()
                .unwrap_or(std::path::Path::new(""));
            // json: and protocol names are not paths relative to the image.
            let path = if crate::blockopts::is_special(b) {
                b.to_string()
            } else {
                dir.join(b).to_string_lossy().into_owned()
            };
            let f = options.str("backing_fmt");
            let img = crate::open_named_image(&path, f, vmimg::OpenOptions::new())
                .await
                .map_err(|e| {
                    prefixed(usage_error(format!(
                        "{}\nCould not open backing image.",
                        crate::open_reason(&e)
                    )))
                })?;
            if f.is_none() {
                return Err(prefixed(usage_error(format!(
                    "Backing file specified without backing format\nDetected format of {}.",
                    img.format()
                ))));
            }
            if options.get("size").is_none() {
                options.set("size", OptionValue::Size(img.size()));
            }
        }
        (Some(_), true) if options.str("backing_fmt").is_none() => {
            return Err(prefixed(usage_error(
                "Backing file specified without backing format",
            )));
        }
        _ => {}
    }
    match options.size("size") {
        None => return Err(usage_error("Image creation needs a size parameter")),
        Some(size) if size > i64::MAX as u64 => {
            return Err(usage_error(format!(
                "Invalid image size specified. Must be between 0 and {}.",
                i64::MAX
            )))
        }
        Some(_) => {}
    }
    Ok(CreatePlan {
        format,
        options,
        file_options,
    })
}

impl CreatePlan {
    /// qemu-img's "Formatting" line.
    pub fn formatting_line(&self, filename: &str) -> String {
        let mut summary = self.format.entry().create_summary(&self.options);
        // After the format's options, in qemu-img's order: nocow, the file's preallocation
        // (raw's, which is the file's in QEMU), extent_size_hint.
        if let Some(nocow) = self.file_options.bool("nocow") {
            let nocow = format!(" nocow={}", if nocow { "on" } else { "off" });
            match summary.find(" preallocation=") {
                Some(at) if self.format == Format::RAW => summary.insert_str(at, &nocow),
                _ => summary.push_str(&nocow),
            }
        }
        if let Some(hint) = self.file_options.size("extent_size_hint") {
            summary.push_str(&format!(" extent_size_hint={hint}"));
        }
        format!("Formatting '{filename}', fmt={} {summary}", self.format)
    }

    /// Sets up the files the creation makes with the [`FILE_OPTIONS`] given, as qemu-img:
    /// a hint of 1 MiB unless one is given, a warning when a given hint cannot be set.
    fn set_file_options(&self, filename: &str) -> Result<(), Error> {
        let hint = self.file_options.size("extent_size_hint");
        let extent_size_hint = match hint.map(u32::try_from) {
            None => CreatedFileOptions::default().extent_size_hint,
            Some(Ok(h)) => h,
            Some(Err(_)) => {
                return Err(usage_error(format!(
                    "{filename}: Extent size hint is too large"
                )))
            }
        };
        fn warn(e: &std::io::Error) {
            let e = Error::from_io(std::io::Error::from_raw_os_error(
                e.raw_os_error().unwrap_or(libc::EIO),
            ));
            eprintln!(
                "{}: warning: Failed to set extent size hint: {e}",
                crate::prog()
            );
        }
        set_created_file_options(CreatedFileOptions {
            extent_size_hint,
            nocow: self.file_options.bool("nocow").unwrap_or(false),
            hint_failed: (extent_size_hint != 0 && hint.is_some()).then_some(warn as fn(&_)),
        });
        Ok(())
    }

    /// Creates the image (`file:PATH` creates PATH, as qemu-img).
    pub async fn create(&self, filename: &str) -> Result<(), Error> {
        self.set_file_options(filename)?;
        let plain = match filename.strip_prefix("file:") {
            Some(rest) => crate::blockopts::protocol_path(rest),
            None => filename.to_string(),
        };
        let path = std::path::Path::new(&plain);
        self.format
            .entry()
            .create(path, &self.options)
            .await
            .map_err(|e| {
                // qemu-img's "FILE: reason" (its errors of the file it creates).
                if e.path().is_none_or(|p| p == path) {
                    Error::new(e.kind(), format!("{filename}: {}", e.reason()))
                } else {
                    e
                }
            })
    }
}

pub async fn run(args: CreateArgs) -> CmdResult {
    let format = output_format(&args.format).map_err(|e| match &args.filename {
        Some(f) => usage_error(format!("{f}: {e}")),
        None => e,
    })?;
    if wants_help(&args.options) {
        print_help(format);
        return Ok(0);
    }
    let filename = args
        .filename
        .as_deref()
        .ok_or_else(|| usage_error("Expecting image file name"))?;
    if format.entry().create_options().is_empty() {
        // As qemu-img: no "Formatting" line for formats that cannot be created.
        return Err(usage_error(format!(
            "{filename}: Format driver '{format}' does not support image creation"
        )));
    }
    let size = args
        .size
        .as_deref()
        .map(parse_size)
        .transpose()
        .map_err(usage_error)?;
    let plan = plan(
        format,
        &parse_option_list(&args.options)?,
        CreateArgsCommon {
            filename,
            size,
            backing: args.backing.as_deref(),
            backing_format: args.backing_format.as_deref(),
            unsafe_backing: args.unsafe_backing,
        },
    )
    .await?;
    if !args.quiet {
        println!("{}", plan.formatting_line(filename));
    }
    plan.create(filename).await?;
    Ok(0)
}
