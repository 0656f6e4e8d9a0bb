//! Gated DeltaNet mixer ("linear_attn", spec §7): input projections (Qwen3-Next's interleaved
//! or Qwen3.5's plain ones), causal depthwise conv with SiLU, gates, the delta rule from the
//! carried state, gated RMSNorm, out_proj.

use anyhow::Result;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

use super::Step;
use crate::cache::{HeadRecord, LayerState};
use crate::checkpoint::{Checkpoint, Matrix};
use crate::config::{Config, Family, Fp8Config};
use crate::kernels::activation::{sigmoid, silu, silu_in_place, softplus};
use crate::kernels::delta_rule::{self, HeadInputs};
use crate::kernels::matmul::products;
use crate::kernels::norm::{l2_norm, rms_scale};
use crate::kernels::profile::{time, Kind, Span};
use crate::kernels::{pool, split};

/// `c += w ⊙ m` (one tap of the depthwise conv), compiled for the wider vector units too.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
fn causal_tap(c: &mut [f32], w: &[f32], m: &[f32]) {
    for ((cv, &wv), &mv) in c.iter_mut().zip(w).zip(m) {
        *cv += wv * mv;
    }
}

/// Each `width`-long row of `rows` cut into `seg`-long segments, row by row, each behind its
/// own (never contended) lock so that a task can borrow its segments mutably.
fn row_segments(rows: &mut [f32], width: usize, seg: usize) -> Vec<Mutex<&mut [f32]>> {
    rows.chunks_mut(width)
        .flat_map(|row| row.chunks_mut(seg))
        .map(Mutex::new)
        .collect()
}

fn lock<'a, 'b>(m: &'a Mutex<&'b mut [f32]>) -> MutexGuard<'a, &'b mut [f32]> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The input projections as the checkpoint family stores them (spec §7.1). One per layer,
/// built once: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Projections {
    /// Qwen3-Next: `in_proj_qkvz` and `in_proj_ba`, interleaved per key-head group.
    Interleaved { qkvz: Matrix, ba: Matrix },
    /// Qwen3.5 / 3.6: `in_proj_qkv` (already `[q | k | v]`), `in_proj_z`, `in_proj_b`,
    /// `in_proj_a`.
    Split {
        qkv: Matrix,
        z: Matrix,
        b: Matrix,
        a: Matrix,
    },
}

/// The batch's projected inputs, de-interleaved: per token `mixed` `[q | k | v]` (the conv's
/// channels), `z` `[HV·dv]`, `b` and `a` `[HV]`.
struct Inputs {
    mixed: Vec<f32>,
    z: Vec<f32>,
    b: Vec<f32>,
    a: Vec<f32>,
}

/// One sequence's rows of [`Inputs`].
struct SeqInputs<'a> {
    mixed: &'a [f32],
    z: &'a [f32],
    b: &'a [f32],
    a: &'a [f32],
}

pub struct DeltaNet {
    proj: Projections,
    /// `[conv_dim, Kc]`.
    conv_w: Vec<f32>,
    dt_bias: Vec<f32>,
    /// `−exp(A_log)`, computed once in f32.
    neg_a: Vec<f32>,
    /// Plain (not 1+w) weight of the gated norm, `[dv]`.
    norm_w: Vec<f32>,
    out_proj: Matrix,
    hk: usize,
    hv: usize,
    dk: usize,
    dv: usize,
    kc: usize,
    eps: f32,
}

