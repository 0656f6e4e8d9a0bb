//! Typed views of tensor bytes inside a memory-mapped safetensors file.

use anyhow::{bail, Result};
use memmap2::Mmap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use crate::kernels::fp8::e4m3_to_f32;

#[cfg(target_endian = "big")]
compile_error!("safetensors data is little-endian; big-endian hosts are not supported");

/// The element types qnext reads; others are rejected with the tensor's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    F16,
    F8E4M3,
    Other(safetensors::Dtype),
}

impl DType {
    pub fn from_safetensors(d: safetensors::Dtype) -> DType {
        match d {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::F8_E4M3 => DType::F8E4M3,
            other => DType::Other(other),
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::F8E4M3 => 1,
            DType::Other(d) => d.size(),
        }
    }

    pub fn name(self) -> String {
        match self {
            DType::F32 => "F32".into(),
            DType::BF16 => "BF16".into(),
            DType::F16 => "F16".into(),
            DType::F8E4M3 => "F8_E4M3".into(),
            DType::Other(d) => format!("{d:?}"),
        }
    }
}

/// Elements of one tensor: borrowed from the mapped file when the bytes are aligned for `T`,
/// otherwise copied once (safetensors only aligns the data section, so a tensor after an
/// odd-sized FP8 tensor can be misaligned for wider types).
pub enum Elems<T: bytemuck::Pod> {
    Mapped { map: Arc<Mmap>, range: Range<usize> },
    Owned(Vec<T>),
}

impl<T: bytemuck::Pod> Elems<T> {
    pub fn new(map: &Arc<Mmap>, range: Range<usize>) -> Elems<T> {
        let bytes = &map[range.clone()];
        if bytemuck::try_cast_slice::<u8, T>(bytes).is_ok() {
            Elems::Mapped {
                map: map.clone(),
                range,
            }
        } else {
            Elems::Owned(bytemuck::pod_collect_to_vec(bytes))
        }
    }

    pub fn as_slice(&self) -> &[T] {
        match self {
            // Alignment and length were checked in `new`, so the cast cannot fail.
            Elems::Mapped { map, range } => bytemuck::cast_slice(&map[range.clone()]),
            Elems::Owned(v) => v,
        }
    }

    /// Gives the whole pages inside a mapped tensor back to the kernel (`MADV_DONTNEED`):
    /// resident memory drops by the tensor's size once it has been replaced (an 8-bit copy of
    /// `lm_head`). Pages shared with neighbouring tensors stay.
    ///
    /// # Safety
    /// No other `Elems` or reference may read these bytes afterwards: in a file mapping they
    /// would only fault back in, but in an anonymous copy (`LoadMode::HugePages`) they read
    /// back as zeros.
    pub unsafe fn release(self) {
        const PAGE: usize = 4096;
        if let Elems::Mapped { map, range } = self {
            let start = range.start.next_multiple_of(PAGE);
            let end = range.end / PAGE * PAGE;
            if end > start {
                // SAFETY: the range lies inside the mapping; the caller guarantees nothing
                // reads it again (see above). Failure only leaves the pages resident.
                let _ = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
    }
}

/// One tensor of a checkpoint: name, file, dtype, shape and its bytes.
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub file: &'a Path,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub(crate) map: &'a Arc<Mmap>,
    pub(crate) range: Range<usize>,
}

impl<'a> TensorRef<'a> {
    /// The tensor's bytes, for as long as the checkpoint is open.
    pub fn bytes(&self) -> &'a [u8] {
        let map: &'a Arc<Mmap> = self.map;
        &map[self.range.clone()]
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn expect_shape(&self, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            bail!(
                "tensor `{}` in {} has shape {:?}, expected {:?}",
                self.name,
                self.file.display(),
                self.shape,
                shape
            );
        }
        Ok(())
    }

    pub fn elems<T: bytemuck::Pod>(&self) -> Elems<T> {
        Elems::new(self.map, self.range.clone())
    }

    /// Elements `part` of the tensor (in storage order), in place like [`TensorRef::elems`].
    pub fn elems_in<T: bytemuck::Pod>(&self, part: Range<usize>) -> Elems<T> {
        let size = std::mem::size_of::<T>();
        debug_assert!(part.end * size <= self.range.len());
        let start = self.range.start + part.start * size;
        Elems::new(self.map, start..start + part.len() * size)
    }

    /// The values widened to f32 (for small tensors: norms, gates, scales, conv taps).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let b = self.bytes();
        Ok(match self.dtype {
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::F8E4M3 => b.iter().map(|&x| e4m3_to_f32(x)).collect(),
            DType::Other(_) => bail!(
                "tensor `{}` in {} has dtype {}, expected a float type (F32, BF16, F16, F8_E4M3)",
                self.name,
                self.file.display(),
                self.dtype.name()
            ),
        })
    }
}
