//! `qnext quantize` against transformers' FineGrainedFP8 quantiser, byte for byte: the bundled
//! `models/qnext-tiny-fp8` is what `tools/fp8_quantize_reference.py` (transformers'
//! `Fp8Quantize`) made of `models/qnext-tiny`. The result loads, and its log-probabilities are
//! transformers' on the dequantised weights (`tests/fixtures/qnext-tiny-fp8`). Refusals and
//! interruptions leave no output behind.

use qnext::checkpoint::{Checkpoint, LoadMode};
use qnext::engine::score::{all_logprobs, Feed};
use qnext::model::Model;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn qnext(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qnext"))
        .args(args)
        .output()
        .expect("running qnext")
}

fn quantize(input: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "quantize",
        "--model",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    qnext(&args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fixture's reference: (token ids, log-probabilities `[T, V]`).
fn reference(dir: &Path) -> (Vec<u32>, Vec<f32>) {
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let data = |name: &str| st.tensor(name).unwrap().data().to_vec();
    let ids = data("ids")
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    let logprobs = data("logprobs")
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (ids, logprobs)
}

/// The checkpoint in `dir`'s log-probabilities of `ids` on the exact path.
fn exact_logprobs(dir: &Path, ids: &[u32]) -> Vec<f32> {
    let mut model = Model::load_with(dir, LoadMode::Mmap).unwrap();
    model.precision = qnext::kernels::matmul::Precision::Exact;
    all_logprobs(&model, ids, Feed::Chunks(64)).unwrap()
}

/// Nothing of a run is left in `dir` but what was there before (`keep`).
fn assert_only(dir: &Path, keep: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, keep, "left in {}", dir.display());
}

#[test]
fn bytes_equal_transformers_quantiser_and_logits_match_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fp8");
    let o = quantize(&root().join("models/qnext-tiny"), &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want_dir = root().join("models/qnext-tiny-fp8");
    let (got, want) = (
        Checkpoint::open(&out).unwrap(),
        Checkpoint::open(&want_dir).unwrap(),
    );
    let mut names: Vec<&str> = want.names().collect();
    names.sort();
    let mut got_names: Vec<&str> = got.names().collect();
    got_names.sort();
    assert_eq!(got_names, names);
    for name in &names {
        let (g, w) = (got.get(name).unwrap(), want.get(name).unwrap());
        assert_eq!((g.dtype, g.shape), (w.dtype, w.shape), "{name}");
        assert!(g.bytes() == w.bytes(), "bytes of {name} differ");
    }
    let json = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()
    };
    assert_eq!(json(&out), json(&want_dir));
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(want_dir.join(f)).unwrap(),
            "{f}"
        );
    }

    // Transformers' log-probabilities on the dequantised weights, f32 throughout; the
    // tolerance of tests/reference_logits.rs (2e-4, summation order only).
    let (ids, reference) = reference(&root().join("tests/fixtures/qnext-tiny-fp8"));
    let ours = exact_logprobs(&out, &ids);
    let worst = ours
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 2e-4, "max |Δ log-probability| {worst}");
}

#[test]
fn refuses_quantised_input_and_an_existing_output() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = quantize(&root().join("models/qnext-tiny-fp8"), &out, &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already quantised"), "{}", stderr(&o));
    assert_only(tmp.path(), &[]);

    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("mine.txt"), "keep").unwrap();
    let o = quantize(&root().join("models/qnext-tiny"), &out, &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert!(out.join("mine.txt").exists());

    let o = quantize(&root().join("models/qnext-tiny"), &out, &["--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!out.join("mine.txt").exists() && out.join("model.safetensors").exists());
    assert_only(tmp.path(), &["out"]);
}

/// A copy of the bundled BF16 model with one late tensor's first value set to NaN.
fn with_nan_late(dir: &Path) -> PathBuf {
    let src = root().join("models/qnext-tiny");
    let copy = dir.join("bad");
    std::fs::create_dir(&copy).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
    }
    let path = copy.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let (header, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let name = "mtp.layers.0.mlp.experts.15.down_proj.weight";
    let info = meta.info(name).expect("tensor in the bundled model");
    let at = 8 + header + info.data_offsets.0;
    bytes[at..at + 2].copy_from_slice(&half::bf16::NAN.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    copy
}

#[test]
fn a_failure_midway_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = with_nan_late(tmp.path());
    let out = tmp.path().join("out");
    let o = quantize(&bad, &out, &[]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("mtp.layers.0.mlp.experts.15.down_proj.weight") && e.contains("not finite"),
        "{e}"
    );
    assert_only(tmp.path(), &["bad"]);
}

#[test]
fn an_interrupted_run_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // 20 ms per tensor: about 20 s for the whole model, interrupted after 1 s.
    let child = Command::new(env!("CARGO_BIN_EXE_qnext"))
        .args(["quantize", "--model"])
        .arg(root().join("models/qnext-tiny"))
        .arg("--out")
        .arg(&out)
        .env("QNEXT_QUANTIZE_PAUSE_MS", "20")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let partial = std::fs::read_dir(tmp.path()).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".out.partial-")
    });
    assert!(partial, "the run writes into a hidden folder beside --out");
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("interrupted"), "{}", stderr(&o));
    assert_only(tmp.path(), &[]);
}

