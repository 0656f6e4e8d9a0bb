//! Counters and latency histograms of the engine, read by `/metrics`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram buckets, as vLLM's.
pub const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
pub struct Histogram {
    inner: Mutex<HistState>,
}

#[derive(Default, Clone, Debug)]
pub struct HistState {
    /// Observations ≤ each bucket bound (cumulative counts are formed when rendered).
    pub counts: [u64; BUCKETS.len()],
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let v = d.as_secs_f64();
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = BUCKETS.iter().position(|&b| v <= b) {
            s.counts[i] += 1;
        }
        s.count += 1;
        s.sum += v;
    }

    pub fn snapshot(&self) -> HistState {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[derive(Default)]
pub struct Stats {
    pub requests_total: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub queued: AtomicUsize,
    pub running: AtomicUsize,
    pub free_slots: AtomicUsize,
    /// K/V bytes the running sequences have reserved (`EngineConfig::kv_cache_memory`).
    pub kv_reserved: AtomicUsize,
    /// Prompt tokens of requests looked up in the prefix cache, and of those the tokens
    /// found there (not computed).
    pub prefix_queries: AtomicU64,
    pub prefix_hits: AtomicU64,
    /// What the prefix cache holds now, and has evicted so far.
    pub prefix_bytes: AtomicUsize,
    pub prefix_snapshots: AtomicUsize,
    pub prefix_evictions: AtomicU64,
    /// Tokens computed ahead of a conversation's next request (`Engine::warm`).
    pub warm_tokens: AtomicU64,
    /// Speculative decoding: verification steps, drafts proposed and accepted, and per draft
    /// position the drafts accepted there.
    pub spec_rounds: AtomicU64,
    pub spec_draft_tokens: AtomicU64,
    pub spec_accepted_tokens: AtomicU64,
    pub spec_accepted_per_position: Mutex<Vec<u64>>,
    /// Time to first token.
    pub ttft: Histogram,
    /// Inter-token latency.
    pub itl: Histogram,
}

impl Stats {
    pub fn get(&self, c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Counts one verification step that proposed `proposed` drafts and accepted `accepted`.
    pub fn speculated(&self, proposed: usize, accepted: usize) {
        self.spec_rounds.fetch_add(1, Ordering::Relaxed);
        self.spec_draft_tokens
            .fetch_add(proposed as u64, Ordering::Relaxed);
        self.spec_accepted_tokens
            .fetch_add(accepted as u64, Ordering::Relaxed);
        let mut per = self
            .spec_accepted_per_position
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if per.len() < proposed {
            per.resize(proposed, 0);
        }
        for a in &mut per[..accepted] {
            *a += 1;
        }
    }
}
