//! Sparse MoE block (spec §10): softmax over all experts in f32, top-k, optional
//! renormalisation, plus a shared expert scaled by a per-token sigmoid gate. Tokens of the
//! whole batch are grouped by expert so every selected expert's weights are read once.

use anyhow::Result;

use super::mlp::SwiGlu;
use super::Step;
use crate::checkpoint::{Checkpoint, Matrix};
use crate::config::{Config, Fp8Config};
use crate::kernels::activation::{sigmoid, softmax, swiglu};
use crate::kernels::matmul::{axpy, matmul, products, Job, Precision};
use crate::kernels::pool;
use crate::kernels::profile::{Kind, Span};

/// Tokens in a step from which the MoE's copies run on every thread.
const SPREAD_TOKENS: usize = 16;

/// `f(i, &mut items[i])` for every item: over the pool when `spread`.
fn each<T: Send>(items: &mut [T], spread: bool, f: &(dyn Fn(usize, &mut T) + Sync)) {
    if spread {
        pool::for_each_chunk(items, 1, &|i, c| f(i, &mut c[0]));
    } else {
        for (i, it) in items.iter_mut().enumerate() {
            f(i, it);
        }
    }
}

pub struct Moe {
    router: Matrix,
    experts: Vec<SwiGlu>,
    shared: Option<SwiGlu>,
    shared_gate: Option<Matrix>,
    top_k: usize,
    norm_topk_prob: bool,
}

