//! Qwen3-Next: embeddings → layers of (DeltaNet or gated attention) + (MoE or dense MLP) →
//! final norm → lm_head (spec §5). One forward call takes a batch of sequences, each with its
//! own new tokens and cache; the matrix products run over all tokens of the batch at once.

mod attention;
mod deltanet;
mod mlp;
mod moe;
mod mtp;

use anyhow::{bail, Context, Result};
use std::ops::Range;
use std::path::Path;

use crate::cache::{KvDtype, LayerState, SeqCache, Speculation};
use crate::checkpoint::{Checkpoint, LoadMode, Matrix};
use crate::config::{Config, LayerType, Overrides};
use crate::kernels::matmul::{products, Job, Precision};
use crate::kernels::norm::rms_norm_zc;
use crate::kernels::profile::{time, Kind};
use crate::kernels::rope::Rope;
use attention::Attention;
use deltanet::DeltaNet;
use mlp::SwiGlu;
use moe::Moe;
use mtp::Mtp;

/// Tokens a sequence must feed in one step for them to count as a prompt chunk, whose
/// products take the blocked kernel (worth its weight packing from about this many tokens
/// on); fewer — decode, speculative verification — take the dot-product kernels.
pub const PROMPT_CHUNK_TOKENS: usize = 16;

/// How one forward step's products run: their precision, and which of the batch's tokens
/// are prompt-chunk tokens (`matmul::Job::bulk`).
#[derive(Clone, Copy)]
pub struct Step<'a> {
    pub precision: Precision,
    pub bulk: &'a [bool],
}

impl<'a> Step<'a> {
    /// The product of `x` (`[t, cols]`, all of the batch's tokens) and `w`ᵀ.
    pub fn job(&self, x: &'a [f32], t: usize, w: &'a Matrix) -> Job<'a> {
        Job::new(x, t, w).bulk(self.bulk)
    }
}

// One per layer, built once: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Mixer {
    Linear(DeltaNet),
    Full(Attention),
}

// One per layer, built once: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Ffn {
    Moe(Moe),
    Dense(SwiGlu),
}

struct Layer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    mixer: Mixer,
    ffn: Ffn,
}

pub struct Model {
    pub cfg: Config,
    embed: Matrix,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Matrix,
    rope: Rope,
    mtp: Option<Mtp>,
    /// The `lm_head` draft steps read, when not `lm_head` itself (`Model::quantize_draft_head`).
    draft_head: Option<Matrix>,
    /// How the matrix products round (`--exact`); fast by default.
    pub precision: Precision,
}

/// Which rows of logits a sequence wants back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Only the last new token's (generation).
    Last,
    /// Every new token's (scoring, speculative verification).
    All,
    /// None: a prompt chunk that does not end the prompt only fills the cache.
    None,
}

/// One sequence of a batch: its new tokens and its cache.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
    pub want: Want,
}

/// Per sequence: logits `[rows, vocab]` and the final-norm hidden states `[rows, hidden]` of
/// the wanted rows.
pub struct SeqOutput {
    pub logits: Vec<f32>,
    pub hidden: Vec<f32>,
    pub rows: usize,
}

fn load_norm(ck: &Checkpoint, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = ck.get(name)?;
    t.expect_shape(&[len])?;
    t.to_f32()
}

impl Layer {
    fn load(
        ck: &Checkpoint,
        prefix: &str,
        cfg: &Config,
        kind: LayerType,
        moe: bool,
    ) -> Result<Layer> {
        let fp8 = cfg.quantization.as_ref();
        let h = cfg.hidden_size;
        let mixer = match kind {
            LayerType::Linear => Mixer::Linear(DeltaNet::load(
                ck,
                &format!("{prefix}linear_attn."),
                cfg,
                fp8,
            )?),
            LayerType::Full => Mixer::Full(Attention::load(
                ck,
                &format!("{prefix}self_attn."),
                cfg,
                fp8,
            )?),
        };
        let ffn = if moe {
            Ffn::Moe(Moe::load(ck, &format!("{prefix}mlp."), cfg, fp8)?)
        } else {
            Ffn::Dense(SwiGlu::load(
                ck,
                &format!("{prefix}mlp."),
                h,
                cfg.intermediate_size,
                fp8,
            )?)
        };
        Ok(Layer {
            input_norm: load_norm(ck, &format!("{prefix}input_layernorm.weight"), h)?,
            post_norm: load_norm(ck, &format!("{prefix}post_attention_layernorm.weight"), h)?,
            mixer,
            ffn,
        })
    }

