//! Speculative decoding through the server (`--speculative-tokens`): at temperature 0 every
//! response — chat and completions, streamed and not, `n` > 1, log-probabilities, stop
//! strings, under concurrent load with the prefix cache on — equals the server's without
//! speculation; `/metrics` counts drafts and acceptances; a checkpoint without an MTP head is
//! refused at start-up.

mod server_common;

use serde_json::{json, Value};
use server_common::*;

fn bodies() -> Vec<(&'static str, Value)> {
    let words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"];
    let text = |i: usize| {
        (0..(4 + i * 9))
            .map(|k| words[(k * 5 + i) % words.len()])
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut out = Vec::new();
    for i in 0..8 {
        let stream = i % 2 == 1;
        if i % 3 == 0 {
            out.push((
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": text(i)}], "max_tokens": 12 + 2 * i,
                       "temperature": 0, "stream": stream, "n": 1 + i % 2, "logprobs": true, "top_logprobs": 2}),
            ));
        } else {
            out.push((
                "/v1/completions",
                json!({"prompt": text(i), "max_tokens": 12 + 2 * i, "temperature": 0, "stream": stream,
                       "n": 1 + i % 2, "logprobs": 2, "stop": if i == 4 { json!(["ta"]) } else { Value::Null }}),
            ));
        }
    }
    out
}

/// A response with what differs between two servers (ids, timestamps) taken out.
fn normalised(r: &Resp, stream: bool) -> Value {
    assert_eq!(r.status, 200, "{}", r.text());
    // A stream's events, per choice in order (how choices interleave depends on timing).
    let mut v = if stream {
        let mut per: std::collections::BTreeMap<u64, Vec<Value>> = Default::default();
        for e in r.events() {
            for c in e["choices"].as_array().into_iter().flatten() {
                per.entry(c["index"].as_u64().unwrap())
                    .or_default()
                    .push(c.clone());
            }
        }
        json!(per.into_values().collect::<Vec<_>>())
    } else {
        r.json()
    };
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("id");
                m.remove("created");
                m.remove("system_fingerprint");
                for (_, x) in m.iter_mut() {
                    strip(x);
                }
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

fn responses(k: usize) -> (Vec<Value>, String) {
    let server = start(|c| {
        c.max_num_seqs = 3;
        c.speculative_tokens = k;
    });
    let addr = server.addr();
    let threads: Vec<_> = bodies()
        .into_iter()
        .map(|(path, body)| {
            std::thread::spawn(move || {
                let stream = body["stream"].as_bool().unwrap();
                normalised(&post(addr, path, &body), stream)
            })
        })
        .collect();
    let out = threads.into_iter().map(|t| t.join().unwrap()).collect();
    wait_idle(addr);
    (out, get(addr, "/metrics").text())
}

#[test]
fn greedy_responses_equal_without_speculation() {
    let (base, _) = responses(0);
    for k in [1, 3] {
        let (spec, metrics) = responses(k);
        for (i, (a, b)) in spec.iter().zip(&base).enumerate() {
            assert_eq!(a, b, "k={k}: request {i} differs");
        }
        let drafts = metric(&metrics, "qnext:spec_decode_num_draft_tokens_total");
        let rounds = metric(&metrics, "qnext:spec_decode_num_drafts_total");
        let accepted = metric(&metrics, "qnext:spec_decode_num_accepted_tokens_total");
        assert!(
            rounds > 0.0 && drafts >= rounds && drafts <= k as f64 * rounds,
            "{drafts} {rounds}"
        );
        assert!(accepted <= drafts);
        let mean = metric(&metrics, "qnext:spec_decode_mean_accepted_length");
        assert!((mean - (1.0 + accepted / rounds)).abs() < 1e-9);
        assert!(
            metrics.contains("qnext:spec_decode_num_accepted_tokens_per_pos_total{"),
            "{metrics}"
        );
    }
}

#[test]
fn without_an_mtp_head_the_server_refuses_to_start() {
    // The real-vocabulary fixture without its MTP shard.
    let dir = std::env::temp_dir().join(format!("qnext-no-mtp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        let _ = std::fs::remove_file(dir.join(f));
        std::os::unix::fs::symlink(fixture("qwen-vocab").join(f), dir.join(f)).unwrap();
    }
    let err = qnext::server::start(qnext::server::ServerConfig {
        model: dir.display().to_string(),
        port: 0,
        speculative_tokens: 2,
        ..Default::default()
    })
    .err()
    .expect("refused")
    .to_string();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(err.contains("no MTP head"), "{err}");
}
