//! `y = x · Wᵀ` for every stored weight dtype: x is `[t, cols]` f32, W is `[rows, cols]`,
//! y is `[t, rows]`. Rows are split over the worker pool; each task runs the best kernel the
//! CPU has (see `x86::avx512`) or the portable one. Weights are read once per call however
//! many tokens the batch has. f32 activations and accumulation throughout: FP8 and BF16
//! weights are widened exactly, so results match the reference up to summation order.

use std::sync::Mutex;

use super::isa::{isa, Isa};
use super::pool;
use crate::checkpoint::{Matrix, MatrixData};

/// Multiply-adds below which a product runs on the calling thread alone.
const PARALLEL_WORK: usize = 1 << 17;

pub fn matmul(x: &[f32], t: usize, w: &Matrix) -> Vec<f32> {
    matmul_many(&[(x, t, w)]).pop().unwrap_or_default()
}

/// Several independent products in one dispatch to the pool (e.g. the gate and up
/// projections of every selected expert): fewer synchronisations per token, and the threads
/// keep streaming weights from one matrix into the next. Each result is exactly what
/// [`matmul`] gives.
pub fn matmul_many(jobs: &[(&[f32], usize, &Matrix)]) -> Vec<Vec<f32>> {
    for (x, t, w) in jobs {
        assert_eq!(x.len(), t * w.cols, "matmul: x is not [t, cols]");
    }
    let mut outs: Vec<Vec<f32>> = jobs
        .iter()
        .map(|(_, t, w)| vec![0.0f32; w.rows * t])
        .collect();
    let pool = pool::global();
    let work: Vec<usize> = jobs.iter().map(|(_, t, w)| t * w.rows * w.cols).collect();
    let total: usize = work.iter().sum();
    if total < PARALLEL_WORK || pool.threads() == 1 {
        for ((x, t, w), o) in jobs.iter().zip(&mut outs) {
            rows_kernel(x, *t, w, 0, w.rows, o);
        }
    } else {
        // About four tasks per thread over all jobs, in proportion to their work; tasks are
        // claimed dynamically, so uneven sizes even out.
        let target = pool.threads() * 4;
        let mut parts: Vec<(usize, usize, usize, Mutex<&mut [f32]>)> = Vec::new();
        for (j, ((_, t, w), o)) in jobs.iter().zip(outs.iter_mut()).enumerate() {
            let n = w.rows;
            let tasks = (target * work[j])
                .div_ceil(total)
                .clamp(1, n.div_ceil(4).max(1));
            let rows_per = n.div_ceil(tasks).next_multiple_of(4).max(4);
            for (i, chunk) in o.chunks_mut(rows_per * t).enumerate() {
                let r0 = i * rows_per;
                parts.push((j, r0, (r0 + rows_per).min(n), Mutex::new(chunk)));
            }
        }
        pool.run(parts.len(), &|i| {
            let (j, r0, r1, ref m) = parts[i];
            let mut o = m.lock().unwrap_or_else(|e| e.into_inner());
            let (x, t, w) = jobs[j];
            rows_kernel(x, t, w, r0, r1, &mut o);
        });
    }
    jobs.iter()
        .zip(outs)
        .map(|((_, t, w), out_nt)| {
            if *t == 1 {
                return out_nt;
            }
            let n = w.rows;
            let mut y = vec![0.0f32; t * n];
            for r in 0..n {
                for j in 0..*t {
                    y[j * n + r] = out_nt[r * t + j];
                }
            }
            y
        })
        .collect()
}

/// Rows `r0..r1` into `out` (`[(r1 - r0), t]`).
fn rows_kernel(x: &[f32], t: usize, w: &Matrix, r0: usize, r1: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 && super::x86::avx512::supports(w) {
        // SAFETY: `isa()` verified AVX-512 F and BW on this CPU.
        unsafe { super::x86::avx512::rows(x, t, w, r0..r1, out) };
        return;
    }
    rows_portable(x, t, w, r0, r1, out);
}

/// The portable kernel: each row widened to f32, then dot products. Compiled for AVX2+FMA and
/// AVX-512 too (chosen at run time) so the compiler's vectorisation uses the wider registers.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+fma",
    "x86_64+avx2+fma+f16c"
))]
fn rows_portable(x: &[f32], t: usize, w: &Matrix, r0: usize, r1: usize, out: &mut [f32]) {
    let k = w.cols;
    let mut buf = vec![0.0f32; k];
    for r in r0..r1 {
        let row: &[f32] = match &w.data {
            MatrixData::F32(d) => &d.as_slice()[r * k..(r + 1) * k],
            _ => {
                w.row_f32(r, &mut buf);
                &buf
            }
        };
        for j in 0..t {
            out[(r - r0) * t + j] = dot(&x[j * k..(j + 1) * k], row);
        }
    }
}

/// Dot product with eight independent partial sums, so the compiler can vectorise it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y += a · x`.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}
