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

#[cfg(test)]
mod tests {
    use super::*;

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
