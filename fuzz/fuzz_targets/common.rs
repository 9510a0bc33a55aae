//! What the fuzz targets share (included with `#[path]`; not a target of its own).

use std::sync::OnceLock;

/// A current-thread runtime with timers and few blocking threads: (de)compression runs on
/// the blocking pool, and under AddressSanitizer every short-lived thread costs memory that
/// libFuzzer counts against its RSS limit.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .max_blocking_threads(4)
            .build()
            .expect("tokio runtime")
    })
}
