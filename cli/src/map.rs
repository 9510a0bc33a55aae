//! `vmimg map`: allocation map like qemu-img map, human or JSON.

use crate::info::OutputFormat;
use crate::size::parse_size;
use crate::{open_image_with, usage_error, CmdResult};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use vmimg::{BlockStatus, Error, ErrorKind, Image, OpenOptions};

/// Longest range asked of block_status at once.
const STATUS_SPAN: u64 = 1 << 40;

#[derive(Args, Debug)]
pub struct MapArgs {
    /// Image format (probed when absent; do not probe untrusted images).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    /// First guest offset to map.
    #[arg(short = 's', long = "start-offset", default_value = "0")]
    start: String,
    /// Bytes to map from the start offset (default: to the end).
    #[arg(short = 'l', long = "max-length")]
    max_length: Option<String>,
    /// Force share: open even if another process writes the image (its content may then
    /// read inconsistently).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    filename: String,
}

/// One row of the map: a run of ranges with the same status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub start: u64,
    pub length: u64,
    pub depth: usize,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
    pub file: Option<PathBuf>,
}

impl Entry {
    fn from_status(st: &BlockStatus) -> Self {
        Entry {
            start: st.offset,
            length: st.len,
            depth: st.depth,
            present: st.present(),
            zero: st.zero(),
            data: st.data(),
            compressed: st.compressed(),
            offset: st.host_offset(),
            file: st.file.clone(),
        }
    }

    /// Extends `self` with `next` when qemu-img would print them as one row.
    fn try_merge(&mut self, next: &Entry) -> bool {
        let same = self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.file == next.file
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            };
        if same {
            self.length += next.length;
        }
        same
    }

    fn json(&self) -> String {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start, self.length, self.depth, self.present, self.zero, self.data, self.compressed
        );
        if let Some(o) = self.offset {
            s += &format!(", \"offset\": {o}");
        }
        s + "}"
    }
}

/// The merged map of `[start, end)`.
pub async fn map_entries(image: &Image, start: u64, end: u64) -> Result<Vec<Entry>, Error> {
    let mut out: Vec<Entry> = Vec::new();
    let mut off = start;
    while off < end {
        let st = image
            .block_status(off, (end - off).min(STATUS_SPAN))
            .await?;
        let e = Entry::from_status(&st);
        off += st.len;
        if let Some(last) = out.last_mut() {
            if last.try_merge(&e) {
                continue;
            }
        }
        out.push(e);
    }
    Ok(out)
}

pub async fn run(args: MapArgs) -> CmdResult {
    let opts = OpenOptions::new().force_share(args.force_share);
    let image = open_image_with(&args.filename, args.format.as_deref(), opts).await?;
    let size = image.size();
    let start = parse_size(&args.start).map_err(usage_error)?.min(size);
    let end = match &args.max_length {
        Some(l) => start
            .saturating_add(parse_size(l).map_err(usage_error)?)
            .min(size),
        None => size,
    };
    let entries = map_entries(&image, start, end).await?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match args.output {
        OutputFormat::Json => {
            let rows: Vec<String> = entries.iter().map(Entry::json).collect();
            let _ = writeln!(out, "[{}]", rows.join(",\n"));
        }
        OutputFormat::Human => {
            let _ = writeln!(
                out,
                "{:<16}{:<16}{:<16}File",
                "Offset", "Length", "Mapped to"
            );
            for e in &entries {
                if !e.data {
                    continue;
                }
                let Some(offset) = e.offset else {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        "File contains external, encrypted or compressed clusters.",
                    ));
                };
                // As qemu-img: preallocated clusters that read as zeros are not listed.
                if e.zero {
                    continue;
                }
                let file = e
                    .file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "{:<16}{:<16}{:<16}{file}",
                    hex(e.start),
                    hex(e.length),
                    hex(offset)
                );
            }
        }
    }
    Ok(0)
}

/// `%#x` as C prints it: `0` for zero, `0x...` otherwise.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(start: u64, length: u64, offset: Option<u64>) -> Entry {
        Entry {
            start,
            length,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset,
            file: None,
        }
    }

    #[test]
    fn rows_merge_only_when_host_offsets_continue() {
        let mut a = e(0, 4096, Some(0x10000));
        assert!(a.try_merge(&e(4096, 4096, Some(0x11000))));
        assert_eq!(a.length, 8192);
        assert!(!a.try_merge(&e(8192, 4096, Some(0x50000))));
        assert!(!a.try_merge(&e(8192, 4096, None)));
    }

    #[test]
    fn json_row_matches_qemu_img_layout() {
        assert_eq!(
            e(0, 4096, Some(0)).json(),
            "{ \"start\": 0, \"length\": 4096, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 0}"
        );
        assert_eq!(hex(0), "0");
        assert_eq!(hex(0x19000), "0x19000");
    }
}