    /// The residual block over the batch's `t` rows of `x`: `x += mixer(norm(x))`, then
    /// `x += ffn(norm(x))`.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &mut [f32],
        t: usize,
        seqs: &mut [(Range<usize>, &mut LayerState)],
        starts: &[usize],
        rope: &Rope,
        step: Step,
        eps: f32,
    ) {
        let xn = time(Kind::Norms, || {
            let mut xn = x.to_vec();
            rms_norm_zc(&mut xn, &self.input_norm, eps);
            xn
        });
        let y = match &self.mixer {
            Mixer::Linear(d) => d.forward(&xn, t, seqs, starts, step),
            Mixer::Full(a) => a.forward(&xn, t, seqs, starts, rope, step),
        };
        let xn = time(Kind::Norms, || {
            add(x, &y);
            let mut xn = x.to_vec();
            rms_norm_zc(&mut xn, &self.post_norm, eps);
            xn
        });
        let y = match &self.ffn {
            Ffn::Moe(m) => m.forward(&xn, t, step),
            Ffn::Dense(d) => d.forward(&xn, t, step),
        };
        time(Kind::Norms, || add(x, &y));
    }

    /// (bytes of all weights, bytes read per token).
    fn bytes(&self) -> (usize, usize) {
        let mixer = match &self.mixer {
            Mixer::Linear(d) => d.bytes(),
            Mixer::Full(a) => a.bytes(),
        };
        let (all, active) = match &self.ffn {
            Ffn::Moe(m) => m.bytes(),
            Ffn::Dense(d) => (d.bytes(), d.bytes()),
        };
        (mixer + all, mixer + active)
    }
}

/// Where the text model's tensors live: `model.` in Qwen3-Next and text-only checkpoints,
/// `model.language_model.` in the Qwen3.5 / 3.6 releases (saved as vision-language models;
/// their `model.visual.*` tensors are never read).
fn text_prefix(ck: &Checkpoint) -> &'static str {
    if ck.contains("model.language_model.embed_tokens.weight") {
        "model.language_model."
    } else {
        "model."
    }
}

/// config.json's layer count against the layers the checkpoint holds, before anything is
/// allocated per layer (a config that claims a billion layers is an error, not an abort).
fn check_layer_count(cfg: &Config, ck: &Checkpoint, prefix: &str) -> Result<()> {
    let layers_prefix = format!("{prefix}layers.");
    let layers = ck
        .names()
        .filter_map(|n| n.strip_prefix(layers_prefix.as_str()))
        .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |l| l + 1);
    if layers != cfg.num_hidden_layers {
        bail!(
            "field `num_hidden_layers` of config.json is {}, but the checkpoint in {} has {layers} layers",
            cfg.num_hidden_layers,
            ck.dir.display()
        );
    }
    Ok(())
}

impl Model {
    /// Loads `dir/config.json` and the weights of `dir`.
    pub fn load(dir: &Path) -> Result<Model> {
        Model::load_with(dir, LoadMode::Mmap)
    }

    /// Like [`Model::load`], placing the weights as `mode` says.
    pub fn load_with(dir: &Path, mode: LoadMode) -> Result<Model> {
        Model::load_overridden(dir, mode, &Overrides::default())
    }

