//! FP8 e4m3fn (torch `float8_e4m3fn`): 1 sign, 4 exponent bits (bias 7), 3 mantissa bits,
//! no infinities, S.1111.111 is NaN, max ±448.

/// All 256 codes decoded once, at compile time.
pub static E4M3_TABLE: [f32; 256] = build_table();

const fn decode(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((b >> 3) & 0xF) as i32;
    let man = (b & 0x7) as f32;
    if exp == 0xF && (b & 0x7) == 0x7 {
        return f32::NAN;
    }
    if exp == 0 {
        // Subnormal: 0.mmm × 2^(1−7).
        return sign * man / 8.0 / 64.0;
    }
    let mut scale = 1.0f32;
    let mut e = exp - 7;
    while e > 0 {
        scale *= 2.0;
        e -= 1;
    }
    while e < 0 {
        scale /= 2.0;
        e += 1;
    }
    sign * (1.0 + man / 8.0) * scale
}

const fn build_table() -> [f32; 256] {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = decode(i as u8);
        i += 1;
    }
    t
}

#[inline]
pub fn e4m3_to_f32(b: u8) -> f32 {
    E4M3_TABLE[b as usize]
}

/// f32 → e4m3fn, round to nearest even, saturating at ±448 (as torch's
/// `clamp(-448, 448).to(float8_e4m3fn)` after the clamp). NaN maps to the NaN code.
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    if a.is_nan() {
        return 0x7F | sign;
    }
    if a >= 448.0 {
        return 0x7E | sign;
    }
    if a < 2f32.powi(-6) {
        // Subnormal range: multiples of 2^-9; 8 × 2^-9 rounds up into the first normal code.
        return (a * 512.0).round_ties_even() as u8 | sign;
    }
    // Keep the biased exponent and the top 3 mantissa bits, rounding the other 20 to even;
    // a carry out of the mantissa correctly bumps the exponent.
    let bits = a.to_bits();
    let mut q = bits >> 20;
    let rem = bits & 0xF_FFFF;
    if rem > 0x8_0000 || (rem == 0x8_0000 && q & 1 == 1) {
        q += 1;
    }
    let code = q - (120 << 3);
    code.min(0x7E) as u8 | sign
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_round_trips_every_code_and_rounds_to_nearest() {
        for b in 0..=255u8 {
            let v = e4m3_to_f32(b);
            if v.is_nan() {
                continue;
            }
            let back = f32_to_e4m3(v);
            // ±0 both decode to 0.
            assert_eq!(e4m3_to_f32(back), v, "code {b:#04x}");
        }
        // Nearest representable value for random inputs: no other code is closer.
        let mut s = 1u64;
        for _ in 0..20000 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            let x = ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
                * 500.0
                * 2f32.powi(-((s % 17) as i32));
            let q = e4m3_to_f32(f32_to_e4m3(x));
            let best = (0..=255u8)
                .map(e4m3_to_f32)
                .filter(|v| !v.is_nan())
                .map(|v| (v - x.clamp(-448.0, 448.0)).abs())
                .fold(f32::INFINITY, f32::min);
            assert_eq!((q - x.clamp(-448.0, 448.0)).abs(), best, "x = {x}");
        }
    }

    #[test]
    fn known_codes() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0xFE), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
    }
}
