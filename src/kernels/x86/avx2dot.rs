//! The fast path for FP8 weights on x86-64 CPUs without AVX-512 (AVX2 + FMA): e4m3 bytes
//! widened exactly to f32 in registers, the 128×128 block scales carried by the activations,
//! f32 fused multiply-adds.
//!
//! Numbers: `y[r] = Σ_c fp8[r, c] · f32(s[r / bn, c / bk] · x[c])` with f32 accumulation. The
//! exact path (`kernels::exact`) multiplies each weight by its scale instead: one f32 rounding
//! of `s·x` per term in place of one of `s·w`, differences of the size of a change of summation
//! order. It takes a multiply per 8 weights out of the inner loop, where on this tier a
//! widened weight already costs a byte shuffle, a shift and a mask per 8 (and where, on AMD
//! cores, `vcvtph2ps` through halves is slower still).
//!
//! Widening: `vpmovsxbd` sign-extends 8 bytes into 32-bit lanes; shifted left by 20 and masked
//! to the sign and the 7 magnitude bits, a lane is the f32 `value · 2⁻¹²⁰` (subnormals line
//! up too, see `kernels::exact`). The `2¹²⁰` is split between the scaled activations (`2⁵⁶`)
//! and the result (`2⁶⁴`): a scaled activation stays finite up to |s·x| < 2⁷², and a product
//! stays a normal f32 down to 2⁻⁶² of the result's units, far below what an f32 sum keeps.
//! Powers of two change no rounding in between.
//!
//! One arithmetic for every batch size: for row `r` and token `j`, the columns in groups of 8
//! in order into one 8-lane accumulator, the last group zero-padded, the lanes summed in a
//! fixed order. Up to [`STREAM_TOKENS`] tokens, weights are widened as they stream in (6-row
//! tiles for one token); more tokens share one widening of a panel of rows into a buffer that
//! stays in cache. Both give the same bits, so a token's result does not depend on its batch.
//!
//! BF16 rows take the same tiles, widened by a shift, with the activations as they are.
//!
//! Pointer arithmetic: [`rows`] checks the rows, activations and outputs it touches up front;
//! the loops stay below those bounds, which is what each `SAFETY` comment refers to.

use std::arch::x86_64::*;
use std::ops::Range;

use super::bf16dot::STREAM_LEAD;
use crate::checkpoint::{ByteCode, Matrix, MatrixData};
use crate::kernels::exact::FP8_BITS;
use crate::kernels::matmul::OutRows;

/// Rows of the one-token tile. Measured on an AMD Zen 3 (tg of the 32-expert FP8 synthetic
/// checkpoint, alternating): 6 and 7 rows 5.8–6.0 tokens/s, 8 rows 4.7–5.6, 4 rows 4.7–5.3.
const ONE_TOKEN_ROWS: usize = 6;
/// Rows and tokens of the other tiles (8 accumulators). Speculative verification steps
/// (2–5 tokens) are compute-bound on this tier; tiles that widen each weight once for more
/// tokens were measured on an AMD Zen 3 and left: 2 rows × 4 tokens took a 512×2048 product
/// from 48 to 60 GMAC/s from cache, yet the 32-expert FP8 checkpoint's verification of 4
/// tokens went from 2.3–2.6× to 3.2× a decode step (3 rounds, alternating); 6 × 2 for 2
/// tokens (46 → 37 GMAC/s), 3 × 4 for 4 (48 → 38) and 3 × 3 for 3 tokens (1.2× slower
/// verification) lost outright.
const RB: usize = 4;
const TB: usize = 2;
/// Up to this many tokens, weights are widened as they stream in; more share a buffer.
const STREAM_TOKENS: usize = 4;
/// Rows widened at once into the buffer for larger batches: 16 rows of 2048 columns are
/// 128 KiB of f32, in L2 while every token pair passes over them.
const PANEL: usize = 16;
/// `2⁵⁶` (with the scales) and `2⁶⁴` (on the results): the split of the widening's `2¹²⁰`.
const ACTS_FACTOR: f32 = f32::from_bits((127 + 56) << 23);
const RESULT_FACTOR: f32 = f32::from_bits((127 + 64) << 23);

