//! `vmimg check`: qemu-img check's consistency check (and repair) of qcow2 images, with its
//! human and JSON output and its exit statuses.
//!
//! ```text
//!  check [-r] --> repaired anything? --yes--> "The following inconsistencies were found
//!      |                  |                    and repaired: ..." --> check again (no -r)
//!      |                  no                                            |
//!      v                  v                                             v
//!  failed: "Check failed: why", 1     report: human | json;  status 2 corrupt, 3 leaks, 0
//! ```

use crate::info::{print_json, OutputFormat};
use crate::CmdResult;
use clap::{Args, ValueEnum};
use serde_json::{json, Map, Value};
use vmimg::format::{CheckReport, Repair};
use vmimg::{ErrorKind, FileStorageOpen, Format, Permissions, Storage};

/// Exit status for images whose format has no check (qemu-img's).
const NOT_SUPPORTED: u8 = 63;

/// What `-r` repairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RepairArg {
    /// Leaked clusters only.
    Leaks,
    /// Every kind of inconsistency.
    All,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Image format (probed when absent; do not probe untrusted images).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    /// Repair inconsistencies: `leaks` (leaked clusters only) or `all`.
    #[arg(short = 'r', value_enum)]
    repair: Option<RepairArg>,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
    /// Force share: open even if another process writes the image (its content may then
    /// read inconsistently).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    filename: String,
}

pub async fn run(args: CheckArgs) -> CmdResult {
    let repair = match args.repair {
        None => Repair::None,
        Some(RepairArg::Leaks) => Repair::Leaks,
        Some(RepairArg::All) => Repair::All,
    };
    let writable = repair != Repair::None;
    let opening = |e| crate::opening(&args.filename, e);
    let storage = FileStorageOpen::new(&args.filename)
        .writable(writable)
        .open()
        .await
        .map_err(opening)?;
    let format = match &args.format {
        Some(f) => Format::from_name(f)?,
        None => crate::probe_format(&storage).await?,
    };
    let (perm, shared) = format.permissions(writable, Permissions::ALL, args.force_share)?;
    storage.set_permissions(perm, shared).map_err(opening)?;
    let human = args.output == OutputFormat::Human && !args.quiet;

    let entry = format.entry();
    let first = match entry.check(&storage, repair).await {
        // Formats checked through the open image (their files named by the image).
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            match check_open(&args, format, repair).await {
                Err(e) if e.kind() == ErrorKind::Unsupported => {
                    eprintln!("{}: {e}", crate::prog());
                    return Ok(NOT_SUPPORTED);
                }
                r => r.map_err(opening)?,
            }
        }
        // What the format's check refuses before it starts is what its open refuses.
        r => r.map_err(opening)?,
    };
    if let Some(status) = messages_and_failure(&first) {
        return Ok(status);
    }
    let mut report = first;
    if report.corruptions_fixed > 0 || report.leaks_fixed > 0 {
        if human {
            print!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked \
                 clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                report.leaks_fixed, report.corruptions_fixed
            );
        }
        let second = entry.check(&storage, Repair::None).await?;
        if let Some(status) = messages_and_failure(&second) {
            return Ok(status);
        }
        report = CheckReport {
            leaks_fixed: report.leaks_fixed,
            corruptions_fixed: report.corruptions_fixed,
            ..second
        };
    }

    if !args.quiet {
        match args.output {
            OutputFormat::Human => print!("{}", human_report(&report)),
            OutputFormat::Json => print_json(&json_report(&args.filename, format, &report)),
        }
    }
    if report.check_errors > 0 {
        eprintln!("{}: Check failed", crate::prog());
        return Ok(1);
    }
    Ok(exit_status(&report))
}

/// Checks an image through its open driver ([`vmimg::FormatDriver::check`]): read-only,
/// without its backing chain. Repairs are refused here.
async fn check_open(
    args: &CheckArgs,
    format: Format,
    repair: Repair,
) -> Result<CheckReport, vmimg::Error> {
    if repair != Repair::None {
        return Err(vmimg::Error::new(
            ErrorKind::Unsupported,
            "This image format does not support checks",
        ));
    }
    let opts = vmimg::OpenOptions::new()
        .force_share(args.force_share)
        .no_backing(true);
    let image = vmimg::ImageOpen::path(&args.filename)
        .options(opts)
        .format(format)
        .open()
        .await?;
    image.driver().check(repair).await
}

/// Prints what the check found on stderr (as qemu-img does while checking); the exit
/// status if the check could not complete.
fn messages_and_failure(report: &CheckReport) -> Option<u8> {
    for m in &report.messages {
        eprintln!("{m}");
    }
    let why = report.failure.as_ref()?;
    eprintln!("{}: Check failed: {why}", crate::prog());
    Some(1)
}

/// qemu-img check's status for a completed check: 2 corrupt, 3 leaks only, 0 clean.
pub fn exit_status(report: &CheckReport) -> u8 {
    if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    }
}

/// The human report, as qemu-img prints it.
pub fn human_report(r: &CheckReport) -> String {
    let mut out = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        out += "No errors were found on the image.\n";
    } else {
        if r.corruptions > 0 {
            out += &format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further \
                 writes to the image may corrupt it.\n",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            out += &format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk \
                 space, but no harm to data.\n",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            out += &format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            );
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let allocated = r.allocated_clusters as f64;
        out += &format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            allocated * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / allocated,
            r.compressed_clusters as f64 * 100.0 / allocated,
        );
    }
    if r.image_end_offset != 0 {
        out += &format!("Image end offset: {}\n", r.image_end_offset);
    }
    out
}

/// The JSON report: QAPI's `ImageCheck`. Optional members appear only when non-zero, and the
/// keys come in the order qemu-img prints them, which is the bucket order of QEMU's QDict
/// hash table (`tdb_hash(key) % 512`), not the schema order.
pub fn json_report(filename: &str, format: Format, r: &CheckReport) -> Value {
    let format = format.name();
    let members: [(&str, Option<Value>); 12] = [
        ("image-end-offset", optional(r.image_end_offset)),
        ("compressed-clusters", optional(r.compressed_clusters)),
        ("total-clusters", optional(r.total_clusters)),
        ("corruptions", optional(r.corruptions)),
        ("corruptions-fixed", optional(r.corruptions_fixed)),
        ("check-errors", Some(json!(r.check_errors))),
        ("leaks", optional(r.leaks)),
        ("leaks-fixed", optional(r.leaks_fixed)),
        ("allocated-clusters", optional(r.allocated_clusters)),
        ("filename", Some(json!(filename))),
        ("format", Some(json!(format))),
        ("fragmented-clusters", optional(r.fragmented_clusters)),
    ];
    let mut m = Map::new();
    for (key, value) in members {
        if let Some(v) = value {
            m.insert(key.to_string(), v);
        }
    }
    Value::Object(m)
}

fn optional(n: u64) -> Option<Value> {
    (n != 0).then(|| json!(n))
}
