//! Qwen3-Next `config.json` → one validated [`Config`].
//!
//! Two layouts exist in the wild (spec §2.1): the released file with flat `rope_theta`,
//! `partial_rotary_factor`, `rope_scaling` and `full_attention_interval`, and the one
//! transformers v5 writes, with a nested `rope_parameters` and explicit `layer_types`.
//! Both end up here as the same struct; anything missing or inconsistent is an error
//! that names the field.
//!
//! The Qwen3.5 / 3.6 family (`qwen3_5`, `qwen3_5_moe`) is the same architecture saved as a
//! vision-language model: the text model's fields sit under `text_config`, with the v5 rope
//! layout plus multimodal-RoPE fields that text-only positions make inert (spec §9 applies
//! unchanged: the three position streams of a text token are equal).

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    /// Gated DeltaNet ("linear_attention").
    Linear,
    /// Gated softmax attention ("full_attention").
    Full,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub partial_rotary_factor: f64,
    pub scaling: RopeScaling,
}

/// Changes to config.json given on the command line, as vLLM takes them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    /// `--hf-overrides`: merged into the file, objects key by key, other values replaced.
    pub hf: Option<Map<String, Value>>,
    /// `--rope-scaling`: the `rope_scaling` object (merged into `rope_parameters` where the
    /// file keeps its rope settings there, transformers v5's layout).
    pub rope_scaling: Option<Map<String, Value>>,
}

impl Overrides {
    pub fn is_empty(&self) -> bool {
        self.hf.is_none() && self.rope_scaling.is_none()
    }

    fn apply(&self, o: &mut Map<String, Value>) {
        if let Some(hf) = &self.hf {
            merge(o, hf);
        }
        if let Some(rs) = &self.rope_scaling {
            match o.get_mut("rope_parameters").and_then(Value::as_object_mut) {
                Some(nested) => merge(nested, rs),
                None => {
                    o.insert("rope_scaling".into(), Value::Object(rs.clone()));
                }
            }
        }
    }
}

/// `over` merged into `base`: objects key by key, anything else replaced.
fn merge(base: &mut Map<String, Value>, over: &Map<String, Value>) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(Value::Object(b)), Value::Object(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// `quantization_config` of the fine-grained FP8 checkpoints (spec §4.1).
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Config {
    pub block_n: usize,
    pub block_k: usize,
    pub modules_to_not_convert: Vec<String>,
}

/// Which release family a checkpoint belongs to; it decides the tensor layout of the
/// DeltaNet projections (`model::deltanet`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Qwen3-Next: `in_proj_qkvz` / `in_proj_ba` interleaved per key-head group.
    Qwen3Next,
    /// Qwen3.5 / 3.6, dense or MoE: plain `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`.
    Qwen35,
}

