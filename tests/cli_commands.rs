//! The commands end to end on the bundled checkpoints.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn qnext(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_qnext"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qnext {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn run_greedy_is_deterministic_and_stdout_is_only_text() {
    let m = fixture("qwen-vocab");
    let m = m.to_str().unwrap();
    let args = [
        "run",
        "--model",
        m,
        "--chat",
        "--prompt",
        "Hi there",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
    ];
    let a = qnext(&args);
    let b = qnext(&args);
    assert_eq!(a.stdout, b.stdout, "greedy generation differs between runs");
    let text = String::from_utf8(a.stdout).unwrap();
    assert!(!text.trim().is_empty());
    assert!(
        !text.contains("tokens/s"),
        "statistics leaked to stdout: {text}"
    );
    assert!(String::from_utf8_lossy(&a.stderr).contains("tokens/s"));
}

#[test]
fn run_same_seed_same_text() {
    let m = fixture("qwen-vocab");
    let m = m.to_str().unwrap();
    let run = |seed: &str| {
        qnext(&[
            "run",
            "--model",
            m,
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "16",
            "--temperature",
            "1.0",
            "--seed",
            seed,
        ])
        .stdout
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(
        run("7"),
        run("8"),
        "different seeds gave the same 16 tokens"
    );
}

#[test]
fn score_json_matches_reference() {
    let dir = fixture("qwen-vocab");
    let out = qnext(&[
        "score",
        "--model",
        dir.to_str().unwrap(),
        "--text-file",
        dir.join("reference_text.txt").to_str().unwrap(),
        "--feed",
        "chunks:50",
        "--json",
        "--exact",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ours: Vec<f64> = v["next_token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let want: Vec<f64> = st
        .tensor("next_token_logprobs")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
        .collect();
    assert_eq!(ours.len(), want.len());
    for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
        assert!((a - b).abs() < 2e-4, "token {}: {a} vs {b}", i + 1);
    }
    let nll = -want.iter().sum::<f64>() / want.len() as f64;
    assert!((v["mean_nll"].as_f64().unwrap() - nll).abs() < 1e-4);
    assert!((v["perplexity"].as_f64().unwrap() - nll.exp()).abs() < 1e-3 * nll.exp());
}

#[test]
fn inspect_reports_counts_and_dtypes() {
    let out = qnext(&[
        "inspect",
        "--model",
        fixture("fp8-f32scale").to_str().unwrap(),
    ]);
    let s = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "parameters",
        "active per token",
        "F8_E4M3",
        "BF16",
        "mtp parameters",
        "fp8 e4m3",
    ] {
        assert!(s.contains(needle), "inspect output lacks {needle}: {s}");
    }
}

/// `bench --json` on a bundled checkpoint: the fields the issue asks for, the load mode that
/// `auto` chose, and `--lm-head q8` reading fewer bytes per token than the stored BF16 head.
#[test]
fn bench_reports_its_load_mode_and_the_q8_lm_head() {
    let m = fixture("fp8-bf16scale");
    let m = m.to_str().unwrap();
    let bench = |head: &str| -> serde_json::Value {
        let out = qnext(&[
            "bench",
            "--model",
            m,
            "--prompt-tokens",
            "20",
            "--gen-tokens",
            "4",
            "--repeat",
            "1",
            "--lm-head",
            head,
            "--json",
        ]);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (stored, q8) = (bench("stored"), bench("q8"));
    for v in [&stored, &q8] {
        for field in [
            "pp_tokens_per_s",
            "tg_tokens_per_s",
            "bytes_per_token",
            "gb_per_s",
            "peak_rss_bytes",
            "huge_page_bytes",
        ] {
            assert!(v[field].is_number(), "{field} missing in {v}");
        }
        let mode = v["load_mode"].as_str().unwrap();
        assert!(
            mode == "hugepages" || mode == "populate",
            "load_mode {mode}"
        );
    }
    assert_eq!(stored["lm_head"], "stored");
    assert_eq!(q8["lm_head"], "q8");
    assert!(
        q8["bytes_per_token"].as_u64().unwrap() < stored["bytes_per_token"].as_u64().unwrap(),
        "q8 lm_head reads no fewer bytes: {q8} vs {stored}"
    );
}

#[test]
fn run_with_speculative_tokens_prints_the_same_text_and_the_acceptance() {
    let m = fixture("qwen-vocab");
    let m = m.to_str().unwrap();
    let run = |k: &str| {
        qnext(&[
            "run",
            "--model",
            m,
            "--chat",
            "--prompt",
            "Tell me about the delta rule",
            "--max-tokens",
            "24",
            "--temperature",
            "0",
            "--speculative-tokens",
            k,
        ])
    };
    let base = run("0");
    assert!(!String::from_utf8_lossy(&base.stderr).contains("speculation:"));
    for k in ["1", "2", "4"] {
        let out = run(k);
        assert_eq!(
            out.stdout, base.stdout,
            "--speculative-tokens {k} changed the text"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("speculation:") && err.contains("drafts accepted"),
            "{err}"
        );
    }
}

#[test]
fn speculative_tokens_without_an_mtp_head_is_a_clear_error() {
    let m = fixture("tiny-f32");
    let out = Command::new(env!("CARGO_BIN_EXE_qnext"))
        .args([
            "bench",
            "--model",
            m.to_str().unwrap(),
            "--speculative-tokens",
            "2",
            "--repeat",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no MTP head"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// The README's first command: no model named, the bundled trained model answers — reasoning,
/// then `</think>`, then the right product (computed here). With its MTP head drafting, the
/// same text and an acceptance rate above zero (trained drafts are mostly right).
#[test]
fn run_without_a_model_answers_with_the_bundled_one() {
    let plain = qnext(&["run", "--chat", "--prompt", "What is 48 * 27?"]);
    let text = String::from_utf8(plain.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert!(stderr.contains("bundled model"), "{stderr}");
    let (reasoning, answer) = text.split_once("</think>").expect("no reasoning block");
    assert!(reasoning.contains(&format!("= {}", 48 * 7)), "{reasoning}");
    assert_eq!(answer.trim(), format!("48 * 27 = {}", 48 * 27));

    let spec = qnext(&[
        "run",
        "--chat",
        "--prompt",
        "What is 48 * 27?",
        "--speculative-tokens",
        "2",
    ]);
    assert_eq!(String::from_utf8(spec.stdout).unwrap(), text);
    let stderr = String::from_utf8_lossy(&spec.stderr);
    let rate: f64 = stderr
        .split("drafts accepted (")
        .nth(1)
        .and_then(|s| s.split(" %").next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no acceptance in {stderr}"));
    assert!(rate > 50.0, "{stderr}");
}

/// `QNEXT_MODEL` names the model when `--model` does not; a folder that is not there is an
/// error that names it.
#[test]
fn qnext_model_variable_names_the_model() {
    let out = Command::new(env!("CARGO_BIN_EXE_qnext"))
        .args(["run", "--prompt", "hi"])
        .env("QNEXT_MODEL", "/nonexistent/qnext-model")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/qnext-model"), "{err}");
}
