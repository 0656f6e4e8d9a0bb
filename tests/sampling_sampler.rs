//! The sampler: greedy, determinism, truncation (top-k/top-p/min-p), penalties, logprobs, and a
//! statistical check of the draws.

use qnext::sampling::{logprobs, top_logprobs, Sampler, SamplingParams};

fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams {
        seed: Some(1234),
        ..SamplingParams::default()
    };
    f(&mut p);
    p
}

fn sampler(f: impl FnOnce(&mut SamplingParams)) -> Sampler {
    Sampler::new(params(f)).unwrap()
}

/// Deterministic pseudo-random logits in [-8, 8) (an LCG, independent of the sampler's RNG).
fn fake_logits(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 16.0 - 8.0
        })
        .collect()
}

const VOCAB: usize = 151_936;

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn greedy_is_argmax_lowest_index_on_ties() {
    let mut s = sampler(|p| p.temperature = 0.0);
    let logits = fake_logits(VOCAB, 7);
    for _ in 0..3 {
        assert_eq!(s.sample(&logits, &[], &[]).unwrap(), argmax(&logits));
    }
    let ties = [1.0, 3.0, f32::NAN, 3.0, -2.0];
    assert_eq!(s.sample(&ties, &[], &[]).unwrap(), 1);
}

#[test]
fn same_seed_same_sequence() {
    let logits = fake_logits(1000, 3);
    let draw = |seed: u64| {
        let mut s = sampler(|p| {
            p.seed = Some(seed);
            p.temperature = 1.5;
        });
        (0..200)
            .map(|_| s.sample(&logits, &[], &[]).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(42), draw(42));
    assert_ne!(draw(42), draw(43));
    // Unseeded samplers are seeded differently.
    let mut a = Sampler::new(SamplingParams::default()).unwrap();
    let mut b = Sampler::new(SamplingParams::default()).unwrap();
    let flat = vec![0.0f32; 1 << 16];
    let seq = |s: &mut Sampler| {
        (0..8)
            .map(|_| s.sample(&flat, &[], &[]).unwrap())
            .collect::<Vec<_>>()
    };
    assert_ne!(seq(&mut a), seq(&mut b));
}

#[test]
fn top_k_one_and_tiny_top_p_are_greedy() {
    let logits = fake_logits(VOCAB, 11);
    let best = argmax(&logits);
    let mut k1 = sampler(|p| {
        p.temperature = 2.0;
        p.top_k = 1;
    });
    let mut tiny_p = sampler(|p| {
        p.temperature = 2.0;
        p.top_p = 1e-6;
    });
    for _ in 0..200 {
        assert_eq!(k1.sample(&logits, &[], &[]).unwrap(), best);
        assert_eq!(tiny_p.sample(&logits, &[], &[]).unwrap(), best);
    }
    // Ties at the top: the lowest id, like greedy.
    let ties = [0.5, 2.0, 2.0, 1.0];
    let mut k1 = sampler(|p| p.top_k = 1);
    assert_eq!(k1.sample(&ties, &[], &[]).unwrap(), 1);
}

/// Draws `n` tokens and returns the frequency of each of the `logits.len()` ids.
fn frequencies(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<f64> {
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..n {
        counts[s.sample(logits, &[], &[]).unwrap() as usize] += 1;
    }
    counts.into_iter().map(|c| c as f64 / n as f64).collect()
}

/// Each observed frequency within 5 standard errors (sqrt(p(1-p)/n)) of its probability: a
/// false alarm has odds below 1e-6 per token, and the seed makes the run reproducible anyway.
fn assert_matches(freq: &[f64], want: &[f64], n: usize) {
    for (i, (&f, &p)) in freq.iter().zip(want).enumerate() {
        let se = (p * (1.0 - p) / n as f64).sqrt();
        let bound = 5.0 * se;
        assert!(
            (f - p).abs() <= bound,
            "token {i}: frequency {f:.4}, probability {p:.4}, bound ±{bound:.4}"
        );
        if p == 0.0 {
            assert_eq!(f, 0.0, "token {i} must never be drawn");
        }
    }
}

const N: usize = 20_000;
const P: [f64; 4] = [0.1, 0.2, 0.3, 0.4];

fn log_p() -> Vec<f32> {
    // Shifted by a constant: softmax must not care.
    P.iter().map(|p| p.ln() as f32 + 3.0).collect()
}

#[test]
fn draws_follow_the_distribution() {
    let mut s = sampler(|_| {});
    assert_matches(&frequencies(&mut s, &log_p(), N), &P, N);
}

#[test]
fn temperature_sharpens_and_flattens() {
    for t in [0.5f64, 2.0] {
        let mut s = sampler(|p| p.temperature = t as f32);
        let w: Vec<f64> = P.iter().map(|p| p.powf(1.0 / t)).collect();
        let z: f64 = w.iter().sum();
        let want: Vec<f64> = w.iter().map(|x| x / z).collect();
        assert_matches(&frequencies(&mut s, &log_p(), N), &want, N);
    }
}

#[test]
fn top_k_top_p_min_p_truncate_and_renormalise() {
    // top_k = 2 → {3, 2}, renormalised.
    let mut s = sampler(|p| p.top_k = 2);
    assert_matches(
        &frequencies(&mut s, &log_p(), N),
        &[0.0, 0.0, 0.3 / 0.7, 0.4 / 0.7],
        N,
    );
    // top_p = 0.65: 0.4 (mass before 0) and 0.3 (mass before 0.4) stay; 0.2 has 0.7 before it.
    let mut s = sampler(|p| p.top_p = 0.65);
    assert_matches(
        &frequencies(&mut s, &log_p(), N),
        &[0.0, 0.0, 0.3 / 0.7, 0.4 / 0.7],
        N,
    );
    // top_p = 0.75 keeps three.
    let mut s = sampler(|p| p.top_p = 0.75);
    assert_matches(
        &frequencies(&mut s, &log_p(), N),
        &[0.0, 0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9],
        N,
    );
    // min_p = 0.6: threshold 0.24 keeps {0.3, 0.4}.
    let mut s = sampler(|p| p.min_p = 0.6);
    assert_matches(
        &frequencies(&mut s, &log_p(), N),
        &[0.0, 0.0, 0.3 / 0.7, 0.4 / 0.7],
        N,
    );
    // top_k = 3 then top_p = 0.5 over the renormalised three (0.2/0.9, 0.3/0.9, 0.4/0.9):
    // 0.444 before the second → kept; 0.777 before the third → dropped.
    let mut s = sampler(|p| {
        p.top_k = 3;
        p.top_p = 0.5;
    });
    assert_matches(
        &frequencies(&mut s, &log_p(), N),
        &[0.0, 0.0, 0.3 / 0.7, 0.4 / 0.7],
        N,
    );
}

#[test]
fn min_p_comes_before_top_p_as_in_vllm() {
    // min_p 0.4 (threshold 0.16) leaves {0.2, 0.3, 0.4}, renormalised to 2/9, 3/9, 4/9; top_p
    // 0.75 over those drops 2/9 (7/9 before it). HF's order (top-p on the raw distribution,
    // then min-p) would keep token 1 (0.7 before it).
    let mut s = sampler(|p| {
        p.min_p = 0.4;
        p.top_p = 0.75;
    });
    assert_matches(
        &frequencies(&mut s, &log_p(), N),
        &[0.0, 0.0, 0.3 / 0.7, 0.4 / 0.7],
        N,
    );
    // min_p with top_k: both keep a head of the ranking, so the order does not matter.
    let mut s = sampler(|p| {
        p.min_p = 0.3;
        p.top_k = 3;
    });
    assert_matches(
        &frequencies(&mut s, &log_p(), N),
        &[0.0, 0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9],
        N,
    );
}

/// The nucleus by brute force: sort everything, keep while the mass before is < top_p.
fn reference_nucleus(logits: &[f32], temperature: f32, top_p: f64) -> Vec<u32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f64> = logits
        .iter()
        .map(|&l| f64::from((l - max) / temperature).exp())
        .collect();
    let z: f64 = w.iter().sum();
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    ids.sort_by(|&a, &b| w[b as usize].total_cmp(&w[a as usize]).then(a.cmp(&b)));
    let mut before = 0.0;
    ids.into_iter()
        .take_while(|&i| {
            let keep = before < top_p * z;
            before += w[i as usize];
            keep
        })
        .collect()
}

#[test]
fn full_vocabulary_truncation_matches_brute_force() {
    // Peaked logits so that the nucleus spans a few hundred tokens: the doubling search must
    // go past its first head of 64.
    let logits: Vec<f32> = fake_logits(VOCAB, 5).iter().map(|l| l * 1.5).collect();
    let nucleus = reference_nucleus(&logits, 1.0, 0.9);
    assert!(nucleus.len() > 64, "nucleus of {} tokens", nucleus.len());
    let mut in_nucleus = vec![false; VOCAB];
    for &i in &nucleus {
        in_nucleus[i as usize] = true;
    }
    let mut s = sampler(|p| p.top_p = 0.9);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..1000 {
        let t = s.sample(&logits, &[], &[]).unwrap();
        assert!(in_nucleus[t as usize], "token {t} is outside the nucleus");
        seen.insert(t);
    }
    assert!(seen.len() > 10);

    // top_k = 20 with the Qwen defaults: always one of the 20 best.
    let mut top20: Vec<u32> = (0..VOCAB as u32).collect();
    top20.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    top20.truncate(20);
    let mut s = sampler(|p| {
        p.temperature = 0.7;
        p.top_k = 20;
        p.top_p = 0.8;
    });
    for _ in 0..300 {
        let t = s.sample(&logits, &[], &[]).unwrap();
        assert!(top20.contains(&t));
    }
}

#[test]
fn top_p_cut_is_exact_on_a_full_vocabulary() {
    // Three heavy tokens (0.5, 0.3, 0.15 of the mass) at scattered ids, the remaining 0.05
    // spread evenly over the rest of the vocabulary: the cut falls between heavy tokens, inside
    // the histogram path (the candidate set is the whole vocabulary).
    let heavy = [(70_001usize, 0.5f64), (12, 0.3), (151_000, 0.15)];
    let rest = 0.05 / (VOCAB - heavy.len()) as f64;
    let mut logits = vec![rest.ln() as f32; VOCAB];
    for (id, p) in heavy {
        logits[id] = p.ln() as f32;
    }
    // Fewer draws than elsewhere (each one scans the vocabulary); the 5-SE bounds follow n.
    const DRAWS: usize = 2000;
    let heavy_freq = |s: &mut Sampler| {
        let mut counts = [0usize; 4];
        for _ in 0..DRAWS {
            let t = s.sample(&logits, &[], &[]).unwrap() as usize;
            let slot = heavy.iter().position(|h| h.0 == t).unwrap_or(3);
            counts[slot] += 1;
        }
        counts.map(|c| c as f64 / DRAWS as f64)
    };
    // 0.75: 0.5 and 0.3 stay (0 and 0.5 before them); 0.15 has 0.8 before it.
    let mut s = sampler(|p| p.top_p = 0.75);
    assert_matches(
        &heavy_freq(&mut s),
        &[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0],
        DRAWS,
    );
    // 0.85: the third stays too; every light token has 0.95 before it.
    let mut s = sampler(|p| p.top_p = 0.85);
    assert_matches(
        &heavy_freq(&mut s),
        &[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0],
        DRAWS,
    );
    // No truncation: the light tail keeps its 5%.
    let mut s = sampler(|_| {});
    assert_matches(&heavy_freq(&mut s), &[0.5, 0.3, 0.15, 0.05], DRAWS);
}

#[test]
fn penalties_change_the_right_logits() {
    let logits = [2.0f32, -1.0, 0.5, 3.0, -0.5, 1.0];
    let mut s = sampler(|p| p.repetition_penalty = 2.0);
    // Prompt {0, 1}, output {2, 2}: each distinct token once; positive ÷2, negative ×2.
    let got = s.processed_logits(&logits, &[0, 1, 1], &[2, 2]).unwrap();
    assert_eq!(got, [1.0, -2.0, 0.25, 3.0, -0.5, 1.0]);

    let mut s = sampler(|p| {
        p.frequency_penalty = 0.5;
        p.presence_penalty = 0.25;
    });
    // Output only: token 3 three times, token 4 once; prompt token 0 untouched.
    let got = s.processed_logits(&logits, &[0, 0], &[3, 4, 3, 3]).unwrap();
    assert_eq!(
        got,
        [2.0, -1.0, 0.5, 3.0 - 1.5 - 0.25, -0.5 - 0.5 - 0.25, 1.0]
    );

    let mut s = sampler(|p| p.logit_bias = vec![(1, 10.0), (5, -100.0)]);
    let got = s.processed_logits(&logits, &[], &[]).unwrap();
    assert_eq!(got, [2.0, 9.0, 0.5, 3.0, -0.5, -99.0]);

    // Bias first, then the repetition penalty on the biased value (vLLM's order).
    let mut s = sampler(|p| {
        p.logit_bias = vec![(1, 3.0)];
        p.repetition_penalty = 2.0;
    });
    let got = s.processed_logits(&logits, &[1], &[]).unwrap();
    assert_eq!(got[1], 1.0);

    // Scratch state does not leak into the next call.
    let got = s.processed_logits(&logits, &[], &[]).unwrap();
    assert_eq!(got[1], 2.0);

    // The penalised logits are what greedy picks from: token 3 repeated loses to token 0.
    let mut s = sampler(|p| {
        p.temperature = 0.0;
        p.frequency_penalty = 1.5;
    });
    assert_eq!(s.sample(&logits, &[], &[3]).unwrap(), 0);
}

#[test]
fn infinite_logits() {
    let mut s = sampler(|_| {});
    let logits = [0.0, f32::INFINITY, 1.0, f32::INFINITY];
    let freq = frequencies(&mut s, &logits, 4000);
    assert_eq!(freq[0] + freq[2], 0.0);
    assert!(freq[1] > 0.4 && freq[3] > 0.4);
    let err = s
        .sample(&[f32::NEG_INFINITY, f32::NAN], &[], &[])
        .unwrap_err();
    assert!(err.to_string().contains("-inf"), "{err}");
}

#[test]
fn bad_inputs_are_errors() {
    let mut s = sampler(|p| p.logit_bias = vec![(10, 1.0)]);
    assert!(s.sample(&[], &[], &[]).is_err());
    let err = s.sample(&[0.0; 4], &[], &[]).unwrap_err().to_string();
    assert!(err.contains("logit_bias") && err.contains("10"), "{err}");
    // History ids beyond the vocabulary are ignored, not a crash.
    let mut s = sampler(|p| p.repetition_penalty = 1.3);
    assert!(s.sample(&[0.0; 4], &[99], &[1 << 30]).is_ok());

    for (field, p) in [
        ("temperature", params(|p| p.temperature = -1.0)),
        ("temperature", params(|p| p.temperature = f32::NAN)),
        ("top_p", params(|p| p.top_p = 0.0)),
        ("top_p", params(|p| p.top_p = 1.5)),
        ("min_p", params(|p| p.min_p = -0.1)),
        ("presence_penalty", params(|p| p.presence_penalty = 3.0)),
        (
            "frequency_penalty",
            params(|p| p.frequency_penalty = f32::NAN),
        ),
        ("repetition_penalty", params(|p| p.repetition_penalty = 0.0)),
        ("logit_bias", params(|p| p.logit_bias = vec![(1, f32::NAN)])),
    ] {
        let err = Sampler::new(p).err().expect(field).to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
}

#[test]
fn logprobs_are_log_softmax() {
    let lp = logprobs(&log_p());
    for (got, p) in lp.iter().zip(P) {
        assert!(
            (f64::from(*got) - p.ln()).abs() < 1e-6,
            "{got} vs {}",
            p.ln()
        );
    }
    let big = fake_logits(VOCAB, 9);
    let lp = logprobs(&big);
    let mass: f64 = lp.iter().map(|&l| f64::from(l).exp()).sum();
    assert!((mass - 1.0).abs() < 1e-4, "{mass}");
    assert_eq!(argmax(&lp), argmax(&big));

    let top = top_logprobs(&lp, 5);
    assert_eq!(top.len(), 5);
    assert_eq!(top[0].0, argmax(&big));
    assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
    let mut sorted = lp.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    assert_eq!(
        top.iter().map(|t| t.1).collect::<Vec<_>>(),
        sorted[..5].to_vec()
    );
    // Ties: lower id first; n larger than the vocabulary; NaN last.
    assert_eq!(
        top_logprobs(&[-1.0, -0.5, -0.5, f32::NAN], 9)
            .iter()
            .map(|t| t.0)
            .collect::<Vec<_>>(),
        [1, 2, 0, 3]
    );
    assert!(top_logprobs(&lp, 0).is_empty());
    assert_eq!(
        logprobs(&[0.0, f32::INFINITY, f32::INFINITY]),
        [f32::NEG_INFINITY, -(2f32.ln()), -(2f32.ln())]
    );
}
