//! Prompt-chunk products on Intel AMX (`tdpbf16ps`, Sapphire Rapids and later): one
//! instruction multiplies a 16 × 32 tile of bfloat16 weights by a 32 × 16 tile of bfloat16
//! activations into 16 × 16 f32 sums — 8192 multiply-adds, where one `vdpbf16ps` does 512.
//! Where the CPU has it, this replaces [`super::bf16gemm`] for prompt chunks.
//!
//! Roles: the weights are the left operand, row-major as stored (BF16 read straight from the
//! mapped file, FP8 widened exactly, one scale block of a panel at a time, into a small
//! buffer laid out tile by tile), so no weight is
//! transposed; the activations, shared by every row, are laid out once per product in the
//! pair-interleaved form the right operand needs ([`VnniActs`]). Sums come out as
//! `[rows, tokens]` tiles and are transposed into the `[tokens, rows]` result.
//!
//! Numbers: activations rounded to bfloat16 once (nearest even), weights exact, f32 sums (the
//! tile unit flushes denormals to zero). For row `r` and token `j`, each column block (FP8:
//! its 128-column scale block; BF16: 256 columns) is summed in column order by the tile unit;
//! for FP8 the block's sum times its scale is added into the result in block order with one
//! fused multiply-add, so the scale is never rounded into a bfloat16 input, and BF16 blocks
//! accumulate in the tile itself. Nothing depends on the other tokens or rows of the call, so
//! a token's result is the same whatever the batch holds; the order is not `bf16gemm`'s, so
//! the last bits differ from it.
//!
//! The tile registers are unknown to the compiler: they are used only inside this module's
//! `asm!` blocks (the stable compiler has no AMX intrinsics), configured at the start of each
//! call and released at its end.

use std::arch::asm;
use std::arch::x86_64::*;
use std::ops::Range;
use std::sync::OnceLock;

use super::bf16dot::{tail, Raw, Source};
use super::bf16gemm::transpose16;
use super::fp8dot::{Affine, Arith, Lookup};
use crate::checkpoint::{Matrix, MatrixData};
use crate::kernels::matmul::OutRows;

/// Weight rows per panel: the two 16-row tiles of the left operand.
const PANEL_ROWS: usize = 32;
/// Columns per block for BF16 weights (FP8 uses its scale block).
const BF16_BLOCK: usize = 256;

/// Whether the CPU has AMX tiles with bfloat16 products and the OS lets this process use
/// them (Linux enables the 8 KiB of tile state per process on request).
pub fn detect() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        // CPUID leaf 7 reports AMX-BF16 in EDX bit 22 and AMX-TILE in bit 24.
        #[allow(unused_unsafe)]
        // SAFETY: leaf 7 exists on every CPU that gets here (it reports AVX-512, checked by
        // the caller first); CPUID has no other effect.
        let edx = unsafe { __cpuid_count(7, 0) }.edx;
        if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
            return false;
        }
        request_tile_state()
    })
}

#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: this `arch_prctl` request only asks the kernel to allow the tile state for
    // this process (all its threads); it fails cleanly on kernels that lack it.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// The tile configuration (palette 1): eight tiles of 16 rows of 64 bytes. Tiles 0–3 hold
/// sums (16 rows × 16 tokens of f32), 4–5 weights (16 rows × 32 columns of bfloat16), 6–7
/// activations (16 column pairs × 16 tokens × 2).
#[repr(C, align(64))]
pub(super) struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

pub(super) const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Activations as the right operand wants them: per group of 16 tokens (the last padded with
/// zeros), per column pair `p`, 16 tokens × the pair's two bfloat16 values (64 bytes).
pub struct VnniActs {
    data: Vec<u16>,
    /// Tokens.
    pub t: usize,
    /// Column pairs per token group (the columns padded to a multiple of 32, or of 64 for
    /// the FP8 orders).
    pairs: usize,
    order: PairOrder,
}

/// The order of the column pairs in [`VnniActs`]: the matrix's own (BF16 weights, read in
/// place), or per 64-column chunk the order in which the FP8 widening leaves a chunk's pairs
/// (`Source::pair`), so that the widened weights are used without a permute.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PairOrder {
    Natural,
    /// Table and GFNI widenings.
    Lookup,
    /// Arithmetic widening (CPUs without VBMI).
    Arith,
}

