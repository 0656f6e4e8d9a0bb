//! AVX-512 softmax attention for one KV head's group of query heads (see
//! `kernels::attention`). Bounds are checked by the caller; each `SAFETY` comment refers to
//! them.

use std::arch::x86_64::*;

use crate::kernels::activation::softmax;
use crate::kernels::attention::KvHead;

/// Positions per block of the value pass: 64 rows of one head (64 KiB at hd 256) stay in L2
/// while every column block of every head's output passes over them.
const JB: usize = 64;
/// Key rows prefetched into L2 ahead of the one being scored (and 4 ahead into L1).
const ROWS_AHEAD: usize = 32;

/// A stored key/value element: f32, or bfloat16 bits widened exactly on load.
pub trait KvElem: Copy {
    /// Values `p[0..16]` as f32.
    ///
    /// # Safety
    /// AVX-512 F; 16 readable elements at `p`.
    unsafe fn load16(p: *const Self) -> __m512;
}

impl KvElem for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> __m512 {
        // SAFETY: the caller's guarantee.
        unsafe { _mm512_loadu_ps(p) }
    }
}

impl KvElem for u16 {
    #[inline(always)]
    unsafe fn load16(p: *const u16) -> __m512 {
        // SAFETY: the caller's guarantee (32 readable bytes).
        let b = unsafe { _mm256_loadu_si256(p as *const __m256i) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(b)))
    }
}

/// `G` query heads (`q`: `[G, hd]`) over one KV head of the cache (`k`, `v`: its rows as
/// stored, `kv` their shape), into `out` (`[G, hd]`).
///
/// Scores: per position, one accumulator per head (G independent FMA chains), the key row
/// loaded once. Values: per block of positions and 32 output columns, `2·G` accumulators held
/// in registers across the block.
///
/// # Safety
/// AVX-512 F; `hd % 32 == 0`; `q` and `out` hold `G·hd`; `k` and `v` hold `len · stride`
/// values; `off + hd ≤ stride`.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f")]
pub unsafe fn attend<const G: usize, E: KvElem>(
    q: &[f32],
    kc: &[E],
    vc: &[E],
    kv: KvHead,
    hd: usize,
    out: &mut [f32],
) {
    let (ctx, kvw, off) = (kv.len, kv.stride, kv.off);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut scores = vec![0.0f32; G * ctx];
    let (qp, kp, vp) = (q.as_ptr(), kc.as_ptr(), vc.as_ptr());
    for j in 0..ctx {
        // SAFETY: row j < ctx, columns off..off + hd inside it; q has G·hd values.
        unsafe {
            let kj = kp.add(j * kvw + off);
            // Rows ahead: they are strided (kvw apart), so the hardware's sequential prefetch
            // sees only part of the pattern, and at long contexts they come from memory (a
            // profile at depth 4096 had half of this kernel waiting on K and V loads with 4
            // rows of distance).
            let near = kj.wrapping_add(4 * kvw) as *const i8;
            let far = kj.wrapping_add(ROWS_AHEAD * kvw) as *const i8;
            for line in (0..hd * std::mem::size_of::<E>()).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(near.wrapping_add(line));
                _mm_prefetch::<_MM_HINT_T1>(far.wrapping_add(line));
            }
            let mut acc = [_mm512_setzero_ps(); G];
            for c in (0..hd).step_by(16) {
                let kv = E::load16(kj.add(c));
                for h in 0..G {
                    acc[h] = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(h * hd + c)), kv, acc[h]);
                }
            }
            for h in 0..G {
                scores[h * ctx + j] = _mm512_reduce_add_ps(acc[h]) * scale;
            }
        }
    }
    for h in 0..G {
        softmax(&mut scores[h * ctx..(h + 1) * ctx]);
    }
    out.fill(0.0);
    let op = out.as_mut_ptr();
    for j0 in (0..ctx).step_by(JB) {
        let j1 = (j0 + JB).min(ctx);
        for c in (0..hd).step_by(32) {
            // SAFETY: out has G·hd values and c + 32 ≤ hd; rows j < ctx; scores has G·ctx.
            unsafe {
                let mut acc: [[__m512; 2]; G] = std::array::from_fn(|h| {
                    [
                        _mm512_loadu_ps(op.add(h * hd + c)),
                        _mm512_loadu_ps(op.add(h * hd + c + 16)),
                    ]
                });
                for j in j0..j1 {
                    let vj = vp.add(j * kvw + off + c);
                    if c == 0 {
                        // The next block's value rows, while this block's first columns pass.
                        let ahead = vp.wrapping_add((j + JB) * kvw + off) as *const i8;
                        for line in (0..hd * std::mem::size_of::<E>()).step_by(64) {
                            _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(line));
                        }
                    }
                    let (v0, v1) = (E::load16(vj), E::load16(vj.add(16)));
                    for h in 0..G {
                        let p = _mm512_set1_ps(*scores.get_unchecked(h * ctx + j));
                        acc[h][0] = _mm512_fmadd_ps(p, v0, acc[h][0]);
                        acc[h][1] = _mm512_fmadd_ps(p, v1, acc[h][1]);
                    }
                }
                for h in 0..G {
                    _mm512_storeu_ps(op.add(h * hd + c), acc[h][0]);
                    _mm512_storeu_ps(op.add(h * hd + c + 16), acc[h][1]);
                }
            }
        }
    }
}