    /// Like [`Model::load_with`], with `overrides` applied to config.json.
    pub fn load_overridden(dir: &Path, mode: LoadMode, overrides: &Overrides) -> Result<Model> {
        if !dir.is_dir() {
            bail!("model folder {} does not exist", dir.display());
        }
        let cfg = Config::from_file_with(&dir.join("config.json"), overrides)?;
        let ck = Checkpoint::open_with(dir, mode)?;
        Model::from_checkpoint(cfg, &ck)
    }

    pub fn from_checkpoint(cfg: Config, ck: &Checkpoint) -> Result<Model> {
        let prefix = text_prefix(ck);
        check_layer_count(&cfg, ck, prefix)?;
        let h = cfg.hidden_size;
        let fp8 = cfg.quantization.as_ref();
        let embed_name = format!("{prefix}embed_tokens.weight");
        let embed = Matrix::load(ck, &embed_name, cfg.vocab_size, h, fp8)?;
        let lm_name = if cfg.tie_word_embeddings && !ck.contains("lm_head.weight") {
            &embed_name
        } else {
            "lm_head.weight"
        };
        let lm_head = Matrix::load(ck, lm_name, cfg.vocab_size, h, fp8)?;
        let pb = crate::progress::bar(cfg.num_hidden_layers as u64, "loading layers");
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for (l, &kind) in cfg.layer_types.iter().enumerate() {
            let layer = Layer::load(
                ck,
                &format!("{prefix}layers.{l}."),
                &cfg,
                kind,
                cfg.is_moe_layer(l),
            )
            .with_context(|| format!("loading layer {l}"))?;
            layers.push(layer);
            pb.inc(1);
        }
        pb.finish_and_clear();
        let mtp = Mtp::load(ck, &cfg)?;
        let rope = Rope::new(&cfg.rope, cfg.head_dim);
        Ok(Model {
            cfg,
            embed,
            layers,
            norm: load_norm(ck, &format!("{prefix}norm.weight"), h)?,
            lm_head,
            rope,
            mtp,
            draft_head: None,
            precision: Precision::default(),
        })
    }

    pub fn has_mtp(&self) -> bool {
        self.mtp.is_some()
    }

    /// How attention K/V is stored: bfloat16 on the fast path, the reference's f32 with
    /// `--exact`.
    fn kv_dtype(&self) -> KvDtype {
        match self.precision {
            Precision::Fast => KvDtype::Bf16,
            Precision::Exact => KvDtype::F32,
        }
    }

    /// A fresh cache for a sequence of at most `max_len` tokens (clamped to the model's context).
    pub fn new_cache(&self, max_len: usize) -> SeqCache {
        SeqCache::with_kv(
            &self.cfg,
            max_len.min(self.cfg.context_length()),
            self.kv_dtype(),
        )
    }

    /// (bytes of all the MTP head's weights, bytes one draft token reads besides `lm_head`).
    pub fn mtp_bytes(&self) -> Option<(usize, usize)> {
        self.mtp.as_ref().map(Mtp::bytes)
    }

    /// Bytes of `lm_head`, which every draft token reads too.
    pub fn lm_head_bytes(&self) -> usize {
        self.lm_head.bytes()
    }

    /// Replaces a 16- or 32-bit `lm_head` by an 8-bit copy ([`Matrix::to_q8`], 128×128
    /// blocks): `--lm-head q8`. The FP8 checkpoints keep `lm_head` in BF16, 16 % of a decode
    /// step's bytes; the copy halves them and moves the logits (BENCHMARKS.md measures by how
    /// much), so it is a choice, not the default. An 8-bit `lm_head` stays as it is. Returns
    /// whether it changed.
    pub fn quantize_lm_head(&mut self) -> bool {
        if matches!(self.lm_head.data, crate::checkpoint::MatrixData::Fp8 { .. }) {
            return false;
        }
        // Tied embeddings (not Qwen3-Next's checkpoints, but allowed) keep reading the stored
        // matrix, so only a separate lm_head gives its memory back.
        let tied = self.embed.row_ptr(0) == self.lm_head.row_ptr(0);
        let q8 = self.lm_head.to_q8(128);
        let stored = std::mem::replace(&mut self.lm_head, q8);
        if !tied {
            // SAFETY: the stored lm_head was the only user of its tensor's bytes (not tied to
            // the embeddings, checked above; each tensor is loaded once), and it is gone.
            unsafe { stored.release() };
        }
        true
    }

