//! Continuous batching: with greedy sampling, requests running together (different prompt
//! lengths, some arriving mid-generation, more than there are slots) return exactly the
//! tokens each returns alone; cancelled and abandoned requests free their slots.

use qnext::engine::scheduler::{collect, in_use};
use qnext::engine::{Engine, EngineConfig, Event, FinishReason, GenRequest};
use qnext::model::Model;
use qnext::sampling::SamplingParams;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn model(name: &str) -> Arc<Model> {
    Arc::new(
        Model::load(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(name),
        )
        .unwrap(),
    )
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenRequest {
    GenRequest {
        prompt,
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        max_tokens,
        stop_token_ids: vec![],
        logprobs: None,
    }
}

fn prompt(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % vocab as u64) as u32
        })
        .collect()
}

fn tokens(events: &[Event]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Token { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

const WAIT: Duration = Duration::from_secs(120);

#[test]
fn batched_greedy_equals_alone() {
    let m = model("bf16-interval2");
    let v = m.cfg.vocab_size;
    let cfg = EngineConfig {
        max_num_seqs: 4,
        max_model_len: 512,
        prefill_chunk: 48,
        max_prefills_per_step: 2,
        ..Default::default()
    };
    let lens = [3usize, 150, 17, 64, 1, 99, 33, 200, 8, 120];
    let reqs: Vec<GenRequest> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| greedy(prompt(n, i as u64 + 1, v), 12 + i))
        .collect();

    // Alone: one engine, one request at a time.
    let alone_engine = Engine::start(m.clone(), cfg.clone());
    let alone: Vec<Vec<u32>> = reqs
        .iter()
        .map(|r| tokens(&collect(alone_engine.submit(r.clone()).unwrap().1, WAIT)))
        .collect();

    // Together: half submitted at once, the rest while those are generating.
    let engine = Engine::start(m.clone(), cfg);
    let mut rxs = Vec::new();
    for r in &reqs[..5] {
        rxs.push(engine.submit(r.clone()).unwrap().1);
    }
    std::thread::sleep(Duration::from_millis(30));
    for r in &reqs[5..] {
        rxs.push(engine.submit(r.clone()).unwrap().1);
    }
    for (i, rx) in rxs.into_iter().enumerate() {
        let ev = collect(rx, WAIT);
        assert!(
            matches!(
                ev.last(),
                Some(Event::Done {
                    reason: FinishReason::Length,
                    ..
                })
            ),
            "request {i}: {:?}",
            ev.last()
        );
        let got = tokens(&ev);
        assert_eq!(got.len(), 12 + i);
        assert_eq!(
            got, alone[i],
            "request {i} (prompt {}) differs when batched",
            lens[i]
        );
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(in_use(&engine.stats), 0, "slots leaked");
}

#[test]
fn cancel_and_hang_up_free_slots() {
    let m = model("tiny-f32");
    let v = m.cfg.vocab_size;
    let cfg = EngineConfig {
        max_num_seqs: 2,
        max_model_len: 256,
        ..Default::default()
    };
    let engine = Engine::start(m, cfg);
    let (id, rx) = engine.submit(greedy(prompt(10, 1, v), 200)).unwrap();
    let (_, rx2) = engine.submit(greedy(prompt(10, 2, v), 200)).unwrap();
    drop(rx2); // the client went away
    engine.cancel(id);
    let ev = collect(rx, WAIT);
    assert!(
        matches!(
            ev.last(),
            Some(Event::Done {
                reason: FinishReason::Cancelled,
                ..
            })
        ),
        "{:?}",
        ev.last()
    );
    // Both slots are usable again.
    let a = engine.submit(greedy(prompt(5, 3, v), 4)).unwrap().1;
    let b = engine.submit(greedy(prompt(5, 4, v), 4)).unwrap().1;
    assert_eq!(tokens(&collect(a, WAIT)).len(), 4);
    assert_eq!(tokens(&collect(b, WAIT)).len(), 4);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(in_use(&engine.stats), 0);
}

#[test]
fn stop_tokens_and_bad_requests() {
    let m = model("tiny-f32");
    let v = m.cfg.vocab_size;
    let engine = Engine::start(
        m,
        EngineConfig {
            max_num_seqs: 2,
            max_model_len: 64,
            ..Default::default()
        },
    );
    // Whatever greedy emits first becomes the stop token: generation ends there, reason Stop.
    let first = tokens(&collect(
        engine.submit(greedy(prompt(6, 5, v), 1)).unwrap().1,
        WAIT,
    ))[0];
    let mut req = greedy(prompt(6, 5, v), 50);
    req.stop_token_ids = vec![first];
    let ev = collect(engine.submit(req).unwrap().1, WAIT);
    assert!(matches!(ev[0], Event::Started { cached_tokens: 0 }));
    assert!(matches!(ev[1], Event::Token { is_stop: true, .. }));
    assert!(matches!(
        ev.last(),
        Some(Event::Done {
            reason: FinishReason::Stop,
            completion_tokens: 1,
            ..
        })
    ));
    assert!(engine.submit(greedy(vec![], 5)).is_err());
    assert!(engine.submit(greedy(prompt(64, 1, v), 5)).is_err());
    // Generation stops at the context length.
    let ev = collect(engine.submit(greedy(prompt(60, 1, v), 50)).unwrap().1, WAIT);
    assert_eq!(tokens(&ev).len(), 4);
}
