//! The gated delta rule of one value head (spec §7.4–§7.5), in f32, continuing from a carried
//! state `S` of shape `[dk, dv]` (row-major):
//!
//! `S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ`, `o_t = S_tᵀ q_t`, `α_t = exp(g_t)`.
//!
//! `q` must already be l2-normalised and scaled by `dk^−½`, `k` l2-normalised.
//! [`recurrent`] is the token-by-token form (decode, and the test oracle); [`chunked`] processes
//! chunks of [`CHUNK`] tokens with matrix products inside each chunk (prefill).

use super::activation::exp;
use super::gemm_f32::{gemm_acc, View};
use multiversion::multiversion;

pub const CHUNK: usize = 64;

/// Log-decays below this are taken as decays of 0 (see [`decay_factor`]).
const DECAY_CUTOFF: f32 = -64.0;

/// `eˣ` for a log-decay `x ≤ 0`, zero below e⁻⁶⁴ (≈ 1.6·10⁻²⁸). Decays that small scale
/// their terms far below the f32 resolution of the O(1) values they are added to, but times
/// small values they give subnormal numbers, which Intel cores compute ~100× slower (with
/// strongly decaying heads, most of a prefill's time went there).
#[inline(always)]
fn decay_factor(x: f32) -> f32 {
    if x < DECAY_CUTOFF {
        0.0
    } else {
        exp(x)
    }
}

/// Inputs of one head for `n` tokens: `q`, `k` are `[n, dk]`, `v` is `[n, dv]`, `g`, `beta` are `[n]`.
pub struct HeadInputs<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub g: &'a [f32],
    pub beta: &'a [f32],
    pub dk: usize,
    pub dv: usize,
}

/// How far ahead, in f32 values, [`recurrent`] prefetches the state it reads: 16 KiB. A
/// decode step streams each head's 64 KiB state from memory, and the caller's heads lie one
/// after another, so past this head's end the prefetches run into the state read next.
/// On a machine whose hardware prefetchers do little (Emerald Rapids, see `x86::bf16dot`'s
/// `STREAM_LEAD`), the rule's part of a decode step went from 7.35–8.76 to 6.95–7.36 ms with
/// them (32-expert FP8 checkpoint, `bench --profile`, 6 alternating pairs, median 1.12×;
/// its share of the step 3.6–3.9 % → 3.1–3.3 %).
const STATE_LEAD: usize = 4 << 10;

/// Hints the `n` values at `p` into L2; a hint only, for an address anywhere.
#[inline(always)]
fn prefetch(p: *const f32, n: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..n).step_by(16) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        // SAFETY: a prefetch never faults and reads nothing, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(line).cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, n);
}

/// Token-by-token recurrence; writes `o` (`[n, dv]`) and updates `state`.
///
/// One read of the state and one read-modify-write per token: the decay is folded into the
/// prediction (Sᵀk of the decayed state is α·Sᵀk), and the output needs no third pass, since
/// `o = S_newᵀ q = α Sᵀq + (k·q) d` with `d = β (v − α Sᵀk)` and `S_new = α S + k dᵀ`. Decode
/// is bound by this state traffic (2 MiB per DeltaNet layer from memory), not by arithmetic.
pub fn recurrent(x: &HeadInputs, state: &mut [f32], o: &mut [f32]) {
    recurrent_from(x, None, state, o);
}

/// [`recurrent`] starting from the state `from` when given (left as it is), else from
/// `state`; the result goes to `state` either way, with the same bits. A speculative step
/// runs this way so that the state it started from stays for a rollback
/// (`cache::rollback`), at no more memory traffic than updating in place.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn recurrent_from(x: &HeadInputs, from: Option<&[f32]>, state: &mut [f32], o: &mut [f32]) {
    let (dk, dv) = (x.dk, x.dv);
    let (mut d, mut sq) = (vec![0.0f32; dv], vec![0.0f32; dv]);
    for t in 0..x.g.len() {
        let (q, k, v) = (
            &x.q[t * dk..(t + 1) * dk],
            &x.k[t * dk..(t + 1) * dk],
            &x.v[t * dv..(t + 1) * dv],
        );
        // libm's eˣ, as this form always used (one call per token, nothing to vectorise);
        // only the cutoff of `decay_factor` is new.
        let alpha = if x.g[t] < DECAY_CUTOFF {
            0.0
        } else {
            x.g[t].exp()
        };
        let source = if t == 0 { from } else { None };
        d.fill(0.0);
        sq.fill(0.0);
        {
            let old: &[f32] = source.unwrap_or(state);
            for (i, ((row, &ki), &qi)) in old.chunks_exact(dv).zip(k).zip(q).enumerate() {
                prefetch(old.as_ptr().wrapping_add(i * dv + STATE_LEAD), dv);
                for ((dj, sj), &s) in d.iter_mut().zip(sq.iter_mut()).zip(row) {
                    *dj += ki * s;
                    *sj += qi * s;
                }
            }
        }
        let kq: f32 = k.iter().zip(q).map(|(a, b)| a * b).sum();
        let b = x.beta[t];
        for (di, &vi) in d.iter_mut().zip(v) {
            *di = b * (vi - alpha * *di);
        }
        for ((ot, &s), &di) in o[t * dv..(t + 1) * dv].iter_mut().zip(&sq).zip(&d) {
            *ot = alpha * s + kq * di;
        }
        match source {
            Some(old) => {
                for ((row, old_row), &ki) in
                    state.chunks_exact_mut(dv).zip(old.chunks_exact(dv)).zip(k)
                {
                    for ((s, &so), &dj) in row.iter_mut().zip(old_row).zip(&d) {
                        *s = alpha * so + ki * dj;
                    }
                }
            }
            None => {
                for (row, &ki) in state.chunks_exact_mut(dv).zip(k) {
                    for (s, &dj) in row.iter_mut().zip(&d) {
                        *s = alpha * *s + ki * dj;
                    }
                }
            }
        }
    }
}

