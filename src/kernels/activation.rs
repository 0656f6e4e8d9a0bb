//! Elementwise functions, in f32.
//!
//! `exp` is our own branch-free one, so that loops of SiLU and sigmoid vectorise: prefill
//! evaluates hundreds of thousands of them per token, and libm's scalar `expf` calls took
//! more time than the conv and norms around them. Plain multiplies and adds, no fused ones,
//! so every compiled variant gives the same bits.

/// `eˣ` within 2 ulp of the correctly rounded value for x in [−87.3, 88.3]; smaller inputs
/// give 0 and larger ones e^88.3, which is harmless in `1 / (1 + eˣ)`. NaN stays NaN.
///
/// Why 0 below the range, not the subnormal eˣ or the least normal number: Intel cores take a
/// microcode assist of ~100 cycles for each subnormal result, and the least normal number
/// times anything below 1 is subnormal. Attention weights and DeltaNet decays far below the
/// range are common, and they made a prefill 30× slower there.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HI is exact (Cody–Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x0 = x;
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Cephes' minimax polynomial for e^r − 1 − r over |r| ≤ ln2/2.
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = (p * r * r + r) + 1.0;
    let bits = (t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23;
    if x0 < -87.3 {
        0.0
    } else {
        e * f32::from_bits(bits as u32)
    }
}

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `silu(g) ⊙ u`, the SwiGLU gate.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
pub fn swiglu(g: &[f32], u: &[f32]) -> Vec<f32> {
    g.iter().zip(u).map(|(&g, &u)| silu(g) * u).collect()
}

/// `x ← silu(x)`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
pub fn silu_in_place(x: &mut [f32]) {
    for v in x {
        *v = silu(*v);
    }
}

/// PyTorch's softplus with threshold 20: linear above it, as the reference kernels do.
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// In-place softmax of finite scores (an input of −∞ would get ~1e-38, not 0: see [`exp`]).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for v in x.iter_mut() {
        *v = exp(*v - m);
    }
    let s: f32 = x.iter().sum();
    let inv = 1.0 / s;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// log-softmax into `out`, accumulated in f64 so that long vocabularies keep precision.
pub fn log_softmax(x: &[f32], out: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = x.iter().map(|&v| ((v - m) as f64).exp()).sum();
    let lse = m as f64 + s.ln();
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v as f64 - lse) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::exp;

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = 0i64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp() as f32;
            let got = exp(x);
            worst = worst.max((got.to_bits() as i64 - want.to_bits() as i64).abs());
            x += 0.000_731;
        }
        assert!(worst <= 2, "worst {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite());
    }
}
