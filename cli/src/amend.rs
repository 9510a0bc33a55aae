//! `vmimg amend`: change options of an existing qcow2 image, like qemu-img amend.

use crate::create::parse_options;
use crate::size::parse_size;
use crate::{open_image, usage_error, CmdResult};
use clap::Args;
use vmimg::qcow2::{Qcow2Amend, Qcow2Driver};
use vmimg::{Error, ErrorKind};

#[derive(Args, Debug)]
pub struct AmendArgs {
    /// Image format (probed when absent; do not probe untrusted images).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Options to change: compat, lazy_refcounts, refcount_bits, data_file_raw, size.
    #[arg(short = 'o', required = true)]
    options: Vec<String>,
    /// Show progress (accepted for compatibility).
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image.
    filename: String,
}

fn on_off(k: &str, v: &str) -> Result<bool, Error> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(usage_error(format!(
            "Parameter '{k}' expects 'on' or 'off'"
        ))),
    }
}

pub async fn run(args: AmendArgs) -> CmdResult {
    let mut a = Qcow2Amend::default();
    for (k, v) in parse_options(&args.options)? {
        match k.as_str() {
            "compat" => a.compat = Some(v),
            "lazy_refcounts" => a.lazy_refcounts = Some(on_off(&k, &v)?),
            "data_file_raw" => a.data_file_raw = Some(on_off(&k, &v)?),
            "refcount_bits" => {
                a.refcount_bits = Some(
                    v.parse()
                        .map_err(|_| usage_error(format!("Invalid refcount_bits '{v}'")))?,
                )
            }
            "size" => a.size = Some(parse_size(&v).map_err(usage_error)?),
            other => {
                return Err(usage_error(format!(
                    "Invalid parameter '{other}'\nThis option is only supported for image creation"
                )))
            }
        }
    }
    let image = open_image(&args.filename, args.format.as_deref(), true, false).await?;
    let Some(q) = image.driver().as_any().downcast_ref::<Qcow2Driver>() else {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "Format driver '{}' does not support option amendment",
                image.format()
            ),
        ));
    };
    q.amend(&a, image.below()).await?;
    image.sync().await?;
    Ok(0)
}
