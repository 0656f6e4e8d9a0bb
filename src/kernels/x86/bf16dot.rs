//! The fast path for BF16 and FP8 weights: AVX-512 BF16 dot products (`vdpbf16ps`), each
//! instruction 32 multiply-adds into 16 f32 lanes, twice the f32 FMA rate.
//!
//! Numbers: activations are rounded to bfloat16 (nearest-even) once per product; BF16 weights
//! are used as stored; an FP8 weight is dequantised exactly as the f32 kernels do it (value
//! times its block scale, in f32) and that product rounded to bfloat16 — what transformers
//! holds after dequantising an FP8 checkpoint into a BF16 model. Products are exact in f32
//! and accumulate in f32.
//!
//! One arithmetic for every batch size, as in `avx512`: for row `n` and token `j`, 32-column
//! chunks are dotted into one 16-lane accumulator in column order, the last chunk zero-padded,
//! and the lanes summed at the end. Decode (one token) converts weights on the fly; batches
//! convert a panel of rows once into a cache-resident buffer and reuse it for every token.
//! Both give the same bits, so a sequence's logits do not depend on what else is batched.
//!
//! Pointer arithmetic: [`rows`] checks up front that rows, activations and outputs are in
//! bounds; the loops stay below those bounds, which is what each `SAFETY` comment refers to.

use std::arch::x86_64::*;
use std::ops::Range;

use super::avx512::{Bf16, Fp8, Weights};
use crate::checkpoint::{Matrix, MatrixData};

/// Rows per register tile.
const RB: usize = 4;
/// Tokens per register tile: `RB · TB` accumulators + `RB` weight vectors + 1 activation
/// vector fit the 32 registers.
const TB: usize = 6;
/// Up to this many tokens, weights are converted in registers as they stream in; more tokens
/// share one conversion into a buffer.
const STREAM_TOKENS: usize = 4;
/// Rows converted at once for batched products: 16 rows of 2048 columns are 64 KiB, which
/// stays in L2 while every token tile passes over them.
const PANEL: usize = 16;

/// Whether these kernels handle `w`: BF16, or FP8 whose scale blocks are whole chunks.
pub fn supports(w: &Matrix) -> bool {
    match &w.data {
        MatrixData::Fp8 { block_k, .. } => block_k % 32 == 0,
        MatrixData::Bf16(_) => true,
        _ => false,
    }
}

/// Activations rounded to bfloat16, each token's row zero-padded to a multiple of 32 columns.
pub struct Bf16Acts {
    pub data: Vec<u16>,
    /// Padded row length.
    pub stride: usize,
}

/// `x` (`[t, k]`) as [`Bf16Acts`].
///
/// # Safety
/// The CPU must support AVX-512 F and BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn to_bf16(x: &[f32], t: usize, k: usize) -> Bf16Acts {
    assert!(x.len() >= t * k);
    let stride = k.next_multiple_of(32);
    let mut data = vec![0u16; t * stride];
    for j in 0..t {
        let mut c = 0;
        while c < k {
            let mask: __mmask16 = if c + 16 <= k {
                !0
            } else {
                (1u16 << (k - c)) - 1
            };
            // SAFETY: the mask keeps the load within token j's k columns; the store covers
            // columns below c + 16 ≤ stride of the padded row.
            unsafe {
                let v = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(j * k + c));
                let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_storeu_si256(data.as_mut_ptr().add(j * stride + c) as *mut __m256i, b);
            }
            c += 16;
        }
    }
    Bf16Acts { data, stride }
}

/// `out[(r - rows.start) * t + j] = Σ_k x[j, k] · W[r, k]` for `r` in `rows`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and BF16 (checked by the caller's dispatch), and
/// `supports(w)` must hold.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn rows(x: &Bf16Acts, t: usize, w: &Matrix, rows: Range<usize>, out: &mut [f32]) {
    let cols = w.cols;
    assert!(rows.end <= w.rows && out.len() >= rows.len() * t);
    assert!(x.stride >= cols.next_multiple_of(32) && x.data.len() >= t * x.stride);
    // SAFETY (both calls): same target features as this function; bounds checked above and
    // by the slices each `Weights` holds.
    unsafe {
        match &w.data {
            MatrixData::Fp8 {
                w: q,
                scales,
                block_n,
                block_k,
            } => {
                let q = q.as_slice();
                assert!(q.len() >= w.rows * cols && *block_k % 32 == 0);
                let scale_cols = cols.div_ceil(*block_k);
                assert!(scales.len() >= w.rows.div_ceil(*block_n) * scale_cols);
                let fp8 = Fp8 {
                    w: q,
                    scales,
                    cols,
                    block_n: *block_n,
                    block_k: *block_k,
                    scale_cols,
                };
                run(&fp8, x, t, rows, out)
            }
            MatrixData::Bf16(d) => {
                assert!(d.as_slice().len() >= w.rows * cols);
                run(
                    &Bf16 {
                        w: d.as_slice(),
                        cols,
                    },
                    x,
                    t,
                    rows,
                    out,
                )
            }
            _ => unreachable!("bf16dot::rows called for an unsupported dtype"),
        }
    }
}

