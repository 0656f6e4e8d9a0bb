//! Gated attention ("self_attn", spec §8): per-head query/gate split, zero-centred q/k norms,
//! partial RoPE, GQA over the K/V cache, sigmoid output gate, o_proj.

use anyhow::Result;
use std::ops::Range;
use std::sync::Mutex;

use super::Step;
use crate::cache::LayerState;
use crate::checkpoint::{Checkpoint, Matrix};
use crate::config::{Config, Fp8Config};
use crate::kernels::activation::sigmoid;
use crate::kernels::attention::{attend_chunk, attend_prompt, Kv, Paged, Part};
use crate::kernels::matmul::products;
use crate::kernels::norm::rms_norm_zc;
use crate::kernels::profile::{time, Kind, Span};
use crate::kernels::rope::Rope;
use crate::kernels::{pool, split};

pub struct Attention {
    q_proj: Matrix,
    k_proj: Matrix,
    v_proj: Matrix,
    o_proj: Matrix,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
}

impl Attention {
    /// `prefix` is e.g. `model.layers.3.self_attn.`.
    pub fn load(
        ck: &Checkpoint,
        prefix: &str,
        cfg: &Config,
        fp8: Option<&Fp8Config>,
    ) -> Result<Attention> {
        let (h, nh, nkv, hd) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let norm = |name: &str| -> Result<Vec<f32>> {
            let t = ck.get(&format!("{prefix}{name}"))?;
            t.expect_shape(&[hd])?;
            t.to_f32()
        };
        Ok(Attention {
            q_proj: Matrix::load(ck, &format!("{prefix}q_proj.weight"), 2 * nh * hd, h, fp8)?,
            k_proj: Matrix::load(ck, &format!("{prefix}k_proj.weight"), nkv * hd, h, fp8)?,
            v_proj: Matrix::load(ck, &format!("{prefix}v_proj.weight"), nkv * hd, h, fp8)?,
            o_proj: Matrix::load(ck, &format!("{prefix}o_proj.weight"), h, nh * hd, fp8)?,
            q_norm: norm("q_norm.weight")?,
            k_norm: norm("k_norm.weight")?,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            eps: cfg.rms_norm_eps,
        })
    }

    pub fn bytes(&self) -> usize {
        self.q_proj.bytes() + self.k_proj.bytes() + self.v_proj.bytes() + self.o_proj.bytes()
    }

    /// Only the keys and values of `x` (normed input `[t, hidden]`), appended to each
    /// sequence's cache: all the MTP layer needs of the tokens it will not draft from.
    pub fn append_kv(
        &self,
        x: &[f32],
        t: usize,
        seqs: &mut [(Range<usize>, &mut LayerState)],
        starts: &[usize],
        rope: &Rope,
        step: Step,
    ) {
        let mut kv = time(Kind::AttnProj, || {
            products(
                &[step.job(x, t, &self.k_proj), step.job(x, t, &self.v_proj)],
                step.precision,
            )
        });
        let v_new = kv.pop().unwrap_or_default();
        let mut k_new = kv.pop().unwrap_or_default();
        let _core = Span::new(Kind::AttnCore);
        self.push_kv(&mut k_new, &v_new, seqs, starts, rope);
    }

    /// Keys normed and rotated, then keys and values appended to each sequence's cache.
    fn push_kv(
        &self,
        k_new: &mut [f32],
        v_new: &[f32],
        seqs: &mut [(Range<usize>, &mut LayerState)],
        starts: &[usize],
        rope: &Rope,
    ) {
        let hd = self.head_dim;
        let kvw = self.kv_heads * hd;
        let half = rope.rotary_dim / 2;
        let (mut cos, mut sin) = (vec![0.0f32; half], vec![0.0f32; half]);
        for ((rows, state), &start) in seqs.iter_mut().zip(starts) {
            let LayerState::Full(kv) = &mut **state else {
                unreachable!("attention layer given a DeltaNet cache");
            };
            for (i, ti) in rows.clone().enumerate() {
                rope.cos_sin(start + i, &mut cos, &mut sin);
                let kt = &mut k_new[ti * kvw..(ti + 1) * kvw];
                rms_norm_zc(kt, &self.k_norm, self.eps);
                for head in kt.chunks_mut(hd) {
                    rope.apply(head, &cos, &sin);
                }
                kv.push(kt, &v_new[ti * kvw..(ti + 1) * kvw]);
            }
        }
    }

