//! The output parsers (`deepseek_r1` reasoning, `hermes` tool calls) on crafted Qwen3-Next
//! outputs: each case is checked non-streamed against the values vLLM's parsers give, then
//! streamed through the real tokenizer one token at a time (`DecodeStream`), one character at a
//! time, in uneven chunks and as a single piece, with the stream required to concatenate to the
//! non-streamed result.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use qnext::text::{
    finish_reason, parse_output, parse_reasoning, parse_reasoning_with, parse_tool_calls,
    parse_tool_calls_as, DecodeStream, OutputParsers, OutputStream, ParsedOutput, ReasoningRule,
    ReasoningStream, Tokenizer, ToolCall, ToolCallIds, ToolCallStream, ToolFormat, ToolSchemas,
};

const THINK_END_ID: u32 = 151668;
const THINK_START_ID: u32 = 151667;
const TOOL_START_ID: u32 = 151657;
const TOOL_END_ID: u32 = 151658;

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen-vocab/tokenizer.json");
        Tokenizer::from_file(path).expect("fixture tokenizer loads")
    })
}

/// The pieces `DecodeStream` releases for `text`, one generated id at a time, as the server sees
/// them (skip_special_tokens=true keeps `<think>`/`<tool_call>`: they are not special).
fn token_pieces(text: &str) -> Vec<String> {
    let tok = tokenizer();
    let ids = tok.encode(text, false).unwrap();
    let mut stream = DecodeStream::new(true);
    let mut pieces = Vec::new();
    for &id in &ids {
        if let Some(p) = stream.step(tok, id).unwrap() {
            pieces.push(p);
        }
    }
    if let Some(p) = stream.flush(tok).unwrap() {
        pieces.push(p);
    }
    assert_eq!(pieces.concat(), text, "tokenizer round trip");
    pieces
}

fn char_pieces(text: &str) -> Vec<String> {
    text.chars().map(String::from).collect()
}

/// Chunks of 1, 2, …, 7 characters, repeating: tags land split at every offset somewhere.
fn uneven_pieces(text: &str, shift: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut pieces = Vec::new();
    let mut i = 0;
    let mut n = shift;
    while i < chars.len() {
        let len = n % 7 + 1;
        let end = (i + len).min(chars.len());
        pieces.push(chars[i..end].iter().collect());
        i = end;
        n += 1;
    }
    pieces
}

fn all_chunkings(text: &str) -> Vec<(&'static str, Vec<String>)> {
    let mut out = vec![
        ("tokens", token_pieces(text)),
        ("chars", char_pieces(text)),
        ("whole", vec![text.to_owned()]),
    ];
    for shift in 0..7 {
        out.push(("uneven", uneven_pieces(text, shift)));
    }
    out
}

fn stream_reasoning(pieces: &[String]) -> (String, String) {
    let mut s = ReasoningStream::new();
    let (mut r, mut c) = (String::new(), String::new());
    for p in pieces {
        let d = s.push(p);
        assert!(d.reasoning.as_deref() != Some("") && d.content.as_deref() != Some(""));
        r.push_str(d.reasoning.as_deref().unwrap_or(""));
        c.push_str(d.content.as_deref().unwrap_or(""));
    }
    let d = s.finish();
    assert!(d.content.is_none(), "finish never releases content");
    r.push_str(d.reasoning.as_deref().unwrap_or(""));
    (r, c)
}

#[track_caller]
fn check_reasoning(text: &str, reasoning: &str, content: Option<&str>) {
    assert_eq!(
        parse_reasoning(text),
        (Some(reasoning.to_owned()), content.map(str::to_owned)),
        "non-streamed: {text:?}"
    );
    for (how, pieces) in all_chunkings(text) {
        assert_eq!(
            stream_reasoning(&pieces),
            (reasoning.to_owned(), content.unwrap_or("").to_owned()),
            "streamed by {how}: {text:?}"
        );
    }
}

#[test]
fn tags_are_single_non_special_tokens() {
    let tok = tokenizer();
    let ids = tok
        .encode(
            "<think>\na\n</think>\n\n<tool_call>\n{}\n</tool_call>",
            false,
        )
        .unwrap();
    for id in [THINK_START_ID, THINK_END_ID, TOOL_START_ID, TOOL_END_ID] {
        assert!(ids.contains(&id), "{id} in {ids:?}");
        assert_eq!(
            tok.decode(&[id], true).unwrap(),
            tok.id_to_token(id).unwrap()
        );
    }
    // The streamed pieces keep each tag whole, as vLLM's token-id based streaming sees them.
    let pieces = token_pieces("\nx\n</think>\n\nHi");
    assert!(pieces.iter().any(|p| p == "</think>"), "{pieces:?}");
}

#[test]
fn reasoning_then_answer() {
    // The usual Thinking output: the prompt opened `<think>\n`, the answer starts with "\n\n".
    check_reasoning(
        "Okay, the user says hello.\nI should greet back.\n</think>\n\nHello! How can I help you today?",
        "Okay, the user says hello.\nI should greet back.\n",
        Some("\n\nHello! How can I help you today?"),
    );
}

