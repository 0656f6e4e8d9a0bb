//! `qnext inspect`: what a checkpoint holds.

use anyhow::Result;
use qnext::checkpoint::Checkpoint;
use qnext::config::{Config, LayerType, RopeScaling};
use std::path::Path;

pub fn main(dir: &Path) -> Result<()> {
    let cfg = Config::from_file(&dir.join("config.json"))?;
    let ck = Checkpoint::open(dir)?;
    let full = cfg
        .layer_types
        .iter()
        .filter(|&&t| t == LayerType::Full)
        .count();
    println!("model            {}", dir.display());
    println!(
        "layers           {} ({} Gated DeltaNet, {} gated attention)",
        cfg.num_hidden_layers,
        cfg.num_hidden_layers - full,
        full
    );
    println!("hidden           {}", cfg.hidden_size);
    println!("vocab            {}", cfg.vocab_size);
    println!(
        "attention        {} query / {} KV heads of {}, rotary dim {}, theta {}",
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.rotary_dim(),
        cfg.rope.theta
    );
    if let RopeScaling::Yarn {
        factor,
        original_max_position_embeddings,
        ..
    } = cfg.rope.scaling
    {
        println!(
            "yarn             factor {factor}, original context {original_max_position_embeddings}"
        );
    }
    println!(
        "deltanet         {} QK / {} V heads, dk {} dv {}, conv {}",
        cfg.linear_num_key_heads,
        cfg.linear_num_value_heads,
        cfg.linear_key_head_dim,
        cfg.linear_value_head_dim,
        cfg.linear_conv_kernel_dim
    );
    println!(
        "moe              {} experts, top-{}, width {}, shared {}, norm_topk_prob {}",
        cfg.num_experts,
        cfg.num_experts_per_tok,
        cfg.moe_intermediate_size,
        cfg.shared_expert_intermediate_size,
        cfg.norm_topk_prob
    );
    println!("context          {}", cfg.context_length());
    if let Some(q) = &cfg.quantization {
        println!(
            "quantization     fp8 e4m3, blocks {}x{}",
            q.block_n, q.block_k
        );
    }

    // Parameter counts from the tensor shapes; expert tensors count top-k/E towards "active".
    let (mut total, mut active, mut mtp) = (0f64, 0f64, 0f64);
    let route = if cfg.num_experts > 0 {
        cfg.num_experts_per_tok as f64 / cfg.num_experts as f64
    } else {
        1.0
    };
    for name in ck.names() {
        if name.ends_with("_scale_inv") {
            continue;
        }
        let n = ck.get(name)?.numel() as f64;
        if name.starts_with("mtp.") {
            mtp += n;
            continue;
        }
        total += n;
        active += if name.contains(".mlp.experts.") {
            n * route
        } else {
            n
        };
    }
    println!("parameters       {:.0} ({:.3} B)", total, total / 1e9);
    println!("active per token {:.0} ({:.3} B)", active, active / 1e9);
    if mtp > 0.0 {
        println!("mtp parameters   {:.0} ({:.3} B)", mtp, mtp / 1e9);
    }
    for (dtype, (count, bytes)) in ck.bytes_by_dtype() {
        println!(
            "dtype {dtype:<10} {count} tensors, {:.3} GB",
            bytes as f64 / 1e9
        );
    }
    Ok(())
}