/// Chunked form: within a chunk of `c` tokens with cumulative log-decay `G` and entering state
/// `S₀`, the corrected values solve `(I + L) U = β ⊙ (V − γ ⊙ K S₀)` with
/// `L[i,j] = β_i e^{G_i−G_j} k_i·k_j` (i > j), a unit lower-triangular system solved by forward
/// substitution; then `O = γ ⊙ Q S₀ + ((Q Kᵀ) ⊙ D) U` and `S ← γ_last S₀ + (K ⊙ e^{G_last−G})ᵀ U`.
/// Mathematically identical to [`recurrent`] (derivation in spec §7.5).
///
/// Every product is a [`gemm_acc`] over cache-resident chunk matrices, so the work runs at
/// matrix-product speed rather than at the speed of row-by-row `axpy`s.
pub fn chunked(x: &HeadInputs, state: &mut [f32], o: &mut [f32]) {
    let (dk, dv) = (x.dk, x.dv);
    let n = x.g.len();
    // Products over the chunk's tokens as columns (`K Kᵀ`, `Q Kᵀ`) run over all CHUNK columns,
    // zero past `c`, so that their width is whole vectors even for a short last chunk.
    let mut gcum = [0.0f32; CHUNK];
    let mut kt = vec![0.0f32; dk * CHUNK]; // Kᵀ, [dk, CHUNK]
    let mut ks0 = vec![0.0f32; CHUNK * dv]; // K S₀
    let mut u = vec![0.0f32; CHUNK * dv];
    let mut kk = vec![0.0f32; CHUNK * CHUNK]; // K Kᵀ, then L
    let mut qk = vec![0.0f32; CHUNK * CHUNK]; // Q Kᵀ, then its decayed lower triangle
    let mut decay = vec![0.0f32; CHUNK * CHUNK]; // e^{G_i − G_j}, j ≤ i
    let mut start = 0;
    while start < n {
        let c = (n - start).min(CHUNK);
        let q = &x.q[start * dk..(start + c) * dk];
        let k = &x.k[start * dk..(start + c) * dk];
        let v = &x.v[start * dv..(start + c) * dv];
        let beta = &x.beta[start..start + c];
        let mut acc = 0.0f32;
        for (i, &g) in x.g[start..start + c].iter().enumerate() {
            acc += g;
            gcum[i] = acc;
        }
        let gc = &gcum[..c];
        decay_matrix(gc, &mut decay);
        kt.fill(0.0);
        for (j, kj) in k.chunks_exact(dk).enumerate() {
            for (r, &kr) in kj.iter().enumerate() {
                kt[r * CHUNK + j] = kr;
            }
        }

        // Right-hand side: β_i (v_i − γ_i S₀ᵀ k_i).
        ks0[..c * dv].fill(0.0);
        gemm_acc(c, dv, dk, View::rows(k, dk), state, dv, &mut ks0, dv);
        for i in 0..c {
            let gamma = decay_factor(gc[i]);
            let (ui, wi, vi) = (
                &mut u[i * dv..(i + 1) * dv],
                &ks0[i * dv..(i + 1) * dv],
                &v[i * dv..(i + 1) * dv],
            );
            for ((uj, &wj), &vj) in ui.iter_mut().zip(wi).zip(vi) {
                *uj = beta[i] * (vj - gamma * wj);
            }
        }
        // L = β_i e^{G_i−G_j} k_i·k_j below the diagonal, then forward substitution
        // U_i −= Σ_{j<i} L[i,j] U_j, one row at a time (each needs the rows before it).
        kk[..c * CHUNK].fill(0.0);
        gemm_acc(c, CHUNK, dk, View::rows(k, dk), &kt, CHUNK, &mut kk, CHUNK);
        for i in 1..c {
            let row = &mut kk[i * CHUNK..i * CHUNK + i];
            for (j, l) in row.iter_mut().enumerate() {
                *l *= -beta[i] * decay[i * CHUNK + j];
            }
            let (done, rest) = u.split_at_mut(i * dv);
            gemm_acc(1, dv, i, View::rows(row, i), done, dv, &mut rest[..dv], dv);
        }
        // Outputs: γ_i S₀ᵀ q_i + Σ_{j≤i} e^{G_i−G_j} (q_i·k_j) U_j.
        let oc = &mut o[start * dv..(start + c) * dv];
        oc.fill(0.0);
        gemm_acc(c, dv, dk, View::rows(q, dk), state, dv, oc, dv);
        for (i, oi) in oc.chunks_exact_mut(dv).enumerate() {
            let gamma = decay_factor(gc[i]);
            oi.iter_mut().for_each(|x| *x *= gamma);
        }
        qk[..c * CHUNK].fill(0.0);
        gemm_acc(c, CHUNK, dk, View::rows(q, dk), &kt, CHUNK, &mut qk, CHUNK);
        for i in 0..c {
            let row = &mut qk[i * CHUNK..(i + 1) * CHUNK];
            for (j, a) in row.iter_mut().enumerate() {
                *a = if j <= i {
                    *a * decay[i * CHUNK + j]
                } else {
                    0.0
                };
            }
        }
        gemm_acc(c, dv, c, View::rows(&qk, CHUNK), &u, dv, oc, dv);
        // State for the next chunk: γ_last S₀ + Σ_j e^{G_last−G_j} k_j U_jᵀ, with the weights
        // folded into Kᵀ.
        let glast = gc[c - 1];
        let d = decay_factor(glast);
        state.iter_mut().for_each(|s| *s *= d);
        let mut w = [0.0f32; CHUNK];
        for (wj, &g) in w.iter_mut().zip(gc) {
            *wj = decay_factor(glast - g);
        }
        for row in kt.chunks_exact_mut(CHUNK) {
            for (kr, &wj) in row.iter_mut().zip(&w) {
                *kr *= wj;
            }
        }
        gemm_acc(dk, dv, c, View::rows(&kt, CHUNK), &u, dv, state, dv);
        start += c;
    }
}

