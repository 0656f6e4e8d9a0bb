//! Ending a speculative step after any of its tokens (spec §11.3), and the MTP draft layer's
//! state.
//!
//! Verification feeds the last sampled token and k drafts in one forward step; afterwards the
//! sequence must be exactly where feeding only the accepted ones would have left it. Attention
//! K/V is simply cut back. A DeltaNet layer's state cannot be cut back, so a speculative step
//! keeps, per DeltaNet layer, the state it started from (its heads write their new states to a
//! second buffer instead of in place: no extra memory traffic) and the recurrence's per-token
//! inputs (q, k, v, g, β after the conv, and the conv's raw inputs); ending the step early
//! replays the recurrence over the kept tokens only, from the state it started from. The replay reads no weights:
//! it is the `recurrent` kernel over a few tokens, the same function on the same inputs as in
//! the step, so the states are bit for bit those of a sequence that never saw the rejected
//! tokens. The alternative, a copy of the state after every position of the step (vLLM's
//! per-position slots), writes k more states per layer on every step, accepted or not;
//! BENCHMARKS.md ("Speculative decoding") measures both.

use anyhow::{bail, Result};
use std::hash::Hasher;
use std::sync::{Arc, Mutex};

use super::{KvBlock, LayerState, PagedKv, SeqCache};
use crate::kernels::delta_rule::{self, HeadInputs};
use crate::kernels::split;

/// What one DeltaNet layer keeps of a speculative step.
#[derive(Default)]
pub struct Replay {
    /// Set by [`SeqCache::speculate`]: the next step records.
    pub(crate) armed: bool,
    /// Tokens recorded (0: nothing to go back to).
    n: usize,
    dk: usize,
    dv: usize,
    conv_dim: usize,
    /// The conv history the step started from.
    conv: Vec<f32>,
    /// During a recorded step, where the heads write their new states; after it (swapped
    /// with the layer's, see [`Replay::finish`]), the state the step started from.
    pub(crate) ssm: Vec<f32>,
    /// `[n, conv_dim]`: the conv's raw inputs.
    mixed: Vec<f32>,
    /// Per value head, `[n, dk]` q, `[n, dk]` k, `[n, dv]` v, `[n]` g, `[n]` β.
    inputs: Vec<f32>,
}

/// Where a value head's recorded inputs lie in its part of [`Replay::inputs`].
struct HeadLayout {
    n: usize,
    dk: usize,
    dv: usize,
}

impl HeadLayout {
    fn len(&self) -> usize {
        self.n * (2 * self.dk + self.dv + 2)
    }

    /// Splits one head's part into q, k, v, g, β.
    fn split<'a>(&self, part: &'a [f32]) -> [&'a [f32]; 5] {
        let (n, dk, dv) = (self.n, self.dk, self.dv);
        let (q, rest) = part.split_at(n * dk);
        let (k, rest) = rest.split_at(n * dk);
        let (v, rest) = rest.split_at(n * dv);
        let (g, beta) = rest.split_at(n);
        [q, k, v, g, beta]
    }
}

/// A value head's share of a recording: where its updated state goes (the state it starts
/// from stays where it is) and where its inputs are kept.
pub(crate) struct HeadRecord<'a> {
    pub ssm: &'a mut [f32],
    pub inputs: &'a mut [f32],
    layout: HeadLayout,
}

impl HeadRecord<'_> {
    /// Keeps a head's inputs for `n` tokens.
    pub fn keep(&mut self, x: &HeadInputs) {
        let (n, dk, dv) = (self.layout.n, self.layout.dk, self.layout.dv);
        let (q, rest) = self.inputs.split_at_mut(n * dk);
        let (k, rest) = rest.split_at_mut(n * dk);
        let (v, rest) = rest.split_at_mut(n * dv);
        let (g, beta) = rest.split_at_mut(n);
        q.copy_from_slice(&x.q[..n * dk]);
        k.copy_from_slice(&x.k[..n * dk]);
        v.copy_from_slice(&x.v[..n * dv]);
        g.copy_from_slice(&x.g[..n]);
        beta.copy_from_slice(&x.beta[..n]);
    }
}

