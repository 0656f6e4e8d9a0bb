//! Fine-grained FP8 quantisation of one weight matrix, with the arithmetic of transformers'
//! FineGrainedFP8 quantiser (`Fp8Quantize`), so that a checkpoint quantised here is byte for
//! byte the one that quantiser writes:
//!
//! per 128×128 block `scale = 448 / amax(|W_block|)` in f32 (1 where the block is all zero;
//! computed as torch does it, see [`scale_of`]),
//! `code = e4m3(clamp(W·scale, −448, 448))` rounded to nearest, ties to even, and
//! `weight_scale_inv = 1 / scale` stored as F32. Blocks at the bottom and right edges are
//! partial where a dimension is not a multiple of 128 (the scale grid is ceil-divided, as the
//! released checkpoints' loaders expect; transformers leaves such matrices unquantised, and
//! on the real model's shapes, all multiples of 128, there are none).

use anyhow::{bail, Result};
use std::sync::Mutex;

use crate::kernels::fp8::f32_to_e4m3;
use crate::kernels::pool::for_each_chunk;

/// Block edge of the released FP8 checkpoints (`weight_block_size: [128, 128]`).
pub const BLOCK: usize = 128;

/// A quantised `[n, k]` matrix: e4m3 codes row-major, and `weight_scale_inv` per block,
/// `[ceil(n/128), ceil(k/128)]` row-major.
pub struct Fp8Matrix {
    pub codes: Vec<u8>,
    pub scale_inv: Vec<f32>,
}

/// The source of a matrix's values: writes row `r` (k values) widened to f32 into `out`.
pub trait Rows: Sync {
    fn row(&self, r: usize, out: &mut [f32]);
}

/// Row-major f32 values.
pub struct F32Rows<'a> {
    pub values: &'a [f32],
    pub k: usize,
}

impl Rows for F32Rows<'_> {
    fn row(&self, r: usize, out: &mut [f32]) {
        out.copy_from_slice(&self.values[r * self.k..(r + 1) * self.k]);
    }
}

/// Row-major BF16 bit patterns (widening is exact).
pub struct Bf16Rows<'a> {
    pub bits: &'a [u16],
    pub k: usize,
}

impl Rows for Bf16Rows<'_> {
    fn row(&self, r: usize, out: &mut [f32]) {
        let src = &self.bits[r * self.k..(r + 1) * self.k];
        for (o, &b) in out.iter_mut().zip(src) {
            *o = f32::from_bits((b as u32) << 16);
        }
    }
}

/// Quantises an `[n, k]` matrix, block rows spread over the kernel thread pool. Fails on a
/// NaN or infinite value (the quantiser would turn the whole block into NaN), naming where.
pub fn quantize_fp8(n: usize, k: usize, src: &dyn Rows) -> Result<Fp8Matrix> {
    quantize_with(n, k, src, true)
}

/// [`quantize_fp8`] on the calling thread only (for callers that run one matrix per thread).
pub fn quantize_fp8_serial(n: usize, k: usize, src: &dyn Rows) -> Result<Fp8Matrix> {
    quantize_with(n, k, src, false)
}

fn quantize_with(n: usize, k: usize, src: &dyn Rows, parallel: bool) -> Result<Fp8Matrix> {
    let bk = k.div_ceil(BLOCK);
    let mut codes = vec![0u8; n * k];
    let mut scale_inv = vec![0f32; n.div_ceil(BLOCK) * bk];
    let bad: Mutex<Option<(usize, usize, f32)>> = Mutex::new(None);
    let mut block_rows: Vec<(&mut [u8], &mut [f32])> = codes
        .chunks_mut((BLOCK * k).max(1))
        .zip(scale_inv.chunks_mut(bk.max(1)))
        .collect();
    let one = |br: usize, rows: &mut [(&mut [u8], &mut [f32])]| {
        let (codes, scale_inv) = &mut rows[0];
        if let Err(at) = quantize_block_row(br * BLOCK, k, src, codes, scale_inv) {
            let mut b = bad.lock().unwrap_or_else(|e| e.into_inner());
            if b.is_none_or(|prev| (at.0, at.1) < (prev.0, prev.1)) {
                *b = Some(at);
            }
        }
    };
    if parallel {
        for_each_chunk(&mut block_rows, 1, &one);
    } else {
        for (br, rows) in block_rows.chunks_mut(1).enumerate() {
            one(br, rows);
        }
    }
    if let Some((r, c, v)) = bad.into_inner().unwrap_or_else(|e| e.into_inner()) {
        bail!("value {v} at row {r}, column {c} is not finite; FP8 blocks need finite weights");
    }
    Ok(Fp8Matrix { codes, scale_inv })
}

/// One block row: up to 128 rows starting at `r0`, `codes` their `[rows, k]` e4m3 codes.
/// `Err((row, column, value))` at the first non-finite value.
fn quantize_block_row(
    r0: usize,
    k: usize,
    src: &dyn Rows,
    codes: &mut [u8],
    scale_inv: &mut [f32],
) -> Result<(), (usize, usize, f32)> {
    let rows = codes.len() / k.max(1);
    let mut w = vec![0f32; rows * k];
    for (i, row) in w.chunks_mut(k.max(1)).enumerate() {
        src.row(r0 + i, row);
    }
    if let Some(i) = w.iter().position(|x| !x.is_finite()) {
        return Err((r0 + i / k, i % k, w[i]));
    }
    let mut amax = vec![0f32; scale_inv.len()];
    for row in w.chunks(k.max(1)) {
        for (a, block) in amax.iter_mut().zip(row.chunks(BLOCK)) {
            *a = block.iter().fold(*a, |m, x| m.max(x.abs()));
        }
    }
    let scale: Vec<f32> = amax.iter().map(|&a| scale_of(a)).collect();
    for (s_inv, s) in scale_inv.iter_mut().zip(&scale) {
        *s_inv = 1.0 / s;
    }
    for (row, out) in w.chunks(k.max(1)).zip(codes.chunks_mut(k.max(1))) {
        for ((vals, outs), &s) in row.chunks(BLOCK).zip(out.chunks_mut(BLOCK)).zip(&scale) {
            encode(vals, s, outs);
        }
    }
    Ok(())
}

