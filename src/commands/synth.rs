//! `qnext synth`: a random checkpoint in the released layout with the real shapes of
//! Qwen3-Next-80B-A3B, Qwen3.6-35B-A3B (`--family qwen3_5_moe`) or Qwen3.5-27B
//! (`--family qwen3_5`), but a chosen number of experts (and layers), for benchmarks.
//! Per-token work equals the real model's; only the expert pool (or the layer count) is
//! smaller so it fits in RAM. Written shard by shard, tensor by tensor.

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use qnext::checkpoint::quantize::{quantize_fp8, F32Rows};
use qnext::checkpoint::writer::{write_safetensors, TensorSpec};
use qnext::checkpoint::DType;
use std::path::PathBuf;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Family {
    /// Qwen3-Next-80B-A3B.
    #[value(name = "qwen3_next")]
    Qwen3Next,
    /// Qwen3.6-35B-A3B (and Qwen3.5-35B-A3B): MoE.
    #[value(name = "qwen3_5_moe")]
    Qwen35Moe,
    /// Qwen3.5-27B: dense.
    #[value(name = "qwen3_5")]
    Qwen35,
}

#[derive(ClapArgs)]
pub struct Args {
    /// Output folder (created).
    #[arg(long)]
    out: PathBuf,
    /// Whose shapes and layout: qwen3_next (80B-A3B), qwen3_5_moe (Qwen3.6-35B-A3B),
    /// qwen3_5 (Qwen3.5-27B).
    #[arg(long, value_enum, default_value = "qwen3_next")]
    family: Family,
    /// Routed experts per layer (the real models have 512 and 256; none for qwen3_5).
    #[arg(long, default_value_t = 32)]
    experts: usize,
    /// Decoder layers (the real models have 48, 40 and 64); every 4th is attention.
    #[arg(long)]
    layers: Option<usize>,
    /// Write the fine-grained FP8 layout (e4m3 + 128×128 block scales) instead of BF16.
    #[arg(long)]
    fp8: bool,
    /// Leave out the MTP head.
    #[arg(long)]
    no_mtp: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The real model's sizes (config.json) of each family.
struct Shape {
    family: Family,
    layers: usize,
    h: usize,
    vocab: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    hk: usize,
    hv: usize,
    dk: usize,
    dv: usize,
    /// Routed and shared expert width (MoE families).
    moe_i: usize,
    top_k: usize,
    /// Dense MLP width (qwen3_5).
    inter: usize,
    bos: u64,
    eos: u64,
}

impl Shape {
    fn of(family: Family) -> Shape {
        let next = Shape {
            family,
            layers: 48,
            h: 2048,
            vocab: 151936,
            heads: 16,
            kv_heads: 2,
            head_dim: 256,
            hk: 16,
            hv: 32,
            dk: 128,
            dv: 128,
            moe_i: 512,
            top_k: 10,
            inter: 5120,
            bos: 151643,
            eos: 151645,
        };
        match family {
            Family::Qwen3Next => next,
            Family::Qwen35Moe => Shape {
                layers: 40,
                vocab: 248320,
                top_k: 8,
                bos: 248044,
                eos: 248046,
                ..next
            },
            Family::Qwen35 => Shape {
                layers: 64,
                h: 5120,
                vocab: 248320,
                heads: 24,
                kv_heads: 4,
                hv: 48,
                moe_i: 0,
                top_k: 0,
                inter: 17408,
                bos: 248044,
                eos: 248046,
                ..next
            },
        }
    }

    fn moe(&self) -> bool {
        self.family != Family::Qwen35
    }

    fn next(&self) -> bool {
        self.family == Family::Qwen3Next
    }

    /// Where the text model's tensors live.
    fn prefix(&self) -> &'static str {
        if self.next() {
            "model."
        } else {
            "model.language_model."
        }
    }

    fn conv_dim(&self) -> usize {
        2 * self.hk * self.dk + self.hv * self.dv
    }
}

const KC: usize = 4;
const BLOCK: usize = 128;

