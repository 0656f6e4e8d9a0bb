//! Matrix kernels for every stored weight dtype with f32 activations and f32 accumulation,
//! written once over a vector of f32 lanes ([`Vector`]): AVX-512 and AVX2 + FMA on x86-64
//! (`x86::exact`), NEON on aarch64 (`arm::exact`). Each width has its own entry point with
//! its target features, into which everything here is inlined.
//!
//! One arithmetic for every batch size: for row `n` and token `j`, chunks of two vectors of
//! weights are multiplied into one accumulator (two FMAs per chunk, low half first), each
//! weight scaled by its block's scale, a scalar tail handles the columns past the last full
//! chunk of a block, and the lanes are summed at the end. Decode (one token) converts weights on the fly; batches convert a few
//! rows to f32 once and reuse them for every token. Values and order of operations are the
//! same in both, so a sequence's logits do not depend on what else is in its batch.
//!
//! FP8 e4m3 → f32 with three integer operations: sign-extend the byte to 32 bits, shift left
//! by 20 and keep the sign and the 7 exponent/mantissa bits. The result is an IEEE single of
//! exactly `value · 2⁻¹²⁰` — e4m3 and f32 subnormals line up too, both being `0.m · 2^(1−bias)`
//! — and the `2¹²⁰` goes into the block scale. (`vcvtph2ps`, the obvious alternative via
//! halves, is several times slower on AMD cores.)
//!
//! Pointer arithmetic: every kernel checks up front that the rows, activations and outputs it
//! touches are in bounds (`assert!`s in [`rows_with`] and [`run`]); the loops then stay below those
//! bounds, which is what each `SAFETY` comment refers to.

use std::marker::PhantomData;
use std::ops::Range;

use crate::checkpoint::{ByteCode, Matrix, MatrixData};

/// Rows per register tile.
const RB: usize = 4;

/// A vector of f32 lanes and the widenings of stored weights into it.
///
/// Every `unsafe` method needs the CPU features of its width (its entry point enables them),
/// and the loads and stores need `LANES` elements at their pointer.
pub trait Vector: Copy {
    const LANES: usize;
    /// Tokens per register tile in batched products: `RB·TB` accumulators, `TB` activations
    /// and a weight vector must fit in the registers.
    const TB: usize;
    /// # Safety
    /// The width's CPU features (trait docs).
    unsafe fn zero() -> Self;
    /// # Safety
    /// As for [`Vector::zero`].
    unsafe fn splat(v: f32) -> Self;
    /// # Safety
    /// The width's CPU features; `LANES` readable values at `p`.
    unsafe fn load(p: *const f32) -> Self;
    /// # Safety
    /// The width's CPU features; `LANES` writable values at `p`.
    unsafe fn store(self, p: *mut f32);
    /// # Safety
    /// As for [`Vector::zero`].
    unsafe fn mul(self, o: Self) -> Self;
    /// `self · b + c`.
    ///
    /// # Safety
    /// As for [`Vector::zero`].
    unsafe fn fmadd(self, b: Self, c: Self) -> Self;
    /// # Safety
    /// As for [`Vector::zero`].
    unsafe fn sum(self) -> f32;
    /// `LANES` e4m3 bytes as `value · 2⁻¹²⁰` (module comment).
    ///
    /// # Safety
    /// As for [`Vector::load`].
    unsafe fn fp8(p: *const u8) -> Self;
    /// `LANES` sign-magnitude bytes (`ByteCode::SignMagnitude`) as exact f32 integers.
    ///
    /// # Safety
    /// As for [`Vector::load`].
    unsafe fn q8(p: *const u8) -> Self;
    /// # Safety
    /// As for [`Vector::load`].
    unsafe fn bf16(p: *const u16) -> Self;
    /// # Safety
    /// As for [`Vector::load`].
    unsafe fn f16(p: *const u16) -> Self;
    /// A hint to fetch the cache line at `p` (any address: never dereferenced).
    fn prefetch(p: *const u8);
}

/// Sign and the 7 exponent/mantissa bits of an e4m3 byte, shifted into an f32's top bits.
pub const FP8_BITS: i32 = 0x87F0_0000u32 as i32;

