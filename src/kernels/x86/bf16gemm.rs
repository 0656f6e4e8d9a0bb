//! The blocked product for prompt chunks: outer products of packed weight panels with
//! broadcast activations, `vdpbf16ps` into accumulators that stay in registers over a whole
//! block of columns.
//!
//! Why a second kernel: the dot-product tiles of [`super::bf16dot`] reread a 64 KiB panel of
//! widened rows from L2 for every token tile and sum lanes at the end; measured at 43–55% of
//! the bfloat16 peak. Here a panel of 64 rows is packed once (into L2); each column block of
//! it (16–32 KiB) stays in L1 while every token passes, and each step is 4 weight loads and 6
//! broadcasts for 24 multiply-adds of 32 products each (63–79% of the peak at the model's
//! shapes).
//!
//! Packed layout: for column pair `p` (columns `2p`, `2p+1`) and row group `g` (16 rows), one
//! 64-byte vector whose 32-bit lane `l` holds the two weights of row `16g + l`: exactly the
//! operand `vdpbf16ps` pairs with a broadcast of one token's two activations. Rows are
//! transposed into it 16 × 16 at a time.
//!
//! Numbers: activations rounded to bfloat16 once (unscaled); BF16 weights as stored, FP8
//! weights widened exactly; f32 accumulation. Each output sums its column pairs in order
//! within a column block, and adds the block's sum into the result in block order — for FP8
//! times the block's scale, in f32 (one fused multiply-add), so the scale is never rounded
//! into a bfloat16 input. The order depends on nothing but the column count, so a token's
//! result is the same whatever else the batch holds. It differs in the last bits from the
//! dot-product kernels' order, which is why the caller picks a kernel per sequence, not per
//! batch (see `matmul::Job::bulk`).

use std::arch::x86_64::*;
use std::ops::Range;

use super::bf16dot::{tail, Bf16Acts, Raw, Source};
use super::fp8dot::{Affine, Arith, Lookup};
use crate::checkpoint::{Matrix, MatrixData};
use crate::kernels::matmul::OutRows;

/// Vectors (of 16 rows) per panel.
const NV: usize = 4;
/// Rows per panel.
pub const PANEL_ROWS: usize = 16 * NV;
/// Tokens per register tile: `MR · NV` accumulators, `NV` weight vectors and a broadcast fit
/// the 32 registers.
const MR: usize = 6;
/// Columns per block for BF16 weights (FP8 uses its scale block): 64 rows × 256 columns of
/// bfloat16 are 32 KiB, in L1 with the tile's activations.
const BF16_BLOCK: usize = 256;

/// Whether [`rows`] handles `w`: BF16, or FP8 whose column blocks are whole 64-column chunks
/// of at most 512 columns (a packed column block must stay in L1).
pub fn supports(w: &Matrix) -> bool {
    match w.data {
        MatrixData::Bf16(_) => true,
        // Its packing widens e4m3; integer bytes keep to the dot products.
        MatrixData::Fp8 {
            block_k,
            block_n,
            code,
            ..
        } => {
            code == crate::checkpoint::ByteCode::E4m3
                && block_k.is_multiple_of(64)
                && block_k <= 512
                && block_n > 0
        }
        _ => false,
    }
}

