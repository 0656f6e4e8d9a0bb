//! Log-probabilities of a whole sequence, fed in any of the ways a server feeds tokens: all
//! at once, one at a time, or in chunks. All three must agree (the cache carries the state).

use anyhow::Result;
use std::str::FromStr;

use crate::kernels::activation::log_softmax;
use crate::model::{Model, SeqInput, Want};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    All,
    Single,
    Chunks(usize),
}

impl FromStr for Feed {
    type Err = String;
    fn from_str(s: &str) -> Result<Feed, String> {
        match s {
            "all" => Ok(Feed::All),
            "single" => Ok(Feed::Single),
            _ => match s.strip_prefix("chunks:").map(str::parse::<usize>) {
                Some(Ok(n)) if n > 0 => Ok(Feed::Chunks(n)),
                _ => Err(format!(
                    "expected all, single or chunks:N with N ≥ 1, found {s:?}"
                )),
            },
        }
    }
}

impl Feed {
    fn chunk_len(self, total: usize) -> usize {
        match self {
            Feed::All => total.max(1),
            Feed::Single => 1,
            Feed::Chunks(n) => n,
        }
    }
}

/// `log_softmax` of the logits at every position: `[ids.len(), vocab]`.
pub fn all_logprobs(model: &Model, ids: &[u32], feed: Feed) -> Result<Vec<f32>> {
    let vocab = model.cfg.vocab_size;
    let mut cache = model.new_cache(ids.len());
    let mut out = vec![0.0f32; ids.len() * vocab];
    let mut pos = 0;
    for chunk in ids.chunks(feed.chunk_len(ids.len())) {
        let res = model.forward(&mut [SeqInput {
            tokens: chunk,
            cache: &mut cache,
            want: Want::All,
        }])?;
        for (i, row) in res[0].logits.chunks(vocab).enumerate() {
            let p = pos + i;
            log_softmax(row, &mut out[p * vocab..(p + 1) * vocab]);
        }
        pos += chunk.len();
    }
    Ok(out)
}

/// Log-probability of tokens 1..n, each given its prefix.
pub fn next_token_logprobs(model: &Model, ids: &[u32], feed: Feed) -> Result<Vec<f32>> {
    let vocab = model.cfg.vocab_size;
    let lp = all_logprobs(model, ids, feed)?;
    Ok((1..ids.len())
        .map(|i| lp[(i - 1) * vocab + ids[i] as usize])
        .collect())
}
