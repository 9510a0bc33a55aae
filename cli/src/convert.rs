//! `vmimg convert`: mapping-driven, parallel copy that keeps holes.

use crate::progress::{self, Progress};
use crate::size::parse_size;
use crate::{cache_mode, open_image_with, usage_error, CmdResult};
use clap::Args;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use vmimg::format::parse_option_list;
use vmimg::io_buf::is_zero;
use vmimg::{Error, ErrorKind, Image, ImageOpen, OpenOptions, Permissions};

/// Size of one copy job.
const CHUNK: u64 = 2 << 20;
/// Size of one `convert -c` job.
const COMPRESS_CHUNK: u64 = 128 << 10;
/// Longest range asked of block_status at once.
const STATUS_SPAN: u64 = 1 << 30;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Source format (probed when absent; do not probe untrusted images).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format.
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Output format options (`preallocation=...`).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Show progress (qemu-img's `    (12.34/100%)` lines).
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Do not create the target: write into an existing image of sufficient size.
    #[arg(short = 'n')]
    no_create: bool,
    /// Create the output with this backing file and write only what differs from it.
    #[arg(short = 'B')]
    backing: Option<String>,
    /// Format of the `-B` backing file.
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Consecutive zero bytes that are skipped (left as holes); 0 writes every byte, so
    /// the target is fully allocated.
    #[arg(short = 'S', default_value = "4k")]
    sparse_size: String,
    /// Parallel copy jobs.
    #[arg(short = 'm', default_value_t = 8)]
    jobs: usize,
    /// Allow out-of-order writes. Without it, jobs read in parallel but write one at a
    /// time in order, as qemu-img does: concurrent writes to one file only contend for its
    /// lock in the kernel.
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Compress the output.
    #[arg(short = 'c')]
    compress: bool,
    /// Convert an internal snapshot of the source: `snapshot.name=NAME`, `snapshot.id=ID`
    /// or `ID_OR_NAME`.
    #[arg(short = 'l')]
    snapshot: Option<String>,
    /// Force share: read the sources even if another process writes them (the copy may
    /// then be inconsistent).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Cache mode of the output: `unsafe` (default, as in qemu-img: nothing waits for the
    /// disk), `writeback`, `writethrough`, `none` or `directsync` (`O_DIRECT`).
    #[arg(short = 't', default_value = "unsafe")]
    cache: String,
    /// Cache mode of the sources: `writeback` (default) or `none` (`O_DIRECT`).
    #[arg(short = 'T', default_value = "writeback")]
    src_cache: String,
    /// Source images (concatenated) followed by the output image.
    #[arg(num_args = 2.., required = true)]
    files: Vec<String>,
}

/// The snapshot named by `-l`: `snapshot.name=NAME`, `snapshot.id=ID` or a bare ID or name.
pub fn parse_snapshot_param(param: &str) -> Result<String, Error> {
    let mut found = None;
    for part in param.split(',') {
        match part.split_once('=') {
            Some(("snapshot.name" | "snapshot.id", v)) => found = Some(v.to_string()),
            Some((k, _)) => return Err(usage_error(format!("Invalid option '{k}' for -l"))),
            None => found = Some(part.to_string()),
        }
    }
    found
        .filter(|s| !s.is_empty())
        .ok_or_else(|| usage_error("-l needs a snapshot name or ID"))
}

