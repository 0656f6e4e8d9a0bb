//! Attention of several tokens' query heads over one chunk of the cache on AMX tiles
//! (`tdpbf16ps`): the prompt path at depth, where the bfloat16 dot products of
//! [`super::attention`] left the cores' arithmetic ≈ 80 % idle, and the decode path, which
//! must give the same bits (`kernels::attention`).
//!
//! Per KV head, the `G` query heads of `16 / G` tokens make the 16 rows of a tile (a group),
//! and two groups go together, so that every tile loaded is used by two products:
//! - scores `S[row, position] = Q · Kᵀ`: the queries, rounded to bfloat16 and stored by KV
//!   head so that any run of tokens is 16 rows a fixed stride apart, are the left operand; the
//!   keys, each 16 positions' column pairs interleaved, the right one;
//! - a row's softmax runs along its own scores (16 positions per vector), so its maximum,
//!   weights and sum never depend on other rows; its weights, rounded to bfloat16, are
//!   written as the row of the next left operand;
//! - weighted values `O[row, column] = P · V`: the values, each pair of positions interleaved
//!   16 bits at a time, are the right operand.
//!
//! Keys and values are laid out once per call for all its tokens; on the machine this was
//! written on (AMX in a KVM guest) a tile load cost about three products, so every tile is
//! loaded once per two products and no more.
//!
//! Numbers: as the `vdpbf16ps` kernel (queries and weights rounded to bfloat16, f32 sums) but
//! with one softmax over the whole chunk (no running maximum), which is what the portable
//! kernel's rounding model computes. A row's result depends only on its own query, positions
//! and the tile unit's fixed order of sums: in a group, positions past a shorter token's end
//! weigh exactly 0 and add nothing, so a token gets the same bits alone (decode) or beside
//! others (prompt chunks).

use std::arch::asm;
use std::arch::x86_64::*;

use super::amx::{zero_sums, CONFIG};
use super::bf16gemm::transpose16;
use crate::kernels::activation::exp;
use crate::kernels::attention::{Kv, Part};
use crate::kernels::scratch;

/// Whether the tile kernel takes this shape: 16 rows of a tile hold whole groups of query
/// heads, and the head dimension is whole 32-column steps.
pub fn supports(group: usize, hd: usize) -> bool {
    group > 0 && 16 % group == 0 && hd > 0 && hd.is_multiple_of(32)
}

/// The queries of `n` tokens (`[heads, hd]` each) rounded to bfloat16 and laid out by KV
/// head for [`chunk`]: row (g, t, hh) — head `g·G + hh` of token `t` — at
/// `((g · qn + t) · G + hh) · hd`, `qn = n + 16 / G`; the tokens past `n` are zero, so that
/// any group's 16 rows can be read.
///
/// # Safety
/// AVX-512 F/BW/BF16; `supports(G, hd)`; each query holds `nkv · G · hd` values.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn query_rows<const G: usize>(qs: &[&[f32]], nkv: usize, hd: usize) -> Vec<u16> {
    assert!(supports(G, hd) && qs.iter().all(|q| q.len() == nkv * G * hd));
    let qn = qs.len() + 16 / G;
    let mut out = vec![0u16; nkv * qn * G * hd];
    for g in 0..nkv {
        let at = |t: usize| (g * qn + t) * G * hd;
        for (t, q) in qs.iter().enumerate() {
            let src = &q[g * G * hd..(g + 1) * G * hd];
            let dst = &mut out[at(t)..at(t + 1)];
            for (d, s) in dst.chunks_exact_mut(32).zip(src.chunks_exact(32)) {
                // SAFETY: 32 values each; AVX-512 F/BW/BF16.
                unsafe {
                    let (lo, hi) = (
                        _mm512_loadu_ps(s.as_ptr()),
                        _mm512_loadu_ps(s.as_ptr().add(16)),
                    );
                    let x = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                    _mm512_storeu_si512(d.as_mut_ptr() as *mut _, x);
                }
            }
        }
    }
    out
}

