//! `vmimg compare`: exit 0 identical, 1 different, 2 error, 4 a read failed (as qemu-img
//! compare).

use crate::{open_image_with, CmdResult};
use clap::Args;
use vmimg::io_buf::is_zero;
use vmimg::{Error, Image, OpenOptions};

/// Bytes compared per read.
const CHUNK: u64 = 1 << 20;
/// Longest range asked of block_status at once.
const STATUS_SPAN: u64 = 1 << 30;
/// Mismatch offsets are reported at this granularity, as qemu-img does.
const SECTOR: u64 = 512;

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Format of the first image.
    #[arg(short = 'f')]
    format_a: Option<String>,
    /// Format of the second image.
    #[arg(short = 'F')]
    format_b: Option<String>,
    /// Strict mode: images of different size or allocation differ.
    #[arg(short = 's')]
    strict: bool,
    /// Show progress (accepted for compatibility).
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: print nothing, only set the exit status.
    #[arg(short = 'q')]
    quiet: bool,
    /// Force share: open even if another process writes the images (their content may
    /// then read inconsistently).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// First image.
    a: String,
    /// Second image.
    b: String,
}

/// Where two ranges first differ: the sector offset of the first differing byte.
fn first_difference(a: &[u8], b: &[u8], base: u64) -> Option<u64> {
    if a == b {
        return None;
    }
    let i = a.iter().zip(b).position(|(x, y)| x != y)? as u64;
    Some((base + i) / SECTOR * SECTOR)
}

/// Why a comparison stopped early.
enum Stop {
    /// An image could not be read: qemu-img's message, and its exit status 4.
    Read(String),
    Other(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Other(e)
    }
}

/// Reads `buf` of `img` at `pos`; a failure is qemu-img's "Error while reading".
async fn read(img: &Image, name: &str, pos: u64, buf: &mut [u8]) -> Result<(), Stop> {
    img.read(pos, buf).await.map_err(|e| {
        Stop::Read(format!(
            "Error while reading offset {pos} of {name}: {}",
            e.reason()
        ))
    })
}

async fn compare_range(
    (a, an): (&Image, &str),
    (b, bn): (&Image, &str),
    off: u64,
    len: u64,
) -> Result<Option<u64>, Stop> {
    let mut pos = off;
    let mut ba = vec![0u8; CHUNK.min(len) as usize];
    let mut bb = vec![0u8; CHUNK.min(len) as usize];
    while pos < off + len {
        let n = CHUNK.min(off + len - pos) as usize;
        let (ra, rb) = tokio::join!(
            read(a, an, pos, &mut ba[..n]),
            read(b, bn, pos, &mut bb[..n])
        );
        ra?;
        rb?;
        if let Some(at) = first_difference(&ba[..n], &bb[..n], pos) {
            return Ok(Some(at));
        }
        pos += n as u64;
    }
    Ok(None)
}

/// First non-zero sector of `img` in `[off, end)`, skipping ranges that are known zero.
async fn first_nonzero(
    (img, name): (&Image, &str),
    off: u64,
    end: u64,
) -> Result<Option<u64>, Stop> {
    let mut pos = off;
    let mut buf = vec![0u8; CHUNK.min(end.saturating_sub(off)) as usize];
    while pos < end {
        let st = img.block_status(pos, (end - pos).min(STATUS_SPAN)).await?;
        if !st.zero() {
            let mut p = pos;
            while p < pos + st.len {
                let n = CHUNK.min(pos + st.len - p) as usize;
                read(img, name, p, &mut buf[..n]).await?;
                if !is_zero(&buf[..n]) {
                    let i = buf[..n].iter().position(|&x| x != 0).unwrap_or(0) as u64;
                    return Ok(Some((p + i) / SECTOR * SECTOR));
                }
                p += n as u64;
            }
        }
        pos += st.len;
    }
    Ok(None)
}

pub async fn run(args: CompareArgs) -> CmdResult {
    let opts = OpenOptions::new().force_share(args.force_share);
    let a = open_image_with(&args.a, args.format_a.as_deref(), opts.clone()).await?;
    let b = open_image_with(&args.b, args.format_b.as_deref(), opts).await?;
    // The report goes out at the end, after any error: qemu-img's standard output is
    // buffered when it is not a terminal, so its errors come first where both are read.
    let mut report = Vec::new();
    let result = compare(&args, &a, &b, &mut report).await;
    let print = |report: Vec<String>| {
        if !args.quiet {
            for line in report {
                println!("{line}");
            }
        }
    };
    match result {
        Ok(status) => {
            print(report);
            Ok(status)
        }
        Err(Stop::Read(msg)) => {
            eprintln!("{}: {msg}", crate::prog());
            print(report);
            Ok(4)
        }
        Err(Stop::Other(e)) => Err(e),
    }
}

async fn compare(
    args: &CompareArgs,
    a: &Image,
    b: &Image,
    report: &mut Vec<String>,
) -> Result<u8, Stop> {
    let (a, b) = ((a, args.a.as_str()), (b, args.b.as_str()));
    let mut say = |msg: String| report.push(msg);
    let (sa, sb) = (a.0.size(), b.0.size());
    if sa != sb && args.strict {
        say("Strict mode: Image size mismatch!".into());
        return Ok(1);
    }
    let common = sa.min(sb);
    let mut off = 0u64;
    while off < common {
        let span = (common - off).min(STATUS_SPAN);
        let st_a = a.0.block_status(off, span).await?;
        let st_b = b.0.block_status(off, st_a.len).await?;
        let len = st_a.len.min(st_b.len);
        if args.strict && st_a.present() != st_b.present() {
            say(format!("Strict mode: Offset {off} block status mismatch!"));
            return Ok(1);
        }
        let mismatch = match (st_a.zero(), st_b.zero()) {
            (true, true) => None,
            (true, false) => first_nonzero(b, off, off + len).await?,
            (false, true) => first_nonzero(a, off, off + len).await?,
            (false, false) => compare_range(a, b, off, len).await?,
        };
        if let Some(at) = mismatch {
            say(format!("Content mismatch at offset {at}!"));
            return Ok(1);
        }
        off += len;
    }
    if sa != sb {
        // As qemu-img: once the common part compared equal.
        say("Warning: Image size mismatch!".into());
    }
    let longer = if sa > sb { a } else { b };
    if let Some(at) = first_nonzero(longer, common, sa.max(sb)).await? {
        say(format!("Content mismatch at offset {at}!"));
        return Ok(1);
    }
    say("Images are identical.".into());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_difference_reports_the_sector_of_the_first_differing_byte() {
        let a = vec![0u8; 2048];
        let mut b = a.clone();
        assert_eq!(first_difference(&a, &b, 0), None);
        b[1000] = 1;
        b[1500] = 1;
        assert_eq!(first_difference(&a, &b, 0), Some(512));
        assert_eq!(first_difference(&a, &b, 1 << 20), Some((1 << 20) + 512));
    }
}
