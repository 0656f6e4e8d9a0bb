//! The OpenAI-compatible HTTP server (`qnext serve`).
