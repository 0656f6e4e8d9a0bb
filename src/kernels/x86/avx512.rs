//! AVX-512 (F + BW) matrix kernels for every stored weight dtype, with f32 activations and
//! f32 accumulation.
//!
//! One arithmetic for every batch size: for row `n` and token `j`, 32-weight chunks are
//! multiplied into one 16-lane accumulator per scale block (two FMAs per chunk, low half
//! first), the block's accumulator is folded into a running total with the block scale, a
//! scalar tail handles `K mod 32`, and the lanes are summed at the end. Decode (one token)
//! converts weights on the fly; batches convert a few rows to f32 once and reuse them for
//! every token. The values and the order of operations are the same in both, so a sequence's
//! logits do not depend on what else is in its batch.
//!
//! FP8 e4m3 → f32 without a table: sign-extend the byte to 16 bits, shift left by 7 and keep
//! the sign and the 7 magnitude bits; the result is an IEEE half of exactly `value · 2⁻⁸`
//! (subnormals included), which `vcvtph2ps` widens. The `2⁸` goes into the block scale.

use std::arch::x86_64::*;

use crate::checkpoint::{Matrix, MatrixData};

/// Rows per register tile.
const RB: usize = 4;

/// A weight dtype as seen by the kernels: 32 weights at a time as two f32 vectors, one at a
/// time for tails, and a scale per (row, block).
trait Weights: Sync {
    fn cols(&self) -> usize;
    /// Columns per scale block (a multiple of 32, or `cols` when unscaled).
    fn block(&self) -> usize;
    fn scale(&self, row: usize, block: usize) -> f32;
    /// Weights `k..k+32` of `row`; `k + 32 <= cols`.
    unsafe fn load32(&self, row: usize, k: usize) -> (__m512, __m512);
    fn one(&self, row: usize, k: usize) -> f32;
}

struct Fp8<'a> {
    w: &'a [u8],
    scales: &'a [f32],
    cols: usize,
    block_n: usize,
    block_k: usize,
    scale_cols: usize,
}

impl Weights for Fp8<'_> {
    fn cols(&self) -> usize {
        self.cols
    }
    fn block(&self) -> usize {
        self.block_k
    }
    #[inline(always)]
    fn scale(&self, row: usize, block: usize) -> f32 {
        // 2⁸ undoes the half-precision trick of `load32`.
        self.scales[(row / self.block_n) * self.scale_cols + block] * 256.0
    }
    #[inline(always)]
    unsafe fn load32(&self, row: usize, k: usize) -> (__m512, __m512) {
        let p = self.w[row * self.cols + k..row * self.cols + k + 32].as_ptr();
        // SAFETY: the slice above holds exactly the 32 bytes read.
        let b = unsafe { _mm256_loadu_si256(p as *const __m256i) };
        let h = _mm512_and_si512(
            _mm512_slli_epi16::<7>(_mm512_cvtepi8_epi16(b)),
            _mm512_set1_epi16(0xBF80u16 as i16),
        );
        (
            _mm512_cvtph_ps(_mm512_castsi512_si256(h)),
            _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(h)),
        )
    }
    #[inline(always)]
    fn one(&self, row: usize, k: usize) -> f32 {
        super::super::fp8::e4m3_to_f32(self.w[row * self.cols + k]) * (1.0 / 256.0)
    }
}

struct Bf16<'a> {
    w: &'a [u16],
    cols: usize,
}

impl Weights for Bf16<'_> {
    fn cols(&self) -> usize {
        self.cols
    }
    fn block(&self) -> usize {
        self.cols.max(1)
    }
    #[inline(always)]
    fn scale(&self, _: usize, _: usize) -> f32 {
        1.0
    }
    #[inline(always)]
    unsafe fn load32(&self, row: usize, k: usize) -> (__m512, __m512) {
        let s = &self.w[row * self.cols + k..row * self.cols + k + 32];
        // SAFETY: each load reads 16 of the 32 u16 in `s`.
        let (a, b) = unsafe {
            (
                _mm256_loadu_si256(s.as_ptr() as *const __m256i),
                _mm256_loadu_si256(s[16..].as_ptr() as *const __m256i),
            )
        };
        (
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(a))),
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(b))),
        )
    }
    #[inline(always)]
    fn one(&self, row: usize, k: usize) -> f32 {
        f32::from_bits((self.w[row * self.cols + k] as u32) << 16)
    }
}

struct F16<'a> {
    w: &'a [u16],
    cols: usize,
}

