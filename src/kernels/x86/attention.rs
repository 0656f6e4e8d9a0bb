//! AVX-512 attention of one token's query heads over one chunk of the cache (see
//! `kernels::attention`). Bounds are checked by the caller; each `SAFETY` comment refers to
//! them.
//!
//! One pass over blocks of [`JB`] positions, flash-attention style: score the block, raise
//! each head's running maximum (rescaling what was summed so far when it grows), then add the
//! block's weighted values. Keys and values stream from memory together, prefetched rows
//! ahead, while the arithmetic of the block before runs on them.
//!
//! Scores: `P = 16 / G` positions at a time, so that the `G` query heads of a KV head and those
//! positions make 16 accumulators, summed across lanes by one transposing tree into one vector
//! of 16 scores (one `reduce_add` per score cost more than the dot products at the model's
//! shape). Positions advance in the outer loop and KV heads in the inner one, so each cached
//! row is read whole and rows in order.
//!
//! Three flavours of arithmetic share that skeleton ([`Flavour`]):
//! - [`F32Rows`]: f32 rows, f32 multiply-adds (`--exact`);
//! - [`Bf16Rows`]: bfloat16 rows widened exactly, f32 multiply-adds (AVX-512 without BF16);
//! - [`Bf16Dots`]: bfloat16 rows, `vdpbf16ps` with the queries and the softmax weights
//!   rounded to bfloat16, as the fast path rounds every product's activations. Half the
//!   instructions of the f32 forms, which at long contexts run longer than the memory does.

// The loops index several register arrays by the same head or position.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use crate::kernels::activation::exp;
use crate::kernels::attention::{Kv, Part};

/// Key and value rows prefetched ahead of the one being scored. At depth 4096, in-process
/// alternations against the previous kernel: 8 rows 0.39–0.40, 16 rows 0.34–0.35, 32 rows
/// 0.37–0.38 ms per layer (`bench --kernels`' attention line).
const ROWS_AHEAD: usize = 16;
/// Positions per block: scored, then weighted while their value rows (64 KiB at the model's
/// shape) are still in L2. Larger blocks spread the softmax update and the reloading of the
/// outputs over more positions (16: 0.47, 32: 0.39–0.40, 64: 0.38 ms per layer, with 8 rows
/// ahead). Even, for [`Bf16Dots`]' pairs of positions.
const JB: usize = 64;

/// The arithmetic of one kind of cached rows.
pub trait Flavour {
    /// A stored key/value element.
    type Elem: Copy;
    /// A query element as the score loop reads it.
    type QElem: Copy + Default;
    /// Whether the softmax weights are rounded to bfloat16 (and summed as rounded).
    const ROUND_WEIGHTS: bool;

    /// The queries `[heads, hd]` in the kernel's element type and column order.
    fn queries(q: &[f32]) -> Vec<Self::QElem>;

    /// `acc[p·G + hh] +=` the lane products of query head `hh` (at `q`, `hd` apart) with key
    /// row `rows[p]` over `hd` columns.
    ///
    /// # Safety
    /// AVX-512 F (and BF16 for [`Bf16Dots`]); `G` rows of `hd` readable at `q`, `hd` readable
    /// at each row.
    unsafe fn score<const G: usize, const P: usize>(
        acc: &mut [__m512; 16],
        q: *const Self::QElem,
        rows: [*const Self::Elem; P],
        hd: usize,
    );

    /// `o[hh] += Σ_j weights[j·G + hh] · v(j)` over `n` positions, `v(j)` the value row at
    /// `v + j·w` (`hd` columns), for the `G` heads whose outputs are `hd` apart at `o`, in the
    /// kernel's column order. `n` is even where weights are rounded (the padding weighs 0);
    /// `last` is the last row that may be read.
    ///
    /// # Safety
    /// As for [`Flavour::score`]; rows up to `last` readable; `weights` holds `n · G` values.
    unsafe fn weigh<const G: usize>(
        o: *mut f32,
        v: *const Self::Elem,
        w: usize,
        n: usize,
        last: *const Self::Elem,
        weights: &[f32],
        hd: usize,
    );

    /// Output column `c` (within each 32) in the kernel's order.
    fn kernel_col(c: usize) -> usize;
}

pub struct F32Rows;
pub struct Bf16Rows;
pub struct Bf16Dots;

