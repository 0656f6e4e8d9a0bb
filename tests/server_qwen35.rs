//! The server on a Qwen3.5 checkpoint (`tests/fixtures/q35-chat`: the family's layout and its
//! `chat_template.jinja`, a small tokenizer with Qwen's special tokens): prompts rendered as
//! transformers renders them, and the family's parsers (`qwen3` reasoning, `qwen3_coder` tool
//! calls, chosen for the family by default) wired to the request's thinking switch.

mod server_common;

use qnext::server::ReasoningParser;
use serde_json::{json, Value};
use server_common::{fixture, post, start, MODEL};

/// A golden case of `goldens_qwen35.json` (tools/gen_chat_goldens.py, transformers).
fn golden(name: &str) -> Value {
    let path = fixture("chat_templates/goldens_qwen35.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no golden {name}"))
        .clone()
}

#[test]
fn renders_like_transformers_and_parses_as_the_family() {
    let server = start(|c| {
        c.model = fixture("q35-chat").display().to_string();
        c.reasoning_parser = ReasoningParser::Qwen3;
    });
    let a = server.addr();
    for name in [
        "qwen3.5/typed_arguments_and_reasoning/enable_thinking=False",
        "qwen3.5/typed_arguments_and_reasoning",
        "qwen3.5/tools_with_system",
    ] {
        let case = golden(name);
        let mut body =
            json!({"model": MODEL, "messages": case["messages"], "tools": case["tools"]});
        if case["extra"].as_object().is_some_and(|e| !e.is_empty()) {
            body["chat_template_kwargs"] = case["extra"].clone();
        }
        let rendered = post(a, "/v1/chat/completions/render", &body);
        assert_eq!(rendered.status, 200, "{name}: {}", rendered.text());
        let ids = rendered.json()["token_ids"].clone();
        let text = post(a, "/detokenize", &json!({"model": MODEL, "tokens": ids})).json();
        assert_eq!(text["prompt"], case["expected"], "{name}");
    }

    // Thinking on (the prompt opens <think>): with random weights no `</think>` comes, so the
    // whole output is reasoning. Thinking off: it is all content.
    let ask = |kwargs: Value| {
        let r = post(
            a,
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 6, "temperature": 0, "chat_template_kwargs": kwargs}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["choices"][0]["message"].clone()
    };
    let on = ask(json!({}));
    let off = ask(json!({"enable_thinking": false}));
    let reasoning = on["reasoning_content"].as_str().unwrap_or("");
    assert!(!reasoning.is_empty(), "{on}");
    assert!(on["content"].is_null(), "{on}");
    assert!(
        off["content"].as_str().is_some_and(|c| !c.is_empty()),
        "{off}"
    );
    assert!(
        off.get("reasoning_content").is_none_or(Value::is_null),
        "{off}"
    );
}

/// The next turn of a thinking chat reuses the last one's states: the Qwen3.5 template renders
/// the earlier answer without its reasoning, so the prompt departs from the cached one right
/// after the last message, where a snapshot is kept.
#[test]
fn next_turn_reuses_the_prefix() {
    let server = start(|c| {
        c.model = fixture("q35-chat").display().to_string();
        c.reasoning_parser = ReasoningParser::Qwen3;
    });
    let a = server.addr();
    let question = "Tell me about the delta rule and gated attention. ".repeat(20);
    let mut messages = vec![json!({"role": "user", "content": question})];
    let turn = |messages: &Vec<Value>| {
        let r = post(
            a,
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    let first = turn(&messages);
    let prompt1 = first["usage"]["prompt_tokens"].as_u64().unwrap();
    let answer = &first["choices"][0]["message"];
    messages.push(
        json!({"role": "assistant", "content": answer["content"].as_str().unwrap_or("ok"),
                         "reasoning_content": answer["reasoning_content"]}),
    );
    messages.push(json!({"role": "user", "content": "And in one sentence?"}));
    let second = turn(&messages);
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    eprintln!("first prompt {prompt1} tokens, second turn cached {cached}");
    // All of the first prompt but its generation prompt (`<|im_start|>assistant\n<think>\n`).
    assert!(
        cached + 16 >= prompt1 && cached < prompt1,
        "cached {cached} of the first prompt's {prompt1}"
    );
}
