//! `qnext serve` as a program: the listening line, SIGTERM, models from the Hugging Face cache
//! (and the errors when a model cannot be had), and the Thinking template with the
//! `deepseek_r1` reasoning parser.

mod server_common;

use qnext::server::hub::{resolve_model, HubEnv};
use qnext::server::ReasoningParser;
use serde_json::{json, Value};
use server_common::*;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn qnext() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qnext"));
    c.env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_ENDPOINT");
    c
}

/// Starts the program and waits for its listening line.
fn spawn(cmd: &mut Command) -> (Child, SocketAddr) {
    let (child, addr, _) = spawn_with_log(cmd);
    (child, addr)
}

/// [`spawn`], also returning what the server printed before it listened.
fn spawn_with_log(cmd: &mut Command) -> (Child, SocketAddr, String) {
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    let addr = loop {
        let line = lines
            .next()
            .expect("the server printed its address")
            .unwrap();
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.trim().parse().unwrap();
        }
        log.push_str(&line);
        log.push('\n');
    };
    // Keep draining stderr so the child never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    (child, addr, log)
}

fn terminate(mut child: Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            assert!(s.success(), "exit status {s}");
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Hugging Face cache holding the qwen-vocab fixture as `acme/tiny` at revision `abc123`.
fn fake_cache(root: &Path) {
    let repo = root.join("hub/models--acme--tiny");
    let snap = repo.join("snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123").unwrap();
    for f in std::fs::read_dir(fixture("qwen-vocab")).unwrap() {
        let f = f.unwrap().path();
        std::os::unix::fs::symlink(&f, snap.join(f.file_name().unwrap())).unwrap();
    }
}

#[test]
fn serves_a_folder_until_sigterm() {
    let (child, addr) = spawn(qnext().args([
        "serve",
        fixture("qwen-vocab").to_str().unwrap(),
        "--port",
        "0",
        "--max-model-len",
        "512",
        "--served-model-name",
        "tiny",
        "--api-key",
        KEY,
    ]));
    assert_eq!(request(addr, "GET", "/health", &[], None).status, 200);
    let r = post(
        addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "Hi", "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        get(addr, "/v1/models").json()["data"][0]["max_model_len"],
        512
    );
    terminate(child);
}

#[test]
fn repo_id_from_the_hugging_face_cache() {
    let tmp = tempfile::tempdir().unwrap();
    fake_cache(tmp.path());
    let (child, addr) = spawn(
        qnext()
            .args([
                "serve",
                "acme/tiny",
                "--port",
                "0",
                "--max-model-len",
                "256",
            ])
            .env("HF_HOME", tmp.path())
            .env("HF_HUB_OFFLINE", "1"),
    );
    let m = get(addr, "/v1/models").json();
    assert_eq!(m["data"][0]["id"], "acme/tiny");
    assert!(m["data"][0]["root"]
        .as_str()
        .unwrap()
        .ends_with("snapshots/abc123"));
    terminate(child);

    // The library's resolver, with an explicit environment.
    let env = HubEnv {
        cache_dir: Some(tmp.path().join("hub")),
        offline: true,
        endpoint: None,
        revision: "main".into(),
    };
    let dir = resolve_model("acme/tiny", &env).unwrap();
    assert!(dir.ends_with("models--acme--tiny/snapshots/abc123"));
    assert_eq!(
        resolve_model(fixture("qwen-vocab").to_str().unwrap(), &env).unwrap(),
        fixture("qwen-vocab")
    );
    let e = format!("{:#}", resolve_model("acme/other", &env).unwrap_err());
    assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
    let e = format!("{:#}", resolve_model("./no/such/folder", &env).unwrap_err());
    assert!(e.contains("does not exist"), "{e}");
}

#[test]
fn a_model_that_cannot_be_had_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = qnext()
        .args(["serve", "acme/missing", "--port", "0"])
        .env("HF_HOME", tmp.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("acme/missing") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );

    // Online, but the hub cannot be reached (a closed local port stands for "no network").
    let out = qnext()
        .args(["serve", "acme/missing", "--port", "0"])
        .env("HF_HOME", tmp.path())
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("downloading it from the Hugging Face Hub failed"),
        "{err}"
    );

    let out = qnext()
        .args([
            "serve",
            fixture("qwen-vocab").to_str().unwrap(),
            "--max-model-len",
            "999999999",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-model-len"));
}

#[test]
fn an_empty_api_key_is_refused() {
    let out = qnext()
        .args([
            "serve",
            fixture("qwen-vocab").to_str().unwrap(),
            "--port",
            "0",
            "--api-key",
            "",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--api-key is empty"));
}

/// A checkpoint whose chat template does not compile: the server says so at start-up, chat
/// requests get a 500 that says it is the server's template (not the client's request), and
/// completions keep working.
/// A chat template that builds a string without end in a variable (no instruction or output
/// bound catches it) ends only its render worker: that request gets a 400 saying so, and the
/// next chat request is served by a fresh worker.
#[test]
fn a_template_that_grows_without_end_ends_only_its_worker() {
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(fixture("qwen-vocab")).unwrap() {
        let f = f.unwrap().path();
        let name = f.file_name().unwrap();
        if name != "tokenizer_config.json" {
            std::os::unix::fs::symlink(&f, tmp.path().join(name)).unwrap();
        }
    }
    std::fs::write(
        tmp.path().join("chat_template.jinja"),
        "{%- set ns = namespace(s='x') -%}\
         {%- if messages[0]['content'] == 'boom' -%}\
         {%- for i in range(64) -%}{%- set ns.s = ns.s ~ ns.s -%}{%- endfor -%}{%- endif -%}\
         {%- for m in messages -%}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n\
         {%- endfor -%}<|im_start|>assistant\n",
    )
    .unwrap();
    let mut cmd = qnext();
    cmd.args([
        "serve",
        tmp.path().to_str().unwrap(),
        "--port",
        "0",
        "--max-model-len",
        "256",
    ]);
    let (child, addr) = spawn(&mut cmd);
    let chat = |text: &str| {
        post(
            addr,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": text}], "max_tokens": 2}),
        )
    };
    let e = chat("boom").error(400);
    assert!(
        e["message"].as_str().unwrap().contains("worker process"),
        "{e}"
    );
    for _ in 0..2 {
        let r = chat("hello");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    terminate(child);
}

/// Ids named by the checkpoint's files must exist in the model's vocabulary: an
/// end-of-sequence id beyond it in generation_config.json, or a tokenizer with more tokens
/// than the embedding has rows, stops the start with an error naming the file.
#[test]
fn ids_beyond_the_vocabulary_are_refused_at_start() {
    let copy = |skip: &str| {
        let tmp = tempfile::tempdir().unwrap();
        for f in std::fs::read_dir(fixture("qwen-vocab")).unwrap() {
            let f = f.unwrap().path();
            if f.file_name().unwrap() != skip {
                std::os::unix::fs::symlink(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
            }
        }
        tmp
    };
    let start = |dir: &Path| {
        let out = qnext()
            .args([
                "serve",
                dir.to_str().unwrap(),
                "--port",
                "0",
                "--max-model-len",
                "256",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let tmp = copy("generation_config.json");
    std::fs::write(
        tmp.path().join("generation_config.json"),
        r#"{"eos_token_id": [151645, 999999]}"#,
    )
    .unwrap();
    let err = start(tmp.path());
    assert!(
        err.contains("generation_config.json") && err.contains("999999"),
        "{err}"
    );

    // The bundled model (a vocabulary of its own) with Qwen's 151,669-token tokenizer.
    let tmp = tempfile::tempdir().unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/qnext-tiny");
    for f in std::fs::read_dir(&tiny).unwrap() {
        let f = f.unwrap().path();
        std::os::unix::fs::symlink(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
    }
    std::fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    std::os::unix::fs::symlink(
        fixture("qwen-vocab").join("tokenizer.json"),
        tmp.path().join("tokenizer.json"),
    )
    .unwrap();
    let err = start(tmp.path());
    assert!(
        err.contains("tokenizer.json") && err.contains("more than the model's vocabulary"),
        "{err}"
    );
}

#[test]
fn a_broken_chat_template_is_the_servers_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    std::fs::create_dir(&dir).unwrap();
    for f in std::fs::read_dir(fixture("qwen-vocab")).unwrap() {
        let f = f.unwrap().path();
        std::os::unix::fs::symlink(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
    std::fs::write(dir.join("chat_template.jinja"), "{% if messages %}unclosed").unwrap();
    let mut cmd = qnext();
    cmd.args([
        "serve",
        dir.to_str().unwrap(),
        "--port",
        "0",
        "--max-model-len",
        "256",
    ]);
    let (child, addr, log) = spawn_with_log(&mut cmd);
    assert!(
        log.contains("warning") && log.contains("chat_template.jinja"),
        "{log}"
    );
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let e = post(addr, "/v1/chat/completions", &chat).error(500);
    assert!(
        e["message"].as_str().unwrap().contains("chat template"),
        "{e}"
    );
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    terminate(child);
}

fn reasoning_of(r: &Value) -> (Value, Value) {
    let m = &r["choices"][0]["message"];
    (m["reasoning_content"].clone(), m["content"].clone())
}

#[test]
fn thinking_template_with_reasoning_parser() {
    let server = start(|c| {
        c.chat_template = Some(fixture("chat_templates/tokenizer_config.thinking.json"));
        c.reasoning_parser = ReasoningParser::DeepseekR1;
        c.api_key = Some(KEY.into());
    });
    let a = server.addr();
    let msgs = json!([{"role": "user", "content": "Think about it."}]);
    let toks = post(a, "/tokenize", &json!({"messages": msgs})).json()["tokens"].clone();
    let text = post(a, "/detokenize", &json!({"tokens": toks})).json()["prompt"].clone();
    assert_eq!(
        text,
        "<|im_start|>user\nThink about it.<|im_end|>\n<|im_start|>assistant\n<think>\n"
    );

    // No `</think>` in the (random) output: all of it is reasoning, content is null.
    let raw = post(
        a,
        "/v1/completions",
        &json!({"prompt": toks, "max_tokens": 8, "temperature": 0}),
    )
    .json()["choices"][0]["text"]
        .clone();
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": msgs, "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(reasoning_of(&r.json()), (raw.clone(), Value::Null));
    let ev = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": msgs, "max_tokens": 8, "temperature": 0, "stream": true}),
    )
    .events();
    assert_eq!(
        stream_text(&ev, 0, "reasoning_content"),
        raw.as_str().unwrap()
    );
    assert_eq!(stream_text(&ev, 0, "content"), "");

    // `</think>` forced: empty reasoning, the rest is content.
    let forced = json!({"messages": msgs, "max_tokens": 3, "temperature": 0,
                        "logit_bias": {"151668": 100}});
    let r = post(a, "/v1/chat/completions", &forced).json();
    assert_eq!(reasoning_of(&r), (json!(""), json!("</think></think>")));
    let mut s = forced.clone();
    s["stream"] = json!(true);
    let ev = post(a, "/v1/chat/completions", &s).events();
    assert_eq!(stream_text(&ev, 0, "reasoning_content"), "");
    assert_eq!(stream_text(&ev, 0, "content"), "</think></think>");

    // Earlier assistant turns lose their reasoning, as the template says.
    let convo = json!([
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "reasoning_content": "secret"},
        {"role": "user", "content": "c"}]);
    let t = post(a, "/tokenize", &json!({"messages": convo})).json()["tokens"].clone();
    let p = post(a, "/detokenize", &json!({"tokens": t})).json()["prompt"].clone();
    assert!(!p.as_str().unwrap().contains("secret"), "{p}");
}

#[test]
fn speculative_config_in_vllm_form() {
    let model = fixture("qwen-vocab");
    let model = model.to_str().unwrap();
    let (child, addr) = spawn(qnext().args([
        "serve",
        model,
        "--port",
        "0",
        "--max-model-len",
        "512",
        "--speculative-config",
        r#"{"method":"qwen3_next_mtp","num_speculative_tokens":2}"#,
    ]));
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let m = get(addr, "/metrics").text();
    assert!(
        metric(&m, "qnext:spec_decode_num_draft_tokens_total") > 0.0,
        "{m}"
    );
    terminate(child);

    for (args, says) in [
        (
            vec![
                "--speculative-config",
                r#"{"method":"eagle","num_speculative_tokens":2}"#,
            ],
            "eagle",
        ),
        (
            vec!["--speculative-config", r#"{"method":"mtp"}"#],
            "num_speculative_tokens",
        ),
        (
            vec![
                "--speculative-config",
                r#"{"num_speculative_tokens":2,"draft_model":"x"}"#,
            ],
            "draft_model",
        ),
        (
            vec![
                "--speculative-tokens",
                "3",
                "--speculative-config",
                r#"{"num_speculative_tokens":2}"#,
            ],
            "disagree",
        ),
        (vec!["--speculative-tokens", "9"], "at most 8"),
    ] {
        let out = qnext()
            .args(["serve", model, "--port", "0"])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(says) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}
