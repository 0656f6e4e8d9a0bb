//! Softmax attention of one token's query heads over a sequence's K/V cache: the inner loop of
//! decode at long contexts, where it reads the whole cache for every token.
//!
//! The cache is cut into chunks of [`CHUNK`] positions at fixed absolute positions. Each chunk
//! gives a [`Part`]: per head, the scores' maximum, the sum of their exponentials and the
//! unnormalised weighted sum of values (flash-decoding). Parts are folded in chunk order.
//! Because the cut and the fold's order depend only on the token's position, a token's result
//! is the same whether its chunks ran one after the other ([`attend`], prompt tokens) or as
//! separate tasks on the pool (decode, where one token's chunks are all the work there is).
//!
//! A chunk reads each cached row once for all heads (GQA: 8 query heads share a KV head in
//! Qwen3-Next), whole rows in order, which the hardware prefetchers follow.

use std::ops::Range;

use multiversion::multiversion;

use super::activation::exp;

/// Positions per chunk: its keys and values (512 KiB at the model's shape in bfloat16) stay in
/// L2 between the scoring and the weighting pass, and at depth 4096 one token gives the pool 16
/// chunks to share.
pub const CHUNK: usize = 256;

/// Cached key or value rows as stored: f32 (`--exact`) or bfloat16 (the fast path, half the
/// bytes that decode at long contexts reads per token).
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl Rows<'_> {
    pub fn len(&self) -> usize {
        match self {
            Rows::F32(d) => d.len(),
            Rows::Bf16(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A sequence's cache as the kernels read it: rows of `heads × hd` keys and values, one per
/// position, at least `len` of them.
#[derive(Clone, Copy)]
pub struct Kv<'a> {
    pub k: Rows<'a>,
    pub v: Rows<'a>,
    pub heads: usize,
    pub hd: usize,
    pub len: usize,
}

impl Kv<'_> {
    /// Whether both views read the same stored rows (the same chunk of one sequence).
    pub fn same_rows(&self, other: &Kv) -> bool {
        let at = |r: Rows| match r {
            Rows::F32(d) => (d.as_ptr() as usize, d.len()),
            Rows::Bf16(d) => (d.as_ptr() as usize, d.len()),
        };
        at(self.k) == at(other.k) && at(self.v) == at(other.v) && self.len == other.len
    }

    fn check(&self, q_heads: usize) {
        let w = self.heads * self.hd;
        assert!(self.heads > 0 && q_heads.is_multiple_of(self.heads));
        assert!(self.k.len() >= self.len * w && self.v.len() >= self.len * w);
    }
}

/// A sequence's cache in blocks of [`CHUNK`] positions (`cache::blocks`), block `i` holding
/// positions `i·CHUNK..`, of which the first `len` are read.
#[derive(Clone, Copy)]
pub struct Paged<'a> {
    pub blocks: &'a [Kv<'a>],
    pub len: usize,
}

impl<'a> Paged<'a> {
    /// Per chunk of `0..len`: its block and the chunk's positions within it.
    pub fn chunks(self) -> impl Iterator<Item = (Kv<'a>, Range<usize>)> {
        chunks(self.len).map(move |r| {
            let base = r.start / CHUNK * CHUNK;
            let block = Kv {
                len: r.end - base,
                ..self.blocks[r.start / CHUNK]
            };
            (block, r.start - base..r.end - base)
        })
    }
}

/// The chunks of a context of `ctx` positions.
pub fn chunks(ctx: usize) -> impl Iterator<Item = Range<usize>> {
    (0..ctx)
        .step_by(CHUNK)
        .map(move |p| p..(p + CHUNK).min(ctx))
}

/// Attention of all query heads over one chunk, before normalisation.
#[derive(Clone, Default)]
pub struct Part {
    /// Per query head: the largest scaled score.
    pub m: Vec<f32>,
    /// Per query head: Σ exp(score − m).
    pub l: Vec<f32>,
    /// `[heads, hd]`: Σ exp(score − m) · value.
    pub o: Vec<f32>,
}

impl Part {
    pub fn new(heads: usize, hd: usize) -> Part {
        Part {
            m: vec![0.0; heads],
            l: vec![0.0; heads],
            o: vec![0.0; heads * hd],
        }
    }

