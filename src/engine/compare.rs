//! What one checkpoint's predictions cost against another's on the same tokens (`qnext
//! compare`, e.g. FP8 against the BF16 it was made from): both perplexities, the KL divergence
//! of B's next-token distribution from A's, and how often their top tokens agree. The
//! statistics follow llama.cpp's `llama-perplexity --kl-divergence`: positions 0..n-1 each
//! predict the next token, KL(A ‖ B) = Σ p_A (log p_A − log p_B) in f64.

use anyhow::{bail, Result};
use std::io::{Read, Seek, SeekFrom, Write};

use crate::kernels::activation::log_softmax;
use crate::model::{Model, SeqInput, Want};

/// One predicted position.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Position {
    /// −log p(next token), under A and under B.
    pub nll_a: f64,
    pub nll_b: f64,
    /// KL(A ‖ B) of the whole next-token distribution.
    pub kl: f64,
    /// The most likely next token under A and under B.
    pub top_a: u32,
    pub top_b: u32,
}

/// Compares two rows of log-probabilities predicting `next`.
pub fn position(lp_a: &[f32], lp_b: &[f32], next: u32) -> Position {
    let mut kl = 0f64;
    let (mut top_a, mut top_b) = (0usize, 0usize);
    for (i, (&a, &b)) in lp_a.iter().zip(lp_b).enumerate() {
        if a > f32::NEG_INFINITY {
            kl += (a as f64).exp() * (a as f64 - b as f64);
        }
        if a > lp_a[top_a] {
            top_a = i;
        }
        if b > lp_b[top_b] {
            top_b = i;
        }
    }
    Position {
        nll_a: -(lp_a[next as usize] as f64),
        nll_b: -(lp_b[next as usize] as f64),
        // Rounding can make a KL of (nearly) identical distributions a hair negative.
        kl: kl.max(0.0),
        top_a: top_a as u32,
        top_b: top_b as u32,
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub positions: usize,
    pub perplexity_a: f64,
    pub perplexity_b: f64,
    pub kl_mean: f64,
    /// Nearest-rank percentiles of the per-position KL.
    pub kl_median: f64,
    pub kl_p99: f64,
    pub kl_max: f64,
    /// Share of positions whose most likely token is the same under both.
    pub top1_agreement: f64,
}

pub fn summarize(ps: &[Position]) -> Summary {
    let n = ps.len().max(1) as f64;
    let mut kls: Vec<f64> = ps.iter().map(|p| p.kl).collect();
    kls.sort_by(f64::total_cmp);
    let rank = |q: f64| {
        if kls.is_empty() {
            0.0
        } else {
            kls[((q * kls.len() as f64).ceil() as usize).clamp(1, kls.len()) - 1]
        }
    };
    Summary {
        positions: ps.len(),
        perplexity_a: (ps.iter().map(|p| p.nll_a).sum::<f64>() / n).exp(),
        perplexity_b: (ps.iter().map(|p| p.nll_b).sum::<f64>() / n).exp(),
        kl_mean: kls.iter().sum::<f64>() / n,
        kl_median: rank(0.5),
        kl_p99: rank(0.99),
        kl_max: kls.last().copied().unwrap_or(0.0),
        top1_agreement: ps.iter().filter(|p| p.top_a == p.top_b).count() as f64 / n,
    }
}

/// A model reading `ids` chunk by chunk, handing out log-probabilities of the positions that
/// predict a token (all but the last).
struct Reader<'m> {
    model: &'m Model,
    cache: crate::cache::SeqCache,
    pos: usize,
}

