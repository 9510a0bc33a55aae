//! `vmimg create`.

use crate::size::parse_size;
use crate::{usage_error, CmdResult};
use clap::Args;
use vmimg::{Error, ErrorKind, Format, PreallocMode, RawCreate};

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Image format.
    #[arg(short = 'f', default_value = "raw")]
    format: String,
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
            "preallocation" => {
                prealloc = Some(
                    PreallocMode::parse(v)
                        .ok_or_else(|| usage_error(format!("Invalid preallocation mode: '{v}'")))?,
                )
            }
            other => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("Invalid parameter '{other}' for format raw"),
                ))
            }
        }
    }
    let size = size.ok_or_else(|| usage_error("Image creation needs a size parameter"))?;
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
        other => Err(Error::new(
            ErrorKind::Unsupported,
            format!("creating {other} images is not supported yet"),
        )),
    }
}
