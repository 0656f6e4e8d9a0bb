//! Logits → next token.