/// A weight dtype as the kernels see it.
trait Weights: Sync {
    type E: Copy;
    /// Read from memory (prefetch ahead) rather than from a cache-resident buffer.
    const STREAM: bool = true;
    /// Has per-block scales to apply.
    const SCALED: bool = false;
    fn cols(&self) -> usize;
    /// Columns per scale block (a multiple of 32, or `cols` when unscaled).
    fn block(&self) -> usize;
    fn scale(&self, row: usize, block: usize) -> f32;
    fn row(&self, r: usize) -> *const Self::E;
    /// Weights `p[0..V::LANES]` as f32 (unscaled).
    unsafe fn load<V: Vector>(p: *const Self::E) -> V;
    /// Weight `p[0]` (unscaled), for tails.
    unsafe fn one(p: *const Self::E) -> f32;
}

/// Bytes with 128×128 block scales: e4m3, or sign + 7-bit integer where `INT` (the `q8` copy
/// of an lm_head).
struct Bytes<'a, const INT: bool> {
    w: &'a [u8],
    scales: &'a [f32],
    cols: usize,
    block_n: usize,
    block_k: usize,
    scale_cols: usize,
}

impl<const INT: bool> Weights for Bytes<'_, INT> {
    type E = u8;
    const SCALED: bool = true;
    fn cols(&self) -> usize {
        self.cols
    }
    fn block(&self) -> usize {
        self.block_k
    }
    #[inline(always)]
    fn scale(&self, row: usize, block: usize) -> f32 {
        // For e4m3, 2¹²⁰ undoes the exponent rebias of `Vector::fp8`.
        let s = self.scales[(row / self.block_n) * self.scale_cols + block];
        if INT {
            s
        } else {
            s * TWO_POW_120
        }
    }
    #[inline(always)]
    fn row(&self, r: usize) -> *const u8 {
        self.w[r * self.cols..].as_ptr()
    }
    #[inline(always)]
    unsafe fn load<V: Vector>(p: *const u8) -> V {
        // SAFETY: the caller guarantees `V::LANES` readable bytes at `p`.
        unsafe {
            if INT {
                V::q8(p)
            } else {
                V::fp8(p)
            }
        }
    }
    #[inline(always)]
    unsafe fn one(p: *const u8) -> f32 {
        // SAFETY: the caller guarantees `p` is readable.
        let b = unsafe { *p };
        if INT {
            ByteCode::SignMagnitude.value(b)
        } else {
            super::fp8::e4m3_to_f32(b) * TWO_POW_MINUS_120
        }
    }
}

const TWO_POW_120: f32 = f32::from_bits((127 + 120) << 23);
const TWO_POW_MINUS_120: f32 = f32::from_bits((127 - 120) << 23);

/// How one unscaled stored type widens: a vector of them, and a single one (for tails).
trait Widen: Sync {
    type E: Copy + Sync;
    /// Read from memory (prefetch ahead) rather than from a cache-resident buffer.
    const STREAM: bool = true;
    /// # Safety
    /// As for [`Vector::load`].
    unsafe fn load<V: Vector>(p: *const Self::E) -> V;
    /// # Safety
    /// `p` is readable.
    unsafe fn one(p: *const Self::E) -> f32;
}

struct AsBf16;
struct AsF16;
/// f32 weights; `STREAM` false for rows already widened (their block scales applied) into a
/// cache-resident buffer.
struct AsF32<const STREAM: bool>;

impl Widen for AsBf16 {
    type E = u16;
    #[inline(always)]
    unsafe fn load<V: Vector>(p: *const u16) -> V {
        // SAFETY: forwarded from the caller.
        unsafe { V::bf16(p) }
    }
    #[inline(always)]
    unsafe fn one(p: *const u16) -> f32 {
        // SAFETY: forwarded from the caller.
        f32::from_bits((unsafe { *p } as u32) << 16)
    }
}

impl Widen for AsF16 {
    type E = u16;
    #[inline(always)]
    unsafe fn load<V: Vector>(p: *const u16) -> V {
        // SAFETY: forwarded from the caller.
        unsafe { V::f16(p) }
    }
    #[inline(always)]
    unsafe fn one(p: *const u16) -> f32 {
        // SAFETY: forwarded from the caller.
        half::f16::from_bits(unsafe { *p }).to_f32()
    }
}

