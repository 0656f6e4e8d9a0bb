//! The fuzz targets' bodies, shared by `cargo fuzz` (`fuzz/fuzz_targets/*.rs`, coverage-guided,
//! nightly) and by `tests/fuzz_corpora.rs` (every file of `fuzz/corpus/*` as a regression
//! test, on stable). Each takes arbitrary bytes and panics only where qnext would: a bad input
//! must come back as an error, never as a crash, and the properties checked here hold for
//! every input.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use qnext::sampling::{Sampler, SamplingParams};
use qnext::server::params::{common_with, Body, Defaults};
use qnext::text::{
    parse_output, ChatTemplate, OrderedJson, OutputParsers, OutputStream, ReasoningRule,
    RenderLimits, ToolCallIds, ToolFormat, ToolSchemas,
};

/// The repository: this file is built from its root (the tests) and from `fuzz/`.
fn repo() -> &'static Path {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    if here.ends_with("fuzz") {
        here.parent().expect("fuzz/ is inside the repository")
    } else {
        here
    }
}

fn fixtures() -> PathBuf {
    repo().join("tests/fixtures")
}

/// A request body → the sampling parameters → a few sampling steps over fixed logits: any
/// body is either refused with an error naming a parameter or gives parameters that sample.
pub fn request(data: &[u8]) {
    const VOCAB: usize = 64;
    let defaults = SamplingParams::default();
    let eos = [3u32];
    let Ok(body) = Body::parse(data) else {
        return;
    };
    let common = match common_with(
        &body,
        &Defaults {
            sampling: &defaults,
            vocab_size: VOCAB,
            eos_token_ids: &eos,
        },
    ) {
        Ok(c) => c,
        Err(e) => {
            assert!(e.status.is_client_error(), "{e:?}");
            return;
        }
    };
    assert!(common.n >= 1);
    assert!(common.stop_token_ids.iter().all(|&t| (t as usize) < VOCAB));
    let mut params = common.sampling;
    params.seed = common.seed;
    params
        .validate()
        .unwrap_or_else(|e| panic!("accepted parameters do not validate: {e:#}"));
    let mut sampler = Sampler::new(params).expect("validated parameters make a sampler");
    let logits: Vec<f32> = (0..VOCAB)
        .map(|i| ((i * 37) % 17) as f32 * 0.3 - 2.0)
        .collect();
    let mut out: Vec<u32> = Vec::new();
    for _ in 0..4 {
        // A request's logit_bias may leave no token possible: an error, not a panic.
        match sampler.sample(&logits, &[1, 2], &out) {
            Ok(t) => {
                assert!((t as usize) < VOCAB);
                out.push(t);
            }
            Err(_) => break,
        }
    }
}

fn templates() -> &'static [ChatTemplate] {
    static T: OnceLock<Vec<ChatTemplate>> = OnceLock::new();
    T.get_or_init(|| {
        ["instruct", "thinking"]
            .iter()
            .map(|v| {
                let path = fixtures().join(format!("chat_templates/tokenizer_config.{v}.json"));
                let mut t = ChatTemplate::from_file(path).expect("fixture template");
                // Small bounds keep each input fast; the bounds themselves are under test.
                t.set_limits(RenderLimits {
                    max_output_bytes: 1 << 20,
                    fuel: 2_000_000,
                });
                t
            })
            .collect()
    })
}

/// `{"messages": …, "tools": …, "kwargs": {…}, "add_generation_prompt": …}` rendered by the
/// real Qwen3-Next templates: hostile messages and tools give text or an error.
pub fn chat_template(data: &[u8]) {
    let doc = match std::str::from_utf8(data)
        .ok()
        .and_then(|t| OrderedJson::parse(t).ok())
    {
        Some(doc) => doc,
        None => conversation_of(data),
    };
    let messages = doc.get("messages").cloned().unwrap_or(OrderedJson::Null);
    let tools = doc.get("tools").cloned();
    let add = !matches!(
        doc.get("add_generation_prompt"),
        Some(OrderedJson::Bool(false))
    );
    let extra: Vec<(String, OrderedJson)> = match doc.get("kwargs") {
        Some(OrderedJson::Object(kv)) => kv.clone(),
        _ => Vec::new(),
    };
    for t in templates() {
        if let Ok(out) = t.render_ordered(&messages, tools.as_ref(), add, &extra) {
            assert!(out.len() <= 1 << 20);
        }
    }
}