/// `out[r - rows.start, j] = Σ_k x[j0 + j, k] · W[r, k]` for `r` in `rows`, `j < t`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and BF16 (checked by the caller's dispatch);
/// `supports(w)`; `x` holds tokens `j0..j0 + t` padded to whole 32-column chunks with zeros;
/// `out` is writable for `rows.len()` rows of `t` tokens.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn rows(
    x: &Bf16Acts,
    j0: usize,
    t: usize,
    w: &Matrix,
    rows: Range<usize>,
    out: OutRows,
) {
    let k = w.cols;
    assert!(rows.end <= w.rows);
    let xp = x.tokens(j0, t, k);
    match &w.data {
        MatrixData::Bf16(d) => {
            let d = d.as_slice();
            assert!(d.len() >= w.rows * k);
            let g = Geometry {
                k,
                kc: BF16_BLOCK,
                scales: None,
            };
            // SAFETY: same features; rows and activations checked above, outputs by the caller.
            unsafe {
                run(
                    &Raw,
                    d.as_ptr() as *const u8,
                    &g,
                    xp,
                    x.stride,
                    t,
                    rows,
                    out,
                )
            }
        }
        MatrixData::Fp8 {
            w: q,
            scales,
            block_n,
            block_k,
            ..
        } => {
            let q = q.as_slice();
            let sc = k.div_ceil(*block_k);
            assert!(q.len() >= w.rows * k && scales.len() >= w.rows.div_ceil(*block_n) * sc);
            let g = Geometry {
                k,
                kc: *block_k,
                scales: Some((scales, *block_n, sc)),
            };
            // SAFETY: as above; GFNI and VBMI checked for the affine and lookup widenings.
            unsafe {
                if super::super::isa::gfni() {
                    fp8_affine(q.as_ptr(), &g, xp, x.stride, t, rows, out)
                } else if super::super::isa::vbmi() {
                    fp8_lookup(q.as_ptr(), &g, xp, x.stride, t, rows, out)
                } else {
                    run(&Arith, q.as_ptr(), &g, xp, x.stride, t, rows, out)
                }
            }
        }
        _ => unreachable!("bf16gemm::rows called for a {} matrix", w.dtype_name()),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vbmi,gfni")]
#[allow(clippy::too_many_arguments)]
unsafe fn fp8_affine(
    q: *const u8,
    g: &Geometry,
    x: *const u16,
    xs: usize,
    t: usize,
    rows: Range<usize>,
    out: OutRows,
) {
    // SAFETY: AVX-512 F is enabled here.
    let s = unsafe { Affine::new() };
    // SAFETY: forwarded (GFNI and VBMI enabled, which `Affine` needs).
    unsafe { run(&s, q, g, x, xs, t, rows, out) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vbmi")]
#[allow(clippy::too_many_arguments)]
unsafe fn fp8_lookup(
    q: *const u8,
    g: &Geometry,
    x: *const u16,
    xs: usize,
    t: usize,
    rows: Range<usize>,
    out: OutRows,
) {
    // SAFETY: AVX-512 F is enabled here.
    let s = unsafe { Lookup::new(crate::checkpoint::ByteCode::E4m3) };
    // SAFETY: forwarded (VBMI enabled, which `Lookup` needs).
    unsafe { run(&s, q, g, x, xs, t, rows, out) }
}

/// The matrix's shape as the loops see it.
struct Geometry<'a> {
    /// Columns.
    k: usize,
    /// Columns per block.
    kc: usize,
    /// FP8: scales (`[row blocks, column blocks]`), rows per scale block, column blocks.
    scales: Option<(&'a [f32], usize, usize)>,
}

/// Panels of [`PANEL_ROWS`] rows: each packed whole (its rows read front to back, which the
/// hardware prefetchers follow), then every token tile per column block.
///
/// # Safety
/// AVX-512 F/BW/BF16 and what `S` needs; rows exist in the `k`-column matrix at `w`; `x`
/// holds `t` tokens `xs` apart, each padded to whole 32-column chunks; `out` as for [`rows`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn run<S: Source>(
    s: &S,
    w: *const u8,
    g: &Geometry,
    x: *const u16,
    xs: usize,
    t: usize,
    rows: Range<usize>,
    out: OutRows,
) {
    let (k, kc) = (g.k, g.kc);
    debug_assert!(kc % (32 * S::VECS) == 0);
    let kblocks = k.div_ceil(kc);
    // Per column block: its column pairs × row groups × 16 lanes, as 32-bit words.
    let block_words = kc / 2 * NV * 16;
    let mut pack = vec![0u32; kblocks * block_words];
    let mut acc = vec![0.0f32; t * PANEL_ROWS];
    let tiles = t.div_ceil(MR);
    let row_lines = (k * S::ELEM).div_ceil(64);
    let mut n0 = rows.start;
    while n0 < rows.end {
        let nr = PANEL_ROWS.min(rows.end - n0);
        // Group by group, each of its 16 rows read front to back across the blocks.
        for g in 0..NV {
            for kb in 0..kblocks {
                let k0 = kb * kc;
                // SAFETY: rows n0..n0+nr and columns k0.. of this block exist; the buffer
                // holds every block.
                unsafe {
                    pack_block(
                        s,
                        w,
                        k,
                        n0,
                        nr,
                        g,
                        k0,
                        kc.min(k - k0),
                        pack.as_mut_ptr().add(kb * block_words),
                    )
                };
            }
        }
        // The panel's sums build up in a compact `[t, 64]` buffer, copied out at the end:
        // rows of the result are a whole matrix row apart (48 KiB for the DeltaNet input
        // projection), so updating them in place at every column block touched hundreds of
        // pages per block, more than the TLB holds.
        acc.fill(0.0);
        // The next panel's rows, fetched into L2 a share per token tile while this one is
        // multiplied: read only when packed, they would stall the packing on memory.
        let n1 = n0 + nr;
        let next = w.wrapping_add(n1 * k * S::ELEM) as *const i8;
        let lines = PANEL_ROWS.min(rows.end.saturating_sub(n1)) * row_lines;
        let per_tile = lines.div_ceil(kblocks * tiles);
        let mut fetched = 0;
        for kb in 0..kblocks {
            let k0 = kb * kc;
            let scale = g
                .scales
                .map(|(sv, bn, sc)| block_scales(sv, bn, sc, n0, kb, rows.end));
            let pairs = kc.min(k - k0).div_ceil(2);
            for tile in 0..tiles {
                for _ in 0..per_tile.min(lines - fetched) {
                    _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(64 * fetched));
                    fetched += 1;
                }
                let j = tile * MR;
                let nt = MR.min(t - j);
                // SAFETY: the packed block has `pairs` column pairs; tokens j..j+nt have
                // their columns k0..k0 + 2·pairs (within the padded rows); the buffer has
                // 64 sums for each of them.
                unsafe {
                    tile_dispatch(
                        pack.as_ptr().add(kb * block_words),
                        pairs,
                        x.add(j * xs + k0),
                        xs,
                        acc.as_mut_ptr().add(j * PANEL_ROWS),
                        PANEL_ROWS,
                        scale.as_ref(),
                        nt,
                    )
                };
            }
        }
        for (j, sums) in acc.chunks_exact(PANEL_ROWS).enumerate() {
            // SAFETY: rows n0..n0+nr of token j are within `out` (the caller's guarantee).
            unsafe { std::ptr::copy_nonoverlapping(sums.as_ptr(), out.at(n0 - rows.start, j), nr) };
        }
        n0 = n1;
    }
}

/// FP8: the scales of column block `kb` for the 64 rows from `n0`, one vector per 16 rows
/// (zero past `end`).
#[inline(always)]
fn block_scales(
    sv: &[f32],
    bn: usize,
    sc: usize,
    n0: usize,
    kb: usize,
    end: usize,
) -> [__m512; NV] {
    // A loop, not `array::from_fn`: a closure is a function without the caller's target
    // features, and the intrinsics in it stay calls.
    // SAFETY: AVX-512 F in every caller.
    let mut out = [unsafe { _mm512_setzero_ps() }; NV];
    for (v, o) in out.iter_mut().enumerate() {
        let r = n0 + 16 * v;
        *o = if bn.is_multiple_of(16) && r.is_multiple_of(16) && r + 16 <= end {
            // 16 rows in one scale block (the usual case: panels start on a multiple of 64,
            // blocks are 128 rows): no per-lane divisions.
            // SAFETY: AVX-512 F in every caller.
            unsafe { _mm512_set1_ps(sv[r / bn * sc + kb]) }
        } else {
            let mut lanes = [0.0f32; 16];
            for (l, x) in lanes.iter_mut().enumerate() {
                if r + l < end {
                    *x = sv[(r + l) / bn * sc + kb];
                }
            }
            // SAFETY: 16 floats (AVX-512 F in every caller).
            unsafe { _mm512_loadu_ps(lanes.as_ptr()) }
        };
    }
    out
}

/// Row group `g` (rows `n0 + 16g ..`, of `n0..n0+nr`), columns `k0..k0+kcols`, packed into
/// `dst` as the module comment describes; rows past `nr` and columns past `kcols` (to a whole
/// chunk) are zero.
///
/// # Safety
/// As for [`run`]; `dst` holds a whole block.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
#[allow(clippy::needless_range_loop)] // `l` names the lane a row lands in
unsafe fn pack_block<S: Source>(
    s: &S,
    w: *const u8,
    k: usize,
    n0: usize,
    nr: usize,
    g: usize,
    k0: usize,
    kcols: usize,
    dst: *mut u32,
) {
    let ch = 32 * S::VECS;
    for c in (0..kcols).step_by(ch) {
        let mut v = [[_mm512_setzero_si512(); 16]; 2];
        for l in 0..16 {
            let r = 16 * g + l;
            if r >= nr {
                break;
            }
            let p = w.wrapping_add(((n0 + r) * k + k0 + c) * S::ELEM);
            // SAFETY: a whole chunk within the row, or the partial last one through a
            // zeroed copy.
            let chunk = unsafe {
                if c + ch <= kcols {
                    s.chunk(p)
                } else {
                    tail(s, p, kcols - c)
                }
            };
            for h in 0..S::VECS {
                v[h][l] = std::mem::transmute::<__m512bh, __m512i>(chunk[h]);
            }
        }
        for (h, vh) in v.iter().enumerate().take(S::VECS) {
            // SAFETY: AVX-512 F.
            let tr = unsafe { transpose16(*vh) };
            for (q, col) in tr.iter().enumerate() {
                let pair = c / 2 + S::pair(h, q);
                // SAFETY: pair < kc / 2 and g < NV: inside the block.
                unsafe { _mm512_storeu_si512(dst.add((pair * NV + g) * 16) as *mut _, *col) };
            }
        }
    }
}

/// The lane indices of one round of [`transpose16`] for distance `d`: `lo` takes lane `l`
/// of the first row where bit `d` of `l` is clear and lane `l − d` of the second where it is
/// set; `hi` lane `l + d` of the first and lane `l` of the second.
const fn exchange(d: usize, hi: bool) -> [i32; 16] {
    let mut x = [0i32; 16];
    let mut l = 0;
    while l < 16 {
        x[l] = match (l & d == 0, hi) {
            (true, false) => l as i32,
            (false, false) => (16 + l - d) as i32,
            (true, true) => (l + d) as i32,
            (false, true) => (16 + l) as i32,
        };
        l += 1;
    }
    x
}

const EXCHANGE: [[[i32; 16]; 2]; 4] = [
    [exchange(8, false), exchange(8, true)],
    [exchange(4, false), exchange(4, true)],
    [exchange(2, false), exchange(2, true)],
    [exchange(1, false), exchange(1, true)],
];

/// 16 × 16 32-bit words transposed: four rounds, each exchanging one bit between the row and
/// the lane index with two-source permutes. Written out (a macro, constant indices) so that
/// the rows stay in registers: as a loop over the rounds it kept them in memory.
///
/// # Safety
/// AVX-512 F.
#[inline(always)]
pub(super) unsafe fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
    let [mut r0, mut r1, mut r2, mut r3, mut r4, mut r5, mut r6, mut r7, mut r8, mut r9, mut r10, mut r11, mut r12, mut r13, mut r14, mut r15] =
        r;
    macro_rules! round {
        ($k:literal: $(($a:ident, $b:ident)),*) => {
            // SAFETY: 16 integers each; AVX-512 F (the caller's guarantee).
            unsafe {
                let lo = _mm512_loadu_si512(EXCHANGE[$k][0].as_ptr() as *const _);
                let hi = _mm512_loadu_si512(EXCHANGE[$k][1].as_ptr() as *const _);
                $(
                    let (a, b) = ($a, $b);
                    $a = _mm512_permutex2var_epi32(a, lo, b);
                    $b = _mm512_permutex2var_epi32(a, hi, b);
                )*
            }
        };
    }
    round!(0: (r0, r8), (r1, r9), (r2, r10), (r3, r11), (r4, r12), (r5, r13), (r6, r14), (r7, r15));
    round!(1: (r0, r4), (r1, r5), (r2, r6), (r3, r7), (r8, r12), (r9, r13), (r10, r14), (r11, r15));
    round!(2: (r0, r2), (r1, r3), (r4, r6), (r5, r7), (r8, r10), (r9, r11), (r12, r14), (r13, r15));
    round!(3: (r0, r1), (r2, r3), (r4, r5), (r6, r7), (r8, r9), (r10, r11), (r12, r13), (r14, r15));
    [
        r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11, r12, r13, r14, r15,
    ]
}

/// Dispatches a token tile to the kernel instance for its height.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn tile_dispatch(
    pack: *const u32,
    pairs: usize,
    x: *const u16,
    xs: usize,
    c: *mut f32,
    ldc: usize,
    scale: Option<&[__m512; NV]>,
    nt: usize,
) {
    macro_rules! go {
        ($m:literal) => {
            // SAFETY: forwarded from the caller.
            unsafe { tile::<$m>(pack, pairs, x, xs, c, ldc, scale) }
        };
    }
    match nt {
        6 => go!(6),
        5 => go!(5),
        4 => go!(4),
        3 => go!(3),
        2 => go!(2),
        _ => go!(1),
    }
}