/// Two f32 rows' worth of 16 columns and the next 16, multiply-added in f32: shared by the
/// f32 flavours, which differ in how 32 stored values become two vectors.
macro_rules! f32_arith {
    ($load32:ident) => {
        type QElem = f32;
        const ROUND_WEIGHTS: bool = false;

        #[inline(always)]
        unsafe fn score<const G: usize, const P: usize>(
            acc: &mut [__m512; 16],
            q: *const f32,
            rows: [*const Self::Elem; P],
            hd: usize,
        ) {
            for c in (0..hd).step_by(32) {
                // SAFETY: the caller's guarantee.
                unsafe {
                    let mut k = [(_mm512_setzero_ps(), _mm512_setzero_ps()); P];
                    for (kp, r) in k.iter_mut().zip(rows) {
                        *kp = $load32(r.add(c));
                    }
                    for hh in 0..G {
                        let qh = q.add(hh * hd + c);
                        let (q0, q1) = (_mm512_loadu_ps(qh), _mm512_loadu_ps(qh.add(16)));
                        for p in 0..P {
                            let a = &mut acc[p * G + hh];
                            *a = _mm512_fmadd_ps(q0, k[p].0, *a);
                            *a = _mm512_fmadd_ps(q1, k[p].1, *a);
                        }
                    }
                }
            }
        }

        #[inline(always)]
        unsafe fn weigh<const G: usize>(
            o: *mut f32,
            v: *const Self::Elem,
            w: usize,
            n: usize,
            _last: *const Self::Elem,
            weights: &[f32],
            hd: usize,
        ) {
            for c in (0..hd).step_by(32) {
                // SAFETY: the caller's guarantee.
                unsafe {
                    let mut acc = [[_mm512_setzero_ps(); 2]; G];
                    for (hh, a) in acc.iter_mut().enumerate() {
                        let oh = o.add(hh * hd + c);
                        *a = [_mm512_loadu_ps(oh), _mm512_loadu_ps(oh.add(16))];
                    }
                    for j in 0..n {
                        let (v0, v1) = $load32(v.add(j * w + c));
                        for hh in 0..G {
                            let p = _mm512_set1_ps(*weights.get_unchecked(j * G + hh));
                            acc[hh][0] = _mm512_fmadd_ps(p, v0, acc[hh][0]);
                            acc[hh][1] = _mm512_fmadd_ps(p, v1, acc[hh][1]);
                        }
                    }
                    for (hh, a) in acc.iter().enumerate() {
                        let oh = o.add(hh * hd + c);
                        _mm512_storeu_ps(oh, a[0]);
                        _mm512_storeu_ps(oh.add(16), a[1]);
                    }
                }
            }
        }
    };
}

impl Flavour for F32Rows {
    type Elem = f32;

    fn queries(q: &[f32]) -> Vec<f32> {
        q.to_vec()
    }

    fn kernel_col(c: usize) -> usize {
        c
    }

    f32_arith!(load32_f32);
}

/// Columns `0..16` and `16..32` at `p`.
///
/// # Safety
/// AVX-512 F; 32 readable values at `p`.
#[inline(always)]
unsafe fn load32_f32(p: *const f32) -> (__m512, __m512) {
    // SAFETY: the caller's guarantee.
    unsafe { (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))) }
}

/// The even and the odd columns of the 32 at `p`, widened exactly.
///
/// # Safety
/// AVX-512 F; 32 readable values at `p`.
#[inline(always)]
unsafe fn load32_bf16(p: *const u16) -> (__m512, __m512) {
    // SAFETY: the caller's guarantee.
    let x = unsafe { _mm512_loadu_si512(p as *const __m512i) };
    (
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(x)),
        _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(-65536))),
    )
}

/// Bfloat16 widened without shuffles: of 32 stored values, the even ones are the 32-bit lanes
/// shifted left by 16 and the odd ones the lanes with their low half cleared. Queries and
/// outputs use that even/odd order within each 32 columns (a dot product does not depend on
/// the order of its terms).
impl Flavour for Bf16Rows {
    type Elem = u16;

    fn queries(q: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; q.len()];
        for (c, &x) in q.iter().enumerate() {
            out[c / 32 * 32 + Self::kernel_col(c % 32)] = x;
        }
        out
    }

    fn kernel_col(c: usize) -> usize {
        c / 32 * 32 + (c % 32) / 2 + (c % 2) * 16
    }

    f32_arith!(load32_bf16);
}

/// Scores: each `vdpbf16ps` multiplies 16 pairs of adjacent columns of query and key, both
/// in their stored order. Values: two rows interleaved 16 bits at a time (`vpunpck[lh]wd`)
/// pair positions `j, j + 1` in each 32-bit lane, against the pair of their weights; within
/// 128-bit lanes the low unpack takes columns 0–3 and the high one 4–7, so outputs come in
/// that order.
impl Flavour for Bf16Dots {
    type Elem = u16;
    type QElem = u16;
    const ROUND_WEIGHTS: bool = true;

