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

/// The target's logits after `prompt` + `ctx`, computed plainly.
fn plain_logits(model: &Model, prompt: &[u32], ctx: &[u32]) -> Vec<f32> {
    let mut all = prompt.to_vec();
    all.extend_from_slice(ctx);
    let mut c = model.new_cache(all.len());
    let out = model
        .forward(&mut [SeqInput {
            tokens: &all,
            cache: &mut c,
            want: Want::Last,
        }])
        .unwrap();
    out.into_iter().next().unwrap().logits
}

/// A stand-in for the MTP head: drafts drawn from the target's own distribution under
/// `params` (so that they differ from the target's as much as the test wants), with the
/// sequence's generator.
fn stand_in(
    params: SamplingParams,
) -> impl FnMut(
    &Model,
    &mut qnext::engine::speculative::DraftSeq,
) -> anyhow::Result<qnext::engine::speculative::Drafts> {
    move |model, s| {
        let mut d = qnext::engine::speculative::Drafts::default();
        let mut ctx = s.output.to_vec();
        for _ in 0..s.k {
            let mut q_sampler = Sampler::new(params.clone())?;
            let q = q_sampler.distribution(&plain_logits(model, s.prompt, &ctx), s.prompt, &ctx)?;
            let t = s
                .sampler
                .draw_weighted(&q)
                .expect("a distribution has mass");
            d.tokens.push(t);
            d.q.push(q);
            ctx.push(t);
        }
        Ok(d)
    }
}

/// Pearson's χ² of `counts` against probabilities `expected` (cells expected below 5
/// samples pooled into one), and its degrees of freedom.
fn chi_square(
    counts: &std::collections::HashMap<Vec<u32>, u64>,
    expected: &[(Vec<u32>, f64)],
    n: u64,
) -> (f64, usize) {
    let (mut chi, mut cells) = (0.0, 0);
    let (mut pool_obs, mut pool_exp) = (0.0, 0.0);
    let mut seen = 0;
    for (cell, p) in expected {
        let e = p * n as f64;
        let o = *counts.get(cell).unwrap_or(&0) as f64;
        seen += o as u64;
        if e < 5.0 {
            pool_obs += o;
            pool_exp += e;
        } else {
            chi += (o - e).powi(2) / e;
            cells += 1;
        }
    }
    // Outcomes of probability zero must never occur.
    assert_eq!(seen, n, "tokens outside the target's support were emitted");
    if pool_exp >= 5.0 {
        chi += (pool_obs - pool_exp).powi(2) / pool_exp;
        cells += 1;
    }
    (chi, cells - 1)
}

/// Upper tail of χ²(df) beyond `x` is below 1e-4 when this is above 3.719 (Wilson–Hilferty:
/// (x/df)^⅓ is close to normal with mean 1 − 2/(9df) and variance 2/(9df)).
fn wilson_hilferty_z(x: f64, df: usize) -> f64 {
    let d = df as f64;
    ((x / d).powf(1.0 / 3.0) - (1.0 - 2.0 / (9.0 * d))) / (2.0 / (9.0 * d)).sqrt()
}

/// A token event: id, log-probability, top log-probabilities.
type Emitted = (u32, Option<f32>, Vec<(u32, f32)>);

/// Through the engine, under concurrent load (more requests than slots, prompt chunks of
/// others in the same steps, a stop token, the prefix cache on): greedy tokens and their
/// log-probabilities with 1–4 drafts per step equal those without speculation, and the
/// acceptance counters add up.
#[test]
fn engine_greedy_output_equals_without_speculation_under_load() {
    use qnext::engine::scheduler::{collect, in_use};
    use qnext::engine::{Engine, EngineConfig, Event, GenRequest};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Duration;
    let model = Arc::new(load("fp8-f32scale", Precision::Fast));
    let vocab = model.cfg.vocab_size;
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| prompt(5 + 19 * i, vocab, i as u32 + 11))
        .collect();
    let run_all = |k: usize| {
        let engine = Engine::start(
            model.clone(),
            EngineConfig {
                max_num_seqs: 3,
                max_model_len: 256,
                prefill_chunk: 16,
                prefix_cache: Some(64 << 20),
                speculative_tokens: k,
                ..EngineConfig::default()
            },
        );
        let rxs: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let req = GenRequest {
                    prompt: p.clone(),
                    sampling: greedy(),
                    max_tokens: 24 + i,
                    stop_token_ids: if i == 2 { vec![7] } else { vec![] },
                    logprobs: Some(2),
                };
                engine.submit(req).unwrap().1
            })
            .collect();
        let outs: Vec<Vec<Emitted>> = rxs
            .into_iter()
            .map(|rx| {
                collect(rx, Duration::from_secs(120))
                    .into_iter()
                    .filter_map(|e| match e {
                        Event::Token {
                            id,
                            logprob,
                            top_logprobs,
                            ..
                        } => Some((id, logprob, top_logprobs)),
                        Event::Error(e) => panic!("{e}"),
                        _ => None,
                    })
                    .collect()
            })
            .collect();
        let s = &engine.stats;
        let counts = (
            s.spec_rounds.load(Ordering::Relaxed),
            s.spec_draft_tokens.load(Ordering::Relaxed),
            s.spec_accepted_tokens.load(Ordering::Relaxed),
            s.spec_accepted_per_position.lock().unwrap().clone(),
        );
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(in_use(s), 0);
        (outs, counts)
    };
    let (base, none) = run_all(0);
    assert_eq!(none.0, 0);
    for k in 1..=4 {
        let (outs, (rounds, drafts, accepted, per)) = run_all(k);
        assert_eq!(outs, base, "k={k}: tokens or log-probabilities changed");
        assert!(rounds > 0 && drafts >= rounds && drafts <= k as u64 * rounds);
        assert_eq!(per.iter().sum::<u64>(), accepted);
        assert!(
            per.windows(2).all(|w| w[0] >= w[1]),
            "a later position accepted more often: {per:?}"
        );
    }
}

