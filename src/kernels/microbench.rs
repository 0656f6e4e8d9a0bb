//! Kernel micro-benchmarks on synthetic matrices larger than the caches, so decode-style
//! products (one token) show the bandwidth each weight dtype reaches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Result;

use super::matmul::{matmul, matmul_many, products, Job, Precision};
use crate::checkpoint::{Checkpoint, Elems, Matrix, MatrixData};
use crate::config::Fp8Config;

/// `(name, GB/s of weights read, seconds per product)` for `t`-token products over `rows × cols`
/// matrices totalling ~`bytes` per dtype, best of `rounds` passes.
pub fn matvec_bandwidth(
    bytes: usize,
    cols: usize,
    t: usize,
    rounds: usize,
) -> Vec<(String, f64, f64)> {
    let mut out = Vec::new();
    for (name, elem) in [("fp8", 1usize), ("bf16", 2)] {
        let rows = 512;
        let count = (bytes / (rows * cols * elem)).max(1);
        let mats: Vec<Matrix> = (0..count)
            .map(|m| synthetic(rows, cols, elem == 1, m))
            .collect();
        let x: Vec<f32> = (0..t * cols)
            .map(|i| ((i % 13) as f32 - 6.0) * 0.1)
            .collect();
        for (pname, p) in [("exact", Precision::Exact), ("fast", Precision::Fast)] {
            let mut best = f64::INFINITY;
            for _ in 0..rounds {
                let t0 = Instant::now();
                for m in &mats {
                    std::hint::black_box(matmul(&x, t, m, p));
                }
                best = best.min(t0.elapsed().as_secs_f64());
            }
            let total = (count * rows * cols * elem) as f64;
            out.push((
                format!("{name}/{pname}"),
                total / best / 1e9,
                best / count as f64,
            ));
        }
    }
    out
}

/// A `rows × cols` matrix of varied normal values, FP8 (128×128 scale blocks) or BF16;
/// `seed` varies the bytes so that matrices differ.
pub fn synthetic(rows: usize, cols: usize, fp8: bool, seed: usize) -> Matrix {
    let n = rows * cols;
    let data = if fp8 {
        MatrixData::fp8(
            Elems::Owned(
                (0..n)
                    .map(|i| ((i * 7 + seed) % 251) as u8 & 0xB7 | 0x08)
                    .collect(),
            ),
            vec![0.01; rows.div_ceil(128) * cols.div_ceil(128)],
            128,
            128,
            crate::checkpoint::ByteCode::E4m3,
        )
    } else {
        MatrixData::Bf16(Elems::Owned(
            (0..n)
                .map(|i| 0x3C00 + ((i * 7 + seed) % 127) as u16)
                .collect(),
        ))
    };
    Matrix { rows, cols, data }
}

/// One group of a checkpoint's matrices in [`model_matvec`].
pub struct GroupRate {
    pub group: &'static str,
    pub matrices: usize,
    pub bytes: usize,
    /// GB/s of weights through one-token products.
    pub kernel: f64,
    /// GB/s of a plain read of the same bytes.
    pub read: f64,
}

type NameFilter = fn(&str) -> bool;

