//! `qnext bench --speculative-tokens K`: what speculative decoding costs and gains on this
//! machine. From one prefilled state, alternating within each repetition: a decode step; a
//! verification step of 1 + k tokens for k = 1..K, with the bytes of routed experts it read
//! (more tokens pull in more distinct experts) and the rollback after its first token; one
//! draft step (the first after a forward step, then a later one); a copy of the DeltaNet
//! states (what per-position state slots would write per draft position). From the medians,
//! the speedup for a per-position acceptance rate α:
//! `E[tokens per step] = (1 − α^{k+1}) / (1 − α)` over `(t_verify(k) + k·t_draft) / t_step`.
//! Last, generation itself with and without drafts (alternating), with the acceptance the
//! checkpoint's MTP head gets.

use anyhow::{bail, Result};
use qnext::engine::speculative::generate;
use qnext::kernels::profile;
use qnext::model::{Model, SeqInput, Want};
use qnext::sampling::{Sampler, SamplingParams};
use std::time::Instant;

use super::bench::{median, random_ids};

fn timed<R>(f: impl FnOnce() -> Result<R>) -> Result<(f64, R)> {
    let t0 = Instant::now();
    let r = f()?;
    Ok((t0.elapsed().as_secs_f64() * 1e3, r))
}

pub struct Settings {
    pub k: usize,
    pub depth: usize,
    pub gen_tokens: usize,
    pub repeat: usize,
    /// Also print the time per kind of work of a decode step next to a verification step of
    /// 1 + K tokens.
    pub profile: bool,
}