/// Bytes that are not a JSON document, read as a conversation, so that most inputs reach the
/// templates: pieces split at 0xFF, each a message whose first byte picks its role and shape
/// (plain text, a list of parts, reasoning, tool calls with JSON or text arguments, a tool
/// result) and whose other bytes are its text; a first piece starting with 0xFE declares tools.
fn conversation_of(data: &[u8]) -> OrderedJson {
    use OrderedJson as J;
    let text = |b: &[u8]| J::String(String::from_utf8_lossy(b).into_owned());
    let obj =
        |kv: Vec<(&str, J)>| J::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect());
    let mut messages = Vec::new();
    let mut tools = None;
    for (i, piece) in data.split(|&b| b == 0xFF).enumerate() {
        let Some((&kind, rest)) = piece.split_first() else {
            continue;
        };
        if i == 0 && kind == 0xFE {
            let names = rest.split(|&b| b == b',').map(|n| {
                obj(vec![
                    ("type", J::String("function".into())),
                    (
                        "function",
                        obj(vec![("name", text(n)), ("parameters", obj(vec![]))]),
                    ),
                ])
            });
            tools = Some(J::Array(names.collect()));
            continue;
        }
        let role = ["system", "user", "assistant", "tool", "developer", ""][kind as usize % 6];
        let mut m = vec![("role", J::String(role.into()))];
        match (kind / 6) % 5 {
            0 => m.push(("content", text(rest))),
            1 => m.push((
                "content",
                J::Array(vec![obj(vec![
                    ("type", J::String("text".into())),
                    ("text", text(rest)),
                ])]),
            )),
            2 => {
                m.push(("content", text(rest)));
                m.push(("reasoning_content", text(&rest[..rest.len() / 2])));
            }
            3 => {
                let args = match OrderedJson::parse(&String::from_utf8_lossy(rest)) {
                    Ok(v) => v,
                    Err(_) => text(rest),
                };
                m.push(("content", J::Null));
                m.push((
                    "tool_calls",
                    J::Array(vec![obj(vec![
                        ("type", J::String("function".into())),
                        (
                            "function",
                            obj(vec![
                                ("name", text(&rest[..rest.len().min(8)])),
                                ("arguments", args),
                            ]),
                        ),
                    ])]),
                ));
            }
            _ => {
                m.push(("content", text(rest)));
                m.push(("tool_call_id", text(&rest[..rest.len().min(4)])));
            }
        }
        messages.push(obj(m));
    }
    let mut doc = vec![("messages", J::Array(messages))];
    if let Some(t) = tools {
        doc.push(("tools", t));
    }
    doc.push((
        "add_generation_prompt",
        J::Bool(data.first().is_some_and(|b| b & 1 == 0)),
    ));
    obj(doc)
}

