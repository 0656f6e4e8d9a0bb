//! The fast path's engine: AVX-512 BF16 dot products (`vdpbf16ps`), each instruction 32
//! multiply-adds into 16 f32 lanes, twice the f32 FMA rate. BF16 weights are served here;
//! FP8 weights reach the same loops through [`super::fp8dot`], which widens them.
//!
//! Numbers: activations are rounded to bfloat16 (nearest-even) once per product; BF16 weights
//! are used as stored. Products of two bfloat16 values are exact in f32 and accumulate in f32.
//!
//! One arithmetic for every batch size: for row `n` and token `j`, 32-column vectors are
//! dotted into one 16-lane accumulator in column order, the last chunk zero-padded, and the
//! lanes summed at the end. Decode (up to [`STREAM_TOKENS`] tokens) widens weights in
//! registers as they stream in; larger batches widen a panel of rows once into a
//! cache-resident buffer and reuse it for every token. Both give the same bits, so a
//! sequence's logits do not depend on what else is batched.
//!
//! Pointer arithmetic: the entry points check up front that rows, activations and outputs are
//! in bounds; the loops stay below those bounds, which is what each `SAFETY` comment refers to.

use std::arch::x86_64::*;
use std::ops::Range;

use crate::checkpoint::{Matrix, MatrixData, ZeroBits};
use crate::kernels::matmul::OutRows;

/// Rows per register tile.
const RB: usize = 4;
/// Tokens per register tile: `RB · TB` accumulators + `RB` weight vectors + 1 activation
/// vector fit the 32 registers.
const TB: usize = 6;
/// Up to this many tokens, weights are widened in registers as they stream in; more tokens
/// share one widening into a buffer.
pub(super) const STREAM_TOKENS: usize = 5;
/// Rows widened at once for batched products: 16 rows of 2048 columns are 64 KiB, which
/// stays in L2 while every token tile passes over them.
pub(super) const PANEL: usize = 16;

/// Stored weights as bfloat16 vectors, one chunk of `32 · VECS` columns at a time.
pub(super) trait Source {
    /// Bytes per stored weight.
    const ELEM: usize;
    /// Vectors (of 32 bfloat16 values) per chunk: 1 or 2.
    const VECS: usize;
    /// The chunk at `p` as `VECS` vectors (any others are unused), in the column order the
    /// activations were laid out in.
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16 (and whatever the implementation names); `32 · VECS · ELEM` bytes
    /// readable at `p`.
    unsafe fn chunk(&self, p: *const u8) -> [__m512bh; 2];
    /// [`Source::chunk`] for a chunk known to hold no byte with a zero exponent field (see
    /// `MatrixData::Fp8::zero_exponent`), for widenings that test for those.
    ///
    /// # Safety
    /// As for [`Source::chunk`].
    #[inline(always)]
    unsafe fn chunk_normal(&self, p: *const u8) -> [__m512bh; 2] {
        // SAFETY: forwarded.
        unsafe { self.chunk(p) }
    }
    /// [`Source::chunk`], and whether the chunk may hold a byte with a zero exponent field
    /// (always, for widenings that do not test for those).
    ///
    /// # Safety
    /// As for [`Source::chunk`].
    #[inline(always)]
    unsafe fn chunk_tested(&self, p: *const u8) -> ([__m512bh; 2], bool) {
        // SAFETY: forwarded.
        (unsafe { self.chunk(p) }, true)
    }
    /// The column pair (columns `2p`, `2p + 1` of the chunk) in 32-bit word `q` of vector
    /// `h` of a chunk.
    fn pair(h: usize, q: usize) -> usize {
        16 * h + q
    }
}

/// BF16 weights, used as stored.
pub(super) struct Raw;

impl Source for Raw {
    const ELEM: usize = 2;
    const VECS: usize = 1;
    #[inline(always)]
    unsafe fn chunk(&self, p: *const u8) -> [__m512bh; 2] {
        // SAFETY: 64 readable bytes at p (the caller's guarantee).
        let v: __m512bh = unsafe { std::mem::transmute(_mm512_loadu_si512(p as *const _)) };
        [v, v]
    }
}

