//! The OpenAI-compatible server over loopback: chat and completions (streamed and not),
//! usage, stop strings across token boundaries, seeds, logprobs, n, tools, the small
//! endpoints, API keys and every kind of bad input.

mod server_common;

use qnext::server::ServerHandle;
use serde_json::{json, Value};
use server_common::*;
use std::net::SocketAddr;
use std::sync::OnceLock;

fn addr() -> SocketAddr {
    static SERVER: OnceLock<ServerHandle> = OnceLock::new();
    SERVER
        .get_or_init(|| start(|c| c.api_key = Some(KEY.into())))
        .addr()
}

fn chat(body: Value) -> Value {
    let r = post(addr(), "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn completion(body: Value) -> Value {
    let r = post(addr(), "/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

#[test]
fn health_models_version_and_auth() {
    let a = addr();
    let h = request(a, "GET", "/health", &[], None);
    assert_eq!(h.status, 200);
    let m = get(a, "/v1/models").json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], MODEL);
    assert_eq!(m["data"][0]["max_model_len"], 2048);
    assert_eq!(get(a, &format!("/v1/models/{MODEL}")).json()["id"], MODEL);
    get(a, "/v1/models/other").error(404);
    assert!(get(a, "/version").json()["version"].is_string());

    // /v1 needs the key; health and metrics do not.
    let e = request(a, "GET", "/v1/models", &[], None).error(401);
    assert_eq!(e["code"], "invalid_api_key");
    request(
        a,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer wrong")],
        None,
    )
    .error(401);
    let body = serde_json::to_vec(&json!({"messages": user("hi"), "max_tokens": 1})).unwrap();
    request(a, "POST", "/v1/chat/completions", &[], Some(&body)).error(401);
    assert_eq!(request(a, "GET", "/metrics", &[], None).status, 200);
}

#[test]
fn chat_non_streamed_and_streamed_agree() {
    let req = json!({"model": MODEL, "messages": user("Tell me a story."), "max_tokens": 12,
                     "temperature": 0});
    let r = chat(req.clone());
    assert!(r["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["model"], MODEL);
    assert!(r["created"].as_u64().unwrap() > 0);
    let choice = &r["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["finish_reason"], "length");
    let text = choice["message"]["content"].as_str().unwrap().to_owned();
    assert!(!text.is_empty());
    // Usage: the prompt is the rendered template, as /tokenize counts it.
    let tokenized = post(
        addr(),
        "/tokenize",
        &json!({"messages": user("Tell me a story.")}),
    )
    .json();
    assert_eq!(r["usage"]["prompt_tokens"], tokenized["count"]);
    assert_eq!(r["usage"]["completion_tokens"], 12);
    assert_eq!(
        r["usage"]["total_tokens"],
        tokenized["count"].as_u64().unwrap() + 12
    );

    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let s = post(addr(), "/v1/chat/completions", &sreq);
    assert_eq!(s.status, 200);
    assert!(s
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let ev = s.events();
    assert_eq!(ev.last().unwrap(), "[DONE]");
    assert_eq!(ev[0]["object"], "chat.completion.chunk");
    assert_eq!(ev[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(stream_text(&ev, 0, "content"), text);
    let finish: Vec<&Value> = ev
        .iter()
        .filter_map(|e| e["choices"].get(0))
        .filter(|c| !c["finish_reason"].is_null())
        .collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(finish[0]["finish_reason"], "length");
    let usage = &ev[ev.len() - 2];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(uncached(&usage["usage"]), uncached(&r["usage"]));
    // The same prompt a second time: all but its last chunk come from the prefix cache.
    assert!(usage["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64() > Some(0));
    // Without include_usage there is no usage chunk.
    sreq.as_object_mut().unwrap().remove("stream_options");
    let ev = post(addr(), "/v1/chat/completions", &sreq).events();
    assert!(ev.iter().all(|e| e.get("usage").is_none()));
}

#[test]
fn completions_forms() {
    let r = completion(
        json!({"prompt": "The capital of France is", "max_tokens": 8,
                              "temperature": 0}),
    );
    assert!(r["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(r["object"], "text_completion");
    let text = r["choices"][0]["text"].as_str().unwrap().to_owned();
    assert_eq!(r["usage"]["completion_tokens"], 8);
    let ids = post(
        addr(),
        "/tokenize",
        &json!({"prompt": "The capital of France is"}),
    )
    .json();
    assert_eq!(r["usage"]["prompt_tokens"], ids["count"]);

    // Token ids give the same as the text; a batch gives one choice per prompt, in order.
    let by_ids = completion(json!({"prompt": ids["tokens"], "max_tokens": 8, "temperature": 0}));
    assert_eq!(by_ids["choices"][0]["text"], text.as_str());
    let batch = completion(
        json!({"prompt": ["Hello there", "The capital of France is"],
                                  "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(batch["choices"].as_array().unwrap().len(), 2);
    assert_eq!(batch["choices"][1]["index"], 1);
    assert_eq!(batch["choices"][1]["text"], text.as_str());
    assert_eq!(batch["usage"]["completion_tokens"], 16);

    // echo puts the prompt in front.
    let echoed = completion(
        json!({"prompt": "The capital of France is", "max_tokens": 8,
                                   "temperature": 0, "echo": true}),
    );
    assert_eq!(
        echoed["choices"][0]["text"],
        format!("The capital of France is{text}")
    );

    // Streaming gives the same text.
    let ev = post(
        addr(),
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
                "stream": true, "stream_options": {"include_usage": true}}),
    )
    .events();
    assert_eq!(stream_text(&ev, 0, "text"), text);
    assert_eq!(ev.last().unwrap(), "[DONE]");
    assert_eq!(ev[ev.len() - 2]["usage"], r["usage"]);
}

/// A greedy run's text and the string of each of its tokens.
fn greedy_tokens(prompt: &str, max_tokens: usize) -> (String, Vec<String>) {
    let r = completion(
        json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                              "logprobs": 0}),
    );
    let c = &r["choices"][0];
    let toks = c["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    (c["text"].as_str().unwrap().to_owned(), toks)
}

#[test]
fn stop_strings_across_token_boundaries() {
    let prompt = "Once upon a time";
    let (text, toks) = greedy_tokens(prompt, 24);
    assert_eq!(
        toks.concat(),
        text,
        "the fixture's tokens are whole characters"
    );
    // A stop string made of the end of one token and the start of the next.
    let k = (3..toks.len() - 1)
        .find(|&k| {
            toks[k].chars().count() >= 2
                && toks[k + 1].chars().count() >= 2
                && !toks[k].contains('\u{FFFD}')
                && !toks[k + 1].contains('\u{FFFD}')
        })
        .expect("two tokens of two characters or more");
    let tail: String = {
        let c: Vec<char> = toks[k].chars().collect();
        c[c.len() - 2..].iter().collect()
    };
    let head: String = toks[k + 1].chars().take(2).collect();
    let stop = format!("{tail}{head}");
    let cut = text.find(&stop).unwrap();
    let expected = &text[..cut];

    for stream in [false, true] {
        let body = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0,
                          "stop": [stop.clone(), "never-in-output"], "stream": stream,
                          "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null }});
        let r = post(addr(), "/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let (got, finish, stop_reason, usage) = if stream {
            let ev = r.events();
            let fin = ev
                .iter()
                .filter_map(|e| e["choices"].get(0))
                .find(|c| !c["finish_reason"].is_null())
                .unwrap()
                .clone();
            (
                stream_text(&ev, 0, "text"),
                fin["finish_reason"].clone(),
                fin["stop_reason"].clone(),
                ev[ev.len() - 2]["usage"].clone(),
            )
        } else {
            let v = r.json();
            let c = &v["choices"][0];
            (
                c["text"].as_str().unwrap().to_owned(),
                c["finish_reason"].clone(),
                c["stop_reason"].clone(),
                v["usage"].clone(),
            )
        };
        assert_eq!(got, expected, "stream={stream}");
        assert_eq!(finish, "stop");
        assert_eq!(stop_reason, stop.as_str());
        // Tokens up to the one that completed the stop string.
        assert_eq!(usage["completion_tokens"], k + 2);
    }

    // include_stop_str_in_output keeps it.
    let r = completion(json!({"prompt": prompt, "max_tokens": 24, "temperature": 0,
                              "stop": stop, "include_stop_str_in_output": true}));
    assert_eq!(r["choices"][0]["text"], format!("{expected}{stop}"));

    // Chat: the same rule on the chat text, streamed and not.
    let base = chat(json!({"messages": user("Hi"), "max_tokens": 24, "temperature": 0}));
    let ctext = base["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let chars: Vec<char> = ctext.chars().collect();
    let cstop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let cexpected = &ctext[..ctext.find(&cstop).unwrap()];
    let r = chat(
        json!({"messages": user("Hi"), "max_tokens": 24, "temperature": 0,
                        "stop": cstop}),
    );
    assert_eq!(r["choices"][0]["message"]["content"], cexpected);
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    let ev = post(
        addr(),
        "/v1/chat/completions",
        &json!({"messages": user("Hi"), "max_tokens": 24, "temperature": 0, "stop": cstop,
                "stream": true}),
    )
    .events();
    assert_eq!(stream_text(&ev, 0, "content"), cexpected);
}

#[test]
fn stop_token_ids_and_ignore_eos() {
    let (_, toks) = greedy_tokens("Hello", 6);
    let ids = post(addr(), "/tokenize", &json!({"prompt": toks[2]})).json()["tokens"].clone();
    let id = ids[0].as_u64().unwrap();
    if ids.as_array().unwrap().len() == 1 {
        let r = completion(json!({"prompt": "Hello", "max_tokens": 6, "temperature": 0,
                                  "stop_token_ids": [id]}));
        let c = &r["choices"][0];
        assert_eq!(c["text"], toks[..2].concat());
        assert_eq!(c["finish_reason"], "stop");
        assert_eq!(c["stop_reason"], id);
        assert_eq!(r["usage"]["completion_tokens"], 3);
    }
    // EOS forced by logit_bias ends the output at once, unless ignore_eos.
    let r = completion(json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0,
                              "logit_bias": {"151645": 100}}));
    assert_eq!(r["choices"][0]["text"], "");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert_eq!(r["choices"][0]["stop_reason"], Value::Null);
    assert_eq!(r["usage"]["completion_tokens"], 1);
    let r = completion(json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0,
                              "logit_bias": {"151645": 100}, "ignore_eos": true}));
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 4);
    let r = completion(json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0,
                              "logit_bias": {"151645": 100}, "ignore_eos": true,
                              "skip_special_tokens": false}));
    assert_eq!(r["choices"][0]["text"], "<|im_end|>".repeat(4));
}

#[test]
fn seeds_and_n() {
    let req = |seed: u64, n: usize| {
        completion(
            json!({"prompt": "Random words:", "max_tokens": 10, "temperature": 1.0,
                          "top_k": 0, "top_p": 1.0, "seed": seed, "n": n}),
        )
    };
    let a = req(42, 1);
    let b = req(42, 1);
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    // Choice i of a seeded request samples with seed + i.
    let two = req(42, 2);
    assert_eq!(two["choices"].as_array().unwrap().len(), 2);
    assert_eq!(two["choices"][0]["text"], a["choices"][0]["text"]);
    assert_eq!(two["choices"][1]["text"], req(43, 1)["choices"][0]["text"]);
    assert_eq!(two["usage"]["completion_tokens"], 20);
    assert_eq!(two["usage"]["prompt_tokens"], a["usage"]["prompt_tokens"]);
    // Different seeds differ (10 tokens from 152k at temperature 1).
    assert_ne!(req(7, 1)["choices"][0]["text"], a["choices"][0]["text"]);

    // n in chat, streamed: every choice gets its role, text and finish reason.
    let ev = post(
        addr(),
        "/v1/chat/completions",
        &json!({"messages": user("Hi"), "max_tokens": 5, "n": 3, "seed": 1, "stream": true}),
    )
    .events();
    for i in 0..3u64 {
        let of_i: Vec<&Value> = ev
            .iter()
            .filter_map(|e| e["choices"].get(0))
            .filter(|c| c["index"] == i)
            .collect();
        assert_eq!(of_i[0]["delta"]["role"], "assistant");
        assert_eq!(of_i.last().unwrap()["finish_reason"], "length");
    }
    let nonstream = chat(json!({"messages": user("Hi"), "max_tokens": 5, "n": 3, "seed": 1}));
    for i in 0..3 {
        assert_eq!(
            nonstream["choices"][i]["message"]["content"],
            stream_text(&ev, i as u64, "content")
        );
    }
}

#[test]
fn logprobs_chat_and_completions() {
    let r = chat(
        json!({"messages": user("Hi"), "max_tokens": 6, "temperature": 0,
                        "logprobs": true, "top_logprobs": 3}),
    );
    let content = r["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(content.len(), 6);
    let mut joined = Vec::new();
    for e in &content {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], e["token"]);
        assert_eq!(top[0]["logprob"], e["logprob"]);
        assert!(e["logprob"].as_f64().unwrap() <= 0.0);
        let bytes: Vec<u8> = e["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        joined.extend(bytes);
    }
    assert_eq!(
        String::from_utf8_lossy(&joined),
        r["choices"][0]["message"]["content"].as_str().unwrap()
    );
    // Without logprobs: null.
    let r = chat(json!({"messages": user("Hi"), "max_tokens": 2}));
    assert!(r["choices"][0]["logprobs"].is_null());

    // Streamed chat logprobs: one entry per token.
    let ev = post(
        addr(),
        "/v1/chat/completions",
        &json!({"messages": user("Hi"), "max_tokens": 6, "temperature": 0, "logprobs": true,
                "stream": true}),
    )
    .events();
    let streamed: Vec<Value> = ev
        .iter()
        .filter_map(|e| e["choices"].get(0))
        .filter_map(|c| c["logprobs"]["content"].as_array())
        .flatten()
        .cloned()
        .collect();
    assert_eq!(streamed.len(), 6);
    for (s, e) in streamed.iter().zip(&content) {
        assert_eq!(s["token"], e["token"]);
        assert_eq!(s["logprob"], e["logprob"]);
    }

    let r = completion(json!({"prompt": "Hello", "max_tokens": 5, "temperature": 0,
                              "logprobs": 2}));
    let lp = &r["choices"][0]["logprobs"];
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(lp[key].as_array().unwrap().len(), 5, "{key}");
    }
    assert_eq!(lp["text_offset"][0], 0);
    let toks: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        lp["text_offset"][1].as_u64().unwrap() as usize,
        toks[0].chars().count()
    );
    assert!(lp["top_logprobs"][0].as_object().unwrap().len() >= 2);
}

#[test]
fn tools_are_rendered_and_parsed_output_stays_content_when_malformed() {
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "description": "Weather of a city", "parameters": {"type": "object",
        "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let with = post(
        addr(),
        "/tokenize",
        &json!({"messages": user("Weather in Paris?"), "tools": tools}),
    )
    .json();
    let without = post(
        addr(),
        "/tokenize",
        &json!({"messages": user("Weather in Paris?")}),
    )
    .json();
    assert!(with["count"].as_u64() > without["count"].as_u64());
    assert_eq!(with["max_model_len"], 2048);
    let text = post(addr(), "/detokenize", &json!({"tokens": with["tokens"]})).json()["prompt"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(text.starts_with("<|im_start|>system\n# Tools"), "{text}");
    assert!(text.contains(
        "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Weather of a city\""
    ));
    assert!(text.ends_with("<|im_start|>assistant\n"));
    let no_gen = post(
        addr(),
        "/tokenize",
        &json!({"messages": user("x"), "add_generation_prompt": false}),
    )
    .json();
    let t = post(addr(), "/detokenize", &json!({"tokens": no_gen["tokens"]})).json();
    assert_eq!(t["prompt"], "<|im_start|>user\nx<|im_end|>\n");

    // A tool-calling conversation renders (assistant tool_calls with string arguments, tool
    // results).
    let convo = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
    ]);
    let r = post(
        addr(),
        "/tokenize",
        &json!({"messages": convo, "tools": tools}),
    )
    .json();
    let t = post(addr(), "/detokenize", &json!({"tokens": r["tokens"]})).json();
    let p = t["prompt"].as_str().unwrap();
    assert!(p.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"), "{p}");
    assert!(p.contains("<tool_response>\n22 C\n</tool_response>"), "{p}");

    // The random model cannot write a well-formed call; a forced `<tool_call>` is malformed
    // and stays content, streamed or not.
    let req = json!({"messages": user("Weather in Paris?"), "tools": tools, "max_tokens": 3,
                     "temperature": 0, "logit_bias": {"151657": 100}});
    let r = chat(req.clone());
    let c = &r["choices"][0];
    assert_eq!(c["message"]["content"], "<tool_call>".repeat(3));
    assert!(c["message"].get("tool_calls").is_none());
    assert_eq!(c["finish_reason"], "length");
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let ev = post(addr(), "/v1/chat/completions", &sreq).events();
    assert_eq!(stream_text(&ev, 0, "content"), "<tool_call>".repeat(3));
    // tool_choice "none" keeps the tools in the prompt but parses nothing.
    let mut none = req.clone();
    none["tool_choice"] = json!("none");
    assert_eq!(
        chat(none)["choices"][0]["message"]["content"],
        "<tool_call>".repeat(3)
    );
}

/// A `usage` object without `prompt_tokens_details`, which depends on what was cached.
fn uncached(usage: &Value) -> Value {
    let mut u = usage.clone();
    u.as_object_mut()
        .expect("usage is an object")
        .remove("prompt_tokens_details");
    u
}

#[test]
fn content_parts_and_multi_turn() {
    let parts = chat(json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}],
        "max_tokens": 4, "temperature": 0}));
    let plain = chat(json!({"messages": user("Hello\nthere"), "max_tokens": 4,
                            "temperature": 0}));
    assert_eq!(
        parts["choices"][0]["message"],
        plain["choices"][0]["message"]
    );
    assert_eq!(uncached(&parts["usage"]), uncached(&plain["usage"]));
    let r = chat(json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"}], "max_tokens": 3,
        "max_completion_tokens": 2}));
    assert_eq!(r["usage"]["completion_tokens"], 2);
}