impl DeltaNet {
    /// `prefix` is e.g. `model.layers.0.linear_attn.`.
    pub fn load(
        ck: &Checkpoint,
        prefix: &str,
        cfg: &Config,
        fp8: Option<&Fp8Config>,
    ) -> Result<DeltaNet> {
        let h = cfg.hidden_size;
        let (hk, hv) = (cfg.linear_num_key_heads, cfg.linear_num_value_heads);
        let (dk, dv) = (cfg.linear_key_head_dim, cfg.linear_value_head_dim);
        let kc = cfg.linear_conv_kernel_dim;
        let conv_dim = cfg.linear_conv_dim();
        let vec = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let t = ck.get(&format!("{prefix}{name}"))?;
            t.expect_shape(shape)?;
            t.to_f32()
        };
        let matrix = |name: &str, rows: usize| {
            Matrix::load(ck, &format!("{prefix}{name}.weight"), rows, h, fp8)
        };
        let proj = match cfg.family {
            Family::Qwen3Next => Projections::Interleaved {
                qkvz: matrix("in_proj_qkvz", 2 * hk * dk + 2 * hv * dv)?,
                ba: matrix("in_proj_ba", 2 * hv)?,
            },
            Family::Qwen35 => Projections::Split {
                qkv: matrix("in_proj_qkv", conv_dim)?,
                z: matrix("in_proj_z", hv * dv)?,
                b: matrix("in_proj_b", hv)?,
                a: matrix("in_proj_a", hv)?,
            },
        };
        let a_log = vec("A_log", &[hv])?;
        Ok(DeltaNet {
            proj,
            // Stored [channel, 1, tap]; kept tap-major so the conv runs along channels.
            conv_w: {
                let w = vec("conv1d.weight", &[conv_dim, 1, kc])?;
                (0..kc * conv_dim)
                    .map(|i| w[(i % conv_dim) * kc + i / conv_dim])
                    .collect()
            },
            dt_bias: vec("dt_bias", &[hv])?,
            neg_a: a_log.iter().map(|a| -a.exp()).collect(),
            norm_w: vec("norm.weight", &[dv])?,
            out_proj: Matrix::load(ck, &format!("{prefix}out_proj.weight"), h, hv * dv, fp8)?,
            hk,
            hv,
            dk,
            dv,
            kc,
            eps: cfg.rms_norm_eps,
        })
    }

    fn projections(&self) -> Vec<&Matrix> {
        match &self.proj {
            Projections::Interleaved { qkvz, ba } => vec![qkvz, ba],
            Projections::Split { qkv, z, b, a } => vec![qkv, z, b, a],
        }
    }

    pub fn bytes(&self) -> usize {
        let proj: usize = self.projections().iter().map(|m| m.bytes()).sum();
        proj + self.out_proj.bytes() + 4 * self.conv_w.len()
    }

    /// The input projections of the batch's `t` rows of `x`, de-interleaved.
    fn project(&self, x: &[f32], t: usize, step: Step) -> Inputs {
        let mats = self.projections();
        let jobs: Vec<_> = mats.iter().map(|m| step.job(x, t, m)).collect();
        let mut out = time(Kind::DeltaNetProj, || products(&jobs, step.precision));
        match &self.proj {
            Projections::Split { .. } => {
                let a = out.pop().unwrap_or_default();
                let b = out.pop().unwrap_or_default();
                let z = out.pop().unwrap_or_default();
                let mixed = out.pop().unwrap_or_default();
                Inputs { mixed, z, b, a }
            }
            Projections::Interleaved { .. } => {
                let ba = out.pop().unwrap_or_default();
                let p = out.pop().unwrap_or_default();
                time(Kind::DeltaNetConv, || self.deinterleave(&p, &ba, t))
            }
        }
    }

    /// Qwen3-Next's per-key-head groups `[q_j | k_j | v (r heads) | z (r heads)]` and
    /// `[b (r) | a (r)]` (spec §7.1) taken apart into [`Inputs`].
    fn deinterleave(&self, p: &[f32], ba: &[f32], n: usize) -> Inputs {
        let (hk, hv, dk, dv) = (self.hk, self.hv, self.dk, self.dv);
        let r = hv / hk;
        let key_dim = hk * dk;
        let conv_dim = 2 * key_dim + hv * dv;
        let group = 2 * dk + 2 * r * dv;
        let vd = hv * dv;
        let mut mixed = vec![0.0f32; n * conv_dim];
        let mut z = vec![0.0f32; n * vd];
        let (mut b, mut a) = (vec![0.0f32; n * hv], vec![0.0f32; n * hv]);
        for t in 0..n {
            let pt = &p[t * hk * group..(t + 1) * hk * group];
            let m = &mut mixed[t * conv_dim..(t + 1) * conv_dim];
            for j in 0..hk {
                let g = &pt[j * group..(j + 1) * group];
                m[j * dk..(j + 1) * dk].copy_from_slice(&g[..dk]);
                m[key_dim + j * dk..key_dim + (j + 1) * dk].copy_from_slice(&g[dk..2 * dk]);
                let vs = 2 * key_dim + j * r * dv;
                m[vs..vs + r * dv].copy_from_slice(&g[2 * dk..2 * dk + r * dv]);
                z[t * vd + j * r * dv..t * vd + (j + 1) * r * dv]
                    .copy_from_slice(&g[2 * dk + r * dv..]);
                let bat = &ba[t * 2 * hv + j * 2 * r..t * 2 * hv + (j + 1) * 2 * r];
                b[t * hv + j * r..t * hv + (j + 1) * r].copy_from_slice(&bat[..r]);
                a[t * hv + j * r..t * hv + (j + 1) * r].copy_from_slice(&bat[r..]);
            }
        }
        Inputs { mixed, z, b, a }
    }

    /// `x` is the normed input `[t, hidden]` of the whole batch; `seqs` gives each sequence's
    /// rows and its state, `starts` its position before the step. Returns `[t, hidden]`.
    pub fn forward(
        &self,
        x: &[f32],
        t: usize,
        seqs: &mut [(Range<usize>, &mut LayerState)],
        starts: &[usize],
        step: Step,
    ) -> Vec<f32> {
        let inputs = self.project(x, t, step);
        let (hv, vd) = (self.hv, self.hv * self.dv);
        let conv_dim = inputs.mixed.len() / t.max(1);
        let mut y = vec![0.0f32; t * vd];
        for ((rows, state), &start) in seqs.iter_mut().zip(starts) {
            let LayerState::Linear {
                conv,
                ssm,
                replay,
                pieces,
            } = &mut **state
            else {
                unreachable!("DeltaNet layer given an attention cache");
            };
            let recording = replay.armed;
            let (r0, r1) = (rows.start, rows.end);
            let mut ends = std::mem::take(&mut pieces.ends);
            if ends.last() != Some(&rows.len()) {
                assert!(ends.is_empty(), "pieces must end where the step ends");
                ends.push(rows.len());
            }
            assert!(
                !recording || ends.len() == 1,
                "a speculative step is one piece"
            );
            let keep = std::mem::take(&mut pieces.keep);
            pieces.kept.clear();
            self.sequence(
                SeqInputs {
                    mixed: &inputs.mixed[r0 * conv_dim..r1 * conv_dim],
                    z: &inputs.z[r0 * vd..r1 * vd],
                    b: &inputs.b[r0 * hv..r1 * hv],
                    a: &inputs.a[r0 * hv..r1 * hv],
                },
                (&ends, &keep, start),
                (conv, ssm),
                (replay, &mut pieces.kept),
                &mut y[r0 * vd..r1 * vd],
            );
            if recording {
                replay.finish(ssm);
            }
        }
        time(Kind::DeltaNetOut, || {
            products(&[step.job(&y, t, &self.out_proj)], step.precision).remove(0)
        })
    }

    /// One sequence's tokens, in pieces ending at `ends` (offsets, the last one the step's
    /// length `n`): its [`Inputs`] rows in, gated-norm output `y` (`[n, HV·dv]`) out. The
    /// states after the pieces that end at `keep` are pushed to `kept` with their position
    /// (`start` + offset). An armed `replay` records the step (`cache::rollback`).
    #[allow(clippy::type_complexity)]
    fn sequence(
        &self,
        SeqInputs { mixed, z, b, a }: SeqInputs,
        (ends, keep, start): (&[usize], &[usize], usize),
        (conv, ssm): (&mut [f32], &mut [f32]),
        (replay, kept): (
            &mut crate::cache::Replay,
            &mut Vec<(usize, Vec<f32>, Vec<f32>)>,
        ),
        y: &mut [f32],
    ) {
        let n = *ends.last().expect("at least one piece");
        let (hk, hv, dk, dv, kc) = (self.hk, self.hv, self.dk, self.dv, self.kc);
        let r = hv / hk;
        let key_dim = hk * dk;
        let conv_dim = 2 * key_dim + hv * dv;
        let vd = hv * dv;
        let hist = kc - 1;

        let conv_span = Span::new(Kind::DeltaNetConv);
        // The conv state after offset p: rows p .. p + Kc−1 of [carried; new], taken before
        // the conv moves the carried rows on.
        for &p in keep {
            let mut state = vec![0.0f32; hist * conv_dim];
            for (r, row) in state.chunks_exact_mut(conv_dim).enumerate() {
                let j = p + r;
                row.copy_from_slice(if j < hist {
                    &conv[j * conv_dim..(j + 1) * conv_dim]
                } else {
                    &mixed[(j - hist) * conv_dim..(j - hist + 1) * conv_dim]
                });
            }
            kept.push((start + p, state, vec![0.0f32; ssm.len()]));
        }
        // Causal depthwise conv + SiLU over the carried last Kc−1 raw inputs followed by the
        // new ones; tap Kc−1 multiplies the current token. Channels are independent, so tasks
        // take ranges of them (for all tokens), and each moves its channels of the carried
        // inputs on by n: a decode step's conv reads 224 KiB per layer (history and taps),
        // which one thread would read while the other waits.
        let mut records: Vec<Option<HeadRecord>> = if replay.armed {
            replay
                .record(n, (dk, dv, hv), conv, mixed)
                .into_iter()
                .map(Some)
                .collect()
        } else {
            (0..hv).map(|_| None).collect()
        };
        // Token by token, a step's result does not depend on how many tokens it has, so a
        // verification step gives decode's bits; the chunked form pays from a prompt chunk on.
        let recording = records.first().is_some_and(Option::is_some);
        let token_by_token = |len: usize| len < super::PROMPT_CHUNK_TOKENS || recording;
        let seg = conv_dim
            .div_ceil(2 * pool::global().threads())
            .next_multiple_of(16);
        let parts = conv_dim.div_ceil(seg);
        let mut c = vec![0.0f32; n * conv_dim];
        {
            // Row segments of the output and of the carried inputs; part p owns segment p of
            // every row.
            let (outs, hists) = (
                row_segments(&mut c, conv_dim, seg),
                row_segments(conv, conv_dim, seg),
            );
            pool::global().run(parts, &|p| {
                let ch = p * seg..((p + 1) * seg).min(conv_dim);
                let new = |t: usize| &mixed[t * conv_dim + ch.start..t * conv_dim + ch.end];
                let mut h: Vec<_> = (0..hist).map(|r| lock(&hists[r * parts + p])).collect();
                for t in 0..n {
                    let mut o = lock(&outs[t * parts + p]);
                    for i in 0..kc {
                        let taps = &self.conv_w[i * conv_dim + ch.start..i * conv_dim + ch.end];
                        // Row t + i of [carried; new].
                        let x: &[f32] = if t + i < hist {
                            &h[t + i]
                        } else {
                            new(t + i - hist)
                        };
                        causal_tap(&mut o, taps, x);
                    }
                    silu_in_place(&mut o);
                }
                // Carried row r becomes row n + r of [carried; new]; rows are taken from
                // later ones only, so none is overwritten before it is read.
                for r in 0..hist {
                    let j = n + r;
                    if j < hist {
                        let (to, from) = h.split_at_mut(j);
                        to[r].copy_from_slice(&from[0]);
                    } else {
                        h[r].copy_from_slice(new(j - hist));
                    }
                }
            });
        }
        drop(conv_span);

        let _rule = Span::new(Kind::DeltaNetRule);
        // Value heads are independent. Threads take runs of adjacent heads (claimed so that
        // they end together, `split.rs`), so that each streams through its heads' states in
        // memory order (decode is bound by that traffic); each head gathers and l2-norms its
        // key head's q and k itself (a key head serves r value heads: cheaper than a dispatch
        // of its own).
        let scale = 1.0 / (dk as f32).sqrt();
        let mut o_all = vec![0.0f32; hv * n * dv];
        {
            type HeadWork<'a, 'b> = (
                &'a mut [f32],
                &'a mut [f32],
                Option<HeadRecord<'b>>,
                Vec<&'a mut [f32]>,
            );
            // Per head, its share of each kept recurrent state.
            let mut kept_heads: Vec<Vec<&mut [f32]>> = (0..hv).map(|_| Vec::new()).collect();
            for (_, _, s) in kept.iter_mut() {
                for (h, part) in s.chunks_mut(dk * dv).enumerate() {
                    kept_heads[h].push(part);
                }
            }
            let work: Vec<Mutex<HeadWork>> = ssm
                .chunks_mut(dk * dv)
                .zip(o_all.chunks_mut(n * dv))
                .zip(records.drain(..))
                .zip(kept_heads)
                .map(|(((s, o), r), k)| Mutex::new((s, o, r, k)))
                .collect();
            let heads = |run: Range<usize>| {
                let (mut q, mut k) = (vec![0.0f32; n * dk], vec![0.0f32; n * dk]);
                let mut v = vec![0.0f32; n * dv];
                let (mut g, mut beta) = (vec![0.0f32; n], vec![0.0f32; n]);
                for h in run {
                    let mut w = work[h].lock().unwrap_or_else(|e| e.into_inner());
                    let (s, o, record, kept_s) = &mut *w;
                    let j = h / r; // value head h reads key head h div r (spec §14.2)
                    for t in 0..n {
                        let ct = &c[t * conv_dim..(t + 1) * conv_dim];
                        let (qt, kt) = (&mut q[t * dk..(t + 1) * dk], &mut k[t * dk..(t + 1) * dk]);
                        qt.copy_from_slice(&ct[j * dk..(j + 1) * dk]);
                        l2_norm(qt, 1e-6);
                        qt.iter_mut().for_each(|x| *x *= scale);
                        kt.copy_from_slice(&ct[key_dim + j * dk..key_dim + (j + 1) * dk]);
                        l2_norm(kt, 1e-6);
                        let vs = 2 * key_dim + h * dv;
                        v[t * dv..(t + 1) * dv].copy_from_slice(&ct[vs..vs + dv]);
                        beta[t] = sigmoid(b[t * hv + h]);
                        g[t] = self.neg_a[h] * softplus(a[t * hv + h] + self.dt_bias[h]);
                    }
                    let mut from = 0;
                    let mut kept_here = kept_s.iter_mut();
                    for &end in ends {
                        let inputs = HeadInputs {
                            q: &q[from * dk..end * dk],
                            k: &k[from * dk..end * dk],
                            v: &v[from * dv..end * dv],
                            g: &g[from..end],
                            beta: &beta[from..end],
                            dk,
                            dv,
                        };
                        let o = &mut o[from * dv..end * dv];
                        if let Some(r) = record {
                            r.keep(&inputs);
                            delta_rule::recurrent_from(&inputs, Some(&**s), &mut *r.ssm, o);
                        } else if token_by_token(end - from) {
                            delta_rule::recurrent(&inputs, s, o);
                        } else {
                            delta_rule::chunked(&inputs, s, o);
                        }
                        if keep.contains(&end) {
                            if let Some(ks) = kept_here.next() {
                                ks.copy_from_slice(s);
                            }
                        }
                        from = end;
                    }
                    // Gated RMSNorm, in place: normalise, weight (plain w), then gate by silu(z).
                    for (t, ot) in o.chunks_exact_mut(dv).enumerate() {
                        let rs = rms_scale(ot, self.eps);
                        let zt = &z[t * vd + h * dv..t * vd + (h + 1) * dv];
                        for ((v, &w), &zi) in ot.iter_mut().zip(&self.norm_w).zip(zt) {
                            *v = w * (*v * rs) * silu(zi);
                        }
                    }
                }
            };
            split::for_each_run(hv, &heads);
        }
        for h in 0..hv {
            for t in 0..n {
                y[t * vd + h * dv..t * vd + (h + 1) * dv]
                    .copy_from_slice(&o_all[(h * n + t) * dv..(h * n + t + 1) * dv]);
            }
        }
    }
}