/// Whether [`rows`] handles `w`.
pub fn supports(w: &Matrix) -> bool {
    matches!(w.data, MatrixData::Bf16(_))
}

/// Activations rounded to bfloat16, each token's row zero-padded to a multiple of 32 columns.
pub struct Bf16Acts {
    pub data: Vec<u16>,
    /// Padded row length.
    pub stride: usize,
}

impl Bf16Acts {
    /// Where token `j0` starts, after checking that tokens `j0..j0 + t` of `k` columns (padded
    /// to whole 32-column chunks) are all there.
    pub(super) fn tokens(&self, j0: usize, t: usize, k: usize) -> *const u16 {
        assert!(self.stride >= acts_stride(k) && self.data.len() >= (j0 + t) * self.stride);
        self.data.as_ptr().wrapping_add(j0 * self.stride)
    }
}

/// The padded row length of [`Bf16Acts`] for `k` columns.
pub fn acts_stride(k: usize) -> usize {
    k.next_multiple_of(32)
}

/// `x` (`[t, k]`) rounded into `data` (`t` rows of `stride` ≥ `k`, already zero past `k`).
///
/// # Safety
/// The CPU must support AVX-512 F and BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn fill_bf16(x: &[f32], t: usize, k: usize, stride: usize, data: &mut [u16]) {
    assert!(x.len() >= t * k && stride >= acts_stride(k) && data.len() >= t * stride);
    for j in 0..t {
        let mut c = 0;
        while c < k {
            let mask: __mmask16 = if c + 16 <= k {
                !0
            } else {
                (1u16 << (k - c)) - 1
            };
            // SAFETY: the mask keeps the load within token j's k columns; the store covers
            // columns below c + 16 ≤ stride of the padded row.
            unsafe {
                let v = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(j * k + c));
                let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_storeu_si256(data.as_mut_ptr().add(j * stride + c) as *mut __m256i, b);
            }
            c += 16;
        }
    }
}

/// `out[r - rows.start, j] = Σ_k x[j0 + j, k] · W[r, k]` for `r` in `rows`, `j < t`, BF16 `w`;
/// `then` as for [`run`].
///
/// # Safety
/// The CPU must support AVX-512 F, BW and BF16 (checked by the caller's dispatch),
/// `supports(w)` must hold, and `out` must be writable for `rows.len()` rows of `t` tokens.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn rows(
    x: &Bf16Acts,
    j0: usize,
    t: usize,
    w: &Matrix,
    rows: Range<usize>,
    out: OutRows,
    then: *const u8,
) {
    let MatrixData::Bf16(d) = &w.data else {
        unreachable!("bf16dot::rows called for a {} matrix", w.dtype_name());
    };
    let k = w.cols;
    let d = d.as_slice();
    assert!(rows.end <= w.rows && d.len() >= w.rows * k);
    let xp = x.tokens(j0, t, k);
    // SAFETY: same target features; rows and activations checked above, outputs by the
    // caller.
    unsafe {
        run(
            &Raw,
            d.as_ptr() as *const u8,
            k,
            xp,
            x.stride,
            t,
            rows,
            out,
            then,
            None,
        )
    }
}

/// How far ahead of its reads, in bytes, a streaming tile prefetches, at least. A tile of
/// eight FP8 rows is only 4 KiB for the experts' down projections (512 columns), about
/// 0.3 µs of reading at decode's rate per thread: less than this machine's memory takes
/// under load. The hardware prefetchers add little here: without the software prefetches the
/// one-token products ran at half the speed (Emerald Rapids, 2 threads). With 16 KiB, the
/// down projections of a decode step ran 1.07–1.12× faster from memory with FP8 rows and one
/// token, 1.15× with two tokens, 1.065× with BF16 rows (alternating in one process, medians
/// of 11–15 pairs, in several periods). Longer rows, whose tile already spans 16 KiB or
/// more, keep a lead of one tile: leads of 24 and 32 KiB changed them by less than the noise.
pub(super) const STREAM_LEAD: usize = 16 << 10;