impl Family {
    /// The family of a `model_type`, and whether its text fields are nested in `text_config`.
    fn of_model_type(mt: &str) -> Option<(Family, bool)> {
        match mt {
            "qwen3_next" => Some((Family::Qwen3Next, false)),
            "qwen3_5" | "qwen3_5_moe" => Some((Family::Qwen35, true)),
            "qwen3_5_text" | "qwen3_5_moe_text" => Some((Family::Qwen35, false)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub rope: RopeConfig,
    pub layer_types: Vec<LayerType>,
    pub linear_conv_kernel_dim: usize,
    pub linear_key_head_dim: usize,
    pub linear_value_head_dim: usize,
    pub linear_num_key_heads: usize,
    pub linear_num_value_heads: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub norm_topk_prob: bool,
    pub moe_intermediate_size: usize,
    pub shared_expert_intermediate_size: usize,
    /// Width of the dense MLP of layers that are not MoE (none in the released model).
    pub intermediate_size: usize,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    pub tie_word_embeddings: bool,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub quantization: Option<Fp8Config>,
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config> {
        Config::from_file_with(path, &Overrides::default())
    }

    /// `path` read with `overrides` applied.
    pub fn from_file_with(path: &Path, overrides: &Overrides) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut v: Value = serde_json::from_str(&text)
            .context("not valid JSON")
            .with_context(|| format!("invalid {}", path.display()))?;
        if let Some(o) = v.as_object_mut() {
            overrides.apply(o);
        }
        let obj = v
            .as_object()
            .ok_or_else(|| anyhow!("expected a JSON object at the top level"))
            .with_context(|| format!("invalid {}", path.display()))?;
        let what = if overrides.is_empty() {
            format!("invalid {}", path.display())
        } else {
            format!("invalid {} with the overrides given", path.display())
        };
        Config::from_json(obj).context(what)
    }

    /// Positions a sequence may hold: `max_position_embeddings`, or with YaRN the original
    /// context times the factor (as vLLM derives it; 1,048,576 for Qwen3-Next with factor 4).
    pub fn context_length(&self) -> usize {
        match self.rope.scaling {
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                ..
            } => self
                .max_position_embeddings
                .max((original_max_position_embeddings as f64 * factor) as usize),
            RopeScaling::None => self.max_position_embeddings,
        }
    }

    pub fn from_json_str(text: &str) -> Result<Config> {
        let v: Value = serde_json::from_str(text).context("not valid JSON")?;
        let obj = v
            .as_object()
            .ok_or_else(|| anyhow!("expected a JSON object at the top level"))?;
        Config::from_json(obj)
    }

    pub fn from_json(top: &Map<String, Value>) -> Result<Config> {
        let (family, nested) = match top.get("model_type") {
            None => (Family::Qwen3Next, false),
            Some(mt) => {
                let mt = mt.as_str().unwrap_or("");
                Family::of_model_type(mt).ok_or_else(|| {
                    anyhow!("field `model_type`: expected \"qwen3_next\", \"qwen3_5\" or \"qwen3_5_moe\", found {mt:?}")
                })?
            }
        };
        if nested {
            Config::parse(&text_fields(top)?, family).context("in `text_config`")
        } else {
            Config::parse(top, family)
        }
    }

    /// The text model's fields `o` of a `family` checkpoint.
    fn parse(o: &Map<String, Value>, family: Family) -> Result<Config> {
        if let Some(act) = o.get("hidden_act") {
            if act.as_str() != Some("silu") {
                bail!("field `hidden_act`: only \"silu\" is supported, found {act}");
            }
        }
        if opt_bool(o, "attention_bias")?.unwrap_or(false) {
            bail!("field `attention_bias`: true is not supported (Qwen3-Next has no biases)");
        }

        let num_hidden_layers = req_usize(o, "num_hidden_layers")?;
        // Checked here, before `layer_types` is built with one entry per layer.
        check_at_most("num_hidden_layers", num_hidden_layers, MAX_LAYERS)?;
        let hidden_size = req_usize(o, "hidden_size")?;
        let num_attention_heads = req_usize(o, "num_attention_heads")?;
        let head_dim = match opt_usize(o, "head_dim")? {
            Some(d) => d,
            None => hidden_size / num_attention_heads.max(1),
        };
        let max_position_embeddings = req_usize(o, "max_position_embeddings")?;
        let layer_types = parse_layer_types(o, num_hidden_layers)?;
        let rope = parse_rope(o)?;

        let cfg = Config {
            family,
            vocab_size: req_usize(o, "vocab_size")?,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: req_usize(o, "num_key_value_heads")?,
            head_dim,
            rms_norm_eps: opt_f64(o, "rms_norm_eps")?.unwrap_or(1e-6) as f32,
            max_position_embeddings,
            rope,
            layer_types,
            linear_conv_kernel_dim: req_usize(o, "linear_conv_kernel_dim")?,
            linear_key_head_dim: req_usize(o, "linear_key_head_dim")?,
            linear_value_head_dim: req_usize(o, "linear_value_head_dim")?,
            linear_num_key_heads: req_usize(o, "linear_num_key_heads")?,
            linear_num_value_heads: req_usize(o, "linear_num_value_heads")?,
            num_experts: opt_usize(o, "num_experts")?.unwrap_or(0),
            num_experts_per_tok: opt_usize(o, "num_experts_per_tok")?.unwrap_or(0),
            norm_topk_prob: opt_bool(o, "norm_topk_prob")?.unwrap_or(true),
            moe_intermediate_size: opt_usize(o, "moe_intermediate_size")?.unwrap_or(0),
            shared_expert_intermediate_size: opt_usize(o, "shared_expert_intermediate_size")?
                .unwrap_or(0),
            intermediate_size: opt_usize(o, "intermediate_size")?.unwrap_or(0),
            decoder_sparse_step: opt_usize(o, "decoder_sparse_step")?.unwrap_or(1),
            mlp_only_layers: opt_usize_list(o, "mlp_only_layers")?.unwrap_or_default(),
            tie_word_embeddings: opt_bool(o, "tie_word_embeddings")?.unwrap_or(false),
            eos_token_ids: opt_id_list(o, "eos_token_id")?,
            bos_token_id: opt_usize(o, "bos_token_id")?.map(|v| v as u32),
            quantization: parse_quantization(o)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
            ("linear_conv_kernel_dim", self.linear_conv_kernel_dim),
            ("linear_key_head_dim", self.linear_key_head_dim),
            ("linear_value_head_dim", self.linear_value_head_dim),
            ("linear_num_key_heads", self.linear_num_key_heads),
            ("linear_num_value_heads", self.linear_num_value_heads),
            ("decoder_sparse_step", self.decoder_sparse_step),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                bail!("field `{name}` must be positive");
            }
        }
        // Upper bounds, far beyond any released model, so that a corrupt or hostile config
        // gets an error naming its field instead of an allocation sized from it.
        let bounded = [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("hidden_size", self.hidden_size, 1 << 17),
            ("num_attention_heads", self.num_attention_heads, 4096),
            ("num_key_value_heads", self.num_key_value_heads, 4096),
            ("head_dim", self.head_dim, 4096),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 26,
            ),
            ("linear_conv_kernel_dim", self.linear_conv_kernel_dim, 64),
            ("linear_key_head_dim", self.linear_key_head_dim, 4096),
            ("linear_value_head_dim", self.linear_value_head_dim, 4096),
            ("linear_num_key_heads", self.linear_num_key_heads, 4096),
            ("linear_num_value_heads", self.linear_num_value_heads, 4096),
            ("num_experts", self.num_experts, 1 << 16),
            ("moe_intermediate_size", self.moe_intermediate_size, 1 << 20),
            (
                "shared_expert_intermediate_size",
                self.shared_expert_intermediate_size,
                1 << 20,
            ),
            ("intermediate_size", self.intermediate_size, 1 << 20),
        ];
        for (name, v, max) in bounded {
            check_at_most(name, v, max)?;
        }
        let eps = self.rms_norm_eps;
        if !(eps.is_finite() && eps > 0.0 && eps < 1.0) {
            bail!("field `rms_norm_eps` ({eps}) must be a small positive number (e.g. 1e-6)");
        }
        let prf = self.rope.partial_rotary_factor;
        if !(prf.is_finite() && prf > 0.0 && prf <= 1.0) {
            bail!("field `partial_rotary_factor` ({prf}) must be in (0, 1]");
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "fields `num_attention_heads` ({}) and `num_key_value_heads` ({}): query heads must be a multiple of KV heads",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self
            .linear_num_value_heads
            .is_multiple_of(self.linear_num_key_heads)
        {
            bail!(
                "fields `linear_num_value_heads` ({}) and `linear_num_key_heads` ({}): value heads must be a multiple of key heads",
                self.linear_num_value_heads,
                self.linear_num_key_heads
            );
        }
        let rd = self.rotary_dim();
        if !rd.is_multiple_of(2) || rd > self.head_dim {
            bail!(
                "field `partial_rotary_factor` ({}) gives rotary dim {rd} for head_dim {}: must be even and ≤ head_dim",
                self.rope.partial_rotary_factor,
                self.head_dim
            );
        }
        if !(self.rope.theta.is_finite() && self.rope.theta > 0.0) {
            bail!("field `rope_theta` must be positive");
        }
        if let RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            ..
        } = self.rope.scaling
        {
            if !(factor.is_finite() && factor >= 1.0) || original_max_position_embeddings == 0 {
                bail!("field `rope_scaling`: YaRN needs a `factor` of at least 1 and a positive `original_max_position_embeddings`");
            }
        }
        if let Some(&l) = self
            .mlp_only_layers
            .iter()
            .find(|&&l| l >= self.num_hidden_layers)
        {
            bail!(
                "field `mlp_only_layers`: layer {l} does not exist ({} layers)",
                self.num_hidden_layers
            );
        }
        for l in 0..self.num_hidden_layers {
            if self.is_moe_layer(l) {
                if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_experts {
                    bail!(
                        "field `num_experts_per_tok` ({}) must be in 1..=num_experts ({})",
                        self.num_experts_per_tok,
                        self.num_experts
                    );
                }
                if self.moe_intermediate_size == 0 {
                    bail!("field `moe_intermediate_size` must be positive");
                }
            } else if self.intermediate_size == 0 {
                bail!("field `intermediate_size` must be positive: layer {l} has a dense MLP");
            }
        }
        if let Some(&id) = self
            .eos_token_ids
            .iter()
            .find(|&&id| id as usize >= self.vocab_size)
        {
            bail!(
                "field `eos_token_id`: {id} is outside the vocabulary ({})",
                self.vocab_size
            );
        }
        Ok(())
    }

    /// HF `Qwen3NextDecoderLayer`: MoE unless listed in `mlp_only_layers`, or experts are off,
    /// or the layer falls between `decoder_sparse_step` strides.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        !self.mlp_only_layers.contains(&layer)
            && self.num_experts > 0
            && (layer + 1).is_multiple_of(self.decoder_sparse_step)
    }

    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.rope.partial_rotary_factor) as usize
    }

    /// DeltaNet sizes (spec §2.3).
    pub fn linear_key_dim(&self) -> usize {
        self.linear_num_key_heads * self.linear_key_head_dim
    }
    pub fn linear_value_dim(&self) -> usize {
        self.linear_num_value_heads * self.linear_value_head_dim
    }
    pub fn linear_conv_dim(&self) -> usize {
        2 * self.linear_key_dim() + self.linear_value_dim()
    }
}