    /// Folds `next` (the following chunk) into `self`, rescaling both to the larger maximum.
    pub fn fold(&mut self, next: &Part) {
        let hd = self.o.len() / self.m.len();
        for h in 0..self.m.len() {
            let m = self.m[h].max(next.m[h]);
            let (a, b) = (exp(self.m[h] - m), exp(next.m[h] - m));
            self.m[h] = m;
            self.l[h] = a * self.l[h] + b * next.l[h];
            let (o, n) = (
                &mut self.o[h * hd..(h + 1) * hd],
                &next.o[h * hd..(h + 1) * hd],
            );
            for (o, &n) in o.iter_mut().zip(n) {
                *o = a * *o + b * n;
            }
        }
    }

    /// The normalised attention output `[heads, hd]`.
    pub fn finish(&self, out: &mut [f32]) {
        let hd = self.o.len() / self.m.len();
        for (h, (out, o)) in out.chunks_mut(hd).zip(self.o.chunks(hd)).enumerate() {
            let inv = 1.0 / self.l[h];
            for (y, &x) in out.iter_mut().zip(o) {
                *y = x * inv;
            }
        }
    }
}

/// Causal softmax attention of one token's query heads `q` (`[heads, hd]`) over positions
/// `0..kv.len` of the cache, into `out` (`[heads, hd]`): its chunks in order, folded.
pub fn attend(q: &[f32], kv: Paged, out: &mut [f32]) {
    let Some(first) = kv.blocks.first() else {
        return;
    };
    let heads = q.len() / first.hd;
    let mut acc = Part::new(heads, first.hd);
    let mut next = Part::new(heads, first.hd);
    for (i, (block, range)) in kv.chunks().enumerate() {
        if i == 0 {
            attend_chunk(q, block, range, &mut acc);
        } else {
            attend_chunk(q, block, range, &mut next);
            acc.fold(&next);
        }
    }
    acc.finish(out);
}

/// One chunk's [`Part`] of the attention of `q` (`[heads, hd]`), `range` within `0..kv.len`.
pub fn attend_chunk(q: &[f32], kv: Kv, range: Range<usize>, part: &mut Part) {
    chunk_with(q, kv, range, part, super::isa::bf16_dot());
}

/// Queries of several tokens, as [`attend_chunk_many`] takes them: the f32 rows, and where
/// the AMX tile kernel runs, the same rounded to bfloat16 and laid out for its tiles, once for
/// all the chunks they attend over.
pub struct Queries<'a> {
    rows: Vec<&'a [f32]>,
    #[cfg(target_arch = "x86_64")]
    tiles: Option<(usize, Vec<u16>)>,
}

