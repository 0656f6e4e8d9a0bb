//! Register tiles for [`crate::kernels::gemm_f32`], written once over a vector of f32 lanes
//! ([`Vector`]): 6 rows × up to 4 vectors of `C` in registers, each step one broadcast of `A`
//! per row against the vectors of a row of `B`. AVX-512: 4 vectors of 16 (24 accumulators,
//! ten loads per 24 fused multiply-adds); AVX2: 2 vectors of 8 (12 accumulators of the 16
//! registers, eight loads per 12).

use super::exact::{Ymm, Zmm};
use crate::kernels::exact::Vector;
use crate::kernels::gemm_f32::View;

const MR: usize = 6;

/// As [`crate::kernels::gemm_f32::gemm_acc`], for `n` a multiple of 16.
///
/// # Safety
/// AVX-512 F; `A`, `B` and `C` hold every element the product touches (the caller checks).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn gemm_acc(
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    // SAFETY: the features `Zmm` needs are enabled here; bounds are the caller's.
    unsafe { gemm_with::<Zmm, 4>(m, n, k, a, b, ldb, c, ldc) }
}

/// As [`crate::kernels::gemm_f32::gemm_acc`], for `n` a multiple of 8.
///
/// # Safety
/// AVX2, FMA and F16C; `A`, `B` and `C` hold every element the product touches (the caller
/// checks).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_acc_avx2(
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    // SAFETY: the features `Ymm` needs are enabled here; bounds are the caller's.
    unsafe { gemm_with::<Ymm, 2>(m, n, k, a, b, ldb, c, ldc) }
}

/// Tiles of `MR` rows × up to `NV` vectors over the whole of `C`.
///
/// # Safety
/// `V`'s features (inlined into an entry point that enables them); `n` a multiple of
/// `V::LANES`; bounds as for the entry points.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gemm_with<V: Vector, const NV: usize>(
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    debug_assert!(n.is_multiple_of(V::LANES) && NV <= 4);
    let (ap, bp, cp) = (a.data.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    let mut j = 0;
    while j < n {
        let nv = ((n - j) / V::LANES).min(NV);
        let mut i = 0;
        while i < m {
            let mr = MR.min(m - i);
            let a0 = ap.wrapping_add(i * a.rs);
            let b0 = bp.wrapping_add(j);
            let c0 = cp.wrapping_add(i * ldc + j);
            macro_rules! go {
                ($r:literal, $v:literal) => {
                    // SAFETY: rows i..i+mr and columns j..j+LANES·nv are inside A, B and C.
                    unsafe { tile::<V, $r, $v>(k, a0, a.rs, a.cs, b0, ldb, c0, ldc) }
                };
            }
            macro_rules! rows_of {
                ($v:literal) => {
                    match mr {
                        6 => go!(6, $v),
                        5 => go!(5, $v),
                        4 => go!(4, $v),
                        3 => go!(3, $v),
                        2 => go!(2, $v),
                        _ => go!(1, $v),
                    }
                };
            }
            match nv {
                4 => rows_of!(4),
                3 => rows_of!(3),
                2 => rows_of!(2),
                _ => rows_of!(1),
            }
            i += mr;
        }
        j += V::LANES * nv;
    }
}

/// `R` rows × `NV` vectors of `C` at `c` (rows `ldc` apart) += `A` (at `a`, strides `rs`,
/// `cs`) · `B` (at `b`, rows `ldb` apart) over `k` steps.
///
/// # Safety
/// `V`'s features; every element addressed is in bounds.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[inline(always)]
unsafe fn tile<V: Vector, const R: usize, const NV: usize>(
    k: usize,
    a: *const f32,
    rs: usize,
    cs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
) {
    let l = V::LANES;
    // SAFETY: every access is in bounds by the caller's guarantee, and `V`'s features are
    // enabled (the caller's contract).
    unsafe {
        let mut acc = [[V::zero(); NV]; R];
        for i in 0..R {
            for v in 0..NV {
                acc[i][v] = V::load(c.add(i * ldc + l * v));
            }
        }
        for p in 0..k {
            let bv: [V; NV] = std::array::from_fn(|v| V::load(b.add(p * ldb + l * v)));
            for i in 0..R {
                let av = V::splat(*a.add(i * rs + p * cs));
                for v in 0..NV {
                    acc[i][v] = av.fmadd(bv[v], acc[i][v]);
                }
            }
        }
        for i in 0..R {
            for v in 0..NV {
                acc[i][v].store(c.add(i * ldc + l * v));
            }
        }
    }
}
