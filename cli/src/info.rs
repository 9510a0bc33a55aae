//! `vmimg info`: qemu-img info's human and JSON output.

use crate::size::human_size;
use crate::{open_image_with, CmdResult};
use clap::{Args, ValueEnum};
use serde_json::{json, Map, Value};
use vmimg::format::{InfoValue, SnapshotInfo};
use vmimg::{Error, ErrorKind, Image, OpenOptions};

/// Output style of `info` and friends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Text for people.
    #[default]
    Human,
    /// JSON with qemu-img's keys.
    Json,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Image format (probed when absent; do not probe untrusted images).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    /// Show every image of the backing chain.
    #[arg(long = "backing-chain")]
    backing_chain: bool,
    /// Force share: open even if another process writes the image (its content may then
    /// read inconsistently).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    filename: String,
}

/// Writes JSON with qemu's four-space indentation.
pub fn print_json(value: &Value) {
    let mut out = String::new();
    qemu_json(value, 0, &mut out);
    println!("{out}");
}

/// JSON as QEMU pretty-prints it: four spaces per level, and empty arrays and objects
/// opened and closed on lines of their own.
fn qemu_json(v: &Value, indent: usize, out: &mut String) {
    let pad = |n: usize| " ".repeat(n);
    match v {
        Value::Array(items) => {
            out.push_str("[\n");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(",\n");
                }
                out.push_str(&pad(indent + 4));
                qemu_json(item, indent + 4, out);
            }
            if !items.is_empty() {
                out.push('\n');
            }
            out.push_str(&pad(indent));
            out.push(']');
        }
        Value::Object(map) => {
            out.push_str("{\n");
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(",\n");
                }
                out.push_str(&pad(indent + 4));
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                qemu_json(item, indent + 4, out);
            }
            if !map.is_empty() {
                out.push('\n');
            }
            out.push_str(&pad(indent));
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// A format-specific value as JSON.
fn info_value_json(v: &InfoValue) -> Value {
    match v {
        InfoValue::Bool(b) => json!(b),
        InfoValue::Int(n) => json!(n),
        InfoValue::Str(s) => json!(s),
        InfoValue::List(items) => Value::Array(items.iter().map(info_value_json).collect()),
        InfoValue::Map(entries) => Value::Object(
            entries
                .iter()
                .map(|(k, v)| (k.clone(), info_value_json(v)))
                .collect(),
        ),
    }
}

fn snapshot_json(s: &SnapshotInfo) -> Value {
    let mut m = Map::new();
    if let Some(i) = s.icount.filter(|&i| i != -1) {
        m.insert("icount".into(), json!(i));
    }
    m.insert(
        "vm-clock-nsec".into(),
        json!(s.vm_clock_nsec % 1_000_000_000),
    );
    m.insert("name".into(), json!(s.name));
    m.insert("date-sec".into(), json!(s.date_sec));
    m.insert("date-nsec".into(), json!(s.date_nsec));
    m.insert(
        "vm-clock-sec".into(),
        json!(s.vm_clock_nsec / 1_000_000_000),
    );
    m.insert("id".into(), json!(s.id));
    m.insert("vm-state-size".into(), json!(s.vm_state_size));
    Value::Object(m)
}

/// One of qemu-img's child nodes: a file of the image.
fn child_json(name: &str, storage: &dyn vmimg::Storage, filename: &str, actual: u64) -> Value {
    // QEMU counts the file in whole 512-byte sectors.
    let file_len = storage.size().unwrap_or(0).div_ceil(512) * 512;
    json!({
        "name": name,
        "info": {
            "children": [],
            "virtual-size": file_len,
            "filename": filename,
            "format": protocol(storage),
            "actual-size": actual,
            "format-specific": {"type": "file", "data": {}},
            "dirty-flag": false
        }
    })
}

/// One of qemu-img's child nodes, as text.
fn child_human(name: &str, storage: &dyn vmimg::Storage, filename: &str) -> String {
    let file_len = storage.size().unwrap_or(0).div_ceil(512) * 512;
    let disk = storage
        .allocated_size()
        .map(human_size)
        .unwrap_or_else(|| "unavailable".into());
    format!(
        "Child node '/{name}':\n    filename: {filename}\n    protocol type: {}\n    file length: {} ({file_len} bytes)\n    disk size: {disk}",
        protocol(storage),
        human_size(file_len)
    )
}

