//! `vmimg info`.

use crate::size::human_size;
use crate::{open_image, CmdResult};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use vmimg::Image;

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
    /// The image.
    filename: String,
}

/// Writes JSON with qemu's four-space indentation.
pub fn print_json(value: &Value) {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    serde::Serialize::serialize(value, &mut ser).expect("serialising JSON to memory");
    println!("{}", String::from_utf8_lossy(&out));
}

fn info_json(image: &Image, filename: &str) -> Value {
    let desc = image.describe();
    let storage = image.driver().storage();
    let file_len = storage.size().unwrap_or(0);
    let actual = desc.actual_size.unwrap_or(0);
    let mut top = json!({
        "children": [{
            "name": "file",
            "info": {
                "children": [],
                "virtual-size": file_len,
                "filename": filename,
                "format": "file",
                "actual-size": actual,
                "format-specific": {"type": "file", "data": {}},
                "dirty-flag": false
            }
        }],
        "virtual-size": image.size(),
        "filename": filename,
        "format": image.format().name(),
        "actual-size": actual,
    });
    let obj = top.as_object_mut().expect("object literal");
    if let Some(b) = &desc.backing_filename {
        obj.insert("backing-filename".into(), json!(b));
    }
    if let Some(f) = &desc.backing_format {
        obj.insert("backing-filename-format".into(), json!(f));
    }
    obj.insert("dirty-flag".into(), json!(desc.dirty));
    top
}

fn info_human(image: &Image, filename: &str) -> String {
    let desc = image.describe();
    let storage = image.driver().storage();
    let file_len = storage.size().unwrap_or(0);
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
    if let Some(b) = &desc.backing_filename {
        s += &format!("backing file: {b}\n");
    }
    if let Some(f) = &desc.backing_format {
        s += &format!("backing file format: {f}\n");
    }
    s += &format!(
        "Child node '/file':\n    filename: {filename}\n    protocol type: file\n    file length: {} ({file_len} bytes)\n    disk size: {disk}",
        human_size(file_len)
    );
    s
}

pub async fn run(args: InfoArgs) -> CmdResult {
    let image = open_image(&args.filename, args.format.as_deref(), false, false).await?;
    match args.output {
        OutputFormat::Json => print_json(&info_json(&image, &args.filename)),
        OutputFormat::Human => println!("{}", info_human(&image, &args.filename)),
    }
    Ok(0)
}
