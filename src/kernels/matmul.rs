//! `y = x · Wᵀ` for every stored weight dtype: x is `[t, cols]` f32, W is `[rows, cols]`,
//! y is `[t, rows]`. Rows are split over the worker pool; each task runs the best kernel the
//! CPU has or the portable one. Weights are read once per call however many tokens the batch
//! has. Two precisions:
//! - [`Precision::Exact`]: f32 activations and accumulation; FP8 and BF16 weights are widened
//!   exactly, so results match the reference up to summation order (`x86::avx512`).
//! - [`Precision::Fast`]: BF16 and FP8 weights go through bfloat16 dot products where the CPU
//!   has them (`x86::bf16dot`; activations rounded to bfloat16, f32 accumulation). Other
//!   weights, and CPUs without AVX-512 BF16, compute as `Exact`.
//!
//! Either way each token's result is the same whatever else is in the batch.

use std::sync::Mutex;

use super::isa::{isa, Isa};
use super::pool;
use crate::checkpoint::{Matrix, MatrixData};

/// How matrix products round their inputs (the CLI's `--exact`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// Bfloat16 dot products for BF16 and FP8 weights where the CPU has them.
    #[default]
    Fast,
    /// f32 activations and accumulation everywhere, weights as stored.
    Exact,
}

/// Multiply-adds below which a product runs on the calling thread alone.
const PARALLEL_WORK: usize = 1 << 17;

pub fn matmul(x: &[f32], t: usize, w: &Matrix, p: Precision) -> Vec<f32> {
    matmul_many(&[(x, t, w)], p).pop().unwrap_or_default()
}

/// A job's activations in the form its kernel reads.
enum Acts<'a> {
    F32(&'a [f32]),
    #[cfg(target_arch = "x86_64")]
    Bf16(super::x86::bf16dot::Bf16Acts),
}

fn prepare<'a>(x: &'a [f32], t: usize, w: &Matrix, p: Precision) -> Acts<'a> {
    #[cfg(target_arch = "x86_64")]
    if p == Precision::Fast && super::isa::bf16_dot() && super::x86::bf16dot::supports(w) {
        // SAFETY: `bf16_dot()` verified AVX-512 F, BW and BF16 on this CPU.
        return Acts::Bf16(unsafe { super::x86::bf16dot::to_bf16(x, t, w.cols) });
    }
    let _ = (t, w, p);
    Acts::F32(x)
}

/// Several independent products in one dispatch to the pool (e.g. the gate and up
/// projections of every selected expert): fewer synchronisations per token, and the threads
/// keep streaming weights from one matrix into the next. Each result is exactly what
/// [`matmul`] gives.
pub fn matmul_many(jobs: &[(&[f32], usize, &Matrix)], p: Precision) -> Vec<Vec<f32>> {
    for (x, t, w) in jobs {
        assert_eq!(x.len(), t * w.cols, "matmul: x is not [t, cols]");
    }
    let acts: Vec<Acts> = jobs.iter().map(|&(x, t, w)| prepare(x, t, w, p)).collect();
    let mut outs: Vec<Vec<f32>> = jobs
        .iter()
        .map(|(_, t, w)| vec![0.0f32; w.rows * t])
        .collect();
    let pool = pool::global();
    let work: Vec<usize> = jobs.iter().map(|(_, t, w)| t * w.rows * w.cols).collect();
    let total: usize = work.iter().sum();
    if total < PARALLEL_WORK || pool.threads() == 1 {
        for (((_, t, w), a), o) in jobs.iter().zip(&acts).zip(&mut outs) {
            rows_kernel(a, *t, w, 0, w.rows, o);
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
            let (_, t, w) = jobs[j];
            rows_kernel(&acts[j], t, w, r0, r1, &mut o);
        });
    }
    jobs.iter()
        .zip(outs)
        .map(|((_, t, w), out_nt)| {
            if *t == 1 {
                return out_nt;
            }
            transpose(&out_nt, w.rows, *t)
        })
        .collect()
}

/// `[n, t]` → `[t, n]`, in blocks of rows so that both sides stay in cache (a plain
/// element-by-element transpose of a `[12288, 256]` product cost a fifth of prefill time).
fn transpose(a: &[f32], n: usize, t: usize) -> Vec<f32> {
    const B: usize = 32;
    let mut y = vec![0.0f32; t * n];
    for r0 in (0..n).step_by(B) {
        let r1 = (r0 + B).min(n);
        for j in 0..t {
            for r in r0..r1 {
                y[j * n + r] = a[r * t + j];
            }
        }
    }
    y
}

/// Rows `r0..r1` into `out` (`[(r1 - r0), t]`).
fn rows_kernel(a: &Acts, t: usize, w: &Matrix, r0: usize, r1: usize, out: &mut [f32]) {
    let x = match a {
        Acts::F32(x) => *x,
        #[cfg(target_arch = "x86_64")]
        Acts::Bf16(xb) => {
            // SAFETY: `prepare` chose this form only after `bf16_dot()` verified AVX-512 F,
            // BW and BF16 and `supports(w)` held.
            unsafe { super::x86::bf16dot::rows(xb, t, w, r0..r1, out) };
            return;
        }
    };
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