impl<'m> Reader<'m> {
    fn new(model: &'m Model, len: usize) -> Reader<'m> {
        Reader {
            model,
            cache: model.new_cache(len),
            pos: 0,
        }
    }

    /// The log-probabilities `[rows, vocab]` of the next `chunk` positions of `ids`.
    fn next_chunk(&mut self, ids: &[u32], chunk: usize) -> Result<Vec<f32>> {
        let end = (self.pos + chunk).min(ids.len() - 1);
        let vocab = self.model.cfg.vocab_size;
        let out = self.model.forward(&mut [SeqInput {
            tokens: &ids[self.pos..end],
            cache: &mut self.cache,
            want: Want::All,
        }])?;
        let mut lp = vec![0f32; (end - self.pos) * vocab];
        for (row, o) in out[0].logits.chunks(vocab).zip(lp.chunks_mut(vocab)) {
            log_softmax(row, o);
        }
        self.pos = end;
        Ok(lp)
    }

    fn done(&self, ids: &[u32]) -> bool {
        self.pos + 1 >= ids.len()
    }
}

fn check_pair(a: &Model, b: &Model, ids: &[u32]) -> Result<()> {
    if a.cfg.vocab_size != b.cfg.vocab_size {
        bail!(
            "the models' vocabularies differ ({} and {} entries): their predictions cannot be compared",
            a.cfg.vocab_size,
            b.cfg.vocab_size
        );
    }
    if ids.len() < 2 {
        bail!("need at least 2 tokens to compare, got {}", ids.len());
    }
    for m in [a, b] {
        if ids.len() > m.cfg.context_length() {
            bail!(
                "{} tokens exceed a model's context length {}",
                ids.len(),
                m.cfg.context_length()
            );
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= m.cfg.vocab_size) {
            bail!(
                "token id {bad} is outside the vocabulary ({} entries)",
                m.cfg.vocab_size
            );
        }
    }
    Ok(())
}

/// Both models in one pass, `chunk` positions at a time; `progress(done)` after each chunk.
pub fn together(
    a: &Model,
    b: &Model,
    ids: &[u32],
    chunk: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Position>> {
    check_pair(a, b, ids)?;
    let vocab = a.cfg.vocab_size;
    let (mut ra, mut rb) = (Reader::new(a, ids.len()), Reader::new(b, ids.len()));
    let mut out = Vec::with_capacity(ids.len() - 1);
    while !ra.done(ids) {
        let start = ra.pos;
        let (la, lb) = (ra.next_chunk(ids, chunk)?, rb.next_chunk(ids, chunk)?);
        for (i, (pa, pb)) in la.chunks(vocab).zip(lb.chunks(vocab)).enumerate() {
            out.push(position(pa, pb, ids[start + i + 1]));
        }
        progress(ra.pos);
    }
    Ok(out)
}

/// The first half of a comparison that cannot hold both models at once: A's log-probabilities
/// of every predicting position, written to `spill` (f32, `vocab` per position).
pub fn first_pass(
    a: &Model,
    ids: &[u32],
    chunk: usize,
    spill: &mut (impl Write + Seek),
    mut progress: impl FnMut(usize),
) -> Result<()> {
    let mut ra = Reader::new(a, ids.len());
    spill.seek(SeekFrom::Start(0))?;
    while !ra.done(ids) {
        let lp = ra.next_chunk(ids, chunk)?;
        spill.write_all(bytemuck::cast_slice(&lp))?;
        progress(ra.pos);
    }
    spill.flush()?;
    Ok(())
}

/// The second half: B against A's log-probabilities read back from `spill`.
pub fn second_pass(
    a_vocab: usize,
    b: &Model,
    ids: &[u32],
    chunk: usize,
    spill: &mut (impl Read + Seek),
    mut progress: impl FnMut(usize),
) -> Result<Vec<Position>> {
    if a_vocab != b.cfg.vocab_size {
        bail!(
            "the models' vocabularies differ ({a_vocab} and {} entries): their predictions cannot be compared",
            b.cfg.vocab_size
        );
    }
    let mut rb = Reader::new(b, ids.len());
    spill.seek(SeekFrom::Start(0))?;
    let mut out = Vec::with_capacity(ids.len() - 1);
    while !rb.done(ids) {
        let start = rb.pos;
        let lb = rb.next_chunk(ids, chunk)?;
        let mut la = vec![0f32; lb.len()];
        spill.read_exact(bytemuck::cast_slice_mut(&mut la))?;
        for (i, (pa, pb)) in la.chunks(a_vocab).zip(lb.chunks(a_vocab)).enumerate() {
            out.push(position(pa, pb, ids[start + i + 1]));
        }
        progress(rb.pos);
    }
    Ok(out)
}

/// [`check_pair`] for the one-at-a-time path, before anything is computed.
pub fn check_tokens(m: &Model, ids: &[u32]) -> Result<()> {
    check_pair(m, m, ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsm(x: &[f32]) -> Vec<f32> {
        let mut o = vec![0.0; x.len()];
        log_softmax(x, &mut o);
        o
    }

    #[test]
    fn kl_of_known_distributions() {
        // p = (1/2, 1/4, 1/4), q = uniform: KL = Σ p ln(3p) = ln 3 − 1.5 ln 2.
        let p = [0.5f32.ln(), 0.25f32.ln(), 0.25f32.ln()];
        let q = lsm(&[0.0, 0.0, 0.0]);
        let r = position(&p, &q, 1);
        assert!(
            (r.kl - (3f64.ln() - 1.5 * 2f64.ln())).abs() < 1e-6,
            "{}",
            r.kl
        );
        assert!((r.nll_a - 4f64.ln()).abs() < 1e-6);
        assert!((r.nll_b - 3f64.ln()).abs() < 1e-6);
        assert_eq!((r.top_a, r.top_b), (0, 0));
        assert_eq!(position(&p, &p, 0).kl, 0.0);
        // A token A rules out (p = 0) adds nothing, whatever B says of it.
        let a = [0f32, f32::NEG_INFINITY];
        let b = lsm(&[1.0, 1.0]);
        assert!((position(&a, &b, 0).kl - 2f64.ln()).abs() < 1e-6);
    }

    #[test]
    fn summary_statistics() {
        let ps: Vec<Position> = (0..200)
            .map(|i| Position {
                nll_a: 1.0,
                nll_b: 2.0,
                kl: i as f64,
                top_a: 1,
                top_b: if i < 150 { 1 } else { 2 },
            })
            .collect();
        let s = summarize(&ps);
        assert_eq!(s.positions, 200);
        assert!((s.perplexity_a - 1f64.exp()).abs() < 1e-12);
        assert!((s.perplexity_b - 2f64.exp()).abs() < 1e-12);
        assert_eq!(s.kl_mean, 99.5);
        assert_eq!(s.kl_median, 99.0);
        assert_eq!(s.kl_p99, 197.0);
        assert_eq!(s.kl_max, 199.0);
        assert_eq!(s.top1_agreement, 0.75);
    }
}
