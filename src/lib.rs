//! qnext: inference for the Qwen3-Next model family on CPUs.
//!
//! The data path follows the folders: `checkpoint` (files → typed tensor views) → `model`
//! (the forward pass over a batch of sequences, on `kernels`, with per-sequence `cache`) →
//! `sampling` → CLI / server. `text` holds the tokenizer and chat template.

pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod kernels;
pub mod model;
pub mod procfs;
pub mod progress;
pub mod sampling;
#[cfg(feature = "serve")]
pub mod server;
pub mod text;