    fn queries(q: &[f32]) -> Vec<u16> {
        q.iter()
            .map(|&x| half::bf16::from_f32(x).to_bits())
            .collect()
    }

    fn kernel_col(c: usize) -> usize {
        // Column 8L + i (i < 4) is lane 4L + i of the low half; 8L + 4 + i of the high one.
        let (b, c) = (c / 32 * 32, c % 32);
        let (lane, i) = (c / 8, c % 8);
        b + if i < 4 {
            4 * lane + i
        } else {
            16 + 4 * lane + i - 4
        }
    }

    #[inline(always)]
    unsafe fn score<const G: usize, const P: usize>(
        acc: &mut [__m512; 16],
        q: *const u16,
        rows: [*const u16; P],
        hd: usize,
    ) {
        for c in (0..hd).step_by(32) {
            // SAFETY: the caller's guarantee.
            unsafe {
                let mut k = [_mm512_setzero_si512(); P];
                for (kp, r) in k.iter_mut().zip(rows) {
                    *kp = _mm512_loadu_si512(r.add(c) as *const __m512i);
                }
                for hh in 0..G {
                    let qh = _mm512_loadu_si512(q.add(hh * hd + c) as *const __m512i);
                    for p in 0..P {
                        let a = &mut acc[p * G + hh];
                        *a = _mm512_dpbf16_ps(*a, bh(qh), bh(k[p]));
                    }
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn weigh<const G: usize>(
        o: *mut f32,
        v: *const u16,
        w: usize,
        n: usize,
        last: *const u16,
        weights: &[f32],
        hd: usize,
    ) {
        // Weights of positions 2t and 2t + 1 as one pair of bfloat16 (exact: they were rounded).
        let mut pairs = [0u32; JB / 2 * 16];
        for t in 0..n / 2 {
            for hh in 0..G {
                let (a, b) = (weights[2 * t * G + hh], weights[(2 * t + 1) * G + hh]);
                pairs[t * G + hh] = (a.to_bits() >> 16) | (b.to_bits() & 0xFFFF_0000);
            }
        }
        for c in (0..hd).step_by(32) {
            // SAFETY: the caller's guarantee; row 2t + 1 is clamped to `last`.
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); 2]; G];
                for (hh, a) in acc.iter_mut().enumerate() {
                    let oh = o.add(hh * hd + c);
                    *a = [_mm512_loadu_ps(oh), _mm512_loadu_ps(oh.add(16))];
                }
                for t in 0..n / 2 {
                    let r0 = v.add(2 * t * w + c);
                    // Formed with wrapping arithmetic: past the last row it is never dereferenced.
                    let r1 = v.wrapping_add((2 * t + 1) * w + c).min(last.add(c));
                    let x0 = _mm512_loadu_si512(r0 as *const __m512i);
                    let x1 = _mm512_loadu_si512(r1 as *const __m512i);
                    let (lo, hi) = (_mm512_unpacklo_epi16(x0, x1), _mm512_unpackhi_epi16(x0, x1));
                    for hh in 0..G {
                        let p = _mm512_set1_epi32(*pairs.get_unchecked(t * G + hh) as i32);
                        acc[hh][0] = _mm512_dpbf16_ps(acc[hh][0], bh(p), bh(lo));
                        acc[hh][1] = _mm512_dpbf16_ps(acc[hh][1], bh(p), bh(hi));
                    }
                }
                for (hh, a) in acc.iter().enumerate() {
                    let oh = o.add(hh * hd + c);
                    _mm512_storeu_ps(oh, a[0]);
                    _mm512_storeu_ps(oh.add(16), a[1]);
                }
            }
        }
    }
}

/// 32 bfloat16 values in an integer vector, as the dot-product instruction takes them.
#[inline(always)]
fn bh(x: __m512i) -> __m512bh {
    // SAFETY: both are 64 bytes of plain data.
    unsafe { std::mem::transmute(x) }
}

