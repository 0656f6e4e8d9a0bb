//! The hybrid cache of one sequence: per DeltaNet layer the conv state (last `Kc−1` raw
//! inputs) and the f32 recurrent state; per attention layer the K/V of every past token, in
//! f32 (`--exact`) or bfloat16 (the fast path: half the memory, and half the bytes decode
//! reads per token at long contexts).
//! K/V live in shared blocks (`blocks.rs`) and DeltaNet states are fixed-size, so a
//! [`Snapshot`] is a copy of the states and a list of blocks, and restoring one into any
//! sequence of the model is a copy back — the basis of prefix reuse (`prefix.rs`) and of
//! speculative decoding's rollback.
//!
//! With speculative decoding a cache also holds the MTP draft layer's K/V (`MtpCache`) and,
//! for the step being verified, what it takes to end that step after any of its tokens
//! (`rollback.rs`).

pub mod blocks;
pub mod prefix;
mod rollback;

use anyhow::{bail, Result};
use std::sync::Arc;

pub use blocks::{KvBlock, KvDtype, PagedKv, BLOCK};
pub(crate) use rollback::{HeadRecord, MtpCache, Replay, Speculation};

use crate::config::{Config, LayerType};

pub enum LayerState {
    Linear {
        /// `[Kc−1, conv_dim]`, oldest first.
        conv: Vec<f32>,
        /// `[HV, dk, dv]`.
        ssm: Vec<f32>,
        /// The step being verified, kept to end it after any of its tokens.
        replay: Replay,
        /// How the next prompt step is cut, and the states kept inside the last one.
        pieces: Pieces,
    },
    /// `[len, kv_heads · head_dim]` keys (post-norm, post-RoPE) and values.
    Full(PagedKv),
}

/// A prompt step cut into pieces (`engine::chunking`): the DeltaNet runs each piece on its
/// own, from the state the pieces before it left, so a token's bits depend on the cuts
/// before it and never on how the pieces were grouped into forward steps. The states after
/// some pieces are kept, so that a snapshot can be taken there after the step.
#[derive(Default)]
pub struct Pieces {
    /// Where the pieces of the next step end, as offsets into its tokens, ascending; empty:
    /// the step is one piece.
    pub(crate) ends: Vec<usize>,
    /// The offsets among `ends` after which the states are kept.
    pub(crate) keep: Vec<usize>,
    /// What the last step kept: (position, conv state, recurrent state).
    pub(crate) kept: Vec<(usize, Vec<f32>, Vec<f32>)>,
}

impl LayerState {
    /// Forgets what the last step recorded in a DeltaNet layer: a speculative step's replay,
    /// a prompt step's pieces and the states it kept.
    fn forget_step(&mut self) {
        if let LayerState::Linear { replay, pieces, .. } = self {
            replay.disarm();
            *pieces = Pieces::default();
        }
    }
}

pub struct SeqCache {
    pos: usize,
    max_len: usize,
    pub(crate) layers: Vec<LayerState>,
    /// The MTP layer's state, when the sequence drafts tokens (`Model::enable_mtp`).
    pub(crate) mtp: Option<MtpCache>,
    /// Whether the next forward step is a speculative one ([`SeqCache::speculate`]), and
    /// then what it recorded.
    pub(crate) armed: bool,
    pub(crate) spec: Option<Speculation>,
    /// Whether the next forward step is a prompt step cut by [`SeqCache::cut_prompt`].
    pub(crate) cut: bool,
}

/// A sequence's whole state at a position: copies of the DeltaNet states and, shared, the
/// attention K/V blocks up to it. Immutable once taken; see [`SeqCache::restore`].
#[derive(Clone)]
pub struct Snapshot {
    pos: usize,
    linear: Vec<(Vec<f32>, Vec<f32>)>,
    /// Per attention layer its blocks, then the MTP layer's if `mtp` is set.
    kv: Vec<Vec<Arc<KvBlock>>>,
    /// The MTP layer's K/V length and pending hidden state.
    mtp: Option<(usize, Vec<f32>)>,
}

impl Snapshot {
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Bytes of the DeltaNet states it holds (its K/V blocks are shared and counted apart).
    pub fn state_bytes(&self) -> usize {
        self.linear
            .iter()
            .map(|(c, s)| 4 * (c.len() + s.len()))
            .sum::<usize>()
            + self.mtp.as_ref().map_or(0, |(_, h)| 4 * h.len())
    }