/// The chunk's [`Part`] for each token `t` of `tokens` (queries in `qr`, from
/// [`query_rows`] for `qn − 16 / G` tokens), over positions `start..ends[t − tokens.start]` of
/// the bfloat16 rows `k` and `v` (shape `kv`), handed to `emit(t − tokens.start, part)` in
/// token order.
///
/// # Safety
/// `isa::amx()` is true (AMX tiles allowed, AVX-512 F/BW/BF16); `supports(G, kv.hd)`; `qr`
/// holds `kv.heads · qn · G · kv.hd` values, `tokens.end + 16 / G ≤ qn`; `k` and `v` hold
/// `kv.len` rows of `kv.heads · kv.hd`; `start < ends[i] ≤ kv.len` for every token.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn chunk<const G: usize>(
    qr: &[u16],
    qn: usize,
    tokens: std::ops::Range<usize>,
    k: &[u16],
    v: &[u16],
    kv: Kv,
    start: usize,
    ends: &[usize],
    emit: &mut dyn FnMut(usize, &Part),
) {
    let (nkv, hd) = (kv.heads, kv.hd);
    let (w, heads) = (nkv * hd, nkv * G);
    let per = 16 / G;
    assert!(supports(G, hd) && tokens.len() == ends.len());
    assert!(k.len() >= kv.len * w && v.len() >= kv.len * w);
    assert!(tokens.end + per <= qn && qr.len() >= nkv * qn * G * hd);
    assert!(ends.iter().all(|&e| start < e && e <= kv.len));
    let Some(n_all) = ends.iter().map(|&e| e - start).max() else {
        return;
    };
    // Two groups of rows per step (`B`); positions in steps of 32 (the values' tiles), so
    // 2 · steps tiles of 16 positions for the keys.
    const B: usize = 2;
    let steps = n_all.div_ceil(32);
    let npad = 32 * steps;
    let (dsteps, dblocks) = (hd / 32, hd / 16);
    let n = tokens.len();
    let (k_head, v_head) = (2 * steps * dsteps * 512, dblocks * steps * 512);

    // u16 scratch: keys and values laid out, per group its weights as rows.
    let vb_at = nkv * k_head;
    let pa_at = vb_at + nkv * v_head;
    let mut u = scratch::take_u16(pa_at + B * 16 * npad);
    // f32 scratch: per group its scores `[row, position]` and its outputs `[row, hd]`.
    let ot_at = B * 16 * npad;
    let mut f = scratch::take_f32(ot_at + B * 16 * hd);
    let (kb, rest) = u.split_at_mut(vb_at);
    let (vb, rest) = rest.split_at_mut(pa_at - vb_at);
    let pa = &mut rest[..B * 16 * npad];
    let (st, rest) = f.split_at_mut(ot_at);
    let ot = &mut rest[..B * 16 * hd];
    // One group of rows (decode): the keys are read where they are, as the left operand, and
    // the group's queries laid out as the right one instead; the scores come out transposed.
    // Each score is the same sum of the same products in the same order either way round,
    // so it has the same bits.
    let in_place = n <= per;
    let mut qt = vec![[0u16; 512]; if in_place { nkv * dsteps } else { 0 }];
    let mut tail = Vec::new();
    if in_place {
        let row = (tokens.start) * G;
        for g in 0..nkv {
            for s in 0..dsteps {
                // SAFETY: AVX-512 F; group 0's 16 rows (g, tokens.start .., hh) of `qr`
                // exist (asserted above: tokens.end + per ≤ qn).
                unsafe {
                    let mut words = [_mm512_setzero_si512(); 16];
                    for (r, x) in words.iter_mut().enumerate() {
                        let at = ((g * qn) * G + row + r) * hd + 32 * s;
                        *x = _mm512_loadu_si512(qr.as_ptr().add(at) as *const _);
                    }
                    let t = transpose16(words);
                    for (kk, x) in t.iter().enumerate() {
                        let to = qt[g * dsteps + s].as_mut_ptr().add(32 * kk);
                        _mm512_storeu_si512(to as *mut _, *x);
                    }
                }
            }
        }
        // Rows past the cache's end are read from a copy with zeros after them.
        let whole = (kv.len - start) / 16;
        if whole < n_all.div_ceil(16) {
            tail = vec![0u16; 16 * w];
            let from = (start + 16 * whole) * w;
            tail[..kv.len * w - from].copy_from_slice(&k[from..kv.len * w]);
        }
    }
    // SAFETY: the slices hold what each function writes (sizes above); rows
    // start .. start + n_all ≤ kv.len exist.
    unsafe {
        for g in 0..nkv {
            if !in_place {
                lay_out_keys(
                    k,
                    w,
                    g * hd,
                    hd,
                    start,
                    n_all,
                    steps,
                    &mut kb[g * k_head..(g + 1) * k_head],
                );
            }
            lay_out_values(
                v,
                w,
                g * hd,
                hd,
                start,
                n_all,
                steps,
                &mut vb[g * v_head..(g + 1) * v_head],
                !in_place,
            );
        }
    }
    let mut parts: Vec<Part> = (0..B * per).map(|_| Part::new(heads, hd)).collect();
    let scale = 1.0 / (hd as f32).sqrt();

    // SAFETY: a valid configuration; the CPU has AMX and the OS allowed it (the caller's
    // guarantee).
    unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly, preserves_flags)) };
    for i0 in (0..n).step_by(B * per) {
        let i1 = (i0 + B * per).min(n);
        let nb = (i1 - i0).div_ceil(per);
        let n_g = ends[i0..i1].iter().map(|&e| e - start).max().unwrap_or(0);
        let (n16_g, steps_g) = (n_g.div_ceil(16), n_g.div_ceil(32));
        for g in 0..nkv {
            let kg = &kb[g * k_head..(g + 1) * k_head];
            let q_tile = |b: usize, s: usize| {
                let row = (g * qn + tokens.start + i0 + b * per) * G;
                (
                    qr.as_ptr().wrapping_add(row * hd + 32 * s) as *const u8,
                    2 * hd,
                )
            };
            if in_place {
                // SAFETY: rows of `k` (or `tail`) as above; `qt` as laid out above.
                unsafe {
                    scores_in_place(
                        &k[..kv.len * w],
                        &tail,
                        w,
                        g * hd,
                        start,
                        n16_g,
                        &qt[g * dsteps..(g + 1) * dsteps],
                        st,
                        npad,
                    )
                };
            }
            // Scores: the groups' queries (left) by two tiles of 16 positions (right).
            for p0 in (0..n16_g).step_by(2).filter(|_| !in_place) {
                let np = 2.min(n16_g - p0);
                let k_tile = |p: usize, s: usize| {
                    kg.as_ptr().wrapping_add((p * dsteps + s) * 512) as *const u8
                };
                // SAFETY: tiles configured.
                unsafe { zero_sums() };
                for s in 0..dsteps {
                    let left = [q_tile(0, s), q_tile(nb - 1, s)];
                    let right = [k_tile(p0, s), k_tile(p0 + np - 1, s)];
                    // SAFETY: query tiles: 16 rows of 64 bytes `2·hd` apart within `qr` (rows
                    // of tokens i0 .. i0 + 2·per ≤ qn); key tiles: 1 KiB within `kg`.
                    unsafe { mul2x2(left, nb, right, 64, np) };
                }
                for b in 0..nb {
                    for i in 0..np {
                        let to = st.as_mut_ptr().wrapping_add(b * 16 * npad + 16 * (p0 + i));
                        // SAFETY: 16 rows × 16 positions of group b's scores (16 × npad).
                        unsafe { store_sum(2 * b + i, to, 4 * npad) };
                    }
                }
            }
            let mut ml = [[(0.0f32, 0.0f32); 16]; B];
            for (b, ml) in ml.iter_mut().enumerate().take(nb) {
                let tokens = (i0 + b * per).min(i1)..(i0 + (b + 1) * per).min(i1);
                for (tt, ti) in tokens.enumerate() {
                    for hh in 0..G {
                        let r = b * 16 + tt * G + hh;
                        let row = &mut st[r * npad..(r + 1) * npad];
                        let out = &mut pa[r * npad..(r + 1) * npad];
                        // SAFETY: `row` and `out` hold npad ≥ 32 · steps_g positions.
                        ml[tt * G + hh] = unsafe {
                            softmax_row(row, out, n16_g, 2 * steps_g, ends[ti] - start, scale)
                        };
                    }
                }
            }
            // Weighted values: the groups' weights (left) by two tiles of 16 columns (right).
            let vg = &vb[g * v_head..(g + 1) * v_head];
            for db0 in (0..dblocks).step_by(2) {
                let nv = 2.min(dblocks - db0);
                // SAFETY: tiles configured.
                unsafe { zero_sums() };
                for s in 0..steps_g {
                    let wt = |b: usize| {
                        (
                            pa.as_ptr().wrapping_add(b * 16 * npad + 32 * s) as *const u8,
                            2 * npad,
                        )
                    };
                    let vt = |i: usize| {
                        vg.as_ptr().wrapping_add(((db0 + i) * steps + s) * 512) as *const u8
                    };
                    // SAFETY: weight tiles: 16 rows of 64 bytes `2·npad` apart within `pa`;
                    // value tiles: 1 KiB within the head's laid-out values.
                    unsafe { mul2x2([wt(0), wt(nb - 1)], nb, [vt(0), vt(nv - 1)], 64, nv) };
                }
                for b in 0..nb {
                    for i in 0..nv {
                        let to = ot.as_mut_ptr().wrapping_add(b * 16 * hd + 16 * (db0 + i));
                        // SAFETY: 16 rows × 16 columns of group b's outputs (16 × hd).
                        unsafe { store_sum(2 * b + i, to, 4 * hd) };
                    }
                }
            }
            for (x, part) in parts[..i1 - i0].iter_mut().enumerate() {
                let (b, tt) = (x / per, x % per);
                for hh in 0..G {
                    let (r, h) = (tt * G + hh, g * G + hh);
                    (part.m[h], part.l[h]) = ml[b][r];
                    let row = &ot[(b * 16 + r) * hd..(b * 16 + r + 1) * hd];
                    part.o[h * hd..(h + 1) * hd].copy_from_slice(row);
                }
            }
        }
        // Tiles released around `emit`, which may use them itself (another call of this
        // kernel leaves them released).
        // SAFETY: no tile is live between groups.
        unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
        for (x, part) in parts[..i1 - i0].iter().enumerate() {
            emit(i0 + x, part);
        }
        if i1 < n {
            // SAFETY: as the configuration above.
            unsafe {
                asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly, preserves_flags))
            };
        }
    }
    scratch::put_u16(u);
    scratch::put_f32(f);
}

