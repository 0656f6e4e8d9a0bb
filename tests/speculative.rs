//! Speculative decoding with the MTP head: lossless at temperature 0, exact rollback after a
//! rejection, and with sampling the target's distribution (a statistical test).

use qnext::cache::SeqCache;
use qnext::engine::speculative::generate;
use qnext::kernels::matmul::Precision;
use qnext::model::{Model, SeqInput, Want};
use qnext::sampling::{Sampler, SamplingParams};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn load(name: &str, precision: Precision) -> Model {
    let mut m = Model::load(&fixture(name)).unwrap();
    m.precision = precision;
    m
}

fn prompt(len: usize, vocab: usize, seed: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 7919) >> 7) % vocab as u32)
        .collect()
}

/// Tokens and the logits each was chosen from.
fn run(
    model: &Model,
    prompt: &[u32],
    params: SamplingParams,
    n: usize,
    k: usize,
) -> (
    Vec<u32>,
    Vec<Vec<f32>>,
    qnext::engine::speculative::Acceptance,
) {
    let mut cache = model.new_cache(prompt.len() + n + 8);
    let mut sampler = Sampler::new(params).unwrap();
    let (mut toks, mut rows) = (Vec::new(), Vec::new());
    let acc = generate(
        model,
        &mut cache,
        prompt,
        &mut sampler,
        (n, k),
        &[],
        |t, l| {
            toks.push(t);
            rows.push(l.to_vec());
            true
        },
    )
    .unwrap();
    (toks, rows, acc)
}

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    }
}

#[test]
fn greedy_tokens_and_logits_equal_without_speculation() {
    for name in ["bf16-interval2", "fp8-f32scale"] {
        for precision in [Precision::Exact, Precision::Fast] {
            let model = load(name, precision);
            let vocab = model.cfg.vocab_size;
            for (len, seed) in [(5, 1), (23, 2), (70, 3)] {
                let p = prompt(len, vocab, seed);
                let (base, base_rows, _) = run(&model, &p, greedy(), 40, 0);
                for k in 1..=4 {
                    let (toks, rows, acc) = run(&model, &p, greedy(), 40, k);
                    assert_eq!(
                        toks, base,
                        "{name} {precision:?} prompt {len}: k={k} changed the tokens"
                    );
                    // Bit for bit: each row is the logits plain decoding computes there.
                    assert!(
                        rows.iter()
                            .zip(&base_rows)
                            .all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())),
                        "{name} {precision:?} prompt {len}: k={k} changed the logits"
                    );
                    assert!(acc.rounds > 0);
                }
            }
        }
    }
}

/// A cache fed `tokens` one step at a time, as plain decoding feeds them.
fn fed_plainly(model: &Model, prompt: &[u32], tokens: &[u32], len: usize) -> SeqCache {
    let mut c = model.new_cache(len);
    model.enable_mtp(&mut c).unwrap();
    model
        .forward(&mut [SeqInput {
            tokens: prompt,
            cache: &mut c,
            want: Want::Last,
        }])
        .unwrap();
    for t in tokens {
        model
            .forward(&mut [SeqInput {
                tokens: std::slice::from_ref(t),
                cache: &mut c,
                want: Want::Last,
            }])
            .unwrap();
    }
    c
}

/// Drafts forced right (the greedy continuation) or wrong (other ids): after ending the
/// speculative step after any of its tokens, every state (DeltaNet conv and recurrent states,
/// attention K/V, the MTP layer's K/V and pending hidden state) equals that of a sequence
/// that was only ever fed the kept tokens, and decoding on gives the same logits.
#[test]
fn rollback_equals_a_sequence_that_never_saw_the_rejected_tokens() {
    for name in ["bf16-interval2", "fp8-f32scale"] {
        for precision in [Precision::Exact, Precision::Fast] {
            let model = load(name, precision);
            let vocab = model.cfg.vocab_size as u32;
            let p = prompt(37, vocab as usize, 9);
            let (right, _, _) = run(&model, &p, greedy(), 6, 0);
            let wrong: Vec<u32> = right.iter().map(|t| (t + 1 + t % 5) % vocab).collect();
            for k in 1..=4usize {
                for (kind, drafts) in [("right", &right[1..=k]), ("wrong", &wrong[1..=k])] {
                    let mut fed = vec![right[0]];
                    fed.extend_from_slice(drafts);
                    for keep in 1..=k + 1 {
                        let len = p.len() + 16;
                        let mut c = fed_plainly(&model, &p, &[], len);
                        c.speculate();
                        model
                            .forward(&mut [SeqInput {
                                tokens: &fed,
                                cache: &mut c,
                                want: Want::All,
                            }])
                            .unwrap();
                        c.accept(keep).unwrap();
                        let reference = fed_plainly(&model, &p, &fed[..keep], len);
                        assert_eq!(
                            c.fingerprint(),
                            reference.fingerprint(),
                            "{name} {precision:?}: drafts {kind}, k={k}, keep {keep}: states differ"
                        );
                        let next = [right[keep.min(right.len() - 1)]];
                        let mut reference = reference;
                        let a = model
                            .forward(&mut [SeqInput {
                                tokens: &next,
                                cache: &mut c,
                                want: Want::Last,
                            }])
                            .unwrap();
                        let b = model
                            .forward(&mut [SeqInput {
                                tokens: &next,
                                cache: &mut reference,
                                want: Want::Last,
                            }])
                            .unwrap();
                        assert_eq!(a[0].logits, b[0].logits);
                        assert_eq!(c.fingerprint(), reference.fingerprint());
                    }
                }
            }
        }
    }
}

#[test]
fn accept_without_a_speculative_step_is_an_error() {
    let model = load("bf16-interval2", Precision::Exact);
    let mut c = model.new_cache(32);
    model
        .forward(&mut [SeqInput {
            tokens: &[1, 2, 3],
            cache: &mut c,
            want: Want::Last,
        }])
        .unwrap();
    assert!(c.accept(1).is_err());
    c.speculate();
    model
        .forward(&mut [SeqInput {
            tokens: &[4, 5],
            cache: &mut c,
            want: Want::All,
        }])
        .unwrap();
    assert!(c.accept(0).is_err());
    assert!(c.accept(3).is_err());
}
