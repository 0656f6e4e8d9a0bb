//! Our log-probabilities against transformers' (`Qwen3NextForCausalLM`, float32) on the
//! committed random checkpoints, at every position and for every vocabulary entry, for every
//! way of feeding the tokens. Fixtures: `tools/gen_fixtures.py`, described in
//! `tests/fixtures/README.md`.
//!
//! Tolerance: both sides compute in f32 from the same stored weights (BF16 and FP8 widened
//! exactly), so differences come from summation order and transcendental rounding only:
//! ~1e-6 relative per operation, compounded over a few layers and a 150-token recurrence.
//! `MAX_ABS` = 2e-4 on log-probabilities allows that with margin while any real defect
//! (a wrong norm convention, head mapping, gate, state hand-over between chunks) moves them
//! by 1e-2 or more.

use qnext::checkpoint::LoadMode;
use qnext::engine::score::{all_logprobs, Feed};
use qnext::kernels::matmul::Precision;
use qnext::model::Model;
use std::path::{Path, PathBuf};

const MAX_ABS: f32 = 2e-4;

// The fast path (`Precision::Fast`: bfloat16 dot products, see `kernels::matmul`) rounds
// matrix inputs to bfloat16, so it is held to what transformers' own BF16 inference does on
// the same checkpoint: `tools/bf16_deviation.py` measures that model's max and mean
// |Δ log-probability| from its f32 run (tests/fixtures/bf16_deviation.json). On these random
// checkpoints rounding near-tied router scores flips expert choices, which dominates the max;
// the mean says how close the path is overall, but it too moves with which tokens happen to
// flip: FP8 products with exact weights and one rounding (of the scaled activation) measure
// 1.12–1.14× transformers' mean on fp8-f32scale, where the earlier arithmetic with two
// roundings (weight and activation) measured 1.0×. Allowed: the mean within 1.25× of
// transformers' BF16 mean (measured 0.46–1.14×) and the max within 1.5× (measured
// 0.72–1.29×). A kernel defect (a wrong scale block, unrounded or dropped columns) fails the
// tight checks in tests/matmul_precision.rs and moves these by far more.
const FAST_MEAN_RATIO: f64 = 1.25;
const FAST_MAX_RATIO: f64 = 1.5;
// `--lm-head q8` moves every lm_head weight by up to half a quantization step (bounded and
// its products checked exactly in tests/matmul_precision.rs), which adds noise to every
// logit on top of the fast path. Measured mean ratios, token by token (the larger feed):
// bf16-interval2 0.72× (0.65× with the stored lm_head), fp8-f32scale 1.29× (1.12×),
// fp8-bf16scale 1.13× (0.46×); maxima within 2 % of the stored lm_head's. Allowed: the mean
// within 1.5×, the max within the fast path's 1.5×.
const Q8_MEAN_RATIO: f64 = 1.5;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The checkpoint of reference `name`: the bundled models live in `models/`, their references
/// in `tests/fixtures/` like the others'.
fn checkpoint(name: &str) -> PathBuf {
    if name.starts_with("qnext-tiny") {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(name)
    } else {
        fixture(name)
    }
}

struct Reference {
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    /// Where the reference is float64 (the Qwen3.5 fixtures): how far transformers' own
    /// float32 run is from it, the scale of f32 rounding on that checkpoint.
    f32_max_abs: Option<f32>,
}

fn reference(dir: &Path) -> Reference {
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("ids").unwrap();
    assert_eq!(ids.dtype(), safetensors::Dtype::I64);
    let ids = ids
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    let lp = st.tensor("logprobs").unwrap();
    assert_eq!(lp.dtype(), safetensors::Dtype::F32);
    let logprobs = lp
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let f32_max_abs = st
        .tensor("f32_max_abs")
        .ok()
        .map(|t| f32::from_le_bytes(t.data()[..4].try_into().unwrap()));
    Reference {
        ids,
        logprobs,
        f32_max_abs,
    }
}

