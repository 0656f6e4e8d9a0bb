//! The fast path for FP8 weights: e4m3 bytes widened exactly to bfloat16, with the 128×128
//! block scales carried by the activations, through the BF16 dot-product loops of
//! [`super::bf16dot`].
//!
//! Numbers: `y[r] = Σ_c fp8[r, c] · bf16(s[r / bn, c / bk] · x[c])`: every e4m3 value is a
//! bfloat16 value (3 mantissa bits of 7, exponents well inside), so the weights are used
//! exactly, and the one rounding is of the scaled activation (f32 product, then bfloat16
//! nearest-even). That is one rounding fewer than transformers' BF16 model of an FP8
//! checkpoint, which rounds both `fp8 · s` and `x`.
//!
//! Why the scale moves: all rows of a 128-row block share their scales, so scaling the
//! activations once per row block (`t · k` products per 128 rows) takes the multiply and the
//! f32 round trip out of the inner loop, which then widens 64 weights with one affine byte map
//! per byte half on CPUs with GFNI ([`Affine`]), one table lookup per byte half on CPUs with
//! AVX-512 VBMI (`vpermi2b`: 128-entry byte tables), or exact f32 arithmetic elsewhere. All
//! three widenings give the same bits in the same order.
//!
//! The widened chunk of 64 columns comes out as two vectors whose columns are interleaved
//! per 128-bit lane (the natural result of byte unpacking): vector `h`, lane `l`, position
//! `i` holds column `16·l + 8·h + i`. The scaled activations are laid out the same way, so
//! each product pairs the right values; the summation order is fixed, so results stay
//! independent of the batch.

use std::arch::x86_64::*;
use std::ops::Range;
use std::sync::OnceLock;

use super::bf16dot::{run, Source};
use crate::checkpoint::{ByteCode, Matrix, MatrixData, ZeroBits};
use crate::kernels::matmul::OutRows;

/// Columns per widened chunk.
const CHUNK: usize = 64;
/// Scaled activations per pass over a row block (see `by_row_block`).
const TOKEN_BLOCK_BYTES: usize = 512 << 10;

/// Whether [`rows`] handles `w`: 8-bit weights whose scale blocks are whole chunks; integer
/// bytes only with VBMI (the arithmetic widening knows e4m3 alone).
pub fn supports(w: &Matrix) -> bool {
    matches!(w.data, MatrixData::Fp8 { block_k, block_n, code, .. }
        if block_k % CHUNK == 0 && block_n > 0
            && (code == ByteCode::E4m3 || super::super::isa::vbmi()))
}

/// A byte's magnitude (7 bits) → bfloat16 bits, exact for both codes (an integer below 128
/// has 7 significant bits; e4m3 values have 4). The e4m3 NaN code (0x7F) widens like the
/// f32 kernels do (to 480), so every path agrees on every byte.
fn table(code: ByteCode) -> [u16; 128] {
    std::array::from_fn(|m| {
        let v = match code {
            ByteCode::E4m3 => f32::from_bits((m as u32) << 20) * f32::from_bits((127 + 120) << 23),
            ByteCode::SignMagnitude => m as f32,
        };
        (v.to_bits() >> 16) as u16
    })
}

/// Byte tables for `vpermi2b`: high and low bytes of [`table`], 64 entries per register.
struct Tables {
    hi: [__m512i; 2],
    lo: [__m512i; 2],
}

/// Widening by table lookup (AVX-512 VBMI).
pub(super) struct Lookup(Tables);

/// Per code: the high bytes' two halves, then the low bytes' two halves of its [`table`].
/// Built once: every call of [`rows`] (a decode step makes thousands) loads its tables.
fn byte_tables(code: ByteCode) -> &'static [[u8; 64]; 4] {
    static TABLES: OnceLock<[[[u8; 64]; 4]; 2]> = OnceLock::new();
    let all = TABLES.get_or_init(|| {
        [ByteCode::E4m3, ByteCode::SignMagnitude].map(|c| {
            let tab = table(c);
            let bytes = |shift: u32, half: usize| -> [u8; 64] {
                std::array::from_fn(|i| (tab[64 * half + i] >> shift) as u8)
            };
            [bytes(8, 0), bytes(8, 1), bytes(0, 0), bytes(0, 1)]
        })
    });
    &all[match code {
        ByteCode::E4m3 => 0,
        ByteCode::SignMagnitude => 1,
    }]
}

