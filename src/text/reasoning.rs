//! The `deepseek_r1` reasoning parser: splits the model's output into `reasoning_content` and
//! `content` at `</think>`, as vLLM does for Qwen3-Next-Thinking (`--reasoning-parser
//! deepseek_r1`, the model card's setting).
//!
//! Behaviour taken from vLLM `vllm/reasoning/deepseek_r1_reasoning_parser.py`
//! (`DeepSeekR1ReasoningParser`) and `vllm/reasoning/basic_parsers.py`
//! (`BaseThinkingReasoningParser.extract_reasoning`), which agree across the versions read:
//!
//! 1. `model_output.partition("<think>")`: if `<think>` occurs, everything up to and including its
//!    *first* occurrence is dropped. A later `<think>` is ordinary text.
//! 2. If `</think>` is absent from what is left, all of it is reasoning and content is `None`
//!    (thinking cut off by the token limit). The reasoning is returned even when it is the empty
//!    string.
//! 3. Otherwise `partition("</think>")`: reasoning is the text before the first `</think>` (may be
//!    empty, still returned), content the text after it, `None` when empty (`content or None`).
//!
//! Nothing is stripped: the answer after `</think>` normally starts with `"\n\n"` and the
//! reasoning with `"\n"` (the Thinking template's generation prompt ends in `<think>\n`, so the
//! output itself has no `<think>`), and vLLM returns both verbatim.
//!
//! [`ReasoningStream`] gives the same split incrementally. vLLM's own streaming path works on
//! token ids and diverges from its non-streaming path in odd cases; this stream instead follows
//! the non-streaming rules on text, so that what it streams concatenates to what
//! [`parse_reasoning`] returns. The only inputs where that cannot hold are those where the first
//! `<think>` comes after text that has already been released (see [`ReasoningStream`]): the
//! non-streaming rule would retract that text.

/// Opens a reasoning block. In Qwen3-Next-Thinking it is part of the prompt, not of the output.
pub const THINK_START: &str = "<think>";
/// Closes the reasoning block; what follows is the answer.
pub const THINK_END: &str = "</think>";

/// Opens a tool call; under the `qwen3` rule it also ends the reasoning.
const TOOL_CALL_OPEN: &str = "<tool_call>";

/// How an output is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningRule {
    /// vLLM `deepseek_r1` (Qwen3-Next-Thinking): see the module docs.
    DeepseekR1,
    /// vLLM `qwen3` as released in 0.20–0.23, for Qwen3.5 / 3.6, whose templates open
    /// `<think>` in the prompt, or close it there empty when thinking is off.
    /// With `thinking`, as `deepseek_r1` except that a `<tool_call>` also ends the reasoning
    /// (content starts at it; the reasoning before it is `None` when empty): Qwen3.5 may call a
    /// tool without closing its thoughts. Where a `<tool_call>` comes before `</think>`, the
    /// split is at the `<tool_call>` (vLLM's non-streaming parser looks for `</think>` first and
    /// would keep the call in the reasoning). Without `thinking` (`enable_thinking: false`, or
    /// a prompt whose last think tag is `</think>`), everything is content, as vLLM streams it
    /// (its non-streaming parser would still split at a stray `</think>`).
    Qwen3 { thinking: bool },
}

/// [`parse_reasoning`] under `rule`.
pub fn parse_reasoning_with(text: &str, rule: ReasoningRule) -> (Option<String>, Option<String>) {
    match rule {
        ReasoningRule::DeepseekR1 => parse_reasoning(text),
        ReasoningRule::Qwen3 { thinking: false } => {
            (None, (!text.is_empty()).then(|| text.to_owned()))
        }
        ReasoningRule::Qwen3 { thinking: true } => {
            let rest = match text.find(THINK_START) {
                Some(i) => &text[i + THINK_START.len()..],
                None => text,
            };
            let end = rest.find(THINK_END);
            match rest.find(TOOL_CALL_OPEN) {
                Some(t) if end.is_none_or(|e| t < e) => {
                    let reasoning = &rest[..t];
                    (
                        (!reasoning.is_empty()).then(|| reasoning.to_owned()),
                        Some(rest[t..].to_owned()),
                    )
                }
                _ => split_at_end(rest),
            }
        }
    }
}

/// `rest` (after any opening `<think>`) split at the first `</think>`.
fn split_at_end(rest: &str) -> (Option<String>, Option<String>) {
    match rest.find(THINK_END) {
        None => (Some(rest.to_owned()), None),
        Some(i) => {
            let content = &rest[i + THINK_END.len()..];
            (
                Some(rest[..i].to_owned()),
                (!content.is_empty()).then(|| content.to_owned()),
            )
        }
    }
}

/// Splits a complete output into `(reasoning_content, content)` exactly as vLLM's
/// `DeepSeekR1ReasoningParser.extract_reasoning` does (see the module docs). The reasoning is
/// always `Some` (possibly empty), because vLLM always returns a string there; the content is
/// `None` when `</think>` is missing or nothing follows it.
pub fn parse_reasoning(text: &str) -> (Option<String>, Option<String>) {
    let rest = match text.find(THINK_START) {
        Some(i) => &text[i + THINK_START.len()..],
        None => text,
    };
    split_at_end(rest)
}

/// What one call to [`ReasoningStream::push`] or [`ReasoningStream::finish`] releases. Either
/// part is `None` rather than empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReasoningDelta {
    pub reasoning: Option<String>,
    pub content: Option<String>,
}

impl ReasoningDelta {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_none() && self.content.is_none()
    }

    fn new(reasoning: &str, content: &str) -> Self {
        Self {
            reasoning: (!reasoning.is_empty()).then(|| reasoning.to_owned()),
            content: (!content.is_empty()).then(|| content.to_owned()),
        }
    }
}

