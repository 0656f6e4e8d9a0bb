//! The `hermes` tool-call parser: finds `<tool_call>{"name": …, "arguments": …}</tool_call>`
//! blocks in the model's output, as vLLM does for Qwen3-Next (`--tool-call-parser hermes`).
//!
//! Behaviour taken from vLLM `vllm/tool_parsers/hermes_tool_parser.py` (newest; the older
//! `vllm/entrypoints/openai/tool_parsers/hermes_tool_parser.py` is the same except for step 4),
//! `Hermes2ProToolParser.extract_tool_calls`:
//!
//! 1. No `<tool_call>` in the text: no calls, the whole text is content.
//! 2. Blocks are `re.findall(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", DOTALL)`: from each
//!    `<tool_call>` to the *first* following `</tool_call>`, or to the end of the text when none
//!    follows (output cut off, or stopped at `<|im_end|>` before the closing tag).
//! 3. Each block is `json.loads`-ed as it is. There is no explicit strip, but `json.loads` skips
//!    JSON whitespace (space, tab, CR, LF) on both sides, and so does `serde_json`; any other
//!    character outside the value is an error.
//! 4. `fc["arguments"]`, when a string, is itself `json.loads`-ed (newest vLLM only; older
//!    versions re-encoded the string as a JSON string).
//! 5. Each call becomes `ToolCall(function=FunctionCall(name=fc["name"],
//!    arguments=json.dumps(fc["arguments"], ensure_ascii=False)))`: `arguments` is re-serialised
//!    with Python's default separators `", "` and `": "`, key order kept, non-ASCII unescaped.
//!    `name` must be a string (pydantic `str` does not coerce numbers or null).
//! 6. Content is the text before the first `<tool_call>`, not stripped, `None` when empty. Text
//!    between and after blocks is dropped.
//! 7. If *anything* in 3–5 fails for *any* block (bad JSON, not an object, no `name` or
//!    `arguments` key, non-string `name`, bad string arguments), the whole call is an
//!    `except Exception`: no tool calls and the *whole* text is content.
//!
//! Consequences worth knowing: a literal `</tool_call>` inside a JSON string value ends the block
//! there (the regex is lazy and knows nothing of JSON), so the block fails to parse and the whole
//! output becomes content; with the Qwen tokenizer that text is the added token 151658 anyway. A
//! `<tool_call>` inside a block is part of that block's text.
//!
//! Known differences from Python's `json`, all in inputs a model does not produce: integers
//! beyond 64 bits become floats (`serde_json` without `arbitrary_precision`), the integer `-0`
//! prints as `-0.0` (Python: `0`; `serde_json` reads it as a float), and `NaN`,
//! `Infinity`, numbers overflowing to infinity, lone surrogate escapes and nesting deeper than 128
//! are rejected (the block then counts as malformed) where Python accepts them.
//!
//! Ids: vLLM's `make_tool_call_id()` gives `chatcmpl-tool-` + 32 hex digits of a UUID4. This
//! crate uses OpenAI's form, `call_` + 24 ASCII letters and digits ([`ToolCallIds`]); clients
//! treat ids as opaque.
//!
//! With the Thinking model, tool calls are parsed from the content part that
//! [`parse_reasoning`] leaves, never from the reasoning (vLLM runs the tool parser on
//! `content or ""`): see [`parse_output`] and [`OutputStream`], which chain the two parsers.

use std::collections::hash_map::RandomState;
use std::fmt::Write;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::Arc;

use super::ordered_json::OrderedJson;
use super::pyjson::float_repr;
use super::qwen3_coder::{self, ToolSchemas};
use super::reasoning::{parse_reasoning_with, ReasoningRule, ReasoningStream};

/// Opens a tool-call block (added token 151657, not special).
pub const TOOL_CALL_START: &str = "<tool_call>";
/// Closes a tool-call block (added token 151658, not special).
pub const TOOL_CALL_END: &str = "</tool_call>";

/// One parsed call, in the shape of an OpenAI `tool_calls[]` entry of `type: "function"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// JSON text: Python's `json.dumps(arguments, ensure_ascii=False)`.
    pub arguments: String,
}

