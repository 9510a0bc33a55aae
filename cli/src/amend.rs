//! `vmimg amend`: change options of an existing image, like qemu-img amend; which options a
//! format can change comes from the registry.

use crate::{open_image_with, usage_error, CmdResult};
use clap::Args;
use vmimg::format::{options_help, parse_option_list, FormatOptions};
use vmimg::{Error, ErrorKind, OpenOptions};

#[derive(Args, Debug)]
pub struct AmendArgs {
    /// Image format (probed when absent; do not probe untrusted images).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Options to change (qcow2: compat, lazy_refcounts, refcount_bits, data_file_raw,
    /// size); `-o help` lists them.
    #[arg(short = 'o', required = true)]
    options: Vec<String>,
    /// Show progress (accepted for compatibility).
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image.
    filename: Option<String>,
}

pub async fn run(args: AmendArgs) -> CmdResult {
    if crate::create::wants_help(&args.options) {
        let name = args
            .format
            .as_deref()
            .ok_or_else(|| usage_error("Please specify a format with -f to list its options"))?;
        let entry = crate::create::output_format(name)?.entry();
        let specs: Vec<_> = entry
            .create_options()
            .iter()
            .filter(|s| entry.amend_options().contains(&s.name))
            .copied()
            .collect();
        let text = options_help(name, &specs);
        print!(
            "{}",
            text.replacen(
                &format!("Supported {name} options:"),
                &format!("Amend options for '{name}':"),
                1
            )
        );
        return Ok(0);
    }
    let filename = args
        .filename
        .as_deref()
        .ok_or_else(|| usage_error("Expecting one image file name"))?;
    let image = open_image_with(
        filename,
        args.format.as_deref(),
        OpenOptions::new().writable(true),
    )
    .await?;
    let format = image.format();
    let entry = format.entry();
    if entry.amend_options().is_empty() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("Format driver '{format}' does not support option amendment"),
        ));
    }
    let items = parse_option_list(&args.options)?;
    let options = FormatOptions::parse(entry.create_options(), &items)?;
    if let Some((name, _)) = options
        .iter()
        .find(|(name, _)| !entry.amend_options().contains(name))
    {
        return Err(usage_error(format!(
            "Invalid parameter '{name}'\nThis option is only supported for image creation"
        )));
    }
    image.driver().amend(&options, image.below()).await?;
    image.sync().await?;
    Ok(0)
}
