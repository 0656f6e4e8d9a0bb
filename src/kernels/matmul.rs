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
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), t * k, "matmul: x is not [t, cols]");
    let mut out_nt = vec![0.0f32; n * t];
    let pool = pool::global();
    let tasks = if t * n * k < PARALLEL_WORK {
        1
    } else {
        (pool.threads() * 4).min(n.div_ceil(4)).max(1)
    };
    let rows_per = n.div_ceil(tasks).next_multiple_of(4).max(4);
    if tasks == 1 {
        rows_kernel(x, t, w, 0, n, &mut out_nt);
    } else {
        let parts: Vec<Mutex<&mut [f32]>> = out_nt.chunks_mut(rows_per * t).map(Mutex::new).collect();
        pool.run(parts.len(), &|i| {
            let mut o = parts[i].lock().unwrap_or_else(|e| e.into_inner());
            let r0 = i * rows_per;
            rows_kernel(x, t, w, r0, (r0 + rows_per).min(n), &mut o);
        });
    }
    if t == 1 {
        return out_nt;
    }
    let mut y = vec![0.0f32; t * n];
    for r in 0..n {
        for j in 0..t {
            y[j * n + r] = out_nt[r * t + j];
        }
    }
    y
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
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma+f16c"))]
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