/// The pair order [`rows`] needs for `w`'s activations on this CPU.
pub fn pair_order(w: &Matrix) -> PairOrder {
    match w.data {
        MatrixData::Fp8 { .. } if super::super::isa::vbmi() => PairOrder::Lookup,
        MatrixData::Fp8 { .. } => PairOrder::Arith,
        _ => PairOrder::Natural,
    }
}

impl VnniActs {
    fn group(&self, g: usize) -> *const u16 {
        self.data.as_ptr().wrapping_add(g * self.pairs * 32)
    }
}

/// `x` (`[t, k]`) rounded to bfloat16 and laid out as [`VnniActs`], its pairs in `order`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn vnni_acts(x: &[f32], t: usize, k: usize, order: PairOrder) -> VnniActs {
    // SAFETY: the same features.
    let natural = unsafe { natural_acts(x, t, k) };
    match order {
        PairOrder::Natural => natural,
        PairOrder::Lookup => widened_order::<Lookup>(&natural, k, order),
        PairOrder::Arith => widened_order::<Arith>(&natural, k, order),
    }
}

/// [`vnni_acts`] in the matrix's order.
///
/// # Safety
/// As for [`vnni_acts`].
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn natural_acts(x: &[f32], t: usize, k: usize) -> VnniActs {
    assert!(x.len() >= t * k);
    let pairs = k.next_multiple_of(32) / 2;
    let groups = t.div_ceil(16);
    let mut data = vec![0u16; groups * pairs * 32];
    let mask = |n: usize| -> __mmask16 {
        if n >= 16 {
            !0
        } else {
            (1u16 << n) - 1
        }
    };
    for g in 0..groups {
        for c0 in (0..k).step_by(32) {
            let left = k - c0;
            let mut words = [_mm512_setzero_si512(); 16];
            for (i, w) in words.iter_mut().enumerate() {
                let j = 16 * g + i;
                if j >= t {
                    break;
                }
                let p = x.as_ptr().wrapping_add(j * k + c0);
                // SAFETY: the masks keep both loads within token j's k columns (a masked-off
                // lane is not read).
                unsafe {
                    let lo = _mm512_maskz_loadu_ps(mask(left), p);
                    let hi =
                        _mm512_maskz_loadu_ps(mask(left.saturating_sub(16)), p.wrapping_add(16));
                    // Low half from the second operand: the 32 values in column order, so
                    // 32-bit word q is column pair q.
                    *w = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                }
            }
            // SAFETY: AVX-512 F.
            let by_pair = unsafe { transpose16(words) };
            for (q, v) in by_pair.iter().enumerate() {
                let at = (g * pairs + c0 / 2 + q) * 32;
                // SAFETY: pair c0/2 + q < pairs; 32 values (64 bytes) from `at` are in `data`.
                unsafe { _mm512_storeu_si512(data.as_mut_ptr().add(at) as *mut _, *v) };
            }
        }
    }
    VnniActs {
        data,
        t,
        pairs,
        order: PairOrder::Natural,
    }
}