#[test]
fn reasoning_only_or_truncated() {
    // Closed but nothing after it: content is None (`content or None`).
    check_reasoning(
        "Let me think about 2+2.\nIt is 4.\n</think>",
        "Let me think about 2+2.\nIt is 4.\n",
        None,
    );
    // Cut off by max_tokens: everything is reasoning.
    check_reasoning(
        "Let me think about 2+2.\nFirst, I take two and",
        "Let me think about 2+2.\nFirst, I take two and",
        None,
    );
    // No output at all still gives reasoning "" (vLLM returns the string).
    check_reasoning("", "", None);
}

#[test]
fn no_think_tags_is_all_reasoning() {
    // An Instruct-style answer through the deepseek_r1 parser: vLLM calls it all reasoning.
    check_reasoning(
        "The capital of France is Paris.",
        "The capital of France is Paris.",
        None,
    );
}

#[test]
fn think_start_in_output_is_dropped() {
    check_reasoning(
        "<think>\nThe user wants a joke.\n</think>\n\nWhy did the chicken cross the road?",
        "\nThe user wants a joke.\n",
        Some("\n\nWhy did the chicken cross the road?"),
    );
    // Whitespace before the tag is dropped with it.
    check_reasoning("\n\n<think>abc</think>xyz", "abc", Some("xyz"));
    // Only the first `<think>` is special; the first `</think>` after it ends reasoning.
    check_reasoning(
        "<think>a<think>b</think>c</think>d",
        "a<think>b",
        Some("c</think>d"),
    );
    check_reasoning("<think>", "", None);
    check_reasoning("<think></think>", "", None);
}

#[test]
fn empty_reasoning_and_later_end_tags() {
    check_reasoning("</think>\n\nHi", "", Some("\n\nHi"));
    check_reasoning("a</think>b</think>c", "a", Some("b</think>c"));
}

#[test]
fn tag_lookalikes_are_held_then_released() {
    check_reasoning(
        "x < y, </thin k>, <thinking>, </think",
        "x < y, </thin k>, <thinking>, </think",
        None,
    );
    check_reasoning("a </ b</think><", "a </ b", Some("<"));
    check_reasoning("<", "<", None);
    check_reasoning("  ", "  ", None);
}

#[test]
fn unicode_reasoning() {
    check_reasoning(
        "用户问天气。🤔 Ça dépend…\n</think>\n\n今天是晴天 ☀️，25°C。",
        "用户问天气。🤔 Ça dépend…\n",
        Some("\n\n今天是晴天 ☀️，25°C。"),
    );
}

#[test]
fn late_think_start_is_the_documented_stream_difference() {
    // Non-streamed, vLLM drops everything before the first `<think>`, even reasoning text.
    let text = "abc<think>def</think>ghi";
    assert_eq!(
        parse_reasoning(text),
        (Some("def".into()), Some("ghi".into()))
    );
    // In one piece the stream agrees; piecewise, "abc" is already out when the tag arrives.
    assert_eq!(
        stream_reasoning(&[text.to_owned()]),
        ("def".into(), "ghi".into())
    );
    assert_eq!(
        stream_reasoning(&char_pieces(text)),
        ("abcdef".into(), "ghi".into())
    );
    // A `<think>` after `</think>` restarts the non-streamed split; the stream keeps content.
    let text = "r</think>c<think>x";
    assert_eq!(parse_reasoning(text), (Some("x".into()), None));
    assert_eq!(
        stream_reasoning(&char_pieces(text)),
        ("r".into(), "c<think>x".into())
    );
}

// ---------------------------------------------------------------------------------------------
// Tool calls

const SEED: u64 = 0x5EED;

/// Streams `pieces` and rebuilds the calls from the deltas, checking the OpenAI delta contract:
/// indices in order from 0, the first delta of a call carries id/type/name and no arguments,
/// later ones only arguments.
fn stream_tools(pieces: &[String]) -> (String, Vec<ToolCall>, bool) {
    let mut s = ToolCallStream::new(ToolCallIds::from_seed(SEED));
    let mut content = String::new();
    let mut calls: Vec<ToolCall> = Vec::new();
    let mut absorb = |d: qnext::text::ToolStreamDelta, calls: &mut Vec<ToolCall>| {
        assert_ne!(d.content.as_deref(), Some(""));
        content.push_str(d.content.as_deref().unwrap_or(""));
        for t in d.tool_calls {
            if let Some(id) = t.id {
                assert_eq!(t.index, calls.len(), "new call gets the next index");
                assert_eq!(t.call_type, Some("function"));
                assert!(t.arguments.is_none());
                calls.push(ToolCall {
                    id,
                    name: t.name.expect("header has the name"),
                    arguments: String::new(),
                });
            } else {
                assert!(t.name.is_none() && t.call_type.is_none());
                assert_eq!(t.index + 1, calls.len(), "arguments follow their header");
                calls[t.index]
                    .arguments
                    .push_str(&t.arguments.expect("fragment"));
            }
        }
    };
    for p in pieces {
        absorb(s.push(p), &mut calls);
    }
    absorb(s.finish(), &mut calls);
    let called = s.tools_called();
    assert_eq!(called, !calls.is_empty());
    (content, calls, called)
}