/// QEMU's protocol driver name for the image's medium.
fn protocol(storage: &dyn vmimg::Storage) -> &'static str {
    if storage.is_block_device() {
        "host_device"
    } else {
        "file"
    }
}

/// The JSON object qemu-img prints for one image.
pub fn info_json(image: &Image, filename: &str) -> Value {
    let desc = image.describe();
    let storage = image.driver().storage();
    let actual = desc.actual_size.unwrap_or(0);
    let mut m = Map::new();
    let mut children: Vec<Value> = desc
        .children
        .iter()
        .rev()
        .map(|c| {
            let path = c.storage.path().map(|p| p.display().to_string());
            child_json(
                &c.name,
                c.storage.as_ref(),
                &path.unwrap_or_default(),
                c.storage.allocated_size().unwrap_or(0),
            )
        })
        .collect();
    let own = storage.allocated_size().unwrap_or(0);
    children.push(child_json("file", storage, filename, own));
    m.insert("children".into(), Value::Array(children));
    if let Some(f) = &desc.backing_format {
        m.insert("backing-filename-format".into(), json!(f));
    }
    if !desc.snapshots.is_empty() {
        let list: Vec<Value> = desc.snapshots.iter().map(snapshot_json).collect();
        m.insert("snapshots".into(), Value::Array(list));
    }
    m.insert("virtual-size".into(), json!(image.size()));
    m.insert("filename".into(), json!(filename));
    if let Some(c) = desc.cluster_size {
        m.insert("cluster-size".into(), json!(c));
    }
    m.insert("format".into(), json!(image.format().name()));
    m.insert("actual-size".into(), json!(actual));
    if let Some(f) = &desc.format_specific {
        let data: Map<String, Value> = f
            .data
            .iter()
            .map(|(k, v)| (k.clone(), info_value_json(v)))
            .collect();
        m.insert(
            "format-specific".into(),
            json!({"type": f.kind, "data": Value::Object(data)}),
        );
    }
    if let Some(b) = &desc.full_backing_filename {
        m.insert("full-backing-filename".into(), json!(b));
    }
    if let Some(b) = &desc.backing_filename {
        m.insert("backing-filename".into(), json!(b));
    }
    if !desc.no_driver_info {
        m.insert("dirty-flag".into(), json!(desc.dirty));
    }
    Value::Object(m)
}

/// `YYYY-MM-DD HH:MM:SS` in UTC for seconds since the Epoch.
fn utc_date(secs: u32) -> String {
    let days = i64::from(secs / 86400);
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// qemu-img's snapshot table (also used by `snapshot -l`).
pub fn snapshot_table(snapshots: &[SnapshotInfo]) -> String {
    let mut s = format!(
        "{:<7} {:<17} {:>7} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for sn in snapshots {
        let secs = sn.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            sn.vm_clock_nsec % 1_000_000_000 / 1_000_000
        );
        let icount = sn
            .icount
            .filter(|&i| i != -1)
            .map(|i| i.to_string())
            .unwrap_or_default();
        s += &format!(
            "{:<7} {:<17} {:>7} {:>19} {:>15} {:>10}\n",
            sn.id,
            sn.name,
            human_size(sn.vm_state_size),
            utc_date(sn.date_sec),
            clock,
            icount
        );
    }
    s
}