/// Model output (any text, cut into pieces where the input says) through the reasoning and
/// tool-call parsers, whole and streamed: no panics, and the streamed text is what the whole
/// parse gives wherever the parsers promise that (no tool call found when streaming, or the
/// output does not start with text before `<think>`).
pub fn output_parsers(data: &[u8]) {
    let Some((&cuts, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let chars: Vec<char> = text.chars().collect();
    // Pieces of 1 + (cuts >> k) % 5 characters: every split of a tag happens for some input.
    let mut pieces = Vec::new();
    let (mut i, mut k) = (0, 0u32);
    while i < chars.len() {
        let len = 1 + ((cuts as usize).rotate_left(k) % 5);
        let end = (i + len).min(chars.len());
        pieces.push(chars[i..end].iter().collect::<String>());
        i = end;
        k += 1;
    }
    // Qwen3-Next's parsers, then Qwen3.5's (`qwen3` reasoning both ways, `qwen3_coder` with a
    // typed schema).
    let schemas = {
        let tools = serde_json::json!([{"type": "function", "function": {"name": "f",
            "parameters": {"properties": {"i": {"type": "integer"}, "n": {"type": "number"},
                "b": {"type": "boolean"}, "o": {"type": "object"},
                "s": {"type": ["string", "null"]}}}}}]);
        ToolSchemas::from_tools(Some(&tools))
    };
    let mut all: Vec<OutputParsers> = [(true, true), (true, false), (false, true), (false, false)]
        .into_iter()
        .map(|(r, t)| OutputParsers::qwen3_next(r, t))
        .collect();
    for thinking in [true, false] {
        for tools in [true, false] {
            all.push(OutputParsers {
                reasoning: Some(ReasoningRule::Qwen3 { thinking }),
                tool_calls: tools.then(|| ToolFormat::Qwen3Coder(schemas.clone())),
            });
        }
    }
    all.push(OutputParsers {
        reasoning: None,
        tool_calls: Some(ToolFormat::Qwen3Coder(schemas.clone())),
    });
    for parsers in all {
        let (reasoning, tool_calls) = (parsers.reasoning.is_some(), parsers.tool_calls.is_some());
        // Without thinking, the qwen3 rule makes everything content.
        let reasoning_off = parsers.reasoning == Some(ReasoningRule::Qwen3 { thinking: false });
        let whole = parse_output(&text, &parsers, &mut ToolCallIds::from_seed(7));
        let mut s = OutputStream::new(&parsers, ToolCallIds::from_seed(7));
        let (mut r, mut c, mut calls) = (String::new(), String::new(), 0usize);
        let mut deltas: Vec<_> = pieces.iter().map(|p| s.push(p)).collect();
        deltas.push(s.finish());
        for d in deltas {
            r.push_str(d.reasoning.as_deref().unwrap_or(""));
            c.push_str(d.content.as_deref().unwrap_or(""));
            calls += d.tool_calls.iter().filter(|t| t.id.is_some()).count();
        }
        let plain = match text.find("<think>") {
            None => true,
            Some(at) => text[..at].trim().is_empty(),
        };
        if (!reasoning || reasoning_off) && !tool_calls {
            assert_eq!(c, text.as_ref());
        }
        if reasoning && !tool_calls && plain {
            assert_eq!(r, whole.reasoning.clone().unwrap_or_default(), "{text:?}");
            assert_eq!(c, whole.content.clone().unwrap_or_default(), "{text:?}");
        }
        if tool_calls && !reasoning && (calls == 0 || !whole.tool_calls.is_empty()) {
            assert_eq!(calls, whole.tool_calls.len(), "{text:?}");
            assert_eq!(c, whole.content.clone().unwrap_or_default(), "{text:?}");
        }
    }
}

/// `config.json` text: refused with an error, or a configuration whose derived sizes can be
/// computed without overflow.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = qnext::config::Config::from_json_str(text) else {
        return;
    };
    let _ = cfg.context_length();
    let _ = cfg.rotary_dim();
    let _ = cfg.linear_key_dim();
    let _ = cfg.linear_value_dim();
    let _ = cfg.linear_conv_dim();
    for l in 0..cfg.num_hidden_layers {
        let _ = cfg.is_moe_layer(l);
    }
}

/// A safetensors header (the JSON after the 8-byte length) in front of the tensors' bytes of
/// the `fp8-bf16scale` fixture, loaded as that checkpoint: wrong shapes, dtypes, offsets and
/// names give an error that names the tensor, never a panic or an out-of-bounds read.
pub fn safetensors_header(data: &[u8]) {
    let _ = load_with_header(data);
}

/// The fixture checkpoint with `header` as its shard's header.
pub fn load_with_header(header: &[u8]) -> anyhow::Result<qnext::model::Model> {
    let data = header;
    static DATA: OnceLock<(PathBuf, Vec<u8>)> = OnceLock::new();
    let (fixture, payload) = DATA.get_or_init(|| {
        let dir = fixtures().join("fp8-bf16scale");
        let file = std::fs::read(dir.join("model.safetensors")).expect("fixture weights");
        let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
        (dir, file[8 + n..].to_vec())
    });
    let dir = tempfile::tempdir().expect("a temporary folder");
    for f in ["config.json", "generation_config.json"] {
        if fixture.join(f).exists() {
            std::fs::copy(fixture.join(f), dir.path().join(f)).expect("copy the config");
        }
    }
    let mut file = (data.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(data);
    file.extend_from_slice(payload);
    std::fs::write(dir.path().join("model.safetensors"), file).expect("write the shard");
    qnext::model::Model::load(dir.path())
}

/// The file names of a target's corpus, for the regression test.
pub fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = repo().join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a corpus entry").path())
        .collect();
    files.sort();
    files
}