#[track_caller]
fn check_tools(text: &str, content: Option<&str>, calls: &[(&str, &str)]) {
    let (got_content, got_calls) = parse_tool_calls(text, &mut ToolCallIds::from_seed(SEED));
    assert_eq!(
        got_content.as_deref(),
        content,
        "non-streamed content: {text:?}"
    );
    let mut ids = ToolCallIds::from_seed(SEED);
    let expected: Vec<ToolCall> = calls
        .iter()
        .map(|(name, args)| ToolCall {
            id: ids.next_id(),
            name: (*name).to_owned(),
            arguments: (*args).to_owned(),
        })
        .collect();
    assert_eq!(got_calls, expected, "non-streamed calls: {text:?}");
    for (how, pieces) in all_chunkings(text) {
        let (c, streamed, _) = stream_tools(&pieces);
        assert_eq!(
            c,
            content.unwrap_or(""),
            "streamed content by {how}: {text:?}"
        );
        assert_eq!(streamed, expected, "streamed calls by {how}: {text:?}");
    }
}

const WEATHER: &str =
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"location\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>";
const WEATHER_ARGS: &str = r#"{"location": "Paris", "unit": "celsius"}"#;

#[test]
fn one_tool_call() {
    check_tools(WEATHER, None, &[("get_weather", WEATHER_ARGS)]);
}