/// Source of tool-call ids, `call_` + 24 characters from `[A-Za-z0-9]`.
///
/// Not cryptographic: ids only need to be distinct within a conversation. [`from_seed`]
/// gives a fixed sequence, for tests and for making a streamed and a non-streamed parse of the
/// same output agree.
///
/// [`from_seed`]: Self::from_seed
#[derive(Debug, Clone)]
pub struct ToolCallIds {
    state: u64,
}

impl ToolCallIds {
    const LEN: usize = 24;
    const ALPHABET: &'static [u8] =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

    /// Seeded from the process's hash randomness, the clock and a counter, so that generators made
    /// at the same instant still differ.
    pub fn new() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut h = RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(t.as_nanos());
        }
        Self::from_seed(h.finish())
    }

    pub fn from_seed(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_id(&mut self) -> String {
        let mut id = String::with_capacity(5 + Self::LEN);
        id.push_str("call_");
        for _ in 0..Self::LEN {
            // The modulo bias over 2^64 is far below anything observable.
            let i = (self.next_u64() % Self::ALPHABET.len() as u64) as usize;
            id.push(char::from(Self::ALPHABET[i]));
        }
        id
    }

    /// SplitMix64: tiny, and every seed (including 0) gives a full-period sequence.
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl Default for ToolCallIds {
    fn default() -> Self {
        Self::new()
    }
}

/// Extracts tool calls from a complete output exactly as vLLM's hermes parser does (see the
/// module docs): `(content, calls)`. With no calls, the content is the whole text (`None` when
/// empty); with calls, it is the text before the first `<tool_call>` (`None` when empty). Ids are
/// drawn from `ids` in call order.
pub fn parse_tool_calls(text: &str, ids: &mut ToolCallIds) -> (Option<String>, Vec<ToolCall>) {
    parse_tool_calls_as(text, &ToolFormat::Hermes, ids)
}

/// Which model output format [`parse_tool_calls_as`] and [`ToolCallStream`] read.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolFormat {
    /// `<tool_call>{"name": …, "arguments": …}</tool_call>` (Qwen3-Next; vLLM `hermes`).
    Hermes,
    /// `<tool_call><function=…><parameter=…>…` typed by the request's tools (Qwen3.5 / 3.6;
    /// vLLM `qwen3_coder`, see [`super::qwen3_coder`]).
    Qwen3Coder(Arc<ToolSchemas>),
}

impl ToolFormat {
    /// One block's calls, or `None` where the whole output becomes content.
    fn parse_block(&self, block: &str, terminated: bool) -> Option<Vec<(String, String)>> {
        match self {
            ToolFormat::Hermes => parse_block(block).map(|c| vec![c]),
            ToolFormat::Qwen3Coder(schemas) => qwen3_coder::parse_block(block, terminated, schemas),
        }
    }

    /// Content that is only whitespace becomes `None` when tools were called (vLLM's serving
    /// layer, checked for `qwen3_coder`; Qwen3.5 writes `</think>\n\n<tool_call>`, so that is
    /// the usual case). The hermes path keeps its parser's content as it was specified.
    fn drops_blank_content(&self) -> bool {
        matches!(self, ToolFormat::Qwen3Coder(_))
    }
}

/// [`parse_tool_calls`] for the output format `format`.
pub fn parse_tool_calls_as(
    text: &str,
    format: &ToolFormat,
    ids: &mut ToolCallIds,
) -> (Option<String>, Vec<ToolCall>) {
    let whole = || (!text.is_empty()).then(|| text.to_owned());
    let Some(first) = text.find(TOOL_CALL_START) else {
        return (whole(), Vec::new());
    };
    let mut parsed = Vec::new();
    for (block, terminated) in blocks(text) {
        match format.parse_block(block, terminated) {
            Some(calls) => parsed.extend(calls),
            None => return (whole(), Vec::new()),
        }
    }
    if parsed.is_empty() {
        return (whole(), Vec::new());
    }
    let calls = parsed
        .into_iter()
        .map(|(name, arguments)| ToolCall {
            id: ids.next_id(),
            name,
            arguments,
        })
        .collect();
    let content = &text[..first];
    let blank = content.is_empty() || (format.drops_blank_content() && content.trim().is_empty());
    ((!blank).then(|| content.to_owned()), calls)
}

