//! Tokenizer, chat template and output parsers.
//!
//! - [`tokenizer`]: `tokenizer.json` → encode/decode ([`Tokenizer`]).
//! - [`detokenizer`]: streaming decode that never splits a character ([`DecodeStream`]).
//! - [`chat_template`]: messages/tools → prompt text, byte-identical to
//!   `transformers.apply_chat_template` ([`ChatTemplate`]).
//! - [`ordered_json`]: JSON that keeps object key order ([`OrderedJson`]), which the prompt
//!   depends on.

pub mod chat_template;
pub mod detokenizer;
pub mod ordered_json;
mod pyjson;
mod strftime;
pub mod tokenizer;

pub use chat_template::ChatTemplate;
pub use detokenizer::DecodeStream;
pub use ordered_json::OrderedJson;
pub use tokenizer::Tokenizer;