/// Columns `c..c + 32` of the row at `p` as bfloat16, times `s` when the weights are scaled.
///
/// # Safety
/// AVX-512 F/BW/BF16; `p` has at least `c + 32` elements.
#[inline(always)]
unsafe fn chunk<W: Weights>(p: *const W::E, c: usize, s: __m512) -> __m512bh {
    // SAFETY: c + 32 elements are readable at p (the caller's guarantee).
    unsafe {
        if W::RAW_BF16 {
            return std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                p.add(c) as *const __m512i
            ));
        }
        let (mut lo, mut hi) = W::load32(p.add(c));
        if W::SCALED {
            lo = _mm512_mul_ps(lo, s);
            hi = _mm512_mul_ps(hi, s);
        }
        _mm512_cvtne2ps_pbh(hi, lo)
    }
}

/// The partial last chunk of a row (`c < k < c + 32`): copied into a zeroed buffer first
/// (all-zero bits are 0.0 in every dtype), then as [`chunk`].
///
/// # Safety
/// AVX-512 F/BW/BF16; `p` has `k` elements.
#[inline(never)]
unsafe fn tail_chunk<W: Weights>(p: *const W::E, c: usize, k: usize, s: __m512) -> __m512bh {
    let mut tmp = [0u32; 32];
    // SAFETY: k − c < 32 elements are read from the row and fit the 128-byte buffer.
    unsafe {
        std::ptr::copy_nonoverlapping(p.add(c), tmp.as_mut_ptr() as *mut W::E, k - c);
        chunk::<W>(tmp.as_ptr() as *const W::E, 0, s)
    }
}

/// Calls `f(block index, columns)` for each scale block of a row, in order.
#[inline(always)]
fn for_blocks(k: usize, bk: usize, mut f: impl FnMut(usize, Range<usize>)) {
    let (mut b0, mut bi) = (0, 0);
    while b0 < k {
        let b1 = (b0 + bk).min(k);
        f(bi, b0..b1);
        b0 = b1;
        bi += 1;
    }
}

/// The block scale of row `r` as a vector (1 when unscaled).
#[inline(always)]
fn scale_vec<W: Weights>(w: &W, r: usize, block: usize) -> __m512 {
    // SAFETY: AVX-512 F is enabled in every caller.
    unsafe { _mm512_set1_ps(if W::SCALED { w.scale(r, block) } else { 1.0 }) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn run<W: Weights>(w: &W, x: &Bf16Acts, t: usize, rows: Range<usize>, out: &mut [f32]) {
    let k = w.cols();
    let ks = k.next_multiple_of(32);
    let xs = x.stride;
    let xp = x.data.as_ptr();
    if t <= STREAM_TOKENS {
        let mut r = rows.start;
        while r < rows.end {
            let nr = RB.min(rows.end - r);
            let o = &mut out[(r - rows.start) * t..];
            macro_rules! go {
                ($n:literal, $t:literal) => {
                    // SAFETY: rows r..r+nr exist, x has t padded rows, o has nr·t entries.
                    unsafe { stream_tile::<W, $n, $t>(w, r, xp, xs, o) }
                };
            }
            macro_rules! rows_of {
                ($t:literal) => {
                    match nr {
                        4 => go!(4, $t),
                        3 => go!(3, $t),
                        2 => go!(2, $t),
                        _ => go!(1, $t),
                    }
                };
            }
            match t {
                4 => rows_of!(4),
                3 => rows_of!(3),
                2 => rows_of!(2),
                _ => rows_of!(1),
            }
            r += nr;
        }
        return;
    }
    let mut buf = vec![0u16; PANEL * ks];
    let mut r = rows.start;
    while r < rows.end {
        let np = PANEL.min(rows.end - r);
        for i in 0..np {
            let p = w.row(r + i);
            let dst = buf[i * ks..].as_mut_ptr();
            for_blocks(k, w.block(), |bi, cols| {
                let s = scale_vec(w, r + i, bi);
                for c in cols.step_by(32) {
                    // SAFETY: row r + i has k > c elements (c + 32 of them unless this is the
                    // row's partial last chunk); the buffer row has ks ≥ c + 32.
                    unsafe {
                        let v = if c + 32 <= k {
                            chunk::<W>(p, c, s)
                        } else {
                            tail_chunk::<W>(p, c, k, s)
                        };
                        _mm512_storeu_si512(
                            dst.add(c) as *mut __m512i,
                            std::mem::transmute::<__m512bh, __m512i>(v),
                        );
                    }
                }
            });
        }
        let mut j = 0;
        while j < t {
            let nt = TB.min(t - j);
            let mut i = 0;
            while i < np {
                let nr = RB.min(np - i);
                let wp: [*const u16; RB] =
                    std::array::from_fn(|a| buf[(i + a.min(nr - 1)) * ks..].as_ptr());
                let o = &mut out[(r - rows.start + i) * t + j..];
                // SAFETY: the buffer holds np padded rows, x holds t padded rows (j + nt ≤ t),
                // and o reaches row i + nr - 1, token j + nt - 1.
                unsafe { buffered_tile(wp, ks, xp.add(j * xs), xs, o, t, nr, nt) };
                i += nr;
            }
            j += nt;
        }
        r += np;
    }
}

/// `N` rows × `T` tokens, the rows converted on the fly while the next tile's rows are
/// prefetched; token `j`'s activations start at `x + j·xs`, results go to `out[i·T + j]`.
///
/// # Safety
/// AVX-512 F/BW/BF16; rows `r..r + N` exist; `x` has `T` padded rows; `out` has `N·T` entries.
#[inline]
#[allow(clippy::needless_range_loop)] // indices name the register tile's rows and tokens
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn stream_tile<W: Weights, const N: usize, const T: usize>(
    w: &W,
    r: usize,
    x: *const u16,
    xs: usize,
    out: &mut [f32],
) {
    let k = w.cols();
    let bytes = std::mem::size_of::<W::E>() * 32;
    let p: [*const W::E; N] = std::array::from_fn(|i| w.row(r + i));
    let bk = w.block();
    let full = k / 32 * 32;
    let mut acc = [[_mm512_setzero_ps(); T]; N];
    // SAFETY (both loads): c < k ≤ the padded row of each of the T tokens.
    let xv = |j: usize, c: usize| -> __m512bh {
        unsafe { std::mem::transmute(_mm512_loadu_si512(x.add(j * xs + c) as *const _)) }
    };
    let (mut c, mut bi) = (0, 0);
    while c < k {
        let b1 = (c + bk).min(k);
        let s: [__m512; N] = std::array::from_fn(|i| scale_vec(w, r + i, bi));
        while c < b1.min(full) {
            let xs: [__m512bh; T] = std::array::from_fn(|j| xv(j, c));
            for i in 0..N {
                // The same columns of the tile after this one; a hint only, past the end is
                // harmless.
                let ahead = p[i].wrapping_add(RB * k + c) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                if bytes > 64 {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
                }
                // SAFETY: c + 32 ≤ k, within row r + i.
                let wv = unsafe { chunk::<W>(p[i], c, s[i]) };
                for j in 0..T {
                    acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv, xs[j]);
                }
            }
            c += 32;
        }
        if c < b1 {
            // The row's partial last chunk.
            let xs: [__m512bh; T] = std::array::from_fn(|j| xv(j, c));
            for i in 0..N {
                // SAFETY: row r + i has k > c elements.
                let wv = unsafe { tail_chunk::<W>(p[i], c, k, s[i]) };
                for j in 0..T {
                    acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv, xs[j]);
                }
            }
            c = b1;
        }
        bi += 1;
    }
    for i in 0..N {
        for j in 0..T {
            out[i * T + j] = _mm512_reduce_add_ps(acc[i][j]);
        }
    }
}