/// `M` tokens × one packed panel over `pairs` column pairs, added into `c` (token `i`'s 64
/// sums at `c + i·ldc`), times `scale` per lane if given.
///
/// # Safety
/// AVX-512 F/BW/BF16; `pack` holds `pairs` packed column pairs; token `i`'s activations at
/// `x + i·xs` have `2·pairs` columns; 64 sums per token writable at `c`.
#[inline]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn tile<const M: usize>(
    pack: *const u32,
    pairs: usize,
    x: *const u16,
    xs: usize,
    c: *mut f32,
    ldc: usize,
    scale: Option<&[__m512; NV]>,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; M];
    for p in 0..pairs {
        // SAFETY: p < pairs, within the packed block and every token's columns.
        unsafe {
            let w: [__m512bh; NV] = std::array::from_fn(|v| {
                std::mem::transmute(_mm512_loadu_si512(pack.add((p * NV + v) * 16) as *const _))
            });
            for i in 0..M {
                let pair = (x.add(i * xs + 2 * p) as *const i32).read_unaligned();
                let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                for v in 0..NV {
                    acc[i][v] = _mm512_dpbf16_ps(acc[i][v], w[v], b);
                }
            }
        }
    }
    for i in 0..M {
        for v in 0..NV {
            // SAFETY: the caller's buffer has 64 sums per token.
            unsafe {
                let cp = c.add(i * ldc + 16 * v);
                let old = _mm512_loadu_ps(cp);
                let new = match scale {
                    Some(s) => _mm512_fmadd_ps(acc[i][v], s[v], old),
                    None => _mm512_add_ps(acc[i][v], old),
                };
                _mm512_storeu_ps(cp, new);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose16_transposes() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let m: [[i32; 16]; 16] =
            std::array::from_fn(|i| std::array::from_fn(|l| 100 * i as i32 + l as i32));
        // SAFETY: AVX-512 F checked above.
        let got: [[i32; 16]; 16] = unsafe { check(&m) };
        for i in 0..16 {
            for l in 0..16 {
                assert_eq!(got[i][l], m[l][i]);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn check(m: &[[i32; 16]; 16]) -> [[i32; 16]; 16] {
        // SAFETY: 16 rows of 16 integers.
        let r: [__m512i; 16] =
            std::array::from_fn(|i| unsafe { _mm512_loadu_si512(m[i].as_ptr() as *const _) });
        // SAFETY: 16 vectors reinterpreted as 16 rows.
        unsafe { std::mem::transmute(transpose16(r)) }
    }
}