/// Incremental [`parse_reasoning`]: feed it the text pieces the detokenizer releases, in order,
/// then call [`finish`](Self::finish) once.
///
/// A tag may arrive inside a larger piece or split over several pieces, so text that could be the
/// start of a tag is held back until the next piece decides it. Once `</think>` has been seen,
/// every later piece is content and is passed through at once.
///
/// Concatenating the released reasoning and content gives [`parse_reasoning`]'s result (with
/// `None` read as empty), except where the output's first `<think>` comes after text the stream
/// has already released as reasoning; the non-streaming rule drops that text, which a stream
/// cannot take back. Leading whitespace is held back (while no `<think>` has been seen) so that
/// the common `"\n<think>"` opening still matches exactly. A `<think>` after `</think>` is streamed
/// as content, where the non-streaming rule would restart the split at it; vLLM's streaming path
/// also keeps later text as content there. Neither case arises with Qwen3-Next-Thinking, whose
/// output contains no `<think>` at all.
#[derive(Debug, Clone)]
pub struct ReasoningStream {
    /// A `<tool_call>` ends the reasoning too (the `qwen3` rule with thinking).
    tool_call_ends: bool,
    /// Text received but not yet released: a possible partial tag, or leading whitespace.
    pending: String,
    in_content: bool,
    /// The first `<think>` has been consumed; later ones are plain text (vLLM partitions on the
    /// first only).
    seen_start: bool,
    /// Some reasoning has been released, so a first `<think>` can no longer drop what preceded it.
    released: bool,
}

impl Default for ReasoningStream {
    fn default() -> Self {
        Self::with_rule(ReasoningRule::DeepseekR1)
    }
}

impl ReasoningStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// A stream that splits as [`parse_reasoning_with`] does under `rule`.
    pub fn with_rule(rule: ReasoningRule) -> Self {
        Self {
            tool_call_ends: rule == ReasoningRule::Qwen3 { thinking: true },
            pending: String::new(),
            in_content: rule == ReasoningRule::Qwen3 { thinking: false },
            seen_start: false,
            released: false,
        }
    }

    /// Whether `</think>` has been seen, i.e. further text is content.
    pub fn in_content(&self) -> bool {
        self.in_content
    }

    /// Adds the next piece of output text; returns what it lets through.
    pub fn push(&mut self, delta: &str) -> ReasoningDelta {
        if self.in_content {
            return ReasoningDelta::new("", delta);
        }
        self.pending.push_str(delta);
        let mut reasoning = String::new();
        loop {
            let end = self.pending.find(THINK_END);
            // Under the qwen3 rule a `<tool_call>` ends the reasoning and stays in the content.
            let call = if self.tool_call_ends {
                self.pending.find(TOOL_CALL_OPEN)
            } else {
                None
            };
            if let Some(t) = call.filter(|&t| end.is_none_or(|e| t < e)) {
                let first_start = if self.seen_start {
                    None
                } else {
                    self.pending.find(THINK_START)
                };
                if first_start.is_none_or(|s| s > t) {
                    reasoning.push_str(&self.pending[..t]);
                    let content = self.pending[t..].to_owned();
                    self.pending.clear();
                    self.in_content = true;
                    self.released |= !reasoning.is_empty();
                    return ReasoningDelta::new(&reasoning, &content);
                }
            }
            let start = if self.seen_start {
                None
            } else {
                self.pending.find(THINK_START)
            };
            if let Some(s) = start.filter(|&s| end.is_none_or(|e| s < e)) {
                // Non-streaming drops everything before the first `<think>`; once reasoning has
                // been released that is impossible, so the rest is kept as vLLM's streaming path
                // keeps it.
                if self.released {
                    reasoning.push_str(&self.pending[..s]);
                }
                self.pending.drain(..s + THINK_START.len());
                self.seen_start = true;
                continue;
            }
            if let Some(e) = end {
                reasoning.push_str(&self.pending[..e]);
                let content = self.pending[e + THINK_END.len()..].to_owned();
                self.pending.clear();
                self.in_content = true;
                self.released |= !reasoning.is_empty();
                return ReasoningDelta::new(&reasoning, &content);
            }
            break;
        }
        let keep = partial_tag_len(&self.pending, !self.seen_start, self.tool_call_ends);
        let cut = self.pending.len() - keep;
        let ready = &self.pending[..cut];
        let hold_whitespace = !self.seen_start
            && !self.released
            && reasoning.is_empty()
            && ready.chars().all(char::is_whitespace);
        if !hold_whitespace {
            reasoning.push_str(ready);
            self.pending.drain(..cut);
        }
        self.released |= !reasoning.is_empty();
        ReasoningDelta::new(&reasoning, "")
    }

    /// Ends the output: anything still held back was reasoning (no `</think>` followed).
    pub fn finish(&mut self) -> ReasoningDelta {
        let rest = std::mem::take(&mut self.pending);
        self.released |= !rest.is_empty();
        ReasoningDelta::new(&rest, "")
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `</think>` (or of `<think>`
/// when `with_start`, of `<tool_call>` when `with_tool_call`), i.e. could become a tag when
/// more text arrives.
fn partial_tag_len(text: &str, with_start: bool, with_tool_call: bool) -> usize {
    let bytes = text.as_bytes();
    let mut tags = vec![THINK_END];
    if with_start {
        tags.push(THINK_START);
    }
    if with_tool_call {
        tags.push(TOOL_CALL_OPEN);
    }
    tags.iter()
        .filter_map(|tag| {
            (1..tag.len())
                .rev()
                .find(|&n| bytes.ends_with(&tag.as_bytes()[..n]))
        })
        .max()
        .unwrap_or(0)
}
