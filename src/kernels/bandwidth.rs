//! Measuring the machine's memory read bandwidth, the bound for decode speed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

#[cfg(target_arch = "x86_64")]
use super::isa::{isa, Isa};
use super::pool;

/// A sum over every 8-byte word of `buf`: a plain read that the compiler cannot drop.
pub(crate) fn sum(buf: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: `isa()` verified AVX-512 F.
        return unsafe { super::x86::read_sum(buf) };
    }
    buf.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .fold(0u64, u64::wrapping_add)
}

/// Best-of-`rounds` read bandwidth in bytes/s over a pre-faulted buffer of `bytes`, read by
/// every pool thread (each its own contiguous share).
pub fn read_bandwidth(bytes: usize, rounds: usize) -> f64 {
    Probe::new(bytes).map_or(0.0, |p| p.best_of(rounds))
}

/// A pre-faulted buffer to measure the read bandwidth with, kept so that the measurement can
/// be repeated between the runs it is compared with (memory speed here drifts by ±20 % within
/// minutes, so a probe taken once, before or after, can be far from what a run saw).
pub struct Probe {
    buf: memmap2::MmapMut,
}

impl Probe {
    /// `None` where the buffer cannot be mapped.
    pub fn new(bytes: usize) -> Option<Probe> {
        // Anonymous memory on 2 MiB pages where the kernel allows (as the weights are loaded
        // by default), every page touched first so the timing sees no page faults.
        let mut buf = memmap2::MmapMut::map_anon(bytes).ok()?;
        let _ = buf.advise(memmap2::Advice::HugePage);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        Some(Probe { buf })
    }

    /// Best-of-`rounds` read bandwidth in bytes/s.
    pub fn best_of(&self, rounds: usize) -> f64 {
        let p = pool::global();
        let parts = p.threads();
        let share = (self.buf.len() / parts) & !255;
        let sink = AtomicU64::new(0);
        let mut best = 0.0f64;
        for _ in 0..rounds {
            let t0 = Instant::now();
            p.run(parts, &|i| {
                let s = sum(&self.buf[i * share..(i + 1) * share]);
                sink.fetch_add(s, Ordering::Relaxed);
            });
            let secs = t0.elapsed().as_secs_f64();
            best = best.max((share * parts) as f64 / secs);
        }
        std::hint::black_box(sink.load(Ordering::Relaxed));
        best
    }
}