impl Moe {
    /// `prefix` is e.g. `model.layers.0.mlp.`.
    pub fn load(
        ck: &Checkpoint,
        prefix: &str,
        cfg: &Config,
        fp8: Option<&Fp8Config>,
    ) -> Result<Moe> {
        let h = cfg.hidden_size;
        let router = Matrix::load(ck, &format!("{prefix}gate.weight"), cfg.num_experts, h, fp8)?;
        // The experts one by one (Qwen3-Next, the FP8 releases) or stacked in two 3-D
        // tensors (the Qwen3.5 / 3.6 BF16 releases), whichever the layer has.
        let (n, inter) = (cfg.num_experts, cfg.moe_intermediate_size);
        let fused = ck.contains(&format!("{prefix}experts.gate_up_proj"));
        let experts = (0..n)
            .map(|e| {
                if fused {
                    SwiGlu::load_fused(ck, &format!("{prefix}experts."), n, e, h, inter)
                } else {
                    SwiGlu::load(ck, &format!("{prefix}experts.{e}."), h, inter, fp8)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let (shared, shared_gate) = if cfg.shared_expert_intermediate_size > 0 {
            (
                Some(SwiGlu::load(
                    ck,
                    &format!("{prefix}shared_expert."),
                    h,
                    cfg.shared_expert_intermediate_size,
                    fp8,
                )?),
                Some(Matrix::load(
                    ck,
                    &format!("{prefix}shared_expert_gate.weight"),
                    1,
                    h,
                    fp8,
                )?),
            )
        } else {
            (None, None)
        };
        Ok(Moe {
            router,
            experts,
            shared,
            shared_gate,
            top_k: cfg.num_experts_per_tok,
            norm_topk_prob: cfg.norm_topk_prob,
        })
    }

    /// `x` is `[t, hidden]`; returns `[t, hidden]`. `bulk` marks prompt-chunk tokens
    /// (`matmul::Job::bulk`); each expert's gathered rows keep their tokens' marks.
    pub fn forward(&self, x: &[f32], t: usize, step: Step) -> Vec<f32> {
        let (p, bulk) = (step.precision, step.bulk);
        let h = self.router.cols;
        let e_count = self.experts.len();
        let router = Span::new(Kind::MoeRouter);
        // The router stays exact: it is small, and rounding could flip close expert choices.
        let mut probs = matmul(x, t, &self.router, Precision::Exact);
        // For each expert, the (token, weight) pairs routed to it.
        let mut routes: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e_count];
        let mut order: Vec<usize> = Vec::with_capacity(e_count);
        for ti in 0..t {
            let p = &mut probs[ti * e_count..(ti + 1) * e_count];
            softmax(p);
            order.clear();
            order.extend(0..e_count);
            // Highest probability first; ties go to the lower expert index, as torch.topk does
            // on CPU for equal values in practice. A total order, so selecting the top k and
            // sorting only those gives exactly what sorting all would (512 experts per token
            // made the full sort a visible share of prefill).
            let by_prob = |&a: &usize, &b: &usize| p[b].total_cmp(&p[a]).then(a.cmp(&b));
            let k = self.top_k.min(e_count);
            if k < e_count {
                order.select_nth_unstable_by(k, by_prob);
            }
            order[..k].sort_by(by_prob);
            let chosen = &order[..k];
            let sum: f32 = chosen.iter().map(|&e| p[e]).sum();
            for &e in chosen {
                let w = if self.norm_topk_prob {
                    p[e] / sum
                } else {
                    p[e]
                };
                routes[e].push((ti, w));
            }
        }
        drop(router);
        let copies = Span::new(Kind::MoeCopies);
        let mut out = vec![0.0f32; t * h];
        // Gather each selected expert's tokens, then run every gate/up projection (and the
        // shared expert's) in one dispatch, and every down projection in a second.
        let active: Vec<usize> = (0..e_count).filter(|&e| !routes[e].is_empty()).collect();
        crate::kernels::profile::add_expert_bytes(
            active.iter().map(|&e| self.experts[e].bytes()).sum(),
        );
        // Prompt chunks gather, activate and combine on every thread: at hundreds of tokens
        // these copies are a tenth of the layer, and on one thread the others would wait.
        // Decode keeps them on the calling thread (a dispatch costs more than the work).
        let spread = t >= SPREAD_TOKENS;
        let mut xs: Vec<Vec<f32>> = vec![Vec::new(); active.len()];
        let gather = |i: usize, dst: &mut Vec<f32>| {
            let r = &routes[active[i]];
            dst.reserve_exact(r.len() * h);
            for &(ti, _) in r {
                dst.extend_from_slice(&x[ti * h..(ti + 1) * h]);
            }
        };
        each(&mut xs, spread, &gather);
        let marks: Vec<Vec<bool>> = active
            .iter()
            .map(|&e| {
                if bulk.is_empty() || !self.blocked_experts() {
                    Vec::new()
                } else {
                    routes[e].iter().map(|&(ti, _)| bulk[ti]).collect()
                }
            })
            .collect();
        drop(copies);
        let gate_up = Span::new(Kind::MoeGateUp);
        let mut jobs: Vec<Job> = Vec::new();
        for (i, &e) in active.iter().enumerate() {
            let m = routes[e].len();
            jobs.push(Job::new(&xs[i], m, &self.experts[e].gate).bulk(&marks[i]));
            jobs.push(Job::new(&xs[i], m, &self.experts[e].up).bulk(&marks[i]));
        }
        if let (Some(s), Some(g)) = (&self.shared, &self.shared_gate) {
            jobs.push(step.job(x, t, &s.gate));
            jobs.push(step.job(x, t, &s.up));
            jobs.push(step.job(x, t, g));
        }
        let gu = products(&jobs, p);
        drop(gate_up);
        let copies = Span::new(Kind::MoeCopies);
        let mut hs: Vec<Vec<f32>> =
            vec![Vec::new(); active.len() + usize::from(self.shared.is_some())];
        each(&mut hs, spread, &|i, h| {
            *h = swiglu(&gu[2 * i], &gu[2 * i + 1])
        });
        drop(copies);
        let down = Span::new(Kind::MoeDown);
        let mut jobs: Vec<Job> = Vec::new();
        for (i, &e) in active.iter().enumerate() {
            jobs.push(Job::new(&hs[i], routes[e].len(), &self.experts[e].down).bulk(&marks[i]));
        }
        if let Some(s) = &self.shared {
            jobs.push(step.job(&hs[active.len()], t, &s.down));
        }
        let downs = products(&jobs, p);
        drop(down);
        let copies = Span::new(Kind::MoeCopies);
        // Each token's contributions in ascending expert order, then the shared expert's: the
        // order of additions depends only on the token's own choices.
        let k = self.top_k.min(e_count);
        let mut slots = vec![(0u32, 0u32, 0.0f32); t * k];
        let mut filled = vec![0usize; t];
        for (i, &e) in active.iter().enumerate() {
            for (r, &(ti, w)) in routes[e].iter().enumerate() {
                slots[ti * k + filled[ti]] = (i as u32, r as u32, w);
                filled[ti] += 1;
            }
        }
        let shared = self
            .shared
            .is_some()
            .then(|| (&gu[2 * active.len() + 2], &downs[active.len()]));
        let combine = |t0: usize, rows: &mut [f32]| {
            for (n, o) in rows.chunks_exact_mut(h).enumerate() {
                let ti = t0 + n;
                for &(i, r, w) in &slots[ti * k..ti * k + filled[ti]] {
                    let (i, r) = (i as usize, r as usize);
                    axpy(o, w, &downs[i][r * h..(r + 1) * h]);
                }
                if let Some((g, y)) = shared {
                    axpy(o, sigmoid(g[ti]), &y[ti * h..(ti + 1) * h]);
                }
            }
        };
        if spread {
            let per = t.div_ceil(4 * pool::global().threads());
            pool::for_each_chunk(&mut out, per * h, &|c, rows| combine(c * per, rows));
        } else {
            combine(0, &mut out);
        }
        drop(copies);
        out
    }

    /// Whether prompt-chunk tokens take the blocked kernel in the routed experts too. It packs
    /// each weight panel before use, which pays from a few dozen tokens per expert on: with
    /// 32 experts (top 10) each sees ~80 of a 256-token chunk; with the real model's 512 it
    /// sees ~5, where the dot-product kernels measured 1.3× faster (pp512 of a 512-expert
    /// checkpoint on a Zen 5 core: 460 against 600 tokens/s). On AMX tiles a step costs the
    /// same for 1 to 16 tokens, where each token costs the dot products two `vdpbf16ps` per
    /// 64 weights, so there the experts always take the tiles (512 experts, 4 layers, on an
    /// Emerald Rapids core: pp512 310 against 228 tokens/s). A property of the model and the
    /// CPU, not of the batch, so a sequence's results still do not depend on what else is
    /// batched.
    fn blocked_experts(&self) -> bool {
        self.experts.len() <= 8 * self.top_k || crate::kernels::isa::amx()
    }

    /// Bytes of all experts, and bytes read per token (router, top-k experts, shared expert).
    pub fn bytes(&self) -> (usize, usize) {
        let per_expert = self.experts.first().map_or(0, SwiGlu::bytes);
        let fixed = self.router.bytes()
            + self.shared.as_ref().map_or(0, SwiGlu::bytes)
            + self.shared_gate.as_ref().map_or(0, Matrix::bytes);
        (
            fixed + per_expert * self.experts.len(),
            fixed + per_expert * self.top_k,
        )
    }
}