/// One group's scores `st[row, position]` (rows `npad` apart) over positions `0..16 · n16`
/// from `start`, with the keys of head `col..` as the left operand where they lie in `k` (rows
/// `w` apart; those from the first whole 16 past the cache's end in `tail`) and the group's
/// queries as the right operand (`qt[s]`, column pairs `32s..` of the 16 rows transposed).
///
/// # Safety
/// Tiles configured; `k` holds rows `start..` up to its end in whole rows of `w`, `tail`
/// (16 rows of `w`) where rows `start .. start + 16 · n16` go past it; `qt` holds `hd / 32`
/// tiles; `st` holds 16 rows of `npad ≥ 16 · n16`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_in_place(
    k: &[u16],
    tail: &[u16],
    w: usize,
    col: usize,
    start: usize,
    n16: usize,
    qt: &[[u16; 512]],
    st: &mut [f32],
    npad: usize,
) {
    let rows = k.len() / w;
    let whole = (rows - start) / 16;
    assert!(n16 <= whole || tail.len() >= 16 * w);
    assert!(st.len() >= 16 * npad && 16 * n16 <= npad);
    let key_tile = |p: usize, s: usize| -> *const u8 {
        let at = col + 32 * s;
        if p < whole {
            k.as_ptr().wrapping_add((start + 16 * p) * w + at) as *const u8
        } else {
            tail.as_ptr().wrapping_add(at) as *const u8
        }
    };
    let mut t = [[0.0f32; 16]; 32];
    for p0 in (0..n16).step_by(2) {
        let np = 2.min(n16 - p0);
        // SAFETY: tiles configured.
        unsafe { zero_sums() };
        for (s, q) in qt.iter().enumerate() {
            let left = [(key_tile(p0, s), 2 * w), (key_tile(p0 + np - 1, s), 2 * w)];
            let right = [q.as_ptr() as *const u8; 2];
            // SAFETY: key tiles: 16 rows of 64 bytes `2w` apart within `k` or `tail`
            // (asserted); query tiles 1 KiB.
            unsafe { mul2x2(left, np, right, 64, 1) };
        }
        for i in 0..np {
            // SAFETY: 16 rows of 16 scores into `t[16i..]`; AVX-512 F for the transposes.
            unsafe {
                store_sum(2 * i, t[16 * i].as_mut_ptr(), 64);
                let mut words = [_mm512_setzero_si512(); 16];
                for (j, x) in words.iter_mut().enumerate() {
                    *x = _mm512_loadu_si512(t[16 * i + j].as_ptr() as *const _);
                }
                for (r, x) in transpose16(words).iter().enumerate() {
                    let to = st.as_mut_ptr().add(r * npad + 16 * (p0 + i));
                    _mm512_storeu_si512(to as *mut _, *x);
                }
            }
        }
    }
}

