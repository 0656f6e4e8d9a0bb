//! The multi-token-prediction head (spec §11.1): from the main model's post-norm hidden state
//! `h_i` and the next token `t_{i+1}`,
//! `x = fc([RMSNorm_zc(embed(t_{i+1})); RMSNorm_zc(h_i)])`, embedding first, then one
//! full-attention + MoE decoder layer with its own K/V at position `i`, `mtp.norm`, and the
//! shared `lm_head`. A draft of several tokens feeds the head's own normed output as the next
//! `h`.
//!
//! The layer's K/V must cover every token the main model saw, so each forward step also runs
//! the head's keys and values over its tokens (`Model::mtp_fill`); only draft steps run the
//! whole layer and the `lm_head`.

use anyhow::{bail, Context, Result};
use std::ops::Range;

use super::{Layer, Model, Step};
use crate::cache::{LayerState, MtpCache, PagedKv, SeqCache};
use crate::checkpoint::{Checkpoint, Matrix};
use crate::config::{Config, LayerType};
use crate::kernels::matmul::{products, Job};
use crate::kernels::norm::rms_norm_zc;
use crate::kernels::profile::{time, Kind};

pub(super) struct Mtp {
    fc: Matrix,
    pre_fc_norm_embedding: Vec<f32>,
    pre_fc_norm_hidden: Vec<f32>,
    norm: Vec<f32>,
    layer: Layer,
}

impl Mtp {
    /// The head, if the checkpoint has one (`mtp.fc.weight`). In the FP8 checkpoints `fc` and
    /// the norms stay BF16; `Matrix::load` takes either.
    pub(super) fn load(ck: &Checkpoint, cfg: &Config) -> Result<Option<Mtp>> {
        if !ck.contains("mtp.fc.weight") {
            return Ok(None);
        }
        // Every released model has one MTP layer (`mtp_num_hidden_layers: 1`); a head of
        // several would draft wrongly with only its first, so it is not used at all.
        if ck.names().any(|n| n.starts_with("mtp.layers.1.")) {
            eprintln!(
                "warning: {}: the MTP head has more than one layer, which qnext does not run; \
                 speculative decoding is off for this model",
                ck.dir.display()
            );
            return Ok(None);
        }
        let h = cfg.hidden_size;
        let fp8 = cfg.quantization.as_ref();
        let norm = |name: &str| super::load_norm(ck, &format!("mtp.{name}.weight"), h);
        Ok(Some(Mtp {
            fc: Matrix::load(ck, "mtp.fc.weight", h, 2 * h, fp8)?,
            pre_fc_norm_embedding: norm("pre_fc_norm_embedding")?,
            pre_fc_norm_hidden: norm("pre_fc_norm_hidden")?,
            norm: norm("norm")?,
            layer: Layer::load(
                ck,
                "mtp.layers.0.",
                cfg,
                LayerType::Full,
                cfg.num_experts > 0,
            )
            .context("loading the MTP layer")?,
        }))
    }

    /// (bytes of all weights, bytes read per drafted token), `lm_head` not counted.
    pub(super) fn bytes(&self) -> (usize, usize) {
        let (all, active) = self.layer.bytes();
        (all + self.fc.bytes(), active + self.fc.bytes())
    }
}

/// One sequence's slots of the MTP layer in a step: its tokens, each with the hidden state
/// of the position before it.
struct Slots<'a> {
    tokens: &'a [u32],
    hidden: Vec<f32>,
}

impl Model {
    fn mtp(&self) -> Result<&Mtp> {
        self.mtp.as_ref().context(
            "this checkpoint has no MTP head (mtp.* tensors), which speculative decoding needs",
        )
    }

    /// Gives draft steps an 8-bit copy of a 16-bit `lm_head` ([`Matrix::to_q8`]): the head is
    /// most of a draft step's bytes (622 MB in BF16 against ≈ 60 MB for the MTP layer's
    /// active weights), and a draft only proposes — verification with the stored head keeps
    /// the output exact. Costs the copy's memory (half the stored head's). Returns whether a
    /// copy was made (not for an 8-bit `lm_head`).
    pub fn quantize_draft_head(&mut self) -> bool {
        if self.draft_head.is_some()
            || matches!(self.lm_head.data, crate::checkpoint::MatrixData::Fp8 { .. })
        {
            return false;
        }
        self.draft_head = Some(self.lm_head.to_q8(128));
        true
    }