/// The block's scale as transformers computes `448 / amax`: torch evaluates a Python number
/// divided by a tensor as `reciprocal(amax) · 448`, two roundings, which differ from one
/// division in the last bit for about one block in six.
fn scale_of(amax: f32) -> f32 {
    if amax > 0.0 {
        (1.0 / amax) * 448.0
    } else {
        1.0
    }
}

/// `e4m3(v·s)` for a run of values whose products are within ±448 (s = 448 / amax).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
fn encode(vals: &[f32], s: f32, out: &mut [u8]) {
    for (o, &v) in out.iter_mut().zip(vals) {
        *o = e4m3_in_range(v * s);
    }
}

/// f32 → e4m3fn for finite |x| ≤ 448, nearest with ties to even, without branches (so that
/// `encode` vectorises); [`f32_to_e4m3`] is the general reference it is tested against.
#[inline(always)]
fn e4m3_in_range(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let a = f32::from_bits(bits & 0x7FFF_FFFF);
    // Subnormal codes are multiples of 2⁻⁹: round a·2⁹ to an integer with the 1.5·2²³ trick
    // (the sum's last place is 1, so the addition itself rounds to nearest even).
    // The sum's low mantissa bits are then the integer itself.
    const MAGIC: f32 = 12_582_912.0;
    let sub = (a * 512.0 + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits());
    // Normal codes: keep the exponent and 3 mantissa bits, rounding the low 20 bits to even;
    // a carry into the exponent is the right next code. Rebias 127 → 7.
    let ab = a.to_bits();
    let rounded = (ab + 0x7_FFFF + ((ab >> 20) & 1)) >> 20;
    let normal = rounded.wrapping_sub(120 << 3).min(0x7E);
    let code = if a < 1.0 / 64.0 { sub } else { normal };
    code as u8 | sign
}

/// The e4m3 code of every value quantised with `scale`, as [`f32_to_e4m3`] gives it; for tests.
pub fn reference_code(v: f32, scale: f32) -> u8 {
    f32_to_e4m3((v * scale).clamp(-448.0, 448.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branchless_encoding_equals_the_reference_everywhere_in_range() {
        // Every f32 in [0, 448] whose low 12 bits are a fixed pattern, both signs: covers
        // every exponent, every e4m3 rounding boundary (they differ in bit 20 and above) and
        // the subnormal range.
        for pattern in [0u32, 0x7FF, 0x800, 0xFFF] {
            let mut bits = pattern;
            while f32::from_bits(bits) <= 448.0 {
                let x = f32::from_bits(bits);
                for v in [x, -x] {
                    assert_eq!(e4m3_in_range(v), f32_to_e4m3(v), "x = {v:e} ({bits:#x})");
                }
                bits += 0x1000;
            }
        }
        // Exact ties at the first normal code and inside the subnormals.
        for v in [1.0f32 / 64.0 - 1.0 / 1024.0, 3.0 / 1024.0, 448.0, 447.9] {
            assert_eq!(e4m3_in_range(v), f32_to_e4m3(v), "x = {v:e}");
        }
    }

    fn check(n: usize, k: usize, values: &[f32]) {
        let q = quantize_fp8(n, k, &F32Rows { values, k }).unwrap();
        let (bn, bk) = (n.div_ceil(BLOCK), k.div_ceil(BLOCK));
        assert_eq!(q.scale_inv.len(), bn * bk);
        for br in 0..bn {
            for bc in 0..bk {
                let mut amax = 0f32;
                for r in br * BLOCK..((br + 1) * BLOCK).min(n) {
                    for c in bc * BLOCK..((bc + 1) * BLOCK).min(k) {
                        amax = amax.max(values[r * k + c].abs());
                    }
                }
                let scale = scale_of(amax);
                assert_eq!(q.scale_inv[br * bk + bc], 1.0 / scale);
                for r in br * BLOCK..((br + 1) * BLOCK).min(n) {
                    for c in bc * BLOCK..((bc + 1) * BLOCK).min(k) {
                        let want = reference_code(values[r * k + c], scale);
                        assert_eq!(q.codes[r * k + c], want, "({r}, {c})");
                    }
                }
            }
        }
    }

    #[test]
    fn blocks_scales_and_partial_edges() {
        let mut s = 7u64;
        let mut rnd = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2f32.powi(-(((s >> 20) % 9) as i32))
        };
        for (n, k) in [(256, 384), (200, 77), (1, 1), (129, 130)] {
            let mut v: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            // An all-zero block keeps scale 1 and code 0 (and -0.0 keeps its sign bit).
            if n >= 128 && k >= 128 {
                for r in 0..128 {
                    v[r * k..r * k + 128].fill(if r % 2 == 0 { 0.0 } else { -0.0 });
                }
            }
            check(n, k, &v);
        }
    }

    #[test]
    fn non_finite_values_are_refused_with_their_place() {
        let mut v = vec![0.5f32; 300 * 10];
        v[257 * 10 + 3] = f32::NAN;
        let e = quantize_fp8(300, 10, &F32Rows { values: &v, k: 10 })
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("row 257, column 3"), "{e}");
    }
}
