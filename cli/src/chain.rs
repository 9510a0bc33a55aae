//! `vmimg commit` and `vmimg rebase`: move data between an image and its backing chain.

use crate::{open_image, open_image_with, usage_error, CmdResult};
use clap::Args;
use std::path::{Path, PathBuf};
use vmimg::io_buf::is_zero;
use vmimg::{DiscardMode, Error, ErrorKind, Image, OpenOptions, PreallocMode};

/// Bytes copied per step.
const CHUNK: u64 = 1 << 20;

#[derive(Args, Debug)]
pub struct CommitArgs {
    /// Image format (probed when absent; do not probe untrusted images).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Commit into this image of the backing chain (default: the immediate backing file).
    #[arg(short = 'b')]
    base: Option<String>,
    /// Do not empty the image after committing.
    #[arg(short = 'd')]
    keep: bool,
    /// Show progress (accepted for compatibility).
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image to commit.
    filename: String,
}

#[derive(Args, Debug)]
pub struct RebaseArgs {
    /// Image format (probed when absent; do not probe untrusted images).
    #[arg(short = 'f')]
    format: Option<String>,
    /// New backing file ("" for none).
    #[arg(short = 'b')]
    backing: String,
    /// Format of the new backing file.
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Unsafe: only change the name in the header, keep the data as it is.
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// Show progress (accepted for compatibility).
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Compress the clusters the rebase writes (formats with compressed clusters only).
    #[arg(short = 'c')]
    compress: bool,
    /// The image to rebase.
    filename: String,
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Path and format of the layers of `image`'s chain, top first.
fn chain_files(image: &Image) -> Vec<(Option<PathBuf>, String)> {
    let mut out = Vec::new();
    let mut cur = Some(image.clone());
    while let Some(img) = cur {
        out.push((
            img.driver().storage().path().map(Path::to_path_buf),
            img.format().name().to_string(),
        ));
        cur = img.backing();
    }
    out
}

pub async fn commit(args: CommitArgs) -> CmdResult {
    let files = {
        let top = open_image(&args.filename, args.format.as_deref(), false, false).await?;
        chain_files(&top)
    };
    if files.len() < 2 {
        return Err(usage_error("Image does not have a backing file"));
    }
    let depth = match &args.base {
        None => 1,
        Some(b) => {
            // As qemu-img: a relative name is taken relative to each overlay's directory.
            (1..files.len())
                .find(|&d| {
                    let (Some(overlay), Some(layer)) = (&files[d - 1].0, &files[d].0) else {
                        return false;
                    };
                    let dir = overlay.parent().unwrap_or(Path::new(""));
                    canonical(&dir.join(b)) == canonical(layer)
                })
                .ok_or_else(|| {
                    usage_error(format!(
                        "Did not find '{b}' in the backing chain of '{}'",
                        args.filename
                    ))
                })?
        }
    };
    // As qemu-img: `-b` implies `-d`, since the layers between the top and the base no
    // longer match what they were written over.
    let empty_top = !args.keep && args.base.is_none();
    let path_of = |d: usize| {
        files[d]
            .0
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned())
            .ok_or_else(|| usage_error("the backing file is not a file"))
    };
    // The base is opened writable first; the layers above it are opened on top of that
    // very handle, so that no file is open twice (its image locks would refuse that).
    let base = open_image_with(
        &path_of(depth)?,
        Some(&files[depth].1),
        OpenOptions::new().writable(true),
    )
    .await?;
    let mut below = base.clone();
    for d in (1..depth).rev() {
        let opts = OpenOptions::new().backing(below);
        below = open_image_with(&path_of(d)?, Some(&files[d].1), opts).await?;
    }
    let top = open_image_with(
        &args.filename,
        Some(&files[0].1),
        OpenOptions::new().writable(empty_top).backing(below),
    )
    .await?;
    if base.size() < top.size() {
        base.resize(top.size(), PreallocMode::Off).await?;
    }
    let size = top.size();
    let mut off = 0u64;
    let mut buf = vec![0u8; CHUNK as usize];
    while off < size {
        crate::signals::check()?;
        let st = top.block_status(off, (size - off).min(CHUNK)).await?;
        let n = st.len;
        // Ranges answered above the base are what the commit moves down.
        if st.present() && st.depth < depth {
            if st.zero() {
                // As qemu-img 10: zeroes release the base's clusters (write with unmap).
                base.write_zeroes(off, n, true).await?;
            } else {
                top.read(off, &mut buf[..n as usize]).await?;
                base.write(off, &buf[..n as usize]).await?;
            }
        }
        off += n;
    }
    base.sync().await?;
    if empty_top {
        // Empty the image: everything now falls through to the base, which holds it.
        match top.discard(0, size, DiscardMode::ReadsBacking).await {
            Ok(()) => top.sync().await?,
            Err(e) if e.kind() == ErrorKind::Unsupported => {}
            Err(e) => return Err(e),
        }
    }
    if !args.quiet {
        println!("Image committed.");
    }
    Ok(0)
}