impl Lookup {
    /// # Safety
    /// AVX-512 F.
    #[inline(always)]
    pub(super) unsafe fn new(code: ByteCode) -> Lookup {
        let t = byte_tables(code);
        // SAFETY: each table is 64 bytes, read as one vector.
        let v = |i: usize| unsafe { _mm512_loadu_si512(t[i].as_ptr() as *const _) };
        Lookup(Tables {
            hi: [v(0), v(1)],
            lo: [v(2), v(3)],
        })
    }
}

impl Source for Lookup {
    const ELEM: usize = 1;
    const VECS: usize = 2;
    fn pair(h: usize, q: usize) -> usize {
        // Word q: 128-bit lane q / 4, columns 16·lane + 8·h + 2·(q % 4) (module comment).
        8 * (q / 4) + 4 * h + q % 4
    }
    #[inline(always)]
    unsafe fn chunk(&self, p: *const u8) -> [__m512bh; 2] {
        // SAFETY: 64 readable bytes at p (the caller's guarantee); VBMI as for `widen`.
        unsafe { self.widen(_mm512_loadu_si512(p as *const _)) }
    }
}

impl Lookup {
    /// The 64 bytes of `v` widened.
    ///
    /// # Safety
    /// AVX-512 VBMI, enabled in every entry point that builds a `Lookup`.
    #[inline(always)]
    unsafe fn widen(&self, v: __m512i) -> [__m512bh; 2] {
        // SAFETY: register operations only, with the features of the caller.
        unsafe {
            let t = &self.0;
            let hi = _mm512_permutex2var_epi8(t.hi[0], v, t.hi[1]);
            let lo = _mm512_permutex2var_epi8(t.lo[0], v, t.lo[1]);
            // hi | (v & 0x80): the sign.
            let hi = _mm512_ternarylogic_epi32::<0xF8>(hi, v, _mm512_set1_epi8(-128));
            [
                std::mem::transmute::<__m512i, __m512bh>(_mm512_unpacklo_epi8(lo, hi)),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_unpackhi_epi8(lo, hi)),
            ]
        }
    }
}

/// Widening by two GF(2) affine maps per byte (GFNI `gf2p8affineqb`), the same bits as
/// [`Lookup`] for every code with a non-zero exponent field; chunks holding a code without
/// one (zero or subnormal, ~0.2–1 % of the chunks of quantised weights) go through the table.
///
/// Why: `vpermi2b` is three micro-ops on Intel cores, so the table lookup plus the two
/// `vdpbf16ps` made the decode kernel compute-bound there (14.8 GB/s per core from L2 on an
/// Emerald Rapids core, about the memory's share of a core); one affine map is one micro-op.
/// For e4m3 with exponent field E ≥ 1 the bfloat16 is `S | e | MMM0000` with e = E + 120,
/// whose 8 bits are `E3, ¬E3, ¬E3, ¬E3, ¬E3, E2, E1, E0` (120 = 0b0111_1000 and E < 16),
/// every one a bit of the byte or its complement: the high byte is `S E3 ¬E3 ¬E3 ¬E3 ¬E3 E2
/// E1`, the low byte `E0 M2 M1 M0 0000`, each an affine map of the byte's bits.
pub(super) struct Affine(Lookup);

/// `gf2p8affineqb` matrices: byte `7 - i` of the quadword selects the input bits whose parity
/// is output bit `i`.
const fn affine_matrix(out_bits_high_first: [u8; 8]) -> i64 {
    let mut m = 0u64;
    let mut i = 0;
    while i < 8 {
        m |= (out_bits_high_first[i] as u64) << (8 * i);
        i += 1;
    }
    m as i64
}
/// High byte: S, E3, then E3 four times (complemented by the constant 0x3C), E2, E1.
const AFFINE_HI: i64 = affine_matrix([0x80, 0x40, 0x40, 0x40, 0x40, 0x40, 0x20, 0x10]);
const AFFINE_HI_XOR: i32 = 0x3C;
/// Low byte: E0, M2, M1, M0, then zeros.
const AFFINE_LO: i64 = affine_matrix([0x08, 0x04, 0x02, 0x01, 0, 0, 0, 0]);

impl Affine {
    /// # Safety
    /// AVX-512 F.
    #[inline(always)]
    pub(super) unsafe fn new() -> Affine {
        // SAFETY: forwarded.
        Affine(unsafe { Lookup::new(ByteCode::E4m3) })
    }
}

