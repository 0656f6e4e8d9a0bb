//! How many threads the kernels use; the work itself is split by the pool (`pool.rs`).

use std::sync::OnceLock;

static THREADS: OnceLock<usize> = OnceLock::new();

/// Sets the thread count once (e.g. from `--threads`); later calls are ignored.
pub fn set_threads(n: usize) {
    let _ = THREADS.set(n.max(1));
}

pub fn threads() -> usize {
    *THREADS.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}