impl Weights for F16<'_> {
    fn cols(&self) -> usize {
        self.cols
    }
    fn block(&self) -> usize {
        self.cols.max(1)
    }
    #[inline(always)]
    fn scale(&self, _: usize, _: usize) -> f32 {
        1.0
    }
    #[inline(always)]
    unsafe fn load32(&self, row: usize, k: usize) -> (__m512, __m512) {
        let s = &self.w[row * self.cols + k..row * self.cols + k + 32];
        // SAFETY: each load reads 16 of the 32 u16 in `s`.
        unsafe {
            (
                _mm512_cvtph_ps(_mm256_loadu_si256(s.as_ptr() as *const __m256i)),
                _mm512_cvtph_ps(_mm256_loadu_si256(s[16..].as_ptr() as *const __m256i)),
            )
        }
    }
    #[inline(always)]
    fn one(&self, row: usize, k: usize) -> f32 {
        half::f16::from_bits(self.w[row * self.cols + k]).to_f32()
    }
}

struct F32<'a> {
    w: &'a [f32],
    cols: usize,
}

impl Weights for F32<'_> {
    fn cols(&self) -> usize {
        self.cols
    }
    fn block(&self) -> usize {
        self.cols.max(1)
    }
    #[inline(always)]
    fn scale(&self, _: usize, _: usize) -> f32 {
        1.0
    }
    #[inline(always)]
    unsafe fn load32(&self, row: usize, k: usize) -> (__m512, __m512) {
        let s = &self.w[row * self.cols + k..row * self.cols + k + 32];
        // SAFETY: each load reads 16 of the 32 f32 in `s`.
        unsafe { (_mm512_loadu_ps(s.as_ptr()), _mm512_loadu_ps(s[16..].as_ptr())) }
    }
    #[inline(always)]
    fn one(&self, row: usize, k: usize) -> f32 {
        self.w[row * self.cols + k]
    }
}

/// Whether this module can handle `w` (block widths must be multiples of 32).
pub fn supports(w: &Matrix) -> bool {
    match &w.data {
        MatrixData::Fp8 { block_k, .. } => block_k % 32 == 0,
        _ => true,
    }
}