/// The inner texts the block regex captures, in order, each with whether its `</tool_call>`
/// came.
fn blocks(text: &str) -> Vec<(&str, bool)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(s) = text[pos..].find(TOOL_CALL_START) {
        let inner = pos + s + TOOL_CALL_START.len();
        match text[inner..].find(TOOL_CALL_END) {
            Some(e) => {
                out.push((&text[inner..inner + e], true));
                pos = inner + e + TOOL_CALL_END.len();
            }
            None => {
                out.push((&text[inner..], false));
                break;
            }
        }
    }
    out
}

/// One block's `(name, arguments JSON text)`, or `None` where vLLM's parse would raise.
fn parse_block(inner: &str) -> Option<(String, String)> {
    let call = OrderedJson::parse(inner).ok()?;
    if !matches!(call, OrderedJson::Object(_)) {
        return None;
    }
    let arguments = call.get("arguments")?;
    let name = call.get("name")?.as_str()?;
    let arguments = match arguments.as_str() {
        Some(text) => OrderedJson::parse(text).ok()?,
        None => arguments.clone(),
    };
    let mut json = String::new();
    write_py_json(&mut json, &arguments);
    Some((name.to_owned(), json))
}

/// Python's `json.dumps(value, ensure_ascii=False)` with its default separators.
pub(super) fn write_py_json(out: &mut String, value: &OrderedJson) {
    match value {
        OrderedJson::Null => out.push_str("null"),
        OrderedJson::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        OrderedJson::Int(i) => {
            let _ = write!(out, "{i}");
        }
        OrderedJson::UInt(u) => {
            let _ = write!(out, "{u}");
        }
        OrderedJson::Float(f) if f.is_nan() => out.push_str("NaN"),
        OrderedJson::Float(f) if f.is_infinite() => {
            out.push_str(if *f > 0.0 { "Infinity" } else { "-Infinity" })
        }
        OrderedJson::Float(f) => out.push_str(&float_repr(*f)),
        OrderedJson::String(s) => write_py_string(out, s),
        OrderedJson::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_py_json(out, item);
            }
            out.push(']');
        }
        OrderedJson::Object(entries) => {
            out.push('{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_py_string(out, key);
                out.push_str(": ");
                write_py_json(out, item);
            }
            out.push('}');
        }
    }
}

/// Python's `py_encode_basestring`: only `"`, `\` and C0 controls are escaped.
fn write_py_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// One entry of an OpenAI streaming `delta.tool_calls`. The first entry for a call carries `id`,
/// `call_type` (`"function"`) and `name`; later ones carry `arguments` fragments. Each entry is
/// meant to go out as its own chunk, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCallDelta {
    pub index: usize,
    pub id: Option<String>,
    pub call_type: Option<&'static str>,
    pub name: Option<String>,
    pub arguments: Option<String>,
}

/// What one call to [`ToolCallStream::push`] or [`ToolCallStream::finish`] releases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolStreamDelta {
    /// `None` rather than empty.
    pub content: Option<String>,
    pub tool_calls: Vec<ToolCallDelta>,
}