/// Dispatches a tile of converted rows to the kernel instance for its shape.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn buffered_tile(
    w: [*const u16; RB],
    ks: usize,
    x: *const u16,
    xs: usize,
    o: &mut [f32],
    t: usize,
    nr: usize,
    nt: usize,
) {
    macro_rules! go {
        ($n:literal, $t:literal) => {
            // SAFETY: forwarded from the caller (rows `nr`, tokens `nt` in bounds).
            unsafe { tile::<$n, $t>(w, ks, x, xs, o, t) }
        };
    }
    macro_rules! rows_of {
        ($n:literal) => {
            match nt {
                6 => go!($n, 6),
                5 => go!($n, 5),
                4 => go!($n, 4),
                3 => go!($n, 3),
                2 => go!($n, 2),
                _ => go!($n, 1),
            }
        };
    }
    match nr {
        4 => rows_of!(4),
        3 => rows_of!(3),
        2 => rows_of!(2),
        _ => rows_of!(1),
    }
}

/// `N` converted rows × `T` tokens over `ks` (padded) columns; the result goes to
/// `out[i · ostride + j]`.
///
/// # Safety
/// AVX-512 F/BW/BF16; `w[i]` has `ks` entries, token `j`'s activations start at `x + j·xs`
/// with `ks` entries, and `out` covers what is described above.
#[inline]
#[allow(clippy::needless_range_loop)] // indices name the register tile's rows and tokens
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn tile<const N: usize, const T: usize>(
    w: [*const u16; RB],
    ks: usize,
    x: *const u16,
    xs: usize,
    out: &mut [f32],
    ostride: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); T]; N];
    let mut c = 0;
    while c < ks {
        // SAFETY: c + 32 <= ks for every row and token.
        unsafe {
            let wv: [__m512bh; N] = std::array::from_fn(|i| {
                std::mem::transmute(_mm512_loadu_si512(w[i].add(c) as *const _))
            });
            for j in 0..T {
                let xv: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(x.add(j * xs + c) as *const _));
                for i in 0..N {
                    acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[i], xv);
                }
            }
        }
        c += 32;
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            out[i * ostride + j] = _mm512_reduce_add_ps(*a);
        }
    }
}