/// `out[r - rows.start, j] = Σ_k x[j, k] · W[r, k]` for `r` in `rows`, `j < x.t`.
///
/// # Safety
/// [`detect`] returned true; the CPU supports AVX-512 F, BW and BF16 (and VBMI, if
/// `isa::vbmi()` says so); `bf16gemm::supports(w)`; `x` was made for `w.cols` columns; `out`
/// is writable for `rows.len()` rows of `x.t` tokens.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn rows(x: &VnniActs, w: &Matrix, rows: Range<usize>, out: OutRows) {
    let k = w.cols;
    let order = pair_order(w);
    let width = if order == PairOrder::Natural { 32 } else { 64 };
    assert!(rows.end <= w.rows && x.order == order && x.pairs == k.next_multiple_of(width) / 2);
    match &w.data {
        MatrixData::Bf16(d) => {
            let d = d.as_slice();
            assert!(d.len() >= w.rows * k);
            let g = Geometry {
                k,
                n: w.rows,
                kc: BF16_BLOCK,
                scales: None,
            };
            // SAFETY: same features; rows and activations checked above, outputs by the caller.
            unsafe { run(&Raw, d.as_ptr() as *const u8, &g, x, rows, out) }
        }
        MatrixData::Fp8 {
            w: q,
            scales,
            block_n,
            block_k,
            ..
        } => {
            let q = q.as_slice();
            let sc = k.div_ceil(*block_k);
            assert!(q.len() >= w.rows * k && scales.len() >= w.rows.div_ceil(*block_n) * sc);
            let g = Geometry {
                k,
                n: w.rows,
                kc: *block_k,
                scales: Some((scales, *block_n, sc)),
            };
            // SAFETY: as above; GFNI and VBMI checked for the affine and lookup widenings.
            unsafe {
                if super::super::isa::gfni() {
                    fp8_affine(q.as_ptr(), &g, x, rows, out)
                } else if super::super::isa::vbmi() {
                    fp8_lookup(q.as_ptr(), &g, x, rows, out)
                } else {
                    run_fp8(&Arith, q.as_ptr(), &g, x, rows, out)
                }
            }
        }
        _ => unreachable!("amx::rows called for a {} matrix", w.dtype_name()),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vbmi,gfni")]
unsafe fn fp8_affine(q: *const u8, g: &Geometry, x: &VnniActs, rows: Range<usize>, out: OutRows) {
    // SAFETY: AVX-512 F is enabled here.
    let s = unsafe { Affine::new() };
    // SAFETY: forwarded (GFNI and VBMI enabled, which `Affine` needs).
    unsafe { run_fp8(&s, q, g, x, rows, out) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vbmi")]
unsafe fn fp8_lookup(q: *const u8, g: &Geometry, x: &VnniActs, rows: Range<usize>, out: OutRows) {
    // SAFETY: AVX-512 F is enabled here.
    let s = unsafe { Lookup::new(crate::checkpoint::ByteCode::E4m3) };
    // SAFETY: forwarded (VBMI enabled, which `Lookup` needs).
    unsafe { run_fp8(&s, q, g, x, rows, out) }
}

/// The matrix's shape as the loops see it.
struct Geometry<'a> {
    /// Columns.
    k: usize,
    /// Rows.
    n: usize,
    /// Columns per block.
    kc: usize,
    /// FP8: scales (`[row blocks, column blocks]`), rows per scale block, column blocks.
    scales: Option<(&'a [f32], usize, usize)>,
}

/// BF16 weights: panels of [`PANEL_ROWS`] rows, each read in place (or copied into a buffer
/// at the matrix's edges), then every pair of token groups per column block, the sums kept
/// in the tiles' `[rows, tokens]` buffer between blocks.
///
/// # Safety
/// As for [`rows`], with what `S` needs; `w` holds the `g.n × g.k` matrix.
#[inline(always)]
unsafe fn run<S: Source>(
    s: &S,
    w: *const u8,
    g: &Geometry,
    x: &VnniActs,
    rows: Range<usize>,
    out: OutRows,
) {
    let (k, kc) = (g.k, g.kc);
    let kblocks = k.div_ceil(kc);
    let t = x.t;
    let groups = t.div_ceil(16);
    let tpad = 16 * groups;
    // Widened rows: whole chunks, so the tiles' last 32 columns are always inside.
    let ws = k.next_multiple_of(64);
    let mut wb: Vec<u16> = Vec::new();
    // Rows in place only where every tile reads within the matrix: whole 32-column steps
    // (a partial one would read the next row's weights against zero activations, and
    // 0 · NaN is NaN) and 32 rows that exist.
    let in_place = S::ELEM == 2 && k.is_multiple_of(32);
    let natural = natural_order::<S>();
    let mut acc = vec![0.0f32; PANEL_ROWS * tpad];
    let row_lines = (k * S::ELEM).div_ceil(64);
    // SAFETY: loads a valid configuration (the CPU has AMX and the OS allowed it: `detect`).
    unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly, preserves_flags)) };
    let mut n0 = rows.start;
    while n0 < rows.end {
        let nr = PANEL_ROWS.min(rows.end - n0);
        let (a, lda) = if in_place && n0 + PANEL_ROWS <= g.n {
            (w.wrapping_add(n0 * k * S::ELEM), k * S::ELEM)
        } else {
            if wb.is_empty() {
                wb = vec![0u16; PANEL_ROWS * ws];
            }
            // SAFETY: rows n0..n0 + nr exist; the buffer holds 32 rows of `ws` columns.
            unsafe { widen(s, &natural, w, k, n0, nr, ws, &mut wb) };
            (wb.as_ptr() as *const u8, 2 * ws)
        };
        acc.fill(0.0);
        // The next panel's rows, fetched into L2 a share per step while this one is
        // multiplied: read only when needed, they would stall the tiles on memory.
        let n1 = n0 + nr;
        let next = w.wrapping_add(n1 * k * S::ELEM) as *const i8;
        let lines = PANEL_ROWS.min(rows.end - n1) * row_lines;
        let steps = kblocks * groups.div_ceil(2);
        let per_step = lines.div_ceil(steps);
        let mut fetched = 0;
        for kb in 0..kblocks {
            let k0 = kb * kc;
            let ksteps = kc.min(k - k0).div_ceil(32);
            for tg in (0..groups).step_by(2) {
                for _ in 0..per_step.min(lines - fetched) {
                    _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(64 * fetched));
                    fetched += 1;
                }
                let two = tg + 1 < groups;
                let sums = acc.as_mut_ptr().wrapping_add(16 * tg);
                // SAFETY: the weight tiles read rows n0..n0+32 at columns below 32·ksteps
                // past k0 (inside the matrix or the buffer, see `in_place`); the activation
                // tiles read pairs k0/2 .. k0/2 + 16·ksteps of groups tg (and tg + 1 if
                // `two`), inside `x`; the sums are the panel's rows 0..32 × tokens
                // 16·tg .. 16·tg + 32 of `acc` (16 if not `two`).
                unsafe {
                    load_sums(sums, tpad, two);
                    let a0 = a.wrapping_add(2 * k0);
                    let b0 = x.group(tg).wrapping_add(k0 / 2 * 32) as *const u8;
                    let b1 = x.group(tg + 1).wrapping_add(k0 / 2 * 32) as *const u8;
                    for st in 0..ksteps {
                        let (a0, b0, b1) = (
                            a0.wrapping_add(64 * st),
                            b0.wrapping_add(1024 * st),
                            b1.wrapping_add(1024 * st),
                        );
                        step(a0, a0.wrapping_add(16 * lda), lda, b0, b1, two);
                    }
                    store_sums(sums, tpad, two);
                }
            }
        }
        // SAFETY: `acc` holds 32 rows of `tpad` tokens; `out` covers these rows (the caller's
        // guarantee).
        unsafe { emit(&acc, tpad, nr, t, out.skip(n0 - rows.start, 0)) };
        n0 = n1;
    }
    // SAFETY: ends the tile use begun above (no tile is live after this).
    unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
}

