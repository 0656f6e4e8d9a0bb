//! Sampling defaults from a checkpoint's `generation_config.json`.

use qnext::sampling::{GenerationConfig, SamplingParams};

/// Qwen3-Next-80B-A3B-Instruct's file (shared/data/qwen-tokenizer/generation_config.instruct.json).
const INSTRUCT: &str = r#"{
  "bos_token_id": 151643,
  "do_sample": true,
  "eos_token_id": [151645, 151643],
  "pad_token_id": 151643,
  "temperature": 0.7,
  "top_k": 20,
  "top_p": 0.8
}"#;

#[test]
fn reads_the_qwen_instruct_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("generation_config.json"), INSTRUCT).unwrap();
    let g = GenerationConfig::from_dir(dir.path()).unwrap();
    assert_eq!(g.eos_token_ids, [151645, 151643]);
    assert_eq!(g.do_sample, Some(true));
    let p = g.sampling_params();
    assert_eq!(
        p,
        SamplingParams {
            temperature: 0.7,
            top_k: 20,
            top_p: 0.8,
            ..SamplingParams::default()
        }
    );
    p.validate().unwrap();
}

/// `do_sample: false` means greedy, as in transformers' `generate`, even beside a temperature
/// (the bundled model's file asks for it this way).
#[test]
fn do_sample_false_is_greedy() {
    for text in [
        r#"{"do_sample": false, "eos_token_id": 2}"#,
        r#"{"do_sample": false, "temperature": 0.6, "top_k": 20}"#,
    ] {
        let g = GenerationConfig::from_json_str(text, "g.json").unwrap();
        let p = g.sampling_params();
        assert_eq!(p.temperature, 0.0, "{text}");
        p.validate().unwrap();
    }
    let g = GenerationConfig::from_json_str(r#"{"do_sample": true, "temperature": 0.6}"#, "g.json")
        .unwrap();
    assert_eq!(g.sampling_params().temperature, 0.6);
}

#[test]
fn missing_file_gives_library_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let g = GenerationConfig::from_file(dir.path().join("generation_config.json")).unwrap();
    assert_eq!(g, GenerationConfig::default());
    let p = g.sampling_params();
    assert_eq!(p, SamplingParams::default());
    assert_eq!(
        (p.temperature, p.top_k, p.top_p, p.min_p),
        (1.0, 0, 1.0, 0.0)
    );
    assert_eq!(p.repetition_penalty, 1.0);
}

#[test]
fn field_forms() {
    let g = GenerationConfig::from_json_str(
        r#"{"eos_token_id": 2, "top_k": -1, "min_p": 0, "repetition_penalty": 1.05, "temperature": null, "max_new_tokens": 512}"#,
        "g.json",
    )
    .unwrap();
    assert_eq!(g.eos_token_ids, [2]);
    assert_eq!(g.top_k, Some(0));
    assert_eq!(g.min_p, Some(0.0));
    assert_eq!(g.repetition_penalty, Some(1.05));
    assert_eq!(g.temperature, None);
    assert_eq!(g.max_new_tokens, Some(512));
}

#[test]
fn bad_fields_are_errors_naming_file_and_field() {
    for (text, field) in [
        (r#"{"temperature": "hot"}"#, "temperature"),
        (r#"{"top_k": 2.5}"#, "top_k"),
        (r#"{"eos_token_id": [1, -2]}"#, "eos_token_id"),
        (r#"{"eos_token_id": "x"}"#, "eos_token_id"),
        (r#"{"do_sample": 1}"#, "do_sample"),
        (r#"[1]"#, "object"),
        (r#"{"#, "invalid JSON"),
    ] {
        let err = GenerationConfig::from_json_str(text, "ckpt/generation_config.json").unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("ckpt/generation_config.json") && msg.contains(field),
            "{msg}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("generation_config.json");
    std::fs::write(&path, "{ nope").unwrap();
    let msg = format!("{:#}", GenerationConfig::from_file(&path).unwrap_err());
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}
