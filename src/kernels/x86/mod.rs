//! x86-64 SIMD kernels, chosen at run time by CPU feature detection.

pub mod amx;
pub mod amx_attention;
pub mod attention;
pub mod avx2dot;
pub mod avx2gemm;
pub mod bf16dot;
pub mod bf16gemm;
pub mod exact;
pub mod fp8dot;
pub mod gemm_f32;

use std::arch::x86_64::*;

/// Reads `buf` with 512-bit loads into four accumulators (a memory-bandwidth probe).
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub unsafe fn read_sum(buf: &[u8]) -> u64 {
    // SAFETY: the same features.
    unsafe { sum_lines::<false>(buf) }
}

/// [`read_sum`] with every line also prefetched into L2 (T1) as far ahead as the decode
/// kernels prefetch ([`bf16dot::STREAM_LEAD`]), their way of reading. On the Emerald Rapids machine of BENCHMARKS.md, whose hardware
/// prefetchers do little, this read 1.10–1.12× faster than the plain loop.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub unsafe fn read_sum_prefetched(buf: &[u8]) -> u64 {
    // SAFETY: the same features.
    unsafe { sum_lines::<true>(buf) }
}

/// [`read_sum`] with 256-bit loads, for CPUs without AVX-512.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn read_sum_avx2(buf: &[u8]) -> u64 {
    // SAFETY: the same features.
    unsafe { sum_lines_avx2::<false>(buf) }
}

/// [`read_sum_prefetched`] with 256-bit loads.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn read_sum_prefetched_avx2(buf: &[u8]) -> u64 {
    // SAFETY: the same features.
    unsafe { sum_lines_avx2::<true>(buf) }
}

/// Inlined into the two entry points above, which give it AVX2. Four accumulators of two
/// loads each per 256 bytes: the same lines in the same order as [`sum_lines`].
#[inline(always)]
unsafe fn sum_lines_avx2<const PREFETCH: bool>(buf: &[u8]) -> u64 {
    let mut acc = [_mm256_setzero_si256(); 4];
    for c in buf.chunks_exact(256) {
        for (i, a) in acc.iter_mut().enumerate() {
            if PREFETCH {
                let ahead = c.as_ptr().wrapping_add(i * 64 + bf16dot::STREAM_LEAD);
                // SAFETY: a prefetch never faults, whatever the address (past the end too).
                unsafe { _mm_prefetch::<_MM_HINT_T1>(ahead as *const i8) };
            }
            // SAFETY: `c` has 256 bytes; the two loads read 64 of them.
            let (lo, hi) = unsafe {
                (
                    _mm256_loadu_si256(c[i * 64..].as_ptr() as *const __m256i),
                    _mm256_loadu_si256(c[i * 64 + 32..].as_ptr() as *const __m256i),
                )
            };
            *a = _mm256_add_epi64(*a, _mm256_add_epi64(lo, hi));
        }
    }
    let s = _mm256_add_epi64(
        _mm256_add_epi64(acc[0], acc[1]),
        _mm256_add_epi64(acc[2], acc[3]),
    );
    let mut words = [0u64; 4];
    // SAFETY: `words` is 32 writable bytes.
    unsafe { _mm256_storeu_si256(words.as_mut_ptr() as *mut __m256i, s) };
    words.iter().fold(0u64, |a, &w| a.wrapping_add(w))
}

/// Inlined into the two entry points above, which give it AVX-512 F.
#[inline(always)]
unsafe fn sum_lines<const PREFETCH: bool>(buf: &[u8]) -> u64 {
    let mut acc = [_mm512_setzero_si512(); 4];
    for c in buf.chunks_exact(256) {
        for (i, a) in acc.iter_mut().enumerate() {
            if PREFETCH {
                let ahead = c.as_ptr().wrapping_add(i * 64 + bf16dot::STREAM_LEAD);
                // SAFETY: a prefetch never faults, whatever the address (past the end too).
                unsafe { _mm_prefetch::<_MM_HINT_T1>(ahead as *const i8) };
            }
            // SAFETY: `c` has 256 bytes; each load reads 64 of them.
            let v = unsafe { _mm512_loadu_si512(c[i * 64..].as_ptr() as *const __m512i) };
            *a = _mm512_add_epi64(*a, v);
        }
    }
    let s = _mm512_add_epi64(
        _mm512_add_epi64(acc[0], acc[1]),
        _mm512_add_epi64(acc[2], acc[3]),
    );
    _mm512_reduce_add_epi64(s) as u64
}