/// The text model's settings, as config.json holds them (flat for Qwen3-Next, the
/// `text_config` of the Qwen3.5 releases).
fn text_config(a: &Args, s: &Shape, layers: usize) -> serde_json::Value {
    let mut c = serde_json::json!({
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": s.bos,
        "eos_token_id": s.eos,
        "full_attention_interval": 4,
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "hidden_size": s.h,
        "initializer_range": 0.02,
        "linear_conv_kernel_dim": KC,
        "linear_key_head_dim": s.dk,
        "linear_num_key_heads": s.hk,
        "linear_num_value_heads": s.hv,
        "linear_value_head_dim": s.dv,
        "max_position_embeddings": 262144,
        "num_attention_heads": s.heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false,
        "use_cache": true,
        "vocab_size": s.vocab
    });
    let o = c.as_object_mut().expect("object");
    let mut set = |k: &str, v: serde_json::Value| {
        o.insert(k.to_owned(), v);
    };
    if s.moe() {
        set("moe_intermediate_size", s.moe_i.into());
        set("shared_expert_intermediate_size", s.moe_i.into());
        set("num_experts", a.experts.into());
        set("num_experts_per_tok", s.top_k.min(a.experts).into());
    } else {
        set("intermediate_size", s.inter.into());
    }
    if s.next() {
        set("decoder_sparse_step", 1.into());
        set("intermediate_size", s.inter.into());
        set("mlp_only_layers", serde_json::json!([]));
        set("norm_topk_prob", true.into());
        set("partial_rotary_factor", 0.25.into());
        set("rope_scaling", serde_json::Value::Null);
        set("rope_theta", 10000000.into());
        set("torch_dtype", "bfloat16".into());
        set("use_sliding_window", false.into());
    } else {
        let types: Vec<&str> = (0..layers)
            .map(|l| {
                if is_attention(l) {
                    "full_attention"
                } else {
                    "linear_attention"
                }
            })
            .collect();
        set("layer_types", types.into());
        set("attn_output_gate", true.into());
        set("dtype", "bfloat16".into());
        set("mtp_num_hidden_layers", 1.into());
        set("mtp_use_dedicated_embeddings", false.into());
        set(
            "model_type",
            if s.moe() {
                "qwen3_5_moe_text"
            } else {
                "qwen3_5_text"
            }
            .into(),
        );
        set(
            "rope_parameters",
            serde_json::json!({"mrope_interleaved": true, "mrope_section": [11, 11, 10],
                "partial_rotary_factor": 0.25, "rope_theta": 10000000, "rope_type": "default"}),
        );
    }
    c
}

fn config(a: &Args, s: &Shape, layers: usize) -> serde_json::Value {
    let text = text_config(a, s, layers);
    let mut c = if s.next() {
        let mut c = text;
        c["architectures"] = serde_json::json!(["Qwen3NextForCausalLM"]);
        c["model_type"] = "qwen3_next".into();
        c
    } else {
        let (arch, mt) = if s.moe() {
            ("Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe")
        } else {
            ("Qwen3_5ForConditionalGeneration", "qwen3_5")
        };
        // The vision tower is not written: the engine never reads `model.visual.*`.
        serde_json::json!({
            "architectures": [arch],
            "model_type": mt,
            "text_config": text,
            "tie_word_embeddings": false,
            "image_token_id": 248056,
            "video_token_id": 248057,
            "vision_start_token_id": 248053,
            "vision_end_token_id": 248054,
            "vision_config": {"depth": 27, "hidden_size": 1152, "out_hidden_size": s.h,
                "model_type": mt},
        })
    };
    if a.fp8 {
        c["quantization_config"] = serde_json::json!({
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [BLOCK, BLOCK],
            "modules_to_not_convert": not_converted(a, s, layers),
        });
    }
    c
}

