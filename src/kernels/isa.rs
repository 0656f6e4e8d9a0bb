//! Which SIMD kernels this CPU can run, detected once at run time.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F + BW (x86-64).
    Avx512,
    /// AVX2 + FMA + F16C (x86-64 without AVX-512): the f32 matrix kernels in 8 lanes.
    Avx2,
    /// NEON (every aarch64 CPU): the f32 matrix kernels in 8 lanes.
    Neon,
    /// Portable Rust; the compiler vectorises what it can for the baseline target.
    Portable,
}

static ISA: OnceLock<Isa> = OnceLock::new();

pub fn isa() -> Isa {
    *ISA.get_or_init(detect)
}

/// The best the CPU has, or less where `QNEXT_ISA` asks for it (`portable`, or `avx2` to run
/// the kernels of CPUs without AVX-512 on one that has it).
fn detect() -> Isa {
    let asked = std::env::var("QNEXT_ISA").unwrap_or_default();
    if asked == "portable" {
        return Isa::Portable;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if asked != "avx2"
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
        {
            return Isa::Avx512;
        }
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Isa::Avx2;
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        return Isa::Neon;
    }
    #[allow(unreachable_code)]
    Isa::Portable
}

static BF16_DOT: OnceLock<bool> = OnceLock::new();

/// AVX-512 BF16 dot products (`vdpbf16ps`) on top of [`Isa::Avx512`].
pub fn bf16_dot() -> bool {
    *BF16_DOT.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            isa() == Isa::Avx512 && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

static VBMI: OnceLock<bool> = OnceLock::new();

/// AVX-512 VBMI byte permutes (`vpermi2b`), which widen FP8 by table lookup, on top of
/// [`bf16_dot`].
pub fn vbmi() -> bool {
    *VBMI.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            bf16_dot() && is_x86_feature_detected!("avx512vbmi")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

static GFNI: OnceLock<bool> = OnceLock::new();

/// GFNI byte maps (`gf2p8affineqb`), which widen e4m3 bytes in two instructions, on top of
/// [`vbmi`] (the table lookup stays for the rare chunks with subnormal or zero codes), unless
/// `QNEXT_FP8_WIDEN=table` asks for the table lookup everywhere.
pub fn gfni() -> bool {
    *GFNI.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            vbmi()
                && std::env::var("QNEXT_FP8_WIDEN").map_or(true, |v| v != "table")
                && is_x86_feature_detected!("gfni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

static AMX: OnceLock<bool> = OnceLock::new();

/// AMX tiles with bfloat16 products (prompt chunks, `x86::amx`) on top of [`bf16_dot`],
/// unless `QNEXT_AMX=off` asks for the AVX-512 kernels instead.
pub fn amx() -> bool {
    *AMX.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            bf16_dot()
                && std::env::var("QNEXT_AMX").map_or(true, |v| v != "off")
                && super::x86::amx::detect()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}