/// FP8 weights: panels of [`PANEL_ROWS`] rows, one column (scale) block at a time: the
/// block's 32 rows widened exactly into a small buffer laid out tile by tile (8 KiB for 128
/// columns, so the tile loads come from L1 and each is 1 KiB in a row), multiplied by every
/// pair of token groups, and the block's sums times its scale added into the panel's
/// `[rows, tokens]` buffer. Each block is widened while the tiles still work on the one
/// before (two halves of the buffer), and the next panel's bytes are prefetched into L2, one
/// line per 64-column chunk widened, so the memory stream is as even as the widening.
///
/// Why per block rather than per panel: widening a whole 32-row panel first (128 KiB of
/// bfloat16 for 2048 columns) made every tile load come from L2 with rows 4 KiB apart, and
/// the next panel was prefetched in bursts between tile steps; experts of the real model's
/// shape (512 × 2048 and 2048 × 512 FP8, ≈ 10 tokens each) took 1.4–1.6× as long that way
/// (same sums, same order).
///
/// # Safety
/// As for [`rows`], with what `S` needs; `w` holds the `g.n × g.k` matrix; `g.scales` set.
#[inline(always)]
unsafe fn run_fp8<S: Source>(
    s: &S,
    w: *const u8,
    g: &Geometry,
    x: &VnniActs,
    rows: Range<usize>,
    out: OutRows,
) {
    let (k, kc) = (g.k, g.kc);
    let Some((sv, bn, sc)) = g.scales else {
        unreachable!("amx::run_fp8 without scales")
    };
    assert!(S::ELEM == 1 && kc.is_multiple_of(64) && S::VECS == 2);
    let kblocks = k.div_ceil(kc);
    let t = x.t;
    let groups = t.div_ceil(16);
    let tpad = 16 * groups;
    // The activations' pairs are in the order the widening leaves the weights' (each chunk's
    // two vectors as they come, no permute), whole chunks, zero-padded.
    debug_assert!(x.order != PairOrder::Natural && x.pairs == k.next_multiple_of(64) / 2);
    // Per 32-column step of the block: tile rows 0–15, then 16–31, each 16 × 32 values.
    let mut blk = vec![0u16; 2 * PANEL_ROWS * kc];
    let blk_ptr = blk.as_mut_ptr();
    // Block kb's half of the buffer.
    let half = |kb: usize| blk_ptr.wrapping_add((kb % 2) * PANEL_ROWS * kc);
    let mut acc = vec![0.0f32; PANEL_ROWS * tpad];
    let mut c = Tile([0.0; 256]);
    // SAFETY: loads a valid configuration (the CPU has AMX and the OS allowed it: `detect`).
    unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly, preserves_flags)) };
    let mut n0 = rows.start;
    while n0 < rows.end {
        let nr = PANEL_ROWS.min(rows.end - n0);
        let n1 = n0 + nr;
        let next = w.wrapping_add(n1 * k) as *const i8;
        let next_rows = PANEL_ROWS.min(rows.end - n1);
        acc.fill(0.0);
        // SAFETY: rows n0..n0 + nr exist; block 0 lies in the buffer's first half.
        unsafe { widen_block(s, w, k, n0, nr, 0, kc, next, next_rows, half(0)) };
        for kb in 0..kblocks {
            let k0 = kb * kc;
            let kw = kc.min(k - k0);
            // The next block is widened before this one's tiles run, into the other half of
            // the buffer: the tile loads then read stores that have left the store buffer
            // (a tile load cannot take its data from pending vector stores).
            if kb + 1 < kblocks {
                // SAFETY: as above, for block kb + 1.
                unsafe {
                    widen_block(
                        s,
                        w,
                        k,
                        n0,
                        nr,
                        (kb + 1) * kc,
                        kc,
                        next,
                        next_rows,
                        half(kb + 1),
                    )
                };
            }
            let blk_kb = half(kb) as *const u16;
            for tg in (0..groups).step_by(2) {
                let two = tg + 1 < groups;
                let sums = acc.as_mut_ptr().wrapping_add(16 * tg);
                // SAFETY: the weight tiles are inside the block buffer (two steps of 2 KiB
                // per chunk of the block); the activation tiles read pairs k0/2 ..
                // k0/2 + 16·steps of groups tg (and tg + 1 if `two`), inside `x` (whole
                // chunks); the sums are the panel's rows 0..32 × tokens 16·tg .. 16·tg + 32
                // of `acc` (16 if not `two`).
                unsafe {
                    zero_sums();
                    let a = blk_kb as *const u8;
                    let b0 = x.group(tg).wrapping_add(k0 / 2 * 32) as *const u8;
                    let b1 = x.group(tg + 1).wrapping_add(k0 / 2 * 32) as *const u8;
                    for st in 0..2 * kw.div_ceil(64) {
                        let a0 = a.wrapping_add(2 * tile_at(st, 0));
                        let (b0, b1) = (b0.wrapping_add(1024 * st), b1.wrapping_add(1024 * st));
                        step(a0, a0.wrapping_add(1024), 64, b0, b1, two);
                    }
                    for (tile, rg, tj) in [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)] {
                        if tj == 1 && !two {
                            continue;
                        }
                        store_tile(tile, &mut c);
                        for m in 0..16 {
                            let r = 16 * rg + m;
                            if r >= nr {
                                break;
                            }
                            let scale = _mm512_set1_ps(sv[(n0 + r) / bn * sc + kb]);
                            let p = sums.add(r * tpad + 16 * tj);
                            let v = _mm512_loadu_ps(c.0.as_ptr().add(16 * m));
                            _mm512_storeu_ps(p, _mm512_fmadd_ps(v, scale, _mm512_loadu_ps(p)));
                        }
                    }
                }
            }
        }
        // SAFETY: `acc` holds 32 rows of `tpad` tokens; `out` covers these rows (the caller's
        // guarantee).
        unsafe { emit(&acc, tpad, nr, t, out.skip(n0 - rows.start, 0)) };
        n0 = n1;
    }
    // SAFETY: ends the tile use begun above (no tile is live after this).
    unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
}

