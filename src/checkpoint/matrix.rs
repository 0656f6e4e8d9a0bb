//! A Linear weight `[rows, cols]` (PyTorch `[out, in]`) as stored: F32, BF16, F16, or FP8 e4m3
//! with one f32 dequantisation scale per `block_n × block_k` block. FP8 weights stay one byte
//! per weight; the matrix kernels apply the scales.

use anyhow::{bail, Result};

use super::files::Checkpoint;
use super::view::{DType, Elems};
use crate::config::Fp8Config;

pub enum MatrixData {
    F32(Elems<f32>),
    /// Raw bf16 bits.
    Bf16(Elems<u16>),
    /// Raw f16 bits.
    F16(Elems<u16>),
    Fp8 {
        w: Elems<u8>,
        /// `[ceil(rows / block_n), ceil(cols / block_k)]`, row-major.
        scales: Vec<f32>,
        block_n: usize,
        block_k: usize,
    },
}

pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: MatrixData,
}

impl Matrix {
    /// Loads `name` (a `….weight`), checking it is `[rows, cols]`; an F8_E4M3 weight needs its
    /// `….weight_scale_inv` and the checkpoint's `quantization_config`.
    pub fn load(
        ck: &Checkpoint,
        name: &str,
        rows: usize,
        cols: usize,
        fp8: Option<&Fp8Config>,
    ) -> Result<Matrix> {
        let t = ck.get(name)?;
        t.expect_shape(&[rows, cols])?;
        let data = match t.dtype {
            DType::F32 => MatrixData::F32(t.elems()),
            DType::BF16 => MatrixData::Bf16(t.elems()),
            DType::F16 => MatrixData::F16(t.elems()),
            DType::F8E4M3 => {
                let Some(q) = fp8 else {
                    bail!(
                        "tensor `{name}` in {} is F8_E4M3 but config.json has no fp8 `quantization_config`",
                        t.file.display()
                    );
                };
                let scale_name = format!("{name}_scale_inv");
                let s = ck.get(&scale_name)?;
                let sn = rows.div_ceil(q.block_n);
                let sk = cols.div_ceil(q.block_k);
                s.expect_shape(&[sn, sk])?;
                MatrixData::Fp8 {
                    w: t.elems(),
                    scales: s.to_f32()?,
                    block_n: q.block_n,
                    block_k: q.block_k,
                }
            }
            other => bail!(
                "tensor `{name}` in {} has dtype {}, expected F32, BF16, F16 or F8_E4M3",
                t.file.display(),
                other.name()
            ),
        };
        Ok(Matrix { rows, cols, data })
    }

    pub fn dtype_name(&self) -> &'static str {
        match self.data {
            MatrixData::F32(_) => "F32",
            MatrixData::Bf16(_) => "BF16",
            MatrixData::F16(_) => "F16",
            MatrixData::Fp8 { .. } => "F8_E4M3",
        }
    }

    /// Bytes read to use every weight once (scales included).
    pub fn bytes(&self) -> usize {
        let n = self.rows * self.cols;
        match &self.data {
            MatrixData::F32(_) => 4 * n,
            MatrixData::Bf16(_) | MatrixData::F16(_) => 2 * n,
            MatrixData::Fp8 { scales, .. } => n + 4 * scales.len(),
        }
    }

    /// Address of row `r`'s first stored weight (one past the last row for `r == rows`): a
    /// prefetch target, never dereferenced as such.
    pub fn row_ptr(&self, r: usize) -> *const u8 {
        let at = r.min(self.rows) * self.cols;
        match &self.data {
            MatrixData::F32(d) => d.as_slice().as_ptr().wrapping_add(at) as *const u8,
            MatrixData::Bf16(d) | MatrixData::F16(d) => {
                d.as_slice().as_ptr().wrapping_add(at) as *const u8
            }
            MatrixData::Fp8 { w, .. } => w.as_slice().as_ptr().wrapping_add(at),
        }
    }

    /// Row `r` widened to f32 (FP8 rows with their block scales applied), for embeddings and
    /// for kernels that work row by row.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let k = self.cols;
        debug_assert_eq!(out.len(), k);
        let span = r * k..(r + 1) * k;
        match &self.data {
            MatrixData::F32(w) => out.copy_from_slice(&w.as_slice()[span]),
            MatrixData::Bf16(w) => {
                for (o, &b) in out.iter_mut().zip(&w.as_slice()[span]) {
                    *o = f32::from_bits((b as u32) << 16);
                }
            }
            MatrixData::F16(w) => {
                for (o, &b) in out.iter_mut().zip(&w.as_slice()[span]) {
                    *o = half::f16::from_bits(b).to_f32();
                }
            }
            MatrixData::Fp8 {
                w,
                scales,
                block_n,
                block_k,
            } => {
                let row = &w.as_slice()[span];
                let srow = &scales[(r / block_n) * k.div_ceil(*block_k)..];
                for (kb, (o, q)) in out
                    .chunks_mut(*block_k)
                    .zip(row.chunks(*block_k))
                    .enumerate()
                {
                    let s = srow[kb];
                    for (o, &q) in o.iter_mut().zip(q) {
                        *o = crate::kernels::fp8::e4m3_to_f32(q) * s;
                    }
                }
            }
        }
    }
}
