//! The matrix products against a plain f64 model of what each precision promises, on shapes
//! with partial chunks and partial FP8 blocks, and their batch invariance: a token's result
//! is bit-identical whether it is multiplied alone or among others, with each token's kernel
//! chosen by its own mark (`Job::bulk`), never by the batch.
//!
//! - `Exact`: Σ x·w with w the stored weight (FP8 times its block scale), in f32.
//! - `Fast` (on CPUs with AVX-512 BF16), dot-product kernels (unmarked tokens): BF16 weights
//!   Σ bf16(x)·w; FP8 weights Σ fp8 · bf16(s·x), the block scale s applied to the activation
//!   in f32 before its one rounding (every e4m3 value is a bfloat16 value).
//! - `Fast`, blocked kernel (prompt-chunk tokens): Σ bf16(x)·w, FP8 weights times their
//!   block's scale in f32 (never rounded into an input).
//!
//! Elsewhere `Fast` must equal `Exact` within the tolerance below, including the AVX2 kernels:
//! their FP8 dot products round `s·x` once in f32 where `Exact` rounds `w·s` (one relative
//! 2⁻²⁴ per term), and their blocked kernel sums in another order.
//!
//! Tolerance: both sides sum the same exact products (bfloat16 × bfloat16 is exact in f32);
//! only the f32 accumulation order differs, ~1e-7 relative per addition over ≤ 4096 terms.
//! 1e-5 of Σ|terms| allows that, while a wrong scale block, a dropped tail or an unrounded
//! input moves results by 1e-3 of Σ|terms| or more.

use qnext::checkpoint::{ByteCode, Elems, Matrix, MatrixData};
use qnext::kernels::matmul::{matmul, matmul_many, products, Job, Precision};

const REL: f64 = 1e-5;

/// xorshift: deterministic inputs without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn bf16_round(v: f32) -> f32 {
    let b = v.to_bits();
    f32::from_bits(((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16)
}

fn fp8_matrix(rng: &mut Rng, rows: usize, cols: usize) -> Matrix {
    // Every code but the NaNs (0x7F, 0xFF).
    let w = (0..rows * cols)
        .map(|_| loop {
            let b = rng.next() as u8;
            if b & 0x7F != 0x7F {
                break b;
            }
        })
        .collect();
    let scales = (0..rows.div_ceil(128) * cols.div_ceil(128))
        .map(|_| 1e-3 * (1.0 + rng.f32().abs()))
        .collect();
    Matrix {
        rows,
        cols,
        data: MatrixData::fp8(Elems::Owned(w), scales, 128, 128, ByteCode::E4m3),
    }
}

fn bf16_matrix(rng: &mut Rng, rows: usize, cols: usize) -> Matrix {
    let w = (0..rows * cols)
        .map(|_| (bf16_round(rng.f32() * 0.1).to_bits() >> 16) as u16)
        .collect();
    Matrix {
        rows,
        cols,
        data: MatrixData::Bf16(Elems::Owned(w)),
    }
}

/// The stored weight and the scale of its block (1 for BF16).
fn weight(w: &Matrix, r: usize, c: usize) -> (f32, f32) {
    match &w.data {
        MatrixData::Fp8 {
            w: q,
            scales,
            block_n,
            block_k,
            code,
            ..
        } => {
            let sc = w.cols.div_ceil(*block_k);
            let b = q.as_slice()[r * w.cols + c];
            (code.value(b), scales[(r / block_n) * sc + c / block_k])
        }
        MatrixData::Bf16(d) => (
            f32::from_bits((d.as_slice()[r * w.cols + c] as u32) << 16),
            1.0,
        ),
        _ => unreachable!(),
    }
}

fn fast_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::env::var("QNEXT_ISA").is_err()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// How a product is asked for: the precision, and whether its tokens are prompt-chunk tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Way {
    Exact,
    Fast,
    FastBulk,
}