impl Replay {
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
        self.n = 0;
    }

    /// Bytes held (the buffers stay allocated between steps).
    pub(crate) fn bytes(&self) -> usize {
        4 * (self.conv.capacity()
            + self.ssm.capacity()
            + self.mixed.capacity()
            + self.inputs.capacity())
    }

    /// Starts recording a step of `n` tokens from the conv history `conv`, with raw conv
    /// inputs `mixed`; returns each value head's record, to fill as the heads run.
    pub(crate) fn record(
        &mut self,
        n: usize,
        (dk, dv, hv): (usize, usize, usize),
        conv: &[f32],
        mixed: &[f32],
    ) -> Vec<HeadRecord<'_>> {
        self.armed = false;
        self.n = n;
        (self.dk, self.dv) = (dk, dv);
        self.conv_dim = mixed.len() / n;
        self.conv.clear();
        self.conv.extend_from_slice(conv);
        self.mixed.clear();
        self.mixed.extend_from_slice(mixed);
        let layout = || HeadLayout { n, dk, dv };
        let per_head = layout().len();
        self.ssm.resize(hv * dk * dv, 0.0);
        self.inputs.resize(hv * per_head, 0.0);
        self.ssm
            .chunks_mut(dk * dv)
            .zip(self.inputs.chunks_mut(per_head))
            .map(|(ssm, inputs)| HeadRecord {
                ssm,
                inputs,
                layout: layout(),
            })
            .collect()
    }

    /// After the recorded step: the heads' new states become the layer's, and the layer's
    /// old one is kept here.
    pub(crate) fn finish(&mut self, ssm: &mut Vec<f32>) {
        std::mem::swap(ssm, &mut self.ssm);
    }

    /// Puts `conv` and `ssm` in the state after the first `keep` recorded tokens.
    fn rewind(&self, keep: usize, conv: &mut [f32], ssm: &mut [f32]) {
        let (cd, dk, dv) = (self.conv_dim, self.dk, self.dv);
        // The history is the last Kc−1 rows of [history before; kept inputs].
        let hist = conv.len() / cd;
        for (r, row) in conv.chunks_exact_mut(cd).enumerate() {
            let j = keep + r;
            row.copy_from_slice(if j < hist {
                &self.conv[j * cd..(j + 1) * cd]
            } else {
                &self.mixed[(j - hist) * cd..(j - hist + 1) * cd]
            });
        }
        let layout = HeadLayout { n: self.n, dk, dv };
        let heads: Vec<Mutex<&mut [f32]>> = ssm.chunks_mut(dk * dv).map(Mutex::new).collect();
        split::for_each_run(heads.len(), &|run| {
            let mut o = vec![0.0f32; keep * dv];
            for h in run {
                let part = &self.inputs[h * layout.len()..(h + 1) * layout.len()];
                let [q, k, v, g, beta] = layout.split(part);
                let inputs = HeadInputs {
                    q: &q[..keep * dk],
                    k: &k[..keep * dk],
                    v: &v[..keep * dv],
                    g: &g[..keep],
                    beta: &beta[..keep],
                    dk,
                    dv,
                };
                let mut s = heads[h].lock().unwrap_or_else(|e| e.into_inner());
                let start = &self.ssm[h * dk * dv..(h + 1) * dk * dv];
                delta_rule::recurrent_from(&inputs, Some(start), &mut s, &mut o);
            }
        });
    }
}

/// The MTP draft layer's state of a sequence (spec §11.1). The layer's slot `i` combines the
/// token at position `i + 1` with the main model's hidden state at `i`, so it runs one token
/// behind the main model: `pending` holds the hidden state of the last token fed, waiting for
/// the next one. Draft steps write slots past the fed tokens; the next forward step drops them.
pub struct MtpCache {
    kv: LayerState,
    /// The main model's post-norm hidden state of the last token fed; empty before the first
    /// and after a draft step consumed it.
    pub(crate) pending: Vec<f32>,
    /// The MTP's output hidden state of the last draft step: the next draft step's input.
    pub(crate) draft: Option<Vec<f32>>,
}

impl MtpCache {
    pub(crate) fn new(kv: PagedKv) -> MtpCache {
        MtpCache {
            kv: LayerState::Full(kv),
            pending: Vec::new(),
            draft: None,
        }
    }

