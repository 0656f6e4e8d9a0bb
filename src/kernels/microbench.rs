//! Kernel micro-benchmarks on synthetic matrices larger than the caches, so decode-style
//! products (one token) show the bandwidth each weight dtype reaches.

use std::time::Instant;

use super::matmul::{matmul, Precision};
use crate::checkpoint::{Elems, Matrix, MatrixData};

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