/// Decode-style products (one token) over the checkpoint's own matrices, as mapped for
/// inference, next to a plain read of the same bytes, alternating: the kernel's share of the
/// bandwidth the memory gives these very pages, robust to the machine's bandwidth drifting.
/// Best of `rounds` each.
pub fn model_matvec(
    ck: &Checkpoint,
    fp8: Option<&Fp8Config>,
    p: Precision,
    rounds: usize,
) -> Result<Vec<GroupRate>> {
    let groups: [(&'static str, NameFilter); 4] = [
        ("routed experts", |n| n.contains(".mlp.experts.")),
        ("in_proj_qkvz", |n| n.ends_with("in_proj_qkvz.weight")),
        ("out_proj", |n| n.ends_with("linear_attn.out_proj.weight")),
        ("lm_head", |n| n == "lm_head.weight"),
    ];
    let mut names: Vec<&str> = ck.names().filter(|n| n.ends_with(".weight")).collect();
    names.sort_unstable();
    let mut out = Vec::new();
    for (group, wanted) in groups {
        let mut mats = Vec::new();
        for &name in names.iter().filter(|n| wanted(n)) {
            let t = ck.get(name)?;
            if let [rows, cols] = *t.shape {
                mats.push(Matrix::load(ck, name, rows, cols, fp8)?);
            }
        }
        if mats.is_empty() {
            continue;
        }
        let bytes: usize = mats.iter().map(Matrix::bytes).sum();
        let xs: Vec<Vec<f32>> = mats
            .iter()
            .map(|m| (0..m.cols).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect())
            .collect();
        // As many products per dispatch as a decode step gives the pool (20 expert projections).
        let jobs: Vec<(&[f32], usize, &Matrix)> = mats
            .iter()
            .zip(&xs)
            .map(|(m, x)| (x.as_slice(), 1, m))
            .collect();
        let mut best_kernel = f64::INFINITY;
        let mut best_read = f64::INFINITY;
        for _ in 0..rounds {
            let t0 = Instant::now();
            for batch in jobs.chunks(20) {
                std::hint::black_box(matmul_many(batch, p));
            }
            best_kernel = best_kernel.min(t0.elapsed().as_secs_f64());
            let t0 = Instant::now();
            std::hint::black_box(read_all(&mats));
            best_read = best_read.min(t0.elapsed().as_secs_f64());
        }
        out.push(GroupRate {
            group,
            matrices: mats.len(),
            bytes,
            kernel: bytes as f64 / best_kernel / 1e9,
            read: bytes as f64 / best_read / 1e9,
        });
    }
    Ok(out)
}

/// [`decode_step_products`]'s result.
pub struct StepRate {
    pub dispatches: usize,
    pub bytes: usize,
    /// Milliseconds for all of a decode step's products (best of the rounds).
    pub ms: f64,
    /// GB/s of a plain read of the same bytes, alternating with the products.
    pub read: f64,
}

/// The products of one decode step over the checkpoint's own matrices, in the model's
/// dispatches (each layer's mixer input and output projections, the first `top-k` experts'
/// gate and up with the shared expert's, their down projections, then `lm_head`), one token
/// each: the part of decode that streams weights, apart from everything between the
/// products. Best of `rounds`, alternating with a plain read of the same bytes.
pub fn decode_step_products(
    ck: &Checkpoint,
    cfg: &crate::config::Config,
    p: Precision,
    rounds: usize,
) -> Result<StepRate> {
    let fp8 = cfg.quantization.as_ref();
    let load = |name: String| -> Result<Matrix> {
        let t = ck.get(&name)?;
        let [rows, cols] = *t.shape else {
            anyhow::bail!("{name} is not a matrix");
        };
        Matrix::load(ck, &name, rows, cols, fp8)
    };
    let mut groups: Vec<Vec<Matrix>> = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        let at = |n: &str| format!("model.layers.{l}.{n}.weight");
        let mixer: [&[&str]; 2] = if ck.contains(&at("linear_attn.in_proj_qkvz")) {
            [
                &["linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba"],
                &["linear_attn.out_proj"],
            ]
        } else {
            [
                &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                &["self_attn.o_proj"],
            ]
        };
        for names in mixer {
            groups.push(names.iter().map(|n| load(at(n))).collect::<Result<_>>()?);
        }
        if !cfg.is_moe_layer(l) {
            continue;
        }
        let mut experts: Vec<String> = (0..cfg.num_experts_per_tok.min(cfg.num_experts))
            .map(|e| format!("mlp.experts.{e}"))
            .collect();
        if ck.contains(&at("mlp.shared_expert.gate_proj")) {
            experts.push("mlp.shared_expert".into());
        }
        let mut gate_up = Vec::new();
        for e in &experts {
            gate_up.push(load(at(&format!("{e}.gate_proj")))?);
            gate_up.push(load(at(&format!("{e}.up_proj")))?);
        }
        groups.push(gate_up);
        groups.push(
            experts
                .iter()
                .map(|e| load(at(&format!("{e}.down_proj"))))
                .collect::<Result<_>>()?,
        );
    }
    groups.push(vec![load("lm_head.weight".into())?]);
    let xs: Vec<Vec<Vec<f32>>> = groups
        .iter()
        .map(|g| {
            g.iter()
                .map(|m| (0..m.cols).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect())
                .collect()
        })
        .collect();
    let all: Vec<&Matrix> = groups.iter().flatten().collect();
    let bytes: usize = all.iter().map(|m| m.bytes()).sum();
    let (mut best, mut best_read) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..rounds {
        let t0 = Instant::now();
        for (g, x) in groups.iter().zip(&xs) {
            let jobs: Vec<(&[f32], usize, &Matrix)> =
                g.iter().zip(x).map(|(m, x)| (x.as_slice(), 1, m)).collect();
            std::hint::black_box(matmul_many(&jobs, p));
        }
        best = best.min(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        for g in &groups {
            std::hint::black_box(read_all(g));
        }
        best_read = best_read.min(t0.elapsed().as_secs_f64());
    }
    Ok(StepRate {
        dispatches: groups.len(),
        bytes,
        ms: best * 1e3,
        read: bytes as f64 / best_read / 1e9,
    })
}

/// Reads every byte of the matrices' weights on all pool threads (each a share of each one).
fn read_all(mats: &[Matrix]) -> u64 {
    let pool = super::pool::global();
    let parts = pool.threads();
    let sink = AtomicU64::new(0);
    for m in mats {
        let bytes: &[u8] = match &m.data {
            MatrixData::F32(d) => bytemuck::cast_slice(d.as_slice()),
            MatrixData::Bf16(d) | MatrixData::F16(d) => bytemuck::cast_slice(d.as_slice()),
            MatrixData::Fp8 { w, .. } => w.as_slice(),
        };
        let share = (bytes.len() / parts) & !255;
        pool.run(parts, &|i| {
            let s = super::bandwidth::sum(&bytes[i * share..(i + 1) * share]);
            sink.fetch_add(s, Ordering::Relaxed);
        });
    }
    sink.load(Ordering::Relaxed)
}

/// One prefill-shaped product for [`gemm_rates`].
pub struct GemmRate {
    pub name: &'static str,
    pub dtype: &'static str,
    /// Products per dispatch (as the MoE layer issues them).
    pub jobs: usize,
    pub rows: usize,
    pub cols: usize,
    pub tokens: usize,
    /// Multiply-adds ×2 per second, median of the rounds: blocked (prompt) kernel.
    pub gflops: f64,
    /// The same through the dot-product kernels (what a batch of decode tokens gets).
    pub dot_gflops: f64,
}

/// The model's prefill products at their real shapes (a 512-token prompt; each of 32 experts
/// sees ~160 of its tokens), FP8 and BF16, fast precision: GFLOP/s, median of `rounds`.
pub fn gemm_rates(rounds: usize) -> Vec<GemmRate> {
    let shapes: [(&'static str, usize, usize, usize, usize); 4] = [
        ("in_proj_qkvz", 1, 12288, 2048, 512),
        ("out_proj", 1, 2048, 4096, 512),
        ("expert gate/up", 20, 512, 2048, 160),
        ("expert down", 10, 2048, 512, 160),
    ];
    let mut out = Vec::new();
    for (dtype, fp8) in [("fp8", true), ("bf16", false)] {
        for (name, jobs, rows, cols, tokens) in shapes {
            let mats: Vec<Matrix> = (0..jobs).map(|m| synthetic(rows, cols, fp8, m)).collect();
            let x: Vec<f32> = (0..tokens * cols)
                .map(|i| ((i % 13) as f32 - 6.0) * 0.1)
                .collect();
            let flags = vec![true; tokens];
            let median = |bulk: &[bool]| {
                let batch: Vec<Job> = mats
                    .iter()
                    .map(|m| Job::new(&x, tokens, m).bulk(bulk))
                    .collect();
                let mut secs: Vec<f64> = (0..rounds)
                    .map(|_| {
                        let t0 = Instant::now();
                        std::hint::black_box(products(&batch, Precision::Fast));
                        t0.elapsed().as_secs_f64()
                    })
                    .collect();
                secs.sort_by(f64::total_cmp);
                secs[secs.len() / 2]
            };
            let flop = 2.0 * (jobs * rows * cols * tokens) as f64;
            out.push(GemmRate {
                name,
                dtype,
                jobs,
                rows,
                cols,
                tokens,
                gflops: flop / median(&flags) / 1e9,
                dot_gflops: flop / median(&[]) / 1e9,
            });
        }
    }
    out
}

/// The bfloat16 multiply-add peak of all pool threads in GFLOP/s (registers only), or `None`
/// where the CPU has no AVX-512 BF16.
pub fn bf16_peak() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if super::isa::bf16_dot() {
        let pool = super::pool::global();
        let iters = 20_000_000;
        let t0 = Instant::now();
        pool.run(pool.threads(), &|_| {
            // SAFETY: `bf16_dot()` verified AVX-512 F, BW and BF16.
            std::hint::black_box(unsafe { super::x86::bf16dot::peak_probe(iters) });
        });
        let flop = (pool.threads() * iters * 24 * 16 * 4) as f64;
        return Some(flop / t0.elapsed().as_secs_f64() / 1e9);
    }
    None
}

/// The f32 fused multiply-add peak of CPUs without AVX-512 (every pool thread, registers
/// only), the bound of the AVX2 tier's prompt products; `None` elsewhere.
pub fn fma_peak_avx2() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if super::isa::isa() == super::isa::Isa::Avx2 {
        let pool = super::pool::global();
        let iters = 20_000_000;
        let t0 = Instant::now();
        pool.run(pool.threads(), &|_| {
            // SAFETY: `isa()` verified AVX2 and FMA.
            std::hint::black_box(unsafe { super::x86::avx2gemm::peak_probe(iters) });
        });
        let flop = (pool.threads() * iters * 12 * 8 * 2) as f64;
        return Some(flop / t0.elapsed().as_secs_f64() / 1e9);
    }
    None
}

