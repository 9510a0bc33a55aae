//! `vmimg measure`: the file size a conversion would need, with qemu-img measure's numbers.

use crate::info::{print_json, OutputFormat};
use crate::size::parse_size;
use crate::{open_image_with, usage_error, CmdResult};
use clap::Args;
use serde_json::{Map, Value};
use vmimg::format::{parse_option_list, FormatOptions, MeasureSource};
use vmimg::OpenOptions;

#[derive(Args, Debug)]
pub struct MeasureArgs {
    /// Source format (probed when absent; do not probe untrusted images).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format to measure for.
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Output format options (cluster_size, refcount_bits, extended_l2, preallocation, ...).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Measure a new image of this size instead of a source image.
    #[arg(long)]
    size: Option<String>,
    /// Convert this snapshot of the source: `snapshot.name=NAME` or `ID_OR_NAME`.
    #[arg(short = 'l')]
    snapshot: Option<String>,
    /// Force share: open even if another process writes the image (its content may then
    /// read inconsistently).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Output style.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    /// Source image.
    filename: Option<String>,
}

pub async fn run(args: MeasureArgs) -> CmdResult {
    let out = crate::create::output_format(&args.out_format)?;
    let entry = out.entry();
    let items = parse_option_list(&args.options)?;
    let opts = FormatOptions::parse(entry.create_options(), &items)?;
    let unit = entry.measure_unit(&opts)?;

    // Size and allocated data of the source.
    let source = match (&args.size, &args.filename) {
        (Some(s), None) => MeasureSource {
            size: parse_size(s).map_err(usage_error)?,
            ..MeasureSource::default()
        },
        (None, Some(f)) => {
            let mut o = OpenOptions::new().force_share(args.force_share);
            if let Some(p) = &args.snapshot {
                o = o.snapshot(crate::convert::parse_snapshot_param(p)?);
            }
            let img = open_image_with(f, args.format.as_deref(), o).await?;
            let size = img.size();
            let mut data = 0u64;
            let mut off = 0u64;
            while off < size {
                let st = img.block_status(off, size - off).await?;
                let mut len = st.len;
                if !st.zero() {
                    // Count whole output units, each once.
                    let end = (off + len).div_ceil(unit) * unit;
                    data += end - off / unit * unit;
                    len = end.min(size) - off;
                }
                off += len;
            }
            let bitmaps = img.format().entry().persistent_bitmaps().then(|| {
                img.describe()
                    .bitmaps
                    .into_iter()
                    .map(|b| (b.granularity, b.name))
                    .collect()
            });
            MeasureSource {
                size,
                data,
                bitmaps,
            }
        }
        _ => {
            return Err(usage_error(
                "Either --size N or one filename must be specified.",
            ))
        }
    };
    let m = entry.measure(&opts, &source)?;
    match args.output {
        OutputFormat::Json => {
            let mut map = Map::new();
            if let Some(b) = m.bitmaps {
                map.insert("bitmaps".into(), Value::from(b));
            }
            map.insert("required".into(), Value::from(m.required));
            map.insert("fully-allocated".into(), Value::from(m.fully_allocated));
            print_json(&Value::Object(map));
        }
        OutputFormat::Human => {
            println!(
                "required size: {}\nfully allocated size: {}",
                m.required, m.fully_allocated
            );
            if let Some(b) = m.bitmaps {
                println!("bitmaps size: {b}");
            }
        }
    }
    Ok(0)
}