/// `d[i·CHUNK + j] = e^{G_i − G_j}` for `j ≤ i` (the decay from token j to token i within a
/// chunk; ≤ 1 since the log-decays are ≤ 0).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn decay_matrix(gc: &[f32], d: &mut [f32]) {
    for (i, &gi) in gc.iter().enumerate() {
        for (dj, &gj) in d[i * CHUNK..i * CHUNK + i + 1].iter_mut().zip(gc) {
            *dj = decay_factor(gi - gj);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator, so the test needs no dependency.
    fn rng(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn normed(v: &mut [f32], d: usize, scale: f32) {
        for row in v.chunks_mut(d) {
            let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x *= scale / n);
        }
    }

    #[test]
    fn chunked_equals_recurrent_from_a_nonzero_state() {
        // A small head (the plain-loop products) and the model's (whole-vector tiles).
        for (n, dk, dv) in [(150, 16, 8), (150, 128, 128)] {
            check_chunked(n, dk, dv);
        }
    }

    fn check_chunked(n: usize, dk: usize, dv: usize) {
        let mut s = 7u64;
        let mut q: Vec<f32> = (0..n * dk).map(|_| rng(&mut s)).collect();
        let mut k: Vec<f32> = (0..n * dk).map(|_| rng(&mut s)).collect();
        normed(&mut q, dk, (dk as f32).powf(-0.5));
        normed(&mut k, dk, 1.0);
        let v: Vec<f32> = (0..n * dv).map(|_| rng(&mut s)).collect();
        let g: Vec<f32> = (0..n).map(|_| -0.3 * (rng(&mut s) + 1.0)).collect();
        let beta: Vec<f32> = (0..n).map(|_| 0.5 + 0.49 * rng(&mut s)).collect();
        let s0: Vec<f32> = (0..dk * dv).map(|_| rng(&mut s)).collect();
        let x = HeadInputs {
            q: &q,
            k: &k,
            v: &v,
            g: &g,
            beta: &beta,
            dk,
            dv,
        };

        let (mut sa, mut sb) = (s0.clone(), s0);
        let (mut oa, mut ob) = (vec![0.0; n * dv], vec![0.0; n * dv]);
        recurrent(&x, &mut sa, &mut oa);
        chunked(&x, &mut sb, &mut ob);
        // Both are f32 with different summation orders over ≤ 150 steps: agreement to ~1e-5
        // relative to values of order 1 is what rounding allows.
        let err = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max)
        };
        let (eo, es) = (err(&oa, &ob), err(&sa, &sb));
        assert!(eo < 2e-5, "{dk}x{dv}: outputs differ by {eo}");
        assert!(es < 2e-5, "{dk}x{dv}: states differ by {es}");
        assert!(oa.iter().map(|x| x.abs()).fold(0.0f32, f32::max) > 0.1);
    }
}