fn multiply(x: &[f32], t: usize, w: &Matrix, way: Way) -> Vec<f32> {
    match way {
        Way::Exact => matmul(x, t, w, Precision::Exact),
        Way::Fast => matmul(x, t, w, Precision::Fast),
        Way::FastBulk => {
            let marks = vec![true; t];
            products(&[Job::new(x, t, w).bulk(&marks)], Precision::Fast).remove(0)
        }
    }
}

fn check(w: &Matrix, t: usize, rng: &mut Rng) {
    let k = w.cols;
    let x: Vec<f32> = (0..t * k).map(|_| rng.f32()).collect();
    // Integer bytes take the rounding dot products only with VBMI (table widening), and no
    // blocked kernel: prompt-chunk tokens multiply like single ones.
    let integer = matches!(
        w.data,
        MatrixData::Fp8 {
            code: ByteCode::SignMagnitude,
            ..
        }
    );
    #[cfg(target_arch = "x86_64")]
    let vbmi = is_x86_feature_detected!("avx512vbmi");
    #[cfg(not(target_arch = "x86_64"))]
    let vbmi = false;
    let fast_rounds = fast_available() && (vbmi || !integer);
    for way in [Way::Exact, Way::Fast, Way::FastBulk] {
        let y = multiply(&x, t, w, way);
        for j in 0..t {
            for r in 0..w.rows {
                let (mut want, mut mag) = (0.0f64, 0.0f64);
                for c in 0..k {
                    let (xv, (wv, s)) = (x[j * k + c], weight(w, r, c));
                    let term = match way {
                        Way::Fast if fast_rounds => bf16_round(s * xv) as f64 * wv as f64,
                        Way::FastBulk if fast_rounds && integer => {
                            bf16_round(s * xv) as f64 * wv as f64
                        }
                        Way::FastBulk if fast_rounds => {
                            bf16_round(xv) as f64 * wv as f64 * s as f64
                        }
                        _ => xv as f64 * (wv * s) as f64,
                    };
                    want += term;
                    mag += term.abs();
                }
                let got = y[j * w.rows + r] as f64;
                assert!(
                    (got - want).abs() <= REL * mag + 1e-30,
                    "{way:?} {}x{} t={t}: row {r} token {j}: {got} vs {want} (Σ|terms| {mag})",
                    w.rows,
                    k
                );
            }
        }
        // Alone or in a batch, the same bits.
        for j in 0..t {
            let alone = multiply(&x[j * k..(j + 1) * k], 1, w, way);
            assert_eq!(
                alone,
                y[j * w.rows..(j + 1) * w.rows],
                "{way:?}: token {j} alone differs from the batch of {t}"
            );
        }
    }
    // Marked and unmarked tokens mixed in one product: each as it is alone with its mark.
    let marks: Vec<bool> = (0..t).map(|j| j % 3 != 1).collect();
    let mixed = products(&[Job::new(&x, t, w).bulk(&marks)], Precision::Fast).remove(0);
    for j in 0..t {
        let way = if marks[j] { Way::FastBulk } else { Way::Fast };
        assert_eq!(
            multiply(&x[j * k..(j + 1) * k], 1, w, way),
            mixed[j * w.rows..(j + 1) * w.rows],
            "token {j} ({way:?}) differs among mixed marks"
        );
    }
}

#[test]
fn fp8_products_match_the_model_of_each_precision() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // Full blocks; a partial last block (200 = 128 + 72: three 64-column chunks and 8); a
    // short row (40); several 128-row blocks (130, 260); rows that end inside a group of 8
    // columns (77).
    for (rows, cols) in [
        (37, 256),
        (21, 200),
        (9, 40),
        (130, 384),
        (260, 136),
        (11, 77),
    ] {
        let w = fp8_matrix(&mut rng, rows, cols);
        // 2–5: the sizes of speculative verification steps, each with its own tile.
        for t in [1, 2, 3, 4, 5, 7, 13] {
            check(&w, t, &mut rng);
        }
    }
}

