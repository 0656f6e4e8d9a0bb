//! The gated delta rule of one value head (spec §7.4–§7.5), in f32, continuing from a carried
//! state `S` of shape `[dk, dv]` (row-major):
//!
//! `S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ`, `o_t = S_tᵀ q_t`, `α_t = exp(g_t)`.
//!
//! `q` must already be l2-normalised and scaled by `dk^−½`, `k` l2-normalised.
//! [`recurrent`] is the token-by-token form (decode, and the test oracle); [`chunked`] processes
//! chunks of [`CHUNK`] tokens with matrix products inside each chunk (prefill).

use super::matmul::{axpy, dot};
use multiversion::multiversion;

pub const CHUNK: usize = 64;

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

/// Token-by-token recurrence; writes `o` (`[n, dv]`) and updates `state`.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn recurrent(x: &HeadInputs, state: &mut [f32], o: &mut [f32]) {
    let (dk, dv) = (x.dk, x.dv);
    let mut d = vec![0.0f32; dv];
    for t in 0..x.g.len() {
        let (q, k, v) = (
            &x.q[t * dk..(t + 1) * dk],
            &x.k[t * dk..(t + 1) * dk],
            &x.v[t * dv..(t + 1) * dv],
        );
        let alpha = x.g[t].exp();
        // Two passes over the state instead of three: the decay is folded into the
        // prediction (Sᵀk of the decayed state = α·Sᵀk) and into the update.
        d.fill(0.0);
        for (i, &ki) in k.iter().enumerate() {
            axpy(&mut d, ki, &state[i * dv..(i + 1) * dv]);
        }
        // d = β (v − α Sᵀk)
        let b = x.beta[t];
        for (di, &vi) in d.iter_mut().zip(v) {
            *di = b * (vi - alpha * *di);
        }
        // S ← α S + k dᵀ, then o = Sᵀq with the updated rows.
        let ot = &mut o[t * dv..(t + 1) * dv];
        ot.fill(0.0);
        for (i, &ki) in k.iter().enumerate() {
            let row = &mut state[i * dv..(i + 1) * dv];
            for (s, &dj) in row.iter_mut().zip(d.iter()) {
                *s = alpha * *s + ki * dj;
            }
            axpy(ot, q[i], row);
        }
    }
}

/// Chunked form: within a chunk of `c` tokens with cumulative log-decay `G` and entering state
/// `S₀`, the corrected values solve `(I + L) U = β ⊙ (V − γ ⊙ K S₀)` with
/// `L[i,j] = β_i e^{G_i−G_j} k_i·k_j` (i > j), a unit lower-triangular system solved by forward
/// substitution; then `O = γ ⊙ Q S₀ + ((Q Kᵀ) ⊙ D) U` and `S ← γ_last S₀ + (K ⊙ e^{G_last−G})ᵀ U`.
/// Mathematically identical to [`recurrent`] (derivation in spec §7.5).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn chunked(x: &HeadInputs, state: &mut [f32], o: &mut [f32]) {
    let (dk, dv) = (x.dk, x.dv);
    let n = x.g.len();
    let mut gcum = vec![0.0f32; CHUNK];
    let mut u = vec![0.0f32; CHUNK * dv];
    let mut kk = vec![0.0f32; CHUNK * CHUNK];
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

        // Right-hand side: β_i (v_i − γ_i S₀ᵀ k_i).
        for i in 0..c {
            let ui = &mut u[i * dv..(i + 1) * dv];
            ui.fill(0.0);
            for (r, &kr) in k[i * dk..(i + 1) * dk].iter().enumerate() {
                axpy(ui, kr, &state[r * dv..(r + 1) * dv]);
            }
            let gamma = gc[i].exp();
            for (uj, &vj) in ui.iter_mut().zip(&v[i * dv..(i + 1) * dv]) {
                *uj = beta[i] * (vj - gamma * *uj);
            }
        }
        // k_i·k_j for j < i, then forward substitution U_i −= Σ_{j<i} L[i,j] U_j.
        for i in 0..c {
            for j in 0..i {
                kk[i * CHUNK + j] = dot(&k[i * dk..(i + 1) * dk], &k[j * dk..(j + 1) * dk]);
            }
        }
        for i in 1..c {
            let (done, rest) = u.split_at_mut(i * dv);
            let ui = &mut rest[..dv];
            for j in 0..i {
                let l = beta[i] * (gc[i] - gc[j]).exp() * kk[i * CHUNK + j];
                axpy(ui, -l, &done[j * dv..(j + 1) * dv]);
            }
        }
        // Outputs: γ_i S₀ᵀ q_i + Σ_{j≤i} e^{G_i−G_j} (q_i·k_j) U_j.
        for i in 0..c {
            let oi = &mut o[(start + i) * dv..(start + i + 1) * dv];
            oi.fill(0.0);
            let qi = &q[i * dk..(i + 1) * dk];
            for (r, &qr) in qi.iter().enumerate() {
                axpy(oi, qr, &state[r * dv..(r + 1) * dv]);
            }
            let gamma = gc[i].exp();
            for x in oi.iter_mut() {
                *x *= gamma;
            }
            for j in 0..=i {
                let a = (gc[i] - gc[j]).exp() * dot(qi, &k[j * dk..(j + 1) * dk]);
                axpy(oi, a, &u[j * dv..(j + 1) * dv]);
            }
        }
        // State for the next chunk.
        let glast = gc[c - 1];
        let decay = glast.exp();
        for s in state.iter_mut() {
            *s *= decay;
        }
        for j in 0..c {
            let w = (glast - gc[j]).exp();
            let uj = &u[j * dv..(j + 1) * dv];
            for (r, &kr) in k[j * dk..(j + 1) * dk].iter().enumerate() {
                axpy(&mut state[r * dv..(r + 1) * dv], w * kr, uj);
            }
        }
        start += c;
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
        let (n, dk, dv) = (150, 16, 8);
        let mut s = 7u64;
        let mut q: Vec<f32> = (0..n * dk).map(|_| rng(&mut s)).collect();
        let mut k: Vec<f32> = (0..n * dk).map(|_| rng(&mut s)).collect();
        normed(&mut q, dk, 0.25);
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
        assert!(err(&oa, &ob) < 2e-5, "outputs differ by {}", err(&oa, &ob));
        assert!(err(&sa, &sb) < 2e-5, "states differ by {}", err(&sa, &sb));
        assert!(oa.iter().map(|x| x.abs()).fold(0.0f32, f32::max) > 0.1);
    }
}
