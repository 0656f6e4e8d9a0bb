//! Time per kind of work in the forward pass, for `qnext bench --profile`. Off by default;
//! when off a span costs one relaxed atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Embed,
    Norms,
    DeltaNetProj,
    DeltaNetConv,
    DeltaNetRule,
    DeltaNetOut,
    AttnProj,
    AttnCore,
    AttnOut,
    MoeRouter,
    MoeGateUp,
    MoeDown,
    MoeCopies,
    LmHead,
    Mtp,
}

pub const KINDS: [Kind; 15] = [
    Kind::Embed,
    Kind::Norms,
    Kind::DeltaNetProj,
    Kind::DeltaNetConv,
    Kind::DeltaNetRule,
    Kind::DeltaNetOut,
    Kind::AttnProj,
    Kind::AttnCore,
    Kind::AttnOut,
    Kind::MoeRouter,
    Kind::MoeGateUp,
    Kind::MoeDown,
    Kind::MoeCopies,
    Kind::LmHead,
    Kind::Mtp,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Embed => "embedding lookup",
            Kind::Norms => "RMS norms + residual",
            Kind::DeltaNetProj => "DeltaNet in_proj (qkvz, ba)",
            Kind::DeltaNetConv => "DeltaNet split + conv",
            Kind::DeltaNetRule => "DeltaNet q/k norm + rule + gated norm",
            Kind::DeltaNetOut => "DeltaNet out_proj",
            Kind::AttnProj => "attention q/k/v proj",
            Kind::AttnCore => "attention norm + RoPE + softmax(QK)V",
            Kind::AttnOut => "attention o_proj",
            Kind::MoeRouter => "MoE router + top-k",
            Kind::MoeGateUp => "MoE experts' gate/up (routed + shared)",
            Kind::MoeDown => "MoE experts' down (routed + shared)",
            Kind::MoeCopies => "MoE gather, SwiGLU, combine",
            Kind::LmHead => "final norm + lm_head",
            Kind::Mtp => "MTP embedding, norms and fc",
        }
    }
}

static ON: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; KINDS.len()] = [const { AtomicU64::new(0) }; KINDS.len()];

pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

static EXPERT_BYTES: AtomicU64 = AtomicU64::new(0);

pub fn reset() {
    for n in &NANOS {
        n.store(0, Ordering::Relaxed);
    }
    EXPERT_BYTES.store(0, Ordering::Relaxed);
}

/// Counts the bytes of routed experts a MoE layer reads (once per layer and step: free).
pub fn add_expert_bytes(n: usize) {
    EXPERT_BYTES.fetch_add(n as u64, Ordering::Relaxed);
}

/// Bytes of routed experts read since the last reset: what more tokens in a step cost in
/// weights (`bench --speculative-tokens`).
pub fn expert_bytes() -> u64 {
    EXPERT_BYTES.load(Ordering::Relaxed)
}

/// Nanoseconds recorded per kind since the last reset.
pub fn totals() -> Vec<(Kind, u64)> {
    KINDS
        .iter()
        .map(|&k| (k, NANOS[k as usize].load(Ordering::Relaxed)))
        .collect()
}

/// Records the time until it is dropped under `kind`.
pub struct Span {
    kind: Kind,
    start: Option<Instant>,
}

impl Span {
    #[inline]
    pub fn new(kind: Kind) -> Span {
        let start = ON.load(Ordering::Relaxed).then(Instant::now);
        Span { kind, start }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(s) = self.start {
            NANOS[self.kind as usize].fetch_add(s.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

/// Runs `f` under a span of `kind`.
#[inline]
pub fn time<R>(kind: Kind, f: impl FnOnce() -> R) -> R {
    let _s = Span::new(kind);
    f()
}
