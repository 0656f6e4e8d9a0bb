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
pub mod qwen3_coder;
pub mod reasoning;
mod strftime;
pub mod tokenizer;
pub mod tool_calls;

pub use chat_template::{ChatTemplate, RenderLimits};
pub use detokenizer::DecodeStream;
pub use ordered_json::OrderedJson;
pub use qwen3_coder::ToolSchemas;
pub use reasoning::{
    parse_reasoning, parse_reasoning_with, ReasoningDelta, ReasoningRule, ReasoningStream,
};
pub use tokenizer::Tokenizer;
pub use tool_calls::{
    finish_reason, parse_output, parse_tool_calls, parse_tool_calls_as, OutputDelta, OutputParsers,
    OutputStream, ParsedOutput, ToolCall, ToolCallDelta, ToolCallIds, ToolCallStream, ToolFormat,
    ToolStreamDelta,
};
