//! The blocked product for prompt chunks on x86-64 CPUs without AVX-512 (AVX2 + FMA): a
//! panel of rows widened to f32 one block of columns at a time (FP8 times its block scale,
//! the very weights of the exact path), the tokens transposed so that a vector holds 8 tokens
//! of one column, and register tiles of 6 rows × 16 tokens: each step 2 loads, 6 broadcasts
//! and 12 fused multiply-adds, with the accumulators in registers for a whole column block.
//!
//! Why not the dot-product tiles of `kernels::exact`: they sum lanes at the end and reload
//! a widened row per token pair (6 loads per 8 multiply-adds), which held prompt processing
//! on this tier to about half of its f32 peak.
//!
//! Numbers: for row `r` and token `j`, `Σ_c x[j, c] · (w[r, c] · s)` in f32, one fused
//! multiply-add per column in column order from zero. Nothing else in the batch enters a
//! token's chain, so its result does not depend on the batch; it differs in the last bits
//! from the dot-product kernels' order, which is why the caller picks a kernel per sequence
//! (see `matmul::Job::bulk`).

use std::arch::x86_64::*;
use std::ops::Range;

use crate::checkpoint::{ByteCode, Matrix, MatrixData};
use crate::kernels::exact::FP8_BITS;
use crate::kernels::matmul::OutRows;

/// Rows per register tile.
const MR: usize = 6;
/// Tokens per register tile (two vectors).
const NT: usize = 16;
/// Rows widened per column block (the pool's unit of rows for prompt chunks): 64 rows ×
/// [`KC`] columns of f32 are 64 KiB, in L2.
const PANEL: usize = 64;
/// Columns per block: a tile's [`NT`] tokens of them (16 KiB) stay in L1 while every row
/// tile of the panel passes.
const KC: usize = 256;
/// `2¹²⁰`: e4m3 bytes widen to `value · 2⁻¹²⁰` (`kernels::exact`).
const TWO_POW_120: f32 = f32::from_bits((127 + 120) << 23);

/// Whether [`rows`] handles `w`: e4m3 with block scales, or BF16.
pub fn supports(w: &Matrix) -> bool {
    match w.data {
        MatrixData::Fp8 {
            code,
            block_n,
            block_k,
            ..
        } => code == ByteCode::E4m3 && block_n > 0 && block_k > 0,
        MatrixData::Bf16(_) => true,
        _ => false,
    }
}

/// Prompt-chunk tokens as the tiles read them: groups of [`NT`] tokens (the last zero-padded),
/// each group transposed, so that column `c` of a group's tokens is `NT` consecutive values
/// and a tile reads its columns contiguously (a stride of all the tokens would put a column
/// block's lines into a few cache sets). Made once per product, shared by its tasks.
pub struct Tokens {
    data: Vec<f32>,
    t: usize,
    k: usize,
}

impl Tokens {
    /// `x` (`[t, k]`) regrouped.
    pub fn new(x: &[f32], t: usize, k: usize) -> Tokens {
        assert!(x.len() >= t * k);
        let mut data = vec![0.0f32; k * t.next_multiple_of(NT)];
        if k > 0 {
            for (j, xj) in x.chunks_exact(k).take(t).enumerate() {
                let group = &mut data[(j / NT) * NT * k..];
                for (c, &v) in xj.iter().enumerate() {
                    group[c * NT + j % NT] = v;
                }
            }
        }
        Tokens { data, t, k }
    }
}

/// `out[r - rows.start, j] = Σ_c x[j, c] · W[r, c]` for `r` in `rows`, `j < t`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (checked by the caller's dispatch); `supports(w)`;
/// `out` is writable for `rows.len()` rows of `t` tokens.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows(x: &Tokens, w: &Matrix, rows: Range<usize>, out: OutRows) {
    let (k, t) = (w.cols, x.t);
    assert!(rows.end <= w.rows && x.k == k && x.data.len() >= k * t.next_multiple_of(NT));
    if t == 0 || rows.is_empty() || k == 0 {
        return;
    }
    let tp = t.next_multiple_of(NT);
    let xt = &x.data;
    let mut wbuf = vec![0.0f32; PANEL * KC];
    let mut cbuf = vec![0.0f32; PANEL * tp];
    let mut p0 = rows.start;
    while p0 < rows.end {
        let np = PANEL.min(rows.end - p0);
        cbuf[..np * tp].fill(0.0);
        let mut c0 = 0;
        while c0 < k {
            let kc = KC.min(k - c0);
            for i in 0..np {
                // SAFETY: row p0 + i exists; columns c0..c0+kc are inside it; the buffer
                // row has KC ≥ kc places.
                unsafe { widen(w, p0 + i, c0, kc, wbuf[i * KC..(i + 1) * KC].as_mut_ptr()) };
            }
            let mut j0 = 0;
            while j0 < t {
                let two = t - j0 > 8;
                let mut i0 = 0;
                while i0 < np {
                    let mr = MR.min(np - i0);
                    let wp = wbuf[i0 * KC..].as_ptr();
                    let xp = xt[j0 * k + c0 * NT..].as_ptr();
                    let cp = cbuf[i0 * tp + j0..].as_mut_ptr();
                    macro_rules! go {
                        ($r:literal, $v:literal) => {
                            // SAFETY: rows i0..i0+mr of the panel, tokens j0..j0+8·v of the
                            // padded ones, columns c0..c0+kc: inside all three buffers.
                            unsafe { tile::<$r, $v>(kc, wp, xp, cp, tp) }
                        };
                    }
                    macro_rules! rows_of {
                        ($v:literal) => {
                            match mr {
                                6 => go!(6, $v),
                                5 => go!(5, $v),
                                4 => go!(4, $v),
                                3 => go!(3, $v),
                                2 => go!(2, $v),
                                _ => go!(1, $v),
                            }
                        };
                    }
                    if two {
                        rows_of!(2)
                    } else {
                        rows_of!(1)
                    }
                    i0 += mr;
                }
                j0 += NT;
            }
            c0 += kc;
        }
        for i in 0..np {
            for j in 0..t {
                // SAFETY: row p0 + i and token j are inside the caller's block.
                unsafe { *out.at(p0 - rows.start + i, j) = cbuf[i * tp + j] };
            }
        }
        p0 += np;
    }
}

