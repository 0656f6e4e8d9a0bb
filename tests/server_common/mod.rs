//! Helpers for the server tests: an in-process server on a free loopback port, and a tiny
//! blocking HTTP/1.1 client (enough for JSON and server-sent events).

#![allow(dead_code)]

use qnext::server::{self, ServerConfig, ServerHandle};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub const MODEL: &str = "qwen-test";
pub const KEY: &str = "sk-test-key";

/// A server on the qwen-vocab fixture; `edit` adjusts the configuration.
pub fn start(edit: impl FnOnce(&mut ServerConfig)) -> ServerHandle {
    let mut cfg = ServerConfig {
        model: fixture("qwen-vocab").display().to_string(),
        port: 0,
        served_model_name: vec![MODEL.into()],
        max_model_len: Some(2048),
        max_num_seqs: 4,
        ..ServerConfig::default()
    };
    edit(&mut cfg);
    server::start(cfg).expect("server starts")
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `data:` payloads of an event stream; `[DONE]` as the string "[DONE]".
    pub fn events(&self) -> Vec<Value> {
        self.text()
            .split("\n\n")
            .filter_map(|frame| frame.strip_prefix("data: "))
            .map(|d| {
                if d == "[DONE]" {
                    Value::String(d.into())
                } else {
                    serde_json::from_str(d).unwrap_or_else(|e| panic!("bad event {d:?}: {e}"))
                }
            })
            .collect()
    }

    /// The error object, checking the OpenAI shape and the status.
    pub fn error(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{}", self.text());
        let v = self.json();
        let e = v["error"].clone();
        assert!(e["message"].is_string(), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert!(e.get("param").is_some(), "{v}");
        assert!(e.get("code").is_some(), "{v}");
        e
    }
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        s.write_all(b).unwrap();
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size_str = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16)
            .expect("chunk size");
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&b[start..start + size]);
        b = &b[start + size + 2..];
    }
    out
}

/// POST JSON with the test API key.
pub fn post(addr: SocketAddr, path: &str, body: &Value) -> Resp {
    let bytes = serde_json::to_vec(body).unwrap();
    request(
        addr,
        "POST",
        path,
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &format!("Bearer {KEY}")),
        ],
        Some(&bytes),
    )
}

pub fn get(addr: SocketAddr, path: &str) -> Resp {
    request(
        addr,
        "GET",
        path,
        &[("Authorization", &format!("Bearer {KEY}"))],
        None,
    )
}

/// The value of an unlabelled-or-labelled metric line `name{...} value`.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

/// Waits until the engine reports no running and no waiting request.
pub fn wait_idle(addr: SocketAddr) -> (f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = get(addr, "/metrics").text();
        let running = metric(&m, "qnext:num_requests_running");
        let waiting = metric(&m, "qnext:num_requests_waiting");
        if (running == 0.0 && waiting == 0.0) || Instant::now() > deadline {
            return (running, waiting);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Concatenated `delta.content` (chat) or `text` (completions) of choice `index` in a stream.
pub fn stream_text(events: &[Value], index: u64, field: &str) -> String {
    let mut out = String::new();
    for e in events {
        for c in e["choices"].as_array().into_iter().flatten() {
            if c["index"].as_u64() != Some(index) {
                continue;
            }
            let v = if field == "text" {
                &c["text"]
            } else {
                &c["delta"][field]
            };
            if let Some(s) = v.as_str() {
                out.push_str(s);
            }
        }
    }
    out
}