#[test]
fn two_tool_calls_separated_by_newline() {
    let text = format!(
        "{WEATHER}\n<tool_call>\n{{\"name\": \"get_time\", \"arguments\": {{\"timezone\": \"Europe/Paris\"}}}}\n</tool_call>"
    );
    check_tools(
        &text,
        None,
        &[
            ("get_weather", WEATHER_ARGS),
            ("get_time", r#"{"timezone": "Europe/Paris"}"#),
        ],
    );
}

#[test]
fn tool_call_after_text() {
    // Content is everything before the first `<tool_call>`, not stripped.
    check_tools(
        &format!("Let me check the weather for you.\n{WEATHER}"),
        Some("Let me check the weather for you.\n"),
        &[("get_weather", WEATHER_ARGS)],
    );
    // Text between and after blocks is dropped, whatever it is.
    check_tools(
        &format!("{WEATHER}\nI will wait for the result.\n{WEATHER}\n\nDone."),
        None,
        &[("get_weather", WEATHER_ARGS), ("get_weather", WEATHER_ARGS)],
    );
}

#[test]
fn no_tool_call_is_all_content() {
    check_tools("Just an answer.", Some("Just an answer."), &[]);
    check_tools("", None, &[]);
    // A closing tag alone is not a call.
    check_tools("a </tool_call> b", Some("a </tool_call> b"), &[]);
    // Held-back tag prefixes are released at the end.
    check_tools("1 < 2 and <tool", Some("1 < 2 and <tool"), &[]);
}

#[test]
fn malformed_json_returns_the_whole_text_as_content() {
    for text in [
        // Missing closing brace.
        "Sure.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}\n</tool_call>",
        // Not JSON at all.
        "<tool_call>\nget_weather(Paris)\n</tool_call>",
        // Empty block.
        "<tool_call></tool_call>",
        // No arguments / no name / non-string name / not an object.
        "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
        "<tool_call>\n{\"arguments\": {}}\n</tool_call>",
        "<tool_call>\n{\"name\": 3, \"arguments\": {}}\n</tool_call>",
        "<tool_call>\n[\"f\", {}]\n</tool_call>",
        // String arguments that are not JSON.
        "<tool_call>\n{\"name\": \"f\", \"arguments\": \"a=1\"}\n</tool_call>",
        // Extra data after the object.
        "<tool_call>\n{\"name\": \"f\", \"arguments\": {}} x\n</tool_call>",
        // The first block is bad, so the good one after it is content too.
        "<tool_call>{bad}</tool_call>\n<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>",
    ] {
        check_tools(text, Some(text), &[]);
    }
}

#[test]
fn unterminated_tool_call() {
    // Stopped at <|im_end|> before `</tool_call>`: `<tool_call>(.*)` still parses.
    check_tools(
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"location\": \"Paris\", \"unit\": \"celsius\"}}\n",
        None,
        &[("get_weather", WEATHER_ARGS)],
    );
    check_tools(
        &format!("{WEATHER}\n<tool_call>\n{{\"name\": \"f\", \"arguments\": {{}}}}"),
        None,
        &[("get_weather", WEATHER_ARGS), ("f", "{}")],
    );
    // Cut off mid-JSON: malformed, so all content.
    let text = "Checking.\n<tool_call>\n{\"name\": \"get_weather\", \"argu";
    check_tools(text, Some(text), &[]);
}

#[test]
fn arguments_are_reserialised_like_json_dumps() {
    // Nested objects, arrays and every scalar; compact input gains Python's ", " and ": ".
    check_tools(
        "<tool_call>\n{\"name\":\"search\",\"arguments\":{\"query\":\"rust\",\"filters\":{\"year\":{\"min\":2020,\"max\":2024},\"tags\":[\"a\",\"b\",[]],\"extra\":{}},\"limit\":10,\"score\":0.5,\"exact\":false,\"cursor\":null}}\n</tool_call>",
        None,
        &[(
            "search",
            r#"{"query": "rust", "filters": {"year": {"min": 2020, "max": 2024}, "tags": ["a", "b", []], "extra": {}}, "limit": 10, "score": 0.5, "exact": false, "cursor": null}"#,
        )],
    );
    // Floats print as Python's repr; key order is kept; a repeated key keeps its first place and
    // its last value; `\/` and `\u00e9` escapes come out as plain characters.
    check_tools(
        "<tool_call>{\"name\": \"n\", \"arguments\": {\"z\": 1e16, \"a\": 0.00001, \"m\": 1E5, \"big\": 18446744073709551615, \"neg\": -7, \"z\": 2.50, \"p\": \"a\\/b \\u00e9\"}}</tool_call>",
        None,
        &[(
            "n",
            r#"{"z": 2.5, "a": 1e-05, "m": 100000.0, "big": 18446744073709551615, "neg": -7, "p": "a/b é"}"#,
        )],
    );
    // Arguments given as a JSON string are decoded first (newest vLLM).
    check_tools(
        "<tool_call>\n{\"name\": \"f\", \"arguments\": \"{\\\"a\\\":[1,2]}\"}\n</tool_call>",
        None,
        &[("f", r#"{"a": [1, 2]}"#)],
    );
    // Non-object arguments are dumped as they are.
    check_tools(
        "<tool_call>{\"name\": \"f\", \"arguments\": [1, \"x\"]}</tool_call><tool_call>{\"name\": \"g\", \"arguments\": null}</tool_call>",
        None,
        &[("f", r#"[1, "x"]"#), ("g", "null")],
    );
}

#[test]
fn unicode_arguments_stay_unescaped() {
    check_tools(
        "好的，我来查一下。\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"São Paulo\", \"alt\": \"東京\", \"sky\": \"🌧️\", \"note\": \"line1\\nline2\\t\\\"q\\\" \\\\ \\u0001\"}}\n</tool_call>",
        Some("好的，我来查一下。\n"),
        &[(
            "weather",
            r#"{"city": "São Paulo", "alt": "東京", "sky": "🌧️", "note": "line1\nline2\t\"q\" \\ \u0001"}"#,
        )],
    );
}

#[test]
fn end_tag_inside_a_json_string_breaks_the_block() {
    // vLLM's lazy regex ends the block at the first `</tool_call>`, even inside a JSON string:
    // the block is then malformed and the whole output is content.
    let text = "<tool_call>\n{\"name\": \"echo\", \"arguments\": {\"text\": \"a </tool_call> b\"}}\n</tool_call>";
    check_tools(text, Some(text), &[]);
    // A `<tool_call>` inside a block is just part of its text (here it breaks the JSON too).
    let text = "<tool_call>{\"name\": \"f\", <tool_call>\"arguments\": {}}</tool_call>";
    check_tools(text, Some(text), &[]);
}

#[test]
fn malformed_after_wellformed_is_the_documented_stream_difference() {
    let text = format!("{WEATHER}\n<tool_call>oops</tool_call>");
    // Non-streamed: any bad block voids all calls.
    assert_eq!(
        parse_tool_calls(&text, &mut ToolCallIds::from_seed(SEED)),
        (Some(text.clone()), Vec::new())
    );
    // Streamed: the first call has gone out; the bad block is content.
    for (how, pieces) in all_chunkings(&text) {
        let (content, calls, called) = stream_tools(&pieces);
        assert_eq!(content, "<tool_call>oops</tool_call>", "{how}");
        assert_eq!(calls.len(), 1, "{how}");
        assert_eq!(calls[0].arguments, WEATHER_ARGS);
        assert!(called);
    }
}

#[test]
fn tool_call_ids() {
    let mut a = ToolCallIds::from_seed(1);
    let mut b = ToolCallIds::from_seed(1);
    let ids: Vec<String> = (0..50).map(|_| a.next_id()).collect();
    for id in &ids {
        assert_eq!(id.len(), 29);
        assert!(id.starts_with("call_"));
        assert!(id[5..].bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(*id, b.next_id());
    }
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len());
    assert_ne!(ToolCallIds::new().next_id(), ToolCallIds::new().next_id());
}

// ---------------------------------------------------------------------------------------------
// Both parsers chained (Thinking model with tools)

fn stream_output(parsers: OutputParsers, pieces: &[String]) -> (ParsedOutput, bool) {
    let mut s = OutputStream::new(&parsers, ToolCallIds::from_seed(SEED));
    let (mut r, mut c) = (String::new(), String::new());
    let mut calls: BTreeMap<usize, ToolCall> = BTreeMap::new();
    let mut deltas = Vec::new();
    for p in pieces {
        deltas.push(s.push(p));
    }
    deltas.push(s.finish());
    for d in deltas {
        r.push_str(d.reasoning.as_deref().unwrap_or(""));
        c.push_str(d.content.as_deref().unwrap_or(""));
        for t in d.tool_calls {
            let call = calls.entry(t.index).or_insert_with(|| ToolCall {
                id: String::new(),
                name: String::new(),
                arguments: String::new(),
            });
            if let Some(id) = t.id {
                call.id = id;
                call.name = t.name.unwrap_or_default();
            }
            call.arguments
                .push_str(t.arguments.as_deref().unwrap_or(""));
        }
    }
    let out = ParsedOutput {
        reasoning: parsers.reasoning.is_some().then_some(r),
        content: (!c.is_empty()).then_some(c),
        tool_calls: calls.into_values().collect(),
    };
    (out, s.tools_called())
}

#[track_caller]
fn check_output(text: &str, parsers: OutputParsers, expected: &ParsedOutput) {
    let got = parse_output(text, &parsers, &mut ToolCallIds::from_seed(SEED));
    assert_eq!(&got, expected, "non-streamed: {text:?}");
    for (how, pieces) in all_chunkings(text) {
        let (streamed, called) = stream_output(parsers.clone(), &pieces);
        assert_eq!(&streamed, expected, "streamed by {how}: {text:?}");
        assert_eq!(called, !expected.tool_calls.is_empty());
    }
}

fn call(id_index: usize, name: &str, arguments: &str) -> ToolCall {
    let mut ids = ToolCallIds::from_seed(SEED);
    let id = (0..=id_index).map(|_| ids.next_id()).last().unwrap();
    ToolCall {
        id,
        name: name.to_owned(),
        arguments: arguments.to_owned(),
    }
}

fn both() -> OutputParsers {
    OutputParsers::qwen3_next(true, true)
}

#[test]
fn thinking_then_tool_call() {
    // vLLM keeps the "\n\n" after `</think>` as content, since the tool parser does not strip.
    let text = format!(
        "The user wants the weather in Paris.\nI'll call get_weather.\n</think>\n\n{WEATHER}"
    );
    let expected = ParsedOutput {
        reasoning: Some("The user wants the weather in Paris.\nI'll call get_weather.\n".into()),
        content: Some("\n\n".into()),
        tool_calls: vec![call(0, "get_weather", WEATHER_ARGS)],
    };
    check_output(&text, both(), &expected);
    assert_eq!(expected.finish_reason("stop"), "tool_calls");
}

#[test]
fn tool_call_inside_reasoning_is_not_parsed() {
    // Thinking cut off: content is None, so the tool parser sees "" (vLLM: `content or ""`).
    let text = format!("Maybe I should call:\n{WEATHER}\nHmm");
    let expected = ParsedOutput {
        reasoning: Some(text.clone()),
        content: None,
        tool_calls: Vec::new(),
    };
    check_output(&text, both(), &expected);
    assert_eq!(expected.finish_reason("length"), "length");
    // A call mentioned while thinking, then a real one after `</think>`.
    let text = format!("I could use {WEATHER} here.\n</think>\n\nSure.\n{WEATHER}");
    check_output(
        &text,
        both(),
        &ParsedOutput {
            reasoning: Some(format!("I could use {WEATHER} here.\n")),
            content: Some("\n\nSure.\n".into()),
            tool_calls: vec![call(0, "get_weather", WEATHER_ARGS)],
        },
    );
}

#[test]
fn parser_combinations() {
    let text = format!("Plan.\n</think>\n\n{WEATHER}");
    // Reasoning only: the tool call stays in the content.
    check_output(
        &text,
        OutputParsers::qwen3_next(true, false),
        &ParsedOutput {
            reasoning: Some("Plan.\n".into()),
            content: Some(format!("\n\n{WEATHER}")),
            tool_calls: Vec::new(),
        },
    );
    // Instruct with tools: no reasoning field, `</think>` is ordinary content.
    check_output(
        &text,
        OutputParsers::qwen3_next(false, true),
        &ParsedOutput {
            reasoning: None,
            content: Some("Plan.\n</think>\n\n".into()),
            tool_calls: vec![call(0, "get_weather", WEATHER_ARGS)],
        },
    );
    // Neither: the text as it is.
    check_output(
        &text,
        OutputParsers::default(),
        &ParsedOutput {
            reasoning: None,
            content: Some(text.clone()),
            tool_calls: Vec::new(),
        },
    );
    // Malformed call after thinking: all of the content part comes back.
    let text = "Plan.\n</think>\n\n<tool_call>\n{\"name\": \"f\"\n</tool_call>";
    check_output(
        text,
        both(),
        &ParsedOutput {
            reasoning: Some("Plan.\n".into()),
            content: Some("\n\n<tool_call>\n{\"name\": \"f\"\n</tool_call>".into()),
            tool_calls: Vec::new(),
        },
    );
}

#[test]
fn finish_reason_rule() {
    assert_eq!(finish_reason(true, "stop"), "tool_calls");
    assert_eq!(finish_reason(true, "length"), "tool_calls");
    assert_eq!(finish_reason(false, "length"), "length");
    assert_eq!(finish_reason(false, "stop"), "stop");
}

// ---------------------------------------------------------------------------------------------
// Arbitrary input: no panics, and the stream agrees wherever the docs promise it does.

struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

const ATOMS: &[&str] = &[
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<thi",
    "nk>",
    "</",
    "<",
    ">",
    "tool_call>",
    "<tool",
    "\n",
    " ",
    "x",
    "é",
    "🤔",
    "{",
    "}",
    "\"",
    ":",
    ",",
    "[1, 2]",
    "\"name\"",
    "\"arguments\"",
    "\"f\"",
    "{\"name\": \"f\", \"arguments\": {\"a\": \"</tool_call>\"}}",
    "{\"name\": \"g\", \"arguments\": {\"b\": [1.5, null]}}",
];

const BLOCKS: &[&str] = &[
    "<tool_call>\n{\"name\": \"g\", \"arguments\": {\"b\": [1.5, null]}}\n</tool_call>",
    "<tool_call>{\"name\": \"h\", \"arguments\": \"{}\"}</tool_call>\n",
    "<tool_call>\n{\"name\": \"é\", \"arguments\": {\"s\": \"🤔\"}}",
    "</think>\n\n",
];

#[test]
fn arbitrary_inputs() {
    let mut rng = Lcg(42);
    // How many cases exercised each branch, so that the generator is known to reach them.
    let (mut split, mut called) = (0, 0);
    for case in 0..3000 {
        let mut text = String::new();
        for _ in 0..rng.next(14) {
            // Whole blocks often enough that well-formed calls are common.
            let atom = if rng.next(4) == 0 {
                BLOCKS[rng.next(BLOCKS.len())]
            } else {
                ATOMS[rng.next(ATOMS.len())]
            };
            text.push_str(atom);
        }
        let pieces = match case % 3 {
            0 => char_pieces(&text),
            1 => uneven_pieces(&text, rng.next(7)),
            _ => vec![text.clone()],
        };

        let (r, c) = parse_reasoning(&text);
        let (sr, sc) = stream_reasoning(&pieces);
        let exact = match text.find("<think>") {
            None => true,
            Some(s) => text[..s].trim().is_empty(),
        };
        if exact {
            split += usize::from(c.is_some());
            assert_eq!(
                (sr, sc),
                (r.unwrap_or_default(), c.unwrap_or_default()),
                "{text:?}"
            );
        }

        let (content, calls) = parse_tool_calls(&text, &mut ToolCallIds::from_seed(SEED));
        let (s_content, s_calls, _) = stream_tools(&pieces);
        called += usize::from(!calls.is_empty());
        if s_calls.is_empty() || !calls.is_empty() {
            assert_eq!(s_content, content.unwrap_or_default(), "{text:?}");
            assert_eq!(s_calls, calls, "{text:?}");
        }

        for parsers in [both(), OutputParsers::default()] {
            let _ = parse_output(&text, &parsers, &mut ToolCallIds::from_seed(SEED));
            let _ = stream_output(parsers.clone(), &pieces);
        }
    }
    assert!(
        split > 500 && called > 500,
        "split {split}, called {called}"
    );
}

// ---------------------------------------------------------------------------------------------
// qwen3_coder (Qwen3.5 / 3.6): vLLM 0.22–0.23's `qwen3coder_tool_parser.py`, whose results
// below were produced by running that released code.

fn qwen3_coder_format() -> ToolFormat {
    let tools = serde_json::json!([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {
            "s": {"type": "string"}, "sn": {"type": ["string", "null"]}, "i": {"type": "integer"},
            "n": {"type": "number"}, "b": {"type": "boolean"}, "o": {"type": "object"},
            "a": {"type": "array"}, "any_s": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "en": {"enum": [1, 2]}, "noschema": {}, "foo": {"type": "foo"},
            "I": {"type": "Integer"}, "ns": {"type": ["null", "string"]},
            "any": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "ni": {"type": ["null", "integer"]}, "e": {"type": "string"},
            "u": {"type": "foo"}}}}}]);
    ToolFormat::Qwen3Coder(ToolSchemas::from_tools(Some(&tools)))
}

fn one_call(params: &[(&str, &str)]) -> String {
    let body: String = params
        .iter()
        .map(|(k, v)| format!("<parameter={k}>\n{v}\n</parameter>\n"))
        .collect();
    format!("<tool_call>\n<function=f>\n{body}</function>\n</tool_call>")
}

/// The argument JSON of one call, or `None` when the parse gives none.
fn qwen3_arguments(text: &str) -> Option<String> {
    let (_, calls) =
        parse_tool_calls_as(text, &qwen3_coder_format(), &mut ToolCallIds::from_seed(1));
    calls.first().map(|c| c.arguments.clone())
}

#[test]
fn qwen3_coder_values_typed_as_vllm_types_them() {
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("s", "null", Some("\"null\"")),
        ("s", "123", Some("\"123\"")),
        ("sn", "123", Some("\"123\"")),
        ("sn", "null", Some("null")),
        ("sn", "hello", Some("\"hello\"")),
        ("i", "42", Some("42")),
        ("i", " 42 ", Some("42")),
        ("i", "4_2", Some("42")),
        ("i", "5.0", Some("5.0")),
        ("i", "null", Some("null")),
        ("i", "abc", Some("\"abc\"")),
        ("n", "3.0", Some("3")),
        ("n", "3.5", Some("3.5")),
        ("n", "1e3", Some("1000")),
        ("n", "nan", Some("\"nan\"")),
        ("n", "inf", None),
        ("n", "-0.0", Some("0")),
        ("n", "12345678901234567890", Some("12345678901234567168")),
        ("b", "True", Some("true")),
        ("b", "1", Some("true")),
        ("b", "no", Some("\"no\"")),
        ("b", " true ", Some("true")),
        ("o", "{\"a\": 1}", Some("{\"a\": 1}")),
        ("o", "{'a': 1}", Some("\"{'a': 1}\"")),
        ("o", "not json", Some("\"not json\"")),
        ("a", "[1, 'x']", Some("\"[1, 'x']\"")),
        ("a", "(1, 2)", Some("\"(1, 2)\"")),
        ("any_s", "123", Some("\"123\"")),
        ("any_s", "hi", Some("\"hi\"")),
        ("any_s", "null", Some("null")),
        ("en", "2", Some("2")),
        ("noschema", "42", Some("\"42\"")),
        ("noschema", "[1]", Some("\"[1]\"")),
        ("foo", "[1,2]", Some("[1, 2]")),
        ("foo", "hello", Some("\"hello\"")),
        ("foo", "{1,2}", Some("\"{1,2}\"")),
        ("unknown", "42", Some("\"42\"")),
    ];
    for &(key, value, want) in cases {
        let got = qwen3_arguments(&one_call(&[(key, value)]));
        let want = want.map(|w| format!("{{\"{key}\": {w}}}"));
        assert_eq!(got, want, "{key}={value:?}");
    }
}

#[test]
fn qwen3_coder_outputs_as_vllm_parses_them() {
    /// (output, content, calls as (name, arguments)).
    type Case<'a> = (&'a str, Option<&'a str>, &'a [(&'a str, &'a str)]);
    let cases: &[Case] = &[
        (
            "<tool_call>\n<function=f>\n<parameter=s>\nhello\n</parameter>\n<parameter=i>\n5\n</parameter>\n</function>\n</tool_call>",
            None,
            &[("f", "{\"s\": \"hello\", \"i\": 5}")],
        ),
        (
            "Let me check.\n\n<tool_call>\n<function=f>\n<parameter=s>\nx\n</parameter>\n</function>\n</tool_call>",
            Some("Let me check.\n\n"),
            &[("f", "{\"s\": \"x\"}")],
        ),
        // Whitespace alone before the call: `None` (vLLM's serving layer).
        (
            "\n\n<tool_call>\n<function=f>\n<parameter=s>\nx\n</parameter>\n</function>\n</tool_call>",
            None,
            &[("f", "{\"s\": \"x\"}")],
        ),
        (
            "<tool_call>\n<function=f>\n<parameter=i>\n1\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=g>\n<parameter=q>\nz\n</parameter>\n</function>\n</tool_call>",
            None,
            &[("f", "{\"i\": 1}"), ("g", "{\"q\": \"z\"}")],
        ),
        (
            "<tool_call>\n<function=f>\n<parameter=n>\n3.0\n</parameter>\n<parameter=b>\nTrue\n</parameter>\n<parameter=o>\n{\"k\": [1, 2]}\n</parameter>\n<parameter=a>\n['a', 'b']\n</parameter>\n<parameter=e>\nx\n</parameter>\n<parameter=u>\n[1,2]\n</parameter>\n</function>\n</tool_call>",
            None,
            &[("f", "{\"n\": 3, \"b\": true, \"o\": {\"k\": [1, 2]}, \"a\": \"['a', 'b']\", \"e\": \"x\", \"u\": [1, 2]}")],
        ),
        (
            "<tool_call>\n<function=f>\n<parameter=s>\nnull\n</parameter>\n<parameter=ns>\nnull\n</parameter>\n<parameter=i>\nNone\n</parameter>\n<parameter=any>\nnull\n</parameter>\n<parameter=ni>\n7\n</parameter>\n</function>\n</tool_call>",
            None,
            &[("f", "{\"s\": \"null\", \"ns\": null, \"i\": \"None\", \"any\": null, \"ni\": 7}")],
        ),
        (
            "<tool_call>\n<function=f>\n<parameter=i>\n5.5\n</parameter>\n<parameter=n>\nabc\n</parameter>\n<parameter=b>\nyes\n</parameter>\n<parameter=o>\nnot json\n</parameter>\n<parameter=zzz>\n42\n</parameter>\n</function>\n</tool_call>",
            None,
            &[("f", "{\"i\": 5.5, \"n\": \"abc\", \"b\": \"yes\", \"o\": \"not json\", \"zzz\": \"42\"}")],
        ),
        (
            "<tool_call>\n<function=f>\n<parameter=s>\n\nline1\nline2\n\n</parameter>\n</function>\n</tool_call>",
            None,
            &[("f", "{\"s\": \"\\nline1\\nline2\\n\"}")],
        ),
        (
            "<tool_call><function=f><parameter=s>  spaced  </parameter><parameter=i>  7 </parameter></function></tool_call>",
            None,
            &[("f", "{\"s\": \"  spaced  \", \"i\": 7}")],
        ),
        (
            "<tool_call>\n<function=f>\n<parameter=s>\nhéllo \"q\" \\ 中文\n</parameter>\n</function>\n</tool_call>",
            None,
            &[("f", "{\"s\": \"héllo \\\"q\\\" \\\\ 中文\"}")],
        ),
        // Cut off inside a value: Python's `$` before the final newline, then the trim.
        (
            "<tool_call>\n<function=f>\n<parameter=s>\nabc\n\n\n",
            None,
            &[("f", "{\"s\": \"abc\"}")],
        ),
    ];
    let format = qwen3_coder_format();
    for &(text, content, calls) in cases {
        let want = ParsedOutput {
            reasoning: None,
            content: content.map(str::to_owned),
            tool_calls: calls
                .iter()
                .enumerate()
                .map(|(i, (n, a))| call(i, n, a))
                .collect(),
        };
        let parsers = OutputParsers {
            reasoning: None,
            tool_calls: Some(format.clone()),
        };
        check_output(text, parsers, &want);
    }
    // A parameter without its `>` fails the whole parse: everything is content.
    let text = "<tool_call>\n<function=f>\n<parameter=s>\nx\n</parameter>\n<parameter=i";
    let (content, calls) = parse_tool_calls_as(text, &format, &mut ToolCallIds::from_seed(1));
    assert_eq!((content.as_deref(), calls.len()), (Some(text), 0));
}