    pub(crate) fn kv(&self) -> &PagedKv {
        match &self.kv {
            LayerState::Full(p) => p,
            LayerState::Linear { .. } => unreachable!("the MTP layer is an attention layer"),
        }
    }

    fn kv_mut(&mut self) -> &mut PagedKv {
        match &mut self.kv {
            LayerState::Full(p) => p,
            LayerState::Linear { .. } => unreachable!("the MTP layer is an attention layer"),
        }
    }

    /// The layer's cache, as attention layers take it.
    pub(crate) fn state(&mut self) -> &mut LayerState {
        &mut self.kv
    }

    /// Drops what draft steps wrote: the layer keeps the slots of the `pos` tokens fed.
    pub(crate) fn end_draft(&mut self, pos: usize) {
        let real = pos - usize::from(!self.pending.is_empty() && pos > 0);
        let kv = self.kv_mut();
        if kv.len() > real {
            kv.truncate(real);
        }
        self.draft = None;
    }

    pub(super) fn reset(&mut self) {
        self.kv_mut().truncate(0);
        self.pending.clear();
        self.draft = None;
    }

    pub(super) fn restore(&mut self, blocks: &[Arc<KvBlock>], len: usize, pending: &[f32]) {
        self.kv_mut().share(blocks, len);
        self.pending.clear();
        self.pending.extend_from_slice(pending);
        self.draft = None;
    }

    pub(crate) fn bytes(&self) -> usize {
        self.kv().bytes() + 4 * self.pending.len()
    }
}

/// What a speculative forward step recorded besides the DeltaNet layers'.
pub struct Speculation {
    pub(crate) start: usize,
    pub(crate) n: usize,
    /// The MTP layer's K/V length before the step, and whether a hidden state was pending.
    pub(crate) mtp_len: usize,
    pub(crate) had_pending: bool,
    /// `[n, hidden]`: the post-norm hidden states of the step's tokens.
    pub(crate) hidden: Vec<f32>,
}

impl SeqCache {
    /// Makes the next forward step speculative: it keeps what [`SeqCache::accept`] needs to
    /// end it after any of its tokens.
    pub fn speculate(&mut self) {
        self.armed = true;
        for l in &mut self.layers {
            if let LayerState::Linear { replay, .. } = l {
                replay.armed = true;
            }
        }
    }

    /// Ends the last (speculative) step after its first `keep` tokens, as if only those had
    /// been fed: attention K/V cut back, DeltaNet states replayed, the MTP layer's slots and
    /// pending hidden state set accordingly.
    pub fn accept(&mut self, keep: usize) -> Result<()> {
        let Some(spec) = self.spec.take() else {
            bail!("no speculative step to end (call speculate before the forward step)");
        };
        if keep == 0 || keep > spec.n {
            bail!("cannot keep {keep} of the step's {} tokens", spec.n);
        }
        for l in &mut self.layers {
            match l {
                LayerState::Linear {
                    conv, ssm, replay, ..
                } => {
                    if keep < replay.n {
                        replay.rewind(keep, conv, ssm);
                    }
                    replay.disarm();
                }
                LayerState::Full(p) => p.truncate(spec.start + keep),
            }
        }
        if let Some(m) = &mut self.mtp {
            let slots = keep - usize::from(!spec.had_pending);
            m.kv_mut().truncate(spec.mtp_len + slots);
            let h = spec.hidden.len() / spec.n;
            m.pending.clear();
            m.pending
                .extend_from_slice(&spec.hidden[(keep - 1) * h..keep * h]);
        }
        self.pos = spec.start + keep;
        Ok(())
    }

    /// A hash of every state the sequence holds (position, DeltaNet states, K/V rows, the MTP
    /// layer's), for tests that compare two sequences bit for bit.
    pub fn fingerprint(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        h.write_usize(self.pos);
        for l in &self.layers {
            match l {
                LayerState::Linear { conv, ssm, .. } => conv
                    .iter()
                    .chain(ssm)
                    .for_each(|x| h.write_u32(x.to_bits())),
                LayerState::Full(p) => p.hash_rows(&mut h),
            }
        }
        if let Some(m) = &self.mtp {
            m.kv().hash_rows(&mut h);
            m.pending.iter().for_each(|x| h.write_u32(x.to_bits()));
        }
        h.finish()
    }
}