/// Rows `rows` of the `k`-column matrix at `w` times `t` tokens of activations at `x` (token
/// `j` at `x + j·xs`, zero-padded to a whole chunk), into `out[r - rows.start, j]`. `then` is
/// the weight byte the caller reads next: the prefetches that run past `rows` continue from
/// there ([`STREAM_LEAD`]), so that a task running from one matrix into the next keeps its
/// loads in flight.
/// Inlined into each entry point so the source's instructions get that entry's features.
///
/// # Safety
/// AVX-512 F/BW/BF16 and what `S` needs; the rows exist; `xs ≥ k` rounded up to a chunk and
/// `x` holds `t` such rows; `out` is writable for `rows.len()` rows of `t` tokens.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn run<S: Source>(
    s: &S,
    w: *const u8,
    k: usize,
    x: *const u16,
    xs: usize,
    t: usize,
    rows: Range<usize>,
    out: OutRows,
    then: *const u8,
    zero_exponent: Option<&ZeroBits>,
) {
    let ks = k.next_multiple_of(32 * S::VECS);
    if t <= STREAM_TOKENS {
        let mut r = rows.start;
        // Where the tile of rows r..r+n prefetches from: STREAM_LEAD bytes past its start in
        // the order of reading, or a whole tile if that is more; past the rows' end, the rest
        // of the way from `then`.
        let ahead = |r: usize, n: usize| {
            let at = r * k * S::ELEM + (n * k * S::ELEM).max(STREAM_LEAD);
            match at.checked_sub(rows.end * k * S::ELEM) {
                Some(past) => then.wrapping_add(past),
                None => w.wrapping_add(at),
            }
        };
        while r < rows.end {
            if t == 1 && S::ELEM == 1 && rows.end - r >= ONE_TOKEN_ROWS {
                let o = out.at(r - rows.start, 0);
                let p = w.wrapping_add(r * k * S::ELEM);
                let ahead = ahead(r, ONE_TOKEN_ROWS);
                // This tile's row group of `zero_exponent`, where it is one.
                let flags = zero_exponent
                    .filter(|_| r.is_multiple_of(ONE_TOKEN_ROWS))
                    .map(|z| (z, r / ONE_TOKEN_ROWS));
                // SAFETY: rows r..r+8 exist, x has one padded row, o has 8 rows.
                unsafe { one_token_tile(s, p, k, x, o, out.ts, ahead, flags) };
                r += ONE_TOKEN_ROWS;
                continue;
            }
            // Five tokens take tiles of three rows: 15 accumulators, 10 held activation
            // vectors and the widened weights fit the 32 registers.
            let nr = (if t == 5 { 3 } else { RB }).min(rows.end - r);
            let o = out.at(r - rows.start, 0);
            let p = w.wrapping_add(r * k * S::ELEM);
            let ahead = ahead(r, nr);
            macro_rules! go {
                ($n:literal, $t:literal) => {
                    // SAFETY: rows r..r+nr exist, x has t padded rows, o has nr rows of t.
                    unsafe { stream_tile::<S, $n, $t>(s, p, k, x, xs, o, out.ts, ahead) }
                };
            }
            macro_rules! rows_of {
                ($t:literal) => {
                    match nr {
                        4 => go!(4, $t),
                        3 => go!(3, $t),
                        2 => go!(2, $t),
                        _ => go!(1, $t),
                    }
                };
            }
            match t {
                5 => rows_of!(5),
                4 => rows_of!(4),
                3 => rows_of!(3),
                2 => rows_of!(2),
                _ => rows_of!(1),
            }
            r += nr;
        }
        return;
    }
    let mut buf = vec![0u16; PANEL * ks];
    let mut r = rows.start;
    while r < rows.end {
        let np = PANEL.min(rows.end - r);
        for i in 0..np {
            // SAFETY: row r + i exists; the buffer row has ks entries.
            unsafe {
                widen_row(
                    s,
                    w.wrapping_add((r + i) * k * S::ELEM),
                    k,
                    buf[i * ks..].as_mut_ptr(),
                )
            };
        }
        // The next panel's weights, fetched into L2 a share per token tile while this panel
        // is multiplied: read only when widened, they would stall the widening on memory
        // (where a profile of prefill put ~7% of its time). Hints only: reading past the end
        // is harmless.
        let next = w.wrapping_add((r + np) * k * S::ELEM) as *const i8;
        let lines = (PANEL.min(rows.end.saturating_sub(r + np)) * k * S::ELEM).div_ceil(64);
        let per_tile = lines.div_ceil(t.div_ceil(TB));
        let mut fetched = 0;
        let mut j = 0;
        while j < t {
            let nt = TB.min(t - j);
            for _ in 0..per_tile.min(lines - fetched) {
                _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(64 * fetched));
                fetched += 1;
            }
            let mut i = 0;
            while i < np {
                let nr = RB.min(np - i);
                let wp: [*const u16; RB] =
                    std::array::from_fn(|a| buf[(i + a.min(nr - 1)) * ks..].as_ptr());
                let o = out.at(r - rows.start + i, j);
                // SAFETY: the buffer holds np padded rows, x holds t padded rows (j + nt ≤ t),
                // and o reaches row i + nr - 1, token j + nt - 1.
                unsafe { buffered_tile(wp, ks, x.add(j * xs), xs, o, out.ts, nr, nt) };
                i += nr;
            }
            j += nt;
        }
        r += np;
    }
}