/// A request resumed from the prefix cache (its MTP layer's state included in the snapshot)
/// generates with drafts what it generates without them and without the cache.
#[test]
fn engine_prefix_cache_hit_with_speculation() {
    use qnext::engine::scheduler::collect;
    use qnext::engine::{Engine, EngineConfig, Event, GenRequest};
    use std::sync::Arc;
    use std::time::Duration;
    let model = Arc::new(load("bf16-interval2", Precision::Fast));
    let vocab = model.cfg.vocab_size;
    let first = prompt(300, vocab, 21);
    let mut second = first.clone();
    second.extend(prompt(40, vocab, 22));
    let ask = |engine: &Engine, p: &[u32]| {
        let req = GenRequest {
            prompt: p.to_vec(),
            sampling: greedy(),
            max_tokens: 20,
            stop_token_ids: vec![],
            logprobs: None,
        };
        let events = collect(engine.submit(req).unwrap().1, Duration::from_secs(120));
        let cached = events.iter().find_map(|e| match e {
            Event::Started { cached_tokens } => Some(*cached_tokens),
            _ => None,
        });
        let toks: Vec<u32> = events
            .iter()
            .filter_map(|e| match e {
                Event::Token { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        (toks, cached.unwrap())
    };
    let run = |k: usize, cache: bool| {
        let engine = Engine::start(
            model.clone(),
            EngineConfig {
                max_num_seqs: 2,
                max_model_len: 512,
                prefill_chunk: 64,
                snapshot_interval: 128,
                prefix_cache: cache.then_some(64 << 20),
                speculative_tokens: k,
                ..EngineConfig::default()
            },
        );
        let a = ask(&engine, &first);
        let b = ask(&engine, &second);
        (a, b)
    };
    let ((a0, _), (b0, _)) = run(0, false);
    let ((a1, _), (b1, cached)) = run(3, true);
    assert!(
        cached >= 256,
        "the second request resumed from {cached} cached tokens"
    );
    assert_eq!(a1, a0);
    assert_eq!(b1, b0);
}

/// The exact joint distribution of the first `n` tokens after `p` under `params`: every
/// outcome with its probability (the target computed plainly for each prefix).
fn exact_joint(
    model: &Model,
    p: &[u32],
    params: &SamplingParams,
    n: usize,
) -> Vec<(Vec<u32>, f64)> {
    let mut out = vec![(Vec::new(), 1.0f64)];
    for _ in 0..n {
        let mut next = Vec::new();
        for (ctx, pr) in out {
            let mut s = Sampler::new(params.clone()).unwrap();
            let d = s
                .distribution(&plain_logits(model, p, &ctx), p, &ctx)
                .unwrap();
            for (t, &pt) in d.iter().enumerate().filter(|(_, &x)| x > 0.0) {
                let mut c = ctx.clone();
                c.push(t as u32);
                next.push((c, pr * f64::from(pt)));
            }
        }
        out = next;
    }
    let total: f64 = out.iter().map(|e| e.1).sum();
    assert!((total - 1.0).abs() < 1e-4, "{total}");
    out
}

/// Draws the first `n` tokens `runs` times (seeds from `seed0`) with `k` drafts per step, from
/// the stand-in drafter when given, else from the MTP head; Pearson's χ² against the exact
/// joint, asserted below the 1e-4 tail; returns the share of drafts accepted.
#[allow(clippy::too_many_arguments)]
fn check_joint(
    model: &Model,
    p: &[u32],
    params: &SamplingParams,
    n: usize,
    k: usize,
    (runs, seed0): (u64, u64),
    mut drafter: Option<&mut qnext::engine::speculative::Drafter>,
    expected: &[(Vec<u32>, f64)],
) -> f64 {
    let mut counts: std::collections::HashMap<Vec<u32>, u64> = Default::default();
    let (mut accepted, mut drafts) = (0, 0);
    for seed in seed0..seed0 + runs {
        let mut cache = model.new_cache(p.len() + n + k + 2);
        let mut sampler = Sampler::new(SamplingParams {
            seed: Some(seed),
            ..params.clone()
        })
        .unwrap();
        let mut toks = Vec::new();
        // Room for a whole round after the last token kept.
        let budget = (n + k, k);
        let emit = |t: u32, _: &[f32]| {
            toks.push(t);
            toks.len() < n
        };
        let a = match drafter.as_deref_mut() {
            Some(d) => {
                model.enable_mtp(&mut cache).unwrap();
                qnext::engine::speculative::generate_with(
                    model,
                    &mut cache,
                    p,
                    &mut sampler,
                    budget,
                    &[],
                    emit,
                    d,
                )
            }
            None => generate(model, &mut cache, p, &mut sampler, budget, &[], emit),
        }
        .unwrap();
        assert_eq!(toks.len(), n);
        *counts.entry(toks).or_default() += 1;
        accepted += a.accepted;
        drafts += a.drafts;
    }
    let (chi, df) = chi_square(&counts, expected, runs);
    let z = wilson_hilferty_z(chi, df);
    let rate = accepted as f64 / drafts.max(1) as f64;
    eprintln!(
        "k={k} ({}): χ² = {chi:.1} on {df} df (z = {z:.2}); drafts accepted {accepted}/{drafts}",
        if drafter.is_some() {
            "stand-in drafter"
        } else {
            "MTP head"
        }
    );
    assert!(
        z < 3.719,
        "k={k}: χ² = {chi} on {df} df: the distribution with speculation differs from the target's"
    );
    rate
}

/// With sampling, speculation must leave the distribution of the generated tokens that of the
/// target. For the first three tokens after a prompt (the first sampled from the prompt's
/// logits, the next two through speculative rounds), the joint distribution is computed
/// exactly from the target (top-k 4: at most 64 outcomes), and N = 3000 seeded runs with
/// speculation are tested against it with Pearson's χ²: each check fails by chance with
/// probability about 1e-4 (z > 3.719), 4 checks, so about 4e-4 per run of this test, and the
/// seeds are fixed, so a pass or fail is reproducible. Sampling applies temperature,
/// top-k, a repetition and a presence penalty and a logit bias, identically to target and
/// draft. Drafts come from a stand-in drafter whose distribution differs from the target's
/// (a higher temperature, more candidates) so that drafts are accepted and rejected in
/// about equal measure, and, for k=2, from the real MTP head.
#[test]
fn sampled_tokens_follow_the_target_distribution() {
    let model = load("bf16-interval2", Precision::Exact);
    let p = prompt(6, model.cfg.vocab_size, 4);
    let params = SamplingParams {
        temperature: 0.9,
        top_k: 4,
        repetition_penalty: 1.3,
        presence_penalty: 0.4,
        logit_bias: vec![(17, 1.5)],
        ..SamplingParams::default()
    };
    let expected = exact_joint(&model, &p, &params, 3);
    let mut drafter = stand_in(SamplingParams {
        temperature: 1.6,
        top_k: 6,
        ..params.clone()
    });
    for k in 1..=3 {
        let rate = check_joint(
            &model,
            &p,
            &params,
            3,
            k,
            (3000, 0),
            Some(&mut drafter),
            &expected,
        );
        assert!(
            rate > 0.1 && rate < 0.9,
            "the stand-in drafter should be accepted sometimes, not always"
        );
    }
    check_joint(&model, &p, &params, 3, 2, (3000, 0), None, &expected);
}

/// As above with nucleus and min-p truncation and a frequency penalty, for the first two
/// tokens (the second from a speculative round, k = 2, the stand-in drafter at a higher
/// temperature): χ² against the exact joint distribution, false alarm about 1e-4.
#[test]
fn sampled_tokens_follow_the_target_with_top_p_and_min_p() {
    let model = load("fp8-f32scale", Precision::Exact);
    let p = prompt(9, model.cfg.vocab_size, 5);
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 0.8,
        min_p: 0.08,
        frequency_penalty: 0.7,
        ..SamplingParams::default()
    };
    let expected = exact_joint(&model, &p, &params, 2);
    assert!(
        expected.len() >= 6,
        "too few outcomes to test: {}",
        expected.len()
    );
    let mut drafter = stand_in(SamplingParams {
        temperature: 1.8,
        top_p: 1.0,
        min_p: 0.0,
        ..params.clone()
    });
    let rate = check_joint(
        &model,
        &p,
        &params,
        2,
        2,
        (3000, 10_000),
        Some(&mut drafter),
        &expected,
    );
    assert!(rate > 0.1 && rate < 0.9);
}