/// The lane sums of 16 accumulators as one vector: lane `a` holds the sum of `acc[a]`. Each
/// sum's order of additions depends only on its own accumulator (halves of 256 bits, then of
/// 128, then lanes 2 apart, then neighbours), so a score is the same whatever else its tree
/// held.
///
/// # Safety
/// AVX-512 F.
#[inline(always)]
unsafe fn sum_lanes(acc: &[__m512; 16]) -> __m512 {
    // Macros, not closures: a closure is a function without the target feature, and the
    // intrinsics would stay calls inside it.
    // [x0+x2, x1+x3, y0+y2, y1+y3] in 128-bit lanes.
    macro_rules! pair {
        ($x:expr, $y:expr) => {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>($x, $y),
                _mm512_shuffle_f32x4::<0b11_10_11_10>($x, $y),
            )
        };
    }
    // 128-bit lane i: the four partial sums of accumulator 4i + e.
    macro_rules! quad {
        ($e:expr) => {{
            let (a, b) = (
                pair!(acc[$e], acc[4 + $e]),
                pair!(acc[8 + $e], acc[12 + $e]),
            );
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
            )
        }};
    }
    // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3].
    macro_rules! half {
        ($a:expr, $b:expr) => {
            _mm512_add_ps(_mm512_unpacklo_ps($a, $b), _mm512_unpackhi_ps($a, $b))
        };
    }
    // The last step, within 128-bit lanes, puts sum 4i + e at position e of lane i.
    let (u, v) = (half!(quad!(0), quad!(1)), half!(quad!(2), quad!(3)));
    _mm512_add_ps(
        _mm512_shuffle_ps::<0b01_00_01_00>(u, v),
        _mm512_shuffle_ps::<0b11_10_11_10>(u, v),
    )
}

/// Prefetches `bytes` from `p` into L1.
#[inline(always)]
fn prefetch(p: *const i8, bytes: usize) {
    for line in (0..bytes).step_by(64) {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line)) };
    }
}

/// The softmax update of one KV head's `G` query heads for a block: `s` holds `n` positions'
/// scores (`[j][hh]`, padded to whole vectors of 16 with repeats of real positions), replaced
/// by their weights; `m`, `l` and `o` (`[G, hd]`) are those heads' running maxima, sums and
/// weighted values. Vectorised 16 at a time: score `a` of each 16 is head `a % G`.
#[inline(always)]
fn softmax_block<const G: usize>(
    s: &mut [f32],
    n: usize,
    round: bool,
    m: &mut [f32],
    l: &mut [f32],
    o: &mut [f32],
) {
    let len = s.len();
    let hd = o.len() / G;
    let mut bm = [f32::NEG_INFINITY; 16];
    for x in s.chunks_exact(16) {
        for a in 0..16 {
            bm[a] = bm[a].max(x[a]);
        }
    }
    let mut mv = [0.0f32; 16];
    for hh in 0..G {
        let mut mx = m[hh];
        for a in (hh..16).step_by(G) {
            mx = mx.max(bm[a]);
        }
        if mx > m[hh] {
            // exp(−∞) is not 0 (see `exp`), but o and l are still 0 then.
            let r = exp(m[hh] - mx);
            l[hh] *= r;
            for x in &mut o[hh * hd..(hh + 1) * hd] {
                *x *= r;
            }
            m[hh] = mx;
        }
        for a in (hh..16).step_by(G) {
            mv[a] = mx;
        }
    }
    for x in s.chunks_exact_mut(16) {
        for a in 0..16 {
            x[a] = exp(x[a] - mv[a]);
            if round {
                // Round to nearest even; weights are finite and positive.
                let b = x[a].to_bits();
                x[a] = f32::from_bits((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000);
            }
        }
    }
    s[n * G..len].fill(0.0);
    let mut lv = [0.0f32; 16];
    for x in s.chunks_exact(16) {
        for a in 0..16 {
            lv[a] += x[a];
        }
    }
    for hh in 0..G {
        for a in (hh..16).step_by(G) {
            l[hh] += lv[a];
        }
    }
}

/// The [`Part`] of `G`-query-head groups (`q`: `[kv.heads · G, hd]`) over positions `range`
/// of the cache (`k`, `v`: its rows as stored, `kv` their shape), `P = 16 / G` positions
/// scored at a time.
///
/// # Safety
/// AVX-512 F, and BF16 for [`Bf16Dots`]; `kv.hd % 32 == 0`; `q` holds `kv.heads · G · hd`
/// values and `part` is sized for as many heads; `k` and `v` hold `kv.len` rows of
/// `kv.heads · hd`; `range` is non-empty and within `0..kv.len`.
#[target_feature(enable = "avx512f")]
pub unsafe fn chunk<const G: usize, const P: usize, F: Flavour>(
    q: &[f32],
    kc: &[F::Elem],
    vc: &[F::Elem],
    kv: Kv,
    range: Range<usize>,
    part: &mut Part,
) {
    // SAFETY: the caller's guarantee.
    unsafe { chunk_body::<G, P, F>(q, kc, vc, kv, range, part) }
}

/// [`chunk`] with `vdpbf16ps`.
///
/// # Safety
/// As for [`chunk`], and AVX-512 BW and BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn chunk_bf16<const G: usize, const P: usize>(
    q: &[f32],
    kc: &[u16],
    vc: &[u16],
    kv: Kv,
    range: Range<usize>,
    part: &mut Part,
) {
    // SAFETY: the caller's guarantee.
    unsafe { chunk_body::<G, P, Bf16Dots>(q, kc, vc, kv, range, part) }
}