impl<'a> Queries<'a> {
    /// `rows` (`[heads, hd]` each) for caches shaped as `kv`.
    pub fn new(rows: Vec<&'a [f32]>, kv: Kv) -> Queries<'a> {
        #[cfg(target_arch = "x86_64")]
        {
            let tiles = rows
                .first()
                .and_then(|q| amx_group(q.len(), kv))
                .map(|group| {
                    use super::x86::amx_attention::query_rows;
                    let (nkv, hd) = (kv.heads, kv.hd);
                    assert!(rows.iter().all(|q| q.len() == group * nkv * hd));
                    // SAFETY: `amx_group` checked the tiles (AVX-512 F/BW/BF16 with them) and the
                    // shape; every row has the first's length (asserted).
                    let data = unsafe {
                        match group {
                            1 => query_rows::<1>(&rows, nkv, hd),
                            2 => query_rows::<2>(&rows, nkv, hd),
                            4 => query_rows::<4>(&rows, nkv, hd),
                            8 => query_rows::<8>(&rows, nkv, hd),
                            _ => query_rows::<16>(&rows, nkv, hd),
                        }
                    };
                    (group, data)
                });
            Queries { rows, tiles }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = kv;
            Queries { rows }
        }
    }
}

/// [`attend_chunk`] for several tokens over the same chunk: token `t` of `tokens` (query
/// `qs`' row `t`) over positions `start..ends[t − tokens.start]`, its part handed to
/// `emit(t − tokens.start, part)` in token order. Each token gets the bits [`attend_chunk`]
/// gives it alone; the AMX tiles take the tokens four at a time at the model's shape and lay
/// the chunk's keys and values out once for all of them.
pub fn attend_chunk_many(
    qs: &Queries,
    tokens: Range<usize>,
    kv: Kv,
    start: usize,
    ends: &[usize],
    emit: &mut dyn FnMut(usize, &Part),
) {
    assert!(tokens.len() == ends.len() && tokens.end <= qs.rows.len());
    let Some(q0) = qs.rows.first() else {
        return;
    };
    #[cfg(target_arch = "x86_64")]
    if let Some((group, data)) = &qs.tiles {
        let group = *group;
        assert_eq!(
            amx_group(q0.len(), kv),
            Some(group),
            "queries laid out for another cache"
        );
        kv.check(group * kv.heads);
        let (Rows::Bf16(k), Rows::Bf16(v)) = (kv.k, kv.v) else {
            unreachable!("amx_group takes bfloat16 rows only")
        };
        let qn = qs.rows.len() + 16 / group;
        amx_chunk(group, data, qn, tokens, k, v, kv, start, ends, emit);
        return;
    }
    let mut part = Part::new(q0.len() / kv.hd, kv.hd);
    for (i, (t, &end)) in tokens.zip(ends).enumerate() {
        attend_chunk(qs.rows[t], kv, start..end, &mut part);
        emit(i, &part);
    }
}

/// The query heads per KV head, where the AMX tile kernel takes this chunk: the CPU has the
/// tiles (and `QNEXT_AMX` does not turn them off), rows are bfloat16 and the shape fits.
#[cfg(target_arch = "x86_64")]
fn amx_group(q_len: usize, kv: Kv) -> Option<usize> {
    let heads = q_len / kv.hd.max(1);
    let group = heads / kv.heads.max(1);
    (super::isa::amx()
        && matches!((kv.k, kv.v), (Rows::Bf16(_), Rows::Bf16(_)))
        && group * kv.heads * kv.hd == q_len
        && super::x86::amx_attention::supports(group, kv.hd))
    .then_some(group)
}

/// The AMX kernel for `group` query heads per KV head.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn amx_chunk(
    group: usize,
    qr: &[u16],
    qn: usize,
    tokens: Range<usize>,
    k: &[u16],
    v: &[u16],
    kv: Kv,
    start: usize,
    ends: &[usize],
    emit: &mut dyn FnMut(usize, &Part),
) {
    use super::x86::amx_attention::chunk;
    assert!(ends.iter().all(|&e| start < e && e <= kv.len));
    assert!(tokens.end + 16 / group <= qn && qr.len() >= kv.heads * qn * group * kv.hd);
    // SAFETY: `amx_group` checked the tiles (`isa::amx()`, which implies AVX-512 F/BW/BF16)
    // and the shape; `kv.check` the rows; the queries and ranges are asserted above.
    unsafe {
        match group {
            1 => chunk::<1>(qr, qn, tokens, k, v, kv, start, ends, emit),
            2 => chunk::<2>(qr, qn, tokens, k, v, kv, start, ends, emit),
            4 => chunk::<4>(qr, qn, tokens, k, v, kv, start, ends, emit),
            8 => chunk::<8>(qr, qn, tokens, k, v, kv, start, ends, emit),
            _ => chunk::<16>(qr, qn, tokens, k, v, kv, start, ends, emit),
        }
    }
}

/// Tokens per pass of [`attend_prompt`] over their caches: their running parts (16 KiB each
/// at the model's shape) stay in L2 while each chunk of the cache is read from memory once
/// per pass.
pub const PASS_TOKENS: usize = 64;

