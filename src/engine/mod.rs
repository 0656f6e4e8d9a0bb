//! Driving the model over sequences: scoring, and continuous batching for generation.

pub mod chunking;
pub mod compare;
pub mod scheduler;
pub mod score;
pub mod speculative;
pub mod stats;

pub use scheduler::{Engine, EngineConfig, Event, FinishReason, GenRequest, RequestId};
