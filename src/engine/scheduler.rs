//! Continuous batching. One scheduler thread owns the model's caches and runs steps: between
//! steps it admits queued requests into free cache slots; each step runs, in a single forward
//! pass, the next prompt pieces of sequences still prefilling and one token of every decoding
//! sequence. Tokens go back to the requester over a channel; a requester that hangs up frees
//! its slot at the next step.
//!
//! A step takes whole pieces of a prompt: up to `max_num_batched_tokens` while no sequence
//! decodes (a step reads every expert its tokens route to, so with 512 experts longer steps
//! cost far less per token), `prefill_chunk` beside decoding ones (their streams wait for
//! the step).
//!
//! Results do not depend on the batch nor on the prefix cache: every prompt is cut into the
//! same pieces whatever else runs and whatever was cached (`chunking.rs`), the model's kernels
//! give a row the same value whatever the batch size, and a request resumes only from a
//! state kept at one of its own cuts (inside a step as at its end: `SeqCache::snapshot_at`).
//!
//! With the prefix cache, a request starts from the deepest state kept for a prefix of its
//! prompt (`cache::prefix`) and keeps its own at the cuts `Chunking::snapshot_points` names.
//! After a chat answer, the server asks for the conversation as its next request will render
//! it to be computed ahead (`Engine::warm`): a background job, run only while no request
//! waits or runs, that keeps the state after the answer computed as a prompt, as the next
//! request would compute it.

use anyhow::{bail, Result};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::chunking::{Chunking, Markers};
use super::speculative::{self, DraftSeq, Drafts};
use super::stats::Stats;
use crate::cache::prefix::PrefixCache;
use crate::cache::{SeqCache, BLOCK};

/// K/V bytes of a sequence of `tokens` positions, in whole blocks.
fn kv_bytes(per_token: usize, tokens: usize) -> usize {
    tokens.div_ceil(BLOCK) * BLOCK * per_token
}
use crate::model::{Model, SeqInput, Want};
use crate::sampling::{top_logprobs, Sampler, SamplingParams};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together at most (cache slots).
    pub max_num_seqs: usize,
    /// Prompt + generated tokens of one sequence at most.
    pub max_model_len: usize,
    /// Prompt positions between cuts (`chunking.rs`), and the prompt tokens a sequence
    /// feeds per step while others decode, so that their streams keep flowing.
    pub prefill_chunk: usize,
    /// Prompt tokens of one step at most (whole pieces; at least one) while no sequence
    /// decodes: a step reads every expert its tokens route to once, so with hundreds of
    /// experts longer steps cost far less per token.
    pub max_num_batched_tokens: usize,
    /// Sequences prefilling in the same step at most, so running streams keep flowing.
    pub max_prefills_per_step: usize,
    /// The chat template's message markers, where prompts are cut besides every
    /// `prefill_chunk` positions.
    pub markers: Markers,
    /// Bytes the prefix cache may hold; `None`: no prefix cache.
    pub prefix_cache: Option<usize>,
    /// Prompt positions between states kept during a long prefill (a multiple of
    /// `prefill_chunk`).
    pub snapshot_interval: usize,
    /// Bytes of attention K/V the running sequences may hold together; `None`: no limit.
    /// Each sequence reserves what its prompt and its `max_tokens` can need when admitted,
    /// so a running sequence never runs out; a request that could never fit is refused.
    pub kv_cache_memory: Option<usize>,
    /// Tokens the MTP head drafts per decode step (0: no speculative decoding). The model
    /// must have an MTP head.
    pub speculative_tokens: usize,
}

impl EngineConfig {
    /// The default prompt tokens per step for `cfg`'s model: enough for each expert to see
    /// about 64 of them (routed tokens spread over the experts), in whole 256-token chunks,
    /// from 256 to 2048. 2048 for Qwen3-Next's 512 experts and 10 routed per token; 256
    /// for a dense model.
    pub fn batched_tokens_for(cfg: &crate::config::Config) -> usize {
        let chunk = EngineConfig::default().prefill_chunk;
        let (experts, routed) = (cfg.num_experts, cfg.num_experts_per_tok.max(1));
        (64 * experts / routed)
            .next_multiple_of(chunk)
            .clamp(chunk, 2048)
    }