/// Head `col..col + hd` of key rows `start .. start + n` laid out as the right operand: per
/// 16 positions `p`, per 32 columns `s`, a tile whose row `kk` holds column pair `kk` of the
/// 16 positions; positions past `n` zero.
///
/// # Safety
/// AVX-512 F; rows `start .. start + n` of `w` values exist in `k`; `out` holds
/// `2 · steps · hd / 32 · 512` values, `32 · steps ≥ n`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn lay_out_keys(
    k: &[u16],
    w: usize,
    col: usize,
    hd: usize,
    start: usize,
    n: usize,
    steps: usize,
    out: &mut [u16],
) {
    let dsteps = hd / 32;
    assert!(out.len() >= 2 * steps * dsteps * 512 && 32 * steps >= n);
    assert!(n == 0 || k.len() >= (start + n) * w && col + hd <= w);
    // Each 16 rows copied whole first (in row order, which the prefetchers follow; reading
    // them 64 bytes a row for the transposes stalled on memory), the next 16 prefetched.
    let mut rows = vec![0u16; 16 * hd];
    for p in 0..2 * steps {
        for j in 16 * (p + 1)..(16 * (p + 2)).min(n) {
            let r = k.as_ptr().wrapping_add((start + j) * w + col) as *const i8;
            for line in (0..2 * hd).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(r.wrapping_add(line));
            }
        }
        for (r, dst) in rows.chunks_exact_mut(hd).enumerate() {
            let j = 16 * p + r;
            if j < n {
                dst.copy_from_slice(&k[(start + j) * w + col..(start + j) * w + col + hd]);
            } else {
                dst.fill(0);
            }
        }
        for s in 0..dsteps {
            // A loop, not `array::from_fn`: a closure is a function without this one's target
            // features, and the intrinsics in it stay calls.
            let mut words = [_mm512_setzero_si512(); 16];
            for (r, x) in words.iter_mut().enumerate() {
                // SAFETY: columns 32s .. 32s + 32 of row r of `rows`.
                *x = unsafe { _mm512_loadu_si512(rows.as_ptr().add(r * hd + 32 * s) as *const _) };
            }
            // SAFETY: AVX-512 F.
            let by_pair = unsafe { transpose16(words) };
            let tile = &mut out[(p * dsteps + s) * 512..(p * dsteps + s + 1) * 512];
            for (kk, x) in by_pair.iter().enumerate() {
                // SAFETY: row kk of the tile, 32 values.
                unsafe { _mm512_storeu_si512(tile.as_mut_ptr().add(32 * kk) as *mut _, *x) };
            }
        }
    }
}

