//! `vmimg bench`: qemu-img bench's simple I/O benchmark (same options, same output).

use crate::size::parse_size;
use crate::{cache_mode, open_image_with, usage_error, CmdResult};
use clap::Args;
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::time::Instant;
use vmimg::{Error, OpenOptions};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Number of requests.
    #[arg(short = 'c', default_value_t = 75000)]
    count: u64,
    /// Requests in flight at once.
    #[arg(short = 'd', default_value_t = 64)]
    depth: usize,
    /// Image format (probed when absent; do not probe untrusted images).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Drain and flush every N remaining requests (write tests).
    #[arg(long = "flush-interval")]
    flush_interval: Option<u64>,
    /// With --flush-interval: flush without draining first.
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// AIO backend (accepted for compatibility; vmimg picks its own).
    #[arg(short = 'i')]
    aio: Option<String>,
    /// Native AIO (accepted for compatibility).
    #[arg(short = 'n')]
    native: bool,
    /// Offset of the first request.
    #[arg(short = 'o', default_value = "0")]
    offset: String,
    /// Byte written by write tests.
    #[arg(long)]
    pattern: Option<u8>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Request size.
    #[arg(short = 's', default_value = "4k")]
    size: String,
    /// Distance between consecutive requests (default: the request size).
    #[arg(short = 'S')]
    step: Option<String>,
    /// Cache mode: `none`/`directsync` bypass the page cache; others use it.
    #[arg(short = 't', default_value = "writeback")]
    cache: String,
    /// Write test (default: read).
    #[arg(short = 'w')]
    write: bool,
    /// Force share (accepted for compatibility).
    #[arg(short = 'U')]
    force_share: bool,
    /// The image.
    filename: String,
}

pub async fn run(args: BenchArgs) -> CmdResult {
    let size = parse_size(&args.size).map_err(usage_error)?;
    let step = match &args.step {
        Some(s) => parse_size(s).map_err(usage_error)?,
        None => size,
    };
    let start = parse_size(&args.offset).map_err(usage_error)?;
    if size == 0 || args.depth == 0 {
        return Err(usage_error("request size and depth must be positive"));
    }
    let opts = OpenOptions::new()
        .writable(args.write)
        .force_share(args.force_share);
    let opts = cache_mode(opts, &args.cache)?;
    let image = open_image_with(&args.filename, args.format.as_deref(), opts).await?;
    let img_size = image.size();
    if size > img_size {
        return Err(usage_error("request size is larger than the image"));
    }
    if !args.quiet {
        println!(
            "Sending {} {} requests, {size} bytes each, {} in parallel (starting at offset {start}, step size {step})",
            args.count,
            if args.write { "write" } else { "read" },
            args.depth
        );
    }
    let pattern = args.pattern.unwrap_or(0);
    let t0 = Instant::now();
    let mut pos = start;
    let mut next_offset = move || {
        if pos + size > img_size {
            pos = 0;
        }
        let o = pos;
        pos += step;
        o
    };
    let mut in_flight = FuturesUnordered::new();
    let mut issued = 0u64;
    let mut free_bufs: Vec<Vec<u8>> = Vec::new();
    while issued < args.count || !in_flight.is_empty() {
        let remaining = args.count - issued;
        let flush_now = args.write
            && issued > 0
            && remaining > 0
            && args
                .flush_interval
                .is_some_and(|n| n > 0 && remaining % n == 0);
        if flush_now && (args.no_drain || in_flight.is_empty()) {
            image.flush().await?;
        }
        let drain = flush_now && !args.no_drain && !in_flight.is_empty();
        if crate::signals::stop_requested() {
            // Issue no more; the requests in flight finish, then the image is flushed.
            issued = args.count;
        }
        if issued < args.count && in_flight.len() < args.depth && !drain {
            let offset = next_offset();
            let mut buf = free_bufs
                .pop()
                .unwrap_or_else(|| vec![pattern; size as usize]);
            let img = image.clone();
            let write = args.write;
            in_flight.push(async move {
                let r = if write {
                    img.write(offset, &buf).await
                } else {
                    img.read(offset, &mut buf).await
                };
                r.map(|()| buf)
            });
            issued += 1;
            continue;
        }
        if let Some(r) = in_flight.next().await {
            free_bufs.push(r?);
        }
    }
    if args.write {
        image.flush().await?;
    }
    crate::signals::check()?;
    let secs = t0.elapsed().as_secs_f64();
    if !args.quiet {
        println!("Run completed in {secs:.3} seconds.");
    }
    Ok::<u8, Error>(0)
}