impl Source for Affine {
    const ELEM: usize = 1;
    const VECS: usize = 2;
    fn pair(h: usize, q: usize) -> usize {
        Lookup::pair(h, q)
    }
    #[inline(always)]
    unsafe fn chunk(&self, p: *const u8) -> [__m512bh; 2] {
        // SAFETY: forwarded.
        unsafe { self.chunk_tested(p).0 }
    }
    #[inline(always)]
    unsafe fn chunk_tested(&self, p: *const u8) -> ([__m512bh; 2], bool) {
        // SAFETY: 64 readable bytes at p (the caller's guarantee); GFNI and VBMI are enabled
        // in the only entry point that builds an `Affine`.
        unsafe {
            let v = _mm512_loadu_si512(p as *const _);
            if _mm512_testn_epi8_mask(v, _mm512_set1_epi8(0x78)) != 0 {
                return (self.0.widen(v), true);
            }
            (affine(v), false)
        }
    }
    /// Without the test: on a core of the Emerald Rapids machine it was one vector
    /// micro-op in six of the widening and dot products, and the one-token loop ran ≈ 1.2×
    /// as fast from L2 without it.
    #[inline(always)]
    unsafe fn chunk_normal(&self, p: *const u8) -> [__m512bh; 2] {
        // SAFETY: as for `chunk_tested`; every byte has a non-zero exponent field (the caller's
        // guarantee), the affine maps' domain.
        unsafe { affine(_mm512_loadu_si512(p as *const _)) }
    }
}

/// The affine maps of [`Affine`], for 64 bytes that all have a non-zero exponent field.
///
/// # Safety
/// AVX-512 F/BW and GFNI.
#[inline(always)]
unsafe fn affine(v: __m512i) -> [__m512bh; 2] {
    // SAFETY: register operations with the caller's features.
    unsafe {
        let hi = _mm512_gf2p8affine_epi64_epi8::<AFFINE_HI_XOR>(v, _mm512_set1_epi64(AFFINE_HI));
        let lo = _mm512_gf2p8affine_epi64_epi8::<0>(v, _mm512_set1_epi64(AFFINE_LO));
        [
            std::mem::transmute::<__m512i, __m512bh>(_mm512_unpacklo_epi8(lo, hi)),
            std::mem::transmute::<__m512i, __m512bh>(_mm512_unpackhi_epi8(lo, hi)),
        ]
    }
}

/// Widening by f32 arithmetic, for CPUs without VBMI: the same bits as [`Lookup`].
pub(super) struct Arith;

impl Source for Arith {
    const ELEM: usize = 1;
    const VECS: usize = 2;
    fn pair(h: usize, q: usize) -> usize {
        // Word q: 128-bit lane q / 4, columns 16·lane + 8·h + 2·(q % 4) (module comment).
        8 * (q / 4) + 4 * h + q % 4
    }
    #[inline(always)]
    unsafe fn chunk(&self, p: *const u8) -> [__m512bh; 2] {
        // SAFETY: 64 readable bytes at p (the caller's guarantee).
        unsafe {
            let l: [__m128i; 4] =
                std::array::from_fn(|i| _mm_loadu_si128(p.add(16 * i) as *const __m128i));
            // Sign and the 7 magnitude bits placed as an f32's top bits give the value times
            // 2⁻¹²⁰ (subnormal codes included, as f32 subnormals); 2¹²⁰ restores it exactly.
            let f = |b: __m128i| {
                let bits = _mm512_and_si512(
                    _mm512_slli_epi32::<20>(_mm512_cvtepi8_epi32(b)),
                    _mm512_set1_epi32(0x87F0_0000u32 as i32),
                );
                _mm512_mul_ps(
                    _mm512_castsi512_ps(bits),
                    _mm512_set1_ps(f32::from_bits((127 + 120) << 23)),
                )
            };
            // Vector 0 takes the low 8 bytes of each 16-byte lane, vector 1 the high 8.
            [
                _mm512_cvtne2ps_pbh(
                    f(_mm_unpacklo_epi64(l[2], l[3])),
                    f(_mm_unpacklo_epi64(l[0], l[1])),
                ),
                _mm512_cvtne2ps_pbh(
                    f(_mm_unpackhi_epi64(l[2], l[3])),
                    f(_mm_unpackhi_epi64(l[0], l[1])),
                ),
            ]
        }
    }
}