/// Decode attention over a bfloat16 KV cache of `depth` positions, for one token, at the
/// model's shape (2 KV heads of 256, 8 query heads each) over `layers` layers' caches, split
/// into chunks over the pool as the model does. The caches of 12 layers at depth 4096 (100 MB)
/// stream from memory as in decode, where the weights read between two attention layers evict
/// them; one layer (8 MB) stays in cache. `(ms per token, GB/s of cache read)`, median of
/// `rounds`.
pub fn attention_decode(depth: usize, layers: usize, rounds: usize) -> (f64, f64) {
    use super::attention::{attend_chunk, chunks, Kv, Part, Rows};
    let (nkv, heads, hd) = (2usize, 16usize, 256usize);
    let kvw = nkv * hd;
    let bf16 = |i: usize| 0x3C00u16 + ((i * 7919) % 251) as u16 - 125;
    let caches: Vec<(Vec<u16>, Vec<u16>)> = (0..layers)
        .map(|l| {
            let n = depth * kvw;
            (
                (0..n).map(|i| bf16(i + l)).collect(),
                (0..n).map(|i| bf16(i * 3 + l)).collect(),
            )
        })
        .collect();
    let q: Vec<f32> = (0..heads * hd)
        .map(|i| ((i % 17) as f32 - 8.0) * 0.05)
        .collect();
    let ranges: Vec<_> = chunks(depth).collect();
    let parts: Vec<std::sync::Mutex<Part>> = ranges
        .iter()
        .map(|_| std::sync::Mutex::new(Part::new(heads, hd)))
        .collect();
    let mut out = vec![0.0f32; heads * hd];
    let pool = super::pool::global();
    let mut secs: Vec<f64> = (0..rounds)
        .map(|_| {
            let t0 = Instant::now();
            for (k, v) in &caches {
                let kv = Kv {
                    k: Rows::Bf16(k),
                    v: Rows::Bf16(v),
                    heads: nkv,
                    hd,
                    len: depth,
                };
                pool.run(ranges.len(), &|i| {
                    let mut part = parts[i].lock().unwrap_or_else(|e| e.into_inner());
                    attend_chunk(&q, kv, ranges[i].clone(), &mut part);
                });
                let mut acc = parts[0].lock().unwrap_or_else(|e| e.into_inner()).clone();
                for p in &parts[1..] {
                    acc.fold(&p.lock().unwrap_or_else(|e| e.into_inner()));
                }
                acc.finish(&mut out);
            }
            t0.elapsed().as_secs_f64()
        })
        .collect();
    secs.sort_by(f64::total_cmp);
    let s = secs[secs.len() / 2];
    let bytes = (layers * 2 * depth * kvw * 2) as f64;
    (s * 1e3, bytes / s / 1e9)
}