/// One row of `k` weights at `p`, widened into `dst` (`k` rounded up to a chunk, zero-padded).
///
/// # Safety
/// As for [`run`]; `k · ELEM` bytes at `p`, room for the padded row at `dst`.
#[inline(always)]
unsafe fn widen_row<S: Source>(s: &S, p: *const u8, k: usize, dst: *mut u16) {
    let ch = 32 * S::VECS;
    let mut c = 0;
    while c < k {
        // SAFETY: the whole chunk is in the row, or the partial last one is read through a
        // zeroed copy; the destination row has room up to the padded length.
        unsafe {
            let v = if c + ch <= k {
                s.chunk(p.add(c * S::ELEM))
            } else {
                tail(s, p.add(c * S::ELEM), k - c)
            };
            for (h, v) in v.iter().enumerate().take(S::VECS) {
                _mm512_storeu_si512(
                    dst.add(c + 32 * h) as *mut __m512i,
                    std::mem::transmute::<__m512bh, __m512i>(*v),
                );
            }
        }
        c += ch;
    }
}

/// The partial last chunk of a row (`n` < a chunk's columns at `p`): copied into a zeroed
/// buffer first (all-zero bits are 0.0 in every dtype), then as [`Source::chunk`].
///
/// The copy is two masked vector loads, not `copy_nonoverlapping`: that became a call to
/// `memcpy`, and a call clobbers every vector register, so the streaming loops that contain
/// this (cold) path kept their accumulators on the stack on the hot path too.
///
/// # Safety
/// As for [`Source::chunk`], with `n · ELEM` readable bytes at `p`.
#[inline(always)]
pub(super) unsafe fn tail<S: Source>(s: &S, p: *const u8, n: usize) -> [__m512bh; 2] {
    let bytes = n * S::ELEM;
    let mask = |from: usize| -> __mmask64 {
        match bytes.saturating_sub(from) {
            0 => 0,
            b if b >= 64 => !0,
            b => (1u64 << b) - 1,
        }
    };
    let mut tmp = [0u8; 128];
    // SAFETY: n < 32 · VECS columns of at most 2 bytes: below 128 bytes, all of them
    // readable at p (the caller's guarantee); the masks keep the loads to those bytes, and
    // masked-off bytes are neither read nor faulted on.
    unsafe {
        for h in 0..2 {
            let v = _mm512_maskz_loadu_epi8(mask(64 * h), p.wrapping_add(64 * h) as *const i8);
            _mm512_storeu_si512(tmp.as_mut_ptr().add(64 * h) as *mut _, v);
        }
        s.chunk(tmp.as_ptr())
    }
}

