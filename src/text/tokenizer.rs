//! The checkpoint's `tokenizer.json` (Hugging Face `tokenizers`), behind a small API whose errors
//! are `anyhow` and name the file or the offending ids.
//!
//! Qwen's vocabulary is byte-level BPE with added tokens (`<|im_start|>`, `<think>`, …) that are
//! matched as whole tokens wherever they occur in the text, whatever `add_special_tokens` says:
//! that flag only controls the post-processor (Qwen has none, and no BOS).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};

/// A loaded tokenizer. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// Parses a `tokenizer.json` held in memory; `origin` names it in errors.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| anyhow!("cannot load tokenizer {origin}: {e}"))?;
        Ok(Self {
            inner,
            path: PathBuf::from(origin),
        })
    }

    /// Where the tokenizer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Text → ids. Added tokens written in the text (`<|im_start|>`) become their single ids.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("tokenizer {}: cannot encode: {e}", self.path.display()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids → text. Invalid UTF-8 produced by a byte-level token sequence becomes U+FFFD, and
    /// ids outside the vocabulary (the model's padding rows, 151,669..151,936 for Qwen) decode to
    /// nothing, both as in Hugging Face: a stray id must not end a stream. Check ids with
    /// [`Tokenizer::id_to_token`] where that matters.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("tokenizer {}: cannot decode: {e}", self.path.display()))
    }

    /// Number of ids the tokenizer knows, added tokens included (151,669 for Qwen). The model's
    /// embedding/lm_head may be larger (151,936): the extra rows are padding and never decode.
    /// The most UTF-8 bytes of text one token can stand for, bounded from above (a byte-level
    /// token's text is its bytes as printable characters, of up to 2 UTF-8 bytes each): so a
    /// text of more than `n × max_token_bytes()` bytes never fits in `n` tokens.
    pub fn max_token_bytes(&self) -> usize {
        self.inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(4)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string (vocabulary entry or added token), e.g. `"<|im_end|>"`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id (byte-level form for BPE entries, e.g. `"Ġthe"`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The wrapped `tokenizers` object, for what this API does not cover.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