/// Whether [`rows`] handles `w`: e4m3 weights with block scales, or BF16 (integer bytes keep
/// to the exact kernels).
pub fn supports(w: &Matrix) -> bool {
    match w.data {
        MatrixData::Fp8 {
            block_k,
            block_n,
            code,
            ..
        } => code == ByteCode::E4m3 && block_k > 0 && block_n > 0,
        MatrixData::Bf16(_) => true,
        _ => false,
    }
}

/// `out[r - rows.start, j] = Σ_c fp8[r, c] · f32(s · x[j, c])` for `r` in `rows`, `j < t`;
/// `then` is the weight byte the caller reads next (prefetched once these rows are).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (checked by the caller's dispatch); `supports(w)`;
/// `out` is writable for `rows.len()` rows of `t` tokens.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows(
    x: &[f32],
    t: usize,
    w: &Matrix,
    rows: Range<usize>,
    out: OutRows,
    then: *const u8,
) {
    let k = w.cols;
    let kp = k.next_multiple_of(8);
    assert!(rows.end <= w.rows && x.len() >= t * k);
    // Every element the tiles read is written first (by `scaled_acts` or the copy).
    let mut xs = crate::kernels::scratch::take_f32(t * kp);
    match &w.data {
        MatrixData::Fp8 {
            w: q,
            scales,
            block_n,
            block_k,
            ..
        } => {
            let (bn, bk) = (*block_n, *block_k);
            let q = q.as_slice();
            let sc = k.div_ceil(bk);
            assert!(bn > 0 && bk > 0 && q.len() >= w.rows * k);
            assert!(scales.len() >= w.rows.div_ceil(bn) * sc);
            let mut r = rows.start;
            while r < rows.end {
                let g = r / bn;
                let end = ((g + 1) * bn).min(rows.end);
                // SAFETY: x has t·k values, xs room for t rows of kp; the block's scales
                // exist.
                unsafe { scaled_acts(x, t, k, &scales[g * sc..(g + 1) * sc], bk, &mut xs) };
                // The rows after this block's, or the caller's next read after the last.
                let next = if end < rows.end {
                    q.as_ptr().wrapping_add(end * k)
                } else {
                    then
                };
                // SAFETY: rows r..end exist, xs holds t padded rows, `out` covers them.
                unsafe {
                    block_rows::<InMemory<u8>>(
                        q.as_ptr(),
                        k,
                        xs.as_ptr(),
                        t,
                        r..end,
                        out.skip(r - rows.start, 0),
                        next,
                        RESULT_FACTOR,
                    )
                };
                r = end;
            }
        }
        MatrixData::Bf16(d) => {
            let d = d.as_slice();
            assert!(d.len() >= w.rows * k);
            for (j, xj) in x.chunks_exact(k).take(t).enumerate() {
                xs[j * kp..j * kp + k].copy_from_slice(xj);
                xs[j * kp + k..(j + 1) * kp].fill(0.0);
            }
            // SAFETY: the rows exist, xs holds t padded rows, `out` covers them.
            unsafe {
                block_rows::<InMemory<u16>>(
                    d.as_ptr() as *const u8,
                    k,
                    xs.as_ptr(),
                    t,
                    rows.clone(),
                    out,
                    then,
                    1.0,
                )
            };
        }
        _ => unreachable!("avx2dot::rows called for a {} matrix", w.dtype_name()),
    }
    crate::kernels::scratch::put_f32(xs);
}