/// A Qwen3.5 BF16 checkpoint with stacked experts (`tests/fixtures/q35-moe-bf16`) becomes the
/// FP8 releases' layout: every expert one by one (`experts.{e}.gate_proj.weight` …), each the
/// quantisation of its own rows of the stack (gate rows first), with its scales; `in_proj_a`,
/// `in_proj_b`, routers, shared-expert gates, `lm_head`, embeddings and the vision tower kept.
/// The result loads and stays near the BF16 reference.
#[test]
fn qwen35_stacked_experts_become_per_expert_fp8() {
    use qnext::checkpoint::quantize::{quantize_fp8_serial, Bf16Rows};
    use qnext::checkpoint::DType;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fp8");
    let src_dir = root().join("tests/fixtures/q35-moe-bf16");
    let o = quantize(&src_dir, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (src, got) = (
        Checkpoint::open(&src_dir).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    let mut stacks = 0;
    for name in src.names() {
        let t = src.get(name).unwrap();
        let (kind, stem) = match name.rsplit_once("mlp.experts.") {
            Some((stem, kind)) if t.shape.len() == 3 => (kind, stem),
            _ => continue,
        };
        stacks += 1;
        assert!(!got.contains(name), "{name} kept stacked");
        let (e_count, r, k) = (t.shape[0], t.shape[1], t.shape[2]);
        let bits: Vec<u16> = t.elems::<u16>().as_slice().to_vec();
        for e in 0..e_count {
            let parts: Vec<(&str, usize, usize)> = if kind == "gate_up_proj" {
                vec![
                    ("gate_proj", e * r, r / 2),
                    ("up_proj", e * r + r / 2, r / 2),
                ]
            } else {
                vec![("down_proj", e * r, r)]
            };
            for (m, first, rows) in parts {
                let w = format!("{stem}mlp.experts.{e}.{m}.weight");
                let want = quantize_fp8_serial(
                    rows,
                    k,
                    &Bf16Rows {
                        bits: &bits[first * k..(first + rows) * k],
                        k,
                    },
                )
                .unwrap();
                let g = got.get(&w).unwrap();
                assert_eq!((g.dtype, g.shape), (DType::F8E4M3, &[rows, k][..]), "{w}");
                assert!(g.bytes() == want.codes.as_slice(), "codes of {w}");
                let s = got.get(&format!("{w}_scale_inv")).unwrap();
                assert_eq!(s.to_f32().unwrap(), want.scale_inv, "scales of {w}");
            }
        }
    }
    assert_eq!(stacks, 8, "4 layers × 2 stacks");
    for name in got.names() {
        let t = got.get(name).unwrap();
        let kept = name.contains("in_proj_a")
            || name.contains("in_proj_b")
            || name.ends_with("mlp.gate.weight")
            || name.contains("shared_expert_gate")
            || name.starts_with("lm_head")
            || name.starts_with("mtp.fc")
            || name.contains("embed_tokens")
            || name.starts_with("model.visual.");
        if kept {
            assert_ne!(t.dtype, DType::F8E4M3, "{name} quantised");
        }
        for q in ["in_proj_qkv.weight", "in_proj_z.weight", "out_proj.weight"] {
            if name.ends_with(q) {
                assert_eq!(t.dtype, DType::F8E4M3, "{name} not quantised");
            }
        }
    }
    // The bytes above are what makes this exact; here the result must load and run. FP8
    // moves every weight by up to 1/16 of itself, and this small random model amplifies it:
    // transformers, run on the dequantised output, is 0.295 from the BF16 reference in mean
    // |Δ log-probability| (as is the engine); a dropped or misplaced expert matrix measures
    // several units.
    let (ids, reference) = reference(&src_dir);
    let ours = exact_logprobs(&out, &ids);
    let mean = ours
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs() as f64)
        .sum::<f64>()
        / ours.len() as f64;
    eprintln!("q35-moe-bf16 quantised: mean |Δ log-probability| {mean:.3e}");
    assert!(mean < 0.5, "mean |Δ log-probability| {mean}");
}
