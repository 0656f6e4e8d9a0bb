//! The only place that decides *how* numbers are crunched: matrix products per weight dtype,
//! norms, activations, RoPE and the delta rule. Model code calls these on plain slices and
//! typed weight views.

pub mod activation;
#[cfg(target_arch = "aarch64")]
pub mod arm;
pub mod attention;
pub mod bandwidth;
pub mod delta_rule;
pub mod exact;
pub mod fp8;
pub mod gemm_f32;
pub mod isa;
pub mod matmul;
pub mod microbench;
pub mod norm;
pub mod parallel;
pub mod pool;
pub mod profile;
pub mod rope;
pub mod scratch;
pub mod split;
#[cfg(target_arch = "x86_64")]
pub mod x86;