/// The text model's fields of a vision-language config: `text_config`, with what the
/// checkpoint keeps at the top level (`quantization_config`; `tie_word_embeddings`, true if
/// either level says so; token ids the text config lacks). Errors name `text_config.<field>`.
fn text_fields(top: &Map<String, Value>) -> Result<Map<String, Value>> {
    let mut o = match top.get("text_config") {
        Some(Value::Object(t)) => t.clone(),
        Some(_) => bail!("field `text_config`: expected an object"),
        None => bail!(
            "field `text_config` is missing (the text model's settings of a Qwen3.5 checkpoint)"
        ),
    };
    for k in ["quantization_config", "eos_token_id", "bos_token_id"] {
        if let Some(v) = top.get(k).filter(|v| !v.is_null()) {
            o.entry(k).or_insert_with(|| v.clone());
        }
    }
    let tied = opt_bool(top, "tie_word_embeddings")?.unwrap_or(false)
        || opt_bool(&o, "tie_word_embeddings")
            .context("in `text_config`")?
            .unwrap_or(false);
    o.insert("tie_word_embeddings".into(), Value::Bool(tied));
    Ok(o)
}

fn parse_layer_types(o: &Map<String, Value>, n: usize) -> Result<Vec<LayerType>> {
    if let Some(v) = o.get("layer_types").filter(|v| !v.is_null()) {
        let arr = v
            .as_array()
            .ok_or_else(|| anyhow!("field `layer_types`: expected an array of strings"))?;
        if arr.len() != n {
            bail!(
                "field `layer_types` has {} entries but `num_hidden_layers` is {n}",
                arr.len()
            );
        }
        return arr
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                Some("linear_attention") => Ok(LayerType::Linear),
                Some("full_attention") => Ok(LayerType::Full),
                _ => bail!("field `layer_types[{i}]`: expected \"linear_attention\" or \"full_attention\", found {t}"),
            })
            .collect();
    }
    let interval = opt_usize(o, "full_attention_interval")?.unwrap_or(4);
    if interval == 0 {
        bail!("field `full_attention_interval` must be positive");
    }
    Ok((0..n)
        .map(|i| {
            if (i + 1).is_multiple_of(interval) {
                LayerType::Full
            } else {
                LayerType::Linear
            }
        })
        .collect())
}