/// Columns `c0..c0 + kc` of row `r` as f32 into `dst`: FP8 times its block scale (one
/// rounding, as `kernels::exact` widens them), BF16 as stored.
///
/// # Safety
/// AVX2; `supports(w)`; the row and columns exist; `kc` places at `dst`.
#[inline(always)]
unsafe fn widen(w: &Matrix, r: usize, c0: usize, kc: usize, dst: *mut f32) {
    let k = w.cols;
    match &w.data {
        MatrixData::Fp8 {
            w: q,
            scales,
            block_n,
            block_k,
            ..
        } => {
            let (q, bk) = (&q.as_slice()[r * k..(r + 1) * k], *block_k);
            let srow = &scales[(r / block_n) * k.div_ceil(bk)..];
            let mut c = c0;
            while c < c0 + kc {
                let s = srow[c / bk] * TWO_POW_120;
                let b1 = ((c / bk + 1) * bk).min(c0 + kc);
                let sv = _mm256_set1_ps(s);
                while c + 8 <= b1 {
                    // SAFETY: c + 8 ≤ the row's end; dst has kc places from c0.
                    unsafe {
                        let b = _mm_loadl_epi64(q.as_ptr().add(c) as *const __m128i);
                        let v = _mm256_castsi256_ps(_mm256_and_si256(
                            _mm256_slli_epi32::<20>(_mm256_cvtepi8_epi32(b)),
                            _mm256_set1_epi32(FP8_BITS),
                        ));
                        _mm256_storeu_ps(dst.add(c - c0), _mm256_mul_ps(v, sv));
                    }
                    c += 8;
                }
                while c < b1 {
                    let v = f32::from_bits(((q[c] as i8 as i32) << 20) as u32 & FP8_BITS as u32);
                    // SAFETY: c - c0 < kc.
                    unsafe { *dst.add(c - c0) = v * s };
                    c += 1;
                }
            }
        }
        MatrixData::Bf16(d) => {
            let row = &d.as_slice()[r * k + c0..r * k + c0 + kc];
            for (i, &b) in row.iter().enumerate() {
                // SAFETY: i < kc.
                unsafe { *dst.add(i) = f32::from_bits((b as u32) << 16) };
            }
        }
        _ => unreachable!("avx2gemm::widen called for a {} matrix", w.dtype_name()),
    }
}

/// `R` rows × `V` vectors of 8 tokens: `c[i·cs + j] += Σ_{p < kc} w[i·KC + p] · x[p·NT + j]`.
///
/// # Safety
/// AVX2, FMA; every element addressed is in bounds.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn tile<const R: usize, const V: usize>(
    kc: usize,
    w: *const f32,
    x: *const f32,
    c: *mut f32,
    cs: usize,
) {
    // SAFETY: every access is in bounds by the caller's guarantee (this function's contract).
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        for i in 0..R {
            for v in 0..V {
                acc[i][v] = _mm256_loadu_ps(c.add(i * cs + 8 * v));
            }
        }
        for p in 0..kc {
            let xv: [__m256; V] = std::array::from_fn(|v| _mm256_loadu_ps(x.add(p * NT + 8 * v)));
            for i in 0..R {
                let wv = _mm256_broadcast_ss(&*w.add(i * KC + p));
                for v in 0..V {
                    acc[i][v] = _mm256_fmadd_ps(wv, xv[v], acc[i][v]);
                }
            }
        }
        for i in 0..R {
            for v in 0..V {
                _mm256_storeu_ps(c.add(i * cs + 8 * v), acc[i][v]);
            }
        }
    }
}

/// `iters` rounds of 12 independent 8-lane fused multiply-adds on registers: the core's f32
/// peak on this tier, with nothing else in the loop (a compute probe for `bench --kernels`).
///
/// # Safety
/// AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn peak_probe(iters: usize) -> f32 {
    let a = _mm256_set1_ps(1.0);
    let b = std::hint::black_box(_mm256_set1_ps(1e-9));
    let mut acc = [_mm256_setzero_ps(); 12];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(a, b, *v);
        }
    }
    let s = acc
        .iter()
        .fold(_mm256_setzero_ps(), |s, &v| _mm256_add_ps(s, v));
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` is 8 writable floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), s) };
    lanes.iter().sum()
}