/// Prompt tokens `run`: token `i` attends with `q_of(i)` over `kv_of(i)`, and `done(i, part)`
/// gets its parts folded in chunk order, the bits of [`attend`]. Chunk by chunk for up to
/// [`PASS_TOKENS`] tokens at a time, those that share a chunk (adjacent tokens of one
/// sequence) in one [`attend_chunk_many`].
pub fn attend_prompt<'a>(
    run: Range<usize>,
    q_of: &dyn Fn(usize) -> &'a [f32],
    kv_of: &dyn Fn(usize) -> Paged<'a>,
    done: &mut dyn FnMut(usize, &Part),
) {
    for p0 in run.clone().step_by(PASS_TOKENS) {
        let pass = p0..(p0 + PASS_TOKENS).min(run.end);
        let chunks: Vec<Vec<(Kv, Range<usize>)>> = pass
            .clone()
            .map(|ti| kv_of(ti).chunks().collect())
            .collect();
        let Some(&(first, _)) = chunks.first().and_then(|c| c.first()) else {
            continue;
        };
        let qs = Queries::new(pass.clone().map(q_of).collect(), first);
        let mut acc: Vec<Part> = Vec::with_capacity(pass.len());
        let most = chunks.iter().map(Vec::len).max().unwrap_or(0);
        for c in 0..most {
            let mut i = 0;
            while i < chunks.len() {
                let Some((block, range)) = chunks[i].get(c).cloned() else {
                    i += 1;
                    continue;
                };
                let mut j = i + 1;
                while j < chunks.len()
                    && chunks[j]
                        .get(c)
                        .is_some_and(|(b, r)| b.same_rows(&block) && r.start == range.start)
                {
                    j += 1;
                }
                let ends: Vec<usize> = (i..j).map(|x| chunks[x][c].1.end).collect();
                attend_chunk_many(&qs, i..j, block, range.start, &ends, &mut |x, part| {
                    if c == 0 {
                        acc.push(part.clone());
                    } else {
                        acc[i + x].fold(part);
                    }
                });
                i = j;
            }
        }
        for (x, part) in acc.iter().enumerate() {
            done(pass.start + x, part);
        }
    }
}