/// `N` rows × `T` tokens, the rows (at `w`, each `k` weights) widened on the fly while as
/// many bytes as they hold are prefetched from `ahead` (in address order); token `j`'s
/// activations start at `x + j·xs`, results go to `out + i + j·ts`.
///
/// # Safety
/// As for [`run`], for rows `0..N` at `w`; `out` is writable where results go.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
#[allow(clippy::needless_range_loop)] // indices name the register tile's rows and tokens
unsafe fn stream_tile<S: Source, const N: usize, const T: usize>(
    s: &S,
    w: *const u8,
    k: usize,
    x: *const u16,
    xs: usize,
    out: *mut f32,
    ts: usize,
    ahead: *const u8,
) {
    let ch = 32 * S::VECS;
    let chunk_bytes = ch * S::ELEM;
    let row_bytes = k * S::ELEM;
    let mut acc = [[_mm512_setzero_ps(); T]; N];
    let xv = |j: usize, c: usize| -> __m512bh {
        // SAFETY: c < k ≤ the padded row of each of the T tokens.
        unsafe { std::mem::transmute(_mm512_loadu_si512(x.add(j * xs + c) as *const _)) }
    };
    // The activations of this chunk stay in registers while every row passes (up to 10
    // vectors with the accumulators: measured 1.5× faster at four tokens than reloading
    // them from L1 for each row). `hold` is always true now; written without it, the same
    // loop measured 40% slower at four tokens (a different register allocation), so the form
    // stays.
    let hold = T <= 5;
    let mut c = 0;
    while c < k {
        let held: [[__m512bh; 2]; T] = std::array::from_fn(|j| {
            if hold {
                [xv(j, c), xv(j, c + 32 * (S::VECS - 1))]
            } else {
                // Unused.
                // SAFETY: all-zero bits are a valid vector of 32 bf16 values.
                unsafe { std::mem::zeroed() }
            }
        });
        for i in 0..N {
            let p = w.wrapping_add(i * row_bytes + c * S::ELEM);
            let pf = ahead.wrapping_add(N * c * S::ELEM + i * chunk_bytes);
            // SAFETY: row i has its chunk (or its last, partial one) at p.
            let (v, _) = unsafe { streamed_chunk::<S, false>(s, p, k - c, pf) };
            for h in 0..S::VECS {
                for j in 0..T {
                    let a = if hold { held[j][h] } else { xv(j, c + 32 * h) };
                    acc[i][j] = _mm512_dpbf16_ps(acc[i][j], v[h], a);
                }
            }
        }
        c += ch;
    }
    // SAFETY: the tile's results are writable (the caller's guarantee).
    unsafe { store_tile::<N, T>(acc, out, ts) };
}