impl<const STREAM: bool> Widen for AsF32<STREAM> {
    type E = f32;
    const STREAM: bool = STREAM;
    #[inline(always)]
    unsafe fn load<V: Vector>(p: *const f32) -> V {
        // SAFETY: forwarded from the caller.
        unsafe { V::load(p) }
    }
    #[inline(always)]
    unsafe fn one(p: *const f32) -> f32 {
        // SAFETY: forwarded from the caller.
        unsafe { *p }
    }
}

/// Weights without scales, stored as `K` says.
struct Plain<'a, K: Widen> {
    w: &'a [K::E],
    cols: usize,
    kind: PhantomData<K>,
}

impl<'a, K: Widen> Plain<'a, K> {
    fn new(w: &'a [K::E], cols: usize) -> Self {
        Plain {
            w,
            cols,
            kind: PhantomData,
        }
    }
}

impl<K: Widen> Weights for Plain<'_, K> {
    type E = K::E;
    const STREAM: bool = K::STREAM;
    fn cols(&self) -> usize {
        self.cols
    }
    fn block(&self) -> usize {
        self.cols.max(1)
    }
    #[inline(always)]
    fn scale(&self, _: usize, _: usize) -> f32 {
        1.0
    }
    #[inline(always)]
    fn row(&self, r: usize) -> *const K::E {
        self.w[r * self.cols..].as_ptr()
    }
    #[inline(always)]
    unsafe fn load<V: Vector>(p: *const K::E) -> V {
        // SAFETY: the caller guarantees `V::LANES` readable values at `p`.
        unsafe { K::load(p) }
    }
    #[inline(always)]
    unsafe fn one(p: *const K::E) -> f32 {
        // SAFETY: the caller guarantees `p` is readable.
        unsafe { K::one(p) }
    }
}

/// Whether this module can handle `w` (FP8 block widths must be whole chunks of either width).
pub fn supports(w: &Matrix) -> bool {
    match &w.data {
        MatrixData::Fp8 { block_k, .. } => block_k % 32 == 0,
        _ => true,
    }
}

/// `out[(r - rows.start) * t + j] = Σ_k x[j, k] · W[r, k]` for `r` in `rows`, in `V`'s
/// width.
///
/// # Safety
/// The CPU features `V` needs; inlined into an entry point that enables them.
#[inline(always)]
pub unsafe fn rows_with<V: Vector>(
    x: &[f32],
    t: usize,
    w: &Matrix,
    rows: Range<usize>,
    out: &mut [f32],
) {
    let cols = w.cols;
    assert!(rows.end <= w.rows && x.len() >= t * cols && out.len() >= rows.len() * t);
    // SAFETY: every call below needs the caller's CPU features (this function's contract) and
    // in-bounds rows, checked above and by the slices each `Weights` holds.
    unsafe {
        match &w.data {
            MatrixData::Fp8 {
                w: q,
                scales,
                block_n,
                block_k,
                code,
                ..
            } => {
                let q = q.as_slice();
                assert!(q.len() >= w.rows * cols);
                macro_rules! bytes {
                    ($int:literal) => {
                        run::<V, _>(
                            &Bytes::<$int> {
                                w: q,
                                scales,
                                cols,
                                block_n: *block_n,
                                block_k: *block_k,
                                scale_cols: cols.div_ceil(*block_k),
                            },
                            x,
                            t,
                            rows,
                            out,
                        )
                    };
                }
                match code {
                    ByteCode::E4m3 => bytes!(false),
                    ByteCode::SignMagnitude => bytes!(true),
                }
            }
            MatrixData::Bf16(d) => {
                assert!(d.as_slice().len() >= w.rows * cols);
                run::<V, _>(&Plain::<AsBf16>::new(d.as_slice(), cols), x, t, rows, out)
            }
            MatrixData::F16(d) => {
                assert!(d.as_slice().len() >= w.rows * cols);
                run::<V, _>(&Plain::<AsF16>::new(d.as_slice(), cols), x, t, rows, out)
            }
            MatrixData::F32(d) => {
                assert!(d.as_slice().len() >= w.rows * cols);
                run::<V, _>(
                    &Plain::<AsF32<true>>::new(d.as_slice(), cols),
                    x,
                    t,
                    rows,
                    out,
                )
            }
        }
    }
}

