//! qcow2's options as qemu-img names them: the schema, the "Formatting" summary, and their
//! translation into [`Qcow2Create`], [`Qcow2Amend`] and `measure`'s arithmetic.

use super::{CompressionType, Qcow2Amend, Qcow2Create};
use crate::format::{FormatOptions, Measure, MeasureSource, OptionKind, OptionSpec};
use crate::storage::PreallocMode;
use crate::{Error, ErrorKind, Result};

const fn spec(name: &'static str, kind: OptionKind, help: &'static str) -> OptionSpec {
    OptionSpec { name, kind, help }
}

/// qemu-img's qcow2 creation options (without encryption, which vmimg does not write).
pub const CREATE_OPTIONS: &[OptionSpec] = &[
    spec("size", OptionKind::Size, "Virtual disk size"),
    spec(
        "compat",
        OptionKind::Str,
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    spec("backing_file", OptionKind::Str, "File name of a base image"),
    spec(
        "backing_fmt",
        OptionKind::Str,
        "Image format of the base image",
    ),
    spec(
        "data_file",
        OptionKind::Str,
        "File name of an external data file",
    ),
    spec(
        "data_file_raw",
        OptionKind::Bool,
        "The external data file must stay valid as a raw image",
    ),
    spec("cluster_size", OptionKind::Size, "qcow2 cluster size"),
    spec(
        "preallocation",
        OptionKind::Str,
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    spec(
        "lazy_refcounts",
        OptionKind::Bool,
        "Postpone refcount updates",
    ),
    spec(
        "refcount_bits",
        OptionKind::Number,
        "Width of a reference count entry in bits",
    ),
    spec(
        "compression_type",
        OptionKind::Str,
        "Compression method used for image cluster compression",
    ),
    spec("extended_l2", OptionKind::Bool, "Extended L2 tables"),
];

/// What `amend` can change.
pub const AMEND_OPTIONS: &[&str] = &[
    "size",
    "compat",
    "backing_file",
    "backing_fmt",
    "data_file",
    "data_file_raw",
    "lazy_refcounts",
    "refcount_bits",
];

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

/// A value qemu-img's QAPI would refuse: "Parameter 'X' does not accept value 'Y'".
fn not_accepted(param: &str, value: &str) -> Error {
    invalid(format!(
        "Parameter '{param}' does not accept value '{value}'"
    ))
}

/// The preallocation mode named by `v`, with qemu-img's message otherwise.
pub(crate) fn prealloc(v: &str) -> Result<PreallocMode> {
    PreallocMode::parse(v).ok_or_else(|| not_accepted("preallocation", v))
}

/// The numbers the options give (defaults: 64 KiB clusters, 16-bit refcounts).
struct Shape {
    cluster_size: u64,
    refcount_bits: u64,
    extended_l2: bool,
}

fn shape(o: &FormatOptions) -> Result<Shape> {
    let cluster_size = o.size("cluster_size").unwrap_or(65536);
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return Err(invalid(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    Ok(Shape {
        cluster_size,
        refcount_bits: o.number("refcount_bits").unwrap_or(16),
        extended_l2: o.bool("extended_l2").unwrap_or(false),
    })
}

/// A creation from checked options.
pub fn create_from_options(o: &FormatOptions) -> Result<Qcow2Create> {
    // Whole sectors, as qemu-img rounds them.
    let size = o
        .size("size")
        .ok_or_else(|| invalid("Image creation needs a size parameter"))?
        .checked_next_multiple_of(512)
        .ok_or_else(|| invalid("Image size is too large"))?;
    let s = shape(o)?;
    let compression = match o.str("compression_type") {
        None | Some("zlib") => CompressionType::Deflate,
        Some("zstd") => CompressionType::Zstd,
        Some(v) => return Err(not_accepted("compression-type", v)),
    };
    let mut c = Qcow2Create::new(size)
        .cluster_size(s.cluster_size)
        .refcount_bits(u32::try_from(s.refcount_bits).unwrap_or(u32::MAX))
        .extended_l2(s.extended_l2)
        .compression_type(compression)
        .lazy_refcounts(o.bool("lazy_refcounts").unwrap_or(false))
        .preallocation(
            o.str("preallocation")
                .map(prealloc)
                .transpose()?
                .unwrap_or_default(),
        )
        .data_file_raw(o.bool("data_file_raw").unwrap_or(false));
    if let Some(v) = o.str("compat") {
        c = c.compat(v).map_err(|_| not_accepted("version", v))?;
    }
    if let Some(b) = o.str("backing_file") {
        c = c.backing_file(b, o.str("backing_fmt").map(str::to_owned));
    }
    if let Some(d) = o.str("data_file") {
        c = c.data_file(d);
    }
    Ok(c)
}

/// qemu-img's "Formatting" line after `fmt=qcow2`, in its order, defaults included.
pub fn summary(o: &FormatOptions) -> String {
    let on = |k: &str| if o.bool(k) == Some(true) { "on" } else { "off" };
    let mut s = format!(
        "cluster_size={} extended_l2={}",
        o.size("cluster_size").unwrap_or(65536),
        on("extended_l2")
    );
    if let Some(p) = o.str("preallocation") {
        s += &format!(" preallocation={p}");
    }
    s += &format!(
        " compression_type={}",
        o.str("compression_type").unwrap_or("zlib")
    );
    if let Some(size) = o.size("size") {
        s += &format!(" size={size}");
    }
    for k in ["compat", "backing_file", "backing_fmt", "data_file"] {
        if let Some(v) = o.str(k) {
            s += &format!(" {k}={v}");
        }
    }
    if o.bool("data_file_raw") == Some(true) {
        s += " data_file_raw=on";
    }
    s += &format!(
        " lazy_refcounts={} refcount_bits={}",
        on("lazy_refcounts"),
        o.number("refcount_bits").unwrap_or(16)
    );
    s
}

/// What `amend` is to change, from checked options. The backing file cannot be changed
/// here (qemu-img's message points to rebase).
pub fn amend_from_options(o: &FormatOptions) -> Result<Qcow2Amend> {
    if o.get("backing_file").is_some() || o.get("backing_fmt").is_some() {
        return Err(invalid(
            "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
        ));
    }
    if o.get("data_file").is_some() {
        return Err(invalid("Changing the data file is not supported"));
    }
    Ok(Qcow2Amend {
        compat: o.str("compat").map(str::to_owned),
        lazy_refcounts: o.bool("lazy_refcounts"),
        refcount_bits: o
            .number("refcount_bits")
            .map(|b| u32::try_from(b).unwrap_or(u32::MAX)),
        data_file_raw: o.bool("data_file_raw"),
        size: o.size("size"),
    })
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
pub fn full_size(size: u64, cs: u64, refcount_bits: u64, extended_l2: bool) -> u64 {
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

/// The unit `measure` counts data in: the cluster size.
pub fn measure_unit(o: &FormatOptions) -> Result<u64> {
    Ok(shape(o)?.cluster_size)
}

/// `qemu-img measure -O qcow2`.
pub fn measure(o: &FormatOptions, source: &MeasureSource) -> Result<Measure> {
    let s = shape(o)?;
    let cs = s.cluster_size;
    let virtual_size = source.size.div_ceil(cs) * cs;
    let full = full_size(source.size, cs, s.refcount_bits, s.extended_l2);
    let data = match o.str("preallocation").map(prealloc).transpose()? {
        Some(PreallocMode::Full | PreallocMode::Falloc) => virtual_size,
        _ => source.data,
    };
    // Bitmaps: each one's data clusters and table, and the directory (v3 only).
    let bitmaps = source
        .bitmaps
        .as_ref()
        .filter(|_| o.str("compat") != Some("0.10"));
    let bitmaps = bitmaps.map(|list| {
        let tables: u64 = list
            .iter()
            .map(|(granularity, _)| {
                let bits = source.size.div_ceil((*granularity).max(1));
                let data_clusters = bits.div_ceil(8).div_ceil(cs);
                let table_clusters = (data_clusters * 8).div_ceil(cs);
                (data_clusters + table_clusters) * cs
            })
            .sum();
        let dir: u64 = list
            .iter()
            .map(|(_, name)| (24 + name.len() as u64).div_ceil(8) * 8)
            .sum();
        tables + dir.div_ceil(cs) * cs
    });
    Ok(Measure {
        required: full - virtual_size + data,
        fully_allocated: full,
        bitmaps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_sizes_match_qemu_img_measure() {
        assert_eq!(full_size(10 << 30, 65536, 16, false), 10_739_318_784);
        assert_eq!(full_size(10 << 30, 512, 16, false), 10_951_259_648);
        assert_eq!(full_size(10 << 30, 2 << 20, 64, false), 10_747_904_000);
        assert_eq!(full_size(10 << 30, 65536, 16, true), 10_740_629_504);
    }
}