/// `modules_to_not_convert` as the released FP8 checkpoints list it (spec §4.2; for Qwen3.5,
/// what their block scales show: `in_proj_a`/`in_proj_b`, router and shared-expert gate).
fn not_converted(a: &Args, s: &Shape, layers: usize) -> Vec<String> {
    let mut v = vec!["lm_head".to_owned()];
    let moe = if s.moe() {
        &["mlp.gate", "mlp.shared_expert_gate"][..]
    } else {
        &[]
    };
    for l in 0..layers {
        let p = format!("{}layers.{l}", s.prefix());
        let mut names = vec!["input_layernorm", "post_attention_layernorm"];
        names.extend(moe);
        if is_attention(l) {
            names.extend(["self_attn.q_norm", "self_attn.k_norm"]);
        } else {
            names.extend([
                "linear_attn.A_log",
                "linear_attn.conv1d",
                "linear_attn.dt_bias",
                "linear_attn.norm",
            ]);
            if s.next() {
                names.push("linear_attn.in_proj_ba");
            } else {
                names.extend(["linear_attn.in_proj_a", "linear_attn.in_proj_b"]);
            }
        }
        v.extend(names.iter().map(|n| format!("{p}.{n}")));
    }
    if !a.no_mtp {
        for n in [
            "mtp.fc",
            "mtp.norm",
            "mtp.pre_fc_norm_embedding",
            "mtp.pre_fc_norm_hidden",
        ] {
            v.push(n.to_owned());
        }
        let mut names = vec![
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.k_norm",
            "self_attn.q_norm",
        ];
        names.extend(moe);
        for n in names {
            v.push(format!("mtp.layers.0.{n}"));
        }
    }
    v
}

fn is_attention(l: usize) -> bool {
    (l + 1).is_multiple_of(4)
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy)]
enum Init {
    /// Uniform with this standard deviation; `quantize` for FP8 Linear weights.
    Uniform {
        std: f32,
        quantize: bool,
    },
    /// Zero-centred norm weights (applied as 1 + w).
    NormZc,
    /// The plain gated-norm weight of DeltaNet.
    NormPlain,
    ALog,
}

struct Planned {
    spec: TensorSpec,
    init: Init,
}

fn linear(out: &mut Vec<Planned>, name: String, n: usize, k: usize, fp8: bool) {
    let std = 1.0 / (k as f32).sqrt();
    if fp8 {
        out.push(Planned {
            spec: TensorSpec {
                name: format!("{name}_scale_inv"),
                dtype: DType::F32,
                shape: vec![n.div_ceil(BLOCK), k.div_ceil(BLOCK)],
            },
            init: Init::Uniform {
                std,
                quantize: true,
            },
        });
        out.push(Planned {
            spec: TensorSpec {
                name,
                dtype: DType::F8E4M3,
                shape: vec![n, k],
            },
            init: Init::Uniform {
                std,
                quantize: true,
            },
        });
    } else {
        out.push(Planned {
            spec: TensorSpec {
                name,
                dtype: DType::BF16,
                shape: vec![n, k],
            },
            init: Init::Uniform {
                std,
                quantize: false,
            },
        });
    }
}

fn vector(out: &mut Vec<Planned>, name: String, shape: Vec<usize>, init: Init, dtype: DType) {
    out.push(Planned {
        spec: TensorSpec { name, dtype, shape },
        init,
    });
}

/// A stack of `e` matrices `[n, k]` in one BF16 tensor `[e, n, k]` (the fused experts of the
/// Qwen3.5 BF16 releases).
fn stacked(out: &mut Vec<Planned>, name: String, e: usize, n: usize, k: usize) {
    let std = 1.0 / (k as f32).sqrt();
    let init = Init::Uniform {
        std,
        quantize: false,
    };
    vector(out, name, vec![e, n, k], init, DType::BF16);
}

/// The SwiGLU weights `{p}gate_proj`, `{p}up_proj`, `{p}down_proj` of width `inter`.
fn swiglu(out: &mut Vec<Planned>, p: &str, h: usize, inter: usize, fp8: bool) {
    linear(out, format!("{p}gate_proj.weight"), inter, h, fp8);
    linear(out, format!("{p}up_proj.weight"), inter, h, fp8);
    linear(out, format!("{p}down_proj.weight"), h, inter, fp8);
}