#[inline(always)]
unsafe fn run<V: Vector, W: Weights>(
    w: &W,
    x: &[f32],
    t: usize,
    rows: Range<usize>,
    out: &mut [f32],
) {
    let k = w.cols();
    let chunk = 2 * V::LANES;
    let mut buf: Vec<f32> = Vec::new();
    let mut r = rows.start;
    while r < rows.end {
        let nr = RB.min(rows.end - r);
        let o = &mut out[(r - rows.start) * t..(r - rows.start + nr) * t];
        let ptrs: [*const W::E; RB] = std::array::from_fn(|i| w.row(r + i.min(nr - 1)));
        let scale = |i: usize, b: usize| w.scale(r + i, b);
        // SAFETY: rows r..r+nr exist (each pointer has `k` elements), x has t·k, o has nr·t.
        unsafe {
            if t == 1 {
                match nr {
                    4 => tile::<V, W::E, W, 4, 1>(ptrs, &scale, k, w.block(), x, k, o, 1),
                    3 => tile::<V, W::E, W, 3, 1>(ptrs, &scale, k, w.block(), x, k, o, 1),
                    2 => tile::<V, W::E, W, 2, 1>(ptrs, &scale, k, w.block(), x, k, o, 1),
                    _ => tile::<V, W::E, W, 1, 1>(ptrs, &scale, k, w.block(), x, k, o, 1),
                }
            } else {
                // Widen the rows once (scaled, exactly as the one-token tile uses them), then
                // reuse them for every group of tokens.
                buf.resize(nr * k, 0.0);
                for (i, &p) in ptrs.iter().enumerate().take(nr) {
                    let dst = buf[i * k..(i + 1) * k].as_mut_ptr();
                    let bk = w.block();
                    let mut b0 = 0;
                    let mut bi = 0;
                    while b0 < k {
                        let b1 = (b0 + bk).min(k);
                        let s = if W::SCALED { w.scale(r + i, bi) } else { 1.0 };
                        let sv = V::splat(s);
                        let mut c = b0;
                        while c + chunk <= b1 {
                            // Prefetch the next tile's rows, as the one-token path does.
                            V::prefetch(p.wrapping_add(RB * k + c) as *const u8);
                            if std::mem::size_of::<W::E>() * chunk > 64 {
                                V::prefetch(
                                    p.wrapping_add(RB * k + c + 64 / std::mem::size_of::<W::E>())
                                        as *const u8,
                                );
                            }
                            for h in 0..2 {
                                let mut v: V = W::load(p.add(c + h * V::LANES));
                                if W::SCALED {
                                    v = v.mul(sv);
                                }
                                v.store(dst.add(c + h * V::LANES));
                            }
                            c += chunk;
                        }
                        while c < b1 {
                            *dst.add(c) = W::one(p.add(c)) * s;
                            c += 1;
                        }
                        b0 = b1;
                        bi += 1;
                    }
                }
                let wp: [*const f32; RB] =
                    std::array::from_fn(|i| buf[i.min(nr - 1) * k..].as_ptr());
                let mut j = 0;
                while j < t {
                    let nt = V::TB.min(t - j);
                    buffered_tile::<V>(wp, k, &x[j * k..], &mut o[j..], t, nr, nt);
                    j += nt;
                }
            }
        }
        r += nr;
    }
}

/// Dispatches a tile of widened (already scaled) rows to the kernel instance for its shape.
#[inline(always)]
unsafe fn buffered_tile<V: Vector>(
    wp: [*const f32; RB],
    k: usize,
    x: &[f32],
    o: &mut [f32],
    t: usize,
    nr: usize,
    nt: usize,
) {
    let one = |_: usize, _: usize| 1.0;
    macro_rules! go {
        ($n:literal, $t:literal) => {
            // SAFETY: forwarded from the caller (rows `nr`, tokens `nt` in bounds).
            unsafe { tile::<V, f32, Plain<AsF32<false>>, $n, $t>(wp, &one, k, k, x, k, o, t) }
        };
    }
    match (nr, nt) {
        (4, 4) => go!(4, 4),
        (4, 3) => go!(4, 3),
        (4, 2) => go!(4, 2),
        (4, _) => go!(4, 1),
        (3, 4) => go!(3, 4),
        (3, 3) => go!(3, 3),
        (3, 2) => go!(3, 2),
        (3, _) => go!(3, 1),
        (2, 4) => go!(2, 4),
        (2, 3) => go!(2, 3),
        (2, 2) => go!(2, 2),
        (2, _) => go!(2, 1),
        (_, 4) => go!(1, 4),
        (_, 3) => go!(1, 3),
        (_, 2) => go!(1, 2),
        _ => go!(1, 1),
    }
}