/// Head `col..col + hd` of value rows `start .. start + n` laid out as the right operand: per
/// 16 columns `16·db ..`, per 32 positions `s`, a tile whose row `kk` holds positions `2kk`
/// and `2kk + 1` interleaved; positions past `n` zero.
///
/// # Safety
/// AVX-512 F/BW; rows `start .. start + n` of `w` values exist in `v`; `out` holds
/// `hd / 16 · steps · 512` values, `steps ≥ n / 32`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn lay_out_values(
    v: &[u16],
    w: usize,
    col: usize,
    hd: usize,
    start: usize,
    n: usize,
    steps: usize,
    out: &mut [u16],
    prefetch: bool,
) {
    let row = |j: usize| -> Option<*const u16> {
        (j < n).then(|| v.as_ptr().wrapping_add((start + j) * w + col))
    };
    for s in 0..steps {
        // The next 32 rows prefetched, as for the keys, where asked: the loads below otherwise
        // wait on memory one row pair at a time when several tokens share the call (one token
        // alone measured slower with them: the hardware's own prefetching keeps up there).
        for j in (32 * (s + 1)..(32 * (s + 2)).min(n)).filter(|_| prefetch) {
            let r = v.as_ptr().wrapping_add((start + j) * w + col) as *const i8;
            for line in (0..2 * hd).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(r.wrapping_add(line));
            }
        }
        for kk in 0..16 {
            let (r0, r1) = (row(32 * s + 2 * kk), row(32 * s + 2 * kk + 1));
            for c in 0..hd / 32 {
                // SAFETY: a row that exists has hd columns from `col`; a missing one is zero.
                unsafe {
                    // Quadwords (4 columns each) 0,4,1,5,2,6,3,7: the unpacks, which work
                    // within 128-bit lanes on their low or high quadword, then leave columns
                    // 0–15 in the low one and 16–31 in the high one, in order.
                    let order = _mm512_set_epi64(7, 3, 6, 2, 5, 1, 4, 0);
                    let mut x = [_mm512_setzero_si512(); 2];
                    for (x, r) in x.iter_mut().zip([r0, r1]) {
                        if let Some(p) = r {
                            *x = _mm512_permutexvar_epi64(
                                order,
                                _mm512_loadu_si512(p.add(32 * c) as *const _),
                            );
                        }
                    }
                    let [x0, x1] = x;
                    let lo = _mm512_unpacklo_epi16(x0, x1);
                    let hi = _mm512_unpackhi_epi16(x0, x1);
                    let at = |db: usize| ((db * steps + s) * 16 + kk) * 32;
                    _mm512_storeu_si512(out.as_mut_ptr().add(at(2 * c)) as *mut _, lo);
                    _mm512_storeu_si512(out.as_mut_ptr().add(at(2 * c + 1)) as *mut _, hi);
                }
            }
        }
    }
}

