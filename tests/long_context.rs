//! Long context: our log-probabilities over 32,768 tokens (the long-f32 fixture's YaRN context,
//! 4 × 8192) against a float64 recomputation from the specification
//! (`tools/gen_long_fixture.py`), fed in prompt chunks of 256 as the server feeds them.
//!
//! Tolerance: our `--exact` path computes in f32, ~1e-7 relative per operation; what could
//! grow with the context is the attention's sums over up to 32K positions and the DeltaNet
//! state carried through 512 chunks of 64 (its decays forget old rounding rather than
//! accumulate it). Measured: 2.3e-5. Held to the short fixtures' 2e-4
//! (tests/reference_logits.rs), far below what a wrong RoPE frequency at large positions, a
//! state mis-carried between chunks or a lost K/V block would cause (1e-1 or more).

use qnext::engine::score::{all_logprobs, Feed};
use qnext::kernels::matmul::Precision;
use qnext::model::Model;
use std::path::Path;

const MAX_ABS: f64 = 2e-4;

#[test]
fn logprobs_at_32k_tokens_match_a_float64_recomputation() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/long-f32");
    let mut model = Model::load(&dir).unwrap();
    model.precision = Precision::Exact;
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let i64s = |name: &str| -> Vec<i64> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let ids: Vec<u32> = i64s("ids").into_iter().map(|i| i as u32).collect();
    let rows = i64s("rows");
    let want: Vec<f64> = st
        .tensor("logprobs_at")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(ids.len(), 32768);
    assert_eq!(model.cfg.context_length(), ids.len());
    let v = model.cfg.vocab_size;
    let ours = all_logprobs(&model, &ids, Feed::Chunks(256)).unwrap();
    let (mut worst, mut at) = (0.0f64, 0);
    for (i, &r) in rows.iter().enumerate() {
        let r = r as usize;
        for t in 0..v {
            let d = (ours[r * v + t] as f64 - want[i * v + t]).abs();
            if d > worst {
                (worst, at) = (d, r);
            }
        }
    }
    eprintln!("max |Δ logprob| {worst:.2e} at position {at}");
    assert!(worst <= MAX_ABS, "max |Δ logprob| {worst} at position {at}");
}
