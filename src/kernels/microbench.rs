//! Kernel micro-benchmarks on synthetic matrices larger than the caches, so decode-style
//! products (one token) show the bandwidth each weight dtype reaches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Result;

use super::matmul::{matmul, matmul_many, Precision};
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
            .map(|m| {
                let n = rows * cols;
                let data = if elem == 1 {
                    MatrixData::Fp8 {
                        w: Elems::Owned(
                            (0..n)
                                .map(|i| ((i * 7 + m) % 251) as u8 & 0xB7 | 0x08)
                                .collect(),
                        ),
                        scales: vec![0.01; rows.div_ceil(128) * cols.div_ceil(128)],
                        block_n: 128,
                        block_k: 128,
                    }
                } else {
                    MatrixData::Bf16(Elems::Owned(
                        (0..n)
                            .map(|i| 0x3C00 + ((i * 7 + m) % 127) as u16)
                            .collect(),
                    ))
                };
                Matrix { rows, cols, data }
            })
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
