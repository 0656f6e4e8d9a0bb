//! Small f32 matrix products `C += A · B` for the chunked delta rule, whose chunk-sized
//! matrices (64 × 128 and 128 × 128) live in cache. Register-blocked AVX-512 or AVX2 tiles
//! where the CPU has them and `n` is whole vectors; plain loops otherwise. Accumulation is f32
//! in column order `p = 0, 1, …` for every element, fused multiply-adds in the tiles.

#[cfg(target_arch = "x86_64")]
use super::isa::{isa, Isa};
use super::matmul::axpy;

/// A read-only matrix view: element `(i, p)` at `data[i · rs + p · cs]`, so that a transposed
/// operand needs no copy.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A row-major matrix with rows `ld` apart.
    pub fn rows(data: &'a [f32], ld: usize) -> View<'a> {
        View {
            data,
            rs: ld,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with rows `ld` apart.
    pub fn transposed(data: &'a [f32], ld: usize) -> View<'a> {
        View {
            data,
            rs: 1,
            cs: ld,
        }
    }

    fn at(&self, i: usize, p: usize) -> f32 {
        self.data[i * self.rs + p * self.cs]
    }
}

/// `C[i, j] += Σ_{p<k} A(i, p) · B[p, j]` for `i < m`, `j < n`; `B` and `C` row-major with
/// rows `ldb` and `ldc` apart.
#[allow(clippy::too_many_arguments)]
pub fn gemm_acc(
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(
        (m - 1) * a.rs + (k - 1) * a.cs < a.data.len(),
        "gemm_acc: A too small"
    );
    assert!((k - 1) * ldb + n <= b.len(), "gemm_acc: B too small");
    assert!((m - 1) * ldc + n <= c.len(), "gemm_acc: C too small");
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 && n.is_multiple_of(16) {
        // SAFETY: `isa()` verified AVX-512 F; the bounds of A, B and C were checked above.
        unsafe { super::x86::gemm_f32::gemm_acc(m, n, k, a, b, ldb, c, ldc) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx2 && n.is_multiple_of(8) {
        // SAFETY: `isa()` verified AVX2, FMA and F16C; the bounds of A, B and C were checked
        // above.
        unsafe { super::x86::gemm_f32::gemm_acc_avx2(m, n, k, a, b, ldb, c, ldc) };
        return;
    }
    for i in 0..m {
        let ci = &mut c[i * ldc..i * ldc + n];
        for p in 0..k {
            axpy(ci, a.at(i, p), &b[p * ldb..p * ldb + n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_and_edges_match_plain_sums() {
        let mut s = 1u64;
        let mut r = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        // Row counts around the 6-row tile, widths of 1–4 and 8 vectors, and a width that is
        // not whole vectors (the plain loops).
        for (m, n, k) in [
            (13, 128, 37),
            (6, 64, 5),
            (1, 48, 64),
            (7, 16, 1),
            (64, 128, 128),
            (5, 24, 9),
        ] {
            for transposed in [false, true] {
                let a: Vec<f32> = (0..m * k).map(|_| r()).collect();
                let av = if transposed {
                    // The same matrix stored as its transpose ([k, m]).
                    let mut t = vec![0.0; m * k];
                    for i in 0..m {
                        for p in 0..k {
                            t[p * m + i] = a[i * k + p];
                        }
                    }
                    t
                } else {
                    a.clone()
                };
                let view = if transposed {
                    View::transposed(&av, m)
                } else {
                    View::rows(&av, k)
                };
                let ldb = n + 3;
                let ldc = n + 5;
                let b: Vec<f32> = (0..k * ldb).map(|_| r()).collect();
                let c0: Vec<f32> = (0..m * ldc).map(|_| r()).collect();
                // The dispatched product, and the AVX2 tiles also where the dispatch takes
                // the AVX-512 ones.
                let mut results = vec![("dispatched", c0.clone())];
                gemm_acc(m, n, k, view, &b, ldb, &mut results[0].1, ldc);
                #[cfg(target_arch = "x86_64")]
                if n.is_multiple_of(8)
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
                {
                    let mut c = c0.clone();
                    // SAFETY: the features were checked just above; A, B and C cover the
                    // product (the same shapes `gemm_acc` checks).
                    unsafe {
                        crate::kernels::x86::gemm_f32::gemm_acc_avx2(
                            m, n, k, view, &b, ldb, &mut c, ldc,
                        )
                    };
                    results.push(("avx2", c));
                }
                for (way, c) in &results {
                    for i in 0..m {
                        for j in 0..ldc {
                            let want = if j < n {
                                c0[i * ldc + j] as f64
                                    + (0..k)
                                        .map(|p| a[i * k + p] as f64 * b[p * ldb + j] as f64)
                                        .sum::<f64>()
                            } else {
                                c0[i * ldc + j] as f64 // untouched beyond n
                            };
                            // f32 sums of ≤ 128 terms of size ≤ 0.25: 1e-5 is ~100 ulps of 1.
                            assert!(
                                (c[i * ldc + j] as f64 - want).abs() < 1e-5,
                                "{way} {m}x{n}x{k} transposed={transposed}: ({i},{j}) {} vs {want}",
                                c[i * ldc + j]
                            );
                        }
                    }
                }
            }
        }
    }
}
