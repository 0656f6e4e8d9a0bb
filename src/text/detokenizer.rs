//! Incremental detokenization for streaming responses.
//!
//! A byte-level BPE token is a run of bytes, not of characters: a CJK character or an emoji is
//! often split over two or three tokens, and decoding a token alone yields U+FFFD. The stream
//! keeps a short window of ids, decodes it whole, and releases only the text that has grown past
//! what was already released and does not end in U+FFFD (an incomplete character). This is the
//! scheme of TGI and vLLM (`prefix_offset`/`read_offset`).
//!
//! For a decoder that is a pure concatenation of token bytes (Qwen's ByteLevel), the pieces
//! returned by [`DecodeStream::step`] followed by [`DecodeStream::flush`] concatenate to exactly
//! `Tokenizer::decode(all_ids)`.

use anyhow::Result;

use super::tokenizer::Tokenizer;

/// Streaming detokenizer state for one sequence. It holds no reference to the tokenizer, so it
/// can live in per-sequence engine state; pass the same tokenizer to every call.
#[derive(Debug, Clone, Default)]
pub struct DecodeStream {
    skip_special_tokens: bool,
    /// The window: ids from the start of the last released piece onwards.
    ids: Vec<u32>,
    /// `ids[..read_offset]` have been released; `ids[..prefix_offset]` is the context decoded
    /// in front of new ids so that decoders which treat the first token specially agree.
    prefix_offset: usize,
    read_offset: usize,
    /// `decode(ids[prefix_offset..read_offset])`, kept to avoid decoding it on every step.
    prefix_text: String,
}

impl DecodeStream {
    pub fn new(skip_special_tokens: bool) -> Self {
        Self {
            skip_special_tokens,
            ..Self::default()
        }
    }

    /// Adds one generated id; returns the text it completes, if any.
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if text.len() <= self.prefix_text.len() || text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let Some(piece) = text
            .strip_prefix(self.prefix_text.as_str())
            .map(str::to_owned)
        else {
            // A decoder that rewrites earlier text when more arrives: wait for more context
            // (flush releases whatever is left).
            return Ok(None);
        };
        self.advance(tokenizer)?;
        Ok(Some(piece))
    }

    /// Ends the stream: releases the held-back tail, with U+FFFD for an incomplete character,
    /// exactly as a full `decode` renders it.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        if self.read_offset == self.ids.len() {
            return Ok(None);
        }
        let text = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        let piece = match text.strip_prefix(self.prefix_text.as_str()) {
            Some(p) => p.to_owned(),
            // Not concatenative: the best available is the part past the released length.
            None => text
                .char_indices()
                .skip_while(|(i, _)| *i < self.prefix_text.len())
                .map(|(_, c)| c)
                .collect(),
        };
        self.advance(tokenizer)?;
        Ok((!piece.is_empty()).then_some(piece))
    }

    /// Ids pushed but not yet released as text.
    pub fn pending(&self) -> &[u32] {
        &self.ids[self.read_offset..]
    }

    fn advance(&mut self, tokenizer: &Tokenizer) -> Result<()> {
        // The ids just released become the context for the next ones; older ids are dropped.
        self.ids.drain(..self.read_offset);
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
        self.prefix_text = tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        Ok(())
    }
}