/// `out[r - rows.start, j] = Σ_k x[j, k] · W[r, k]` for `r` in `rows`, FP8 `w`, `x` in f32
/// (`[t, cols]`); `then` is the weight byte the caller reads next (prefetched at the end).
///
/// # Safety
/// The CPU must support AVX-512 F, BW and BF16 (checked by the caller's dispatch),
/// `supports(w)` must hold, and `out` must be writable for `rows.len()` rows of `t` tokens.
pub unsafe fn rows(
    x: &[f32],
    t: usize,
    w: &Matrix,
    rows: Range<usize>,
    out: OutRows,
    then: *const u8,
) {
    // SAFETY: the caller verified F, BW and BF16; VBMI is checked here (`supports` admits
    // integer bytes only with it).
    unsafe {
        let e4m3 = matches!(
            w.data,
            MatrixData::Fp8 {
                code: ByteCode::E4m3,
                ..
            }
        );
        if e4m3 && super::super::isa::gfni() {
            rows_affine(x, t, w, rows, out, then)
        } else if super::super::isa::vbmi() {
            rows_lookup(x, t, w, rows, out, then)
        } else {
            rows_arith(x, t, w, rows, out, then)
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vbmi")]
unsafe fn rows_lookup(
    x: &[f32],
    t: usize,
    w: &Matrix,
    rows: Range<usize>,
    out: OutRows,
    then: *const u8,
) {
    let MatrixData::Fp8 { code, .. } = w.data else {
        unreachable!("fp8dot::rows called for a {} matrix", w.dtype_name());
    };
    // SAFETY: AVX-512 F is enabled here.
    let s = unsafe { Lookup::new(code) };
    // SAFETY: same target features (VBMI included, which `Lookup` needs).
    unsafe { by_row_block(&s, x, t, w, rows, out, then, None) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vbmi,gfni")]
unsafe fn rows_affine(
    x: &[f32],
    t: usize,
    w: &Matrix,
    rows: Range<usize>,
    out: OutRows,
    then: *const u8,
) {
    // SAFETY: AVX-512 F is enabled here.
    let s = unsafe { Affine::new() };
    let zero = match &w.data {
        MatrixData::Fp8 { zero_exponent, .. } if t == 1 => Some(zero_exponent.bits(w.rows, w.cols)),
        _ => None,
    };
    // SAFETY: same target features (GFNI and VBMI included, which `Affine` needs); the record
    // is the matrix's own.
    unsafe { by_row_block(&s, x, t, w, rows, out, then, zero) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn rows_arith(
    x: &[f32],
    t: usize,
    w: &Matrix,
    rows: Range<usize>,
    out: OutRows,
    then: *const u8,
) {
    assert!(
        matches!(
            w.data,
            MatrixData::Fp8 {
                code: ByteCode::E4m3,
                ..
            }
        ),
        "arithmetic widening is for e4m3 bytes"
    );
    // SAFETY: same target features.
    unsafe { by_row_block(&Arith, x, t, w, rows, out, then, None) }
}

/// Each 128-row block with its scales applied to the activations, then [`run`].
///
/// # Safety
/// AVX-512 F/BW/BF16 and what `S` needs; `supports(w)`; `out` as for [`rows`];
/// `zero_exponent`, if given, `w`'s own record.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn by_row_block<S: Source>(
    s: &S,
    x: &[f32],
    t: usize,
    w: &Matrix,
    rows: Range<usize>,
    out: OutRows,
    then: *const u8,
    zero_exponent: Option<&ZeroBits>,
) {
    let MatrixData::Fp8 {
        w: q,
        scales,
        block_n,
        block_k,
        ..
    } = &w.data
    else {
        unreachable!("fp8dot::rows called for a {} matrix", w.dtype_name());
    };
    let (k, bn, bk) = (w.cols, *block_n, *block_k);
    let q = q.as_slice();
    let sc = k.div_ceil(bk);
    assert!(bk % CHUNK == 0 && bn > 0);
    assert!(rows.end <= w.rows && q.len() >= w.rows * k);
    assert!(x.len() >= t * k && scales.len() >= w.rows.div_ceil(bn) * sc);
    let ks = k.next_multiple_of(CHUNK);
    // Tokens per pass: their scaled activations (≤ 512 KiB) stay in L2 while every panel of
    // the row block passes over them.
    let tb = (TOKEN_BLOCK_BYTES / (2 * ks))
        .max(6)
        .next_multiple_of(6)
        .min(t);
    // Every element `run` reads is written by `scaled_acts` first.
    let mut xs = crate::kernels::scratch::take_u16(tb * ks);
    let mut r = rows.start;
    while r < rows.end {
        let g = r / bn;
        let end = ((g + 1) * bn).min(rows.end);
        for j in (0..t).step_by(tb) {
            let n = tb.min(t - j);
            // SAFETY: x has t·k values, so tokens j..j+n exist; xs has room for n rows of ks;
            // the block's scales exist (checked above).
            unsafe {
                scaled_acts(
                    &x[j * k..],
                    n,
                    k,
                    &scales[g * sc..(g + 1) * sc],
                    bk,
                    &mut xs,
                )
            };
            // The rows after this block's, or the caller's next read after the last block.
            let next = if end < rows.end {
                q.as_ptr().wrapping_add(end * k)
            } else {
                then
            };
            // SAFETY: rows r..end exist, xs holds n rows of ks, and the caller's `out` covers
            // these rows and tokens.
            unsafe {
                run(
                    s,
                    q.as_ptr(),
                    k,
                    xs.as_ptr(),
                    ks,
                    n,
                    r..end,
                    out.skip(r - rows.start, j),
                    next,
                    zero_exponent,
                )
            };
        }
        r = end;
    }
    crate::kernels::scratch::put_u16(xs);
}

/// `out[j, ·] = bf16(s[c / bk] · x[j, c])` for each token, zero-padded to whole chunks, in
/// the chunk layout of the module comment.
///
/// # Safety
/// AVX-512 F/BW/BF16; `x` has `t·k` values, `out` has `t · k` rounded up to a chunk.
#[inline(always)]
unsafe fn scaled_acts(x: &[f32], t: usize, k: usize, s: &[f32], bk: usize, out: &mut [u16]) {
    let ks = k.next_multiple_of(CHUNK);
    assert!(x.len() >= t * k && out.len() >= t * ks);
    for j in 0..t {
        for c in (0..k).step_by(CHUNK) {
            let sv = _mm512_set1_ps(s[c / bk]);
            for l in 0..4 {
                let c0 = c + 16 * l;
                let mask: __mmask16 = if c0 + 16 <= k {
                    !0
                } else if c0 < k {
                    (1u16 << (k - c0)) - 1
                } else {
                    0
                };
                // SAFETY: the mask keeps the load within token j's k columns; both stores
                // fall inside this token's chunk (c + 64 ≤ ks).
                unsafe {
                    let v = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(j * k + c0));
                    let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_mul_ps(v, sv)));
                    let dst = out.as_mut_ptr().add(j * ks + c + 8 * l);
                    _mm_storeu_si128(dst as *mut __m128i, _mm256_castsi256_si128(b));
                    _mm_storeu_si128(
                        dst.add(32) as *mut __m128i,
                        _mm256_extracti128_si256::<1>(b),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both widenings give every byte's exact value, in the same layout.
    #[test]
    fn lookup_and_arith_widen_every_code_alike() {
        if !(is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512bw")) {
            return;
        }
        // Every code in order (chunks with zero and subnormal codes among them), then every
        // code with an exponent, in chunks of those alone (the affine maps' own branch).
        let normal: Vec<u8> = (0..=255u8).filter(|b| b & 0x78 != 0).collect();
        let codes: Vec<[u8; 64]> = (0..4)
            .map(|b| std::array::from_fn(|i| (64 * b + i) as u8))
            .chain((0..4).map(|b| std::array::from_fn(|i| normal[(64 * b + i) % normal.len()])))
            .collect();
        for c in &codes {
            // SAFETY: features checked above; 64 bytes per call.
            let a = unsafe { widen_arith(c) };
            for (i, &byte) in c.iter().enumerate() {
                let pos = layout(i);
                let want = crate::kernels::fp8::e4m3_to_f32(byte);
                let got = f32::from_bits((a[pos] as u32) << 16);
                if byte & 0x7F != 0x7F {
                    assert_eq!(got.to_bits(), want.to_bits(), "code {byte:#04x}");
                }
            }
            if is_x86_feature_detected!("avx512vbmi") {
                // SAFETY: VBMI checked too.
                assert_eq!(unsafe { widen_lookup(c) }, a);
                if is_x86_feature_detected!("gfni") {
                    // SAFETY: GFNI checked too.
                    assert_eq!(unsafe { widen_affine(c) }, a);
                }
            }
        }
    }

    /// One-token products that skip the zero-exponent test where the matrix's record allows
    /// give the bits of the table widening, which never skips: on chunks with and without
    /// such codes, before and after the record is made, for row groups on and off its 8-row
    /// grid, with a partial last chunk.
    #[test]
    fn skipping_the_test_by_the_matrix_record_changes_no_bit() {
        if !(is_x86_feature_detected!("avx512bf16")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vbmi")
            && is_x86_feature_detected!("gfni"))
        {
            return;
        }
        let (rows, k) = (40, 320);
        let mut state = 0x9E37_79B9u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        // Codes with an exponent, then a zero or a subnormal in one chunk of every third row.
        let mut q: Vec<u8> = (0..rows * k)
            .map(|_| loop {
                let b = next() as u8;
                if b & 0x78 != 0 && b & 0x7F != 0x7F {
                    break b;
                }
            })
            .collect();
        for r in (0..rows).step_by(3) {
            let c = (next() as usize) % k;
            q[r * k + c] = (next() as u8) & 0x87;
        }
        let scales: Vec<f32> = (0..rows.div_ceil(128) * k.div_ceil(128))
            .map(|i| 1e-3 * (1 + i) as f32)
            .collect();
        let w = Matrix {
            rows,
            cols: k,
            data: MatrixData::fp8(
                crate::checkpoint::Elems::Owned(q),
                scales,
                128,
                128,
                ByteCode::E4m3,
            ),
        };
        let x: Vec<f32> = (0..k).map(|i| ((i * 7 % 19) as f32 - 9.0) * 0.37).collect();
        // The first pass records the groups, the others use the record.
        for span in [0..rows, 0..rows, 3..rows, 8..32] {
            let mut got = vec![0.0f32; rows];
            let mut want = vec![0.0f32; rows];
            // SAFETY: features checked above; each output holds every row of the one token.
            unsafe {
                rows_affine(
                    &x,
                    1,
                    &w,
                    span.clone(),
                    OutRows::new(got.as_mut_ptr().add(span.start), rows),
                    std::ptr::null(),
                );
                rows_lookup(
                    &x,
                    1,
                    &w,
                    span.clone(),
                    OutRows::new(want.as_mut_ptr().add(span.start), rows),
                    std::ptr::null(),
                );
            }
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "rows {span:?}");
        }
        let MatrixData::Fp8 { zero_exponent, .. } = &w.data else {
            unreachable!()
        };
        // Every group recorded, with some chunks clear and some not.
        let z = zero_exponent.bits(rows, k);
        assert!((0..rows / 8).all(|g| z.known(g)));
        let zero = (0..rows / 8)
            .flat_map(|g| (0..k / 64).map(move |c| (g, c)))
            .filter(|&(g, c)| z.zero(g, c))
            .count();
        assert!(zero > 0 && zero < rows / 8 * k / 64, "{zero}");
    }

    /// Where column `i` of a chunk lands in the two widened vectors.
    fn layout(i: usize) -> usize {
        let (l, h, p) = (i / 16, (i / 8) % 2, i % 8);
        32 * h + 8 * l + p
    }

    fn store(v: [__m512bh; 2]) -> [u16; 64] {
        // SAFETY: two 64-byte vectors into 128 bytes.
        unsafe { std::mem::transmute(v) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn widen_arith(c: &[u8; 64]) -> [u16; 64] {
        // SAFETY: 64 bytes; features as enabled.
        store(unsafe { Arith.chunk(c.as_ptr()) })
    }

    /// Every code in each chunk, so the affine maps serve only chunks of codes with an
    /// exponent, and the rest fall back: both branches are compared.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vbmi,gfni")]
    unsafe fn widen_affine(c: &[u8; 64]) -> [u16; 64] {
        // SAFETY: AVX-512 F is enabled here.
        let s = unsafe { Affine::new() };
        // SAFETY: 64 bytes; features as enabled.
        store(unsafe { s.chunk(c.as_ptr()) })
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vbmi")]
    unsafe fn widen_lookup(c: &[u8; 64]) -> [u16; 64] {
        // SAFETY: AVX-512 F is enabled here.
        let s = unsafe { Lookup::new(ByteCode::E4m3) };
        // SAFETY: 64 bytes; features as enabled.
        store(unsafe { s.chunk(c.as_ptr()) })
    }
}