/// One chunk of a streamed row at `p` (`left` weights of the row remain), with this row's share
/// of the bytes ahead prefetched from `ahead` when the chunk is whole. They are fetched in
/// address order, a chunk's bytes per row and step, not row by row: one sequential stream is
/// what the memory system serves best (measured: 10–30% more GB/s than prefetching each row's
/// next chunk). A hint only; past the end is harmless.
///
/// Into L2 (`T1`), not L1: a lead of 16 KiB or more, which with the tile being read fills most
/// of a 48 KiB L1 and lets lines be evicted before their use; on an Intel (Emerald Rapids)
/// core, decode of the 32-expert FP8 checkpoint was 6 % faster (median of 20 alternating
/// rounds, one process) and the products alone went from 0.84 to 0.88 of a plain read. The
/// Zen 5 cores this was first tuned on were not measured with it.
///
/// `NORMAL`: widened with [`Source::chunk_normal`]. Also returns whether the chunk may hold
/// a byte with a zero exponent field ([`Source::chunk_tested`]; never with `NORMAL`, always
/// for a partial chunk).
///
/// # Safety
/// As for [`Source::chunk`] when `left` ≥ a chunk's columns, else `left` readable weights;
/// with `NORMAL`, as for [`Source::chunk_normal`].
#[inline(always)]
unsafe fn streamed_chunk<S: Source, const NORMAL: bool>(
    s: &S,
    p: *const u8,
    left: usize,
    ahead: *const u8,
) -> ([__m512bh; 2], bool) {
    let chunk_bytes = 32 * S::VECS * S::ELEM;
    if left >= 32 * S::VECS {
        _mm_prefetch::<_MM_HINT_T1>(ahead as *const i8);
        if chunk_bytes > 64 {
            _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(64) as *const i8);
        }
        // SAFETY: a whole chunk at p (the caller's guarantee, and for `NORMAL` its bytes'
        // exponents).
        unsafe {
            if NORMAL {
                (s.chunk_normal(p), false)
            } else {
                s.chunk_tested(p)
            }
        }
    } else {
        // SAFETY: `left` weights at p (the caller's guarantee).
        (unsafe { tail(s, p, left) }, true)
    }
}

/// Rows per register tile of [`one_token_tile`].
const ONE_TOKEN_ROWS: usize = 8;

/// Eight rows × one token, the decode shape of FP8 weights: [`stream_tile`]'s arithmetic
/// (each row's chunks dotted into one accumulator in column order, the same lane sums), so
/// results keep their bits, with twice the rows. Each row's accumulator is a chain of
/// dependent `vdpbf16ps` (latency ≈ 5 cycles, two per 64-weight chunk); with four rows the
/// core waits on those chains. Measured on one thread from L2: 74 → 86 GB/s; from memory,
/// both threads, when memory is fast: 57–59 → 60–62 GB/s. BF16 rows (one `vdpbf16ps` per
/// chunk, twice the bytes) were slower with eight rows (114 → 98 GB/s from L2) and keep four.
///
/// `zero_exponent`: the matrix's record of zero exponent fields and this tile's row group in
/// it, where the tile is one. Once the group is recorded, chunk steps without such a byte
/// widen their 8 rows with [`Source::chunk_normal`]; until then, every step tests, and the
/// tile records what it saw.
///
/// # Safety
/// As for [`run`], for rows `0..8` at `w` and one token at `x`; `out + i·1`, `i < 8`
/// writable (`ts` as for [`store_tile`]). `ahead` is only prefetched: as many bytes as the
/// tile holds, from there, in address order, while the tile is read. The record, if given,
/// is the matrix's own, and these rows are its group.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn one_token_tile<S: Source>(
    s: &S,
    w: *const u8,
    k: usize,
    x: *const u16,
    out: *mut f32,
    ts: usize,
    ahead: *const u8,
    zero_exponent: Option<(&ZeroBits, usize)>,
) {
    let ch = 32 * S::VECS;
    let row_bytes = k * S::ELEM;
    let chunk_bytes = ch * S::ELEM;
    let (w0, w4) = (w, w.wrapping_add(4 * row_bytes));
    let mut acc = [_mm512_setzero_ps(); ONE_TOKEN_ROWS];
    let xv = |c: usize| -> __m512bh {
        // SAFETY: c < k ≤ the padded activation row.
        unsafe { std::mem::transmute(_mm512_loadu_si512(x.add(c) as *const _)) }
    };
    let known = zero_exponent.filter(|&(z, g)| z.known(g));
    // While not known: the chunk steps (of the current 64) that saw a zero exponent field.
    let mut seen = 0u64;
    let mut c = 0;
    while c < k {
        let a = [xv(c), xv(c + 32 * (S::VECS - 1))];
        let off = c * S::ELEM;
        let ci = c / ch;
        let normal = known.is_some_and(|(z, g)| c + ch <= k && !z.zero(g, ci));
        macro_rules! step {
            ($normal:literal) => {{
                let mut any = false;
                for (i, acc) in acc.iter_mut().enumerate() {
                    let p = if i < 4 { w0 } else { w4 }.wrapping_add((i % 4) * row_bytes + off);
                    let pf = ahead.wrapping_add(ONE_TOKEN_ROWS * off + i * chunk_bytes);
                    // SAFETY: row i has its chunk (or its last, partial one) at p.
                    let (v, zero) = unsafe { streamed_chunk::<S, $normal>(s, p, k - c, pf) };
                    any |= zero;
                    for h in 0..S::VECS {
                        *acc = _mm512_dpbf16_ps(*acc, v[h], a[h]);
                    }
                }
                any
            }};
        }
        if normal {
            step!(true);
        } else if step!(false) {
            seen |= 1 << (ci % 64);
        }
        c += ch;
        if let (None, Some((z, g))) = (known, zero_exponent) {
            if ci % 64 == 63 || c >= k {
                z.record(g, ci - ci % 64, seen);
                seen = 0;
            }
        }
    }
    if let (None, Some((z, g))) = (known, zero_exponent) {
        z.mark_known(g);
    }
    let [a0, a1, a2, a3, a4, a5, a6, a7] = acc;
    // SAFETY: rows 0..8 of the one token are writable (the caller's guarantee).
    unsafe {
        store_tile::<4, 1>([[a0], [a1], [a2], [a3]], out, ts);
        store_tile::<4, 1>([[a4], [a5], [a6], [a7]], out.add(4), ts);
    }
}