/// `x` (`[t, k]`) times `2⁵⁶ · s[c / bk]` into `out` (`t` rows of `k` rounded up to 8, the
/// padding zero).
///
/// # Safety
/// AVX2; `x` has `t·k` values, `out` room for `t` padded rows, `s` a scale per `bk` columns.
#[inline(always)]
unsafe fn scaled_acts(x: &[f32], t: usize, k: usize, s: &[f32], bk: usize, out: &mut [f32]) {
    let kp = k.next_multiple_of(8);
    assert!(x.len() >= t * k && out.len() >= t * kp && s.len() >= k.div_ceil(bk));
    for j in 0..t {
        let (src, dst) = (&x[j * k..(j + 1) * k], &mut out[j * kp..(j + 1) * kp]);
        let mut c = 0;
        for (b, &sb) in s.iter().enumerate().take(k.div_ceil(bk)) {
            let sv = sb * ACTS_FACTOR;
            let b1 = ((b + 1) * bk).min(k);
            let svv = _mm256_set1_ps(sv);
            while c + 8 <= b1 {
                // SAFETY: c + 8 ≤ k: within the token's row and its padded copy.
                unsafe {
                    let v = _mm256_loadu_ps(src.as_ptr().add(c));
                    _mm256_storeu_ps(dst.as_mut_ptr().add(c), _mm256_mul_ps(v, svv));
                }
                c += 8;
            }
            while c < b1 {
                dst[c] = src[c] * sv;
                c += 1;
            }
        }
        dst[k..].fill(0.0);
    }
}

/// Rows `rows` of the `k`-column matrix of `S` at `w` times `t` tokens of activations at `x`
/// (token `j` at `x + j·kp`, `kp` being `k` rounded up to 8, zero-padded), times `factor`,
/// into `out[r - rows.start, j]`.
///
/// # Safety
/// AVX2, FMA; the rows exist; `x` holds `t` padded rows; `out` covers the rows and tokens.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn block_rows<S: Stored>(
    w: *const u8,
    k: usize,
    x: *const f32,
    t: usize,
    rows: Range<usize>,
    out: OutRows,
    then: *const u8,
    factor: f32,
) {
    let kp = k.next_multiple_of(8);
    if t > STREAM_TOKENS {
        // SAFETY: forwarded.
        unsafe { buffered::<S>(w, k, x, t, rows, out, factor) };
        return;
    }
    let row_bytes = k * S::ELEM;
    // Where the tile of rows r..r+n prefetches from: STREAM_LEAD bytes past its start in the
    // order of reading, or a whole tile if that is more; past the rows' end, the rest of the
    // way from `then`.
    let ahead = |r: usize, n: usize| {
        let at = r * row_bytes + (n * row_bytes).max(STREAM_LEAD);
        match at.checked_sub(rows.end * row_bytes) {
            Some(past) => then.wrapping_add(past),
            None => w.wrapping_add(at),
        }
    };
    let mut r = rows.start;
    while r < rows.end {
        let nr = if t == 1 { ONE_TOKEN_ROWS } else { RB }.min(rows.end - r);
        let src = S::at(w.wrapping_add(r * row_bytes), k);
        let pf = ahead(r, nr);
        let mut j = 0;
        while j < t {
            let nt = TB.min(t - j);
            let o = out.skip(r - rows.start, j);
            // Only the first pass over the rows streams them in; the others read cache.
            let pf = (j == 0).then_some(pf);
            // SAFETY: rows r..r+nr exist, x holds tokens j..j+nt, o covers them.
            unsafe { shaped_tile(nr, nt, &src, x.add(j * kp), kp, o, pf, factor) };
            j += nt;
        }
        r += nr;
    }
}

/// More than [`STREAM_TOKENS`] tokens: panels of rows widened once into a buffer, then every
/// token pair over them.
///
/// # Safety
/// As for [`block_rows`].
#[inline(always)]
unsafe fn buffered<S: Stored>(
    w: *const u8,
    k: usize,
    x: *const f32,
    t: usize,
    rows: Range<usize>,
    out: OutRows,
    factor: f32,
) {
    let kp = k.next_multiple_of(8);
    let mut buf = vec![0.0f32; PANEL * kp];
    let mut r = rows.start;
    while r < rows.end {
        let np = PANEL.min(rows.end - r);
        for i in 0..np {
            let row = S::at(w.wrapping_add((r + i) * k * S::ELEM), k);
            let dst = buf[i * kp..(i + 1) * kp].as_mut_ptr();
            let mut c = 0;
            while c < row.whole() {
                // SAFETY: row r + i exists, c + 8 ≤ whole ≤ kp (the buffer row's length).
                unsafe { _mm256_storeu_ps(dst.add(c), row.group(0, c)) };
                c += 8;
            }
            if c < kp {
                // SAFETY: the row's last group, at the buffer row's last 8 places.
                unsafe { _mm256_storeu_ps(dst.add(c), row.tail(0)) };
            }
        }
        let mut i = 0;
        while i < np {
            let nr = RB.min(np - i);
            let src = Widened {
                w: buf[i * kp..].as_ptr(),
                kp,
            };
            let mut j = 0;
            while j < t {
                let nt = TB.min(t - j);
                let o = out.skip(r - rows.start + i, j);
                // SAFETY: the buffer holds rows i..i+nr, x tokens j..j+nt, o both.
                unsafe { shaped_tile(nr, nt, &src, x.add(j * kp), kp, o, None, factor) };
                j += nt;
            }
            i += nr;
        }
        r += np;
    }
}