    /// Bytes of the draft steps' own `lm_head` (0 without one).
    pub fn draft_head_bytes(&self) -> usize {
        self.draft_head.as_ref().map_or(0, Matrix::bytes)
    }

    /// Takes the draft steps' own `lm_head` away (they read `lm_head` again) or gives one
    /// back; for measuring the two against each other.
    pub fn swap_draft_head(&mut self, head: Option<Matrix>) -> Option<Matrix> {
        std::mem::replace(&mut self.draft_head, head)
    }

    /// Gives a new sequence's cache the MTP layer's state, so that its forward steps keep the
    /// layer's K/V and it can draft tokens ([`Model::draft_step`]).
    pub fn enable_mtp(&self, cache: &mut SeqCache) -> Result<()> {
        self.mtp()?;
        if cache.pos() != 0 {
            bail!(
                "the MTP state must start with the sequence (it is at position {})",
                cache.pos()
            );
        }
        let kv = PagedKv::new(
            self.kv_dtype(),
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        cache.mtp = Some(MtpCache::new(kv));
        Ok(())
    }

    /// `fc([norm_e(embed(t)); norm_h(h)])` for every slot of `slots`, `[t, hidden]`.
    fn mtp_input(&self, mtp: &Mtp, slots: &[Slots], step: Step) -> Vec<f32> {
        let h = self.cfg.hidden_size;
        let eps = self.cfg.rms_norm_eps;
        let t: usize = slots.iter().map(|s| s.tokens.len()).sum();
        let mut cat = vec![0.0f32; t * 2 * h];
        let mut r = 0;
        for s in slots {
            for (i, &id) in s.tokens.iter().enumerate() {
                let row = &mut cat[r * 2 * h..(r + 1) * 2 * h];
                let (e, hid) = row.split_at_mut(h);
                self.embed.row_f32(id as usize, e);
                rms_norm_zc(e, &mtp.pre_fc_norm_embedding, eps);
                hid.copy_from_slice(&s.hidden[i * h..(i + 1) * h]);
                rms_norm_zc(hid, &mtp.pre_fc_norm_hidden, eps);
                r += 1;
            }
        }
        products(&[step.job(&cat, t, &mtp.fc)], step.precision).remove(0)
    }

    /// After a forward step: the MTP layer's keys and values for each sequence's new tokens
    /// that have the hidden state before them. `hidden[i]` holds the post-norm hidden states
    /// of sequence `i`'s new tokens (`tokens[i]`); the last becomes the pending one.
    pub(super) fn mtp_fill(
        &self,
        caches: &mut [&mut SeqCache],
        tokens: &[&[u32]],
        hidden: &[&[f32]],
        bulk: &[bool],
    ) {
        let Some(mtp) = &self.mtp else { return };
        let h = self.cfg.hidden_size;
        let mut slots = Vec::with_capacity(caches.len());
        let mut rows_bulk = Vec::new();
        for ((c, &toks), (&hid, &b)) in caches.iter().zip(tokens).zip(hidden.iter().zip(bulk)) {
            let pending = &c.mtp.as_ref().expect("only MTP sequences").pending;
            let n = toks.len();
            let s = if pending.is_empty() {
                Slots {
                    tokens: &toks[1.min(n)..],
                    hidden: hid[..n.saturating_sub(1) * h].to_vec(),
                }
            } else {
                let mut hs = pending.clone();
                hs.extend_from_slice(&hid[..(n - 1) * h]);
                Slots {
                    tokens: toks,
                    hidden: hs,
                }
            };
            rows_bulk.extend(std::iter::repeat_n(b, s.tokens.len()));
            slots.push(s);
        }
        let t = rows_bulk.len();
        if t > 0 {
            let step = Step {
                precision: self.precision,
                bulk: &rows_bulk,
            };
            let mut x = time(Kind::Mtp, || self.mtp_input(mtp, &slots, step));
            rms_norm_zc(&mut x, &mtp.layer.input_norm, self.cfg.rms_norm_eps);
            let super::Mixer::Full(attn) = &mtp.layer.mixer else {
                unreachable!("the MTP layer is an attention layer");
            };
            let mut r = 0;
            let mut spans: Vec<Range<usize>> = Vec::new();
            for s in &slots {
                spans.push(r..r + s.tokens.len());
                r += s.tokens.len();
            }
            let starts: Vec<usize> = caches
                .iter()
                .map(|c| c.mtp.as_ref().expect("only MTP sequences").kv().len())
                .collect();
            let mut seqs: Vec<(Range<usize>, &mut LayerState)> = caches
                .iter_mut()
                .zip(spans)
                .map(|(c, span)| (span, c.mtp.as_mut().expect("only MTP sequences").state()))
                .collect();
            attn.append_kv(&x, t, &mut seqs, &starts, &self.rope, step);
        }
        for (c, &hid) in caches.iter_mut().zip(hidden) {
            let m = c.mtp.as_mut().expect("only MTP sequences");
            m.pending.clear();
            if !hid.is_empty() {
                m.pending.extend_from_slice(&hid[hid.len() - h..]);
            }
        }
    }

    /// One draft step for each `(token, cache)`: the MTP head on `token` and the hidden state
    /// before it — the main model's for the first step after a forward step, then the head's
    /// own output — at the next position of the head's K/V. Returns each sequence's draft
    /// logits. K/V written past the fed tokens is dropped by the next forward step.
    pub fn draft_step(&self, batch: &mut [(u32, &mut SeqCache)]) -> Result<Vec<Vec<f32>>> {
        let mtp = self.mtp()?;
        let (h, vocab, eps) = (
            self.cfg.hidden_size,
            self.cfg.vocab_size,
            self.cfg.rms_norm_eps,
        );
        let mut slots = Vec::with_capacity(batch.len());
        for (i, (tok, c)) in batch.iter().enumerate() {
            if *tok as usize >= vocab {
                bail!("sequence {i}: token id {tok} is out of range (vocabulary size {vocab})");
            }
            let Some(m) = &c.mtp else {
                bail!("sequence {i}: its cache has no MTP state (Model::enable_mtp)");
            };
            let hidden = match (&m.draft, m.pending.is_empty()) {
                (_, false) => m.pending.clone(),
                (Some(d), true) => d.clone(),
                (None, true) => bail!("sequence {i}: nothing to draft from (no token fed yet)"),
            };
            slots.push(Slots {
                tokens: std::slice::from_ref(tok),
                hidden,
            });
        }
        let t = batch.len();
        let bulk = vec![false; t];
        let step = Step {
            precision: self.precision,
            bulk: &bulk,
        };
        let mut x = time(Kind::Mtp, || self.mtp_input(mtp, &slots, step));
        let starts: Vec<usize> = batch
            .iter()
            .map(|(_, c)| c.mtp.as_ref().expect("checked above").kv().len())
            .collect();
        let mut seqs: Vec<(Range<usize>, &mut LayerState)> = batch
            .iter_mut()
            .enumerate()
            .map(|(i, (_, c))| (i..i + 1, c.mtp.as_mut().expect("checked above").state()))
            .collect();
        mtp.layer
            .forward(&mut x, t, &mut seqs, &starts, &self.rope, step, eps);
        drop(seqs);
        rms_norm_zc(&mut x, &mtp.norm, eps);
        let head = self.draft_head.as_ref().unwrap_or(&self.lm_head);
        let logits = time(Kind::LmHead, || {
            products(&[Job::new(&x, t, head)], self.precision).remove(0)
        });
        for (i, (_, c)) in batch.iter_mut().enumerate() {
            let m = c.mtp.as_mut().expect("checked above");
            m.pending.clear();
            m.draft = Some(x[i * h..(i + 1) * h].to_vec());
        }
        Ok(logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }
}