/// Dispatches a tile of widened rows to the kernel instance for its shape.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn buffered_tile(
    w: [*const u16; RB],
    ks: usize,
    x: *const u16,
    xs: usize,
    o: *mut f32,
    ts: usize,
    nr: usize,
    nt: usize,
) {
    macro_rules! go {
        ($n:literal, $t:literal) => {
            // SAFETY: forwarded from the caller (rows `nr`, tokens `nt` in bounds).
            unsafe { tile::<$n, $t>(w, ks, x, xs, o, ts) }
        };
    }
    macro_rules! rows_of {
        ($n:literal) => {
            match nt {
                6 => go!($n, 6),
                5 => go!($n, 5),
                4 => go!($n, 4),
                3 => go!($n, 3),
                2 => go!($n, 2),
                _ => go!($n, 1),
            }
        };
    }
    match nr {
        4 => rows_of!(4),
        3 => rows_of!(3),
        2 => rows_of!(2),
        _ => rows_of!(1),
    }
}

/// `N` widened rows × `T` tokens over `ks` (padded) columns; the result goes to
/// `out + i + j·ts`.
///
/// # Safety
/// AVX-512 F/BW/BF16; `w[i]` has `ks` entries, token `j`'s activations start at `x + j·xs`
/// with `ks` entries, and `out` covers what is described above.
#[inline]
#[allow(clippy::needless_range_loop)] // indices name the register tile's rows and tokens
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn tile<const N: usize, const T: usize>(
    w: [*const u16; RB],
    ks: usize,
    x: *const u16,
    xs: usize,
    out: *mut f32,
    ts: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); T]; N];
    let mut c = 0;
    while c < ks {
        // SAFETY: c + 32 <= ks for every row and token.
        unsafe {
            let wv: [__m512bh; N] = std::array::from_fn(|i| {
                std::mem::transmute(_mm512_loadu_si512(w[i].add(c) as *const _))
            });
            for j in 0..T {
                let xv: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(x.add(j * xs + c) as *const _));
                for i in 0..N {
                    acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[i], xv);
                }
            }
        }
        c += 32;
    }
    // SAFETY: the tile's results are writable (the caller's guarantee).
    unsafe { store_tile::<N, T>(acc, out, ts) };
}