    /// Per attention layer (and the MTP layer's last), its K/V blocks.
    pub fn kv_blocks(&self) -> &[Vec<Arc<KvBlock>>] {
        &self.kv
    }
}

impl SeqCache {
    /// An empty cache for a sequence of at most `max_len` tokens, K/V in f32.
    pub fn new(cfg: &Config, max_len: usize) -> SeqCache {
        SeqCache::with_kv(cfg, max_len, KvDtype::F32)
    }

    /// An empty cache for a sequence of at most `max_len` tokens, K/V stored as `kv`.
    pub fn with_kv(cfg: &Config, max_len: usize, kv: KvDtype) -> SeqCache {
        let conv_dim = cfg.linear_conv_dim();
        let ssm = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim;
        let layers = cfg
            .layer_types
            .iter()
            .map(|t| match t {
                LayerType::Linear => LayerState::Linear {
                    conv: vec![0.0; (cfg.linear_conv_kernel_dim - 1) * conv_dim],
                    ssm: vec![0.0; ssm],
                    replay: Replay::default(),
                    pieces: Pieces::default(),
                },
                LayerType::Full => {
                    LayerState::Full(PagedKv::new(kv, cfg.num_key_value_heads, cfg.head_dim))
                }
            })
            .collect();
        SeqCache {
            pos: 0,
            max_len,
            layers,
            mtp: None,
            armed: false,
            spec: None,
            cut: false,
        }
    }

    /// Whether the sequence keeps the MTP layer's state (it drafts tokens).
    pub fn has_mtp(&self) -> bool {
        self.mtp.is_some()
    }

    /// Back to an empty sequence: states zeroed, K/V let go.
    pub fn reset(&mut self) {
        for l in &mut self.layers {
            match l {
                LayerState::Linear { conv, ssm, .. } => {
                    conv.fill(0.0);
                    ssm.fill(0.0);
                }
                LayerState::Full(p) => p.truncate(0),
            }
            l.forget_step();
        }
        if let Some(m) = &mut self.mtp {
            m.reset();
        }
        self.armed = false;
        self.spec = None;
        self.cut = false;
        self.pos = 0;
    }

