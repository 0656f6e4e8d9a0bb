//! x86-64 SIMD kernels, chosen at run time by CPU feature detection.

pub mod attention;
pub mod bf16dot;
pub mod bf16gemm;
pub mod exact;
pub mod fp8dot;
pub mod gemm_f32;