/// The lane sums of a tile's accumulators, row `i` token `j` to `out + i + j·ts`. Not inlined,
/// and given the accumulators by value: the tile loop then keeps them in registers (inlined,
/// the reduction's temporaries made the register allocator spill some inside the loop; by
/// reference, the stream loop stored every accumulator to the stack at every step).
///
/// # Safety
/// AVX-512 F; those outputs writable.
#[inline(never)]
#[allow(clippy::needless_range_loop)] // indices name the register tile's rows and tokens
#[target_feature(enable = "avx512f")]
unsafe fn store_tile<const N: usize, const T: usize>(
    acc: [[__m512; T]; N],
    out: *mut f32,
    ts: usize,
) {
    for j in 0..T {
        let mut col = [_mm512_setzero_ps(); 4];
        for i in 0..N {
            col[i] = acc[i][j];
        }
        // SAFETY: token j's N results are writable (the caller's guarantee).
        unsafe { store_sums::<N>(col, out.add(j * ts)) };
    }
}

/// The lane sums of the first `N ≤ 4` accumulators into `out[0..N]`, four at a time through one
/// transposing tree: far fewer shuffles than reducing each on its own, which matters where
/// rows are short (the experts' 512-column down projection). Each sum's order of additions
/// depends only on its own accumulator: halves of 256 bits, then of 128, then lanes 2 apart,
/// then neighbours, so a row's result is the same whatever its tile holds besides.
///
/// # Safety
/// AVX-512 F; `out[0..N]` writable.
#[inline(always)]
unsafe fn store_sums<const N: usize>(v: [__m512; 4], out: *mut f32) {
    // [x0+x2, x1+x3, y0+y2, y1+y3] in 128-bit lanes.
    let pair = |x: __m512, y: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(x, y),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y),
        )
    };
    let ab = pair(v[0], v[1]);
    let cd = pair(v[2], v[3]);
    // 128-bit lane i: the four partial sums of accumulator i.
    let s = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b10_00_10_00>(ab, cd),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(ab, cd),
    );
    let s = _mm512_add_ps(s, _mm512_permute_ps::<0b01_00_11_10>(s));
    let s = _mm512_add_ps(s, _mm512_permute_ps::<0b10_11_00_01>(s));
    // Every position of 128-bit lane i now holds sum i (additions commute exactly). No
    // constant vectors here: they would be hoisted out of the tile loops and crowd the
    // accumulators out of the registers.
    let lanes = [
        _mm512_castps512_ps128(s),
        _mm512_extractf32x4_ps::<1>(s),
        _mm512_extractf32x4_ps::<2>(s),
        _mm512_extractf32x4_ps::<3>(s),
    ];
    for (i, l) in lanes.iter().enumerate().take(N) {
        // SAFETY: N ≤ 4 writable floats at out.
        unsafe { _mm_store_ss(out.add(i), *l) };
    }
}

/// `iters` rounds of 24 independent `vdpbf16ps` on registers: the core's bfloat16
/// multiply-add peak, with nothing else in the loop (a compute probe for `bench --kernels`).
///
/// # Safety
/// AVX-512 F and BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn peak_probe(iters: usize) -> f32 {
    let bf16 = |v: i16| -> __m512bh {
        // SAFETY: 64 bytes reinterpreted as 32 bfloat16 values.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi16(v)) }
    };
    let a = bf16(0x3F80);
    let b = std::hint::black_box(bf16(0x3C00));
    let mut acc = [_mm512_setzero_ps(); 24];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_dpbf16_ps(*v, a, b);
        }
    }
    let s = acc
        .iter()
        .fold(_mm512_setzero_ps(), |s, &v| _mm512_add_ps(s, v));
    _mm512_reduce_add_ps(s)
}