impl ToolStreamDelta {
    pub fn is_empty(&self) -> bool {
        self.content.is_none() && self.tool_calls.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ToolState {
    /// Before the first `<tool_call>`: text is content.
    Text,
    /// Inside a block: buffered until `</tool_call>` or the end.
    Block,
    /// After a well-formed block: text outside blocks is dropped, as the non-streaming parser
    /// drops it.
    Between,
    /// A block failed to parse: from its `<tool_call>` on, everything is content.
    Raw,
}

/// Incremental [`parse_tool_calls`]: feed it text pieces in order, then call
/// [`finish`](Self::finish) once.
///
/// Content before the first `<tool_call>` streams as it comes (holding back only what could be
/// the start of the tag). Each block is buffered until `</tool_call>` (or the end of the output,
/// for an unterminated last block), then parsed: a well-formed block yields a header delta (id,
/// type, name) and one `arguments` fragment equal to the non-streamed `arguments`; a malformed one
/// is released, tags and all, as content, together with everything after it. vLLM's own streaming
/// path instead forwards the model's raw argument text piecewise (so its fragments need not
/// concatenate to its non-streamed `arguments`), drops malformed blocks and streams text after
/// blocks as content; this stream follows the non-streaming rules so that the two agree.
///
/// The streamed content and calls equal [`parse_tool_calls`]'s result for the same text and id
/// seed, except when a malformed block follows a well-formed one: the non-streaming rule then
/// turns the *whole* text into content, but the earlier calls have already been sent; the stream
/// sends the malformed block and the rest as content.
#[derive(Debug, Clone)]
pub struct ToolCallStream {
    ids: ToolCallIds,
    format: ToolFormat,
    state: ToolState,
    /// Text: leading content that is only whitespace, held while a call may still follow
    /// (formats whose content then becomes `None`, [`ToolFormat::drops_blank_content`]).
    blank: String,
    /// Text: some content has been released.
    released: bool,
    /// Text: a possible partial `<tool_call>`. Block: the block's text so far. Between: a possible
    /// partial `<tool_call>`.
    pending: String,
    /// Block: how much of `pending` has been searched for `</tool_call>`.
    scanned: usize,
    calls: usize,
}

impl ToolCallStream {
    pub fn new(ids: ToolCallIds) -> Self {
        Self::with_format(ToolFormat::Hermes, ids)
    }

    /// A stream of `format`'s calls.
    pub fn with_format(format: ToolFormat, ids: ToolCallIds) -> Self {
        Self {
            ids,
            format,
            blank: String::new(),
            released: false,
            state: ToolState::Text,
            pending: String::new(),
            scanned: 0,
            calls: 0,
        }
    }

    /// Whether any tool call has been emitted (the response's finish reason is then
    /// `"tool_calls"`; see [`finish_reason`]).
    pub fn tools_called(&self) -> bool {
        self.calls > 0
    }

    /// Adds the next piece of text; returns what it lets through.
    pub fn push(&mut self, delta: &str) -> ToolStreamDelta {
        let mut out = Out::default();
        self.pending.push_str(delta);
        loop {
            match self.state {
                ToolState::Raw => {
                    out.content.push_str(&self.pending);
                    self.pending.clear();
                    break;
                }
                ToolState::Text | ToolState::Between => {
                    let text = self.state == ToolState::Text;
                    if let Some(s) = self.pending.find(TOOL_CALL_START) {
                        if text {
                            let before = self.pending[..s].to_owned();
                            self.release(&before, &mut out);
                        }
                        self.pending.drain(..s + TOOL_CALL_START.len());
                        self.state = ToolState::Block;
                        self.scanned = 0;
                        continue;
                    }
                    let cut =
                        self.pending.len() - partial_suffix_len(&self.pending, TOOL_CALL_START);
                    if text {
                        let ready = self.pending[..cut].to_owned();
                        self.release(&ready, &mut out);
                    }
                    self.pending.drain(..cut);
                    break;
                }
                ToolState::Block => {
                    let from = self.scanned.saturating_sub(TOOL_CALL_END.len() - 1);
                    let Some(e) = find_from(&self.pending, TOOL_CALL_END, from) else {
                        self.scanned = self.pending.len();
                        break;
                    };
                    let rest = self.pending.split_off(e + TOOL_CALL_END.len());
                    let mut block = std::mem::replace(&mut self.pending, rest);
                    block.truncate(e);
                    self.close_block(&block, true, &mut out);
                }
            }
        }
        out.into_delta()
    }

    /// Ends the output: releases held-back content and parses an unterminated last block.
    pub fn finish(&mut self) -> ToolStreamDelta {
        let mut out = Out::default();
        let pending = std::mem::take(&mut self.pending);
        match self.state {
            ToolState::Text => {
                out.content.push_str(&std::mem::take(&mut self.blank));
                out.content.push_str(&pending);
            }
            ToolState::Raw => out.content.push_str(&pending),
            ToolState::Between => {}
            ToolState::Block => self.close_block(&pending, false, &mut out),
        }
        out.into_delta()
    }

    /// Releases content before the first block; with [`ToolFormat::drops_blank_content`],
    /// whitespace before any other content is held until it is known whether a call follows.
    fn release(&mut self, text: &str, out: &mut Out) {
        if self.format.drops_blank_content() && !self.released {
            if text.chars().all(char::is_whitespace) {
                self.blank.push_str(text);
                return;
            }
            out.content.push_str(&std::mem::take(&mut self.blank));
        }
        self.released |= !text.is_empty();
        out.content.push_str(text);
    }

    fn close_block(&mut self, block: &str, terminated: bool, out: &mut Out) {
        match self.format.parse_block(block, terminated) {
            // A block without a call (`<tool_call>` but no `<function=`) before any call: the
            // whole parse keeps all text as content when no block has a call, so it is
            // content, and a later block may still call.
            Some(calls) if calls.is_empty() && self.calls == 0 => {
                let mut raw = format!("{TOOL_CALL_START}{block}");
                if terminated {
                    raw.push_str(TOOL_CALL_END);
                }
                self.release(&raw, out);
                self.state = ToolState::Text;
            }
            Some(calls) => {
                // Whitespace alone before the first call is not content.
                self.blank.clear();
                for (name, arguments) in calls {
                    let index = self.calls;
                    self.calls += 1;
                    out.calls.push(ToolCallDelta {
                        index,
                        id: Some(self.ids.next_id()),
                        call_type: Some("function"),
                        name: Some(name),
                        arguments: None,
                    });
                    out.calls.push(ToolCallDelta {
                        index,
                        id: None,
                        call_type: None,
                        name: None,
                        arguments: Some(arguments),
                    });
                }
                self.state = ToolState::Between;
            }
            None => {
                out.content.push_str(&std::mem::take(&mut self.blank));
                out.content.push_str(TOOL_CALL_START);
                out.content.push_str(block);
                if terminated {
                    out.content.push_str(TOOL_CALL_END);
                }
                self.state = ToolState::Raw;
            }
        }
    }
}

#[derive(Default)]
struct Out {
    content: String,
    calls: Vec<ToolCallDelta>,
}

impl Out {
    fn into_delta(self) -> ToolStreamDelta {
        ToolStreamDelta {
            content: (!self.content.is_empty()).then_some(self.content),
            tool_calls: self.calls,
        }
    }
}

/// First occurrence of `needle` in `hay` at or after byte `from` (which need not be a character
/// boundary; an ASCII needle can only match at one).
fn find_from(hay: &str, needle: &str, from: usize) -> Option<usize> {
    let bytes = hay.as_bytes().get(from..)?;
    bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .map(|i| from + i)
}

/// Length of the longest suffix of `text` that is a proper prefix of `tag`.
fn partial_suffix_len(text: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&n| text.as_bytes().ends_with(&tag.as_bytes()[..n]))
        .unwrap_or(0)
}

/// The OpenAI finish reason, as vLLM reports it under `tool_choice: "auto"`: `"tool_calls"` when
/// the output produced any tool call (even if generation actually stopped on the length limit),
/// otherwise the engine's own reason (`"stop"`, `"length"`).
pub fn finish_reason(tools_called: bool, engine_reason: &str) -> &str {
    if tools_called {
        "tool_calls"
    } else {
        engine_reason
    }
}

/// Which parsers apply to a request: `reasoning` for thinking models (`deepseek_r1` for
/// Qwen3-Next-Thinking, `qwen3` for Qwen3.5 / 3.6), `tool_calls` when the request has tools
/// and `tool_choice` is not `"none"` (`hermes` for Qwen3-Next, `qwen3_coder` for Qwen3.5 / 3.6).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutputParsers {
    pub reasoning: Option<ReasoningRule>,
    pub tool_calls: Option<ToolFormat>,
}

