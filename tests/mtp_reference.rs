//! The MTP draft head against transformers: `tools/gen_fixtures.py` computes its log-probs with
//! transformers' own decoder layer, RMSNorm, embedding and `lm_head`, wired per spec §11.1
//! (row `i`: token `i+1`, the main model's post-norm hidden state at `i`, position `i`, causal
//! attention over rows `0..=i`). Ours come from drafting after every prefix of the fixture's
//! tokens, with the prefix fed one token at a time and in chunks, so that both ways the head's
//! K/V is filled (one slot per step, several per step) are checked at every position.
//!
//! Tolerance: as in reference_logits.rs, f32 on both sides from the same stored weights; the
//! head adds one layer on top of the main model's hidden state, so the 2e-4 bound on
//! log-probabilities is kept (observed values are printed).

use qnext::kernels::activation::log_softmax;
use qnext::kernels::matmul::Precision;
use qnext::model::{Model, SeqInput, Want};
use std::path::{Path, PathBuf};

const MAX_ABS: f32 = 2e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn tensor(st: &safetensors::SafeTensors, name: &str) -> Vec<u8> {
    st.tensor(name).unwrap().data().to_vec()
}

/// (ids, MTP log-probs `[T-1, V]`).
fn reference(dir: &Path) -> (Vec<u32>, Vec<f32>) {
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = tensor(&st, "ids")
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    let lp = tensor(&st, "mtp_logprobs")
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (ids, lp)
}

/// Our MTP log-probs at row `i` for every `i` that ends a chunk of `chunk` tokens (every `i`
/// when `chunk` is 1), drafting after each chunk.
fn ours(model: &Model, ids: &[u32], chunk: usize) -> Vec<(usize, Vec<f32>)> {
    let mut cache = model.new_cache(ids.len() + 1);
    model.enable_mtp(&mut cache).unwrap();
    let mut out = Vec::new();
    let mut pos = 0;
    for c in ids[..ids.len() - 1].chunks(chunk) {
        model
            .forward(&mut [SeqInput {
                tokens: c,
                cache: &mut cache,
                want: Want::Last,
            }])
            .unwrap();
        pos += c.len();
        // Row pos−1: the next token with the hidden state of the last one fed.
        let logits = model.draft_step(&mut [(ids[pos], &mut cache)]).unwrap();
        let mut lp = vec![0.0f32; logits[0].len()];
        log_softmax(&logits[0], &mut lp);
        out.push((pos - 1, lp));
    }
    out
}

fn check(name: &str) {
    let dir = fixture(name);
    let ckpt = if name.starts_with("qnext-tiny") {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(name)
    } else {
        dir.clone()
    };
    let mut model = Model::load(&ckpt).unwrap();
    model.precision = Precision::Exact;
    assert!(model.has_mtp(), "{name}: fixture without an MTP head");
    let (ids, reference) = reference(&dir);
    let vocab = model.cfg.vocab_size;
    assert_eq!(reference.len(), (ids.len() - 1) * vocab);
    for chunk in [1, 7, 64] {
        let rows = ours(&model, &ids, chunk);
        assert_eq!(rows.len(), (ids.len() - 1).div_ceil(chunk));
        let mut worst = (0.0f32, 0, 0);
        for (row, lp) in &rows {
            let r = &reference[row * vocab..(row + 1) * vocab];
            for (j, (a, b)) in lp.iter().zip(r).enumerate() {
                let d = (a - b).abs();
                if d > worst.0 || d.is_nan() {
                    worst = (d, *row, j);
                }
            }
        }
        eprintln!(
            "{name} MTP, chunks of {chunk}: max |Δ logprob| = {:.2e} (row {}, token {})",
            worst.0, worst.1, worst.2
        );
        assert!(
            worst.0 <= MAX_ABS,
            "{name}: MTP log-probs differ by {} at row {} token {}",
            worst.0,
            worst.1,
            worst.2
        );
    }
}

#[test]
fn mtp_bf16_matches_transformers() {
    check("bf16-interval2");
}

#[test]
fn mtp_fp8_matches_transformers() {
    check("fp8-f32scale");
}

/// The Qwen3.5 family's MTP heads: a dense one; a MoE one with its experts one by one next to
/// a main model with fused experts (as Qwen3.5-35B-A3B ships them); FP8.
#[test]
fn mtp_qwen35_matches_transformers() {
    check("q35-dense");
    check("q35-moe-bf16");
    check("q35-moe-fp8");
}

/// The bundled trained model's MTP head (tools/tiny_model/), BF16 and FP8.
#[test]
fn mtp_bundled_trained_model() {
    check("qnext-tiny");
    check("qnext-tiny-fp8");
}

#[test]
fn checkpoint_without_mtp_is_refused() {
    let dir = fixture("tiny-f32");
    let model = Model::load(&dir).unwrap();
    assert!(!model.has_mtp());
    let mut cache = model.new_cache(16);
    let err = model.enable_mtp(&mut cache).unwrap_err().to_string();
    assert!(err.contains("no MTP head"), "{err}");
}