/// `--lm-head q8`: every weight of the 8-bit copy within half a step of the original (the
/// step being its block's largest magnitude / 127), and its products as exact as FP8's.
#[test]
fn q8_copies_are_within_half_a_step_and_multiply_like_their_model() {
    let mut rng = Rng(0x5851_F42D_4C95_7F2D);
    for (rows, cols) in [(37, 256), (21, 200), (9, 40), (130, 384)] {
        let w = bf16_matrix(&mut rng, rows, cols);
        let q = w.to_q8(128);
        assert_eq!(q.dtype_name(), "Q8");
        for r in 0..rows {
            for c in 0..cols {
                let (orig, _) = weight(&w, r, c);
                let (v, s) = weight(&q, r, c);
                let (br, bc) = (r / 128 * 128, c / 128 * 128);
                let amax = (br..(br + 128).min(rows))
                    .flat_map(|i| (bc..(bc + 128).min(cols)).map(move |j| (i, j)))
                    .map(|(i, j)| weight(&w, i, j).0.abs())
                    .fold(0.0f32, f32::max);
                assert!((s - amax / 127.0).abs() <= 1e-6 * s, "scale of ({r}, {c})");
                assert!(
                    (v * s - orig).abs() <= 0.5 * s * (1.0 + 1e-5),
                    "({r}, {c}): {orig} became {}",
                    v * s
                );
            }
        }
        for t in [1, 2, 7] {
            check(&q, t, &mut rng);
        }
    }
}

#[test]
fn bf16_products_match_the_model_of_each_precision() {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    for (rows, cols) in [(37, 256), (21, 200), (9, 40), (70, 2048)] {
        let w = bf16_matrix(&mut rng, rows, cols);
        for t in [1, 2, 3, 4, 5, 6, 19] {
            check(&w, t, &mut rng);
        }
    }
}

/// Large enough to be split over the worker pool, with several jobs in one dispatch.
#[test]
fn many_products_in_one_dispatch_equal_single_products() {
    let mut rng = Rng(7);
    let a = fp8_matrix(&mut rng, 300, 512);
    let b = bf16_matrix(&mut rng, 260, 512);
    let xa: Vec<f32> = (0..5 * 512).map(|_| rng.f32()).collect();
    let xb: Vec<f32> = (0..512).map(|_| rng.f32()).collect();
    for p in [Precision::Exact, Precision::Fast] {
        let many = matmul_many(&[(&xa, 5, &a), (&xb, 1, &b), (&xa, 5, &b)], p);
        assert_eq!(many[0], matmul(&xa, 5, &a, p));
        assert_eq!(many[1], matmul(&xb, 1, &b, p));
        assert_eq!(many[2], matmul(&xa, 5, &b, p));
    }
}

/// The blocked kernel split over the pool (several 64-row panels per matrix, and a partial
/// one), marked and unmarked jobs in one dispatch: each equals its product alone.
#[test]
fn marked_products_in_one_dispatch_equal_single_products() {
    let mut rng = Rng(11);
    let a = fp8_matrix(&mut rng, 300, 512);
    let b = bf16_matrix(&mut rng, 200, 512);
    let t = 40;
    let x: Vec<f32> = (0..t * 512).map(|_| rng.f32()).collect();
    let all = vec![true; t];
    let some: Vec<bool> = (0..t).map(|j| !(17..=30).contains(&j)).collect();
    let jobs = [
        Job::new(&x, t, &a).bulk(&all),
        Job::new(&x, t, &b).bulk(&some),
        Job::new(&x, t, &a),
    ];
    let many = products(&jobs, Precision::Fast);
    for (job, got) in jobs.iter().zip(&many) {
        assert_eq!(
            *got,
            products(std::slice::from_ref(job), Precision::Fast)[0]
        );
        for j in 0..t {
            let mark = job.bulk.get(j).copied().unwrap_or(false);
            let way = if mark { Way::FastBulk } else { Way::Fast };
            let rows = job.w.rows;
            assert_eq!(
                multiply(&x[j * 512..(j + 1) * 512], 1, job.w, way),
                got[j * rows..(j + 1) * rows],
                "token {j} differs from its product alone"
            );
        }
    }
}
