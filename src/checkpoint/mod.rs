//! A checkpoint folder as released: `config.json`, one `model.safetensors` or shards with
//! `model.safetensors.index.json`. Tensors are memory-mapped and handed out as typed views;
//! nothing is copied unless its dtype has to change.

mod files;
mod matrix;
pub mod quantize;
mod view;
pub mod writer;

pub use files::{Checkpoint, LoadMode};
pub use matrix::{ByteCode, Matrix, MatrixData, ZeroBits, ZeroExponent};
pub use view::{DType, Elems, TensorRef};