/// Where row `r` of 32-column step `st` starts in a widened block: per step, tile rows 0–15,
/// then 16–31, each 16 rows of 32 values.
fn tile_at(st: usize, r: usize) -> usize {
    ((2 * st + r / 16) * 16 + r % 16) * 32
}

/// Columns `k0..k0 + kc` (within `k`) of rows `n0..n0 + nr` of the FP8 matrix at `w`, widened
/// into `dst` in [`tile_at`] order (rows past `nr` zero), vector `h` of each chunk as step
/// `2·chunk + h`, its columns in the order `S` leaves them ([`widened_order`]). One line of the next panel (`next`, `next_rows` rows) is
/// prefetched per chunk, at the same place in its rows.
///
/// # Safety
/// AVX-512 F/BW/BF16 and what `S` needs; the rows exist; `dst` has room for 32 rows of `kc`
/// (a multiple of 64).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn widen_block<S: Source>(
    s: &S,
    w: *const u8,
    k: usize,
    n0: usize,
    nr: usize,
    k0: usize,
    kc: usize,
    next: *const i8,
    next_rows: usize,
    dst: *mut u16,
) {
    let kw = kc.min(k - k0);
    for r in 0..PANEL_ROWS {
        let row = w.wrapping_add((n0 + r) * k);
        for c0 in (k0..k0 + kw).step_by(64) {
            if r < next_rows {
                // A hint: the address is inside the next panel's rows.
                _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(r * k + c0));
            }
            // SAFETY: a whole chunk within row r, or its partial last one through a zeroed
            // copy (rows past `nr` are zeros); the two stores land in `dst` (step
            // (c0 - k0) / 32 + h < kc / 32, row r < 32).
            unsafe {
                let v = if r >= nr {
                    [std::mem::zeroed(), std::mem::zeroed()]
                } else if c0 + 64 <= k {
                    s.chunk(row.wrapping_add(c0))
                } else {
                    tail(s, row.wrapping_add(c0), k - c0)
                };
                for (h, v) in v.iter().enumerate() {
                    let at = tile_at((c0 - k0) / 32 + h, r);
                    _mm512_storeu_si512(
                        dst.add(at) as *mut _,
                        std::mem::transmute::<__m512bh, __m512i>(*v),
                    );
                }
            }
        }
    }
}