    pub fn chunking(&self) -> Chunking {
        Chunking {
            chunk: self.prefill_chunk,
            markers: self.markers.clone(),
            interval: self.snapshot_interval,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_num_seqs: 8,
            max_model_len: 4096,
            prefill_chunk: 256,
            max_num_batched_tokens: 2048,
            max_prefills_per_step: 2,
            markers: Markers::default(),
            prefix_cache: None,
            snapshot_interval: 2048,
            kv_cache_memory: None,
            speculative_tokens: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Tokens to generate at most (clamped to the room left in `max_model_len`).
    pub max_tokens: usize,
    /// Ids that end generation (EOS); the stop id itself is reported but not part of the text.
    pub stop_token_ids: Vec<u32>,
    /// `Some(n)`: report the chosen token's log-probability and the `n` most likely.
    pub logprobs: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was generated.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The requester cancelled (e.g. a stop string matched).
    Cancelled,
}

#[derive(Debug, Clone)]
pub enum Event {
    /// The request got a slot; `cached_tokens` of its prompt were found in the prefix cache
    /// and are not computed.
    Started {
        cached_tokens: usize,
    },
    Token {
        id: u32,
        /// Set when the request asked for log-probabilities.
        logprob: Option<f32>,
        top_logprobs: Vec<(u32, f32)>,
        /// Whether this token is a stop token (not to be shown as text).
        is_stop: bool,
    },
    Done {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

pub type RequestId = u64;

enum Cmd {
    Submit {
        id: RequestId,
        req: GenRequest,
        events: UnboundedSender<Event>,
        at: Instant,
    },
    Cancel(RequestId),
    Warm(Vec<u32>),
    /// Empty the prefix cache; the reply says how many snapshots went.
    FlushPrefixCache(std::sync::mpsc::Sender<usize>),
}

/// A handle to the scheduler thread; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Cmd>,
    next_id: Arc<AtomicU64>,
    pub stats: Arc<Stats>,
    pub config: EngineConfig,
    /// K/V bytes per position of a sequence (all attention layers).
    kv_per_token: usize,
}

impl Engine {
    pub fn start(model: Arc<Model>, config: EngineConfig) -> Engine {
        let kv_per_token = kv_per_token(&model, &config);
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        stats
            .free_slots
            .store(config.max_num_seqs, Ordering::Relaxed);
        let st = stats.clone();
        let cfg = config.clone();
        std::thread::Builder::new()
            .name("qnext-scheduler".into())
            .spawn(move || Scheduler::new(model, cfg, st).run(rx))
            .expect("spawning the scheduler thread");
        Engine {
            tx,
            next_id: Arc::new(AtomicU64::new(1)),
            stats,
            config,
            kv_per_token,
        }
    }

    /// K/V bytes a sequence of `tokens` positions holds at most (whole blocks).
    pub fn kv_bytes(&self, tokens: usize) -> usize {
        kv_bytes(self.kv_per_token, tokens)
    }

    /// Positions one sequence can hold within the K/V budget (`usize::MAX`: no budget).
    pub fn kv_capacity(&self) -> usize {
        self.config.kv_cache_memory.map_or(usize::MAX, |b| {
            b / (self.kv_per_token * BLOCK).max(1) * BLOCK
        })
    }

    /// Queues a request; events arrive on the returned receiver until `Done` or `Error`.
    pub fn submit(&self, req: GenRequest) -> Result<(RequestId, UnboundedReceiver<Event>)> {
        if req.prompt.is_empty() {
            bail!("the prompt is empty");
        }
        let room = self.config.max_model_len.saturating_sub(req.prompt.len());
        let positions = req.prompt.len() + req.max_tokens.min(room);
        if positions > self.kv_capacity() {
            bail!(
                "{} prompt and output tokens need {:.2} GiB of K/V cache; this server holds {} \
                 positions per sequence ({:.2} GiB)",
                positions,
                self.kv_bytes(positions) as f64 / (1u64 << 30) as f64,
                self.kv_capacity(),
                self.config.kv_cache_memory.unwrap_or(0) as f64 / (1u64 << 30) as f64
            );
        }
        if req.prompt.len() >= self.config.max_model_len {
            bail!(
                "the prompt has {} tokens; the maximum context length is {}",
                req.prompt.len(),
                self.config.max_model_len
            );
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (etx, erx) = unbounded_channel();
        self.stats.requests_total.fetch_add(1, Ordering::Relaxed);
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        self.tx
            .send(Cmd::Submit {
                id,
                req,
                events: etx,
                at: Instant::now(),
            })
            .map_err(|_| anyhow::anyhow!("the engine has stopped"))?;
        Ok((id, erx))
    }

    /// Stops a request at the next step; its slot is freed.
    pub fn cancel(&self, id: RequestId) {
        let _ = self.tx.send(Cmd::Cancel(id));
    }

    /// Empties the prefix cache (and forgets conversations queued to be computed ahead);
    /// what running requests use stays theirs. `None` when the engine has stopped; otherwise
    /// the snapshots dropped (0 without a prefix cache).
    pub fn flush_prefix_cache(&self) -> Option<usize> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx.send(Cmd::FlushPrefixCache(tx)).ok()?;
        rx.recv().ok()
    }

    /// Asks for the state after `tokens` (a conversation as its next request will begin) to
    /// be computed and kept, when the engine has nothing else to do. Without a prefix cache,
    /// nothing happens.
    pub fn warm(&self, tokens: Vec<u32>) {
        if self.config.prefix_cache.is_some() && tokens.len() < self.config.max_model_len {
            let _ = self.tx.send(Cmd::Warm(tokens));
        }
    }
}

/// K/V bytes a sequence adds per position: its attention layers', and the MTP layer's when
/// it drafts.
pub fn kv_per_token(model: &Model, cfg: &EngineConfig) -> usize {
    let mut c = model.new_cache(1);
    if cfg.speculative_tokens > 0 {
        let _ = model.enable_mtp(&mut c);
    }
    c.kv_bytes_per_token()
}

/// Conversations waiting to be computed ahead at most; older ones are dropped.
const MAX_WARM_QUEUE: usize = 8;

struct Running {
    id: RequestId,
    req: GenRequest,
    events: UnboundedSender<Event>,
    slot: usize,
    sampler: Sampler,
    /// Prompt tokens already fed.
    fed: usize,
    /// Prompt positions after `fed` whose states go into the prefix cache, in order.
    points: VecDeque<usize>,
    /// A background job computing a conversation ahead: no output, no events.
    warm: bool,
    /// K/V bytes reserved for it.
    kv: usize,
    output: Vec<u32>,
    max_new: usize,
    submitted: Instant,
    last_token: Option<Instant>,
}

struct Scheduler {
    model: Arc<Model>,
    cfg: EngineConfig,
    stats: Arc<Stats>,
    slots: Vec<SeqCache>,
    free: Vec<usize>,
    waiting: VecDeque<(RequestId, GenRequest, UnboundedSender<Event>, Instant)>,
    running: Vec<Running>,
    chunking: Chunking,
    prefix: Option<PrefixCache>,
    warming: VecDeque<Vec<u32>>,
    /// K/V bytes per position, and reserved by the running sequences.
    kv_per_token: usize,
    kv_reserved: usize,
}

impl Scheduler {
    fn new(model: Arc<Model>, cfg: EngineConfig, stats: Arc<Stats>) -> Scheduler {
        let model_kv = kv_per_token(&model, &cfg);
        let mut cfg = cfg;
        let slots = (0..cfg.max_num_seqs)
            .map(|_| {
                let mut c = model.new_cache(cfg.max_model_len);
                // Callers check for an MTP head first (`serve` refuses to start without).
                if cfg.speculative_tokens > 0 && model.enable_mtp(&mut c).is_err() {
                    cfg.speculative_tokens = 0;
                }
                c
            })
            .collect();
        Scheduler {
            free: (0..cfg.max_num_seqs).rev().collect(),
            model,
            chunking: cfg.chunking(),
            prefix: cfg.prefix_cache.map(PrefixCache::new),
            cfg,
            stats,
            slots,
            waiting: VecDeque::new(),
            running: Vec::new(),
            warming: VecDeque::new(),
            kv_per_token: model_kv,
            kv_reserved: 0,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        loop {
            // Block only when there is nothing to do.
            if self.running.is_empty() && self.waiting.is_empty() && self.warming.is_empty() {
                match rx.recv() {
                    Ok(c) => self.command(c),
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(c) => self.command(c),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        if self.running.iter().all(|r| r.warm) && self.waiting.is_empty() {
                            return;
                        }
                        break;
                    }
                }
            }
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
            self.publish();
        }
    }

    fn command(&mut self, c: Cmd) {
        match c {
            Cmd::Submit {
                id,
                req,
                events,
                at,
            } => self.waiting.push_back((id, req, events, at)),
            Cmd::Cancel(id) => {
                if let Some(i) = self.waiting.iter().position(|w| w.0 == id) {
                    if let Some((_, req, ev, _)) = self.waiting.remove(i) {
                        let _ = ev.send(Event::Done {
                            reason: FinishReason::Cancelled,
                            prompt_tokens: req.prompt.len(),
                            completion_tokens: 0,
                        });
                    }
                }
                if let Some(i) = self.running.iter().position(|r| r.id == id && !r.warm) {
                    let r = self.running.swap_remove(i);
                    self.finish(r, FinishReason::Cancelled);
                }
            }
            Cmd::Warm(tokens) => {
                if self.warming.len() == MAX_WARM_QUEUE {
                    self.warming.pop_front();
                }
                self.warming.push_back(tokens);
            }
            Cmd::FlushPrefixCache(reply) => {
                self.warming.clear();
                let dropped = self.prefix.as_mut().map_or(0, PrefixCache::clear);
                // Published before the reply, so that whoever asked sees it in the stats.
                self.publish();
                let _ = reply.send(dropped);
            }
        }
    }

    fn kv_fits(&self, need: usize) -> bool {
        self.cfg
            .kv_cache_memory
            .is_none_or(|b| self.kv_reserved + need <= b)
    }

    /// Frees what a sequence held: its slot and its K/V reservation.
    fn release(&mut self, r: &Running) {
        self.free.push(r.slot);
        self.kv_reserved -= r.kv;
    }

    fn admit(&mut self) {
        while let Some((_, head, _, _)) = self.waiting.front() {
            let room = self.cfg.max_model_len.saturating_sub(head.prompt.len());
            let kv = kv_bytes(
                self.kv_per_token,
                head.prompt.len() + head.max_tokens.min(room),
            );
            // A waiting request takes the slot and memory of background jobs.
            while self.free.is_empty() || !self.kv_fits(kv) {
                let Some(i) = self.running.iter().position(|r| r.warm) else {
                    break;
                };
                let r = self.running.swap_remove(i);
                self.release(&r);
            }
            // Otherwise it waits for running requests to finish (oldest first).
            if self.free.is_empty() || !self.kv_fits(kv) {
                break;
            }
            let Some(slot) = self.free.pop() else { break };
            let Some((id, req, events, at)) = self.waiting.pop_front() else {
                self.free.push(slot);
                break;
            };
            if events.is_closed() {
                self.free.push(slot);
                continue;
            }
            let sampler = match Sampler::new(req.sampling.clone()) {
                Ok(s) => s,
                Err(e) => {
                    let _ = events.send(Event::Error(format!("{e:#}")));
                    self.free.push(slot);
                    continue;
                }
            };
            let max_new = req.max_tokens.min(room);
            self.kv_reserved += kv;
            // The logits of the prompt's last token are computed, never cached.
            let limit = req.prompt.len() - 1;
            let points = self.chunking.snapshot_points(&req.prompt);
            let cached = self.resume(slot, &req.prompt, limit);
            if self.prefix.is_some() {
                self.stats
                    .prefix_queries
                    .fetch_add(req.prompt.len() as u64, Ordering::Relaxed);
                self.stats
                    .prefix_hits
                    .fetch_add(cached as u64, Ordering::Relaxed);
            }
            let _ = events.send(Event::Started {
                cached_tokens: cached,
            });
            self.running.push(Running {
                id,
                max_new,
                req,
                events,
                slot,
                sampler,
                fed: cached,
                points: points.into_iter().filter(|&p| p > cached).collect(),
                warm: false,
                kv,
                output: Vec::new(),
                submitted: at,
                last_token: None,
            });
        }
        // Background jobs, one at a time, when no request waits.
        while self.waiting.is_empty() && !self.running.iter().any(|r| r.warm) {
            let Some(tokens) = self.warming.pop_front() else {
                break;
            };
            let points = self.chunking.snapshot_points(&tokens);
            let Some(&last) = points.last() else { continue };
            if self
                .prefix
                .as_mut()
                .is_none_or(|c| c.contains(&tokens[..last]))
            {
                continue;
            }
            let kv = kv_bytes(self.kv_per_token, last);
            if !self.kv_fits(kv) {
                continue;
            }
            let Some(slot) = self.free.pop() else {
                self.warming.push_front(tokens);
                break;
            };
            self.kv_reserved += kv;
            let fed = self.resume(slot, &tokens, last);
            let mut req = GenRequest {
                prompt: tokens,
                sampling: SamplingParams::default(),
                max_tokens: 0,
                stop_token_ids: Vec::new(),
                logprobs: None,
            };
            req.prompt.truncate(last);
            let Ok(sampler) = Sampler::new(req.sampling.clone()) else {
                self.free.push(slot);
                self.kv_reserved -= kv;
                continue;
            };
            self.running.push(Running {
                id: 0,
                max_new: 0,
                req,
                events: unbounded_channel().0,
                slot,
                sampler,
                fed,
                points: points.into_iter().filter(|&p| p > fed).collect(),
                warm: true,
                kv,
                output: Vec::new(),
                submitted: Instant::now(),
                last_token: None,
            });
        }
    }

    /// Readies `slot` for `prompt`: from the deepest state the prefix cache holds for a
    /// prefix of at most `limit` tokens, or from the start. Returns the position it resumes
    /// at.
    fn resume(&mut self, slot: usize, prompt: &[u32], limit: usize) -> usize {
        let cache = &mut self.slots[slot];
        cache.reset();
        let Some(hit) = self.prefix.as_mut().and_then(|c| c.lookup(prompt, limit)) else {
            return 0;
        };
        match cache.restore(&hit.snap) {
            Ok(()) => hit.snap.pos(),
            Err(_) => {
                cache.reset();
                0
            }
        }
    }

    /// The prompt of `r` from where it stands, in whole pieces up to `budget` tokens (at
    /// least one piece): the step's end, its pieces' ends and the ends after which its states
    /// are kept for the prefix cache, as offsets. With the MTP layer a step ends where a
    /// state is to be kept (its state is kept at step ends only).
    fn pieces(&self, r: &Running, budget: usize, mtp: bool) -> (usize, Vec<usize>, Vec<usize>) {
        let prompt = &r.req.prompt;
        let (mut end, mut ends, mut keep) = (r.fed, Vec::new(), Vec::new());
        while end < prompt.len() {
            let next = self.chunking.chunk_end(prompt, end);
            if !ends.is_empty() && next - r.fed > budget {
                break;
            }
            end = next;
            ends.push(end - r.fed);
            if r.points.contains(&end) {
                if mtp {
                    break;
                }
                keep.push(end - r.fed);
            }
        }
        // The state at the step's end is the sequence's own after it.
        keep.retain(|&k| k != end - r.fed);
        (end, ends, keep)
    }

    /// One forward pass over every running sequence, then sampling.
    fn step(&mut self) {
        // Drop sequences whose requester went away.
        let mut i = 0;
        while i < self.running.len() {
            if !self.running[i].warm && self.running[i].events.is_closed() {
                let r = self.running.swap_remove(i);
                self.finish(r, FinishReason::Cancelled);
            } else {
                i += 1;
            }
        }
        // Pick this step's work: decode tokens for everyone past the prompt, prompt chunks
        // for up to `max_prefills_per_step` others (oldest first).
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| self.running[i].submitted);
        let mut prefills = 0;
        // (running idx, prompt range, where its pieces end, where states are kept), or a
        // decode (empty range).
        let mut plan: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        let mut cuts: Vec<(Vec<usize>, Vec<usize>)> = Vec::new();
        // A background job runs only while no request does: beside a decode its prompt
        // chunk would hold every running stream up for the length of a chunk.
        let idle = self.running.iter().all(|r| r.warm);
        let decoding = self
            .running
            .iter()
            .any(|r| !r.warm && r.fed >= r.req.prompt.len());
        let mut budget = if decoding {
            self.cfg.prefill_chunk
        } else {
            self.cfg.max_num_batched_tokens.max(self.cfg.prefill_chunk)
        };
        let mtp = self.cfg.speculative_tokens > 0;
        for &i in &order {
            let r = &self.running[i];
            if r.warm && !idle {
                continue;
            }
            if r.fed < r.req.prompt.len() {
                if prefills < self.cfg.max_prefills_per_step {
                    let (end, ends, keep) = self.pieces(r, budget, mtp);
                    budget = budget.saturating_sub(end - r.fed);
                    plan.push((i, r.fed..end));
                    cuts.push((ends, keep));
                    prefills += 1;
                }
            } else {
                plan.push((i, 0..0));
                cuts.push((Vec::new(), Vec::new()));
            }
        }
        if plan.is_empty() {
            return;
        }
        // Decoding sequences draft with the MTP head first, all together; their step then
        // feeds the last token and the drafts, and ends after the accepted ones.
        let k = self.cfg.speculative_tokens;
        let mut drafts: Vec<Option<Drafts>> = plan.iter().map(|_| None).collect();
        if k > 0 {
            let mut want: Vec<(usize, usize)> = Vec::new(); // (plan index, drafts)
            for (p, &(i, ref range)) in plan.iter().enumerate() {
                let r = &self.running[i];
                if !range.is_empty() || r.warm || r.output.is_empty() {
                    continue;
                }
                let c = &self.slots[r.slot];
                let room = c.max_len().saturating_sub(c.pos() + 1);
                let kk = k
                    .min(r.max_new.saturating_sub(r.output.len() + 1))
                    .min(room);
                if kk > 0 {
                    want.push((p, kk));
                }
            }
            if !want.is_empty() {
                let mut caches: Vec<Option<&mut SeqCache>> =
                    self.slots.iter_mut().map(Some).collect();
                let mut runs: Vec<Option<&mut Running>> =
                    self.running.iter_mut().map(Some).collect();
                let mut seqs: Vec<DraftSeq> = Vec::with_capacity(want.len());
                for &(p, kk) in &want {
                    let r = runs[plan[p].0].take().expect("one plan entry per sequence");
                    seqs.push(DraftSeq {
                        cache: caches[r.slot].take().expect("one sequence per slot"),
                        sampler: &mut r.sampler,
                        prompt: &r.req.prompt,
                        output: &r.output,
                        k: kk,
                    });
                }
                match speculative::draft(&self.model, &mut seqs) {
                    Ok(d) => {
                        for (&(p, _), d) in want.iter().zip(d) {
                            drafts[p] = Some(d);
                        }
                    }
                    // Speculation is an optimisation: without drafts the step decodes plainly.
                    Err(e) => eprintln!("qnext: drafting failed, decoding without drafts: {e:#}"),
                }
            }
        }
        let decode_tokens: Vec<Vec<u32>> = plan
            .iter()
            .zip(&drafts)
            .map(|(&(i, _), d)| {
                let mut t = vec![self.running[i].output.last().copied().unwrap_or(0)];
                if let Some(d) = d {
                    t.extend(&d.tokens);
                }
                t
            })
            .collect();
        let mut slot_refs: Vec<Option<&mut SeqCache>> = self.slots.iter_mut().map(Some).collect();
        let mut batch: Vec<SeqInput> = Vec::with_capacity(plan.len());
        for (p, &(i, ref range)) in plan.iter().enumerate() {
            let r = &self.running[i];
            let cache = slot_refs[r.slot].take().expect("one sequence per slot");
            if range.is_empty() {
                let speculating = drafts[p].is_some();
                if speculating {
                    cache.speculate();
                }
                batch.push(SeqInput {
                    tokens: &decode_tokens[p],
                    cache,
                    want: if speculating { Want::All } else { Want::Last },
                });
            } else {
                let last = range.end == r.req.prompt.len() && !r.warm;
                cache.cut_prompt(&cuts[p].0, &cuts[p].1);
                batch.push(SeqInput {
                    tokens: &r.req.prompt[range.clone()],
                    cache,
                    want: if last { Want::Last } else { Want::None },
                });
            }
        }
        let result = self.model.forward(&mut batch);
        drop(batch);
        let outs = match result {
            Ok(o) => o,
            Err(e) => {
                // Inputs were validated at submission; fail the step's requests, keep serving.
                let msg = format!("{e:#}");
                let mut idx: Vec<usize> = plan.iter().map(|p| p.0).collect();
                idx.sort_unstable_by_key(|&i| std::cmp::Reverse(i));
                for i in idx {
                    let r = self.running.swap_remove(i);
                    let _ = r.events.send(Event::Error(msg.clone()));
                    self.release(&r);
                }
                return;
            }
        };
        let now = Instant::now();
        let vocab = self.model.cfg.vocab_size;
        let mut done: Vec<(usize, FinishReason)> = Vec::new();
        for (((i, range), out), drafts) in plan.into_iter().zip(outs).zip(drafts) {
            let r = &mut self.running[i];
            if !range.is_empty() {
                r.fed = range.end;
                let counter = if r.warm {
                    &self.stats.warm_tokens
                } else {
                    &self.stats.prompt_tokens
                };
                counter.fetch_add(range.len() as u64, Ordering::Relaxed);
                while r.points.front().is_some_and(|&p| p <= r.fed) {
                    let Some(p) = r.points.pop_front() else { break };
                    if let Some(cache) = self.prefix.as_mut() {
                        let tokens = &r.req.prompt[..p];
                        if !cache.contains(tokens) {
                            if let Some(snap) = self.slots[r.slot].snapshot_at(p) {
                                cache.insert(tokens, Arc::new(snap));
                            }
                        }
                    }
                }
                if r.fed < r.req.prompt.len() {
                    continue;
                }
                if r.warm {
                    done.push((i, FinishReason::Length));
                    continue;
                }
            }
            if r.max_new == 0 {
                done.push((i, FinishReason::Length));
                continue;
            }
            // The tokens this step yields, each with the logits row it was chosen from.
            let chosen: Result<Vec<(u32, usize)>> = match &drafts {
                None => r
                    .sampler
                    .sample(&out.logits, &r.req.prompt, &r.output)
                    .map(|t| vec![(t, 0)]),
                Some(d) => {
                    speculative::accept(&mut r.sampler, &r.req.prompt, &r.output, d, &out.logits)
                        .and_then(|a| {
                            self.slots[r.slot].accept(a.tokens.len())?;
                            self.stats.speculated(d.tokens.len(), a.drafts);
                            Ok(a.tokens.into_iter().zip(0..).collect())
                        })
                }
            };
            let chosen = match chosen {
                Ok(c) => c,
                Err(e) => {
                    let _ = r.events.send(Event::Error(format!("{e:#}")));
                    done.push((i, FinishReason::Cancelled));
                    continue;
                }
            };
            let since = r.last_token;
            let n = chosen.len() as u32;
            for (next, row) in chosen {
                let logits = &out.logits[row * vocab..(row + 1) * vocab];
                let (logprob, top) = match r.req.logprobs {
                    Some(n) => {
                        let lp = crate::sampling::logprobs(logits);
                        (Some(lp[next as usize]), top_logprobs(&lp, n))
                    }
                    None => (None, Vec::new()),
                };
                let is_stop = r.req.stop_token_ids.contains(&next);
                r.output.push(next);
                self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
                // Tokens of one step arrive together: each counts an equal share of the wait.
                match since {
                    None if r.last_token.is_none() => {
                        self.stats.ttft.observe(now.duration_since(r.submitted))
                    }
                    None => self.stats.itl.observe(Duration::ZERO),
                    Some(t) => self.stats.itl.observe(now.duration_since(t) / n),
                }
                r.last_token = Some(now);
                let _ = r.events.send(Event::Token {
                    id: next,
                    logprob,
                    top_logprobs: top,
                    is_stop,
                });
                if is_stop {
                    done.push((i, FinishReason::Stop));
                    break;
                } else if r.output.len() >= r.max_new {
                    done.push((i, FinishReason::Length));
                    break;
                }
            }
        }
        done.sort_unstable_by_key(|d| std::cmp::Reverse(d.0));
        for (i, reason) in done {
            let r = self.running.swap_remove(i);
            self.finish(r, reason);
        }
    }

    fn finish(&mut self, r: Running, reason: FinishReason) {
        let _ = r.events.send(Event::Done {
            reason,
            prompt_tokens: r.req.prompt.len(),
            completion_tokens: r.output.len(),
        });
        self.release(&r);
    }

    fn publish(&self) {
        self.stats
            .queued
            .store(self.waiting.len(), Ordering::Relaxed);
        self.stats.running.store(
            self.running.iter().filter(|r| !r.warm).count(),
            Ordering::Relaxed,
        );
        self.stats
            .free_slots
            .store(self.free.len(), Ordering::Relaxed);
        self.stats
            .kv_reserved
            .store(self.kv_reserved, Ordering::Relaxed);
        if let Some(c) = &self.prefix {
            let p = c.stats();
            self.stats.prefix_bytes.store(p.bytes, Ordering::Relaxed);
            self.stats
                .prefix_snapshots
                .store(p.snapshots, Ordering::Relaxed);
            self.stats
                .prefix_evictions
                .store(p.evictions, Ordering::Relaxed);
        }
    }
}

/// Waits for every event of a request (for tests and the CLI).
pub fn collect(mut rx: UnboundedReceiver<Event>, timeout: Duration) -> Vec<Event> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while Instant::now() < deadline {
        match rx.try_recv() {
            Ok(e) => {
                let end = matches!(e, Event::Done { .. } | Event::Error(_));
                out.push(e);
                if end {
                    break;
                }
            }
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(_) => break,
        }
    }
    out
}

/// Slots currently in use (queued + running), for leak checks.
pub fn in_use(stats: &Stats) -> usize {
    stats.running.load(Ordering::Relaxed) + stats.queued.load(Ordering::Relaxed)
}
