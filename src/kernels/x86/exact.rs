//! The x86-64 widths of the f32 matrix kernels (`kernels::exact`): AVX-512 (F + BW; 16
//! lanes) and AVX2 + FMA + F16C (8 lanes, for the many x86-64 CPUs without AVX-512).

use std::arch::x86_64::*;
use std::ops::Range;

use crate::checkpoint::Matrix;
use crate::kernels::exact::{rows_with, Vector, FP8_BITS};

/// `out[(r - rows.start) * t + j] = Σ_k x[j, k] · W[r, k]` for `r` in `rows`, 16 lanes.
///
/// # Safety
/// The CPU must support AVX-512 F and BW (checked by the caller's dispatch).
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn rows_avx512(x: &[f32], t: usize, w: &Matrix, rows: Range<usize>, out: &mut [f32]) {
    // SAFETY: the features `Zmm` needs are enabled here.
    unsafe { rows_with::<Zmm>(x, t, w, rows, out) }
}

/// As [`rows_avx512`], 8 lanes.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (checked by the caller's dispatch).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows_avx2(x: &[f32], t: usize, w: &Matrix, rows: Range<usize>, out: &mut [f32]) {
    // SAFETY: the features `Ymm` needs are enabled here.
    unsafe { rows_with::<Ymm>(x, t, w, rows, out) }
}

/// AVX-512 F + BW.
#[derive(Clone, Copy)]
pub struct Zmm(__m512);

impl Vector for Zmm {
    const LANES: usize = 16;
    const TB: usize = 3;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Zmm(_mm512_setzero_ps())
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Zmm(_mm512_set1_ps(v))
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees a vector's elements at p (this function's contract).
        Zmm(unsafe { _mm512_loadu_ps(p) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees a vector's elements at p (this function's contract).
        unsafe { _mm512_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        Zmm(_mm512_mul_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn fmadd(self, b: Self, c: Self) -> Self {
        Zmm(_mm512_fmadd_ps(self.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        _mm512_reduce_add_ps(self.0)
    }
    #[inline(always)]
    unsafe fn fp8(p: *const u8) -> Self {
        // SAFETY: the caller guarantees 16 bytes at p (this function's contract).
        let b = unsafe { _mm_loadu_si128(p as *const __m128i) };
        Zmm(_mm512_castsi512_ps(_mm512_and_si512(
            _mm512_slli_epi32::<20>(_mm512_cvtepi8_epi32(b)),
            _mm512_set1_epi32(FP8_BITS),
        )))
    }
    #[inline(always)]
    unsafe fn q8(p: *const u8) -> Self {
        // Sign-extended, the byte's sign is already bit 31; the magnitude converts exactly.
        // SAFETY: the caller guarantees 16 bytes at p (this function's contract).
        let t = _mm512_cvtepi8_epi32(unsafe { _mm_loadu_si128(p as *const __m128i) });
        let m = _mm512_cvtepi32_ps(_mm512_and_si512(t, _mm512_set1_epi32(0x7F)));
        Zmm(_mm512_castsi512_ps(_mm512_or_si512(
            _mm512_castps_si512(m),
            _mm512_and_si512(t, _mm512_set1_epi32(i32::MIN)),
        )))
    }
    #[inline(always)]
    unsafe fn bf16(p: *const u16) -> Self {
        // SAFETY: the caller guarantees 16 values at p (this function's contract).
        let a = unsafe { _mm256_loadu_si256(p as *const __m256i) };
        Zmm(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(
            _mm512_cvtepu16_epi32(a),
        )))
    }
    #[inline(always)]
    unsafe fn f16(p: *const u16) -> Self {
        // SAFETY: the caller guarantees 16 values at p (this function's contract).
        Zmm(_mm512_cvtph_ps(unsafe {
            _mm256_loadu_si256(p as *const __m256i)
        }))
    }
    #[inline(always)]
    fn prefetch(p: *const u8) {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
    }
}

/// AVX2 + FMA + F16C.
#[derive(Clone, Copy)]
pub struct Ymm(__m256);

impl Vector for Ymm {
    const LANES: usize = 8;
    // 16 registers: 4·2 accumulators, 2 activations, a weight and its scale.
    const TB: usize = 2;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Ymm(_mm256_setzero_ps())
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Ymm(_mm256_set1_ps(v))
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees a vector's elements at p (this function's contract).
        Ymm(unsafe { _mm256_loadu_ps(p) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees a vector's elements at p (this function's contract).
        unsafe { _mm256_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        Ymm(_mm256_mul_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn fmadd(self, b: Self, c: Self) -> Self {
        Ymm(_mm256_fmadd_ps(self.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        // Halves, then pairs, then neighbours: a fixed order.
        let h = _mm_add_ps(
            _mm256_castps256_ps128(self.0),
            _mm256_extractf128_ps::<1>(self.0),
        );
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
    }
    #[inline(always)]
    unsafe fn fp8(p: *const u8) -> Self {
        // SAFETY: the caller guarantees 8 bytes at p (this function's contract).
        let b = unsafe { _mm_loadl_epi64(p as *const __m128i) };
        Ymm(_mm256_castsi256_ps(_mm256_and_si256(
            _mm256_slli_epi32::<20>(_mm256_cvtepi8_epi32(b)),
            _mm256_set1_epi32(FP8_BITS),
        )))
    }
    #[inline(always)]
    unsafe fn q8(p: *const u8) -> Self {
        // As for `Zmm::q8`.
        // SAFETY: the caller guarantees 8 bytes at p (this function's contract).
        let t = _mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(p as *const __m128i) });
        let m = _mm256_cvtepi32_ps(_mm256_and_si256(t, _mm256_set1_epi32(0x7F)));
        Ymm(_mm256_castsi256_ps(_mm256_or_si256(
            _mm256_castps_si256(m),
            _mm256_and_si256(t, _mm256_set1_epi32(i32::MIN)),
        )))
    }
    #[inline(always)]
    unsafe fn bf16(p: *const u16) -> Self {
        // SAFETY: the caller guarantees 8 values at p (this function's contract).
        let a = unsafe { _mm_loadu_si128(p as *const __m128i) };
        Ymm(_mm256_castsi256_ps(_mm256_slli_epi32::<16>(
            _mm256_cvtepu16_epi32(a),
        )))
    }
    #[inline(always)]
    unsafe fn f16(p: *const u16) -> Self {
        // SAFETY: the caller guarantees 8 values at p (this function's contract).
        Ymm(_mm256_cvtph_ps(unsafe {
            _mm_loadu_si128(p as *const __m128i)
        }))
    }
    #[inline(always)]
    fn prefetch(p: *const u8) {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
    }
}
