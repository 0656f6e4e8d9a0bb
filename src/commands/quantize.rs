//! `qnext quantize`: a BF16 checkpoint folder → the released fine-grained FP8 layout (spec §4).
//!
//! Tensor by tensor from the mapped input into a hidden folder beside the output, renamed into
//! place only when everything is written: a failure, Ctrl-C or SIGTERM leaves no output behind.

use anyhow::{anyhow, bail, Context, Result};
use clap::Args as ClapArgs;
use qnext::checkpoint::quantize::{quantize_fp8_serial, Bf16Rows, F32Rows, Fp8Matrix, BLOCK};
use qnext::checkpoint::writer::{write_safetensors_parallel, Parts, TensorSpec};
use qnext::checkpoint::{Checkpoint, DType, TensorRef};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(ClapArgs)]
pub struct Args {
    /// The BF16 checkpoint folder (config.json, safetensors, tokenizer files).
    #[arg(long)]
    model: PathBuf,
    /// The folder to write; it must not exist unless --force is given.
    #[arg(long)]
    out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
}

/// Whether a tensor is one of the Linear weights the released FP8 checkpoints store as e4m3
/// (spec §4.2): the projections of DeltaNet, attention, experts, shared experts and dense
/// MLPs, in the decoder layers and the MTP layer. Routers (`mlp.gate`), `in_proj_ba`, norms,
/// embeddings, `lm_head` and `mtp.fc` stay as they are.
pub fn is_quantized(name: &str) -> bool {
    let Some(module) = name.strip_suffix(".weight") else {
        return false;
    };
    let module = text_module(module);
    if !(module.starts_with("model.layers.") || module.starts_with("mtp.layers.")) {
        return false;
    }
    let parts: Vec<&str> = module.split('.').collect();
    let tail = &parts[3..];
    matches!(
        tail,
        [
            "linear_attn",
            "in_proj_qkvz" | "in_proj_qkv" | "in_proj_z" | "out_proj"
        ] | ["self_attn", "q_proj" | "k_proj" | "v_proj" | "o_proj"]
            | ["mlp", "gate_proj" | "up_proj" | "down_proj"]
            | [
                "mlp",
                "shared_expert",
                "gate_proj" | "up_proj" | "down_proj"
            ]
            | ["mlp", "experts", _, "gate_proj" | "up_proj" | "down_proj"]
    )
}

/// A module of the Qwen3.5 releases' text model (`model.language_model.…`) under the name it
/// has in Qwen3-Next (`model.…`), so that one set of rules covers both.
fn text_module(module: &str) -> Cow<'_, str> {
    match module.strip_prefix("model.language_model.") {
        Some(rest) => Cow::Owned(format!("model.{rest}")),
        None => Cow::Borrowed(module),
    }
}

/// The Qwen3.5 BF16 releases stack each layer's experts in two 3-D tensors; the FP8 releases
/// store them one by one, each with its scales. For `…mlp.experts.gate_up_proj` `[E, 2I, H]`
/// (gate rows first) and `…mlp.experts.down_proj` `[E, H, I]`: the per-expert matrices it
/// becomes, as (name, first row in the stack) with `rows` rows each.
fn unstacked(name: &str, shape: &[usize]) -> Option<(Vec<(String, usize)>, usize)> {
    let &[e, r, _] = shape else { return None };
    if let Some(stem) = name.strip_suffix("mlp.experts.gate_up_proj") {
        let i = r / 2;
        let names = (0..e)
            .flat_map(|x| {
                [
                    (format!("{stem}mlp.experts.{x}.gate_proj.weight"), x * r),
                    (format!("{stem}mlp.experts.{x}.up_proj.weight"), x * r + i),
                ]
            })
            .collect();
        return Some((names, i));
    }
    let stem = name.strip_suffix("mlp.experts.down_proj")?;
    let names = (0..e)
        .map(|x| (format!("{stem}mlp.experts.{x}.down_proj.weight"), x * r))
        .collect();
    Some((names, r))
}

