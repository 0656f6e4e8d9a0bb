//! The prefix cache in the engine: every request returns bit-identical tokens and
//! log-probabilities with the cache on or off, cold or warm, alone or beside others, under a
//! budget that evicts; and later turns of a conversation compute only their new tokens.

use qnext::engine::chunking::Markers;
use qnext::engine::scheduler::{collect, in_use};
use qnext::engine::{Engine, EngineConfig, Event, GenRequest};
use qnext::model::Model;
use qnext::sampling::SamplingParams;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(300);

// Stand-ins for the chat template's special tokens in a random checkpoint's vocabulary.
const IM_START: u32 = 1;
const IM_END: u32 = 2;
const ASSISTANT: u32 = 3;
const NL: u32 = 4;

fn model() -> Arc<Model> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bf16-interval2");
    Arc::new(Model::load(&dir).unwrap())
}

fn config(cache: Option<usize>) -> EngineConfig {
    EngineConfig {
        max_num_seqs: 4,
        max_model_len: 2048,
        prefill_chunk: 64,
        snapshot_interval: 128,
        markers: Markers {
            after_token: vec![IM_END],
            after_seq: vec![vec![IM_START, ASSISTANT, NL]],
        },
        prefix_cache: cache,
        ..Default::default()
    }
}

/// Random tokens that are none of the markers.
fn words(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            5 + ((s >> 33) % (vocab as u64 - 5)) as u32
        })
        .collect()
}

fn message(role: u32, body: &[u32]) -> Vec<u32> {
    let mut m = vec![IM_START, role];
    m.push(NL);
    m.extend_from_slice(body);
    m.extend([IM_END, NL]);
    m
}

fn request(prompt: Vec<u32>, max_tokens: usize, temperature: f32) -> GenRequest {
    GenRequest {
        prompt,
        sampling: SamplingParams {
            temperature,
            seed: Some(7),
            ..Default::default()
        },
        max_tokens,
        stop_token_ids: vec![],
        logprobs: Some(3),
    }
}

/// A generated token, the bits of its log-probability, and the top ones (id, bits).
type Sampled = (u32, u32, Vec<(u32, u32)>);

/// A request's tokens with the bits of their log-probabilities.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    tokens: Vec<Sampled>,
}

fn outcome(events: &[Event]) -> (Outcome, usize) {
    let mut cached = usize::MAX;
    let tokens = events
        .iter()
        .filter_map(|e| match e {
            Event::Token {
                id,
                logprob,
                top_logprobs,
                ..
            } => Some((
                *id,
                logprob.expect("asked for").to_bits(),
                top_logprobs
                    .iter()
                    .map(|&(t, l)| (t, l.to_bits()))
                    .collect(),
            )),
            Event::Started { cached_tokens } => {
                cached = *cached_tokens;
                None
            }
            Event::Done { .. } => None,
            Event::Error(e) => panic!("request failed: {e}"),
        })
        .collect();
    assert_ne!(cached, usize::MAX, "no Started event: {events:?}");
    assert!(matches!(events.last(), Some(Event::Done { .. })));
    (Outcome { tokens }, cached)
}

fn run(engine: &Engine, req: GenRequest) -> (Outcome, usize) {
    outcome(&collect(engine.submit(req).unwrap().1, WAIT))
}

/// Waits until the engine has no background work left (its warm-up tokens stop growing).
fn settle(engine: &Engine) {
    let t0 = Instant::now();
    let mut last = u64::MAX;
    while t0.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(100));
        let now = engine.stats.warm_tokens.load(Ordering::Relaxed);
        if now == last {
            return;
        }
        last = now;
    }
}

/// A conversation as chat templates lay it out: a system prompt, then per turn a user
/// message and the assistant header; the answer goes into the history as generated, or
/// (`drop_reasoning`) without its first half, as the Thinking template drops reasoning.
/// Returns per turn the outcome and the cached tokens.
fn converse(
    engine: &Engine,
    turns: usize,
    drop_reasoning: bool,
    warm: bool,
    vocab: usize,
) -> Vec<(Outcome, usize, usize)> {
    let mut history = message(5, &words(150, 1, vocab));
    let mut out = Vec::new();
    for turn in 0..turns {
        let user = message(6, &words(20 + 37 * turn % 90, 10 + turn as u64, vocab));
        history.extend_from_slice(&user);
        history.extend([IM_START, ASSISTANT, NL]);
        let (o, cached) = run(engine, request(history.clone(), 10, 0.8));
        let answer: Vec<u32> = o.tokens.iter().map(|t| t.0).collect();
        let kept = if drop_reasoning {
            &answer[answer.len() / 2..]
        } else {
            &answer[..]
        };
        // What the cache cannot hold: the new message, the header, and the newline after
        // the previous answer's end.
        out.push((o, cached, history.len() - user.len() - 3 - 1));
        history.extend_from_slice(kept);
        history.extend([IM_END, NL]);
        if warm {
            engine.warm(history.clone());
            settle(engine);
        }
    }
    out
}