/// `x`'s activations (in the matrix's order) with each chunk's 32 column pairs in the order a
/// widened chunk of `S` holds them: per token group, per 64-column chunk, row `16·h + q` is
/// pair `S::pair(h, q)` of the chunk, zero past the last column. Reordering these 64-byte rows
/// once per product saves a permute of every widened weight vector.
fn widened_order<S: Source>(x: &VnniActs, k: usize, order: PairOrder) -> VnniActs {
    let chunks = k.div_ceil(64);
    let groups = x.t.div_ceil(16);
    let mut out = vec![0u16; groups * chunks * 32 * 32];
    for g in 0..groups {
        let src = &x.data[g * x.pairs * 32..(g + 1) * x.pairs * 32];
        let dst = &mut out[g * chunks * 1024..(g + 1) * chunks * 1024];
        for ch in 0..chunks {
            for h in 0..2 {
                for q in 0..16 {
                    let p = 32 * ch + S::pair(h, q);
                    if p < x.pairs {
                        let at = (32 * ch + 16 * h + q) * 32;
                        dst[at..at + 32].copy_from_slice(&src[p * 32..(p + 1) * 32]);
                    }
                }
            }
        }
    }
    VnniActs {
        data: out,
        t: x.t,
        pairs: chunks * 32,
        order,
    }
}

