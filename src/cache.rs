//! The hybrid cache of one sequence: per DeltaNet layer the conv state (last `Kc−1` raw
//! inputs) and the f32 recurrent state; per attention layer the K/V of every past token, in
//! f32 (`--exact`) or bfloat16 (the fast path: half the memory, and half the bytes decode
//! reads per token at long contexts).
//! DeltaNet states are fixed-size, so a [`Snapshot`] is cheap and restoring it only has to
//! truncate the append-only K/V — the basis for speculative decoding and prefix reuse.

use anyhow::{bail, Result};

use crate::config::{Config, LayerType};
use crate::kernels::attention::Rows;

/// How attention layers store their keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    /// Rounded to nearest even.
    Bf16,
}

/// Cached key or value rows of one attention layer, appended token by token.
pub enum KvRows {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl KvRows {
    pub fn new(dtype: KvDtype) -> KvRows {
        match dtype {
            KvDtype::F32 => KvRows::F32(Vec::new()),
            KvDtype::Bf16 => KvRows::Bf16(Vec::new()),
        }
    }

    /// Appends one token's row.
    pub fn push(&mut self, row: &[f32]) {
        match self {
            KvRows::F32(d) => d.extend_from_slice(row),
            KvRows::Bf16(d) => d.extend(row.iter().map(|&x| half::bf16::from_f32(x).to_bits())),
        }
    }

    /// Values held (rows × row width).
    pub fn len(&self) -> usize {
        self.view().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn truncate(&mut self, n: usize) {
        match self {
            KvRows::F32(d) => d.truncate(n),
            KvRows::Bf16(d) => d.truncate(n),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            KvRows::F32(d) => 4 * d.len(),
            KvRows::Bf16(d) => 2 * d.len(),
        }
    }

    /// The rows as the attention kernels read them.
    pub fn view(&self) -> Rows<'_> {
        match self {
            KvRows::F32(d) => Rows::F32(d),
            KvRows::Bf16(d) => Rows::Bf16(d),
        }
    }
}

pub enum LayerState {
    Linear {
        /// `[Kc−1, conv_dim]`, oldest first.
        conv: Vec<f32>,
        /// `[HV, dk, dv]`.
        ssm: Vec<f32>,
    },
    Full {
        /// `[len, kv_heads · head_dim]`, post-norm, post-RoPE.
        k: KvRows,
        v: KvRows,
    },
}

pub struct SeqCache {
    pos: usize,
    max_len: usize,
    pub(crate) layers: Vec<LayerState>,
}

/// The DeltaNet states of a sequence at a position; see [`SeqCache::restore`].
#[derive(Clone)]
pub struct Snapshot {
    pos: usize,
    linear: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Snapshot {
    pub fn pos(&self) -> usize {
        self.pos
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
                },
                LayerType::Full => LayerState::Full {
                    k: KvRows::new(kv),
                    v: KvRows::new(kv),
                },
            })
            .collect();
        SeqCache {
            pos: 0,
            max_len,
            layers,
        }
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
        let linear = self
            .layers
            .iter()
            .filter_map(|l| match l {
                LayerState::Linear { conv, ssm } => Some((conv.clone(), ssm.clone())),
                LayerState::Full { .. } => None,
            })
            .collect();
        Snapshot {
            pos: self.pos,
            linear,
        }
    }

    /// Returns the sequence to the state of `snap`, taken from this sequence at a position not
    /// after the current one: DeltaNet states are copied back, K/V truncated.
    pub fn restore(&mut self, snap: &Snapshot) -> Result<()> {
        if snap.pos > self.pos {
            bail!(
                "cannot restore a snapshot at position {} into a sequence at position {}",
                snap.pos,
                self.pos
            );
        }
        let mut it = snap.linear.iter();
        for l in &mut self.layers {
            match l {
                LayerState::Linear { conv, ssm } => {
                    let Some((c, s)) = it.next() else {
                        bail!("snapshot does not belong to this model: too few DeltaNet layers");
                    };
                    if c.len() != conv.len() || s.len() != ssm.len() {
                        bail!("snapshot does not belong to this model: state sizes differ");
                    }
                    conv.copy_from_slice(c);
                    ssm.copy_from_slice(s);
                }
                LayerState::Full { k, v } => {
                    let row = k.len().checked_div(self.pos).unwrap_or(0);
                    k.truncate(snap.pos * row);
                    v.truncate(snap.pos * row);
                }
            }
        }
        self.pos = snap.pos;
        Ok(())
    }

    /// Bytes one decode step moves through this cache: each DeltaNet layer's conv history and
    /// recurrent state read and written back, each attention layer's K/V rows read (the one
    /// new row written is left out). Memory traffic on top of the weights, which the
    /// bandwidth a decode step needs has to count.
    pub fn decode_traffic(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerState::Linear { conv, ssm } => 2 * 4 * (conv.len() + ssm.len()),
                LayerState::Full { k, v } => k.bytes() + v.bytes(),
            })
            .sum()
    }

    /// Bytes held by this cache.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerState::Linear { conv, ssm } => 4 * (conv.len() + ssm.len()),
                LayerState::Full { k, v } => k.bytes() + v.bytes(),
            })
            .sum()
    }
}