fn attention_and_moe(
    out: &mut Vec<Planned>,
    p: &str,
    s: &Shape,
    attention: bool,
    experts: usize,
    fp8: bool,
) {
    let (h, bf16) = (s.h, DType::BF16);
    let norm = |out: &mut Vec<Planned>, name: String, len: usize| {
        vector(out, name, vec![len], Init::NormZc, bf16)
    };
    norm(out, format!("{p}input_layernorm.weight"), h);
    norm(out, format!("{p}post_attention_layernorm.weight"), h);
    if attention {
        let (qd, kvd) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        linear(out, format!("{p}self_attn.q_proj.weight"), 2 * qd, h, fp8);
        linear(out, format!("{p}self_attn.k_proj.weight"), kvd, h, fp8);
        linear(out, format!("{p}self_attn.v_proj.weight"), kvd, h, fp8);
        linear(out, format!("{p}self_attn.o_proj.weight"), h, qd, fp8);
        norm(out, format!("{p}self_attn.q_norm.weight"), s.head_dim);
        norm(out, format!("{p}self_attn.k_norm.weight"), s.head_dim);
    } else {
        let la = format!("{p}linear_attn.");
        let vd = s.hv * s.dv;
        if s.next() {
            let rows = 2 * s.hk * s.dk + 2 * vd;
            linear(out, format!("{la}in_proj_qkvz.weight"), rows, h, fp8);
            linear(out, format!("{la}in_proj_ba.weight"), 2 * s.hv, h, false);
        } else {
            linear(out, format!("{la}in_proj_qkv.weight"), s.conv_dim(), h, fp8);
            linear(out, format!("{la}in_proj_z.weight"), vd, h, fp8);
            linear(out, format!("{la}in_proj_b.weight"), s.hv, h, false);
            linear(out, format!("{la}in_proj_a.weight"), s.hv, h, false);
        }
        linear(out, format!("{la}out_proj.weight"), h, vd, fp8);
        let uniform = |std| Init::Uniform {
            std,
            quantize: false,
        };
        let conv_shape = vec![s.conv_dim(), 1, KC];
        vector(
            out,
            format!("{la}conv1d.weight"),
            conv_shape,
            uniform(0.5),
            bf16,
        );
        vector(out, format!("{la}dt_bias"), vec![s.hv], uniform(1.0), bf16);
        vector(
            out,
            format!("{la}A_log"),
            vec![s.hv],
            Init::ALog,
            DType::F32,
        );
        let norm_w = format!("{la}norm.weight");
        vector(out, norm_w, vec![s.dv], Init::NormPlain, DType::F32);
    }
    if !s.moe() {
        swiglu(out, &format!("{p}mlp."), h, s.inter, fp8);
        return;
    }
    linear(out, format!("{p}mlp.gate.weight"), experts, h, false);
    // Qwen3-Next and every FP8 release store experts one by one; the Qwen3.5 / 3.6 BF16
    // releases stack them.
    if s.next() || fp8 {
        for e in 0..experts {
            swiglu(out, &format!("{p}mlp.experts.{e}."), h, s.moe_i, fp8);
        }
    } else {
        let x = format!("{p}mlp.experts.");
        stacked(out, format!("{x}gate_up_proj"), experts, 2 * s.moe_i, h);
        stacked(out, format!("{x}down_proj"), experts, h, s.moe_i);
    }
    swiglu(out, &format!("{p}mlp.shared_expert."), h, s.moe_i, fp8);
    linear(
        out,
        format!("{p}mlp.shared_expert_gate.weight"),
        1,
        h,
        false,
    );
}

/// A splitmix64 stream seeded from the run seed and the tensor name, so every tensor is
/// reproducible on its own.
struct Rng(u64);

impl Rng {
    fn for_tensor(seed: u64, name: &str) -> Rng {
        let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01B3);
        }
        Rng(h)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn values(p: &Planned, seed: u64, base_name: &str) -> Vec<f32> {
    let n: usize = p.spec.shape.iter().product();
    let mut r = Rng::for_tensor(seed, base_name);
    let sqrt3 = 3f32.sqrt();
    match p.init {
        Init::Uniform { std, .. } => (0..n).map(|_| r.unit() * std * sqrt3).collect(),
        Init::NormZc => (0..n).map(|_| 0.1 * r.unit()).collect(),
        Init::NormPlain => (0..n).map(|_| 1.0 + 0.1 * r.unit()).collect(),
        Init::ALog => (0..n)
            .map(|_| (1.0 + 7.5 * (r.unit() + 1.0)).ln())
            .collect(),
    }
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
        .collect()
}

/// FP8 weight bytes and f32 scale bytes, quantised per 128×128 block as the released
/// checkpoints are (random values are finite, so this cannot fail).
fn quantize(v: &[f32], n: usize, k: usize) -> (Vec<u8>, Vec<u8>) {
    let q = quantize_fp8(n, k, &F32Rows { values: v, k }).expect("finite random weights");
    (
        q.codes,
        q.scale_inv.iter().flat_map(|s| s.to_le_bytes()).collect(),
    )
}