fn parse_rope(o: &Map<String, Value>) -> Result<RopeConfig> {
    // transformers v5 nests everything in `rope_parameters`; the released file is flat.
    let nested = o
        .get("rope_parameters")
        .filter(|v| !v.is_null())
        .map(|v| {
            v.as_object()
                .ok_or_else(|| anyhow!("field `rope_parameters`: expected an object"))
        })
        .transpose()?;
    let (field, params): (&str, Option<&Map<String, Value>>) = match nested {
        Some(p) => ("rope_parameters", Some(p)),
        None => {
            let s = o
                .get("rope_scaling")
                .filter(|v| !v.is_null())
                .map(|v| {
                    v.as_object()
                        .ok_or_else(|| anyhow!("field `rope_scaling`: expected an object or null"))
                })
                .transpose()?;
            ("rope_scaling", s)
        }
    };
    let theta = match params.and_then(|p| p.get("rope_theta")) {
        Some(v) => v
            .as_f64()
            .ok_or_else(|| anyhow!("field `{field}.rope_theta`: expected a number"))?,
        None => opt_f64(o, "rope_theta")?.unwrap_or(10000.0),
    };
    let partial_rotary_factor = match params.and_then(|p| p.get("partial_rotary_factor")) {
        Some(v) => v
            .as_f64()
            .ok_or_else(|| anyhow!("field `{field}.partial_rotary_factor`: expected a number"))?,
        None => opt_f64(o, "partial_rotary_factor")?.unwrap_or(0.25),
    };
    let scaling = match params {
        None => RopeScaling::None,
        Some(p) => {
            let kind = p
                .get("rope_type")
                .or_else(|| p.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            match kind {
                "default" => RopeScaling::None,
                "yarn" => {
                    let num = |k: &str| -> Result<Option<f64>> {
                        match p.get(k) {
                            None | Some(Value::Null) => Ok(None),
                            Some(v) => v
                                .as_f64()
                                .map(Some)
                                .ok_or_else(|| anyhow!("field `{field}.{k}`: expected a number")),
                        }
                    };
                    let max_pos = req_usize(o, "max_position_embeddings")?;
                    let original = match num("original_max_position_embeddings")? {
                        Some(v) => v as usize,
                        None => max_pos,
                    };
                    // transformers derives a missing factor from the context ratio.
                    let factor = match num("factor")? {
                        Some(f) => f,
                        None => max_pos as f64 / original as f64,
                    };
                    let truncate = match p.get("truncate") {
                        None | Some(Value::Null) => true,
                        Some(v) => v
                            .as_bool()
                            .ok_or_else(|| anyhow!("field `{field}.truncate`: expected a bool"))?,
                    };
                    RopeScaling::Yarn {
                        factor,
                        original_max_position_embeddings: original,
                        // transformers uses `or 32` / `or 1`, so 0 means the default as well.
                        beta_fast: num("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0),
                        beta_slow: num("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0),
                        attention_factor: num("attention_factor")?,
                        mscale: num("mscale")?,
                        mscale_all_dim: num("mscale_all_dim")?,
                        truncate,
                    }
                }
                other => bail!(
                    "field `{field}.rope_type`: {other:?} is not supported (expected \"default\" or \"yarn\")"
                ),
            }
        }
    };
    Ok(RopeConfig {
        theta,
        partial_rotary_factor,
        scaling,
    })
}

fn parse_quantization(o: &Map<String, Value>) -> Result<Option<Fp8Config>> {
    let Some(q) = o.get("quantization_config").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let q = q
        .as_object()
        .ok_or_else(|| anyhow!("field `quantization_config`: expected an object"))?;
    let method = q.get("quant_method").and_then(|v| v.as_str()).unwrap_or("");
    if method != "fp8" {
        bail!(
            "field `quantization_config.quant_method`: only \"fp8\" is supported, found {method:?}"
        );
    }
    if let Some(fmt) = q.get("fmt").and_then(|v| v.as_str()) {
        if fmt != "e4m3" {
            bail!("field `quantization_config.fmt`: only \"e4m3\" is supported, found {fmt:?}");
        }
    }
    let block = q
        .get("weight_block_size")
        .and_then(|v| v.as_array())
        .ok_or_else(|| {
            anyhow!("field `quantization_config.weight_block_size`: expected [N, K] (per-tensor FP8 is not supported)")
        })?;
    let dims: Vec<usize> = block
        .iter()
        .filter_map(|v| v.as_u64().map(|x| x as usize))
        .collect();
    if dims.len() != 2 || dims.contains(&0) {
        bail!("field `quantization_config.weight_block_size`: expected two positive integers, found {block:?}");
    }
    let modules_to_not_convert = q
        .get("modules_to_not_convert")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok(Some(Fp8Config {
        block_n: dims[0],
        block_k: dims[1],
        modules_to_not_convert,
    }))
}

/// Decoder layers accepted in config.json (the released models have 48).
const MAX_LAYERS: usize = 4096;

fn check_at_most(name: &str, v: usize, max: usize) -> Result<()> {
    if v > max {
        bail!("field `{name}` ({v}) is out of range: at most {max} is accepted");
    }
    Ok(())
}

fn req_usize(o: &Map<String, Value>, k: &str) -> Result<usize> {
    opt_usize(o, k)?.ok_or_else(|| anyhow!("field `{k}` is missing"))
}

fn opt_usize(o: &Map<String, Value>, k: &str) -> Result<Option<usize>> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|x| Some(x as usize))
            .ok_or_else(|| anyhow!("field `{k}`: expected a non-negative integer, found {v}")),
    }
}