/// A panel's sums, `[rows, tokens]` in `acc` (32 rows of `tpad`), written as the result's
/// `[tokens, rows]` for its `nr` rows and `t` tokens, 16 × 16 at a time.
///
/// # Safety
/// AVX-512 F; `out` writable for `nr` rows of `t` tokens.
#[inline(always)]
unsafe fn emit(acc: &[f32], tpad: usize, nr: usize, t: usize, out: OutRows) {
    assert!(acc.len() >= PANEL_ROWS * tpad && nr <= PANEL_ROWS && t <= tpad);
    for rg in 0..nr.div_ceil(16) {
        let live = nr - 16 * rg;
        let mask: __mmask16 = if live >= 16 { !0 } else { (1u16 << live) - 1 };
        for tg in 0..tpad / 16 {
            // A loop, not `array::from_fn`: a closure is a function without the caller's
            // target features, and the loads in it stay calls (16 % of the FP8 tile kernel's
            // time when they were).
            let mut block = [_mm512_setzero_si512(); 16];
            for (m, b) in block.iter_mut().enumerate() {
                // SAFETY: row 16·rg + m < 32 and tokens 16·tg.. are inside `acc` (asserted).
                *b = unsafe {
                    _mm512_loadu_si512(acc.as_ptr().add((16 * rg + m) * tpad + 16 * tg) as *const _)
                };
            }
            // SAFETY: AVX-512 F.
            let by_token = unsafe { transpose16(block) };
            for (i, v) in by_token.iter().enumerate() {
                let j = 16 * tg + i;
                if j >= t {
                    break;
                }
                // SAFETY: rows 16·rg .. 16·rg + live of token j are in `out` (the caller's
                // guarantee); the mask writes no others.
                unsafe { _mm512_mask_storeu_ps(out.at(16 * rg, j), mask, _mm512_castsi512_ps(*v)) };
            }
        }
    }
}

/// A 16 × 16 tile of sums, aligned for the tile store.
#[repr(C, align(64))]
struct Tile([f32; 256]);

/// Per output vector of 16 column pairs, where each pair lies in the chunk `S` gives: index
/// `16·h + q` for word `q` of vector `h`, as `vpermt2d` takes it.
fn natural_order<S: Source>() -> [[i32; 16]; 2] {
    let mut idx = [[0i32; 16]; 2];
    for h in 0..S::VECS {
        for q in 0..16 {
            let p = S::pair(h, q);
            idx[p / 16][p % 16] = (16 * h + q) as i32;
        }
    }
    idx
}

/// Rows `n0..n0 + nr` widened to bfloat16 in column order into `wb` (32 rows of `ws`); rows
/// past `nr` zero.
///
/// # Safety
/// AVX-512 F/BW/BF16 and what `S` needs; the rows exist in the `k`-column matrix at `w`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn widen<S: Source>(
    s: &S,
    natural: &[[i32; 16]; 2],
    w: *const u8,
    k: usize,
    n0: usize,
    nr: usize,
    ws: usize,
    wb: &mut [u16],
) {
    assert!(wb.len() >= PANEL_ROWS * ws && ws >= k.next_multiple_of(64));
    let ch = 32 * S::VECS;
    // SAFETY: 16 integers each.
    let idx = unsafe {
        [
            _mm512_loadu_si512(natural[0].as_ptr() as *const _),
            _mm512_loadu_si512(natural[1].as_ptr() as *const _),
        ]
    };
    for r in 0..PANEL_ROWS {
        let dst = &mut wb[r * ws..(r + 1) * ws];
        if r >= nr {
            dst.fill(0);
            continue;
        }
        let row = w.wrapping_add((n0 + r) * k * S::ELEM);
        for c in (0..k).step_by(ch) {
            // SAFETY: a whole chunk within the row, or the partial last one through a zeroed
            // copy; the stores stay below c + ch ≤ ws.
            unsafe {
                let p = row.wrapping_add(c * S::ELEM);
                let v = if c + ch <= k {
                    s.chunk(p)
                } else {
                    tail(s, p, k - c)
                };
                let v0 = std::mem::transmute::<__m512bh, __m512i>(v[0]);
                let v1 = std::mem::transmute::<__m512bh, __m512i>(v[1]);
                for (o, ix) in idx.iter().enumerate().take(S::VECS) {
                    let nat = _mm512_permutex2var_epi32(v0, *ix, v1);
                    _mm512_storeu_si512(dst.as_mut_ptr().add(c + 32 * o) as *mut _, nat);
                }
            }
        }
    }
}

