//! `vmimg create`.

use crate::size::parse_size;
use crate::{open_image, usage_error, CmdResult};
use clap::Args;
use vmimg::qcow2::CompressionType;
use vmimg::{Error, ErrorKind, Format, PreallocMode, Qcow2Create, RawCreate};

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Image format.
    #[arg(short = 'f', default_value = "raw")]
    format: String,
    /// Backing file (qcow2).
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Backing file format (qcow2).
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Do not open the backing file (its size must then be given).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Format options, `key=value[,key=value...]` (raw: `size`, `preallocation`).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image to create.
    filename: String,
    /// Virtual size, with optional suffix k, M, G, T, P, E.
    size: Option<String>,
}

/// The image size, refused (before anything is created or printed) when missing or larger
/// than any file can be, with qemu-img's messages.
fn checked_size(size: Option<u64>) -> Result<u64, Error> {
    let size = size.ok_or_else(|| usage_error("Image creation needs a size parameter"))?;
    if size > i64::MAX as u64 {
        return Err(usage_error(format!(
            "Invalid image size specified. Must be between 0 and {}.",
            i64::MAX
        )));
    }
    Ok(size)
}

/// Parses a `preallocation=` value.
pub fn parse_prealloc(v: &str) -> Result<PreallocMode, Error> {
    PreallocMode::parse(v).ok_or_else(|| usage_error(format!("Invalid preallocation mode: '{v}'")))
}

/// Parses `-o key=value,key=value` lists (several `-o` are joined).
pub fn parse_options(opts: &[String]) -> Result<Vec<(String, String)>, Error> {
    let mut out = Vec::new();
    for item in opts.iter().flat_map(|o| o.split(',')) {
        if item.is_empty() {
            continue;
        }
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| usage_error(format!("Invalid option '{item}': expected key=value")))?;
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Raw creation parameters taken from `-o` options.
pub fn raw_create_from_options(
    size: Option<u64>,
    opts: &[(String, String)],
) -> Result<(RawCreate, u64, Option<PreallocMode>), Error> {
    let mut size = size;
    let mut prealloc = None;
    for (k, v) in opts {
        match k.as_str() {
            "size" => size = Some(parse_size(v).map_err(usage_error)?),
            "preallocation" => prealloc = Some(parse_prealloc(v)?),
            other => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("Invalid parameter '{other}' for format raw"),
                ))
            }
        }
    }
    let size = checked_size(size)?;
    let create = RawCreate::new(size).preallocation(prealloc.unwrap_or_default());
    Ok((create, size, prealloc))
}

pub async fn run(args: CreateArgs) -> CmdResult {
    let format = Format::from_name(&args.format)?;
    let opts = parse_options(&args.options)?;
    let size = args
        .size
        .as_deref()
        .map(parse_size)
        .transpose()
        .map_err(usage_error)?;
    match format {
        Format::Raw => {
            let (create, size, prealloc) = raw_create_from_options(size, &opts)?;
            if !args.quiet {
                let mut line = format!("Formatting '{}', fmt=raw size={size}", args.filename);
                if let Some(p) = prealloc {
                    line += &format!(" preallocation={}", p.as_str());
                }
                println!("{line}");
            }
            create.create(&args.filename).await?;
            Ok(0)
        }
        Format::Qcow2 => {
            let mut opts = opts;
            if let Some(b) = &args.backing {
                opts.push(("backing_file".into(), b.clone()));
            }
            if let Some(f) = &args.backing_format {
                opts.push(("backing_fmt".into(), f.clone()));
            }
            let plan = qcow2_plan(size, &opts, &args.filename, args.unsafe_backing).await?;
            if !args.quiet {
                println!("Formatting '{}', fmt=qcow2 {}", args.filename, plan.summary);
            }
            plan.create.create(&args.filename).await?;
            Ok(0)
        }
        other => Err(Error::new(
            ErrorKind::Unsupported,
            format!("creating {other} images is not supported yet"),
        )),
    }
}

/// The format QEMU's probe sees in the file at `path`, for hints in messages.
fn detect_format(path: &std::path::Path) -> Option<&'static str> {
    use std::io::Read;
    let mut first = Vec::with_capacity(vmimg::format::PROBE_BYTES);
    std::fs::File::open(path)
        .ok()?
        .take(vmimg::format::PROBE_BYTES as u64)
        .read_to_end(&mut first)
        .ok()?;
    Some(vmimg::format::probe_bytes(&first, path.to_str()))
}

/// A qcow2 creation resolved from `-o` options.
pub struct Qcow2Plan {
    pub create: Qcow2Create,
    /// qemu-img's "Formatting" line after `fmt=qcow2`.
    pub summary: String,
}

