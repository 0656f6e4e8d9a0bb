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
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx2 {
        // SAFETY: `isa()` verified AVX2.
        return unsafe { super::x86::read_sum_avx2(buf) };
    }
    buf.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .fold(0u64, u64::wrapping_add)
}

/// [`sum`] with software prefetches ahead of the loads, where the CPU has AVX-512 or AVX2
/// (the plain sum elsewhere).
fn sum_prefetched(buf: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: `isa()` verified AVX-512 F.
        return unsafe { super::x86::read_sum_prefetched(buf) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx2 {
        // SAFETY: `isa()` verified AVX2.
        return unsafe { super::x86::read_sum_prefetched_avx2(buf) };
    }
    sum(buf)
}

/// Best-of-`rounds` read bandwidth in bytes/s over a pre-faulted buffer of `bytes`, read by
/// every pool thread (each its own contiguous share).
pub fn read_bandwidth(bytes: usize, rounds: usize) -> f64 {
    Probe::new(bytes).map_or(0.0, |p| p.best_of(rounds))
}

/// [`read_bandwidth`] and the same buffer read with software prefetches (as the decode
/// kernels read), the rounds alternating: the probe's plain loop is the measure of
/// the bound, and the other shows where the hardware prefetchers leave bandwidth unused.
pub fn read_bandwidths(bytes: usize, rounds: usize) -> (f64, f64) {
    Probe::new(bytes).map_or((0.0, 0.0), |p| {
        let (mut plain, mut fetched) = (0.0f64, 0.0f64);
        for _ in 0..rounds {
            plain = plain.max(p.read_with(sum));
            fetched = fetched.max(p.read_with(sum_prefetched));
        }
        (plain, fetched)
    })
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
        (0..rounds).map(|_| self.read_with(sum)).fold(0.0, f64::max)
    }

    /// One read of the whole buffer by every pool thread with `read`, in bytes/s.
    fn read_with(&self, read: fn(&[u8]) -> u64) -> f64 {
        let p = pool::global();
        let parts = p.threads();
        let share = (self.buf.len() / parts) & !255;
        let sink = AtomicU64::new(0);
        let t0 = Instant::now();
        p.run(parts, &|i| {
            let s = read(&self.buf[i * share..(i + 1) * share]);
            sink.fetch_add(s, Ordering::Relaxed);
        });
        let secs = t0.elapsed().as_secs_f64();
        std::hint::black_box(sink.load(Ordering::Relaxed));
        (share * parts) as f64 / secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_reads_sum_every_word() {
        // Whole 256-byte chunks, as the probe's shares are: the vector loops read no tail.
        let buf: Vec<u8> = (0..64 * 1024 + 256).map(|i| (i * 31 % 251) as u8).collect();
        let words = |b: &[u8]| {
            b.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .fold(0u64, u64::wrapping_add)
        };
        assert_eq!(sum(&buf), words(&buf));
        assert_eq!(sum_prefetched(&buf), words(&buf));
        // The 256-bit loops too, which the dispatch above takes only on CPUs without AVX-512.
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 checked just above.
            unsafe {
                assert_eq!(crate::kernels::x86::read_sum_avx2(&buf), words(&buf));
                assert_eq!(
                    crate::kernels::x86::read_sum_prefetched_avx2(&buf),
                    words(&buf)
                );
            }
        }
    }
}
