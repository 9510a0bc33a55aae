//! SIGTERM, SIGINT and SIGHUP: long commands stop at their next step, and every image opened
//! for writing is flushed before the process exits, so that what a command confirmed is in
//! the image (as qemu-io keeps its confirmed writes) and a convert target passes `check`.
//!
//! ```text
//!  signal --> stop requested --> a command that stops by itself (io: between commands;
//!                 |              convert, commit, rebase, dd, bench: between chunks, after
//!                 |              the jobs in flight) returns
//!                 |-- grace period over, or a second signal --> the command is dropped
//!                 v
//!          flush every tracked image --> exit 128 + signal number
//!
//!  other commands (info, map, check, resize, amend, ...) end at once, as qemu-img does:
//!  what they change on disk is crash-safe, and they hold no confirmed writes in caches.
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;
use vmimg::{Error, Image};

/// How long a command may take to stop by itself before it is dropped mid-step.
const GRACE: Duration = Duration::from_secs(20);

static STOP: AtomicBool = AtomicBool::new(false);
static STOP_NOTIFY: LazyLock<Notify> = LazyLock::new(Notify::new);
/// Images opened for writing by the running command.
static TRACKED: Mutex<Vec<Image>> = Mutex::new(Vec::new());

/// Whether a signal asked the command to stop.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Acquire)
}

/// Resolves once a signal asked the command to stop.
pub async fn stopped() {
    let notified = STOP_NOTIFY.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    if stop_requested() {
        return;
    }
    notified.await;
}

fn request_stop() {
    STOP.store(true, Ordering::Release);
    STOP_NOTIFY.notify_waiters();
}

/// The error a command returns when it stops because of a signal.
pub fn interrupted() -> Error {
    Error::new(vmimg::ErrorKind::Io, "interrupted by a signal")
}

/// Returns `Err(interrupted())` once a signal asked the command to stop.
pub fn check() -> Result<(), Error> {
    if stop_requested() {
        Err(interrupted())
    } else {
        Ok(())
    }
}

/// Keeps `image` to be flushed if a signal ends the command.
pub fn track(image: &Image) {
    if image.is_writable() {
        TRACKED.lock().unwrap().push(image.clone());
    }
}

/// Stops keeping `image` (it is being closed: its file and locks must go with it).
pub fn untrack(image: &Image) {
    TRACKED
        .lock()
        .unwrap()
        .retain(|t| !std::sync::Arc::ptr_eq(t.driver(), image.driver()));
}

async fn flush_tracked() {
    let images: Vec<Image> = std::mem::take(&mut *TRACKED.lock().unwrap());
    for image in images {
        if let Err(e) = image.flush().await {
            eprintln!("{}: flushing after a signal: {e}", crate::prog());
        }
    }
}

/// Runs `command` as a task; on SIGTERM, SIGINT or SIGHUP asks it to stop and returns the
/// exit status 128 + the signal's number. A command that `stops` by itself is waited for
/// (at most [`GRACE`], or until a second signal) and the images it opened for writing are
/// flushed; any other is dropped at once.
pub async fn run_guarded<F>(command: F, stops: bool) -> Result<u8, Error>
where
    F: std::future::Future<Output = Result<u8, Error>> + Send + 'static,
{
    let sig = |kind| signal(kind).map_err(|e| Error::from(e).with_operation("signal"));
    let mut term = sig(SignalKind::terminate())?;
    let mut int = sig(SignalKind::interrupt())?;
    let mut hup = sig(SignalKind::hangup())?;
    let mut task = tokio::spawn(command);
    let joined = |r: Result<Result<u8, Error>, tokio::task::JoinError>| {
        r.map_err(|e| Error::new(vmimg::ErrorKind::Io, "command task failed").with_source(e))?
    };
    let signo = tokio::select! {
        r = &mut task => return joined(r),
        _ = term.recv() => libc::SIGTERM,
        _ = int.recv() => libc::SIGINT,
        _ = hup.recv() => libc::SIGHUP,
    };
    request_stop();
    if !stops {
        task.abort();
        return Ok(128 + signo as u8);
    }
    let finished = tokio::select! {
        r = tokio::time::timeout(GRACE, &mut task) => r.ok(),
        _ = term.recv() => None,
        _ = int.recv() => None,
        _ = hup.recv() => None,
    };
    if finished.is_none() {
        task.abort();
        let _ = (&mut task).await;
    }
    flush_tracked().await;
    Ok(128 + signo as u8)
}
