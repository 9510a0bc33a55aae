//! CPU-heavy work (compression) off the async executor: a small pool of threads, one per
//! core, shared by every format.

/// Runs CPU-heavy (de)compression on this crate's CPU threads (one per core, started on
/// first use), never on an executor thread. Jobs queue without limit (callers bound their
/// own concurrency), so the threads stay busy while work is queued, and each keeps its
/// (de)compression contexts: memory grows with the number of cores, not with the number of
/// requests or of tokio's blocking threads.
pub async fn run_cpu<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> crate::Result<T> {
    type Job = Box<dyn FnOnce() + Send>;
    static QUEUE: std::sync::LazyLock<std::sync::mpsc::Sender<Job>> =
        std::sync::LazyLock::new(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
            let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
            for i in 0..cores {
                let rx = std::sync::Arc::clone(&rx);
                let spawned = std::thread::Builder::new()
                    .name(format!("vmimg-cpu-{i}"))
                    .spawn(move || loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    });
                if spawned.is_err() && i > 0 {
                    break; // Fewer threads than cores still work.
                }
            }
            tx
        });
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        // A panic drops `tx`: the caller gets an error, and the thread lives on.
        if let Ok(v) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            let _ = tx.send(v);
        }
    });
    let failed = || crate::Error::new(crate::ErrorKind::Io, "compression task failed");
    QUEUE.send(job).map_err(|_| failed())?;
    rx.await.map_err(|_| failed())
}