#[test]
fn conversations_are_bit_identical_with_and_without_the_cache() {
    let m = model();
    let v = m.cfg.vocab_size;
    let off = Engine::start(m.clone(), config(None));
    let on = Engine::start(m.clone(), config(Some(1 << 30)));
    for drop_reasoning in [false, true] {
        let want = converse(&off, 6, drop_reasoning, false, v);
        // Cold then warm: the second conversation finds the first one's states.
        for round in 0..2 {
            let got = converse(&on, 6, drop_reasoning, true, v);
            for (turn, ((w, w_cached, _), (g, g_cached, at_least))) in
                want.iter().zip(&got).enumerate()
            {
                let what =
                    format!("reasoning dropped {drop_reasoning}, round {round}, turn {turn}");
                assert_eq!(w, g, "{what}: outputs differ with the cache");
                assert_eq!(*w_cached, 0, "{what}: the cache is off");
                if round == 1 || turn > 0 {
                    assert!(
                        g_cached >= at_least,
                        "{what}: {g_cached} prompt tokens cached, {at_least} expected"
                    );
                }
            }
        }
    }
    let s = &on.stats;
    let (queries, hits) = (
        s.prefix_queries.load(Ordering::Relaxed),
        s.prefix_hits.load(Ordering::Relaxed),
    );
    assert!(hits * 10 > queries * 8, "{hits} of {queries} tokens hit");
    assert!(s.prefix_snapshots.load(Ordering::Relaxed) > 0);
    assert_eq!(in_use(s), 0);
}

/// Requests sharing a long system prompt, several at once, beside each other and beside a
/// background job; then a budget so small that states are evicted all the time.
#[test]
fn shared_prefixes_concurrency_and_eviction_change_nothing() {
    let m = model();
    let v = m.cfg.vocab_size;
    let system = message(5, &words(300, 3, v));
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| {
            let mut p = system.clone();
            p.extend(message(6, &words(10 + 13 * i, 40 + i as u64, v)));
            p.extend([IM_START, ASSISTANT, NL]);
            p
        })
        .collect();
    let off = Engine::start(m.clone(), config(None));
    let want: Vec<Outcome> = prompts
        .iter()
        .map(|p| run(&off, request(p.clone(), 8, 0.0)).0)
        .collect();

    // 256 KiB: room for a few of this model's states and K/V blocks, not for all of them.
    for budget in [1usize << 30, 256 << 10] {
        let on = Engine::start(m.clone(), config(Some(budget)));
        let (first, cached) = run(&on, request(prompts[0].clone(), 8, 0.0));
        assert_eq!(
            (first, cached),
            (run(&off, request(prompts[0].clone(), 8, 0.0)).0, 0)
        );
        // A background job on an unrelated conversation runs beside them.
        on.warm(words(700, 99, v));
        let rxs: Vec<_> = prompts[1..]
            .iter()
            .map(|p| on.submit(request(p.clone(), 8, 0.0)).unwrap().1)
            .collect();
        for (i, rx) in rxs.into_iter().enumerate() {
            let (got, cached) = outcome(&collect(rx, WAIT));
            assert_eq!(got, want[i + 1], "budget {budget}, request {}", i + 1);
            if budget > 1 << 20 {
                // Up to the system message's end (the newline after it starts the next chunk).
                assert_eq!(cached, system.len() - 1, "request {}", i + 1);
            }
        }
        settle(&on);
        if budget < 1 << 20 {
            assert!(on.stats.prefix_evictions.load(Ordering::Relaxed) > 0);
            assert!(on.stats.prefix_bytes.load(Ordering::Relaxed) <= budget);
        }
        assert_eq!(in_use(&on.stats), 0);
    }
}