/// `N` rows × `T` tokens. Row `i`'s weights start at `w[i]` (`k` elements), token `j`'s
/// activations at `x[j · xstride]`, and the result goes to `out[i · ostride + j]`. `L` says
/// how to read the weights; when `L::SCALED`, every chunk is multiplied by its block's scale
/// `scale(i, block)` before use (the dequantised weight), so the one-token path and the
/// widened buffer of batched products see the same values.
///
/// # Safety
/// The features `V` needs; the pointers and slices must cover what is described above.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile<V: Vector, E: Copy, L: Weights<E = E>, const N: usize, const T: usize>(
    w: [*const E; RB],
    scale: &impl Fn(usize, usize) -> f32,
    k: usize,
    bk: usize,
    x: &[f32],
    xstride: usize,
    out: &mut [f32],
    ostride: usize,
) {
    debug_assert!(x.len() >= (T - 1) * xstride + k);
    let (lanes, chunk) = (V::LANES, 2 * V::LANES);
    let xp = x.as_ptr();
    let mut acc = [[V::zero(); T]; N];
    let mut tail = [[0.0f32; T]; N];
    let mut b0 = 0;
    let mut bi = 0;
    while b0 < k {
        let b1 = (b0 + bk).min(k);
        let s: [f32; N] = std::array::from_fn(|i| if L::SCALED { scale(i, bi) } else { 1.0 });
        let sv: [V; N] = std::array::from_fn(|i| V::splat(s[i]));
        let mut c = b0;
        while c + chunk <= b1 && T > 1 {
            // Several tokens: one half-chunk at a time keeps the live registers at
            // N·T accumulators + T activations + 1 weight vector (no spills). Each
            // accumulator still adds its low half before its high half.
            for h in 0..2 {
                let xv: [V; T] = std::array::from_fn(|j| {
                    // SAFETY: c + chunk <= k, within token j's activations.
                    unsafe { V::load(xp.add(j * xstride + c + lanes * h)) }
                });
                for i in 0..N {
                    // SAFETY: c + chunk <= k, within row i.
                    let mut wv: V = unsafe { L::load(w[i].add(c + lanes * h)) };
                    if L::SCALED {
                        wv = wv.mul(sv[i]);
                    }
                    for j in 0..T {
                        acc[i][j] = wv.fmadd(xv[j], acc[i][j]);
                    }
                }
            }
            c += chunk;
        }
        while c + chunk <= b1 && T == 1 {
            // SAFETY: c + chunk <= k, within the token's activations.
            let (xl, xh) = unsafe { (V::load(xp.add(c)), V::load(xp.add(c + lanes))) };
            for i in 0..N {
                if L::STREAM {
                    // The same columns of the tile after this one (rows are contiguous, so
                    // that is `RB` rows further on). A hint only: past the end is harmless.
                    V::prefetch(w[i].wrapping_add(RB * k + c) as *const u8);
                    if std::mem::size_of::<E>() * chunk > 64 {
                        V::prefetch(
                            w[i].wrapping_add(RB * k + c + 64 / std::mem::size_of::<E>())
                                as *const u8,
                        );
                    }
                }
                // SAFETY: c + chunk <= k, within row i.
                let (mut lo, mut hi): (V, V) =
                    unsafe { (L::load(w[i].add(c)), L::load(w[i].add(c + lanes))) };
                if L::SCALED {
                    lo = lo.mul(sv[i]);
                    hi = hi.mul(sv[i]);
                }
                acc[i][0] = hi.fmadd(xh, lo.fmadd(xl, acc[i][0]));
            }
            c += chunk;
        }
        for cc in c..b1 {
            for i in 0..N {
                // SAFETY: cc < k, within row i.
                let wv = unsafe { L::one(w[i].add(cc)) } * s[i];
                for (j, tj) in tail[i].iter_mut().enumerate() {
                    // SAFETY: cc < k, within token j.
                    *tj += wv * unsafe { *xp.add(j * xstride + cc) };
                }
            }
        }
        b0 = b1;
        bi += 1;
    }
    for i in 0..N {
        for j in 0..T {
            out[i * ostride + j] = acc[i][j].sum() + tail[i][j];
        }
    }
}