/// One row's softmax: its scores `row` at positions `0..16 · scored` (tiles of 16), scaled,
/// counting positions below `end`; its weights `exp(s − max)` rounded to bfloat16 written to
/// `out` at positions `0..16 · to`, 0 where not counted. Returns the maximum and the sum of
/// the weights.
///
/// # Safety
/// AVX-512 F/BW/BF16; `row` and `out` hold `16 · to` values, `scored ≤ to`, `0 < end ≤ 16 · scored`.
#[inline(always)]
unsafe fn softmax_row(
    row: &[f32],
    out: &mut [u16],
    scored: usize,
    to: usize,
    end: usize,
    scale: f32,
) -> (f32, f32) {
    assert!(row.len() >= 16 * to && out.len() >= 16 * to && scored <= to);
    assert!(end > 0 && end <= 16 * scored);
    let live = |p: usize| -> __mmask16 {
        let left = end.saturating_sub(16 * p);
        if left >= 16 {
            !0
        } else {
            (1u16 << left) - 1
        }
    };
    // SAFETY: AVX-512 F/BW/BF16; every access is within `row` and `out` (asserted).
    unsafe {
        let sc = _mm512_set1_ps(scale);
        let mut mv = _mm512_set1_ps(f32::NEG_INFINITY);
        for p in 0..scored {
            let s = _mm512_mul_ps(_mm512_loadu_ps(row.as_ptr().add(16 * p)), sc);
            mv = _mm512_mask_max_ps(mv, live(p), mv, s);
        }
        let m = _mm512_reduce_max_ps(mv);
        let mut lv = _mm512_setzero_ps();
        for p in 0..to {
            let mask = live(p);
            let mut e = _mm512_setzero_ps();
            if mask != 0 {
                let s = _mm512_mul_ps(_mm512_loadu_ps(row.as_ptr().add(16 * p)), sc);
                let mut x = [0.0f32; 16];
                _mm512_storeu_ps(x.as_mut_ptr(), _mm512_sub_ps(s, _mm512_set1_ps(m)));
                for x in &mut x {
                    // exp of a position not counted (garbage past the end) is dropped below.
                    *x = exp(*x);
                    // Round to nearest even; weights are finite and non-negative.
                    let b = x.to_bits();
                    *x = f32::from_bits((b.wrapping_add(0x7FFF + ((b >> 16) & 1))) & 0xFFFF_0000);
                }
                e = _mm512_maskz_loadu_ps(mask, x.as_ptr());
            }
            lv = _mm512_add_ps(lv, e);
            // Exact: the weights are bfloat16 values already.
            let h = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(e));
            _mm256_storeu_si256(out.as_mut_ptr().add(16 * p) as *mut _, h);
        }
        (m, _mm512_reduce_add_ps(lv))
    }
}