/// Byte ranges of `buf` that are not all-zero, at `block` granularity (0: the whole buffer).
pub fn nonzero_runs(buf: &[u8], block: usize) -> Vec<(usize, usize)> {
    let block = if block == 0 { buf.len().max(1) } else { block };
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, piece) in buf.chunks(block).enumerate() {
        if is_zero(piece) {
            continue;
        }
        let start = i * block;
        let end = start + piece.len();
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

/// Copy buffers reused across jobs: at most one per job in flight, allocated (and zeroed)
/// once instead of for every chunk.
#[derive(Clone, Default)]
struct Buffers(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl Buffers {
    fn get(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap()
            .pop()
            .unwrap_or_else(|| vec![0u8; CHUNK as usize])
    }

    fn put(&self, buf: Vec<u8>) {
        self.0.lock().unwrap().push(buf);
    }
}

#[derive(Clone)]
struct Job {
    buffers: Buffers,
    src: Image,
    dst: Image,
    src_off: u64,
    dst_off: u64,
    len: u64,
    sparse: usize,
    fresh: bool,
    /// Write only the blocks that differ from what the target reads already (its backing).
    diff_only: bool,
}

impl Job {
    /// Reads and writes (`-W`: jobs write as they finish reading).
    async fn run(self) -> Result<u64, Error> {
        let buf = self.read().await?;
        let r = self.write(&buf[..self.len as usize]).await;
        self.buffers.put(buf);
        r
    }

    /// Reads the job's source range into a buffer from the pool.
    async fn read(&self) -> Result<Vec<u8>, Error> {
        let mut buf = self.buffers.get();
        match self
            .src
            .read(self.src_off, &mut buf[..self.len as usize])
            .await
        {
            Ok(()) => Ok(buf),
            Err(e) => {
                self.buffers.put(buf);
                Err(e)
            }
        }
    }

    /// Writes a run of `buf` (`start..end`, zeros or data) that differs from the target.
    async fn write_diff_run(
        &self,
        buf: &[u8],
        (start, end, zero): (usize, usize, bool),
    ) -> Result<(), Error> {
        let at = self.dst_off + start as u64;
        if zero {
            self.dst.write_zeroes(at, (end - start) as u64, false).await
        } else {
            self.dst.write(at, &buf[start..end]).await
        }
    }

    /// Writes what was read (`buf`) to the target, keeping holes.
    async fn write(&self, buf: &[u8]) -> Result<u64, Error> {
        if self.diff_only {
            let mut old = vec![0u8; self.len as usize];
            self.dst.read(self.dst_off, &mut old).await?;
            let block = if self.sparse == 0 { 4096 } else { self.sparse };
            // Runs of blocks that differ from the target's backing, each all zeros or all
            // data: a zero run is one zeroing request (whole clusters become zero clusters).
            let mut run: Option<(usize, usize, bool)> = None;
            let blocks = buf.chunks(block).zip(old.chunks(block));
            for (i, (new, cur)) in blocks.enumerate() {
                let start = i * block;
                let kind = (new != cur).then(|| is_zero(new));
                match (&mut run, kind) {
                    (Some((_, end, zero)), Some(z)) if *zero == z && *end == start => {
                        *end = start + new.len();
                        continue;
                    }
                    _ => {}
                }
                if let Some(r) = run.take() {
                    self.write_diff_run(buf, r).await?;
                }
                run = kind.map(|z| (start, start + new.len(), z));
            }
            if let Some(r) = run {
                self.write_diff_run(buf, r).await?;
            }
            return Ok(self.len);
        }
        if self.sparse == 0 {
            self.dst.write(self.dst_off, buf).await?;
            return Ok(self.len);
        }
        let runs = nonzero_runs(buf, self.sparse);
        let mut pos = 0usize;
        for (start, end) in runs {
            if !self.fresh && start > pos {
                self.dst
                    .write_zeroes(self.dst_off + pos as u64, (start - pos) as u64, true)
                    .await?;
            }
            self.dst
                .write(self.dst_off + start as u64, &buf[start..end])
                .await?;
            pos = end;
        }
        if !self.fresh && pos < buf.len() {
            self.dst
                .write_zeroes(self.dst_off + pos as u64, (buf.len() - pos) as u64, true)
                .await?;
        }
        Ok(self.len)
    }
}

/// Where a job's read data (a pool buffer) arrives.
type ReadData = oneshot::Receiver<Result<Vec<u8>, Error>>;

/// Runs copy jobs: up to `jobs` reads at once; by default one writer task writes their
/// results in job order, as qemu-img does (concurrent writes to one file only contend for
/// its lock in the kernel, and handing the turn from job to job cost more than the write
/// order saved); with `-W` every job writes as soon as it has read.
struct CopyQueue {
    jobs: usize,
    /// Reads in flight (or whole jobs, with `-W`).
    reads: JoinSet<Result<u64, Error>>,
    /// In order: each job, where its read data arrives, and its slot.
    to_writer: Option<mpsc::Sender<(Job, ReadData, OwnedSemaphorePermit)>>,
    /// One slot per job read or waiting to be written: at most `jobs` buffers exist.
    slots: Arc<Semaphore>,
    writer: Option<tokio::task::JoinHandle<Result<u64, Error>>>,
    /// Told the bytes of each job as it finishes (qemu-img's progress moves per job).
    report: Report,
}

/// Where a copy reports each finished job's bytes.
type Report = Arc<dyn Fn(u64) + Send + Sync>;

impl CopyQueue {
    fn new(jobs: usize, in_order: bool, report: Report) -> Self {
        let (to_writer, writer) = if in_order {
            let (tx, mut rx) = mpsc::channel::<(Job, ReadData, OwnedSemaphorePermit)>(jobs);
            let done = Arc::clone(&report);
            let writer = tokio::spawn(async move {
                let mut total = 0;
                while let Some((job, data, slot)) = rx.recv().await {
                    let buf = data.await.map_err(|_| {
                        Error::new(ErrorKind::Io, "copy task failed before its data was read")
                    })??;
                    let r = job.write(&buf[..job.len as usize]).await;
                    job.buffers.put(buf);
                    drop(slot);
                    let n = r?;
                    total += n;
                    done(n);
                }
                Ok(total)
            });
            (Some(tx), Some(writer))
        } else {
            (None, None)
        };
        CopyQueue {
            jobs,
            reads: JoinSet::new(),
            to_writer,
            slots: Arc::new(Semaphore::new(jobs)),
            writer,
            report,
        }
    }

    /// Reports a finished job (reads for the writer count nothing).
    fn done(&self, n: u64) {
        if n > 0 {
            (self.report)(n);
        }
    }

    /// Queues a job, waiting while `jobs` are in flight.
    async fn push(&mut self, job: Job) -> Result<(), Error> {
        while self.reads.len() >= self.jobs {
            let n = self.join_read().await?;
            self.done(n);
        }
        while let Some(r) = self.reads.try_join_next() {
            self.done(joined(r)?);
        }
        match &self.to_writer {
            None => {
                self.reads.spawn(job.run());
            }
            Some(tx) => {
                let slot = tokio::select! {
                    slot = Arc::clone(&self.slots).acquire_owned() => {
                        slot.expect("the slots are never closed")
                    }
                    // A failed read (or writer) must not leave us waiting for a slot.
                    Some(r) = self.reads.join_next() => {
                        self.done(joined(r)?);
                        Arc::clone(&self.slots)
                            .acquire_owned()
                            .await
                            .expect("the slots are never closed")
                    }
                };
                let (data_tx, data_rx) = oneshot::channel();
                let reader = job.clone();
                self.reads.spawn(async move {
                    let _ = data_tx.send(reader.read().await);
                    Ok(0)
                });
                if tx.send((job, data_rx, slot)).await.is_err() {
                    // The writer stopped: its error says why.
                    return Err(self.writer_error().await);
                }
            }
        }
        Ok(())
    }

    /// Waits for every job.
    async fn finish(mut self) -> Result<(), Error> {
        while !self.reads.is_empty() {
            let n = self.join_read().await?;
            self.done(n);
        }
        drop(self.to_writer.take());
        if let Some(w) = self.writer.take() {
            w.await
                .map_err(|e| Error::new(ErrorKind::Io, "copy writer failed").with_source(e))??;
        }
        Ok(())
    }

    async fn join_read(&mut self) -> Result<u64, Error> {
        join_one(&mut self.reads).await
    }

    async fn writer_error(&mut self) -> Error {
        match self.writer.take() {
            Some(w) => match w.await {
                Ok(Err(e)) => e,
                Ok(Ok(_)) => Error::new(ErrorKind::Io, "copy writer ended early"),
                Err(e) => Error::new(ErrorKind::Io, "copy writer failed").with_source(e),
            },
            None => Error::new(ErrorKind::Io, "copy writer missing"),
        }
    }
}

fn joined(r: Result<Result<u64, Error>, tokio::task::JoinError>) -> Result<u64, Error> {
    r.map_err(|e| Error::new(ErrorKind::Io, "copy task failed").with_source(e))?
}

pub async fn run(args: ConvertArgs) -> CmdResult {
    let (dst_name, src_names) = args.files.split_last().expect("clap requires two files");
    let out_format = crate::create::output_format(&args.out_format)?;
    if args.no_create && !args.options.is_empty() {
        return Err(usage_error("-o has no effect when skipping image creation"));
    }
    if crate::create::wants_help(&args.options) {
        crate::create::print_help(out_format);
        return Ok(0);
    }
    if args.compress && !out_format.entry().compressed_writes() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "Compression not supported for this file format",
        ));
    }
    let sparse = parse_size(&args.sparse_size).map_err(usage_error)? as usize;
    if !(1..=16).contains(&args.jobs) {
        return Err(usage_error(
            "Invalid number of coroutines specified. Must be between 1 and 16.",
        ));
    }
    let jobs = args.jobs;

    // As qemu-img: nobody may write or resize a source while it is copied.
    let src_opts = OpenOptions::new()
        .force_share(args.force_share)
        .share(Permissions::ALL.without(Permissions::WRITE | Permissions::RESIZE));
    let mut src_opts = cache_mode(src_opts, &args.src_cache)?;
    // The target's writes go one at a time, in order, on the jobs' own threads: a thread
    // hand-over per write cost about 15% of a plain copy's time, and nothing else runs on
    // this runtime that a write waiting for the disk could hold up.
    let dst_opts = cache_mode(
        OpenOptions::new().writable(true).inline_io(true),
        &args.cache,
    )?;
    if let Some(param) = &args.snapshot {
        src_opts = src_opts.snapshot(parse_snapshot_param(param)?);
    }
    let mut sources = Vec::new();
    let mut total = 0u64;
    for name in src_names {
        let img = open_image_with(name, args.format.as_deref(), src_opts.clone()).await?;
        total = total
            .checked_add(img.size())
            .ok_or_else(|| usage_error("total source size overflows"))?;
        sources.push(img);
    }

    crate::refuse_aliased_target(dst_name, src_names, &sources)?;
    let mut items = parse_option_list(&args.options)?;
    // `-o backing_file=..,backing_fmt=..` is `-B`/`-F` (the output holds only what differs
    // from its backing file), as in qemu-img.
    let mut backing = args.backing.clone();
    let mut backing_format = args.backing_format.clone();
    for (k, v) in std::mem::take(&mut items) {
        let slot = match k.as_str() {
            "backing_file" => &mut backing,
            "backing_fmt" => &mut backing_format,
            _ => {
                items.push((k, v));
                continue;
            }
        };
        if slot.as_ref().is_some_and(|old| *old != v) {
            return Err(usage_error(format!(
                "-o {k}={v} contradicts the backing file given with -B/-F"
            )));
        }
        *slot = Some(v);
    }
    if args.compress
        && items
            .iter()
            .any(|(k, v)| k == "preallocation" && v != "off")
    {
        return Err(usage_error(
            "Compression and preallocation not supported at the same time",
        ));
    }
    // qemu-img's order: concatenation first; the backing format is needed only to create
    // the target (with -n, -B names the target's backing file as it is).
    if src_names.len() > 1 && backing.is_some() {
        return Err(usage_error(
            "Having a backing file for the target makes no sense when concatenating \
             multiple input images",
        ));
    }
    if !args.no_create && backing.is_some() && backing_format.is_none() {
        return Err(usage_error(
            "Use of backing file requires explicit backing format",
        ));
    }
    let diff_only = backing.is_some();
    if !args.no_create {
        let plan = crate::create::plan(
            out_format,
            &items,
            crate::create::CreateArgsCommon {
                filename: dst_name,
                size: Some(total),
                backing: backing.as_deref(),
                backing_format: backing_format.as_deref(),
                // As qemu-img convert: the target is created without opening its backing
                // file (the size is the source's; the backing opens with the target).
                unsafe_backing: true,
            },
        )
        .await?;
        plan.create(dst_name)
            .await
            .map_err(|e| e.with_operation("create"))?;
    }
    let dst = ImageOpen::path(dst_name)
        .options(dst_opts)
        .format(out_format)
        .open()
        .await?;
    crate::signals::track(&dst);
    if dst.size() < total {
        return Err(usage_error(format!(
            "target '{dst_name}' is smaller ({}) than the source ({total})",
            dst.size()
        )));
    }
    if args.compress || dst.needs_compressed_writes() {
        let sources: Vec<(Image, u64)> = {
            let mut base = 0;
            sources
                .iter()
                .map(|s| {
                    let b = base;
                    base += s.size();
                    (s.clone(), b)
                })
                .collect()
        };
        compressed_copy(
            Arc::new(sources),
            &dst,
            total,
            jobs,
            diff_only,
            sparse == 0,
            args.progress && !args.quiet,
        )
        .await?;
        // Like qemu-img convert: hand everything to the OS, without waiting for the disk.
        dst.flush().await?;
        crate::signals::check()?;
        return Ok(0);
    }
    let fresh = !args.no_create;

    // As qemu-img: progress counts the bytes that are copied, not the zeros skipped.
    let show_progress = args.progress && !args.quiet;
    let mut to_copy = 0u64;
    if show_progress {
        for src in &sources {
            let mut off = 0u64;
            while off < src.size() {
                let st = src
                    .block_status(off, (src.size() - off).min(STATUS_SPAN))
                    .await?;
                if !(st.zero() && !diff_only && sparse != 0) {
                    to_copy += st.len;
                }
                off += st.len;
            }
        }
    }
    let bar = Progress::start(show_progress, to_copy).map(Arc::new);
    let report: Report = match &bar {
        Some(b) => {
            let b = Arc::clone(b);
            Arc::new(move |n| b.add(n))
        }
        None => Arc::new(|_| {}),
    };

    let buffers = Buffers::default();
    let mut queue = CopyQueue::new(jobs, !args.out_of_order, report);
    let mut base = 0u64;
    'sources: for src in &sources {
        let size = src.size();
        let mut off = 0u64;
        while off < size {
            if crate::signals::stop_requested() {
                break 'sources;
            }
            let st = src.block_status(off, (size - off).min(STATUS_SPAN)).await?;
            // -S 0: nothing is skipped, every byte of the target is written (allocated).
            if st.zero() && !diff_only && sparse != 0 {
                if !fresh {
                    dst.write_zeroes(base + off, st.len, true).await?;
                }
            } else {
                let mut pos = off;
                while pos < off + st.len {
                    let len = CHUNK.min(off + st.len - pos);
                    let job = Job {
                        buffers: buffers.clone(),
                        src: src.clone(),
                        dst: dst.clone(),
                        src_off: pos,
                        dst_off: base + pos,
                        len,
                        sparse,
                        fresh,
                        diff_only,
                    };
                    queue.push(job).await?;
                    pos += len;
                }
            }
            off += st.len;
        }
        base += size;
    }
    // On a signal: the jobs in flight finish, and the target is flushed (it then passes
    // check, with what was copied so far).
    queue.finish().await?;
    // Like qemu-img convert: hand everything to the OS, without waiting for the disk.
    dst.flush().await?;
    crate::signals::check()?;
    if let Some(b) = bar {
        b.end();
    }
    Ok(0)
}