impl OutputParsers {
    /// `deepseek_r1` and `hermes` as asked: Qwen3-Next's parsers.
    pub fn qwen3_next(reasoning: bool, tool_calls: bool) -> Self {
        Self {
            reasoning: reasoning.then_some(ReasoningRule::DeepseekR1),
            tool_calls: tool_calls.then_some(ToolFormat::Hermes),
        }
    }
}

/// A complete output split into the fields of an OpenAI assistant message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedOutput {
    /// `Some` whenever the reasoning parser is on (possibly empty, as vLLM returns it).
    pub reasoning: Option<String>,
    pub content: Option<String>,
    pub tool_calls: Vec<ToolCall>,
}

impl ParsedOutput {
    pub fn finish_reason<'a>(&self, engine_reason: &'a str) -> &'a str {
        finish_reason(!self.tool_calls.is_empty(), engine_reason)
    }
}

/// Both parsers chained as vLLM chains them: reasoning first, then tool calls from the content
/// part only. Truncated thinking (no `</think>`) therefore never yields tool calls.
pub fn parse_output(text: &str, parsers: &OutputParsers, ids: &mut ToolCallIds) -> ParsedOutput {
    let (reasoning, content) = match parsers.reasoning {
        Some(rule) => parse_reasoning_with(text, rule),
        None => (None, (!text.is_empty()).then(|| text.to_owned())),
    };
    let Some(format) = &parsers.tool_calls else {
        return ParsedOutput {
            reasoning,
            content,
            tool_calls: Vec::new(),
        };
    };
    let (content, tool_calls) = parse_tool_calls_as(content.as_deref().unwrap_or(""), format, ids);
    ParsedOutput {
        reasoning,
        content,
        tool_calls,
    }
}