/// On a float64 reference, an f32 engine summing in another order than transformers is off
/// by about what transformers' own f32 run is (twice that allowed); q35-dense measures 1.8e-4
/// there, ours 2.9e-4 (its gated norms rescale near-zero DeltaNet outputs). Elsewhere
/// `MAX_ABS`.
fn check(name: &str, feeds: &[Feed]) {
    let bound = reference(&fixture(name))
        .f32_max_abs
        .map_or(MAX_ABS, |d| MAX_ABS.max(2.0 * d));
    check_with(name, feeds, Precision::Exact, false, bound, f64::INFINITY);
}

/// Transformers' BF16 deviation on fixture `name`: (max, mean).
fn bf16_deviation(name: &str) -> (f64, f64) {
    let text = std::fs::read_to_string(fixture("bf16_deviation.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let f = &v["fixtures"][name];
    (
        f["max_abs"].as_f64().unwrap(),
        f["mean_abs"].as_f64().unwrap(),
    )
}

fn check_fast(name: &str, lm_head_q8: bool) {
    let (max, mean) = bf16_deviation(name);
    check_with(
        name,
        &FEEDS,
        Precision::Fast,
        lm_head_q8,
        (FAST_MAX_RATIO * max) as f32,
        if lm_head_q8 {
            Q8_MEAN_RATIO
        } else {
            FAST_MEAN_RATIO
        } * mean,
    );
}

fn check_with(
    name: &str,
    feeds: &[Feed],
    precision: Precision,
    lm_head_q8: bool,
    max_abs: f32,
    max_mean: f64,
) {
    let mut model = Model::load(&checkpoint(name)).unwrap();
    model.precision = precision;
    if lm_head_q8 {
        assert!(model.quantize_lm_head(), "{name}: lm_head already 8-bit");
    }
    let r = reference(&fixture(name));
    let vocab = model.cfg.vocab_size;
    assert!(
        r.ids.len() > 128,
        "fixture must span more than two DeltaNet chunks"
    );
    assert_eq!(r.logprobs.len(), r.ids.len() * vocab);
    for &feed in feeds {
        let ours = all_logprobs(&model, &r.ids, feed).unwrap();
        let (mut worst, mut at, mut sum) = (0.0f32, 0, 0.0f64);
        for (i, (a, b)) in ours.iter().zip(&r.logprobs).enumerate() {
            let d = (a - b).abs();
            sum += d as f64;
            if d > worst || d.is_nan() {
                worst = d;
                at = i;
            }
        }
        let mean = sum / ours.len() as f64;
        eprintln!(
            "{name} {precision:?} (lm_head q8: {lm_head_q8}) feed {feed:?}: max |Δ logprob| = {worst:.2e}, mean {mean:.2e}"
        );
        assert!(
            mean <= max_mean,
            "{name} {precision:?} feed {feed:?}: mean |Δ logprob| = {mean} > {max_mean}"
        );
        assert!(
            worst <= max_abs,
            "{name} {precision:?} feed {feed:?}: max |Δ logprob| = {worst} at position {} token {} (ours {}, reference {})",
            at / vocab,
            at % vocab,
            ours[at],
            r.logprobs[at]
        );
    }
}

const FEEDS: [Feed; 5] = [
    Feed::All,
    Feed::Single,
    Feed::Chunks(7),
    Feed::Chunks(64),
    Feed::Chunks(100),
];

#[test]
fn tiny_f32() {
    check("tiny-f32", &FEEDS);
}

#[test]
fn bf16_sharded_interval2_v5_config() {
    check("bf16-interval2", &FEEDS);
}

#[test]
fn yarn_f32() {
    check("yarn-f32", &FEEDS);
}

#[test]
fn fp8_f32_scales_partial_blocks() {
    check("fp8-f32scale", &FEEDS);
}

#[test]
fn fp8_bf16_scales() {
    check("fp8-bf16scale", &FEEDS);
}

/// The Qwen3.5 / 3.6 family (`tools/gen_qwen35_fixtures.py`): references from transformers'
/// `Qwen3_5ForConditionalGeneration` / `Qwen3_5MoeForConditionalGeneration` fed token ids only,
/// so with their text-only interleaved multimodal RoPE. Dense with tied embeddings and a
/// vision tower in the checkpoint that must be skipped.
#[test]
fn qwen35_dense_tied_f32() {
    check("q35-dense", &FEEDS);
}

/// MoE with fused 3-D experts (the BF16 releases), split over two shards.
#[test]
fn qwen35_moe_fused_experts_bf16() {
    check("q35-moe-bf16", &FEEDS);
}

/// MoE with experts one by one in FP8 with BF16 block scales, ragged 128-blocks (the FP8
/// releases).
#[test]
fn qwen35_moe_fp8_per_expert() {
    check("q35-moe-fp8", &FEEDS);
}

/// The server tests' Qwen3.5 checkpoint (1,024-token vocabulary, the family's template).
#[test]
fn qwen35_chat_fixture() {
    check("q35-chat", &FEEDS);
}

#[test]
fn fast_bf16_within_transformers_bf16_deviation() {
    check_fast("bf16-interval2", false);
}

#[test]
fn fast_fp8_within_transformers_bf16_deviation() {
    check_fast("fp8-f32scale", false);
    check_fast("fp8-bf16scale", false);
}

/// The bundled model (`models/qnext-tiny`, trained by tools/tiny_model/) and its FP8 copy: the
/// same comparison on trained weights, whose references come from a held-out conversation.
#[test]
fn bundled_trained_model_bf16() {
    check("qnext-tiny", &FEEDS);
}

#[test]
fn bundled_trained_model_fp8() {
    check("qnext-tiny-fp8", &FEEDS);
}

/// The bundled tokenizer (Qwen's pre-tokenizer behind a split of capital-letter runs, a
/// lookaround regex) encodes as Python's `tokenizers` did when the references were made.
#[test]
fn bundled_tokenizer_matches_python_tokenizers() {
    for name in ["qnext-tiny", "qnext-tiny-fp8"] {
        let text = std::fs::read_to_string(fixture(name).join("reference_text.txt")).unwrap();
        let tok =
            qnext::text::tokenizer::Tokenizer::from_file(checkpoint(name).join("tokenizer.json"))
                .unwrap();
        assert_eq!(
            tok.encode(&text, false).unwrap(),
            reference(&fixture(name)).ids,
            "{name}"
        );
    }
}

/// `--lm-head q8` on top of the fast path, held to the same bounds.
#[test]
fn fast_with_q8_lm_head_within_transformers_bf16_deviation() {
    for name in ["bf16-interval2", "fp8-f32scale", "fp8-bf16scale"] {
        check_fast(name, true);
    }
}

/// Releasing the stored lm_head's pages (`Model::quantize_lm_head`) must leave every other
/// tensor readable: in an anonymous copy a released page reads back as zeros, so the same
/// model loaded that way and from the file mapping must score the same.
#[test]
fn q8_lm_head_releases_only_its_own_pages() {
    for name in ["fp8-bf16scale", "qwen-vocab"] {
        let dir = fixture(name);
        let ids: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % 300).collect();
        let score = |mode| {
            let mut model = Model::load_with(&dir, mode).unwrap();
            assert!(model.quantize_lm_head());
            all_logprobs(&model, &ids, Feed::All).unwrap()
        };
        assert_eq!(
            score(LoadMode::HugePages),
            score(LoadMode::Mmap),
            "{name}: released pages changed the results"
        );
    }
}

fn tensor_f32(st: &safetensors::SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn tensor_i64(st: &safetensors::SafeTensors, name: &str) -> Vec<i64> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The real Qwen vocabulary (151,936 rows): the text is tokenized by our tokenizer into the
/// ids transformers saw, and the log-probabilities agree — full rows at the first and last
/// position, the reference's top-20 entries and the next-token log-probability everywhere.
#[test]
fn qwen_vocab_real_tokenizer() {
    let dir = fixture("qwen-vocab");
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<u32> = tensor_i64(&st, "ids").iter().map(|&x| x as u32).collect();
    let text = std::fs::read_to_string(dir.join("reference_text.txt")).unwrap();
    let tok = qnext::text::tokenizer::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    assert_eq!(
        tok.encode(&text, false).unwrap(),
        ids,
        "tokenization differs from transformers'"
    );

    let mut model = Model::load(&dir).unwrap();
    model.precision = Precision::Exact;
    let v = model.cfg.vocab_size;
    let t = ids.len();
    let at_pos = tensor_i64(&st, "logprobs_at_positions");
    let at = tensor_f32(&st, "logprobs_at");
    let topk_ids = tensor_i64(&st, "topk_ids");
    let topk_lp = tensor_f32(&st, "topk_logprobs");
    let next = tensor_f32(&st, "next_token_logprobs");
    let k = topk_ids.len() / t;
    for feed in [Feed::All, Feed::Chunks(64), Feed::Single] {
        let ours = all_logprobs(&model, &ids, feed).unwrap();
        let mut worst = 0.0f32;
        for (r, &p) in at_pos.iter().enumerate() {
            let p = p as usize;
            for j in 0..v {
                worst = worst.max((ours[p * v + j] - at[r * v + j]).abs());
            }
        }
        for p in 0..t {
            for j in 0..k {
                let id = topk_ids[p * k + j] as usize;
                worst = worst.max((ours[p * v + id] - topk_lp[p * k + j]).abs());
            }
            if p + 1 < t {
                worst = worst.max((ours[p * v + ids[p + 1] as usize] - next[p]).abs());
            }
        }
        assert!(
            worst <= MAX_ABS,
            "qwen-vocab feed {feed:?}: max |Δ logprob| = {worst}"
        );
        eprintln!("qwen-vocab feed {feed:?}: max |Δ logprob| = {worst:.2e}");
    }
}

/// `--rope-scaling` and `--hf-overrides` on a checkpoint whose config.json lacks the YaRN
/// settings give the reference's logits of the one that has them (the yarn-f32 fixture's
/// weights, its config without `rope_scaling`); without them, the logits are not the
/// reference's, and the context is the original one.
#[test]
fn yarn_from_overrides() {
    use qnext::config::Overrides;
    let src = fixture("yarn-f32");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let scaling = cfg["rope_scaling"].as_object().unwrap().clone();
    cfg["rope_scaling"] = serde_json::Value::Null;
    cfg["max_position_embeddings"] = serde_json::json!(2048);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let r = reference(&src);
    let max_diff = |model: &Model| {
        let ours = all_logprobs(model, &r.ids, Feed::All).unwrap();
        ours.iter()
            .zip(&r.logprobs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    };
    let load = |o: Overrides| {
        let mut m = Model::load_overridden(dir.path(), LoadMode::Mmap, &o).unwrap();
        m.precision = Precision::Exact;
        m
    };
    let plain = load(Overrides::default());
    assert_eq!(plain.cfg.context_length(), 2048);
    assert!(
        max_diff(&plain) > 100.0 * MAX_ABS,
        "YaRN makes no difference?"
    );
    for o in [
        Overrides {
            rope_scaling: Some(scaling.clone()),
            ..Overrides::default()
        },
        Overrides {
            hf: Some(
                serde_json::json!({ "rope_scaling": scaling })
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
            ..Overrides::default()
        },
    ] {
        let m = load(o);
        assert_eq!(m.cfg.context_length(), 8192);
        let d = max_diff(&m);
        assert!(d <= MAX_ABS, "max |Δ logprob| {d}");
    }
}
