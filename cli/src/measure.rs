//! `vmimg measure`: the file size a conversion would need, with qemu-img measure's numbers.

use crate::create::{parse_options, parse_prealloc};
use crate::info::{print_json, OutputFormat};
use crate::size::parse_size;
use crate::{open_image_with, usage_error, CmdResult};
use clap::Args;
use serde_json::{Map, Value};
use vmimg::format::FormatSpecific;
use vmimg::{Format, OpenOptions, PreallocMode};

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

/// Refcount table and block bytes for `clusters` clusters (the table and blocks count
/// themselves), as QEMU computes them.
pub fn refcount_metadata_size(clusters: u64, cs: u64, refcount_bits: u64) -> u64 {
    let per_table_cluster = cs / 8;
    let per_block = cs * 8 / refcount_bits;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cs;
        }
    }
}

/// Bytes of a fully preallocated qcow2 image of `size` bytes (metadata and data).
pub fn qcow2_full_size(size: u64, cs: u64, refcount_bits: u64, extended_l2: bool) -> u64 {
    let aligned = size.div_ceil(cs) * cs;
    let entry = if extended_l2 { 16 } else { 8 };
    let mut meta = cs;
    let l2_entries = (aligned / cs).div_ceil(cs / entry) * (cs / entry);
    meta += l2_entries * entry;
    let l1_entries = (l2_entries * entry / cs).div_ceil(cs / 8) * (cs / 8);
    meta += l1_entries * 8;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, refcount_bits);
    meta + aligned
}

pub async fn run(args: MeasureArgs) -> CmdResult {
    let out = Format::from_name(&args.out_format)?;
    let opts = parse_options(&args.options)?;
    let get = |k: &str| {
        opts.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let cs = get("cluster_size")
        .map(parse_size)
        .transpose()
        .map_err(usage_error)?
        .unwrap_or(65536);
    let refcount_bits: u64 = get("refcount_bits")
        .map(|v| {
            v.parse()
                .map_err(|_| usage_error(format!("Invalid refcount_bits '{v}'")))
        })
        .transpose()?
        .unwrap_or(16);
    let extended_l2 = get("extended_l2") == Some("on");
    let v2 = get("compat") == Some("0.10");
    let prealloc = get("preallocation")
        .map(parse_prealloc)
        .transpose()?
        .unwrap_or_default();
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(usage_error(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }

    // Size and allocated data of the source.
    let (size, data, bitmaps) = match (&args.size, &args.filename) {
        (Some(s), None) => (parse_size(s).map_err(usage_error)?, 0, None),
        (None, Some(f)) => {
            let mut o = OpenOptions::new().force_share(args.force_share);
            if let Some(p) = &args.snapshot {
                o = o.snapshot(crate::convert::parse_snapshot_param(p)?);
            }
            let img = open_image_with(f, args.format.as_deref(), o).await?;
            let size = img.size();
            let unit = if out == Format::Qcow2 { cs } else { 512 };
            let mut data = 0u64;
            let mut off = 0u64;
            while off < size {
                let st = img.block_status(off, size - off).await?;
                let mut len = st.len;
                if !st.zero() {
                    // Count whole output clusters, each once.
                    let end = (off + len).div_ceil(unit) * unit;
                    data += end - off / unit * unit;
                    len = end.min(size) - off;
                }
                off += len;
            }
            let bitmaps = match img.describe().format_specific {
                Some(FormatSpecific::Qcow2(q)) => Some(
                    q.bitmaps
                        .iter()
                        .map(|b| {
                            let bits = size.div_ceil(b.granularity.max(1));
                            let data_clusters = bits.div_ceil(8).div_ceil(cs);
                            let table_clusters = (data_clusters * 8).div_ceil(cs);
                            (data_clusters + table_clusters) * cs
                        })
                        .sum::<u64>()
                        + {
                            let dir: u64 = q
                                .bitmaps
                                .iter()
                                .map(|b| (24 + b.name.len() as u64).div_ceil(8) * 8)
                                .sum();
                            dir.div_ceil(cs) * cs
                        },
                ),
                _ => None,
            };
            (size, data, bitmaps)
        }
        _ => {
            return Err(usage_error(
                "Either --size N or one filename must be specified.",
            ))
        }
    };

    let (required, full) = match out {
        Format::Qcow2 => {
            let virtual_size = size.div_ceil(cs) * cs;
            let full = qcow2_full_size(size, cs, refcount_bits, extended_l2);
            let data = match prealloc {
                PreallocMode::Full | PreallocMode::Falloc => virtual_size,
                _ => data,
            };
            (full - virtual_size + data, full)
        }
        _ => {
            let s = size.div_ceil(512) * 512;
            (s, s)
        }
    };
    let bitmaps = if out == Format::Qcow2 && !v2 {
        bitmaps
    } else {
        None
    };
    match args.output {
        OutputFormat::Json => {
            let mut m = Map::new();
            if let Some(b) = bitmaps {
                m.insert("bitmaps".into(), Value::from(b));
            }
            m.insert("required".into(), Value::from(required));
            m.insert("fully-allocated".into(), Value::from(full));
            print_json(&Value::Object(m));
        }
        OutputFormat::Human => {
            println!("required size: {required}\nfully allocated size: {full}");
            if let Some(b) = bitmaps {
                println!("bitmaps size: {b}");
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_size_matches_qemu_img_measure() {
        assert_eq!(qcow2_full_size(10 << 30, 65536, 16, false), 10_739_318_784);
        assert_eq!(qcow2_full_size(10 << 30, 512, 16, false), 10_951_259_648);
        assert_eq!(
            qcow2_full_size(10 << 30, 2 << 20, 64, false),
            10_747_904_000
        );
        assert_eq!(qcow2_full_size(10 << 30, 65536, 16, true), 10_740_629_504);
    }
}