/// What one call to [`OutputStream::push`] or [`OutputStream::finish`] releases: the fields of one
/// or more OpenAI `delta` objects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputDelta {
    pub reasoning: Option<String>,
    pub content: Option<String>,
    pub tool_calls: Vec<ToolCallDelta>,
}

impl OutputDelta {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_none() && self.content.is_none() && self.tool_calls.is_empty()
    }
}

/// Incremental [`parse_output`]: the reasoning stream's content feeds the tool-call stream.
#[derive(Debug, Clone)]
pub struct OutputStream {
    reasoning: Option<ReasoningStream>,
    tools: Option<ToolCallStream>,
}

impl OutputStream {
    pub fn new(parsers: &OutputParsers, ids: ToolCallIds) -> Self {
        Self {
            reasoning: parsers.reasoning.map(ReasoningStream::with_rule),
            tools: parsers
                .tool_calls
                .clone()
                .map(|f| ToolCallStream::with_format(f, ids)),
        }
    }

    pub fn tools_called(&self) -> bool {
        self.tools
            .as_ref()
            .is_some_and(ToolCallStream::tools_called)
    }

    pub fn finish_reason<'a>(&self, engine_reason: &'a str) -> &'a str {
        finish_reason(self.tools_called(), engine_reason)
    }

    /// Adds the next piece of output text (as the detokenizer releases it).
    pub fn push(&mut self, delta: &str) -> OutputDelta {
        let (reasoning, content) = match &mut self.reasoning {
            Some(r) => {
                let d = r.push(delta);
                (d.reasoning, d.content)
            }
            None => (None, (!delta.is_empty()).then(|| delta.to_owned())),
        };
        self.route_content(reasoning, content, false)
    }

    /// Ends the output; call once, after the last [`push`](Self::push).
    pub fn finish(&mut self) -> OutputDelta {
        let (reasoning, content) = match &mut self.reasoning {
            Some(r) => {
                let d = r.finish();
                (d.reasoning, d.content)
            }
            None => (None, None),
        };
        self.route_content(reasoning, content, true)
    }

    fn route_content(
        &mut self,
        reasoning: Option<String>,
        content: Option<String>,
        finish: bool,
    ) -> OutputDelta {
        let Some(tools) = &mut self.tools else {
            return OutputDelta {
                reasoning,
                content,
                tool_calls: Vec::new(),
            };
        };
        let mut d = content.map(|c| tools.push(&c)).unwrap_or_default();
        if finish {
            let end = tools.finish();
            if let Some(more) = end.content {
                d.content.get_or_insert_with(String::new).push_str(&more);
            }
            d.tool_calls.extend(end.tool_calls);
        }
        OutputDelta {
            reasoning,
            content: d.content,
            tool_calls: d.tool_calls,
        }
    }
}