/// qemu-img info's text for one image.
pub fn info_human(image: &Image, filename: &str) -> String {
    let desc = image.describe();
    let storage = image.driver().storage();
    let disk = desc
        .actual_size
        .map(human_size)
        .unwrap_or_else(|| "unavailable".into());
    let size = image.size();
    let mut s = format!(
        "image: {filename}\nfile format: {}\nvirtual size: {} ({size} bytes)\ndisk size: {disk}\n",
        image.format(),
        human_size(size),
    );
    if let Some(c) = desc.cluster_size {
        s += &format!("cluster_size: {c}\n");
    }
    if let Some(b) = &desc.backing_filename {
        match &desc.full_backing_filename {
            Some(full) if full != b => s += &format!("backing file: {b} (actual path: {full})\n"),
            _ => s += &format!("backing file: {b}\n"),
        }
    }
    if let Some(f) = &desc.backing_format {
        s += &format!("backing file format: {f}\n");
    }
    if desc.dirty {
        s += "dirty flag: yes\n";
    }
    if !desc.snapshots.is_empty() {
        s += "Snapshot list:\n";
        s += &snapshot_table(&desc.snapshots);
    }
    if let Some(f) = &desc.format_specific {
        s += "Format specific information:\n";
        s += &f.human(4);
    }
    for c in desc.children.iter().rev() {
        let path = c.storage.path().map(|p| p.display().to_string());
        s += &child_human(&c.name, c.storage.as_ref(), &path.unwrap_or_default());
        s.push('\n');
    }
    s += &child_human("file", storage, filename);
    s
}

pub async fn run(args: InfoArgs) -> CmdResult {
    // As qemu-img: each image is opened on its own, without its backing file, so that the
    // info of an overlay whose backing file is missing still shows, and --backing-chain
    // follows the names the images give, refusing a name met twice.
    let opts = OpenOptions::new()
        .force_share(args.force_share)
        .metadata_only(true)
        .no_backing(true);
    let mut chain: Vec<(Image, String)> = Vec::new();
    let mut next = Some((args.filename.clone(), args.format.clone()));
    while let Some((name, format)) = next.take() {
        if chain.iter().any(|(_, n)| *n == name) {
            return Err(Error::new(
                ErrorKind::InvalidFormat,
                format!("Backing file '{name}' creates an infinite loop."),
            ));
        }
        let image = if let Some((_, overlay)) = chain.last() {
            // Untrusted images open nothing they name (the implicit-open policy's rule).
            if crate::UNTRUSTED.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(Error::new(
                    ErrorKind::PermissionDenied,
                    format!(
                        "not opening backing file '{name}' named by '{overlay}': the \
                         implicit-open policy denies it"
                    ),
                ));
            }
            // A name an image gives is a file name, also under --image-opts.
            crate::open_named_image(&name, format.as_deref(), opts.clone()).await?
        } else {
            open_image_with(&name, format.as_deref(), opts.clone()).await?
        };
        if args.backing_chain {
            let desc = image.describe();
            next = match (desc.full_backing_filename, desc.backing_filename) {
                (Some(full), _) => Some((full, desc.backing_format)),
                (None, Some(b)) => {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        format!(
                            "Could not determine absolute backing filename, but backing \
                             filename '{b}' present"
                        ),
                    ))
                }
                (None, None) => None,
            };
        }
        chain.push((image, name));
    }
    // The name shown for the image given: a plain file name where options reduce to one.
    chain[0].1 = crate::blockopts::display_name(&args.filename, crate::image_opts());
    match args.output {
        OutputFormat::Json if args.backing_chain => {
            let list: Vec<Value> = chain.iter().map(|(i, n)| info_json(i, n)).collect();
            print_json(&Value::Array(list));
        }
        OutputFormat::Json => print_json(&info_json(&chain[0].0, &chain[0].1)),
        OutputFormat::Human => {
            let texts: Vec<String> = chain.iter().map(|(i, n)| info_human(i, n)).collect();
            println!("{}", texts.join("\n\n"));
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00:00");
        assert_eq!(utc_date(1_795_606_216), "2026-11-25 11:30:16");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00:00");
    }

    #[test]
    fn snapshot_table_layout_matches_qemu_img() {
        let t = snapshot_table(&[SnapshotInfo {
            id: "1".into(),
            name: "snap1".into(),
            vm_state_size: 0,
            date_sec: 1_795_606_216,
            date_nsec: 0,
            vm_clock_nsec: 0,
            icount: Some(0),
        }]);
        assert_eq!(
            t,
            "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT\n\
             1       snap1                 0 B 2026-11-25 11:30:16  0000:00:00.000          0\n"
        );
    }
}