fn opt_f64(o: &Map<String, Value>, k: &str) -> Result<Option<f64>> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| anyhow!("field `{k}`: expected a number, found {v}")),
    }
}

fn opt_bool(o: &Map<String, Value>, k: &str) -> Result<Option<bool>> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| anyhow!("field `{k}`: expected true or false, found {v}")),
    }
}

fn opt_usize_list(o: &Map<String, Value>, k: &str) -> Result<Option<Vec<usize>>> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| anyhow!("field `{k}`: expected integers, found {v}"))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(v) => bail!("field `{k}`: expected an array, found {v}"),
    }
}

/// `eos_token_id` is an integer or a list of integers.
pub fn opt_id_list(o: &Map<String, Value>, k: &str) -> Result<Vec<u32>> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|x| vec![x as u32])
            .ok_or_else(|| anyhow!("field `{k}`: expected a token id, found {n}")),
        Some(Value::Array(_)) => Ok(opt_usize_list(o, k)?
            .unwrap_or_default()
            .into_iter()
            .map(|x| x as u32)
            .collect()),
        Some(v) => bail!("field `{k}`: expected a token id or a list of ids, found {v}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Map<String, Value> {
        serde_json::from_str(
            r#"{"model_type":"qwen3_next","vocab_size":100,"hidden_size":16,"num_hidden_layers":4,
            "num_attention_heads":4,"num_key_value_heads":2,"head_dim":8,"max_position_embeddings":64,
            "rope_theta":10000000.0,"partial_rotary_factor":0.25,"full_attention_interval":4,
            "linear_conv_kernel_dim":4,"linear_key_head_dim":4,"linear_value_head_dim":4,
            "linear_num_key_heads":2,"linear_num_value_heads":4,"num_experts":4,"num_experts_per_tok":2,
            "moe_intermediate_size":8,"shared_expert_intermediate_size":8,"eos_token_id":[5,6]}"#,
        )
        .unwrap()
    }

    #[test]
    fn flat_layout() {
        let c = Config::from_json(&base()).unwrap();
        assert_eq!(
            c.layer_types,
            vec![
                LayerType::Linear,
                LayerType::Linear,
                LayerType::Linear,
                LayerType::Full
            ]
        );
        assert_eq!(c.rotary_dim(), 2);
        assert_eq!(c.rope.theta, 1e7);
        assert_eq!(c.eos_token_ids, vec![5, 6]);
        assert_eq!(c.rope.scaling, RopeScaling::None);
    }

    #[test]
    fn v5_layout_matches_flat() {
        let mut o = base();
        o.remove("rope_theta");
        o.remove("partial_rotary_factor");
        o.remove("full_attention_interval");
        o.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type":"default","rope_theta":1e7,"partial_rotary_factor":0.25}),
        );
        o.insert(
            "layer_types".into(),
            serde_json::json!([
                "linear_attention",
                "linear_attention",
                "linear_attention",
                "full_attention"
            ]),
        );
        assert_eq!(
            Config::from_json(&o).unwrap(),
            Config::from_json(&base()).unwrap()
        );
    }

    #[test]
    fn errors_name_the_field() {
        let mut o = base();
        o.remove("hidden_size");
        let e = Config::from_json(&o).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");

        let mut o = base();
        o.insert("num_key_value_heads".into(), serde_json::json!(3));
        let e = Config::from_json(&o).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");

        let mut o = base();
        o.insert("layer_types".into(), serde_json::json!(["full_attention"]));
        let e = Config::from_json(&o).unwrap_err().to_string();
        assert!(e.contains("layer_types"), "{e}");

        let mut o = base();
        o.insert("vocab_size".into(), serde_json::json!("many"));
        let e = Config::from_json(&o).unwrap_err().to_string();
        assert!(e.contains("vocab_size"), "{e}");

        let e = Config::from_json_str("{not json").unwrap_err().to_string();
        assert!(e.contains("JSON"), "{e}");
    }

    /// Values a corrupt or hostile config.json can hold: each an error naming its field,
    /// before anything is sized from it.
    #[test]
    fn out_of_range_values_are_refused() {
        let cases = [
            ("num_hidden_layers", serde_json::json!(1_000_000_000u64)),
            ("hidden_size", serde_json::json!(1u64 << 40)),
            ("vocab_size", serde_json::json!(1u64 << 30)),
            ("num_experts", serde_json::json!(1u64 << 20)),
            ("max_position_embeddings", serde_json::json!(1u64 << 40)),
            ("rms_norm_eps", serde_json::json!(-1.0)),
            ("rms_norm_eps", serde_json::json!(0.0)),
            ("rms_norm_eps", serde_json::json!(5.0)),
            ("partial_rotary_factor", serde_json::json!(0.0)),
            ("partial_rotary_factor", serde_json::json!(2.0)),
            ("rope_theta", serde_json::json!(-5.0)),
        ];
        for (field, value) in cases {
            let mut o = base();
            o.insert(field.into(), value.clone());
            let e = Config::from_json(&o)
                .err()
                .unwrap_or_else(|| panic!("{field} = {value} was accepted"))
                .to_string();
            assert!(e.contains(field), "{field} = {value}: {e}");
        }
        let mut o = base();
        o.insert(
            "rope_scaling".into(),
            serde_json::json!({"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 4096}),
        );
        let e = Config::from_json(&o).unwrap_err().to_string();
        assert!(e.contains("rope_scaling"), "{e}");
    }
}
