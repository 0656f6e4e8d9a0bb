//! Splitting work over the cores. Scoped threads for now: simple and safe; a persistent pool
//! replaces this when decode latency matters.

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

/// Runs `f(start, end)` over `0..n` split into contiguous ranges, one per thread, when the
/// total `work` (roughly multiply-adds) is worth a thread; returns the per-range results in order.
pub fn map_ranges<R: Send>(n: usize, work: usize, f: impl Fn(usize, usize) -> R + Sync) -> Vec<R> {
    let t = threads().min(n.max(1));
    if t <= 1 || work < 1 << 18 {
        return vec![f(0, n)];
    }
    let step = n.div_ceil(t);
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = (0..t)
            .map(|i| {
                let (a, b) = ((i * step).min(n), ((i + 1) * step).min(n));
                s.spawn(move || f(a, b))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker thread panicked"))
            .collect()
    })
}