/// The body of [`chunk`] and [`chunk_bf16`], inlined into each with its target features.
///
/// # Safety
/// As for the callers.
#[inline(always)]
unsafe fn chunk_body<const G: usize, const P: usize, F: Flavour>(
    q: &[f32],
    kc: &[F::Elem],
    vc: &[F::Elem],
    kv: Kv,
    range: Range<usize>,
    part: &mut Part,
) {
    assert!(G * P == 16 && JB.is_multiple_of(P) && JB.is_multiple_of(2));
    let (nkv, hd) = (kv.heads, kv.hd);
    let w = nkv * hd;
    let scale = _mm512_set1_ps(1.0 / (hd as f32).sqrt());
    let row_bytes = w * std::mem::size_of::<F::Elem>();
    let (kp, vp) = (kc.as_ptr(), vc.as_ptr());
    let row = |p: *const F::Elem, j: usize| p.wrapping_add(j * w) as *const i8;

    let qk = F::queries(q);
    part.o.fill(0.0);
    part.m.fill(f32::NEG_INFINITY);
    part.l.fill(0.0);
    // s[g][j][hh] for the block's positions j: scores, then their weights. Positions past
    // the chunk's end are scored on its last row.
    let mut s = vec![0.0f32; nkv * JB * G];

    for j in range.start..(range.start + ROWS_AHEAD).min(range.end) {
        prefetch(row(kp, j), row_bytes);
        prefetch(row(vp, j), row_bytes);
    }
    for b0 in range.clone().step_by(JB) {
        let n = (range.end - b0).min(JB);
        for st in (0..n).step_by(P) {
            let first = b0 + st;
            for j in first + ROWS_AHEAD..(first + P + ROWS_AHEAD).min(range.end) {
                prefetch(row(kp, j), row_bytes);
                prefetch(row(vp, j), row_bytes);
            }
            for g in 0..nkv {
                let mut acc = [_mm512_setzero_ps(); 16];
                let rows: [*const F::Elem; P] = std::array::from_fn(|p| {
                    kp.wrapping_add((first + p).min(range.end - 1) * w + g * hd)
                });
                // SAFETY: rows below kv.len, g·hd + hd ≤ w; qk holds heads · hd values;
                // g·JB·G + st·G + 16 ≤ s.len().
                unsafe {
                    F::score::<G, P>(&mut acc, qk.as_ptr().add(g * G * hd), rows, hd);
                    let sums = _mm512_mul_ps(sum_lanes(&acc), scale);
                    _mm512_storeu_ps(s.as_mut_ptr().add(g * JB * G + st * G), sums);
                }
            }
        }

        let padded = n.div_ceil(P) * P;
        let pairs = n.div_ceil(2) * 2;
        for g in 0..nkv {
            let heads = g * G..(g + 1) * G;
            let sg = &mut s[g * JB * G..(g + 1) * JB * G];
            softmax_block::<G>(
                &mut sg[..padded * G],
                n,
                F::ROUND_WEIGHTS,
                &mut part.m[heads.clone()],
                &mut part.l[heads.clone()],
                &mut part.o[g * G * hd..(g + 1) * G * hd],
            );
            let used = if F::ROUND_WEIGHTS { pairs } else { n };
            // SAFETY: o holds heads · hd values; rows b0 .. b0 + used clamped to range.end − 1;
            // sg holds JB · G ≥ used · G weights, those past n zero.
            unsafe {
                F::weigh::<G>(
                    part.o.as_mut_ptr().add(g * G * hd),
                    vp.add(b0 * w + g * hd),
                    w,
                    used,
                    vp.add((range.end - 1) * w + g * hd),
                    sg,
                    hd,
                );
            }
        }
    }
    let mut t = [0.0f32; 32];
    for b in part.o.chunks_exact_mut(32) {
        t.copy_from_slice(b);
        for (c, x) in b.iter_mut().enumerate() {
            *x = t[F::kernel_col(c)];
        }
    }
}
