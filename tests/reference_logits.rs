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

use qnext::engine::score::{all_logprobs, Feed};
use qnext::model::Model;
use std::path::{Path, PathBuf};

const MAX_ABS: f32 = 2e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Reference {
    ids: Vec<u32>,
    logprobs: Vec<f32>,
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
    Reference { ids, logprobs }
}

fn check(name: &str, feeds: &[Feed]) {
    let dir = fixture(name);
    let model = Model::load(&dir).unwrap();
    let r = reference(&dir);
    let vocab = model.cfg.vocab_size;
    assert!(
        r.ids.len() > 128,
        "fixture must span more than two DeltaNet chunks"
    );
    assert_eq!(r.logprobs.len(), r.ids.len() * vocab);
    for &feed in feeds {
        let ours = all_logprobs(&model, &r.ids, feed).unwrap();
        let (mut worst, mut at) = (0.0f32, 0);
        for (i, (a, b)) in ours.iter().zip(&r.logprobs).enumerate() {
            let d = (a - b).abs();
            if d > worst || d.is_nan() {
                worst = d;
                at = i;
            }
        }
        assert!(
            worst <= MAX_ABS,
            "{name} feed {feed:?}: max |Δ logprob| = {worst} at position {} token {} (ours {}, reference {})",
            at / vocab,
            at % vocab,
            ours[at],
            r.logprobs[at]
        );
        eprintln!("{name} feed {feed:?}: max |Δ logprob| = {worst:.2e}");
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

    let model = Model::load(&dir).unwrap();
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