    /// (bytes of all weights, bytes of weights read per generated token).
    pub fn weight_bytes(&self) -> (usize, usize) {
        let (mut all, mut active) = (self.lm_head.bytes(), self.lm_head.bytes());
        all += self.embed.bytes();
        active += self.embed.bytes() / self.cfg.vocab_size;
        for l in &self.layers {
            let (a, b) = l.bytes();
            all += a;
            active += b;
        }
        (all, active)
    }

    /// Runs the new tokens of every sequence through the model, advancing their caches.
    /// Inputs are checked before any state changes, so a rejected batch leaves caches intact.
    pub fn forward(&self, batch: &mut [SeqInput]) -> Result<Vec<SeqOutput>> {
        let h = self.cfg.hidden_size;
        let vocab = self.cfg.vocab_size;
        let p = self.precision;
        let mut spans: Vec<Range<usize>> = Vec::with_capacity(batch.len());
        let mut t = 0;
        for (i, s) in batch.iter().enumerate() {
            if let Some(&bad) = s.tokens.iter().find(|&&id| id as usize >= vocab) {
                bail!("sequence {i}: token id {bad} is out of range (vocabulary size {vocab})");
            }
            let end = s.cache.pos() + s.tokens.len();
            if end > s.cache.max_len() {
                bail!(
                    "sequence {i}: {end} tokens exceed the context length {}",
                    s.cache.max_len()
                );
            }
            if s.cache.layers.len() != self.layers.len() {
                bail!("sequence {i}: cache was made for another model");
            }
            spans.push(t..t + s.tokens.len());
            t += s.tokens.len();
        }
        if let Some(i) = batch
            .iter()
            .position(|s| s.cache.armed && s.tokens.is_empty())
        {
            bail!("sequence {i}: a speculative step needs tokens");
        }
        for (s, span) in batch.iter_mut().zip(&spans) {
            let c = &mut *s.cache;
            let pos = c.pos();
            if let Some(m) = &mut c.mtp {
                m.end_draft(pos);
            }
            c.spec = std::mem::take(&mut c.armed).then(|| Speculation {
                start: pos,
                n: span.len(),
                mtp_len: c.mtp.as_ref().map_or(0, |m| m.kv().len()),
                had_pending: c.mtp.as_ref().is_some_and(|m| !m.pending.is_empty()),
                hidden: Vec::new(),
            });
        }
        let starts: Vec<usize> = batch.iter().map(|s| s.cache.pos()).collect();
        // Prompt chunks go through the blocked products; decode and speculative tokens through
        // the dot-product kernels. Decided per sequence, so its results never depend on what
        // else is batched.
        // A speculative step is decode work, whatever its length.
        let bulk: Vec<bool> = spans
            .iter()
            .zip(batch.iter())
            .flat_map(|(span, s)| {
                // A prompt step cut into pieces (`SeqCache::cut_prompt`) is prompt work
                // however short, so that a piece's bits do not depend on what shares its step.
                let bulk =
                    s.cache.cut || (span.len() >= PROMPT_CHUNK_TOKENS && s.cache.spec.is_none());
                std::iter::repeat_n(bulk, span.len())
            })
            .collect();
        let step = Step {
            precision: p,
            bulk: &bulk,
        };

        let mut x = vec![0.0f32; t * h];
        time(Kind::Embed, || {
            for (s, span) in batch.iter().zip(&spans) {
                for (i, &id) in s.tokens.iter().enumerate() {
                    let r = span.start + i;
                    self.embed.row_f32(id as usize, &mut x[r * h..(r + 1) * h]);
                }
            }
        });

        for (l, layer) in self.layers.iter().enumerate() {
            let mut seqs: Vec<(Range<usize>, &mut LayerState)> = batch
                .iter_mut()
                .zip(&spans)
                .map(|(s, span)| (span.clone(), &mut s.cache.layers[l]))
                .collect();
            layer.forward(
                &mut x,
                t,
                &mut seqs,
                &starts,
                &self.rope,
                step,
                self.cfg.rms_norm_eps,
            );
        }

        // Sequences that draft or speculate need the post-norm hidden state of every new
        // token: the MTP layer's K/V covers them all, and a speculative step may end after
        // any of them.
        self.after_layers(batch, &spans, &x, &bulk);

        // Wanted rows of every sequence go through the final norm and lm_head together, so
        // the head's weights are read once per step, not once per sequence.
        let mut rows_of = Vec::with_capacity(batch.len());
        let mut hidden = Vec::new();
        let mut head_bulk = Vec::new();
        for (s, span) in batch.iter_mut().zip(&spans) {
            s.cache.advance(span.len());
            s.cache.cut = false;
            let rows = match s.want {
                Want::All => span.clone(),
                Want::Last => span.end.saturating_sub(1).max(span.start)..span.end,
                Want::None => span.end..span.end,
            };
            hidden.extend_from_slice(&x[rows.start * h..rows.end * h]);
            head_bulk.extend(std::iter::repeat_n(
                bulk.get(span.start).copied().unwrap_or(false),
                rows.len(),
            ));
            rows_of.push(rows.len());
        }
        let total: usize = rows_of.iter().sum();
        let logits = time(Kind::LmHead, || {
            rms_norm_zc(&mut hidden, &self.norm, self.cfg.rms_norm_eps);
            if total > 0 {
                let job = Job::new(&hidden, total, &self.lm_head).bulk(&head_bulk);
                products(&[job], p).remove(0)
            } else {
                Vec::new()
            }
        });
        let mut out = Vec::with_capacity(batch.len());
        let mut r0 = 0;
        for rows in rows_of {
            out.push(SeqOutput {
                logits: logits[r0 * vocab..(r0 + rows) * vocab].to_vec(),
                hidden: hidden[r0 * h..(r0 + rows) * h].to_vec(),
                rows,
            });
            r0 += rows;
        }
        Ok(out)
    }
}

