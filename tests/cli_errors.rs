//! Bad input gives one clear line naming the culprit and a non-zero exit, never a panic.

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A scratch copy of a fixture checkpoint.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    dir
}

/// Rewrites `model.safetensors` in `dir` through `edit`, which may drop or replace tensors.
fn rewrite(
    dir: &Path,
    edit: impl Fn(&str, Dtype, Vec<usize>, Vec<u8>) -> Option<(Dtype, Vec<usize>, Vec<u8>)>,
) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut kept: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in st.tensors() {
        if let Some((d, s, b)) = edit(&name, t.dtype(), t.shape().to_vec(), t.data().to_vec()) {
            kept.push((name, d, s, b));
        }
    }
    let views: Vec<(String, TensorView)> = kept
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, &None, &path).unwrap();
}

fn write_ids(dir: &Path, ids: &str) -> PathBuf {
    let p = dir.join("ids.json");
    std::fs::write(&p, ids).unwrap();
    p
}

const IDS: &str = "[1, 2, 3, 4, 5]";

/// Runs `qnext score` and returns stderr, asserting a clean failure.
fn score_fails(model: &Path, ids_file: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_qnext"))
        .args(["score", "--model"])
        .arg(model)
        .arg("--ids-file")
        .arg(ids_file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert_ne!(out.status.code(), Some(101), "process panicked: {err}");
    assert!(!err.contains("panicked"), "process panicked: {err}");
    assert!(err.starts_with("error: "), "no clear error line: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "error is not one line: {err}"
    );
    err
}

#[test]
fn missing_model_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = write_ids(tmp.path(), IDS);
    let e = score_fails(&tmp.path().join("nope"), &ids);
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn missing_and_invalid_config() {
    let d = copy_fixture("tiny-f32");
    let ids = write_ids(d.path(), IDS);
    std::fs::write(d.path().join("config.json"), "{\"hidden_size\": 64,").unwrap();
    let e = score_fails(d.path(), &ids);
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    let e = score_fails(d.path(), &ids);
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn config_field_missing() {
    let d = copy_fixture("tiny-f32");
    let ids = write_ids(d.path(), IDS);
    let text = std::fs::read_to_string(d.path().join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_object_mut().unwrap().remove("linear_num_value_heads");
    std::fs::write(d.path().join("config.json"), v.to_string()).unwrap();
    let e = score_fails(d.path(), &ids);
    assert!(e.contains("linear_num_value_heads"), "{e}");
}

/// A config.json whose layer count disagrees with the checkpoint (here: a billion layers, or
/// one too many) is an error before anything is allocated per layer.
#[test]
fn layer_count_disagrees_with_the_checkpoint() {
    for layers in [1_000_000_000u64, 5] {
        let d = copy_fixture("tiny-f32");
        let ids = write_ids(d.path(), IDS);
        let text = std::fs::read_to_string(d.path().join("config.json")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("layer_types");
        o.insert("num_hidden_layers".into(), layers.into());
        std::fs::write(d.path().join("config.json"), v.to_string()).unwrap();
        let e = score_fails(d.path(), &ids);
        assert!(e.contains("num_hidden_layers"), "{e}");
    }
}

#[test]
fn missing_weights_file() {
    let d = copy_fixture("tiny-f32");
    let ids = write_ids(d.path(), IDS);
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let e = score_fails(d.path(), &ids);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn missing_shard() {
    let d = copy_fixture("bf16-interval2");
    let ids = write_ids(d.path(), IDS);
    std::fs::remove_file(d.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = score_fails(d.path(), &ids);
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}

#[test]
fn missing_tensor() {
    let d = copy_fixture("tiny-f32");
    let ids = write_ids(d.path(), IDS);
    let victim = "model.layers.1.linear_attn.dt_bias";
    rewrite(d.path(), |n, dt, s, b| (n != victim).then_some((dt, s, b)));
    let e = score_fails(d.path(), &ids);
    assert!(e.contains(victim), "{e}");
}

#[test]
fn tensor_of_wrong_shape() {
    let d = copy_fixture("tiny-f32");
    let ids = write_ids(d.path(), IDS);
    let victim = "model.layers.3.self_attn.k_proj.weight";
    rewrite(d.path(), |n, dt, s, b| {
        if n == victim {
            let half = b.len() / 2;
            Some((dt, vec![s[0] / 2, s[1]], b[..half].to_vec()))
        } else {
            Some((dt, s, b))
        }
    });
    let e = score_fails(d.path(), &ids);
    assert!(e.contains(victim) && e.contains("shape"), "{e}");
}

#[test]
fn tensor_of_wrong_dtype() {
    let d = copy_fixture("tiny-f32");
    let ids = write_ids(d.path(), IDS);
    let victim = "model.layers.0.mlp.experts.2.up_proj.weight";
    rewrite(d.path(), |n, dt, s, b| {
        Some(if n == victim {
            (Dtype::I32, s, b)
        } else {
            (dt, s, b)
        })
    });
    let e = score_fails(d.path(), &ids);
    assert!(e.contains(victim) && e.contains("I32"), "{e}");
}

#[test]
fn fp8_weight_without_scale() {
    let d = copy_fixture("fp8-f32scale");
    let ids = write_ids(d.path(), IDS);
    let victim = "model.layers.0.mlp.shared_expert.down_proj.weight_scale_inv";
    rewrite(d.path(), |n, dt, s, b| (n != victim).then_some((dt, s, b)));
    let e = score_fails(d.path(), &ids);
    assert!(e.contains(victim), "{e}");
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let d = copy_fixture("tiny-f32");
    let ids = write_ids(d.path(), IDS);
    let path = d.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let e = score_fails(d.path(), &ids);
    assert!(e.contains("model.safetensors"), "{e}");
    let mut garbage = bytes.clone();
    garbage[8..40].copy_from_slice(&[b'#'; 32]);
    std::fs::write(&path, &garbage).unwrap();
    let e = score_fails(d.path(), &ids);
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(&path, &bytes[..4]).unwrap();
    let e = score_fails(d.path(), &ids);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn bad_token_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-f32");
    let e = score_fails(&model, &write_ids(tmp.path(), "[1, 2, 100000]"));
    assert!(e.contains("100000") && e.contains("out of range"), "{e}");
    let e = score_fails(&model, &write_ids(tmp.path(), "[1, -2, 3]"));
    assert!(e.contains("element 1"), "{e}");
    let e = score_fails(&model, &write_ids(tmp.path(), "{\"ids\": [1]}"));
    assert!(e.contains("ids.json"), "{e}");
    let e = score_fails(&model, &write_ids(tmp.path(), "[1, 2"));
    assert!(e.contains("ids.json") && e.contains("JSON"), "{e}");
    let e = score_fails(&model, &tmp.path().join("absent.json"));
    assert!(e.contains("absent.json"), "{e}");
}

#[test]
fn sequence_longer_than_context() {
    let d = copy_fixture("tiny-f32");
    let text = std::fs::read_to_string(d.path().join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["max_position_embeddings"] = serde_json::json!(8);
    std::fs::write(d.path().join("config.json"), v.to_string()).unwrap();
    let ids = write_ids(d.path(), "[1,2,3,4,5,6,7,8,9,10]");
    let e = score_fails(d.path(), &ids);
    assert!(e.contains("context length"), "{e}");
}
