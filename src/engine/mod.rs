//! Driving the model over sequences: scoring now; generation, scheduling and speculative
//! decoding build on the same batch forward.

pub mod score;
