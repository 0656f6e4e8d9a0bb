//! aarch64 SIMD kernels (NEON, which every aarch64 CPU has).

pub mod exact;