/// [`tile`] for `nr` rows (up to [`ONE_TOKEN_ROWS`] for one token, up to [`RB`] for more)
/// and `nt` tokens (up to [`TB`]).
///
/// # Safety
/// As for [`tile`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn shaped_tile<R: Rows>(
    nr: usize,
    nt: usize,
    w: &R,
    x: *const f32,
    xs: usize,
    out: OutRows,
    prefetch: Option<*const u8>,
    factor: f32,
) {
    macro_rules! go {
        ($n:literal, $t:literal) => {
            // SAFETY: forwarded from the caller.
            unsafe { tile::<R, $n, $t>(w, x, xs, out, prefetch, factor) }
        };
    }
    match (nr, nt) {
        (6, _) => go!(6, 1),
        (5, _) => go!(5, 1),
        (4, 2) => go!(4, 2),
        (4, _) => go!(4, 1),
        (3, 2) => go!(3, 2),
        (3, _) => go!(3, 1),
        (2, 2) => go!(2, 2),
        (2, _) => go!(2, 1),
        (_, 2) => go!(1, 2),
        _ => go!(1, 1),
    }
}

/// Rows of weights as the tiles read them: 8 widened weights at a time.
trait Rows {
    /// Bytes per weight as stored (how far apart the prefetches are).
    const ELEM: usize;
    /// Columns in whole groups of 8 (the rest go through [`Rows::tail`]).
    fn whole(&self) -> usize;
    /// Row `i`, columns `c..c + 8`.
    ///
    /// # Safety
    /// AVX2; row `i` exists and `c + 8 ≤ whole()`.
    unsafe fn group(&self, i: usize, c: usize) -> __m256;
    /// Row `i`'s columns from `whole()` on, zero-padded to 8.
    ///
    /// # Safety
    /// AVX2; row `i` exists.
    unsafe fn tail(&self, i: usize) -> __m256;
}

/// Rows in memory as the checkpoint stores them, `k` weights apart.
trait Stored: Rows {
    /// The rows from the one at `w`.
    fn at(w: *const u8, k: usize) -> Self;
}

/// A stored weight type: how 8 of them widen to f32.
trait Elem: Copy + Default {
    /// # Safety
    /// AVX2; 8 readable values at `p`.
    unsafe fn widen8(p: *const Self) -> __m256;
}

impl Elem for u8 {
    /// e4m3 as `value · 2⁻¹²⁰` (module comment).
    #[inline(always)]
    unsafe fn widen8(p: *const u8) -> __m256 {
        // SAFETY: 8 readable bytes at p (the caller's guarantee).
        let b = unsafe { _mm_loadl_epi64(p as *const __m128i) };
        _mm256_castsi256_ps(_mm256_and_si256(
            _mm256_slli_epi32::<20>(_mm256_cvtepi8_epi32(b)),
            _mm256_set1_epi32(FP8_BITS),
        ))
    }
}

