//! `vmimg resize`: grow or (with `--shrink`) shrink an image, like qemu-img resize.

use crate::create::parse_prealloc;
use crate::size::parse_size;
use crate::{open_image, usage_error, CmdResult};
use clap::Args;
use vmimg::PreallocMode;

#[derive(Args, Debug)]
pub struct ResizeArgs {
    /// Image format (probed when absent; do not probe untrusted images).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Allow shrinking (data past the new end is lost).
    #[arg(long)]
    shrink: bool,
    /// Preallocation of the new space: off, metadata, falloc, full.
    #[arg(long)]
    preallocation: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image.
    filename: String,
    /// New size, or `+SIZE` / `-SIZE` relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

pub async fn run(args: ResizeArgs) -> CmdResult {
    let prealloc = match &args.preallocation {
        Some(p) => parse_prealloc(p)?,
        None => PreallocMode::Off,
    };
    let image = open_image(&args.filename, args.format.as_deref(), true, false).await?;
    let current = image.size();
    let new_size = if let Some(d) = args.size.strip_prefix('+') {
        current
            .checked_add(parse_size(d).map_err(usage_error)?)
            .ok_or_else(|| usage_error("Image size too large"))?
    } else if let Some(d) = args.size.strip_prefix('-') {
        current
            .checked_sub(parse_size(d).map_err(usage_error)?)
            .ok_or_else(|| usage_error("New image size must be positive"))?
    } else {
        parse_size(&args.size).map_err(usage_error)?
    };
    if new_size < current {
        if !args.shrink {
            // As qemu-img: the refusal, then the warning (with --shrink, no warning).
            eprintln!(
                "{}: Use the --shrink option to perform a shrink operation.",
                crate::prog()
            );
            eprintln!(
                "{}: warning: Shrinking an image will delete all data beyond the shrunken \
                 image's end. Before performing such an operation, make sure there is no \
                 important data there.",
                crate::prog()
            );
            return Ok(1);
        }
        if prealloc != PreallocMode::Off {
            return Err(usage_error(
                "Preallocation can only be used for growing images",
            ));
        }
    }
    // Sizes are whole sectors, as in QEMU.
    let new_size = new_size.div_ceil(512) * 512;
    image.resize(new_size, prealloc).await?;
    image.sync().await?;
    if !args.quiet {
        println!("Image resized.");
    }
    Ok(0)
}
