//! RMS norms (spec §6), in f32.

use super::matmul::dot;

/// Qwen3-Next's zero-centred RMSNorm: `x · rsqrt(mean(x²) + eps) · (1 + w)`, per row of `w.len()`.
pub fn rms_norm_zc(x: &mut [f32], w: &[f32], eps: f32) {
    for row in x.chunks_mut(w.len()) {
        let r = rms_scale(row, eps);
        for (v, &g) in row.iter_mut().zip(w) {
            *v = *v * r * (1.0 + g);
        }
    }
}

/// Like [`rms_norm_zc`] but writing into `out`.
pub fn rms_norm_zc_into(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    out.copy_from_slice(x);
    rms_norm_zc(out, w, eps);
}

/// `1 / sqrt(mean(x²) + eps)`.
#[inline]
pub fn rms_scale(x: &[f32], eps: f32) -> f32 {
    1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt()
}

/// `x · rsqrt(Σx² + eps)` (GDN q/k normalisation, spec §6.3).
pub fn l2_norm(x: &mut [f32], eps: f32) {
    // Eight partial sums (`dot`), not one running sum: a chain of dependent additions took
    // ~4 cycles per element, and these norms run for every head of every token.
    let r = 1.0 / (dot(x, x) + eps).sqrt();
    for v in x.iter_mut() {
        *v *= r;
    }
}
