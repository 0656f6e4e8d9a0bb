//! AVX-512 tiles for [`crate::kernels::gemm_f32`]: 6 rows × up to 64 columns of `C` in 24
//! registers, each step one broadcast of `A` per row against up to four vectors of a row of
//! `B` (ten loads per 24 fused multiply-adds).

use std::arch::x86_64::*;

use crate::kernels::gemm_f32::View;

const MR: usize = 6;

/// As [`crate::kernels::gemm_f32::gemm_acc`], for `n` a multiple of 16.
///
/// # Safety
/// AVX-512 F; `A`, `B` and `C` hold every element the product touches (the caller checks).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
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
    debug_assert!(n.is_multiple_of(16));
    let (ap, bp, cp) = (a.data.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    let mut j = 0;
    while j < n {
        let nv = ((n - j) / 16).min(4);
        let mut i = 0;
        while i < m {
            let mr = MR.min(m - i);
            let a0 = ap.wrapping_add(i * a.rs);
            let b0 = bp.wrapping_add(j);
            let c0 = cp.wrapping_add(i * ldc + j);
            macro_rules! go {
                ($r:literal, $v:literal) => {
                    // SAFETY: rows i..i+mr and columns j..j+16·nv are inside A, B and C.
                    unsafe { tile::<$r, $v>(k, a0, a.rs, a.cs, b0, ldb, c0, ldc) }
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
        j += 16 * nv;
    }
}

/// `R` rows × `V` vectors of `C` at `c` (rows `ldc` apart) += `A` (at `a`, strides `rs`,
/// `cs`) · `B` (at `b`, rows `ldb` apart) over `k` steps.
///
/// # Safety
/// AVX-512 F; every element addressed is in bounds.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize, const V: usize>(
    k: usize,
    a: *const f32,
    rs: usize,
    cs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY (all accesses): in bounds by the caller's guarantee.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        for i in 0..R {
            for v in 0..V {
                acc[i][v] = _mm512_loadu_ps(c.add(i * ldc + 16 * v));
            }
        }
        for p in 0..k {
            let bv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(b.add(p * ldb + 16 * v)));
            for i in 0..R {
                let av = _mm512_set1_ps(*a.add(i * rs + p * cs));
                for v in 0..V {
                    acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
                }
            }
        }
        for i in 0..R {
            for v in 0..V {
                _mm512_storeu_ps(c.add(i * ldc + 16 * v), acc[i][v]);
            }
        }
    }
}