impl Elem for u16 {
    /// bfloat16.
    #[inline(always)]
    unsafe fn widen8(p: *const u16) -> __m256 {
        // SAFETY: 8 readable values at p (the caller's guarantee).
        let h = unsafe { _mm_loadu_si128(p as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

/// Rows of `E` in memory, `k` apart: e4m3 bytes (`u8`) or BF16 (`u16`).
struct InMemory<E> {
    w: *const E,
    k: usize,
}

impl<E: Elem> Stored for InMemory<E> {
    fn at(w: *const u8, k: usize) -> InMemory<E> {
        InMemory {
            w: w as *const E,
            k,
        }
    }
}

impl<E: Elem> Rows for InMemory<E> {
    const ELEM: usize = std::mem::size_of::<E>();
    fn whole(&self) -> usize {
        self.k / 8 * 8
    }
    #[inline(always)]
    unsafe fn group(&self, i: usize, c: usize) -> __m256 {
        // SAFETY: 8 values of row i at c (the caller's guarantee).
        unsafe { E::widen8(self.w.add(i * self.k + c)) }
    }
    #[inline(always)]
    unsafe fn tail(&self, i: usize) -> __m256 {
        // Copied, not loaded: past the last row's end nothing may be read.
        let mut v = [E::default(); 8];
        for (c, e) in (self.whole()..self.k).zip(v.iter_mut()) {
            // SAFETY: c < k, within row i.
            *e = unsafe { *self.w.add(i * self.k + c) };
        }
        // SAFETY: `v` holds 8 values.
        unsafe { E::widen8(v.as_ptr()) }
    }
}

/// Rows already widened into a buffer, `kp` apart (zero-padded to whole groups).
struct Widened {
    w: *const f32,
    kp: usize,
}

impl Rows for Widened {
    const ELEM: usize = 4;
    fn whole(&self) -> usize {
        self.kp
    }
    #[inline(always)]
    unsafe fn group(&self, i: usize, c: usize) -> __m256 {
        // SAFETY: the buffer row has kp ≥ c + 8 values.
        unsafe { _mm256_loadu_ps(self.w.add(i * self.kp + c)) }
    }
    #[inline(always)]
    unsafe fn tail(&self, _: usize) -> __m256 {
        _mm256_setzero_ps()
    }
}

/// `N` rows × `T` tokens: `out(i, j) = factor · Σ_c w(i, c) · x[j·xs + c]` over `c < xs`
/// (activations zero from the row length on). With `prefetch`, each 64 bytes of the rows
/// read ask for the line the same distance past `prefetch` in the order of reading.
///
/// # Safety
/// AVX2, FMA; the rows and `T` padded activation rows exist; `out` covers `N` rows × `T`.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn tile<R: Rows, const N: usize, const T: usize>(
    w: &R,
    x: *const f32,
    xs: usize,
    out: OutRows,
    prefetch: Option<*const u8>,
    factor: f32,
) {
    let mut acc = [[_mm256_setzero_ps(); T]; N];
    // Columns per prefetched line of one row.
    let line = 64 / R::ELEM;
    let whole = w.whole();
    let mut c = 0;
    // No call and no branch on the columns inside this loop: a call would spill the
    // accumulators around it.
    while c < whole {
        if let Some(pf) = prefetch {
            if c.is_multiple_of(line) {
                for i in 0..N {
                    let at = pf.wrapping_add(N * c * R::ELEM + i * 64);
                    // SAFETY: a prefetch never faults, whatever the address.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(at as *const i8) };
                }
            }
        }
        // SAFETY: c < xs, within every padded activation row.
        let xv: [__m256; T] =
            std::array::from_fn(|j| unsafe { _mm256_loadu_ps(x.add(j * xs + c)) });
        for i in 0..N {
            // SAFETY: row i exists and c + 8 ≤ whole.
            let wv = unsafe { w.group(i, c) };
            for j in 0..T {
                acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
            }
        }
        c += 8;
    }
    if c < xs {
        // SAFETY: the last padded group of every activation row.
        let xv: [__m256; T] =
            std::array::from_fn(|j| unsafe { _mm256_loadu_ps(x.add(j * xs + c)) });
        for i in 0..N {
            // SAFETY: row i exists.
            let wv = unsafe { w.tail(i) };
            for j in 0..T {
                acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
            }
        }
    }
    for i in 0..N {
        for j in 0..T {
            // SAFETY: (i, j) is inside the caller's block.
            unsafe { *out.at(i, j) = sum(acc[i][j]) * factor };
        }
    }
}

/// The lanes of `v` summed: halves, then pairs, then neighbours (a fixed order).
///
/// # Safety
/// AVX.
#[inline(always)]
unsafe fn sum(v: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
}