/// vLLM `qwen3` (0.20–0.23) with Qwen3.5's prompts: thinking on (the prompt opens `<think>`)
/// or off (`enable_thinking: false`, or the prompt closes it).
#[test]
fn qwen3_reasoning_split() {
    let on = ReasoningRule::Qwen3 { thinking: true };
    let off = ReasoningRule::Qwen3 { thinking: false };
    let s = |x: &str| Some(x.to_owned());
    type Split = (Option<String>, Option<String>);
    let cases: &[(&str, ReasoningRule, Split)] = &[
        (
            "<think>\nabc\n</think>\n\nanswer",
            on,
            (s("\nabc\n"), s("\n\nanswer")),
        ),
        ("abc\n</think>\n\nanswer", on, (s("abc\n"), s("\n\nanswer"))),
        ("still thinking", on, (s("still thinking"), None)),
        ("answer only", off, (None, s("answer only"))),
        // A tool call ends unfinished reasoning; the call is content, for the tool parser.
        (
            "plan\n<tool_call>\n<function=f>\n</function>\n</tool_call>",
            on,
            (
                s("plan\n"),
                s("<tool_call>\n<function=f>\n</function>\n</tool_call>"),
            ),
        ),
        (
            "<tool_call>x</tool_call>",
            on,
            (None, s("<tool_call>x</tool_call>")),
        ),
    ];
    for (text, rule, want) in cases {
        assert_eq!(
            &parse_reasoning_with(text, *rule),
            want,
            "{text:?} {rule:?}"
        );
        let parsers = OutputParsers {
            reasoning: Some(*rule),
            tool_calls: None,
        };
        // Through the chained parsers, whole and streamed (where "no reasoning" and empty
        // reasoning read the same).
        let got = parse_output(text, &parsers, &mut ToolCallIds::from_seed(SEED));
        let nonempty = |r: Option<String>| r.filter(|r| !r.is_empty());
        assert_eq!(
            (nonempty(got.reasoning), got.content),
            want.clone(),
            "{text:?}"
        );
        for (how, pieces) in all_chunkings(text) {
            let (streamed, _) = stream_output(parsers.clone(), &pieces);
            assert_eq!(
                (nonempty(streamed.reasoning), streamed.content),
                want.clone(),
                "streamed by {how}: {text:?}"
            );
        }
    }
}

/// Thinking with tools under the Qwen3.5 parsers, streamed and whole.
#[test]
fn qwen3_reasoning_then_qwen3_coder_calls() {
    let parsers = OutputParsers {
        reasoning: Some(ReasoningRule::Qwen3 { thinking: true }),
        tool_calls: Some(qwen3_coder_format()),
    };
    let text = "I need the weather.\n</think>\n\n<tool_call>\n<function=f>\n<parameter=s>\nParis\n</parameter>\n</function>\n</tool_call>";
    check_output(
        text,
        parsers.clone(),
        &ParsedOutput {
            reasoning: Some("I need the weather.\n".into()),
            content: None,
            tool_calls: vec![call(0, "f", "{\"s\": \"Paris\"}")],
        },
    );
    // The call inside unclosed reasoning is still found.
    let text = "I need the weather.\n<tool_call>\n<function=f>\n<parameter=s>\nParis\n</parameter>\n</function>\n</tool_call>";
    check_output(
        text,
        parsers,
        &ParsedOutput {
            reasoning: Some("I need the weather.\n".into()),
            content: None,
            tool_calls: vec![call(0, "f", "{\"s\": \"Paris\"}")],
        },
    );
}
