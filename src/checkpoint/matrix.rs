//! A Linear weight `[rows, cols]` (PyTorch `[out, in]`) as stored: F32, BF16, F16, or FP8 e4m3
//! with one f32 dequantisation scale per `block_n × block_k` block. FP8 weights stay one byte
//! per weight; the matrix kernels apply the scales. The same 8-bit layout also holds qnext's
//! own sign-magnitude integer copies of 16-bit matrices ([`Matrix::to_q8`]).

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Result};

use super::files::Checkpoint;
use super::view::{DType, Elems};
use crate::config::Fp8Config;

/// What a byte of an 8-bit matrix means, before its block's scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteCode {
    /// FP8 e4m3fn, as the checkpoints store it.
    E4m3,
    /// A sign bit and a 7-bit integer magnitude, −127…127 ([`Matrix::to_q8`]). The same
    /// sign-and-magnitude split as e4m3, so the kernels widen it by the same table lookup
    /// with another table; an integer grid is finer than e4m3's near a block's largest values.
    SignMagnitude,
}

impl ByteCode {
    pub fn value(self, b: u8) -> f32 {
        match self {
            ByteCode::E4m3 => crate::kernels::fp8::e4m3_to_f32(b),
            ByteCode::SignMagnitude => {
                let m = (b & 0x7F) as f32;
                if b & 0x80 != 0 {
                    -m
                } else {
                    m
                }
            }
        }
    }
}

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
        code: ByteCode,
        /// Where the bytes have a zero exponent field, as the one-token kernel of e4m3
        /// weights on x86 with GFNI learns it (`kernels::x86::fp8dot`).
        zero_exponent: ZeroExponent,
    },
}

/// Per group of 8 rows and chunk of 64 columns of an 8-bit matrix, whether a byte there has a
/// zero exponent field (e4m3 zero or subnormal), which the affine widening of the one-token
/// kernel cannot take, so that it tests every chunk for one. The kernel records what it saw
/// the first time it read a group (it tests anyway) and skips the test in chunks without one
/// afterwards. Every reader of a group records the same bits, so concurrent records agree.
#[derive(Default)]
pub struct ZeroExponent(std::sync::OnceLock<ZeroBits>);

pub struct ZeroBits {
    chunks: usize,
    /// One bit per row group: its chunk bits are recorded.
    known: Box<[AtomicU64]>,
    /// Per group, `chunks` bits (group-major): the chunk has a zero exponent field.
    zero: Box<[AtomicU64]>,
}

impl ZeroExponent {
    /// The bits of a `rows × cols` matrix (made empty on first use).
    pub fn bits(&self, rows: usize, cols: usize) -> &ZeroBits {
        self.0.get_or_init(|| {
            let (groups, chunks) = (rows.div_ceil(8), cols.div_ceil(64));
            let words = |n: usize| (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
            ZeroBits {
                chunks,
                known: words(groups),
                zero: words(groups * chunks),
            }
        })
    }
}

impl ZeroBits {
    /// Whether row group `g`'s chunks are recorded (what [`ZeroBits::zero`] says of them
    /// is then complete).
    pub fn known(&self, g: usize) -> bool {
        self.known
            .get(g / 64)
            .is_some_and(|w| w.load(Ordering::Acquire) >> (g % 64) & 1 == 1)
    }

    /// Whether chunk `c` of row group `g` has a zero exponent field (once known).
    pub fn zero(&self, g: usize, c: usize) -> bool {
        let b = g * self.chunks + c;
        self.zero
            .get(b / 64)
            .is_none_or(|w| w.load(Ordering::Relaxed) >> (b % 64) & 1 == 1)
    }

    /// Records chunks `c0 + i` of row group `g` for the set bits `i` of `mask` as having a zero
    /// exponent field.
    pub fn record(&self, g: usize, c0: usize, mask: u64) {
        let mut m = mask;
        while m != 0 {
            let i = m.trailing_zeros() as usize;
            m &= m - 1;
            if c0 + i < self.chunks {
                let b = g * self.chunks + c0 + i;
                if let Some(w) = self.zero.get(b / 64) {
                    w.fetch_or(1 << (b % 64), Ordering::Relaxed);
                }
            }
        }
    }

