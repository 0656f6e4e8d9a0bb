//! `y = x · Wᵀ` for every stored weight dtype: x is `[t, cols]` f32, W is `[rows, cols]`,
//! y is `[t, rows]`. Each weight row is decoded once per call and used for all t rows of x, so
//! a batch reads the weights once. FP8 rows are widened with their block scales applied, which
//! equals the reference's dequantised weight exactly (one f32 product per weight).

use super::parallel::map_ranges;
use crate::checkpoint::{Matrix, MatrixData};

pub fn matmul(x: &[f32], t: usize, w: &Matrix) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), t * k, "matmul: x is not [t, cols]");
    let parts = map_ranges(n, t * n * k, |a, b| {
        let len = b - a;
        let mut out = vec![0.0f32; t * len];
        let mut buf = vec![0.0f32; k];
        for r in a..b {
            let row: &[f32] = match &w.data {
                MatrixData::F32(d) => &d.as_slice()[r * k..(r + 1) * k],
                _ => {
                    w.row_f32(r, &mut buf);
                    &buf
                }
            };
            for ti in 0..t {
                out[ti * len + (r - a)] = dot(&x[ti * k..(ti + 1) * k], row);
            }
        }
        (a, b, out)
    });
    if parts.len() == 1 {
        return parts.into_iter().next().map(|p| p.2).unwrap_or_default();
    }
    let mut y = vec![0.0f32; t * n];
    for (a, b, part) in parts {
        let len = b - a;
        for ti in 0..t {
            y[ti * n + a..ti * n + b].copy_from_slice(&part[ti * len..(ti + 1) * len]);
        }
    }
    y
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