/// Reads `buf.len()` bytes at `offset` of the concatenation of `sources` (image, base).
async fn read_concat(sources: &[(Image, u64)], offset: u64, buf: &mut [u8]) -> Result<(), Error> {
    let mut done = 0usize;
    for (img, base) in sources {
        let end = base + img.size();
        let at = offset + done as u64;
        if done == buf.len() {
            break;
        }
        if at >= end || at < *base {
            continue;
        }
        let n = ((end - at) as usize).min(buf.len() - done);
        img.read(at - base, &mut buf[done..done + n]).await?;
        done += n;
    }
    buf[done..].fill(0);
    Ok(())
}

/// Whether `[offset, offset + len)` of the concatenation reads as zeros per block status.
async fn known_zero(sources: &[(Image, u64)], offset: u64, len: u64) -> Result<bool, Error> {
    for (img, base) in sources {
        let (start, end) = (offset.max(*base), (offset + len).min(base + img.size()));
        let mut pos = start;
        while pos < end {
            let st = img.block_status(pos - base, end - pos).await?;
            if !st.zero() {
                return Ok(false);
            }
            pos += st.len;
        }
    }
    Ok(true)
}

/// `convert -c`: every non-zero cluster stored compressed, jobs compressing in parallel.
/// With `diff_only` (a target with a backing file, `-B`) only clusters that differ from
/// what the target reads already are written, and zeros over backing data are written as
/// zero clusters (leaving them out would expose the backing file's data).
async fn compressed_copy(
    sources: Arc<Vec<(Image, u64)>>,
    dst: &Image,
    total: u64,
    jobs: usize,
    diff_only: bool,
    allocate_all: bool,
    show_progress: bool,
) -> Result<(), Error> {
    // -S 0 allocates everything, as qemu-img: zeros too are written as compressed clusters.
    let allocate_all = allocate_all && !diff_only;
    let cs = dst.cluster_size().unwrap_or(65536);
    // Smaller pieces than a plain copy's: compression, not I/O, sets the pace, and the
    // jobs' buffers are most of the memory used.
    let chunk = COMPRESS_CHUNK.max(cs) / cs * cs;
    let bar = Progress::start(show_progress, total);
    let mut set: JoinSet<Result<u64, Error>> = JoinSet::new();
    let mut off = 0u64;
    while off < total && !crate::signals::stop_requested() {
        let len = chunk.min(total - off);
        if !diff_only && !allocate_all && known_zero(&sources, off, len).await? {
            progress::add(&bar, len);
            off += len;
            continue;
        }
        while set.len() >= jobs {
            let n = join_one(&mut set).await?;
            progress::add(&bar, n);
        }
        let (sources, dst) = (Arc::clone(&sources), dst.clone());
        set.spawn(async move {
            let mut buf = vec![0u8; len as usize];
            read_concat(&sources, off, &mut buf).await?;
            let mut old = Vec::new();
            if diff_only {
                old.resize(len as usize, 0);
                dst.read(off, &mut old).await?;
            }
            let css = cs as usize;
            for (i, cluster) in buf.chunks(css).enumerate() {
                let at = off + i as u64 * cs;
                let below = old.get(i * css..i * css + cluster.len());
                if below.is_some_and(|b| b == cluster) {
                    continue;
                }
                if allocate_all || !is_zero(cluster) {
                    dst.write_compressed(at, cluster).await?;
                } else if below.is_some() {
                    dst.write_zeroes(at, cluster.len() as u64, false).await?;
                }
            }
            Ok(len)
        });
        off += len;
    }
    while !set.is_empty() {
        let n = join_one(&mut set).await?;
        progress::add(&bar, n);
    }
    if let Some(b) = bar {
        b.finish();
    }
    Ok(())
}