    /// `x` is the normed input `[t, hidden]`; `seqs` gives each sequence's rows, its cache and
    /// the position of its first new token. Returns `[t, hidden]`.
    pub fn forward(
        &self,
        x: &[f32],
        t: usize,
        seqs: &mut [(Range<usize>, &mut LayerState)],
        starts: &[usize],
        rope: &Rope,
        step: Step,
    ) -> Vec<f32> {
        let (nh, hd) = (self.heads, self.head_dim);
        let mut qkv = time(Kind::AttnProj, || {
            products(
                &[
                    step.job(x, t, &self.q_proj),
                    step.job(x, t, &self.k_proj),
                    step.job(x, t, &self.v_proj),
                ],
                step.precision,
            )
        });
        let v_new = qkv.pop().unwrap_or_default();
        let mut k_new = qkv.pop().unwrap_or_default();
        let qg = qkv.pop().unwrap_or_default();
        let core = Span::new(Kind::AttnCore);
        let half = rope.rotary_dim / 2;
        let (mut cos, mut sin) = (vec![0.0f32; half], vec![0.0f32; half]);

        self.push_kv(&mut k_new, &v_new, seqs, starts, rope);
        // Queries: split from the gates, normed, rotated.
        let mut q = vec![0.0f32; t * nh * hd];
        for ((rows, _), &start) in seqs.iter().zip(starts) {
            for (i, ti) in rows.clone().enumerate() {
                rope.cos_sin(start + i, &mut cos, &mut sin);
                let qt = &mut q[ti * nh * hd..(ti + 1) * nh * hd];
                let src = &qg[ti * 2 * nh * hd..(ti + 1) * 2 * nh * hd];
                for h in 0..nh {
                    qt[h * hd..(h + 1) * hd].copy_from_slice(&src[h * 2 * hd..h * 2 * hd + hd]);
                }
                rms_norm_zc(qt, &self.q_norm, self.eps);
                for head in qt.chunks_mut(hd) {
                    rope.apply(head, &cos, &sin);
                }
            }
        }

        // Each token attends over its sequence's cache, in chunks folded in order. A decode
        // step has too few tokens to keep the pool busy, so its tokens' chunks become separate
        // tasks; prompt tokens run their chunks one after the other. Both give the same bits
        // (`kernels::attention`), so a token's result does not depend on its batch.
        let mut o = vec![0.0f32; t * nh * hd];
        {
            // Each sequence's blocks, and each token's view of them, by the token's row in the
            // batch.
            let views: Vec<Vec<Kv>> = seqs
                .iter()
                .map(|(_, st)| match &**st {
                    LayerState::Full(kv) => kv.views(),
                    LayerState::Linear { .. } => {
                        unreachable!("attention layer given a DeltaNet cache")
                    }
                })
                .collect();
            let mut token_kv: Vec<Option<Paged>> = vec![None; t];
            for (((rows, _), &start), blocks) in seqs.iter().zip(starts).zip(&views) {
                for (i, ti) in rows.clone().enumerate() {
                    token_kv[ti] = Some(Paged {
                        blocks,
                        len: start + i + 1,
                    });
                }
            }
            let token_kv: Vec<Paged> = token_kv
                .into_iter()
                .map(|kv| kv.expect("every row of the batch belongs to a sequence"))
                .collect();
            let q_of = |ti: usize| &q[ti * nh * hd..(ti + 1) * nh * hd];
            let gate = |ti: usize, out: &mut [f32]| {
                let gates = &qg[ti * 2 * nh * hd..(ti + 1) * 2 * nh * hd];
                for (h, oh) in out.chunks_mut(hd).enumerate() {
                    let gate = &gates[h * 2 * hd + hd..(h + 1) * 2 * hd];
                    for (ov, &gv) in oh.iter_mut().zip(gate) {
                        *ov *= sigmoid(gv);
                    }
                }
            };
            let outs: Vec<Mutex<&mut [f32]>> = o.chunks_mut(nh * hd).map(Mutex::new).collect();
            let lock = |ti: usize| outs[ti].lock().unwrap_or_else(|e| e.into_inner());
            let pool = pool::global();
            if t < 2 * pool.threads() {
                let tasks: Vec<(usize, Kv, Range<usize>)> = (0..t)
                    .flat_map(|ti| token_kv[ti].chunks().map(move |(b, r)| (ti, b, r)))
                    .collect();
                let parts: Vec<Mutex<Part>> = tasks
                    .iter()
                    .map(|_| Mutex::new(Part::new(nh, hd)))
                    .collect();
                pool.run(tasks.len(), &|i| {
                    let (ti, block, range) = tasks[i].clone();
                    let mut part = parts[i].lock().unwrap_or_else(|e| e.into_inner());
                    attend_chunk(q_of(ti), block, range, &mut part);
                });
                let mut parts = parts
                    .into_iter()
                    .map(|p| p.into_inner().unwrap_or_else(|e| e.into_inner()));
                for (ti, kv) in token_kv.iter().enumerate() {
                    let mut acc = parts.next().expect("one part per chunk");
                    for _ in 1..kv.chunks().count() {
                        acc.fold(&parts.next().expect("one part per chunk"));
                    }
                    let mut out = lock(ti);
                    acc.finish(&mut out);
                    gate(ti, &mut out);
                }
            } else {
                // Prompt tokens: a thread takes a run of adjacent tokens and goes through
                // their cache one chunk at a time for many of them (`attend_prompt`), so that
                // a chunk is read from memory once per pass, not once per token (at depth,
                // prefill attention was bound by those reads). Each token still folds its
                // chunks' parts in order: the same bits as the decode path above.
                split::for_each_run(t, &|run| {
                    attend_prompt(run, &q_of, &|ti| token_kv[ti], &mut |ti, acc| {
                        let mut out = lock(ti);
                        acc.finish(&mut out);
                        gate(ti, &mut out);
                    });
                });
            }
        }
        drop(core);
        time(Kind::AttnOut, || {
            products(&[step.job(&o, t, &self.o_proj)], step.precision).remove(0)
        })
    }
}
