//! `qnext synth`: a random checkpoint in the released layout with the real Qwen3-Next-80B-A3B
//! shapes but a chosen number of experts (and layers), for benchmarks. Per-token work equals
//! the real model's; only the expert pool is smaller so it fits in RAM. Written shard by
//! shard, tensor by tensor.

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use qnext::checkpoint::quantize::{quantize_fp8, F32Rows};
use qnext::checkpoint::writer::{write_safetensors, TensorSpec};
use qnext::checkpoint::DType;
use std::path::PathBuf;

#[derive(ClapArgs)]
pub struct Args {
    /// Output folder (created).
    #[arg(long)]
    out: PathBuf,
    /// Routed experts per layer (the real model has 512).
    #[arg(long, default_value_t = 32)]
    experts: usize,
    /// Decoder layers (the real model has 48); every 4th is attention.
    #[arg(long, default_value_t = 48)]
    layers: usize,
    /// Write the fine-grained FP8 layout (e4m3 + 128×128 block scales) instead of BF16.
    #[arg(long)]
    fp8: bool,
    /// Leave out the MTP head.
    #[arg(long)]
    no_mtp: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

const H: usize = 2048;
const VOCAB: usize = 151936;
const HEADS: usize = 16;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 256;
const HK: usize = 16;
const HV: usize = 32;
const DK: usize = 128;
const DV: usize = 128;
const KC: usize = 4;
const MOE_I: usize = 512;
const TOP_K: usize = 10;
const BLOCK: usize = 128;

fn config(a: &Args) -> serde_json::Value {
    let mut c = serde_json::json!({
        "architectures": ["Qwen3NextForCausalLM"],
        "model_type": "qwen3_next",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "decoder_sparse_step": 1,
        "full_attention_interval": 4,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": H,
        "initializer_range": 0.02,
        "intermediate_size": 5120,
        "linear_conv_kernel_dim": KC,
        "linear_key_head_dim": DK,
        "linear_num_key_heads": HK,
        "linear_num_value_heads": HV,
        "linear_value_head_dim": DV,
        "max_position_embeddings": 262144,
        "mlp_only_layers": [],
        "moe_intermediate_size": MOE_I,
        "norm_topk_prob": true,
        "num_attention_heads": HEADS,
        "num_experts": a.experts,
        "num_experts_per_tok": TOP_K.min(a.experts),
        "num_hidden_layers": a.layers,
        "num_key_value_heads": KV_HEADS,
        "partial_rotary_factor": 0.25,
        "rms_norm_eps": 1e-6,
        "rope_scaling": null,
        "rope_theta": 10000000,
        "shared_expert_intermediate_size": MOE_I,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "use_cache": true,
        "use_sliding_window": false,
        "vocab_size": VOCAB
    });
    if a.fp8 {
        c["quantization_config"] = serde_json::json!({
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [BLOCK, BLOCK],
            "modules_to_not_convert": not_converted(a),
        });
    }
    c
}

/// `modules_to_not_convert` as the released FP8 checkpoints list it (spec §4.2).
fn not_converted(a: &Args) -> Vec<String> {
    let mut v = vec!["lm_head".to_owned()];
    for l in 0..a.layers {
        let p = format!("model.layers.{l}");
        let mut names = vec![
            "input_layernorm",
            "post_attention_layernorm",
            "mlp.gate",
            "mlp.shared_expert_gate",
        ];
        if is_attention(l) {
            names.extend(["self_attn.q_norm", "self_attn.k_norm"]);
        } else {
            names.extend([
                "linear_attn.A_log",
                "linear_attn.conv1d",
                "linear_attn.dt_bias",
                "linear_attn.in_proj_ba",
                "linear_attn.norm",
            ]);
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
        for n in [
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.k_norm",
            "self_attn.q_norm",
            "mlp.gate",
            "mlp.shared_expert_gate",
        ] {
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

fn attention_and_moe(out: &mut Vec<Planned>, p: &str, attention: bool, experts: usize, fp8: bool) {
    let bf16 = DType::BF16;
    vector(
        out,
        format!("{p}input_layernorm.weight"),
        vec![H],
        Init::NormZc,
        bf16,
    );
    vector(
        out,
        format!("{p}post_attention_layernorm.weight"),
        vec![H],
        Init::NormZc,
        bf16,
    );
    if attention {
        linear(
            out,
            format!("{p}self_attn.q_proj.weight"),
            2 * HEADS * HEAD_DIM,
            H,
            fp8,
        );
        linear(
            out,
            format!("{p}self_attn.k_proj.weight"),
            KV_HEADS * HEAD_DIM,
            H,
            fp8,
        );
        linear(
            out,
            format!("{p}self_attn.v_proj.weight"),
            KV_HEADS * HEAD_DIM,
            H,
            fp8,
        );
        linear(
            out,
            format!("{p}self_attn.o_proj.weight"),
            H,
            HEADS * HEAD_DIM,
            fp8,
        );
        vector(
            out,
            format!("{p}self_attn.q_norm.weight"),
            vec![HEAD_DIM],
            Init::NormZc,
            bf16,
        );
        vector(
            out,
            format!("{p}self_attn.k_norm.weight"),
            vec![HEAD_DIM],
            Init::NormZc,
            bf16,
        );
    } else {
        let la = format!("{p}linear_attn.");
        linear(
            out,
            format!("{la}in_proj_qkvz.weight"),
            2 * HK * DK + 2 * HV * DV,
            H,
            fp8,
        );
        linear(out, format!("{la}in_proj_ba.weight"), 2 * HV, H, false);
        linear(out, format!("{la}out_proj.weight"), H, HV * DV, fp8);
        vector(
            out,
            format!("{la}conv1d.weight"),
            vec![2 * HK * DK + HV * DV, 1, KC],
            Init::Uniform {
                std: 0.5,
                quantize: false,
            },
            bf16,
        );
        vector(
            out,
            format!("{la}dt_bias"),
            vec![HV],
            Init::Uniform {
                std: 1.0,
                quantize: false,
            },
            bf16,
        );
        vector(out, format!("{la}A_log"), vec![HV], Init::ALog, DType::F32);
        vector(
            out,
            format!("{la}norm.weight"),
            vec![DV],
            Init::NormPlain,
            DType::F32,
        );
    }
    linear(out, format!("{p}mlp.gate.weight"), experts, H, false);
    for e in 0..experts {
        linear(
            out,
            format!("{p}mlp.experts.{e}.gate_proj.weight"),
            MOE_I,
            H,
            fp8,
        );
        linear(
            out,
            format!("{p}mlp.experts.{e}.up_proj.weight"),
            MOE_I,
            H,
            fp8,
        );
        linear(
            out,
            format!("{p}mlp.experts.{e}.down_proj.weight"),
            H,
            MOE_I,
            fp8,
        );
    }
    linear(
        out,
        format!("{p}mlp.shared_expert.gate_proj.weight"),
        MOE_I,
        H,
        fp8,
    );
    linear(
        out,
        format!("{p}mlp.shared_expert.up_proj.weight"),
        MOE_I,
        H,
        fp8,
    );
    linear(
        out,
        format!("{p}mlp.shared_expert.down_proj.weight"),
        H,
        MOE_I,
        fp8,
    );
    linear(
        out,
        format!("{p}mlp.shared_expert_gate.weight"),
        1,
        H,
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
    if a.experts == 0 || a.layers == 0 {
        bail!("--experts and --layers must be positive");
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    // Shards: embeddings, then 4 layers each, then the head (and MTP).
    let mut shards: Vec<Vec<Planned>> = Vec::new();
    let mut first = Vec::new();
    vector(
        &mut first,
        "model.embed_tokens.weight".into(),
        vec![VOCAB, H],
        Init::Uniform {
            std: 1.0,
            quantize: false,
        },
        DType::BF16,
    );
    shards.push(first);
    for chunk in (0..a.layers).collect::<Vec<_>>().chunks(4) {
        let mut s = Vec::new();
        for &l in chunk {
            attention_and_moe(
                &mut s,
                &format!("model.layers.{l}."),
                is_attention(l),
                a.experts,
                a.fp8,
            );
        }
        shards.push(s);
    }
    let mut last = Vec::new();
    vector(
        &mut last,
        "model.norm.weight".into(),
        vec![H],
        Init::NormZc,
        DType::BF16,
    );
    linear(&mut last, "lm_head.weight".into(), VOCAB, H, false);
    if !a.no_mtp {
        linear(&mut last, "mtp.fc.weight".into(), H, 2 * H, false);
        for n in [
            "mtp.pre_fc_norm_embedding.weight",
            "mtp.pre_fc_norm_hidden.weight",
            "mtp.norm.weight",
        ] {
            vector(&mut last, n.into(), vec![H], Init::NormZc, DType::BF16);
        }
        attention_and_moe(&mut last, "mtp.layers.0.", true, a.experts, a.fp8);
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
        serde_json::to_string_pretty(&config(&a))?,
    )?;
    std::fs::write(
        a.out.join("generation_config.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "bos_token_id": 151643, "do_sample": true, "eos_token_id": [151645, 151643],
            "pad_token_id": 151643, "temperature": 0.7, "top_k": 20, "top_p": 0.8
        }))?,
    )?;
    eprintln!(
        "wrote {} ({:.2} GB in {count} shards)",
        a.out.display(),
        total as f64 / 1e9
    );
    Ok(())
}
