//! The NEON width of the f32 matrix kernels (`kernels::exact`): two 4-lane registers per
//! vector, so that a chunk is 16 weights as on AVX2 and the loads stay whole 8- and 16-byte
//! ones.

use std::arch::aarch64::*;
use std::ops::Range;

use crate::checkpoint::Matrix;
use crate::kernels::exact::{rows_with, Vector, FP8_BITS};

/// `out[(r - rows.start) * t + j] = Σ_k x[j, k] · W[r, k]` for `r` in `rows`, 8 lanes.
pub fn rows_neon(x: &[f32], t: usize, w: &Matrix, rows: Range<usize>, out: &mut [f32]) {
    // SAFETY: NEON is part of the aarch64 baseline, so `Neon`'s instructions always exist.
    unsafe { rows_with::<Neon>(x, t, w, rows, out) }
}

/// Eight f32 lanes in two NEON registers (low lanes first).
#[derive(Clone, Copy)]
pub struct Neon(float32x4_t, float32x4_t);

impl Vector for Neon {
    const LANES: usize = 8;
    // 32 registers, two per vector: 4·2 accumulators, 2 activations, a weight and its scale.
    const TB: usize = 2;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Neon(vdupq_n_f32(0.0), vdupq_n_f32(0.0))
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Neon(vdupq_n_f32(v), vdupq_n_f32(v))
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees 8 elements at p (this function's contract).
        unsafe { Neon(vld1q_f32(p), vld1q_f32(p.add(4))) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees 8 elements at p (this function's contract).
        unsafe {
            vst1q_f32(p, self.0);
            vst1q_f32(p.add(4), self.1);
        }
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        Neon(vmulq_f32(self.0, o.0), vmulq_f32(self.1, o.1))
    }
    #[inline(always)]
    unsafe fn fmadd(self, b: Self, c: Self) -> Self {
        Neon(vfmaq_f32(c.0, self.0, b.0), vfmaq_f32(c.1, self.1, b.1))
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        vaddvq_f32(vaddq_f32(self.0, self.1))
    }
    #[inline(always)]
    unsafe fn fp8(p: *const u8) -> Self {
        // As on x86: sign-extend, shift the sign and 7 value bits to an f32's top, mask.
        // SAFETY: the caller guarantees 8 bytes at p (this function's contract).
        let b = vmovl_s8(unsafe { vld1_s8(p as *const i8) });
        let m = vdupq_n_s32(FP8_BITS);
        let f = |v: int32x4_t| vreinterpretq_f32_s32(vandq_s32(vshlq_n_s32::<20>(v), m));
        Neon(f(vmovl_s16(vget_low_s16(b))), f(vmovl_high_s16(b)))
    }
    #[inline(always)]
    unsafe fn q8(p: *const u8) -> Self {
        // Sign-extended, the byte's sign is already bit 31; the magnitude converts exactly.
        // SAFETY: the caller guarantees 8 bytes at p (this function's contract).
        let b = vmovl_s8(unsafe { vld1_s8(p as *const i8) });
        let f = |t: int32x4_t| {
            let m = vcvtq_f32_s32(vandq_s32(t, vdupq_n_s32(0x7F)));
            vreinterpretq_f32_s32(vorrq_s32(
                vreinterpretq_s32_f32(m),
                vandq_s32(t, vdupq_n_s32(i32::MIN)),
            ))
        };
        Neon(f(vmovl_s16(vget_low_s16(b))), f(vmovl_high_s16(b)))
    }
    #[inline(always)]
    unsafe fn bf16(p: *const u16) -> Self {
        // SAFETY: the caller guarantees 8 values at p (this function's contract).
        let h = unsafe { vld1q_u16(p) };
        Neon(
            vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))),
            vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h)),
        )
    }
    #[inline(always)]
    unsafe fn f16(p: *const u16) -> Self {
        // Half-precision conversions are not in stable Rust's NEON intrinsics; F16 weights
        // are rare (the releases are BF16 and FP8), so widen them one by one.
        let v: [f32; 8] =
            // SAFETY: the caller guarantees 8 values at p (this function's contract).
            std::array::from_fn(|i| half::f16::from_bits(unsafe { *p.add(i) }).to_f32());
        // SAFETY: `v` holds 8 elements.
        unsafe { Self::load(v.as_ptr()) }
    }
    #[inline(always)]
    fn prefetch(p: *const u8) {
        // SAFETY: `prfm` is a hint that never faults, whatever the address; it reads and
        // writes no registers or memory the compiler tracks.
        unsafe {
            std::arch::asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags));
        }
    }
}
