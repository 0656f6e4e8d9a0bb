//! Continuous batching through the server: greedy requests running together (different prompt
//! lengths, some arriving mid-generation, more than there are slots, streamed and not) each
//! return exactly what they return alone; afterwards no slot is in use. A client that hangs
//! up mid-stream frees its slot.

mod server_common;

use serde_json::{json, Value};
use server_common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn prompt(i: usize) -> String {
    // Lengths from a few tokens to a few hundred, so prefills span several chunks.
    let words = [
        "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta",
    ];
    (0..(3 + i * i * 5))
        .map(|k| words[(k * 7 + i) % words.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

fn is_chat(i: usize) -> bool {
    i.is_multiple_of(3)
}

fn body(i: usize, stream: bool) -> Value {
    if is_chat(i) {
        json!({"messages": [{"role": "user", "content": prompt(i)}], "max_tokens": 10 + 3 * i,
               "temperature": 0, "stream": stream})
    } else {
        json!({"prompt": prompt(i), "max_tokens": 10 + 3 * i, "temperature": 0, "stream": stream,
               "logprobs": if i.is_multiple_of(2) { json!(2) } else { Value::Null }})
    }
}

fn path(i: usize) -> &'static str {
    if is_chat(i) {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    }
}

fn output(r: &Resp, i: usize, stream: bool) -> String {
    assert_eq!(r.status, 200, "{}", r.text());
    let field = if is_chat(i) { "content" } else { "text" };
    if stream {
        stream_text(&r.events(), 0, field)
    } else {
        let v = r.json();
        let c = &v["choices"][0];
        if is_chat(i) {
            c["message"]["content"].as_str().unwrap_or("").to_owned()
        } else {
            c["text"].as_str().unwrap().to_owned()
        }
    }
}

#[test]
fn batched_greedy_equals_alone() {
    const N: usize = 10;
    let server = start(|c| c.max_num_seqs = 4);
    let addr = server.addr();
    let alone: Vec<String> = (0..N)
        .map(|i| output(&post(addr, path(i), &body(i, false)), i, false))
        .collect();
    assert!(alone.iter().all(|t| !t.is_empty()));

    let threads: Vec<_> = (0..N)
        .map(|i| {
            std::thread::spawn(move || {
                // Some start at once, others while the first ones are generating.
                std::thread::sleep(Duration::from_millis(if i.is_multiple_of(2) {
                    0
                } else {
                    30 * i as u64
                }));
                let stream = i % 4 < 2;
                output(&post(addr, path(i), &body(i, stream)), i, stream)
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        assert_eq!(t.join().unwrap(), alone[i], "request {i}");
    }
    assert_eq!(wait_idle(addr), (0.0, 0.0));
    let m = get(addr, "/metrics").text();
    assert_eq!(metric(&m, "qnext:num_free_slots"), 4.0);
}

#[test]
fn hanging_up_frees_the_slot() {
    let server = start(|c| c.max_num_seqs = 2);
    let addr = server.addr();
    let body = serde_json::to_vec(&json!({"prompt": "Go on forever", "max_tokens": 1500,
        "stream": true, "ignore_eos": true}))
    .unwrap();
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(&body).unwrap();
        let mut buf = [0u8; 2048];
        let n = s.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        // Wait until it is generating, then hang up.
        let t0 = Instant::now();
        while metric(&get(addr, "/metrics").text(), "qnext:num_requests_running") < 1.0 {
            assert!(t0.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(s);
    }
    assert_eq!(wait_idle(addr), (0.0, 0.0));
    // The slots are usable again.
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 3}),
    );
    assert_eq!(r.json()["usage"]["completion_tokens"], 3);
    // The engine publishes its gauges after the step that finished the request.
    assert_eq!(wait_idle(addr), (0.0, 0.0));
    let m = get(addr, "/metrics").text();
    assert_eq!(metric(&m, "qnext:num_free_slots"), 2.0);
    // The abandoned requests stopped well before their 1500 tokens.
    assert!(metric(&m, "qnext:generation_tokens_total") < 3.0 * 1500.0);
}