    /// Tokens already processed (the position of the next token).
    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.pos += n;
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut linear = Vec::new();
        let mut kv = Vec::new();
        for l in &self.layers {
            match l {
                LayerState::Linear { conv, ssm, .. } => linear.push((conv.clone(), ssm.clone())),
                LayerState::Full(p) => kv.push(p.blocks().to_vec()),
            }
        }
        let mtp = self.mtp.as_ref().map(|m| {
            let p = m.kv();
            kv.push(p.blocks().to_vec());
            (p.len(), m.pending.clone())
        });
        Snapshot {
            pos: self.pos,
            linear,
            kv,
            mtp,
        }
    }

    /// Puts the sequence in the state of `snap`, taken from any sequence of this model (an
    /// earlier state of this one, or a shared prefix): DeltaNet states are copied, K/V blocks
    /// shared.
    pub fn restore(&mut self, snap: &Snapshot) -> Result<()> {
        if snap.pos > self.max_len {
            bail!(
                "cannot restore a snapshot at position {} into a sequence of at most {} tokens",
                snap.pos,
                self.max_len
            );
        }
        let linear = self
            .layers
            .iter()
            .filter(|l| matches!(l, LayerState::Linear { .. }))
            .count();
        let full = self.layers.len() - linear;
        if linear != snap.linear.len() || full + snap.mtp.is_some() as usize != snap.kv.len() {
            bail!("snapshot does not belong to this model: its layers differ");
        }
        if self.mtp.is_some() && snap.mtp.is_none() {
            bail!("snapshot was taken without the MTP layer's state, which this sequence needs");
        }
        let live = self.layers.iter().filter_map(|l| match l {
            LayerState::Linear { conv, ssm, .. } => Some((conv.len(), ssm.len())),
            LayerState::Full(_) => None,
        });
        if live
            .zip(&snap.linear)
            .any(|((c, s), (sc, ss))| c != sc.len() || s != ss.len())
        {
            bail!("snapshot does not belong to this model: state sizes differ");
        }
        let (mut lin, mut full) = (snap.linear.iter(), snap.kv.iter());
        for l in &mut self.layers {
            match l {
                LayerState::Linear { conv, ssm, .. } => {
                    let (c, s) = lin.next().expect("counted above");
                    conv.copy_from_slice(c);
                    ssm.copy_from_slice(s);
                }
                LayerState::Full(p) => {
                    p.share(full.next().expect("counted above"), snap.pos);
                }
            }
            l.forget_step();
        }
        if let (Some(m), Some((len, pending))) = (&mut self.mtp, &snap.mtp) {
            m.restore(full.next().expect("counted above"), *len, pending);
        }
        self.armed = false;
        self.spec = None;
        self.cut = false;
        self.pos = snap.pos;
        Ok(())
    }

    /// Makes the next forward step a prompt step of pieces ending at the offsets `ends` into
    /// its tokens (ascending, the last one the step's length), keeping the states after the
    /// pieces that end at `keep` for [`SeqCache::snapshot_at`]. Every token of the step takes
    /// the prompt path of the matrix products, however short its piece.
    pub fn cut_prompt(&mut self, ends: &[usize], keep: &[usize]) {
        assert!(
            ends.windows(2).all(|w| w[0] < w[1]) && ends.first().is_none_or(|&e| e > 0),
            "piece ends must ascend from above 0"
        );
        assert!(
            keep.windows(2).all(|w| w[0] < w[1]) && keep.iter().all(|k| ends.contains(k)),
            "states are kept at piece ends only, in order"
        );
        self.cut = true;
        for l in &mut self.layers {
            if let LayerState::Linear { pieces, .. } = l {
                pieces.ends = ends.to_vec();
                pieces.keep = keep.to_vec();
                pieces.kept.clear();
            }
        }
    }

    /// The state at position `pos`: now, or inside the last step where it kept its states
    /// there ([`SeqCache::cut_prompt`]). `None` for any other position, and inside a step of
    /// a sequence with the MTP layer (whose state is not kept inside steps).
    pub fn snapshot_at(&self, pos: usize) -> Option<Snapshot> {
        if pos == self.pos {
            return Some(self.snapshot());
        }
        if pos > self.pos || self.mtp.is_some() {
            return None;
        }
        let mut linear = Vec::new();
        let mut kv = Vec::new();
        for l in &self.layers {
            match l {
                LayerState::Linear { pieces, .. } => {
                    let (_, c, s) = pieces.kept.iter().find(|k| k.0 == pos)?;
                    linear.push((c.clone(), s.clone()));
                }
                // Rows past `pos` in its last block are never read through the snapshot
                // (its length is `pos`), and a sequence restored from it writes them anew.
                LayerState::Full(p) => kv.push(p.blocks()[..pos.div_ceil(BLOCK)].to_vec()),
            }
        }
        Some(Snapshot {
            pos,
            linear,
            kv,
            mtp: None,
        })
    }

    /// Bytes one decode step moves through this cache: each DeltaNet layer's conv history and
    /// recurrent state read and written back, each attention layer's K/V rows read (the one
    /// new row written is left out). Memory traffic on top of the weights, which the
    /// bandwidth a decode step needs has to count.
    pub fn decode_traffic(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerState::Linear { conv, ssm, .. } => 2 * 4 * (conv.len() + ssm.len()),
                LayerState::Full(p) => p.row_bytes(),
            })
            .sum()
    }

    /// Bytes of K/V one more token adds (over all attention layers, the MTP layer's too).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerState::Full(p) => p.bytes_per_token(),
                LayerState::Linear { .. } => 0,
            })
            .sum::<usize>()
            + self.mtp.as_ref().map_or(0, |m| m.kv().bytes_per_token())
    }

    /// Bytes held by this cache.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerState::Linear {
                    conv,
                    ssm,
                    replay,
                    pieces,
                } => {
                    4 * (conv.len() + ssm.len())
                        + replay.bytes()
                        + pieces
                            .kept
                            .iter()
                            .map(|(_, c, s)| 4 * (c.len() + s.len()))
                            .sum::<usize>()
                }
                LayerState::Full(p) => p.bytes(),
            })
            .sum::<usize>()
            + self.mtp.as_ref().map_or(0, MtpCache::bytes)
    }
}