/// Prompt attention at depth, as a prompt chunk runs it (`attend_prompt` on every thread's
/// run of tokens): `tokens` new tokens after `depth` cached ones, at the model's shape (2 KV
/// heads of 256, 8 query heads each), over the cache's blocks. Returns the median
/// milliseconds per layer over `rounds` and the microseconds per token.
pub fn attention_prompt(depth: usize, tokens: usize, rounds: usize) -> (f64, f64) {
    use super::attention::{attend_prompt, Kv, Paged, Rows, CHUNK};
    let (nkv, heads, hd) = (2usize, 16usize, 256usize);
    let kvw = nkv * hd;
    let len = depth + tokens;
    let bf16 = |i: usize| 0x3C00u16 + ((i * 7919) % 251) as u16 - 125;
    let blocks: Vec<(Vec<u16>, Vec<u16>)> = (0..len.div_ceil(CHUNK))
        .map(|b| {
            let n = CHUNK * kvw;
            (
                (0..n).map(|i| bf16(i + b * n)).collect(),
                (0..n).map(|i| bf16(3 * (i + b * n))).collect(),
            )
        })
        .collect();
    let views: Vec<Kv> = blocks
        .iter()
        .map(|(k, v)| Kv {
            k: Rows::Bf16(k),
            v: Rows::Bf16(v),
            heads: nkv,
            hd,
            len: CHUNK,
        })
        .collect();
    let q: Vec<f32> = (0..tokens * heads * hd)
        .map(|i| ((i % 17) as f32 - 8.0) * 0.05)
        .collect();
    let sink = std::sync::atomic::AtomicU32::new(0);
    let mut secs: Vec<f64> = (0..rounds)
        .map(|_| {
            let t0 = Instant::now();
            super::split::for_each_run(tokens, &|run| {
                let mut out = vec![0.0f32; heads * hd];
                attend_prompt(
                    run,
                    &|ti| &q[ti * heads * hd..(ti + 1) * heads * hd],
                    &|ti| Paged {
                        blocks: &views,
                        len: depth + ti + 1,
                    },
                    &mut |_, part| {
                        part.finish(&mut out);
                        sink.fetch_add(out[0].to_bits() & 1, std::sync::atomic::Ordering::Relaxed);
                    },
                );
            });
            t0.elapsed().as_secs_f64()
        })
        .collect();
    secs.sort_by(f64::total_cmp);
    let s = secs[secs.len() / 2];
    (s * 1e3, s * 1e6 / tokens as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::LoadMode;

    /// The step's dispatches are the model's: per layer the mixer's two and the experts' two,
    /// then `lm_head`; every matrix's bytes are counted.
    #[test]
    fn a_decode_step_has_the_models_dispatches() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fp8-bf16scale");
        let cfg = crate::config::Config::from_file(&dir.join("config.json")).unwrap();
        let ck = Checkpoint::open_with(&dir, LoadMode::Mmap).unwrap();
        let step = decode_step_products(&ck, &cfg, Precision::Fast, 1).unwrap();
        let moe = (0..cfg.num_hidden_layers)
            .filter(|&l| cfg.is_moe_layer(l))
            .count();
        assert_eq!(step.dispatches, 2 * cfg.num_hidden_layers + 2 * moe + 1);
        let lm_head = cfg.vocab_size * cfg.hidden_size * 2;
        assert!(step.bytes > lm_head && step.ms > 0.0 && step.read > 0.0);
    }
}