/// `out[(r - rows.start) * t + j] = Σ_k x[j, k] · W[r, k]` for `r` in `rows`.
///
/// # Safety
/// The CPU must support AVX-512 F and BW (checked by the caller's dispatch).
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn rows(x: &[f32], t: usize, w: &Matrix, rows: std::ops::Range<usize>, out: &mut [f32]) {
    let cols = w.cols;
    // SAFETY (all calls below): same target features as this function.
    unsafe {
        match &w.data {
            MatrixData::Fp8 { w: q, scales, block_n, block_k } => run(
                &Fp8 {
                    w: q.as_slice(),
                    scales,
                    cols,
                    block_n: *block_n,
                    block_k: *block_k,
                    scale_cols: cols.div_ceil(*block_k),
                },
                x,
                t,
                rows,
                out,
            ),
            MatrixData::Bf16(d) => run(&Bf16 { w: d.as_slice(), cols }, x, t, rows, out),
            MatrixData::F16(d) => run(&F16 { w: d.as_slice(), cols }, x, t, rows, out),
            MatrixData::F32(d) => run(&F32 { w: d.as_slice(), cols }, x, t, rows, out),
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn run<W: Weights>(w: &W, x: &[f32], t: usize, rows: std::ops::Range<usize>, out: &mut [f32]) {
    let k = w.cols();
    let mut buf: Vec<f32> = Vec::new();
    let mut r = rows.start;
    while r < rows.end {
        let nr = RB.min(rows.end - r);
        let o = &mut out[(r - rows.start) * t..(r - rows.start + nr) * t];
        // SAFETY: same target features.
        unsafe {
            if t == 1 {
                tile_direct(w, x, r, nr, o);
            } else {
                // Widen the rows once (unscaled, exactly as `load32` gives them), then reuse.
                buf.resize(nr * k, 0.0);
                for i in 0..nr {
                    let dst = &mut buf[i * k..(i + 1) * k];
                    let mut c = 0;
                    while c + 32 <= k {
                        let (lo, hi) = w.load32(r + i, c);
                        _mm512_storeu_ps(dst[c..c + 16].as_mut_ptr(), lo);
                        _mm512_storeu_ps(dst[c + 16..c + 32].as_mut_ptr(), hi);
                        c += 32;
                    }
                    for (cc, d) in dst.iter_mut().enumerate().skip(c) {
                        *d = w.one(r + i, cc);
                    }
                }
                let mut j = 0;
                while j < t {
                    let nt = 2.min(t - j);
                    tile_buffered(w, &buf, x, t, r, nr, j, nt, o);
                    j += nt;
                }
            }
        }
        r += nr;
    }
}

/// One token, up to `RB` rows, weights converted on the fly.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn tile_direct<W: Weights>(w: &W, x: &[f32], r0: usize, nr: usize, out: &mut [f32]) {
    let k = w.cols();
    let bk = w.block();
    let mut total = [_mm512_setzero_ps(); RB];
    let mut total_s = [0.0f32; RB];
    let mut b0 = 0;
    let mut bi = 0;
    while b0 < k {
        let b1 = (b0 + bk).min(k);
        let mut acc = [_mm512_setzero_ps(); RB];
        let mut c = b0;
        while c + 32 <= b1 {
            // SAFETY: c + 32 <= k, so the 32 activations exist.
            let (xl, xh) = unsafe { (_mm512_loadu_ps(x[c..].as_ptr()), _mm512_loadu_ps(x[c + 16..].as_ptr())) };
            for i in 0..nr {
                // SAFETY: c + 32 <= cols.
                let (lo, hi) = unsafe { w.load32(r0 + i, c) };
                acc[i] = _mm512_fmadd_ps(hi, xh, _mm512_fmadd_ps(lo, xl, acc[i]));
            }
            c += 32;
        }
        for i in 0..nr {
            let s = w.scale(r0 + i, bi);
            total[i] = _mm512_fmadd_ps(acc[i], _mm512_set1_ps(s), total[i]);
            let mut tail = 0.0f32;
            for cc in c..b1 {
                tail += w.one(r0 + i, cc) * x[cc];
            }
            total_s[i] += tail * s;
        }
        b0 = b1;
        bi += 1;
    }
    for i in 0..nr {
        out[i] = _mm512_reduce_add_ps(total[i]) + total_s[i];
    }
}

/// Tokens `j0..j0+nt` (nt ≤ 2) × rows `r0..r0+nr` from widened rows in `buf`; the same
/// arithmetic as [`tile_direct`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn tile_buffered<W: Weights>(
    w: &W,
    buf: &[f32],
    x: &[f32],
    t: usize,
    r0: usize,
    nr: usize,
    j0: usize,
    nt: usize,
    out: &mut [f32],
) {
    let k = w.cols();
    let bk = w.block();
    let mut total = [[_mm512_setzero_ps(); 2]; RB];
    let mut total_s = [[0.0f32; 2]; RB];
    let mut b0 = 0;
    let mut bi = 0;
    while b0 < k {
        let b1 = (b0 + bk).min(k);
        let mut acc = [[_mm512_setzero_ps(); 2]; RB];
        let mut c = b0;
        while c + 32 <= b1 {
            let mut xs = [(_mm512_setzero_ps(), _mm512_setzero_ps()); 2];
            for (jj, xv) in xs.iter_mut().enumerate().take(nt) {
                let xr = &x[(j0 + jj) * k + c..(j0 + jj) * k + c + 32];
                // SAFETY: `xr` holds the 32 activations read.
                *xv = unsafe { (_mm512_loadu_ps(xr.as_ptr()), _mm512_loadu_ps(xr[16..].as_ptr())) };
            }
            for i in 0..nr {
                let wr = &buf[i * k + c..i * k + c + 32];
                // SAFETY: `wr` holds the 32 widened weights read.
                let (lo, hi) = unsafe { (_mm512_loadu_ps(wr.as_ptr()), _mm512_loadu_ps(wr[16..].as_ptr())) };
                for jj in 0..nt {
                    acc[i][jj] = _mm512_fmadd_ps(hi, xs[jj].1, _mm512_fmadd_ps(lo, xs[jj].0, acc[i][jj]));
                }
            }
            c += 32;
        }
        for i in 0..nr {
            let s = w.scale(r0 + i, bi);
            for jj in 0..nt {
                total[i][jj] = _mm512_fmadd_ps(acc[i][jj], _mm512_set1_ps(s), total[i][jj]);
                let xr = &x[(j0 + jj) * k..(j0 + jj + 1) * k];
                let mut tail = 0.0f32;
                for cc in c..b1 {
                    tail += buf[i * k + cc] * xr[cc];
                }
                total_s[i][jj] += tail * s;
            }
        }
        b0 = b1;
        bi += 1;
    }
    for i in 0..nr {
        for jj in 0..nt {
            out[i * t + j0 + jj] = _mm512_reduce_add_ps(total[i][jj]) + total_s[i][jj];
        }
    }
}

/// Reads `buf` with 512-bit loads into four accumulators (a memory-bandwidth probe).
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub unsafe fn read_sum(buf: &[u8]) -> u64 {
    let mut acc = [_mm512_setzero_si512(); 4];
    let chunks = buf.chunks_exact(256);
    for c in chunks {
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: `c` has 256 bytes; each load reads 64 of them.
            let v = unsafe { _mm512_loadu_si512(c[i * 64..].as_ptr() as *const __m512i) };
            *a = _mm512_add_epi64(*a, v);
        }
    }
    let s = _mm512_add_epi64(_mm512_add_epi64(acc[0], acc[1]), _mm512_add_epi64(acc[2], acc[3]));
    _mm512_reduce_add_epi64(s) as u64
}