pub fn main(a: Args) -> Result<()> {
    let s = Shape::of(a.family);
    let layers = a.layers.unwrap_or(s.layers);
    if (s.moe() && a.experts == 0) || layers == 0 {
        bail!("--experts and --layers must be positive");
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let prefix = s.prefix();
    // Shards: embeddings, then 4 layers each, then the head (and MTP).
    let mut shards: Vec<Vec<Planned>> = Vec::new();
    let mut first = Vec::new();
    vector(
        &mut first,
        format!("{prefix}embed_tokens.weight"),
        vec![s.vocab, s.h],
        Init::Uniform {
            std: 1.0,
            quantize: false,
        },
        DType::BF16,
    );
    shards.push(first);
    for chunk in (0..layers).collect::<Vec<_>>().chunks(4) {
        let mut shard = Vec::new();
        for &l in chunk {
            let p = format!("{prefix}layers.{l}.");
            attention_and_moe(&mut shard, &p, &s, is_attention(l), a.experts, a.fp8);
        }
        shards.push(shard);
    }
    let mut last = Vec::new();
    let norm = format!("{prefix}norm.weight");
    vector(&mut last, norm, vec![s.h], Init::NormZc, DType::BF16);
    linear(&mut last, "lm_head.weight".into(), s.vocab, s.h, false);
    if !a.no_mtp {
        linear(&mut last, "mtp.fc.weight".into(), s.h, 2 * s.h, false);
        for n in [
            "mtp.pre_fc_norm_embedding.weight",
            "mtp.pre_fc_norm_hidden.weight",
            "mtp.norm.weight",
        ] {
            vector(&mut last, n.into(), vec![s.h], Init::NormZc, DType::BF16);
        }
        attention_and_moe(&mut last, "mtp.layers.0.", &s, true, a.experts, a.fp8);
    }
    shards.push(last);

    let count = shards.len();
    let total: usize = shards.iter().flatten().map(|p| p.spec.bytes()).sum();
    let pb = qnext::progress::bar(total as u64, "writing");
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, count);
        let specs: Vec<TensorSpec> = shard
            .iter()
            .map(|p| TensorSpec {
                name: p.spec.name.clone(),
                dtype: p.spec.dtype,
                shape: p.spec.shape.clone(),
            })
            .collect();
        for s in &specs {
            weight_map.insert(s.name.clone(), serde_json::Value::String(file.clone()));
        }
        // An FP8 weight and its scales come from one quantisation: the scales are listed first
        // and computed together with the weight, which is then handed out from `pending`.
        let mut pending: Option<Vec<u8>> = None;
        write_safetensors(&a.out.join(&file), &specs, |spec| {
            let p = shard
                .iter()
                .find(|p| p.spec.name == spec.name)
                .expect("planned tensor");
            pb.inc(spec.bytes() as u64);
            Ok(match (p.init, spec.dtype) {
                (Init::Uniform { quantize: true, .. }, DType::F32) => {
                    let base = spec.name.trim_end_matches("_scale_inv");
                    let w = shard
                        .iter()
                        .find(|q| q.spec.name == base)
                        .expect("weight after scale");
                    let (n, k) = (w.spec.shape[0], w.spec.shape[1]);
                    let (q, s) = quantize(&values(w, a.seed, base), n, k);
                    pending = Some(q);
                    s
                }
                (_, DType::F8E4M3) => pending.take().expect("scales written before weight"),
                (_, DType::F32) => values(p, a.seed, &spec.name)
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                _ => bf16_bytes(&values(p, a.seed, &spec.name)),
            })
        })?;
    }
    pb.finish_and_clear();
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        a.out.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?,
    )?;
    std::fs::write(
        a.out.join("config.json"),
        serde_json::to_string_pretty(&config(&a, &s, layers))?,
    )?;
    std::fs::write(
        a.out.join("generation_config.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "bos_token_id": s.bos, "do_sample": true, "eos_token_id": [s.eos, s.bos],
            "pad_token_id": s.bos, "temperature": 0.7, "top_k": 20, "top_p": 0.8
        }))?,
    )?;
    eprintln!(
        "wrote {} ({:.2} GB in {count} shards)",
        a.out.display(),
        total as f64 / 1e9
    );
    Ok(())
}