async fn join_one(set: &mut JoinSet<Result<u64, Error>>) -> Result<u64, Error> {
    set.join_next().await.map_or(Ok(0), joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonzero_runs_merge_adjacent_blocks_and_skip_zero_blocks() {
        let mut buf = vec![0u8; 16384];
        buf[10] = 1;
        buf[4096] = 1;
        buf[12287] = 1;
        assert_eq!(nonzero_runs(&buf, 4096), vec![(0, 12288)]);
        buf[1] = 0;
        buf[10] = 0;
        assert_eq!(nonzero_runs(&buf, 4096), vec![(4096, 12288)]);
        buf[16383] = 9;
        assert_eq!(nonzero_runs(&buf, 4096), vec![(4096, 16384)]);
        buf[8192..].fill(0);
        buf[16000] = 1;
        assert_eq!(nonzero_runs(&buf, 4096), vec![(4096, 8192), (12288, 16384)]);
        assert_eq!(nonzero_runs(&[0u8; 100], 4096), vec![]);
        assert_eq!(nonzero_runs(&buf, 0), vec![(0, 16384)]);
    }

    #[test]
    fn snapshot_param_forms() {
        assert_eq!(parse_snapshot_param("snapshot.name=s1").unwrap(), "s1");
        assert_eq!(parse_snapshot_param("snapshot.id=2").unwrap(), "2");
        assert_eq!(parse_snapshot_param("s1").unwrap(), "s1");
        assert!(parse_snapshot_param("bogus=1").is_err());
        assert!(parse_snapshot_param("").is_err());
    }
}
