//! Softmax attention of a group of query heads over one KV head of the cache: the inner loop
//! of decode at long contexts, where it reads the whole cache for every token.
//!
//! Every cached key and value row is read once for the whole group (GQA: 8 query heads per KV
//! head in Qwen3-Next). Scores are f32 dot products, softmax uses the vectorised `exp`, and
//! the weighted sum of values runs over blocks of positions that stay in cache.

use multiversion::multiversion;

use super::activation::softmax;
use super::matmul::axpy;

/// Cached key or value rows as stored: f32 (`--exact`) or bfloat16 (the fast path, half the
/// bytes that decode at long contexts reads per token).
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl<'a> Rows<'a> {
    pub fn len(&self) -> usize {
        match self {
            Rows::F32(d) => d.len(),
            Rows::Bf16(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values `start..start + n` as f32: borrowed, or widened into `buf`.
    fn get<'s>(&self, start: usize, n: usize, buf: &'s mut [f32]) -> &'s [f32]
    where
        'a: 's,
    {
        match *self {
            Rows::F32(d) => &d[start..start + n],
            Rows::Bf16(d) => {
                for (o, &b) in buf[..n].iter_mut().zip(&d[start..start + n]) {
                    *o = f32::from_bits((b as u32) << 16);
                }
                &buf[..n]
            }
        }
    }
}

/// One KV head of a sequence's cache as the kernels read it: positions `0..len` of the key and
/// value rows (`stride` values each), this head's `hd` columns starting at `off`.
#[derive(Clone, Copy)]
pub struct KvHead<'a> {
    pub k: Rows<'a>,
    pub v: Rows<'a>,
    pub len: usize,
    pub stride: usize,
    pub off: usize,
}

/// Causal softmax attention of the query heads `q` (`[group, hd]`) over one KV head, into
/// `out` (`[group, hd]`).
pub fn attend_group(q: &[f32], kv: KvHead, hd: usize, out: &mut [f32]) {
    let (kc, vc, ctx, kvw, off) = (kv.k, kv.v, kv.len, kv.stride, kv.off);
    let group = q.len() / hd;
    assert!(q.len() == group * hd && out.len() == group * hd && off + hd <= kvw);
    assert!(kc.len() >= ctx * kvw && vc.len() >= ctx * kvw);
    #[cfg(target_arch = "x86_64")]
    if super::isa::isa() == super::isa::Isa::Avx512 && hd.is_multiple_of(32) {
        use super::x86::attention::attend;
        macro_rules! go {
            ($g:literal) => {
                // SAFETY: AVX-512 F verified by `isa()`; shapes checked above.
                unsafe {
                    match (kv.k, kv.v) {
                        (Rows::F32(k), Rows::F32(v)) => attend::<$g, f32>(q, k, v, kv, hd, out),
                        (Rows::Bf16(k), Rows::Bf16(v)) => attend::<$g, u16>(q, k, v, kv, hd, out),
                        _ => attend_portable(q, kv, hd, out),
                    }
                }
            };
        }
        match group {
            8 => return go!(8),
            4 => return go!(4),
            2 => return go!(2),
            1 => return go!(1),
            _ => {}
        }
    }
    attend_portable(q, kv, hd, out);
}

/// The portable form: 16-lane chains the compiler vectorises.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn attend_portable(q: &[f32], kv: KvHead, hd: usize, out: &mut [f32]) {
    let (kc, vc, ctx, kvw, off) = (kv.k, kv.v, kv.len, kv.stride, kv.off);
    const L: usize = 16;
    let group = q.len() / hd;
    let scale = 1.0 / (hd as f32).sqrt();
    // scores[h · ctx + j]
    let mut scores = vec![0.0f32; group * ctx];
    let lanes = hd / L * L;
    let mut kbuf = vec![0.0f32; hd];
    for j in 0..ctx {
        let kj = kc.get(j * kvw + off, hd, &mut kbuf);
        for h0 in (0..group).step_by(4) {
            let hn = (group - h0).min(4);
            let mut acc = [[0.0f32; L]; 4];
            for c in (0..lanes).step_by(L) {
                let kv: &[f32; L] = kj[c..c + L].try_into().unwrap();
                for (hh, a) in acc.iter_mut().enumerate().take(hn) {
                    let qh = &q[(h0 + hh) * hd + c..(h0 + hh) * hd + c + L];
                    for l in 0..L {
                        a[l] += qh[l] * kv[l];
                    }
                }
            }
            for (hh, a) in acc.iter().enumerate().take(hn) {
                let h = h0 + hh;
                let mut s: f32 = a.iter().sum();
                for c in lanes..hd {
                    s += q[h * hd + c] * kj[c];
                }
                scores[h * ctx + j] = s * scale;
            }
        }
    }
    for h in 0..group {
        softmax(&mut scores[h * ctx..(h + 1) * ctx]);
    }
    // Blocks of positions, so that a block of values stays in cache while every column block
    // of every head's output passes over it.
    const JB: usize = 64;
    out.fill(0.0);
    for j0 in (0..ctx).step_by(JB) {
        let j1 = (j0 + JB).min(ctx);
        for h in 0..group {
            let oh = &mut out[h * hd..(h + 1) * hd];
            let sh = &scores[h * ctx..(h + 1) * ctx];
            for (j, &p) in sh.iter().enumerate().take(j1).skip(j0) {
                axpy(oh, p, vc.get(j * kvw + off, hd, &mut kbuf));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// The dispatched kernel (AVX-512 where present) against the portable one, at the model's
    /// shape (8 query heads of 256 per KV head) and small ones, reading the second KV head of
    /// the rows. Both are f32 with different summation orders: outputs are convex
    /// combinations of values below 1 in magnitude, so 1e-5 absolute is ~100× the rounding
    /// differences expected and far below what a wrong row, head or position would cause.
    #[test]
    fn dispatched_kernel_matches_portable() {
        let mut seed = 0x2545_F491u64;
        let mut rnd = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        for (ctx, hd, group) in [
            (1, 256, 8),
            (67, 256, 8),
            (130, 64, 4),
            (5, 32, 2),
            (9, 32, 1),
        ] {
            let kvw = 2 * hd;
            let kc: Vec<f32> = (0..ctx * kvw).map(|_| rnd()).collect();
            let vc: Vec<f32> = (0..ctx * kvw).map(|_| rnd()).collect();
            let q: Vec<f32> = (0..group * hd).map(|_| rnd()).collect();
            // The same rows stored as bfloat16, and those values widened back to f32: each
            // stored form must give what f32 rows of the same values give.
            let bits = |x: &[f32]| -> Vec<u16> {
                x.iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect()
            };
            let (kb, vb) = (bits(&kc), bits(&vc));
            let wide = |b: &[u16]| -> Vec<f32> {
                b.iter()
                    .map(|&v| f32::from_bits((v as u32) << 16))
                    .collect()
            };
            let (kw, vw) = (wide(&kb), wide(&vb));
            let head = |k, v| super::KvHead {
                k,
                v,
                len: ctx,
                stride: kvw,
                off: hd,
            };
            use super::Rows;
            for (stored, as_f32) in [
                (
                    head(Rows::F32(&kc), Rows::F32(&vc)),
                    head(Rows::F32(&kc), Rows::F32(&vc)),
                ),
                (
                    head(Rows::Bf16(&kb), Rows::Bf16(&vb)),
                    head(Rows::F32(&kw), Rows::F32(&vw)),
                ),
            ] {
                let mut got = vec![0.0f32; group * hd];
                let mut want = vec![0.0f32; group * hd];
                super::attend_group(&q, stored, hd, &mut got);
                super::attend_portable(&q, as_f32, hd, &mut want);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5,
                        "ctx {ctx} hd {hd} group {group}: [{i}] {a} vs {b}"
                    );
                }
            }
        }
    }
}