impl Model {
    /// For sequences that draft (MTP state) or speculate: keeps the post-norm hidden states
    /// of their new tokens (`x` after the last layer) and runs the MTP layer's K/V over them.
    fn after_layers(
        &self,
        batch: &mut [SeqInput],
        spans: &[Range<usize>],
        x: &[f32],
        bulk: &[bool],
    ) {
        let h = self.cfg.hidden_size;
        let mut caches = Vec::new();
        let (mut tokens, mut hidden, mut seq_bulk) = (Vec::new(), Vec::new(), Vec::new());
        let normed: Vec<Vec<f32>> = batch
            .iter()
            .zip(spans)
            .map(|(s, span)| {
                if s.cache.mtp.is_none() && s.cache.spec.is_none() {
                    return Vec::new();
                }
                time(Kind::Norms, || {
                    let mut n = x[span.start * h..span.end * h].to_vec();
                    rms_norm_zc(&mut n, &self.norm, self.cfg.rms_norm_eps);
                    n
                })
            })
            .collect();
        for ((s, span), n) in batch.iter_mut().zip(spans).zip(&normed) {
            if let Some(spec) = &mut s.cache.spec {
                spec.hidden.clone_from(n);
            }
            if s.cache.mtp.is_some() {
                caches.push(&mut *s.cache);
                tokens.push(s.tokens);
                hidden.push(n.as_slice());
                seq_bulk.push(bulk.get(span.start).copied().unwrap_or(false));
            }
        }
        if !caches.is_empty() {
            self.mtp_fill(&mut caches, &tokens, &hidden, &seq_bulk);
        }
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