/// Sums `2a + b` (tiles 0–3) += left tile `a` × right tile `b`, for `a < na`, `b < nb`
/// (each 1 or 2): left tiles are 16 rows of 64 bytes at `left[a].0`, `left[a].1` bytes apart,
/// loaded into tiles 4–5; right tiles 16 rows at `right[b]`, `ldb` apart, into tiles 6–7.
///
/// # Safety
/// Tiles configured; those rows readable.
#[inline(always)]
unsafe fn mul2x2(
    left: [(*const u8, usize); 2],
    na: usize,
    right: [*const u8; 2],
    ldb: usize,
    nb: usize,
) {
    let ([(a0, lda0), (a1, lda1)], [b0, b1]) = (left, right);
    // SAFETY: the caller's guarantee; the instructions touch only tile registers and read
    // only those rows.
    unsafe {
        match (na, nb) {
            (2, 2) => asm!(
                "tileloadd tmm4, [{a0} + {lda0}*1]",
                "tileloadd tmm6, [{b0} + {ldb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {ldb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {lda1}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
                lda0 = in(reg) lda0, lda1 = in(reg) lda1, ldb = in(reg) ldb,
                options(nostack, readonly, preserves_flags),
            ),
            (2, _) => asm!(
                "tileloadd tmm4, [{a0} + {lda0}*1]",
                "tileloadd tmm6, [{b0} + {ldb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a1} + {lda1}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0,
                lda0 = in(reg) lda0, lda1 = in(reg) lda1, ldb = in(reg) ldb,
                options(nostack, readonly, preserves_flags),
            ),
            (_, 2) => asm!(
                "tileloadd tmm4, [{a0} + {lda0}*1]",
                "tileloadd tmm6, [{b0} + {ldb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {ldb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                a0 = in(reg) a0, b0 = in(reg) b0, b1 = in(reg) b1,
                lda0 = in(reg) lda0, ldb = in(reg) ldb,
                options(nostack, readonly, preserves_flags),
            ),
            _ => asm!(
                "tileloadd tmm4, [{a0} + {lda0}*1]",
                "tileloadd tmm6, [{b0} + {ldb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                a0 = in(reg) a0, b0 = in(reg) b0,
                lda0 = in(reg) lda0, ldb = in(reg) ldb,
                options(nostack, readonly, preserves_flags),
            ),
        }
    }
}

/// Sum `i` stored as 16 rows of 64 bytes, `ld` bytes apart, at `p`.
///
/// # Safety
/// Tiles configured; 16 rows of 64 bytes writable at `p`, `ld` apart.
#[inline(always)]
unsafe fn store_sum(i: usize, p: *mut f32, ld: usize) {
    macro_rules! go {
        ($t:literal) => {
            asm!(
                concat!("tilestored [{p} + {ld}*1], ", $t),
                p = in(reg) p, ld = in(reg) ld,
                options(nostack, preserves_flags),
            )
        };
    }
    // SAFETY: the caller's guarantee.
    unsafe {
        match i {
            0 => go!("tmm0"),
            1 => go!("tmm1"),
            2 => go!("tmm2"),
            _ => go!("tmm3"),
        }
    }
}