/// `modules_to_not_convert` for the tensors that stay unquantised: the module of each (its
/// name without `.weight`/`.bias`; parameters such as `A_log` by their own name), except the
/// embeddings and the final norm, which are not Linear modules and are not listed in the
/// releases. `lm_head` first, then the layers in order (modules alphabetically), then MTP.
pub fn modules_to_not_convert<'a>(kept: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut modules: Vec<(u8, usize, String)> = Vec::new();
    for name in kept {
        let module = name
            .strip_suffix(".weight")
            .or_else(|| name.strip_suffix(".bias"))
            .unwrap_or(name);
        // The vision tower of the Qwen3.5 releases, as one module.
        let module = if module.starts_with("model.visual.") {
            "model.visual"
        } else {
            module
        };
        let plain = text_module(module);
        if plain == "model.embed_tokens" || plain == "model.norm" {
            continue;
        }
        let layer = |p: &str| {
            plain
                .strip_prefix(p)
                .and_then(|r| r.split('.').next())
                .and_then(|l| l.parse::<usize>().ok())
        };
        let key = match (layer("model.layers."), module.starts_with("mtp.")) {
            _ if module == "lm_head" => (0, 0),
            (Some(l), _) => (1, l),
            (None, true) => (2, 0),
            _ => (3, 0),
        };
        modules.push((key.0, key.1, module.to_owned()));
    }
    modules.sort();
    modules.dedup();
    modules.into_iter().map(|(_, _, m)| m).collect()
}