    /// Marks row group `g` as recorded, after every [`ZeroBits::record`] of it.
    pub fn mark_known(&self, g: usize) {
        if let Some(w) = self.known.get(g / 64) {
            w.fetch_or(1 << (g % 64), Ordering::Release);
        }
    }
}

impl MatrixData {
    /// 8-bit weights with one scale per `block_n × block_k` block.
    pub fn fp8(
        w: Elems<u8>,
        scales: Vec<f32>,
        block_n: usize,
        block_k: usize,
        code: ByteCode,
    ) -> MatrixData {
        MatrixData::Fp8 {
            w,
            scales,
            block_n,
            block_k,
            code,
            zero_exponent: ZeroExponent::default(),
        }
    }
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
                MatrixData::fp8(t.elems(), s.to_f32()?, q.block_n, q.block_k, ByteCode::E4m3)
            }
            other => bail!(
                "tensor `{name}` in {} has dtype {}, expected F32, BF16, F16 or F8_E4M3",
                t.file.display(),
                other.name()
            ),
        };
        Ok(Matrix { rows, cols, data })
    }

    /// Rows `rows` of entry `e` of `name`, a stacked `[E, R, cols]` tensor: the fused experts
    /// of the Qwen3.5 checkpoints (`experts.gate_up_proj` `[E, 2I, H]`, gate rows first;
    /// `experts.down_proj` `[E, H, I]`), read where they lie like a tensor of their own.
    /// 16- and 32-bit only: the FP8 releases store their experts one by one, each with its
    /// own block scales, and no fused FP8 layout has been released.
    pub fn load_stacked(
        ck: &Checkpoint,
        name: &str,
        [experts, total_rows, cols]: [usize; 3],
        e: usize,
        rows: std::ops::Range<usize>,
    ) -> Result<Matrix> {
        let t = ck.get(name)?;
        t.expect_shape(&[experts, total_rows, cols])?;
        debug_assert!(e < experts && rows.end <= total_rows);
        let first = (e * total_rows + rows.start) * cols;
        let part = first..first + rows.len() * cols;
        let data = match t.dtype {
            DType::F32 => MatrixData::F32(t.elems_in(part)),
            DType::BF16 => MatrixData::Bf16(t.elems_in(part)),
            DType::F16 => MatrixData::F16(t.elems_in(part)),
            other => bail!(
                "tensor `{name}` in {} has dtype {}: fused (3-D) experts are read in F32, BF16 or F16; FP8 experts must be stored one by one (`experts.{{e}}.gate_proj.weight` with its `weight_scale_inv`), as the released FP8 checkpoints are",
                t.file.display(),
                other.name()
            ),
        };
        Ok(Matrix {
            rows: rows.len(),
            cols,
            data,
        })
    }

    pub fn dtype_name(&self) -> &'static str {
        match self.data {
            MatrixData::F32(_) => "F32",
            MatrixData::Bf16(_) => "BF16",
            MatrixData::F16(_) => "F16",
            MatrixData::Fp8 {
                code: ByteCode::E4m3,
                ..
            } => "F8_E4M3",
            MatrixData::Fp8 {
                code: ByteCode::SignMagnitude,
                ..
            } => "Q8",
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

    /// Releases the memory of a mapped matrix that has been replaced (see [`Elems::release`]).
    ///
    /// # Safety
    /// As for [`Elems::release`]: no other matrix may map the same tensor.
    pub unsafe fn release(self) {
        // SAFETY: forwarded to the caller.
        unsafe {
            match self.data {
                MatrixData::F32(e) => e.release(),
                MatrixData::Bf16(e) | MatrixData::F16(e) => e.release(),
                MatrixData::Fp8 { w, .. } => w.release(),
            }
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
                code,
                ..
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
                        *o = code.value(q) * s;
                    }
                }
            }
        }
    }
}

impl Matrix {
    /// An 8-bit copy in [`ByteCode::SignMagnitude`] with one scale per `block × block` block:
    /// the block's largest magnitude maps to 127, every weight to the nearest step, so a
    /// weight moves by at most half a step (1/254 of its block's largest magnitude). For
    /// `lm_head`, which the FP8 checkpoints keep in BF16 (16 % of a decode step's bytes):
    /// half the bytes, with a grid much finer than e4m3's at a block's large values.
    pub fn to_q8(&self, block: usize) -> Matrix {
        let (rows, cols) = (self.rows, self.cols);
        let sc = cols.div_ceil(block);
        let mut w = vec![0u8; rows * cols];
        let mut scales = vec![0.0f32; rows.div_ceil(block) * sc];
        {
            let parts: Vec<std::sync::Mutex<(&mut [u8], &mut [f32])>> = w
                .chunks_mut(block * cols)
                .zip(scales.chunks_mut(sc))
                .map(std::sync::Mutex::new)
                .collect();
            crate::kernels::pool::global().run(parts.len(), &|g| {
                let mut part = parts[g].lock().unwrap_or_else(|e| e.into_inner());
                let (q, s) = &mut *part;
                let n = q.len() / cols;
                let mut f = vec![0.0f32; n * cols];
                for (i, row) in f.chunks_exact_mut(cols).enumerate() {
                    self.row_f32(g * block + i, row);
                }
                for (b, scale) in s.iter_mut().enumerate() {
                    let cs = b * block..((b + 1) * block).min(cols);
                    let amax = f
                        .chunks_exact(cols)
                        .flat_map(|row| &row[cs.clone()])
                        .fold(0.0f32, |m, v| m.max(v.abs()));
                    *scale = if amax > 0.0 { amax / 127.0 } else { 1.0 };
                    let inv = 1.0 / *scale;
                    for (qr, fr) in q.chunks_exact_mut(cols).zip(f.chunks_exact(cols)) {
                        for (b, &v) in qr[cs.clone()].iter_mut().zip(&fr[cs.clone()]) {
                            let m = (v.abs() * inv).round().min(127.0) as u8;
                            *b = m | if v < 0.0 { 0x80 } else { 0 };
                        }
                    }
                }
            });
        }
        Matrix {
            rows,
            cols,
            data: MatrixData::fp8(
                Elems::Owned(w),
                scales,
                block,
                block,
                ByteCode::SignMagnitude,
            ),
        }
    }
}
