//! Where a prompt's prefill is cut into pieces, and after which pieces its state is kept.
//!
//! A sequence's results depend on how its prompt was cut (the DeltaNet runs each piece on
//! its own, in its chunked form or token by token), so that a prompt resumed from a cached
//! prefix gives the same bits as one computed whole, every prompt is cut at the same places
//! whatever was cached: the cuts are a function of the tokens before them only. How the
//! pieces are grouped into forward steps changes nothing (`SeqCache::cut_prompt`: every
//! prompt token takes the prompt path of the products, whose rows do not depend on what
//! else is in the step), so the scheduler groups them as speed asks. There is a cut
//! - every `chunk` positions (absolute), so no chunk is longer;
//! - after every end-of-message token (`<|im_end|>`): a conversation's next request departs
//!   there after a tool result or a new user message;
//! - after every assistant header (`<|im_start|>assistant\n`): the Thinking template renders
//!   the previous answer without its reasoning, so the next request departs right there.
//!
//! A request may resume only from a state kept at a cut, which the same prefix of any later
//! prompt has too.

/// Token ids that mark the places where conversations depart from each other.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Markers {
    /// A cut follows each of these tokens (end of a message).
    pub after_token: Vec<u32>,
    /// A cut follows each of these token sequences (an assistant header).
    pub after_seq: Vec<Vec<u32>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunking {
    /// Tokens per chunk at most; chunks also end at its multiples.
    pub chunk: usize,
    pub markers: Markers,
    /// Snapshots are kept at the cuts that are multiples of this (a multiple of `chunk`).
    pub interval: usize,
}

impl Chunking {
    /// Whether a cut lies after the first `p` tokens of `tokens` (`0 < p ≤ tokens.len()`).
    pub fn is_cut(&self, tokens: &[u32], p: usize) -> bool {
        if p.is_multiple_of(self.chunk) {
            return true;
        }
        let before = &tokens[..p];
        self.markers.after_token.contains(&before[p - 1])
            || self
                .markers
                .after_seq
                .iter()
                .any(|s| !s.is_empty() && before.ends_with(s))
    }

    /// The end of the chunk that starts at `from`: the next cut, or the prompt's end.
    pub fn chunk_end(&self, tokens: &[u32], from: usize) -> usize {
        (from + 1..tokens.len())
            .find(|&p| self.is_cut(tokens, p))
            .unwrap_or(tokens.len())
    }

    /// The cuts of a prompt after which its state is kept, in order: every multiple of
    /// `interval`; the first marker (the end of a system prompt that other requests share);
    /// the last cut before the end (where the last message ends: the prompt sent again, or
    /// departing there, resumes from it); the end, if it is a cut (a longer prompt goes on
    /// from there).
    pub fn snapshot_points(&self, tokens: &[u32]) -> Vec<usize> {
        let n = tokens.len();
        let cuts: Vec<usize> = (1..=n).filter(|&p| self.is_cut(tokens, p)).collect();
        let mut points: Vec<usize> = cuts
            .iter()
            .copied()
            .filter(|p| p.is_multiple_of(self.interval))
            .collect();
        if let Some(&first) = cuts.iter().find(|p| !p.is_multiple_of(self.chunk)) {
            points.push(first);
        }
        if let Some(&last) = cuts.iter().rev().find(|&&p| p < n) {
            points.push(last);
        }
        if cuts.last() == Some(&n) {
            points.push(n);
        }
        points.sort_unstable();
        points.dedup();
        points
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const END: u32 = 2;
    const START: u32 = 1;
    const ASSISTANT: u32 = 3;
    const NL: u32 = 4;

    fn chunking() -> Chunking {
        Chunking {
            chunk: 10,
            markers: Markers {
                after_token: vec![END],
                after_seq: vec![vec![START, ASSISTANT, NL]],
            },
            interval: 20,
        }
    }

    /// `<s>system…<e>\n<s>user…<e>\n<s>assistant\n`, as a chat template lays it out.
    fn chat() -> Vec<u32> {
        let mut t = vec![START, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, END, NL];
        t.extend([START, 20, 21, 22, END, NL, START, ASSISTANT, NL]);
        t
    }

    #[test]
    fn cuts_follow_chunks_and_markers() {
        let c = chunking();
        let t = chat();
        let cuts: Vec<usize> = (1..=t.len()).filter(|&p| c.is_cut(&t, p)).collect();
        assert_eq!(cuts, vec![10, 12, 18, 20, 22]);
        let mut ends = vec![];
        let mut p = 0;
        while p < t.len() {
            p = c.chunk_end(&t, p);
            ends.push(p);
        }
        assert_eq!(ends, vec![10, 12, 18, 20, 22]);
        assert_eq!(c.snapshot_points(&t), vec![12, 20, 22]);
        // A thinking prompt ends after `<think>\n`: the header is the last cut before it.
        let mut thinking = t.clone();
        thinking.extend([30, NL]);
        assert_eq!(c.chunk_end(&thinking, 22), 24);
        assert_eq!(c.snapshot_points(&thinking), vec![12, 20, 22]);
    }

    /// A prompt's cuts within a prefix are the prefix's own: what makes a state kept for one
    /// request valid for every request that shares the prefix.
    #[test]
    fn cuts_depend_only_on_the_tokens_before_them() {
        let c = chunking();
        let t = chat();
        let mut longer = t.clone();
        longer.extend([5, 6, 7, END, NL, START, 40, 41]);
        for p in 1..=t.len() {
            assert_eq!(c.is_cut(&t, p), c.is_cut(&longer, p), "{p}");
        }
        // Without markers only the chunk multiples cut.
        let plain = Chunking {
            markers: Markers::default(),
            ..chunking()
        };
        let raw: Vec<u32> = (100..135).collect();
        assert_eq!(plain.snapshot_points(&raw), vec![20, 30]);
        assert_eq!(plain.chunk_end(&raw, 20), 30);
        assert_eq!(plain.chunk_end(&raw, 30), 35);
        assert_eq!(plain.chunk_end(&raw, 31), 35);
    }
}