/// [`attend_chunk`], with bfloat16 rows taking the bfloat16 dot products where `dots` (and the
/// CPU has them) and f32 arithmetic otherwise. Returns whether queries and weights were
/// rounded to bfloat16 (the dot products ran).
fn chunk_with(q: &[f32], kv: Kv, range: Range<usize>, part: &mut Part, dots: bool) -> bool {
    let heads = q.len() / kv.hd;
    kv.check(heads);
    assert!(q.len() == heads * kv.hd && !range.is_empty() && range.end <= kv.len);
    assert!(part.m.len() == heads && part.l.len() == heads && part.o.len() == heads * kv.hd);
    #[cfg(target_arch = "x86_64")]
    if dots {
        if let Some(group) = amx_group(q.len(), kv) {
            let (Rows::Bf16(k), Rows::Bf16(v)) = (kv.k, kv.v) else {
                unreachable!("amx_group takes bfloat16 rows only")
            };
            let qr = Queries::new(vec![q], kv);
            let Some((_, data)) = &qr.tiles else {
                unreachable!("amx_group said the tiles take these queries")
            };
            amx_chunk(
                group,
                data,
                1 + 16 / group,
                0..1,
                k,
                v,
                kv,
                range.start,
                &[range.end],
                &mut |_, p| part.clone_from(p),
            );
            return true;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if super::isa::isa() == super::isa::Isa::Avx512 && kv.hd.is_multiple_of(32) {
        use super::x86::attention::{chunk, chunk_bf16, Bf16Rows, F32Rows};
        let dots = dots && super::isa::bf16_dot();
        macro_rules! go {
            ($g:literal, $p:literal) => {
                // SAFETY: AVX-512 F (and BF16 where used) verified by `isa()` and
                // `bf16_dot()`; shapes checked above.
                unsafe {
                    match (kv.k, kv.v) {
                        (Rows::F32(k), Rows::F32(v)) => {
                            chunk::<$g, $p, F32Rows>(q, k, v, kv, range, part)
                        }
                        (Rows::Bf16(k), Rows::Bf16(v)) if dots => {
                            chunk_bf16::<$g, $p>(q, k, v, kv, range, part);
                            return true;
                        }
                        (Rows::Bf16(k), Rows::Bf16(v)) => {
                            chunk::<$g, $p, Bf16Rows>(q, k, v, kv, range, part)
                        }
                        _ => chunk_portable(q, kv, range, part, false),
                    }
                    false
                }
            };
        }
        match heads / kv.heads {
            8 => return go!(8, 2),
            4 => return go!(4, 4),
            2 => return go!(2, 8),
            1 => return go!(1, 16),
            _ => {}
        }
    }
    // Without AVX-512 there are no bfloat16 dot products to ask for.
    let _ = dots;
    chunk_portable(q, kv, range, part, false);
    false
}

/// `x` rounded to the nearest bfloat16 (ties to even), as f32.
fn bf16_round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// The portable form: 16-lane chains the compiler vectorises; each row is widened once for
/// the query heads that share it. With `round`, queries and weights are rounded to bfloat16
/// first, as the bfloat16 dot products take them (the tests' model of that kernel).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn chunk_portable(q: &[f32], kv: Kv, range: Range<usize>, part: &mut Part, round: bool) {
    let rounded: Vec<f32>;
    let q = if round {
        rounded = q.iter().map(|&x| bf16_round(x)).collect();
        &rounded
    } else {
        q
    };
    const L: usize = 16;
    let (hd, w) = (kv.hd, kv.heads * kv.hd);
    let group = q.len() / hd / kv.heads;
    let n = range.len();
    let scale = 1.0 / (hd as f32).sqrt();
    let lanes = hd / L * L;
    let mut row = vec![0.0f32; hd];
    // scores[hh · n + j] for the heads of one KV head.
    let mut scores = vec![0.0f32; group * n];
    part.o.fill(0.0);
    for g in 0..kv.heads {
        // One match per row, not per value: the loops then vectorise.
        let widen = |rows: Rows, j: usize, row: &mut [f32]| {
            let at = j * w + g * hd;
            match rows {
                Rows::F32(d) => row.copy_from_slice(&d[at..at + hd]),
                Rows::Bf16(d) => {
                    for (r, &b) in row.iter_mut().zip(&d[at..at + hd]) {
                        *r = f32::from_bits((b as u32) << 16);
                    }
                }
            }
        };
        for (jj, j) in range.clone().enumerate() {
            widen(kv.k, j, &mut row);
            for hh in 0..group {
                let qh = &q[(g * group + hh) * hd..(g * group + hh + 1) * hd];
                let mut acc = [0.0f32; L];
                // Whole chunks zipped, so no index is checked inside (the compiler then keeps
                // the 16 lanes in vectors); the same sums in the same order.
                for (qc, rc) in qh[..lanes]
                    .chunks_exact(L)
                    .zip(row[..lanes].chunks_exact(L))
                {
                    for l in 0..L {
                        acc[l] += qc[l] * rc[l];
                    }
                }
                let mut dot: f32 = acc.iter().sum();
                for c in lanes..hd {
                    dot += qh[c] * row[c];
                }
                scores[hh * n + jj] = dot * scale;
            }
        }
        for hh in 0..group {
            let s = &mut scores[hh * n..(hh + 1) * n];
            let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut l = 0.0f32;
            for s in s.iter_mut() {
                *s = exp(*s - m);
                if round {
                    *s = bf16_round(*s);
                }
                l += *s;
            }
            part.m[g * group + hh] = m;
            part.l[g * group + hh] = l;
        }
        for (jj, j) in range.clone().enumerate() {
            widen(kv.v, j, &mut row);
            for hh in 0..group {
                let p = scores[hh * n + jj];
                let h = g * group + hh;
                for (o, &r) in part.o[h * hd..(h + 1) * hd].iter_mut().zip(&row) {
                    *o += p * r;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        attend, attend_chunk, attend_chunk_many, attend_prompt, chunk_portable, chunk_with, chunks,
        Kv, Paged, Part, Queries, Rows, CHUNK,
    };

    /// [`attend`] over `kv`'s rows stored in blocks, as the cache stores them.
    fn attend_stored(q: &[f32], kv: Kv, out: &mut [f32]) {
        let paged = blocks(kv);
        let len = kv.len;
        attend(
            q,
            Paged {
                blocks: &paged,
                len,
            },
            out,
        );
    }

    /// `kv`'s rows cut into blocks of [`CHUNK`] positions, as the cache stores them.
    fn blocks<'a>(kv: Kv<'a>) -> Vec<Kv<'a>> {
        let w = kv.heads * kv.hd;
        let cut = |rows: Rows<'a>, b: usize| {
            let r = b * CHUNK * w..((b + 1) * CHUNK).min(kv.len) * w;
            match rows {
                Rows::F32(d) => Rows::F32(&d[r]),
                Rows::Bf16(d) => Rows::Bf16(&d[r]),
            }
        };
        (0..kv.len.div_ceil(CHUNK))
            .map(|b| Kv {
                k: cut(kv.k, b),
                v: cut(kv.v, b),
                len: (kv.len - b * CHUNK).min(CHUNK),
                ..kv
            })
            .collect()
    }

    fn rnd_vec(seed: &mut u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// Keys and values of `ctx` rows of width `w`, and `nq` query values, all in [−1, 1).
    fn random_case(
        seed: &mut u64,
        ctx: usize,
        w: usize,
        nq: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        (
            rnd_vec(seed, ctx * w),
            rnd_vec(seed, ctx * w),
            rnd_vec(seed, nq),
        )
    }

    fn bits(x: &[f32]) -> Vec<u16> {
        x.iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect()
    }

    fn wide(b: &[u16]) -> Vec<f32> {
        b.iter()
            .map(|&v| f32::from_bits((v as u32) << 16))
            .collect()
    }

    /// Shapes: the model's (2 KV heads of 256, 8 query heads each) and small ones with other
    /// group sizes; contexts within one chunk and over several, ending mid-chunk.
    const SHAPES: [(usize, usize, usize, usize); 6] = [
        (1, 256, 2, 8),
        (67, 256, 2, 8),
        (CHUNK * 2 + 45, 256, 2, 8),
        (130, 64, 2, 4),
        (5, 32, 3, 2),
        (9, 32, 1, 1),
    ];

    /// The dispatched chunk kernels (AVX-512 where present) against the portable one, on every
    /// chunk, with rows stored as f32 and as bfloat16 (the portable kernel then reads the same
    /// values as f32), bfloat16 rows both in f32 arithmetic and in bfloat16 dot products.
    ///
    /// f32 arithmetic: both sum in f32 in different orders; values are below 1 in magnitude and
    /// weights at most 1, so 1e-5 of each part's sum of weights is ~100× the rounding
    /// differences expected and far below what a wrong row, head or position would cause.
    ///
    /// Dot products: the model rounds queries and weights as the kernel does, but the kernel
    /// rounds each block's weights against the running maximum of the blocks so far and
    /// rescales later, so single weights may differ by a rounding, 2⁻⁹ of themselves, either
    /// side: 2⁻⁸ of the sum of weights bounds that for values below 1. Outputs are sums of a
    /// chunk's weights times random values of either sign, ~0.05 of the sum of weights at one
    /// position and more than that apart between positions or heads, so a wrong row, head or
    /// pairing of positions still stands out ~10× above it.
    #[test]
    fn dispatched_chunks_match_portable() {
        let mut seed = 0x2545_F491u64;
        for (ctx, hd, nkv, group) in SHAPES {
            let w = nkv * hd;
            let (kc, vc, q) = random_case(&mut seed, ctx, w, nkv * group * hd);
            let (kb, vb) = (bits(&kc), bits(&vc));
            let (kw, vw) = (wide(&kb), wide(&vb));
            let kv = |k, v| Kv {
                k,
                v,
                heads: nkv,
                hd,
                len: ctx,
            };
            let f32_rows = kv(Rows::F32(&kc), Rows::F32(&vc));
            let bf16_rows = kv(Rows::Bf16(&kb), Rows::Bf16(&vb));
            let widened = kv(Rows::F32(&kw), Rows::F32(&vw));
            for (stored, as_f32, dots) in [
                (f32_rows, f32_rows, false),
                (bf16_rows, widened, false),
                (bf16_rows, widened, true),
            ] {
                for range in chunks(ctx) {
                    let heads = nkv * group;
                    let mut got = Part::new(heads, hd);
                    let mut want = Part::new(heads, hd);
                    // Where the CPU has no bfloat16 dot products, f32 arithmetic runs instead.
                    let rounded = chunk_with(&q, stored, range.clone(), &mut got, dots);
                    chunk_portable(&q, as_f32, range.clone(), &mut want, rounded);
                    let tol = if rounded { 1e-5 + 2f32.powi(-8) } else { 1e-5 };
                    let what =
                        format!("ctx {ctx} hd {hd} heads {nkv}x{group} {range:?} dots {dots}");
                    for h in 0..heads {
                        assert!((got.m[h] - want.m[h]).abs() <= 1e-5, "{what}: m[{h}]");
                        let l = want.l[h];
                        assert!((got.l[h] - l).abs() <= tol * l, "{what}: l[{h}]");
                        for c in 0..hd {
                            let (a, b) = (got.o[h * hd + c], want.o[h * hd + c]);
                            assert!((a - b).abs() <= tol * l, "{what}: o[{h}][{c}] {a} vs {b}");
                        }
                    }
                }
            }
        }
    }

    /// Folded chunks against softmax attention written out in f64 (one softmax over the whole
    /// context): the outputs are convex combinations of values below 1, so 1e-5 absolute is
    /// far above f32 rounding over a few hundred terms and far below any wrong weight.
    #[test]
    fn folded_chunks_match_softmax_attention() {
        let mut seed = 0x9E37_79B9u64;
        for (ctx, hd, nkv, group) in SHAPES {
            let w = nkv * hd;
            let (kc, vc, q) = random_case(&mut seed, ctx, w, nkv * group * hd);
            let kv = Kv {
                k: Rows::F32(&kc),
                v: Rows::F32(&vc),
                heads: nkv,
                hd,
                len: ctx,
            };
            let mut got = vec![0.0f32; q.len()];
            attend_stored(&q, kv, &mut got);
            for h in 0..nkv * group {
                let off = h / group * hd;
                let s: Vec<f64> = (0..ctx)
                    .map(|j| {
                        (0..hd)
                            .map(|c| q[h * hd + c] as f64 * kc[j * w + off + c] as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                for c in 0..hd {
                    let want: f64 = (0..ctx)
                        .map(|j| e[j] * vc[j * w + off + c] as f64)
                        .sum::<f64>()
                        / sum;
                    let g = got[h * hd + c] as f64;
                    assert!(
                        (g - want).abs() <= 1e-5,
                        "ctx {ctx} hd {hd} head {h} col {c}: {g} vs {want}"
                    );
                }
            }
        }
    }

    /// Several tokens over one chunk in one call (the prompt path) get the bits each gets
    /// alone (the decode path): every shape, every chunk, tokens ending anywhere in it, in
    /// calls of several sizes (odd ones leave a tile's rows unused), rows stored as bfloat16
    /// and as f32.
    #[test]
    fn tokens_together_get_the_bits_they_get_alone() {
        let mut seed = 0x51ED_2701u64;
        for (ctx, hd, nkv, group) in SHAPES {
            let w = nkv * hd;
            let heads = nkv * group;
            let (kc, vc, _) = random_case(&mut seed, ctx, w, 0);
            let (kb, vb) = (bits(&kc), bits(&vc));
            for (k, v) in [
                (Rows::Bf16(&kb), Rows::Bf16(&vb)),
                (Rows::F32(&kc), Rows::F32(&vc)),
            ] {
                let kv = Kv {
                    k,
                    v,
                    heads: nkv,
                    hd,
                    len: ctx,
                };
                for range in chunks(ctx) {
                    let ends: Vec<usize> = (range.start + 1..=range.end)
                        .rev()
                        .step_by(7)
                        .chain([range.start + 1])
                        .collect();
                    let qs: Vec<Vec<f32>> = ends
                        .iter()
                        .map(|_| rnd_vec(&mut seed, heads * hd))
                        .collect();
                    let q = Queries::new(qs.iter().map(Vec::as_slice).collect(), kv);
                    for size in [1, 2, 3, 5, ends.len()] {
                        for at in (0..ends.len()).step_by(size) {
                            let to = (at + size).min(ends.len());
                            let mut seen = 0;
                            attend_chunk_many(
                                &q,
                                at..to,
                                kv,
                                range.start,
                                &ends[at..to],
                                &mut |i, got| {
                                    let mut want = Part::new(heads, hd);
                                    attend_chunk(
                                        &qs[at + i],
                                        kv,
                                        range.start..ends[at + i],
                                        &mut want,
                                    );
                                    let same = |a: &[f32], b: &[f32]| {
                                        a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
                                    };
                                    assert!(
                                    same(&got.m, &want.m)
                                        && same(&got.l, &want.l)
                                        && same(&got.o, &want.o),
                                    "ctx {ctx} hd {hd} heads {nkv}x{group} {range:?} end {} in a call of {size}",
                                    ends[at + i]
                                );
                                    assert_eq!(i, seen);
                                    seen += 1;
                                },
                            );
                            assert_eq!(seen, to - at);
                        }
                    }
                }
            }
        }
    }

    /// The prompt path (`attend_prompt`: passes of tokens, chunk by chunk, tokens sharing a
    /// chunk together) gives each token the bits of `attend` (the path of a token alone), for
    /// more tokens than a pass, two sequences side by side, over the cache's blocks.
    #[test]
    fn prompt_path_gives_the_bits_of_one_token_alone() {
        let mut seed = 0x7F4A_7C15u64;
        let (hd, nkv, group) = (256, 2, 8);
        let (w, heads) = (nkv * hd, nkv * group);
        let lens = [CHUNK * 2 + 45, CHUNK + 3];
        let cases: Vec<(Vec<u16>, Vec<u16>)> = lens
            .iter()
            .map(|&ctx| {
                let (kc, vc, _) = random_case(&mut seed, ctx, w, 0);
                (bits(&kc), bits(&vc))
            })
            .collect();
        let kvs: Vec<Kv> = cases
            .iter()
            .zip(lens)
            .map(|((k, v), len)| Kv {
                k: Rows::Bf16(k),
                v: Rows::Bf16(v),
                heads: nkv,
                hd,
                len,
            })
            .collect();
        let paged: Vec<Vec<Kv>> = kvs.iter().map(|&kv| blocks(kv)).collect();
        // The last 70 positions of the first sequence, then the last 20 of the second.
        let tokens: Vec<(usize, usize)> = (lens[0] - 70..lens[0])
            .map(|p| (0, p))
            .chain((lens[1] - 20..lens[1]).map(|p| (1, p)))
            .collect();
        let qs: Vec<Vec<f32>> = tokens
            .iter()
            .map(|_| rnd_vec(&mut seed, heads * hd))
            .collect();
        let kv_of = |ti: usize| Paged {
            blocks: &paged[tokens[ti].0],
            len: tokens[ti].1 + 1,
        };
        let mut done = vec![false; tokens.len()];
        let mut want = vec![0.0f32; heads * hd];
        let mut got = vec![0.0f32; heads * hd];
        attend_prompt(0..tokens.len(), &|ti| &qs[ti], &kv_of, &mut |ti, part| {
            attend(&qs[ti], kv_of(ti), &mut want);
            part.finish(&mut got);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "token {ti} at {:?}",
                tokens[ti]
            );
            done[ti] = true;
        });
        assert!(done.iter().all(|&d| d));
    }

    /// What the model relies on to split a token's chunks over the pool: each chunk's part
    /// computed on its own, into a part holding stale values from other work, then folded in
    /// chunk order, gives the same bits as [`attend`]; and reading the rows from the cache's
    /// blocks gives the same bits as reading them from one contiguous array.
    #[test]
    fn parts_computed_apart_fold_to_the_same_bits() {
        let mut seed = 0x1234_5678u64;
        let (ctx, hd, nkv, group) = (CHUNK * 3 + 17, 256, 2, 8);
        let w = nkv * hd;
        let (kc, vc, q) = random_case(&mut seed, ctx, w, nkv * group * hd);
        let (kb, vb) = (bits(&kc), bits(&vc));
        let kv = Kv {
            k: Rows::Bf16(&kb),
            v: Rows::Bf16(&vb),
            heads: nkv,
            hd,
            len: ctx,
        };
        let heads = nkv * group;
        let mut want = vec![0.0f32; heads * hd];
        attend_stored(&q, kv, &mut want);
        // Later chunks first, each into a part left dirty by the one before.
        let ranges: Vec<_> = chunks(ctx).collect();
        let mut parts = vec![Part::new(heads, hd); ranges.len()];
        let mut dirty = Part::new(heads, hd);
        dirty.o.fill(7.0);
        dirty.m.fill(3.0);
        dirty.l.fill(-1.0);
        for (i, range) in ranges.iter().enumerate().rev() {
            attend_chunk(&q, kv, range.clone(), &mut dirty);
            parts[i] = dirty.clone();
        }
        let mut acc = parts[0].clone();
        for p in &parts[1..] {
            acc.fold(p);
        }
        let mut got = vec![0.0f32; heads * hd];
        acc.finish(&mut got);
        assert!(got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