/// The hidden folder the output is written into before it is renamed into place; removed
/// when dropped unless kept.
struct Staging {
    path: PathBuf,
    keep: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn sibling(out: &Path, what: &str) -> Result<PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| anyhow!("--out {} has no folder name", out.display()))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    Ok(parent.join(format!(
        ".{}.{what}-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Test hook: a pause after each tensor, so that a test can interrupt a run midway.
fn pause_per_tensor() -> Option<std::time::Duration> {
    std::env::var("QNEXT_QUANTIZE_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(std::time::Duration::from_millis)
}

fn quantize_tensor(t: &TensorRef) -> Result<Fp8Matrix> {
    let &[n, k] = t.shape else {
        bail!(
            "tensor `{}` in {} has shape {:?}; a quantised Linear weight must be 2-D",
            t.name,
            t.file.display(),
            t.shape
        );
    };
    quantize_rows(t, 0, n, k)
}

/// Rows `first..first + n` (of width `k`) of `t`, quantised as one matrix.
fn quantize_rows(t: &TensorRef, first: usize, n: usize, k: usize) -> Result<Fp8Matrix> {
    let part = first * k..(first + n) * k;
    let q = match t.dtype {
        DType::BF16 => {
            let e = t.elems_in::<u16>(part);
            quantize_fp8_serial(
                n,
                k,
                &Bf16Rows {
                    bits: e.as_slice(),
                    k,
                },
            )
        }
        DType::F32 => {
            let e = t.elems_in::<f32>(part);
            quantize_fp8_serial(
                n,
                k,
                &F32Rows {
                    values: e.as_slice(),
                    k,
                },
            )
        }
        DType::F16 => {
            let v = t.to_f32()?;
            let values = &v[part];
            quantize_fp8_serial(n, k, &F32Rows { values, k })
        }
        other => bail!(
            "tensor `{}` in {} has dtype {}, expected BF16 (or F32/F16) to quantise",
            t.name,
            t.file.display(),
            other.name()
        ),
    };
    q.with_context(|| format!("tensor `{}` in {}", t.name, t.file.display()))
}

pub fn main(a: Args) -> Result<()> {
    let t0 = Instant::now();
    let config_path = a.model.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    if let Some(q) = config.get("quantization_config") {
        bail!(
            "{} is already quantised (config.json has a quantization_config, quant_method {}); \
             quantize the BF16 checkpoint it was made from",
            a.model.display(),
            q.get("quant_method").unwrap_or(&serde_json::Value::Null)
        );
    }
    let ck = Checkpoint::open(&a.model)?;
    let layout = ck.layout();
    for (_, names) in &layout {
        for name in names {
            let t = ck.get(name)?;
            if t.dtype == DType::F8E4M3 {
                bail!(
                    "{} is already quantised: tensor `{name}` in {} is F8_E4M3",
                    a.model.display(),
                    t.file.display()
                );
            }
        }
    }
    if a.out.exists() && !a.force {
        bail!(
            "--out {} exists; give --force to replace it",
            a.out.display()
        );
    }
    if a.out.exists() && same_folder(&a.out, &a.model) {
        bail!("--out {} is the input folder", a.out.display());
    }

    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        // A second signal while the first is being handled ends the process at once.
        signal_hook::flag::register_conditional_shutdown(sig, 1, interrupted.clone())
            .context("installing a signal handler")?;
        signal_hook::flag::register(sig, interrupted.clone())
            .context("installing a signal handler")?;
    }

    let staging = Staging {
        path: sibling(&a.out, "partial")?,
        keep: false,
    };
    std::fs::create_dir_all(&staging.path)
        .with_context(|| format!("cannot create {}", staging.path.display()))?;

    let total_in: usize = layout
        .iter()
        .flat_map(|(_, n)| n.iter())
        .map(|n| ck.get(n).map(|t| t.bytes().len()).unwrap_or(0))
        .sum();
    let pb = qnext::progress::bar(total_in as u64, "quantising");
    let pause = pause_per_tensor();
    let threads = qnext::kernels::parallel::threads();
    let mut weight_map = serde_json::Map::new();
    let (mut total_out, mut quantised, mut quantised_in) = (0usize, 0usize, 0usize);
    let mut kept: Vec<&str> = Vec::new();
    for (shard, (path, names)) in layout.iter().enumerate() {
        let file = path
            .file_name()
            .and_then(|f| f.to_str())
            .ok_or_else(|| anyhow!("shard {} has no UTF-8 file name", path.display()))?
            .to_owned();
        // Each input tensor is one group: itself, or its FP8 codes and their scales.
        let mut specs = Vec::new();
        let mut groups = Vec::new();
        for &name in names {
            let t = ck.get(name)?;
            let start = specs.len();
            if let Some((matrices, rows)) = unstacked(name, t.shape) {
                let k = t.shape[2];
                quantised += matrices.len();
                quantised_in += t.bytes().len();
                for (m, _) in matrices {
                    specs.push(TensorSpec {
                        name: format!("{m}_scale_inv"),
                        dtype: DType::F32,
                        shape: vec![rows.div_ceil(BLOCK), k.div_ceil(BLOCK)],
                    });
                    specs.push(TensorSpec {
                        name: m,
                        dtype: DType::F8E4M3,
                        shape: vec![rows, k],
                    });
                }
            } else if is_quantized(name) {
                let &[n, k] = t.shape else {
                    bail!(
                        "tensor `{name}` in {} has shape {:?}; a quantised Linear weight must be 2-D",
                        t.file.display(),
                        t.shape
                    );
                };
                quantised += 1;
                quantised_in += t.bytes().len();
                specs.push(TensorSpec {
                    name: name.to_owned(),
                    dtype: DType::F8E4M3,
                    shape: vec![n, k],
                });
                specs.push(TensorSpec {
                    name: format!("{name}_scale_inv"),
                    dtype: DType::F32,
                    shape: vec![n.div_ceil(BLOCK), k.div_ceil(BLOCK)],
                });
            } else {
                kept.push(name);
                specs.push(TensorSpec {
                    name: name.to_owned(),
                    dtype: t.dtype,
                    shape: t.shape.to_vec(),
                });
            }
            groups.push(start..specs.len());
        }
        for s in &specs {
            weight_map.insert(s.name.clone(), file.clone().into());
            total_out += s.bytes();
        }
        // One tensor per thread at a time, each written at its offset: the copy into the page
        // cache costs as much as the quantisation, and spreads over the threads with it.
        let fill = |g: usize| -> Result<Parts> {
            if interrupted.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
            let t = ck.get(names[g])?;
            if let Some(d) = pause {
                std::thread::sleep(d);
            }
            let parts: Parts = if let Some((matrices, rows)) = unstacked(names[g], t.shape) {
                let k = t.shape[2];
                let mut parts = Vec::with_capacity(2 * matrices.len());
                for (_, first) in matrices {
                    let q = quantize_rows(&t, first, rows, k)?;
                    parts.push(Cow::Owned(
                        q.scale_inv.iter().flat_map(|s| s.to_le_bytes()).collect(),
                    ));
                    parts.push(Cow::Owned(q.codes));
                }
                parts
            } else if groups[g].len() == 2 {
                let q = quantize_tensor(&t)?;
                let scales = q.scale_inv.iter().flat_map(|s| s.to_le_bytes()).collect();
                vec![Cow::Owned(q.codes), Cow::Owned(scales)]
            } else {
                vec![Cow::Borrowed(t.bytes())]
            };
            pb.inc(t.bytes().len() as u64);
            Ok(parts)
        };
        write_safetensors_parallel(&staging.path.join(&file), &specs, &groups, threads, &fill)?;
        ck.release_shard(shard);
    }
    pb.finish_and_clear();

    if a.model.join("model.safetensors.index.json").exists() {
        let index = serde_json::json!({
            "metadata": {"total_size": total_out},
            "weight_map": weight_map,
        });
        write_json(&staging.path.join("model.safetensors.index.json"), &index)?;
    }
    let not_converted = modules_to_not_convert(kept.iter().copied());
    config
        .as_object_mut()
        .ok_or_else(|| anyhow!("{}: expected a JSON object", config_path.display()))?
        .insert(
            "quantization_config".into(),
            serde_json::json!({
                "activation_scheme": "dynamic",
                "fmt": "e4m3",
                "quant_method": "fp8",
                "weight_block_size": [BLOCK, BLOCK],
                "modules_to_not_convert": not_converted,
            }),
        );
    write_json(&staging.path.join("config.json"), &config)?;
    let copied = copy_other_files(&a.model, &staging.path, &layout)?;

    // Into place: the old output (with --force) steps aside first and goes only once the new
    // one is there.
    let old = if a.out.exists() {
        let old = sibling(&a.out, "old")?;
        std::fs::rename(&a.out, &old)
            .with_context(|| format!("cannot move the old {} aside", a.out.display()))?;
        Some(old)
    } else {
        None
    };
    std::fs::rename(&staging.path, &a.out).with_context(|| {
        format!(
            "cannot rename {} to {}",
            staging.path.display(),
            a.out.display()
        )
    })?;
    let mut staging = staging;
    staging.keep = true;
    if let Some(old) = old {
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("cannot remove the replaced output {}", old.display()))?;
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "wrote {}: {quantised} matrices to FP8 ({:.2} GB in → {:.2} GB), {} tensors kept, {} other files copied; \
         {:.2} GB in {secs:.1} s ({:.2} GB/s)",
        a.out.display(),
        quantised_in as f64 / 1e9,
        total_out as f64 / 1e9,
        kept.len(),
        copied,
        total_in as f64 / 1e9,
        total_in as f64 / 1e9 / secs
    );
    Ok(())
}

fn same_folder(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Copies the input folder's other files (tokenizer, templates, generation config, README…):
/// every regular file at its top level but the shards, the index and config.json.
fn copy_other_files(from: &Path, to: &Path, layout: &[(&Path, Vec<&str>)]) -> Result<usize> {
    let shards: Vec<&std::ffi::OsStr> = layout.iter().filter_map(|(p, _)| p.file_name()).collect();
    let mut n = 0;
    for entry in
        std::fs::read_dir(from).with_context(|| format!("cannot list {}", from.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        let skip = shards.contains(&name.as_os_str())
            || name == "config.json"
            || name == "model.safetensors.index.json";
        if skip || !entry.file_type()?.is_file() {
            continue;
        }
        std::fs::copy(entry.path(), to.join(&name))
            .with_context(|| format!("cannot copy {}", entry.path().display()))?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_released_set_of_quantised_weights() {
        for q in [
            "model.layers.0.linear_attn.in_proj_qkvz.weight",
            "model.layers.0.linear_attn.out_proj.weight",
            "model.layers.3.self_attn.q_proj.weight",
            "model.layers.3.self_attn.o_proj.weight",
            "model.layers.3.mlp.experts.511.down_proj.weight",
            "model.layers.3.mlp.shared_expert.up_proj.weight",
            "model.layers.1.mlp.gate_proj.weight",
            "mtp.layers.0.self_attn.k_proj.weight",
            "mtp.layers.0.mlp.experts.7.gate_proj.weight",
        ] {
            assert!(is_quantized(q), "{q}");
        }
        for k in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.norm.weight",
            "model.layers.0.linear_attn.in_proj_ba.weight",
            "model.layers.0.linear_attn.conv1d.weight",
            "model.layers.0.linear_attn.A_log",
            "model.layers.0.linear_attn.norm.weight",
            "model.layers.3.mlp.gate.weight",
            "model.layers.3.mlp.shared_expert_gate.weight",
            "model.layers.3.self_attn.q_norm.weight",
            "model.layers.0.input_layernorm.weight",
            "mtp.fc.weight",
            "mtp.layers.0.mlp.gate.weight",
            "model.layers.3.mlp.experts.5.gate_proj.weight_scale_inv",
        ] {
            assert!(!is_quantized(k), "{k}");
        }
    }

    #[test]
    fn not_converted_modules_in_release_order() {
        let kept = [
            "model.embed_tokens.weight",
            "mtp.fc.weight",
            "model.layers.10.input_layernorm.weight",
            "model.layers.2.linear_attn.A_log",
            "model.layers.2.linear_attn.conv1d.weight",
            "lm_head.weight",
            "mtp.layers.0.mlp.gate.weight",
            "model.norm.weight",
        ];
        assert_eq!(
            modules_to_not_convert(kept.into_iter()),
            [
                "lm_head",
                "model.layers.2.linear_attn.A_log",
                "model.layers.2.linear_attn.conv1d",
                "model.layers.10.input_layernorm",
                "mtp.fc",
                "mtp.layers.0.mlp.gate",
            ]
        );
    }
}