pub fn run(model: &mut Model, s: &Settings) -> Result<serde_json::Value> {
    if !model.has_mtp() {
        bail!("--speculative-tokens: this checkpoint has no MTP head (mtp.* tensors)");
    }
    let vocab = model.cfg.vocab_size;
    let (_, active) = model.weight_bytes();
    let (_, mtp_active) = model.mtp_bytes().unwrap_or((0, 0));
    let draft_bytes = mtp_active + model.lm_head_bytes();
    // Drafts with the 8-bit copy of lm_head (as run and serve draft), timed against drafts
    // with the stored head.
    let q8 = model.quantize_draft_head();
    let q8_head = model.swap_draft_head(None);
    let draft_bytes_q8 = mtp_active
        + q8_head
            .as_ref()
            .map_or(model.lm_head_bytes(), |h| h.bytes());

    let mut cache = model.new_cache(s.depth + s.k + 8);
    model.enable_mtp(&mut cache)?;
    let ids = random_ids(s.depth + 1, vocab, 300);
    let out = model.forward(&mut [SeqInput {
        tokens: &ids,
        cache: &mut cache,
        want: Want::Last,
    }])?;
    let next = super::bench::argmax(&out[0].logits);
    let snap = cache.snapshot();
    let drafts = random_ids(s.k, vocab, 301);

    let mut step = Vec::new();
    let mut step_experts = Vec::new();
    let mut verify: Vec<Vec<f64>> = vec![Vec::new(); s.k];
    let mut verify_experts: Vec<Vec<f64>> = vec![Vec::new(); s.k];
    let mut replay: Vec<Vec<f64>> = vec![Vec::new(); s.k];
    let (mut draft_first, mut draft_next, mut state_copy) = (Vec::new(), Vec::new(), Vec::new());
    let mut draft_q8 = Vec::new();
    let mut q8_head = q8_head;
    for _ in 0..s.repeat + 1 {
        cache.restore(&snap)?;
        profile::reset();
        let (ms, _) = timed(|| {
            model.forward(&mut [SeqInput {
                tokens: &[next],
                cache: &mut cache,
                want: Want::Last,
            }])
        })?;
        step.push(ms);
        step_experts.push(profile::expert_bytes() as f64);
        for k in 1..=s.k {
            cache.restore(&snap)?;
            let mut fed = vec![next];
            fed.extend(&drafts[..k]);
            cache.speculate();
            profile::reset();
            let (ms, _) = timed(|| {
                model.forward(&mut [SeqInput {
                    tokens: &fed,
                    cache: &mut cache,
                    want: Want::All,
                }])
            })?;
            verify[k - 1].push(ms);
            verify_experts[k - 1].push(profile::expert_bytes() as f64);
            // Keeping only the first token replays the most: the rejected-at-once case.
            let (ms, _) = timed(|| cache.accept(1))?;
            replay[k - 1].push(ms);
        }
        cache.restore(&snap)?;
        let (ms, _) = timed(|| model.draft_step(&mut [(next, &mut cache)]))?;
        draft_first.push(ms);
        let (ms, _) = timed(|| model.draft_step(&mut [(drafts[0], &mut cache)]))?;
        draft_next.push(ms);
        if q8 {
            q8_head = model.swap_draft_head(q8_head);
            cache.restore(&snap)?;
            model.draft_step(&mut [(next, &mut cache)])?;
            let (ms, _) = timed(|| model.draft_step(&mut [(drafts[0], &mut cache)]))?;
            draft_q8.push(ms);
            q8_head = model.swap_draft_head(q8_head);
        }
        let (ms, _) = timed(|| Ok(cache.snapshot()))?;
        state_copy.push(ms);
    }
    if s.profile {
        let runs = 3;
        let mut per_kind = |k: usize| -> Result<Vec<(profile::Kind, u64)>> {
            profile::reset();
            profile::enable(true);
            for _ in 0..runs {
                cache.restore(&snap)?;
                let mut fed = vec![next];
                fed.extend(&drafts[..k]);
                if k > 0 {
                    cache.speculate();
                }
                model.forward(&mut [SeqInput {
                    tokens: &fed,
                    cache: &mut cache,
                    want: Want::All,
                }])?;
                if k > 0 {
                    cache.accept(fed.len())?;
                }
            }
            profile::enable(false);
            Ok(profile::totals())
        };
        let one = per_kind(0)?;
        let many = per_kind(s.k)?;
        println!(
            "profile per step: a decode step vs a verification step of {} tokens",
            s.k + 1
        );
        for ((kind, a), (_, b)) in one.iter().zip(&many) {
            let (a, b) = (*a as f64 / 1e6 / runs as f64, *b as f64 / 1e6 / runs as f64);
            println!(
                "  {:<40} {a:8.2} ms {b:8.2} ms  {:5.2}×",
                kind.name(),
                b / a.max(1e-9)
            );
        }
    }
    // The first round warms up; medians of the rest.
    let m = |v: &[f64]| median(v[1..].to_vec());
    let t_step = m(&step);
    let e1 = m(&step_experts);
    let t_draft = m(&draft_next);
    let mut rows = Vec::new();
    println!(
        "speculation at depth {}: decode step {t_step:.2} ms; draft step {:.2} ms first, {t_draft:.2} ms later ({:.0}% of a step; reads {:.0}% of a step's bytes); copy of the DeltaNet states {:.2} ms",
        s.depth,
        m(&draft_first),
        100.0 * t_draft / t_step,
        100.0 * draft_bytes as f64 / active as f64,
        m(&state_copy)
    );
    if q8 {
        println!(
            "  draft step with the 8-bit copy of lm_head: {:.2} ms ({:.0}% of a step; reads {:.0}% of a step's bytes)",
            m(&draft_q8),
            100.0 * m(&draft_q8) / t_step,
            100.0 * draft_bytes_q8 as f64 / active as f64
        );
    }
    // Run and serve draft with the 8-bit copy when there is one.
    let t_draft = if q8 { m(&draft_q8) } else { t_draft };
    println!("  k  verify ms  ×step  ×bytes  cost/bytes  rollback ms  slots ms (k state copies)");
    for k in 1..=s.k {
        let t = m(&verify[k - 1]);
        let bytes = active as f64 - e1 + m(&verify_experts[k - 1]);
        let (ratio, bratio) = (t / t_step, bytes / active as f64);
        println!(
            "  {k}  {t:9.2}  {ratio:5.2}  {bratio:6.2}  {:10.2}  {:11.2}  {:8.2}",
            ratio / bratio,
            m(&replay[k - 1]),
            k as f64 * m(&state_copy)
        );
        rows.push(serde_json::json!({
            "k": k, "verify_ms": t, "cost_ratio": ratio, "bytes_ratio": bratio,
            "rollback_ms": m(&replay[k - 1]), "slots_ms": k as f64 * m(&state_copy),
        }));
    }
    let alphas = [0.5, 0.6, 0.7, 0.8, 0.9];
    println!(
        "  speedup by acceptance rate α per position: {}",
        alphas.map(|a| format!("α={a}")).join("  ")
    );
    let mut model_rows = Vec::new();
    for k in 1..=s.k {
        let t = m(&verify[k - 1]) + k as f64 * t_draft;
        let gains: Vec<f64> = alphas
            .iter()
            .map(|&a: &f64| (1.0 - a.powi(k as i32 + 1)) / (1.0 - a) * t_step / t)
            .collect();
        println!(
            "  k={k}: {}",
            gains
                .iter()
                .map(|g| format!("{g:5.2}×"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        model_rows.push(serde_json::json!({"k": k, "alpha": alphas, "speedup": gains}));
    }

    // Generation as users get it, with this checkpoint's own drafts.
    model.swap_draft_head(q8_head);
    let prompt = random_ids(s.depth.max(16), vocab, 302);
    let greedy = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let (mut plain, mut spec) = (Vec::new(), Vec::new());
    let mut acceptance = None;
    let mut truth: Vec<u32> = Vec::new();
    for _ in 0..s.repeat {
        for (k, out) in [(0, &mut plain), (s.k, &mut spec)] {
            let mut c = model.new_cache(prompt.len() + s.gen_tokens + 1);
            let mut sampler = Sampler::new(greedy.clone())?;
            // Generation only: the prompt's step is timed apart and taken off.
            let mut first = None;
            let t0 = Instant::now();
            let acc = generate(
                model,
                &mut c,
                &prompt,
                &mut sampler,
                (s.gen_tokens, k),
                &[],
                |t, _| {
                    first.get_or_insert_with(Instant::now);
                    if k == 0 && truth.len() < s.gen_tokens {
                        truth.push(t);
                    }
                    true
                },
            )?;
            let end = Instant::now();
            let gen = end.duration_since(first.unwrap_or(t0)).as_secs_f64();
            out.push((s.gen_tokens - 1) as f64 / gen.max(1e-9));
            if k > 0 {
                acceptance = Some(acc);
            }
        }
    }
    let forced = forced_acceptance(model, s, &prompt, &truth, &greedy)?;
    let (tg, tg_spec) = (median(plain.clone()), median(spec.clone()));
    let acc = acceptance.unwrap_or_default();
    println!(
        "  generation: {tg:.2} tokens/s plain, {tg_spec:.2} with {} drafts ({:.2}×); {}",
        s.k,
        tg_spec / tg,
        acc.summary()
    );
    Ok(serde_json::json!({
        "depth": s.depth,
        "step_ms": t_step,
        "draft_first_ms": m(&draft_first),
        "draft_ms": m(&draft_next),
        "draft_bytes_ratio": draft_bytes as f64 / active as f64,
        "draft_q8_ms": (!draft_q8.is_empty()).then(|| m(&draft_q8)),
        "draft_q8_bytes_ratio": draft_bytes_q8 as f64 / active as f64,
        "state_copy_ms": m(&state_copy),
        "verify": rows,
        "speedup_model": model_rows,
        "forced_acceptance": forced,
        "tg_tokens_per_s": tg,
        "tg_speculative_tokens_per_s": tg_spec,
        "acceptance": {
            "rounds": acc.rounds, "drafts": acc.drafts, "accepted": acc.accepted,
            "per_position": acc.per_position, "mean_accepted_length": acc.mean_accepted_length(),
        },
    }))
}

/// Generation with the drafts forced to the target's own greedy continuation `truth`, each
/// position kept with probability α (else replaced by a wrong id): the MTP head still runs
/// (its cost stays), verification and rollback are the real ones, and the acceptance is α per
/// position, as the speedup model assumes. What a trained head with that acceptance would
/// give, measured; alternating with plain generation within each round. The output must be
/// `truth` itself (greedy speculation is lossless).
fn forced_acceptance(
    model: &Model,
    s: &Settings,
    prompt: &[u32],
    truth: &[u32],
    greedy: &SamplingParams,
) -> Result<serde_json::Value> {
    use qnext::engine::speculative::{draft, generate_with, DraftSeq, Drafts};
    let vocab = model.cfg.vocab_size as u32;
    let alphas = [1.0f64, 0.8, 0.6];
    let ks: Vec<usize> = (1..=s.k.min(3)).collect();
    let mut plain = Vec::new();
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); alphas.len() * ks.len()];
    let mut rates: Vec<(u64, u64)> = vec![(0, 0); alphas.len() * ks.len()];
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let gen = |k: usize, alpha: f64, rng: &mut u64| -> Result<(f64, u64, u64)> {
        let mut c = model.new_cache(prompt.len() + s.gen_tokens + 1);
        let mut sampler = Sampler::new(greedy.clone())?;
        let mut forced = |m: &Model, d: &mut DraftSeq| -> Result<Drafts> {
            let mut out = draft(m, std::slice::from_mut(d))?.remove(0);
            let at = d.output.len();
            for (j, t) in out.tokens.iter_mut().enumerate() {
                let right = truth.get(at + j).copied().unwrap_or(0);
                *rng ^= *rng << 13;
                *rng ^= *rng >> 7;
                *rng ^= *rng << 17;
                let u = (*rng >> 11) as f64 / (1u64 << 53) as f64;
                *t = if u < alpha {
                    right
                } else {
                    (right + 1) % vocab
                };
            }
            Ok(out)
        };
        let (mut first, mut got) = (None, Vec::new());
        let acc = generate_with(
            model,
            &mut c,
            prompt,
            &mut sampler,
            (s.gen_tokens, k),
            &[],
            |t, _| {
                first.get_or_insert_with(Instant::now);
                got.push(t);
                true
            },
            &mut forced,
        )?;
        let secs = first.map_or(0.0, |f: Instant| f.elapsed().as_secs_f64());
        if k > 0 && got != truth {
            bail!("speculative greedy output differs from plain decoding");
        }
        Ok((
            (s.gen_tokens - 1) as f64 / secs.max(1e-9),
            acc.accepted,
            acc.drafts,
        ))
    };
    for _ in 0..s.repeat {
        plain.push(gen(0, 1.0, &mut rng)?.0);
        for (ai, &alpha) in alphas.iter().enumerate() {
            for (ki, &k) in ks.iter().enumerate() {
                let (tps, a, d) = gen(k, alpha, &mut rng)?;
                runs[ai * ks.len() + ki].push(tps);
                rates[ai * ks.len() + ki].0 += a;
                rates[ai * ks.len() + ki].1 += d;
            }
        }
    }
    let base = median(plain.clone());
    println!(
        "  generation with drafts forced to the target's continuation (the MTP head still runs), {} tokens, plain {base:.2} tokens/s:",
        s.gen_tokens
    );
    let mut rows = Vec::new();
    for (ai, &alpha) in alphas.iter().enumerate() {
        let cells: Vec<String> = ks
            .iter()
            .enumerate()
            .map(|(ki, &k)| {
                let i = ai * ks.len() + ki;
                let tps = median(runs[i].clone());
                let (a, d) = rates[i];
                rows.push(serde_json::json!({
                    "alpha": alpha, "k": k, "tokens_per_s": tps, "speedup": tps / base,
                    "accepted": a, "drafts": d,
                }));
                format!(
                    "k={k} {:.2}× ({:.0} % accepted)",
                    tps / base,
                    100.0 * a as f64 / d.max(1) as f64
                )
            })
            .collect();
        println!("    α = {alpha}: {}", cells.join(", "));
    }
    Ok(serde_json::json!({"plain_tokens_per_s": base, "runs": rows}))
}