fn on_off(key: &str, v: &str) -> Result<bool, Error> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(usage_error(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

/// Builds a qcow2 creation from `-o` options (qemu-img's names). Without a size, the
/// backing file's size is used (it is opened unless `unsafe_backing`).
pub async fn qcow2_plan(
    size: Option<u64>,
    opts: &[(String, String)],
    filename: &str,
    unsafe_backing: bool,
) -> Result<Qcow2Plan, Error> {
    let mut size = size;
    let mut cluster_size = 65536u64;
    let mut refcount_bits = 16u32;
    let mut compat: Option<String> = None;
    let mut backing: Option<String> = None;
    let mut backing_fmt: Option<String> = None;
    let mut data_file: Option<String> = None;
    let mut data_file_raw = false;
    let mut extended_l2 = false;
    let mut compression = CompressionType::Deflate;
    let mut lazy = false;
    let mut prealloc: Option<PreallocMode> = None;
    for (k, v) in opts {
        match k.as_str() {
            "size" => size = Some(parse_size(v).map_err(usage_error)?),
            "cluster_size" => cluster_size = parse_size(v).map_err(usage_error)?,
            "refcount_bits" => {
                refcount_bits = v
                    .parse()
                    .map_err(|_| usage_error(format!("Invalid refcount_bits '{v}'")))?
            }
            "compat" => compat = Some(v.clone()),
            "backing_file" => backing = Some(v.clone()),
            "backing_fmt" => backing_fmt = Some(v.clone()),
            "data_file" => data_file = Some(v.clone()),
            "data_file_raw" => data_file_raw = on_off(k, v)?,
            "extended_l2" => extended_l2 = on_off(k, v)?,
            "lazy_refcounts" => lazy = on_off(k, v)?,
            "compression_type" => {
                compression = match v.as_str() {
                    "zlib" => CompressionType::Deflate,
                    "zstd" => CompressionType::Zstd,
                    _ => return Err(usage_error(format!("Invalid compression type '{v}'"))),
                }
            }
            "preallocation" => prealloc = Some(parse_prealloc(v)?),
            other => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("Invalid parameter '{other}' for format qcow2"),
                ))
            }
        }
    }
    if let (Some(b), None) = (&backing, &backing_fmt) {
        // As qemu-img 10: the backing format must be named, not probed later.
        let mut msg = format!("{filename}: Backing file specified without backing format");
        if !unsafe_backing {
            let dir = std::path::Path::new(filename)
                .parent()
                .unwrap_or(std::path::Path::new(""));
            if let Some(found) = detect_format(&dir.join(b)) {
                msg += &format!("\nDetected format of {found}.");
            }
        }
        return Err(usage_error(msg));
    }
    if let (None, Some(b)) = (size, &backing) {
        if unsafe_backing {
            return Err(usage_error("Image creation needs a size parameter"));
        }
        let dir = std::path::Path::new(filename)
            .parent()
            .unwrap_or(std::path::Path::new(""));
        let path = dir.join(b);
        let img = open_image(
            &path.to_string_lossy(),
            backing_fmt.as_deref(),
            false,
            false,
        )
        .await
        .map_err(|e| e.with_operation("open backing file"))?;
        size = Some(img.size());
    }
    let size = checked_size(size)?;
    let mut create = Qcow2Create::new(size)
        .cluster_size(cluster_size)
        .refcount_bits(refcount_bits)
        .extended_l2(extended_l2)
        .compression_type(compression)
        .lazy_refcounts(lazy)
        .preallocation(prealloc.unwrap_or_default())
        .data_file_raw(data_file_raw);
    if let Some(c) = &compat {
        create = create.compat(c)?;
    }
    if let Some(b) = &backing {
        create = create.backing_file(b.clone(), backing_fmt.clone());
    }
    if let Some(d) = &data_file {
        create = create.data_file(d.clone());
    }
    let flag = |b: bool| if b { "on" } else { "off" };
    let mut summary = format!(
        "cluster_size={cluster_size} extended_l2={}",
        flag(extended_l2)
    );
    if let Some(p) = prealloc {
        summary += &format!(" preallocation={}", p.as_str());
    }
    summary += &format!(" compression_type={} size={size}", compression.name());
    if let Some(c) = &compat {
        summary += &format!(" compat={c}");
    }
    if let Some(b) = &backing {
        summary += &format!(" backing_file={b}");
    }
    if let Some(f) = &backing_fmt {
        summary += &format!(" backing_fmt={f}");
    }
    if let Some(d) = &data_file {
        summary += &format!(" data_file={d}");
    }
    if data_file_raw {
        summary += " data_file_raw=on";
    }
    summary += &format!(
        " lazy_refcounts={} refcount_bits={refcount_bits}",
        flag(lazy)
    );
    Ok(Qcow2Plan { create, summary })
}