pub async fn rebase(args: RebaseArgs) -> CmdResult {
    let new_name = (!args.backing.is_empty()).then_some(args.backing.as_str());
    // As qemu-img: the image is opened first, then -c and the backing format are checked.
    let img = if args.unsafe_mode {
        // The old backing file may be gone: it is not opened; only the header changes.
        let opts = OpenOptions::new().writable(true).no_backing(true);
        open_image_with(&args.filename, args.format.as_deref(), opts).await?
    } else {
        open_image(&args.filename, args.format.as_deref(), true, false).await?
    };
    if args.compress && !img.format().entry().compressed_writes() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "Compression not supported for this file format",
        ));
    }
    if new_name.is_some() && args.backing_format.is_none() {
        return Err(usage_error(format!(
            "Could not change the backing file to '{}': backing format must be specified",
            args.backing
        )));
    }
    if args.unsafe_mode {
        img.set_backing(new_name, args.backing_format.as_deref())
            .await?;
        return Ok(0);
    }
    let dir = Path::new(&args.filename)
        .parent()
        .unwrap_or(Path::new(""))
        .to_path_buf();
    let new_backing = match new_name {
        Some(name) => Some(
            open_image(
                &dir.join(name).to_string_lossy(),
                args.backing_format.as_deref(),
                false,
                false,
            )
            .await
            .map_err(|e| e.with_operation("open new backing file"))?,
        ),
        None => None,
    };
    if args.compress {
        rebase_compressed(&img, new_backing.as_ref()).await?;
        img.set_backing(new_name, args.backing_format.as_deref())
            .await?;
        img.sync().await?;
        return Ok(0);
    }
    // As qemu-img: what falls through to the backing chain is compared and written in
    // whole (sub)clusters, the old content where a unit differs (zeros as zeroes when the
    // old content of the run is all zero).
    let align = img.subcluster_size().unwrap_or(512);
    let size = img.size();
    let mut off = 0u64;
    let mut old = vec![0u8; (CHUNK + 2 * align) as usize];
    let mut new = vec![0u8; old.len()];
    while off < size {
        crate::signals::check()?;
        let st = img.block_status(off, (size - off).min(CHUNK)).await?;
        if st.depth == 0 && st.present() {
            off += st.len;
            continue;
        }
        // The run the image itself leaves unallocated, whatever layer below answers.
        let mut run_end = off + st.len;
        while run_end < size && run_end - off < CHUNK {
            let span = (CHUNK - (run_end - off)).min(size - run_end);
            let next = img.block_status(run_end, span).await?;
            if next.depth == 0 && next.present() {
                break;
            }
            run_end += next.len;
        }
        let start = off / align * align;
        let end = run_end.div_ceil(align).saturating_mul(align).min(size);
        let n = (end - start) as usize;
        img.read(start, &mut old[..n]).await?;
        read_new_backing(new_backing.as_ref(), start, &mut new[..n]).await?;
        let old_is_zero = is_zero(&old[..n]);
        let mut done = 0usize;
        while done < n {
            let unit = |i: usize| i..(i + align as usize).min(n);
            let differs = |i: usize| old[unit(i)] != new[unit(i)];
            let first = differs(done);
            let mut run = unit(done).end;
            while run < n && differs(run) == first {
                run = unit(run).end;
            }
            if first {
                let at = start + done as u64;
                if old_is_zero {
                    img.write_zeroes(at, (run - done) as u64, false).await?;
                } else {
                    img.write(at, &old[done..run]).await?;
                }
            }
            done = run;
        }
        off = end;
    }
    img.set_backing(new_name, args.backing_format.as_deref())
        .await?;
    img.sync().await?;
    Ok(0)
}

/// Reads `buf.len()` bytes at `off` of the new backing file: zeros past its end, or
/// everywhere when there is none.
async fn read_new_backing(nb: Option<&Image>, off: u64, buf: &mut [u8]) -> Result<(), Error> {
    let n = nb.map_or(0, |b| b.size().saturating_sub(off).min(buf.len() as u64)) as usize;
    buf[n..].fill(0);
    match nb {
        Some(b) if n > 0 => b.read(off, &mut buf[..n]).await,
        _ => Ok(()),
    }
}

/// rebase -c: as qemu-img, whole clusters that read through the old backing chain
/// differently than through the new backing file are written compressed, with the old
/// content; those wholly past the old backing file's end are written as zeros. Pieces of
/// clusters the image itself partly holds (subclusters) are written as they are.
async fn rebase_compressed(img: &Image, new_backing: Option<&Image>) -> Result<(), Error> {
    let cs = img.cluster_size().unwrap_or(65536);
    let size = img.size();
    let old_size = img.backing().map_or(0, |b| b.size());
    let mut old = vec![0u8; cs as usize];
    let mut new = vec![0u8; cs as usize];
    let mut off = 0u64;
    while off < size {
        crate::signals::check()?;
        let cluster = off / cs * cs;
        let n = cs.min(size - cluster);
        // The pieces of the cluster that fall through to the backing chain.
        let mut pieces = Vec::new();
        let mut at = cluster;
        while at < cluster + n {
            let st = img.block_status(at, cluster + n - at).await?;
            if st.depth > 0 || !st.present() {
                pieces.push((at, st.len));
            }
            at += st.len;
        }
        if pieces.iter().map(|p| p.1).sum::<u64>() == n {
            let len = n as usize;
            img.read(cluster, &mut old[..len]).await?;
            read_new_backing(new_backing, cluster, &mut new[..len]).await?;
            if old[..len] != new[..len] {
                if cluster >= old_size {
                    img.write_zeroes(cluster, n, false).await?;
                } else {
                    img.write_compressed(cluster, &old[..len]).await?;
                }
            }
        } else {
            for (at, len) in pieces {
                let len = len as usize;
                img.read(at, &mut old[..len]).await?;
                read_new_backing(new_backing, at, &mut new[..len]).await?;
                if old[..len] != new[..len] {
                    img.write(at, &old[..len]).await?;
                }
            }
        }
        off = cluster + n;
    }
    Ok(())
}