/// One 32-column step: weights rows 0–15 (`a0`) and 16–31 (`a1`), `lda` bytes between rows,
/// times the activation tiles of one or two token groups, into sums 0–3 (rows × groups).
///
/// # Safety
/// Tiles configured; 16 rows of 64 bytes readable at `a0`, `a1` (`lda` apart) and `b0`, and
/// `b1` if `two` (64 bytes apart).
#[inline(always)]
unsafe fn step(a0: *const u8, a1: *const u8, lda: usize, b0: *const u8, b1: *const u8, two: bool) {
    // SAFETY: the caller's guarantee; the instructions read only those bytes and touch no
    // register the compiler uses.
    unsafe {
        if two {
            asm!(
                "tileloadd tmm4, [{a0} + {lda}*1]",
                "tileloadd tmm6, [{b0} + {ldb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {ldb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {lda}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
                lda = in(reg) lda, ldb = in(reg) 64usize,
                options(nostack, readonly, preserves_flags),
            );
        } else {
            asm!(
                "tileloadd tmm4, [{a0} + {lda}*1]",
                "tileloadd tmm6, [{b0} + {ldb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a1} + {lda}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0,
                lda = in(reg) lda, ldb = in(reg) 64usize,
                options(nostack, readonly, preserves_flags),
            );
        }
    }
}

/// Sums 0–3 set to zero.
///
/// # Safety
/// Tiles configured.
#[inline(always)]
pub(super) unsafe fn zero_sums() {
    // SAFETY: touches tile registers only.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem, preserves_flags)
        )
    };
}

/// Sums 0–3 loaded from `[32 rows, tpad]` f32 at `p` (rows 0–15 / 16–31 × tokens 0–15 /
/// 16–31; the second group only if `two`).
///
/// # Safety
/// Tiles configured; those sums are inside one allocation.
#[inline(always)]
unsafe fn load_sums(p: *mut f32, tpad: usize, two: bool) {
    let ld = 4 * tpad;
    let lower = p.wrapping_add(16 * tpad);
    // SAFETY: the caller's guarantee.
    unsafe {
        asm!(
            "tileloadd tmm0, [{p} + {ld}*1]",
            "tileloadd tmm2, [{q} + {ld}*1]",
            p = in(reg) p, q = in(reg) lower, ld = in(reg) ld,
            options(nostack, readonly, preserves_flags),
        );
        if two {
            asm!(
                "tileloadd tmm1, [{p} + {ld}*1]",
                "tileloadd tmm3, [{q} + {ld}*1]",
                p = in(reg) p.wrapping_add(16), q = in(reg) lower.wrapping_add(16), ld = in(reg) ld,
                options(nostack, readonly, preserves_flags),
            );
        }
    }
}

/// The inverse of [`load_sums`].
///
/// # Safety
/// As for [`load_sums`], writable.
#[inline(always)]
unsafe fn store_sums(p: *mut f32, tpad: usize, two: bool) {
    let ld = 4 * tpad;
    let lower = p.wrapping_add(16 * tpad);
    // SAFETY: the caller's guarantee.
    unsafe {
        asm!(
            "tilestored [{p} + {ld}*1], tmm0",
            "tilestored [{q} + {ld}*1], tmm2",
            p = in(reg) p, q = in(reg) lower, ld = in(reg) ld,
            options(nostack, preserves_flags),
        );
        if two {
            asm!(
                "tilestored [{p} + {ld}*1], tmm1",
                "tilestored [{q} + {ld}*1], tmm3",
                p = in(reg) p.wrapping_add(16), q = in(reg) lower.wrapping_add(16), ld = in(reg) ld,
                options(nostack, preserves_flags),
            );
        }
    }
}

/// Sum tile `i` (0–3) stored into `c`.
///
/// # Safety
/// Tiles configured.
#[inline(always)]
unsafe fn store_tile(i: usize, c: &mut Tile) {
    let p = c.0.as_mut_ptr();
    // SAFETY: 16 rows of 64 bytes, exactly `c`.
    unsafe {
        match i {
            0 => {
                asm!("tilestored [{p} + {ld}*1], tmm0", p = in(reg) p, ld = in(reg) 64usize, options(nostack, preserves_flags))
            }
            1 => {
                asm!("tilestored [{p} + {ld}*1], tmm1", p = in(reg) p, ld = in(reg) 64usize, options(nostack, preserves_flags))
            }
            2 => {
                asm!("tilestored [{p} + {ld}*1], tmm2", p = in(reg) p, ld = in(reg) 64usize, options(nostack, preserves_flags))
            }
            _ => {
                asm!("tilestored [{p} + {ld}*1], tmm3", p = in(reg) p, ld = in(reg) 64usize, options(nostack, preserves_flags))
            }
        }
    }
}
