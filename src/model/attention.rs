//! Gated attention ("self_attn", spec §8): per-head query/gate split, zero-centred q/k norms,
//! partial RoPE, GQA over the K/V cache, sigmoid output gate, o_proj.

use anyhow::Result;
use std::ops::Range;

use crate::cache::LayerState;
use crate::checkpoint::{Checkpoint, Matrix};
use crate::config::{Config, Fp8Config};
use crate::kernels::activation::{sigmoid, softmax};
use crate::kernels::matmul::{axpy, dot, matmul};
use crate::kernels::norm::rms_norm_zc;
use crate::kernels::rope::Rope;

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

    /// `x` is the normed input `[t, hidden]`; `seqs` gives each sequence's rows, its cache and
    /// the position of its first new token. Returns `[t, hidden]`.
    pub fn forward(
        &self,
        x: &[f32],
        t: usize,
        seqs: &mut [(Range<usize>, &mut LayerState)],
        starts: &[usize],
        rope: &Rope,
    ) -> Vec<f32> {
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let qg = matmul(x, t, &self.q_proj);
        let mut k_new = matmul(x, t, &self.k_proj);
        let v_new = matmul(x, t, &self.v_proj);
        let kvw = nkv * hd;
        let group = nh / nkv;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut o = vec![0.0f32; t * nh * hd];
        let half = rope.rotary_dim / 2;
        let (mut cos, mut sin) = (vec![0.0f32; half], vec![0.0f32; half]);
        let mut q = vec![0.0f32; nh * hd];
        let mut scores = Vec::new();

        for ((rows, state), &start) in seqs.iter_mut().zip(starts) {
            let LayerState::Full { k: kc, v: vc } = &mut **state else {
                unreachable!("attention layer given a DeltaNet cache");
            };
            // New keys: norm + RoPE, then append with the values.
            for (i, ti) in rows.clone().enumerate() {
                let kt = &mut k_new[ti * kvw..(ti + 1) * kvw];
                rms_norm_zc(kt, &self.k_norm, self.eps);
                rope.cos_sin(start + i, &mut cos, &mut sin);
                for head in kt.chunks_mut(hd) {
                    rope.apply(head, &cos, &sin);
                }
                kc.extend_from_slice(kt);
                vc.extend_from_slice(&v_new[ti * kvw..(ti + 1) * kvw]);
            }
            for (i, ti) in rows.clone().enumerate() {
                let pos = start + i;
                let qt = &qg[ti * 2 * nh * hd..(ti + 1) * 2 * nh * hd];
                for h in 0..nh {
                    q[h * hd..(h + 1) * hd].copy_from_slice(&qt[h * 2 * hd..h * 2 * hd + hd]);
                }
                rms_norm_zc(&mut q, &self.q_norm, self.eps);
                rope.cos_sin(pos, &mut cos, &mut sin);
                for head in q.chunks_mut(hd) {
                    rope.apply(head, &cos, &sin);
                }
                let ctx = pos + 1;
                for h in 0..nh {
                    let kvh = h / group;
                    let qh = &q[h * hd..(h + 1) * hd];
                    scores.clear();
                    scores.extend((0..ctx).map(|j| {
                        dot(qh, &kc[j * kvw + kvh * hd..j * kvw + (kvh + 1) * hd]) * scale
                    }));
                    softmax(&mut scores);
                    let oh = &mut o[(ti * nh + h) * hd..(ti * nh + h + 1) * hd];
                    for (j, &pj) in scores.iter().enumerate() {
                        axpy(oh, pj, &vc[j * kvw + kvh * hd..j * kvw + (kvh + 1) * hd]);
                    }
                    let gate = &qt[h * 2 * hd + hd..(h + 1) * 2 * hd];
                    for (ov, &gv) in oh.iter_mut().zip(gate) {
                        *ov *= sigmoid(gv);
                    }
                }
            }
        }
        matmul(&o, t, &self.o_proj)
    }
}