#[test]
fn bad_requests_name_the_parameter() {
    let a = addr();
    let chat_cases: Vec<(Value, &str)> = vec![
        (json!({}), "messages"),
        (json!({"messages": []}), "messages"),
        (json!({"messages": "hi"}), "messages"),
        (json!({"messages": [5]}), "messages[0]"),
        (json!({"messages": [{"content": "x"}]}), "messages[0].role"),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": 5}]}),
            "messages[0].content",
        ),
        (
            json!({"messages": [{"role": "user"}]}),
            "messages[0].content",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url",
            "image_url": {"url": "http://x"}}]}]}),
            "messages[0].content[0].type",
        ),
        (
            json!({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"type": "function",
            "function": {"name": "f", "arguments": "{not json"}}]}]}),
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            json!({"messages": user("x"), "temperature": -1}),
            "temperature",
        ),
        (
            json!({"messages": user("x"), "temperature": "hot"}),
            "temperature",
        ),
        (json!({"messages": user("x"), "top_p": 0}), "top_p"),
        (json!({"messages": user("x"), "top_p": 1.5}), "top_p"),
        (json!({"messages": user("x"), "top_k": -2}), "top_k"),
        (json!({"messages": user("x"), "min_p": 2}), "min_p"),
        (
            json!({"messages": user("x"), "presence_penalty": 3}),
            "presence_penalty",
        ),
        (
            json!({"messages": user("x"), "frequency_penalty": -2.5}),
            "frequency_penalty",
        ),
        (
            json!({"messages": user("x"), "repetition_penalty": 0}),
            "repetition_penalty",
        ),
        (json!({"messages": user("x"), "n": 0}), "n"),
        (json!({"messages": user("x"), "n": 100000}), "n"),
        (json!({"messages": user("x"), "n": 1.5}), "n"),
        (
            json!({"messages": user("x"), "max_tokens": 0}),
            "max_tokens",
        ),
        (
            json!({"messages": user("x"), "max_tokens": "ten"}),
            "max_tokens",
        ),
        (
            json!({"messages": user("x"), "max_tokens": 5000}),
            "max_tokens",
        ),
        (
            json!({"messages": user("x"), "max_completion_tokens": -1}),
            "max_completion_tokens",
        ),
        (json!({"messages": user("x"), "seed": "x"}), "seed"),
        (json!({"messages": user("x"), "stop": 5}), "stop"),
        (json!({"messages": user("x"), "stop": ["a", ""]}), "stop[1]"),
        (json!({"messages": user("x"), "stop": [1]}), "stop[0]"),
        (
            json!({"messages": user("x"), "stop_token_ids": [-1]}),
            "stop_token_ids[0]",
        ),
        (
            json!({"messages": user("x"), "stop_token_ids": [999999999]}),
            "stop_token_ids[0]",
        ),
        (
            json!({"messages": user("x"), "logprobs": "yes"}),
            "logprobs",
        ),
        (
            json!({"messages": user("x"), "logprobs": true, "top_logprobs": 50}),
            "top_logprobs",
        ),
        (
            json!({"messages": user("x"), "top_logprobs": 2}),
            "top_logprobs",
        ),
        (
            json!({"messages": user("x"), "logit_bias": {"abc": 1}}),
            "logit_bias",
        ),
        (
            json!({"messages": user("x"), "logit_bias": {"999999999": 1}}),
            "logit_bias",
        ),
        (
            json!({"messages": user("x"), "logit_bias": [1]}),
            "logit_bias",
        ),
        (
            json!({"messages": user("x"), "stream_options": {"include_usage": true}}),
            "stream_options",
        ),
        (json!({"messages": user("x"), "stream": "yes"}), "stream"),
        (json!({"messages": user("x"), "tools": {}}), "tools"),
        (
            json!({"messages": user("x"), "tools": [{"type": "function"}]}),
            "tools[0].function",
        ),
        (
            json!({"messages": user("x"), "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"messages": user("x"), "tool_choice": "auto"}),
            "tool_choice",
        ),
        (
            json!({"messages": user("x"), "chat_template_kwargs": 3}),
            "chat_template_kwargs",
        ),
        (
            json!({"messages": user("x"), "response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (json!({"messages": user(&"word ".repeat(3000))}), "messages"),
    ];
    for (body, param) in chat_cases {
        let r = post(a, "/v1/chat/completions", &body);
        let e = r.error(400);
        assert_eq!(e["param"], param, "{body}: {e}");
        assert_eq!(e["type"], "invalid_request_error");
    }
    let long = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": user(&"word ".repeat(3000))}),
    )
    .error(400);
    assert_eq!(long["code"], "context_length_exceeded");

    let cmpl_cases: Vec<(Value, &str)> = vec![
        (json!({}), "prompt"),
        (json!({"prompt": {}}), "prompt"),
        (json!({"prompt": []}), "prompt"),
        (json!({"prompt": [[1, -3]]}), "prompt[0][1]"),
        (json!({"prompt": [1, 2, 999999999]}), "prompt[2]"),
        (json!({"prompt": ["ok", 5]}), "prompt[1]"),
        (json!({"prompt": "x", "logprobs": 30}), "logprobs"),
        (json!({"prompt": "x", "logprobs": true}), "logprobs"),
        (json!({"prompt": "x", "echo": true, "logprobs": 1}), "echo"),
        (json!({"prompt": "x", "suffix": "y"}), "suffix"),
        (json!({"prompt": "x", "best_of": 3}), "best_of"),
        (json!({"prompt": "x", "min_tokens": 3}), "min_tokens"),
        (json!({"prompt": ["a", "b", "c"], "n": 100}), "n"),
        (json!({"prompt": ["ok", "word ".repeat(3000)]}), "prompt[1]"),
    ];
    for (body, param) in cmpl_cases {
        let e = post(a, "/v1/completions", &body).error(400);
        assert_eq!(e["param"], param, "{body}: {e}");
    }

    // Unknown model: 404 (as vLLM and OpenAI), naming `model`.
    let e = post(
        a,
        "/v1/chat/completions",
        &json!({"model": "gpt-4", "messages": user("x")}),
    )
    .error(404);
    assert_eq!(e["param"], "model");
    assert_eq!(e["code"], "model_not_found");
    post(
        a,
        "/v1/completions",
        &json!({"model": "gpt-4", "prompt": "x"}),
    )
    .error(404);

    // Not JSON, not an object.
    let auth = format!("Bearer {KEY}");
    let hdrs = [
        ("Content-Type", "application/json"),
        ("Authorization", auth.as_str()),
    ];
    for raw in [&b"{\"messages\": ["[..], b"[1, 2]", b"", b"\xff\xfe"] {
        let e = request(a, "POST", "/v1/chat/completions", &hdrs, Some(raw)).error(400);
        assert_eq!(e["code"], "invalid_json");
    }
    // Wrong method, unknown route.
    request(a, "GET", "/v1/chat/completions", &hdrs, None).error(405);
    request(a, "POST", "/v1/embeddings", &hdrs, Some(b"{}")).error(404);
    request(a, "GET", "/nothing/here", &hdrs, None).error(404);
    // Without the key, every path but the open reports is refused before routing.
    request(a, "GET", "/nothing/here", &[], None).error(401);
    // Tokenizer endpoints.
    assert_eq!(
        post(a, "/tokenize", &json!({})).error(400)["param"],
        "prompt"
    );
    assert_eq!(
        post(a, "/tokenize", &json!({"prompt": 3})).error(400)["param"],
        "prompt"
    );
    assert_eq!(
        post(a, "/detokenize", &json!({"tokens": [-1]})).error(400)["param"],
        "tokens[0]"
    );
    assert_eq!(
        post(a, "/detokenize", &json!({})).error(400)["param"],
        "tokens"
    );

    // And the server still serves.
    let ok = chat(json!({"messages": user("still there?"), "max_tokens": 2}));
    assert_eq!(ok["usage"]["completion_tokens"], 2);
}

#[test]
fn tokenize_and_detokenize_round_trip() {
    let r = post(
        addr(),
        "/tokenize",
        &json!({"prompt": "Hello, world! 你好", "return_token_strs": true}),
    )
    .json();
    assert_eq!(r["count"], r["tokens"].as_array().unwrap().len());
    assert_eq!(
        r["token_strs"].as_array().unwrap().len(),
        r["tokens"].as_array().unwrap().len()
    );
    let back = post(addr(), "/detokenize", &json!({"tokens": r["tokens"]})).json();
    assert_eq!(back["prompt"], "Hello, world! 你好");
}

#[test]
fn metrics_text() {
    chat(json!({"messages": user("metrics"), "max_tokens": 3}));
    let m = request(addr(), "GET", "/metrics", &[], None);
    assert_eq!(m.status, 200);
    assert!(m
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let t = m.text();
    for name in [
        "qnext:num_requests_running",
        "qnext:num_requests_waiting",
        "qnext:prompt_tokens_total",
        "qnext:generation_tokens_total",
        "qnext:request_total",
        "qnext:time_to_first_token_seconds_count",
        "qnext:inter_token_latency_seconds_count",
        "qnext:e2e_request_latency_seconds_count",
    ] {
        metric(&t, name);
    }
    assert!(metric(&t, "qnext:generation_tokens_total") >= 3.0);
    assert!(metric(&t, "qnext:time_to_first_token_seconds_count") >= 1.0);
    assert!(t.contains(
        "qnext:time_to_first_token_seconds_bucket{model_name=\"qwen-test\",le=\"+Inf\"}"
    ));
    assert!(t.contains("# TYPE qnext:inter_token_latency_seconds histogram"));
    // Buckets are cumulative: the last holds every observation.
    let inf = t
        .lines()
        .find(|l| l.starts_with("qnext:time_to_first_token_seconds_bucket") && l.contains("+Inf"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(
        inf,
        Some(metric(&t, "qnext:time_to_first_token_seconds_count"))
    );
    assert!(metric(&t, "qnext:prefix_cache_queries_total") >= 1.0);
    assert!(t.ends_with("# EOF\n"));
}

/// A K/V budget for 1024 positions (the fixture's 64 bytes per position): requests that could
/// never fit are refused with a 400 naming the parameter, an unasked `max_tokens` is cut to
/// what fits, and the server keeps serving.
#[test]
fn requests_beyond_the_kv_budget_are_refused() {
    let server = start(|c| c.kv_cache_memory = Some(1024 * 64));
    let a = server.addr();
    let long = "alpha ".repeat(1100);
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": long, "max_tokens": 1}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "kv_cache_exceeded");
    assert_eq!(r.json()["error"]["param"], "prompt");
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": user("hello"), "max_tokens": 1500}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "max_tokens");
    assert!(r.text().contains("K/V cache"), "{}", r.text());
    // Unasked, the output may take what is left of the budget, not of the context (2048).
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": "alpha ".repeat(1000), "ignore_eos": true, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let u = &r.json()["usage"];
    assert!(u["total_tokens"].as_u64() <= Some(1024), "{u}");
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": 2}),
    );
    assert_eq!(r.status, 200);
}

/// What request routers ask besides the OpenAI API (vllm-router, smg): render endpoints that
/// give exactly the prompt ids generation uses, load reports and vLLM's gauge names.
/// Read-only reports are open; the rest needs the key.
#[test]
fn router_endpoints() {
    let a = addr();
    let messages = json!([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Name three colours."}]);
    let rendered = post(
        a,
        "/v1/chat/completions/render",
        &json!({"messages": messages}),
    );
    assert_eq!(rendered.status, 200, "{}", rendered.text());
    let ids = rendered.json()["token_ids"].clone();
    let tokenized = post(a, "/tokenize", &json!({"messages": messages})).json();
    assert_eq!(ids, tokenized["tokens"]);
    // The ids generation is fed: the usage of a request with the same messages counts them.
    let r = chat(json!({"messages": messages, "max_tokens": 1}));
    assert_eq!(r["usage"]["prompt_tokens"], ids.as_array().unwrap().len());
    let rc = post(
        a,
        "/v1/completions/render",
        &json!({"prompt": ["Hello there", [1, 2, 3]]}),
    )
    .json();
    let hello = post(a, "/tokenize", &json!({"prompt": "Hello there"})).json();
    assert_eq!(rc[0]["token_ids"], hello["tokens"]);
    assert_eq!(rc[1]["token_ids"], json!([1, 2, 3]));
    let e = post(a, "/v1/chat/completions/render", &json!({"messages": "hi"})).error(400);
    assert_eq!(e["param"], "messages");
    request(a, "POST", "/tokenize", &[], Some(b"{\"prompt\": \"x\"}")).error(401);
    request(a, "POST", "/v1/chat/completions/render", &[], Some(b"{}")).error(401);

    let open = |path: &str| request(a, "GET", path, &[], None);
    assert!(open("/get_load").json()["load"].is_u64());
    for path in ["/v1/loads", "/loads"] {
        let loads = open(path).json();
        let l = &loads["loads"][0];
        for field in [
            "num_running_reqs",
            "num_waiting_reqs",
            "max_total_num_tokens",
            "max_running_requests",
        ] {
            assert!(l[field].is_u64(), "{path}: {field} in {loads}");
        }
        assert!(l["token_usage"]
            .as_f64()
            .is_some_and(|u| (0.0..=1.0).contains(&u)));
        assert!(l["gen_throughput"].as_f64().is_some_and(|r| r >= 0.0));
    }
    assert_eq!(open("/get_model_info").json()["is_generation"], true);
    assert_eq!(open("/get_server_info").json()["served_model_name"], MODEL);
    let t = open("/metrics").text();
    for (ours, theirs) in [
        ("qnext:num_requests_running", "vllm:num_requests_running"),
        ("qnext:num_requests_waiting", "vllm:num_requests_waiting"),
        ("qnext:kv_cache_usage_perc", "vllm:kv_cache_usage_perc"),
    ] {
        assert_eq!(metric(&t, ours), metric(&t, theirs), "{theirs}");
    }
}

/// `/flush_cache` empties the prefix cache for real: a prompt found cached before is
/// computed again after, and the server keeps serving.
#[test]
fn flush_cache_empties_the_prefix_cache() {
    let server = start(|c| c.api_key = Some(KEY.into()));
    let a = server.addr();
    let prompt = "one two three four five six seven eight nine ten ".repeat(40);
    let cached = || {
        let r = post(
            a,
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 1}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0)
    };
    assert_eq!(cached(), 0);
    assert!(cached() >= 256, "the second request reuses the first");
    request(a, "POST", "/flush_cache", &[], None).error(401);
    let f = post(a, "/flush_cache", &json!({}));
    assert_eq!(f.status, 200, "{}", f.text());
    let t = request(a, "GET", "/metrics", &[], None).text();
    assert_eq!(metric(&t, "qnext:prefix_cache_snapshots"), 0.0);
    assert!(metric(&t, "qnext:prefix_cache_evictions_total") >= 1.0);
    assert_eq!(cached(), 0);
}

/// Work a request may ask for is bounded before it is done: each limit is a 400 naming the
/// parameter, and text that cannot fit the context is refused before it is tokenized.
#[test]
fn request_limits_are_named() {
    let a = addr();
    let one = |extra: Value| {
        let mut body = json!({"messages": user("hi"), "max_tokens": 1});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        post(a, "/v1/chat/completions", &body).error(400)
    };
    let stops: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
    assert_eq!(one(json!({"stop": stops}))["param"], "stop");
    assert_eq!(one(json!({"stop": ["x".repeat(513)]}))["param"], "stop[0]");
    let bias: serde_json::Map<String, Value> =
        (0..1025).map(|i| (i.to_string(), json!(1))).collect();
    assert_eq!(one(json!({"logit_bias": bias}))["param"], "logit_bias");
    let tool = json!({"type": "function", "function": {"name": "f", "parameters": {}}});
    assert_eq!(one(json!({"tools": vec![tool; 129]}))["param"], "tools");
    let many = vec![json!({"role": "user", "content": "a"}); 8193];
    assert_eq!(one(json!({"messages": many}))["param"], "messages");

    // 2048 tokens of context hold at most 2048 × the longest token's text: more is refused
    // untokenized, as a message, a prompt, or for /tokenize.
    let huge = "word ".repeat(200_000);
    let e = one(json!({"messages": user(&huge)}));
    assert_eq!(e["param"], "messages");
    assert!(e["message"].as_str().unwrap().contains("bytes"), "{e}");
    let e = post(
        a,
        "/v1/completions",
        &json!({"prompt": huge, "max_tokens": 1}),
    )
    .error(400);
    assert_eq!(e["param"], "prompt");
    let e = post(
        a,
        "/v1/completions",
        &json!({"prompt": ["hi", huge], "max_tokens": 1}),
    )
    .error(400);
    assert_eq!(e["param"], "prompt[1]");
    let e = post(a, "/tokenize", &json!({"prompt": huge})).error(400);
    assert_eq!(e["param"], "prompt");
    // Still serving.
    chat(json!({"messages": user("hi"), "max_tokens": 1}));
}

/// A reply with no text says `"content": ""` (not null), as the stream and OpenAI do.
#[test]
fn a_reply_without_text_has_empty_content() {
    let a = addr();
    let id = post(
        a,
        "/tokenize",
        &json!({"prompt": "Hello", "add_special_tokens": false}),
    )
    .json()["tokens"][0]
        .clone();
    let bias = json!({ id.to_string(): 100 });
    let r = chat(
        json!({"messages": user("hi"), "max_tokens": 3, "logit_bias": bias,
                        "stop": ["Hello"], "temperature": 0}),
    );
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert_eq!(r["choices"][0]["message"]["content"], "");
}

/// A client that goes away mid-stream is counted as an `abort` in the finish reasons.
#[test]
fn a_client_that_hangs_up_counts_as_abort() {
    use std::io::{Read, Write};
    let server = start(|c| c.api_key = Some(KEY.into()));
    let a = server.addr();
    let aborts = || {
        let t = request(a, "GET", "/metrics", &[], None).text();
        t.lines()
            .find(|l| l.starts_with("qnext:request_success_total") && l.contains("\"abort\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = aborts();
    let body = json!({"messages": user("Tell me a long story."), "max_tokens": 400,
                      "stream": true, "ignore_eos": true})
    .to_string();
    let mut s = std::net::TcpStream::connect(a).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    assert!(n > 0);
    drop(s);
    let t0 = std::time::Instant::now();
    while aborts() < before + 1.0 {
        assert!(t0.elapsed().as_secs() < 20, "the hang-up was not counted");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Connections that send nothing, half a header, or nothing after a response are closed once
/// `--timeout-keep-alive` has passed; a body that stops arriving gets a 408 after
/// `--timeout-request-body`; a connection that keeps up is served throughout.
#[test]
fn slow_and_idle_connections_are_closed() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let server = start(|c| {
        c.timeouts = qnext::server::Timeouts {
            keep_alive: Duration::from_millis(600),
            request_body: Duration::from_millis(900),
        }
    });
    let a = server.addr();
    // Reads until the server closes the connection; what it sent, and after how long.
    let closed_after = |s: &mut std::net::TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let t0 = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        (t0.elapsed(), String::from_utf8_lossy(&got).into_owned())
    };
    let within = |t: Duration| t >= Duration::from_millis(400) && t < Duration::from_secs(5);

    // Nothing sent at all.
    let mut s = std::net::TcpStream::connect(a).unwrap();
    let (t, _) = closed_after(&mut s);
    assert!(within(t), "silent connection closed after {t:?}");

    // Half a header.
    let mut s = std::net::TcpStream::connect(a).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
    let (t, _) = closed_after(&mut s);
    assert!(within(t), "half a header closed after {t:?}");

    // A keep-alive connection: two requests in a row are served, then it idles and closes.
    let mut s = std::net::TcpStream::connect(a).unwrap();
    for _ in 0..2 {
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }
    let (t, _) = closed_after(&mut s);
    assert!(within(t), "idle keep-alive connection closed after {t:?}");

    // A body announced and never finished: 408 naming the flag.
    let mut s = std::net::TcpStream::connect(a).unwrap();
    s.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"prompt\": ",
    )
    .unwrap();
    let (t, reply) = closed_after(&mut s);
    assert!(
        reply.starts_with("HTTP/1.1 408") && reply.contains("--timeout-request-body"),
        "{reply}"
    );
    assert!(
        t >= Duration::from_millis(700) && t < Duration::from_secs(5),
        "{t:?}"
    );

    // Still serving.
    assert_eq!(get(a, "/health").status, 200);
}

/// More body than the routes take is refused with a 413 as soon as it has arrived.
#[test]
fn an_oversized_body_is_refused() {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr()).unwrap();
    let len = (64 << 20) + 1;
    write!(
        s,
        "POST /tokenize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Length: {len}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    // The server may answer and close before the last bytes are sent.
    let _ = s.write_all(&vec![b' '; len]);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let reply = String::from_utf8_lossy(&raw);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("larger than"), "{reply}");
}

/// Parsing and tokenizing run off the threads that answer requests: while four clients each
/// have 16 MB of text tokenized, `/health` answers before any of them is done (with the work
/// on those threads, it waited for the first to finish).
#[test]
fn large_prompts_do_not_stall_other_requests() {
    use std::time::Instant;
    let server = start(|c| c.max_model_len = None);
    let a = server.addr();
    let words: String =
        "lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat((16 << 20) / 57);
    let body = serde_json::to_vec(&json!({"prompt": words})).unwrap();
    let t0 = Instant::now();
    let done: Vec<_> = (0..4)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || {
                let r = request(a, "POST", "/tokenize", &[], Some(&body));
                assert_eq!(r.status, 200, "{}", r.text());
                t0.elapsed()
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let h = request(a, "GET", "/health", &[], None);
    assert_eq!(h.status, 200);
    let health = t0.elapsed();
    let first = done.into_iter().map(|d| d.join().unwrap()).min().unwrap();
    assert!(
        health < first,
        "/health answered after {health:?}, the first tokenize after {first:?}"
    );
}
