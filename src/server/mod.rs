//! The OpenAI-compatible HTTP server (`qnext serve`), modelled on vLLM's.
//!
//! [`start`] loads the model, starts the continuous-batching [`Engine`], binds the listener and
//! serves on a background tokio runtime; the returned [`ServerHandle`] gives the bound address
//! (port 0 picks a free one) and shuts the server down.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /v1/models/{id}`, `GET /health`, `GET /metrics` (Prometheus), `GET /version`,
//! `POST /tokenize`, `POST /detokenize`. With an API key, `/v1/*` needs
//! `Authorization: Bearer KEY`.

mod chat;
mod completions;
pub mod error;
pub mod generate;
pub mod hub;
mod listener;
mod misc;
pub mod params;
pub mod render_worker;
mod router_api;
mod sse;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::kernels::matmul::Precision;
use anyhow::{bail, Context, Result};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::watch;

use crate::checkpoint::LoadMode;
use crate::config::Overrides;
use crate::engine::chunking::Markers;
use crate::engine::stats::Histogram;
use crate::engine::{Engine, EngineConfig};
use crate::model::Model;
use crate::sampling::{GenerationConfig, SamplingParams};
use crate::text::{ChatTemplate, RenderLimits, Tokenizer};
use error::ApiError;
use generate::TokenText;
pub use listener::Timeouts;

/// Largest request body accepted (a prompt at the full context length fits easily).
const MAX_BODY_BYTES: usize = 64 << 20;
/// How long a shutdown waits for running requests before it drops them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReasoningParser {
    #[default]
    None,
    /// `<think>…</think>` → `reasoning_content` (vLLM `deepseek_r1`; Qwen3-Next-Thinking).
    DeepseekR1,
    /// vLLM `qwen3` (Qwen3.5 / 3.6): also ended by `<tool_call>`; all content when thinking
    /// is off (`enable_thinking: false`, or the prompt closes `<think>` itself).
    Qwen3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ToolCallParser {
    None,
    /// `<tool_call>{json}</tool_call>` → `tool_calls` (vLLM `hermes`; Qwen3-Next).
    Hermes,
    /// `<tool_call><function=…><parameter=…>` → `tool_calls` (vLLM `qwen3_coder`; Qwen3.5 / 3.6).
    Qwen3Coder,
    /// The model family's own: hermes for Qwen3-Next, qwen3_coder for Qwen3.5 / 3.6.
    #[default]
    Auto,
}

impl ToolCallParser {
    /// `Auto` resolved for a model of `family`.
    pub fn for_family(self, family: crate::config::Family) -> ToolCallParser {
        match (self, family) {
            (ToolCallParser::Auto, crate::config::Family::Qwen3Next) => ToolCallParser::Hermes,
            (ToolCallParser::Auto, crate::config::Family::Qwen35) => ToolCallParser::Qwen3Coder,
            (p, _) => p,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A checkpoint folder or a Hugging Face repo id.
    pub model: String,
    pub host: String,
    /// 0: any free port (see [`ServerHandle::addr`]).
    pub port: u16,
    /// Names clients may use in `model`; the first is reported. Empty: `model` as given.
    pub served_model_name: Vec<String>,
    pub api_key: Option<String>,
    /// Prompt + output tokens of one sequence at most; `None`: the model's context length.
    pub max_model_len: Option<usize>,
    pub max_num_seqs: usize,
    /// Prompt tokens of one step while no sequence decodes; `None`: chosen from the model
    /// ([`EngineConfig::batched_tokens_for`]).
    pub max_num_batched_tokens: Option<usize>,
    pub reasoning_parser: ReasoningParser,
    pub tool_call_parser: ToolCallParser,
    /// Replaces the checkpoint's chat template (`.jinja`, or JSON with `chat_template`).
    pub chat_template: Option<PathBuf>,
    /// Shut down on SIGINT/SIGTERM (the CLI; not wanted in tests).
    pub handle_signals: bool,
    /// Where a repo id is looked up; `None`: from the environment.
    pub hub: Option<hub::HubEnv>,
    /// How the weights are held in memory (`--load`).
    pub load_mode: LoadMode,
    /// How the matrix products round (`--exact`).
    pub precision: Precision,
    /// An 8-bit copy of `lm_head` (`--lm-head q8`).
    pub lm_head_q8: bool,
    /// Keep states of prompts for later requests that share a prefix.
    pub prefix_caching: bool,
    /// Bytes the prefix cache may hold; `None`: [`default_prefix_cache_bytes`].
    pub prefix_cache_memory: Option<usize>,
    /// Changes to config.json (`--hf-overrides`, `--rope-scaling`).
    pub overrides: Overrides,
    /// Bytes of K/V the running sequences may hold; `None`: what is left of the memory
    /// available once the model is loaded, less the prefix cache's budget and a margin.
    pub kv_cache_memory: Option<usize>,
    /// Tokens the MTP head drafts per decode step (`--speculative-tokens`); 0: none.
    pub speculative_tokens: usize,
    /// How long a connection may take to send a request (`--timeout-keep-alive`,
    /// `--timeout-request-body`).
    pub timeouts: Timeouts,
    /// The executable to run as `render-worker` (the chat template rendered in child processes
    /// with bounded memory, [`render_worker`]); `None`: rendered in this process.
    pub render_worker: Option<PathBuf>,
}

/// The prefix cache's default budget: a quarter of the memory available at start-up, at
/// most 8 GiB (llama.cpp's `--cache-ram` default); 1 GiB where that is unknown.
pub fn default_prefix_cache_bytes() -> usize {
    let available = crate::procfs::kb_field("/proc/meminfo", "MemAvailable:");
    available.map_or(1 << 30, |b| (b as usize / 4).min(8 << 30))
}

/// Where chat prompts are cut (`engine::chunking`): after the template's end-of-message token
/// and after its assistant header, if the tokenizer has them (ChatML, as Qwen's templates).
pub fn chat_markers(tok: &Tokenizer) -> Markers {
    let mut m = Markers::default();
    if let Some(end) = tok.token_to_id("<|im_end|>") {
        m.after_token.push(end);
    }
    if let (Some(start), Ok(rest)) = (
        tok.token_to_id("<|im_start|>"),
        tok.encode("assistant\n", false),
    ) {
        m.after_seq
            .push(std::iter::once(start).chain(rest).collect());
    }
    m
}

/// Drafts per step allowed: verification steps stay decode-sized (the dot-product kernels),
/// and past a few drafts acceptance falls off (each needs all before it accepted).
pub const MAX_SPECULATIVE_TOKENS: usize = 8;

/// `--speculative-tokens k` needs the checkpoint's MTP head and `k` ≤
/// [`MAX_SPECULATIVE_TOKENS`].
pub fn check_speculative_tokens(model: &Model, k: usize) -> Result<()> {
    if k > MAX_SPECULATIVE_TOKENS {
        bail!("--speculative-tokens {k}: at most {MAX_SPECULATIVE_TOKENS} drafts per step");
    }
    if k > 0 && !model.has_mtp() {
        bail!(
            "--speculative-tokens {k}: this checkpoint has no MTP head (mtp.* tensors), which \
             drafts the tokens; run without --speculative-tokens"
        );
    }
    Ok(())
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            model: String::new(),
            host: "127.0.0.1".into(),
            port: 8000,
            served_model_name: Vec::new(),
            api_key: None,
            max_model_len: None,
            max_num_seqs: EngineConfig::default().max_num_seqs,
            max_num_batched_tokens: None,
            reasoning_parser: ReasoningParser::default(),
            tool_call_parser: ToolCallParser::default(),
            chat_template: None,
            handle_signals: false,
            hub: None,
            load_mode: LoadMode::Mmap,
            precision: Precision::default(),
            lm_head_q8: false,
            prefix_caching: true,
            prefix_cache_memory: None,
            kv_cache_memory: None,
            overrides: Overrides::default(),
            speculative_tokens: 0,
            timeouts: Timeouts::default(),
            render_worker: None,
        }
    }
}

/// Counters kept by the server itself (the engine keeps the token and latency ones).
#[derive(Default)]
pub struct ServerMetrics {
    /// Finished choices by reason: stop, length, abort.
    pub finished: [AtomicU64; 3],
    /// Requests answered with an error status.
    pub errors: AtomicU64,
    /// Whole-request latency of completed generation requests.
    pub e2e: Histogram,
    /// Generation throughput as `/v1/loads` last measured it.
    pub throughput: std::sync::Mutex<Throughput>,
}

/// The generated-token count at the last `/v1/loads` call, and the rate since the one before.
#[derive(Default)]
pub struct Throughput {
    pub last: Option<(std::time::Instant, u64)>,
    pub rate: f64,
}

impl ServerMetrics {
    fn count_finish(&self, reason: &str) {
        let i = match reason {
            "stop" => 0,
            "length" => 1,
            _ => 2,
        };
        self.finished[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts choices that never finished (their client went away) as `abort`.
    fn count_unfinished(&self, choices: &[generate::Choice]) {
        for _ in choices.iter().filter(|c| c.finish.is_none()) {
            self.count_finish("abort");
        }
    }
}

/// Everything a request handler needs; shared by all requests.
pub struct AppState {
    pub engine: Engine,
    pub tokenizer: Arc<Tokenizer>,
    /// `Err`: why there is no chat template (reported by the chat endpoint).
    pub template: std::result::Result<ChatTemplate, NoTemplate>,
    pub token_text: TokenText,
    pub served_names: Vec<String>,
    pub model_dir: PathBuf,
    pub max_model_len: usize,
    /// More text than this cannot fit in `max_model_len` tokens (the tokenizer's longest
    /// token times the context): requests beyond it are refused before they are tokenized.
    pub max_prompt_bytes: usize,
    pub vocab_size: usize,
    /// EOS ids of generation_config.json, config.json and the tokenizer's eos_token.
    pub eos_token_ids: Vec<u32>,
    /// generation_config.json's sampling settings.
    pub default_sampling: SamplingParams,
    /// generation_config.json's `max_new_tokens`.
    pub default_max_tokens: Option<usize>,
    pub api_key: Option<String>,
    pub reasoning_parser: ReasoningParser,
    pub tool_call_parser: ToolCallParser,
    pub created: u64,
    pub metrics: ServerMetrics,
    pub timeouts: Timeouts,
    /// Parsing, template rendering and tokenizing run on blocking threads, this many at a time
    /// (the cores): a flood of large requests queues there instead of stalling the runtime's
    /// threads, which answer everything else (`/health` included).
    text_work: Arc<tokio::sync::Semaphore>,
    /// Where the chat template renders when not in this process.
    renderer: Option<render_worker::RenderPool>,
}

/// What the server's memory goes to, planned at start-up: weights, per token of K/V, per
/// sequence of DeltaNet state, and the prefix cache's budget.
fn memory_plan(model: &Model, e: &EngineConfig) -> String {
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    let (weights, _) = model.weight_bytes();
    let cache = model.new_cache(1);
    let kv = crate::engine::scheduler::kv_per_token(model, e);
    let state = cache.snapshot().state_bytes();
    let speculation = if e.speculative_tokens > 0 {
        let (mtp, _) = model.mtp_bytes().unwrap_or((0, 0));
        format!(
            "; speculative decoding: {} drafts per step, MTP head {:.2} GiB, draft lm_head {:.2} GiB, \
             a second DeltaNet state per sequence",
            e.speculative_tokens,
            gib(mtp),
            gib(model.draft_head_bytes())
        )
    } else {
        String::new()
    };
    let cache = match e.prefix_cache {
        Some(b) => format!(
            "prefix cache {:.2} GiB (a snapshot every {} prompt tokens and at message ends)",
            gib(b),
            e.snapshot_interval
        ),
        None => "prefix cache off".into(),
    };
    let budget = match e.kv_cache_memory {
        Some(b) => format!(
            "K/V budget {:.2} GiB ({} tokens over all running sequences{})",
            gib(b),
            b / kv.max(1),
            if b / kv.max(1) < e.max_model_len {
                ": less than --max-model-len; longer requests are refused"
            } else {
                ""
            }
        ),
        None => "no K/V budget".into(),
    };
    format!(
        "memory plan: weights {:.2} GiB; K/V {} KiB per token ({:.2} GiB for a sequence of \
         {} tokens); DeltaNet state {:.1} MiB per sequence ({} slots); {budget}; {cache}; \
         prompt steps of up to {} tokens{speculation}",
        gib(weights),
        kv as f64 / 1024.0,
        gib(kv * e.max_model_len),
        e.max_model_len,
        state as f64 / (1u64 << 20) as f64,
        e.max_num_seqs,
        e.max_num_batched_tokens.max(e.prefill_chunk),
    )
}

/// Why chat is unavailable: the checkpoint has no template (the client should send
/// completions instead: 400), or has one that does not load (the server's fault: 500).
pub struct NoTemplate {
    pub why: String,
    pub broken: bool,
}

impl NoTemplate {
    fn of(e: &anyhow::Error) -> NoTemplate {
        let why = format!("{e:#}");
        // `ChatTemplate::from_checkpoint_dir`'s two ways of saying "there is none".
        let absent = why.contains("no chat template in") || why.contains("no chat_template field");
        NoTemplate {
            why,
            broken: !absent,
        }
    }
}

impl AppState {
    /// The chat template applied to a conversation: in a worker process where the server has
    /// them, else here. `Err` of the outer result: no template (the reason).
    pub fn render_chat(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> std::result::Result<Result<String>, &NoTemplate> {
        let template = self.template.as_ref()?;
        Ok(match &self.renderer {
            Some(pool) => pool.render(messages, tools, add_generation_prompt, extra),
            None => template.render(messages, tools, add_generation_prompt, extra),
        })
    }

    /// Loads the checkpoint of `dir` and starts the engine.
    pub fn load(cfg: &ServerConfig, dir: PathBuf) -> Result<AppState> {
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))?;
        let template = match &cfg.chat_template {
            Some(f) => Ok(ChatTemplate::from_file(f)?),
            None => ChatTemplate::from_checkpoint_dir(&dir).map_err(|e| NoTemplate::of(&e)),
        };
        if let Err(e) = &template {
            eprintln!(
                "warning: {}; chat requests will be refused (start with --chat-template FILE)",
                e.why
            );
        }
        let gen = GenerationConfig::from_dir(&dir)?;
        let mut model = Model::load_overridden(&dir, cfg.load_mode, &cfg.overrides)?;
        model.precision = cfg.precision;
        if cfg.lm_head_q8 {
            model.quantize_lm_head();
        }
        let ctx = model.cfg.context_length();
        let max_model_len = cfg.max_model_len.unwrap_or(ctx);
        if max_model_len < 2 || max_model_len > ctx {
            bail!(
                "--max-model-len {max_model_len} must be between 2 and the model's context \
                 length {ctx}"
            );
        }
        if cfg.max_num_seqs == 0 {
            bail!("--max-num-seqs must be at least 1");
        }
        check_speculative_tokens(&model, cfg.speculative_tokens)?;
        if cfg.speculative_tokens > 0 {
            model.quantize_draft_head();
        }
        let mut eos = gen.eos_token_ids.clone();
        eos.extend(&model.cfg.eos_token_ids);
        if let Some(id) = template
            .as_ref()
            .ok()
            .and_then(|t| t.eos_token())
            .and_then(|t| tokenizer.token_to_id(t))
        {
            eos.push(id);
        }
        eos.sort_unstable();
        eos.dedup();
        let vocab_size = model.cfg.vocab_size;
        // Ids the tokenizer or the generation defaults name must exist in the embedding: a
        // prompt or stop id beyond it would fail every request that meets it.
        if tokenizer.vocab_size() > vocab_size {
            bail!(
                "{}: {} tokens, more than the model's vocabulary (config.json vocab_size {})",
                tokenizer.path().display(),
                tokenizer.vocab_size(),
                vocab_size
            );
        }
        if let Some(bad) = gen
            .eos_token_ids
            .iter()
            .find(|&&id| id as usize >= vocab_size)
        {
            bail!(
                "{}: eos_token_id {bad} is outside the vocabulary ({vocab_size} entries)",
                dir.join("generation_config.json").display()
            );
        }
        let default_sampling = gen.sampling_params();
        default_sampling
            .validate()
            .context("the sampling defaults of generation_config.json")?;
        let prefix_cache = cfg.prefix_caching.then(|| {
            cfg.prefix_cache_memory
                .unwrap_or_else(default_prefix_cache_bytes)
        });
        // Whatever memory is left once the weights are in, less the prefix cache's budget,
        // the sequences' DeltaNet states and 10 % for everything else.
        let kv_cache_memory = cfg.kv_cache_memory.or_else(|| {
            let available = crate::procfs::kb_field("/proc/meminfo", "MemAvailable:")? as usize;
            // A drafting sequence keeps a second DeltaNet state (`cache::rollback`).
            let per_seq =
                model.new_cache(1).bytes() * if cfg.speculative_tokens > 0 { 2 } else { 1 };
            let states = cfg.max_num_seqs * per_seq;
            Some((available.saturating_sub(prefix_cache.unwrap_or(0) + states)) / 10 * 9)
        });
        let engine_cfg = EngineConfig {
            max_num_seqs: cfg.max_num_seqs,
            max_model_len,
            markers: chat_markers(&tokenizer),
            prefix_cache,
            kv_cache_memory,
            speculative_tokens: cfg.speculative_tokens,
            max_num_batched_tokens: cfg
                .max_num_batched_tokens
                .unwrap_or_else(|| EngineConfig::batched_tokens_for(&model.cfg)),
            ..EngineConfig::default()
        };
        eprintln!("{}", memory_plan(&model, &engine_cfg));
        let family = model.cfg.family;
        let engine = Engine::start(Arc::new(model), engine_cfg);
        let served_names = if cfg.served_model_name.is_empty() {
            vec![cfg.model.clone()]
        } else {
            cfg.served_model_name.clone()
        };
        let max_prompt_bytes = max_model_len.saturating_mul(tokenizer.max_token_bytes());
        let mut template = template;
        let renderer = match (&template, &cfg.render_worker) {
            (Ok(_), Some(program)) => {
                let mut args = vec!["render-worker".to_owned(), "--dir".to_owned()];
                args.push(dir.display().to_string());
                if let Some(f) = &cfg.chat_template {
                    args.extend(["--chat-template".to_owned(), f.display().to_string()]);
                }
                args.extend([
                    "--max-output".to_owned(),
                    max_prompt_bytes.to_string(),
                    "--memory".to_owned(),
                    render_worker::WORKER_MEMORY.to_string(),
                ]);
                Some(render_worker::RenderPool::start(
                    render_worker::WorkerCommand {
                        program: program.clone(),
                        args,
                    },
                )?)
            }
            _ => None,
        };
        if let Ok(t) = &mut template {
            // Text longer than this cannot fit the context; rendering stops there.
            t.set_limits(RenderLimits {
                max_output_bytes: max_prompt_bytes,
                ..RenderLimits::default()
            });
            let probe = serde_json::json!([
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello."}
            ]);
            if let Err(e) = t.render(&probe, None, true, &serde_json::Map::new()) {
                eprintln!("warning: the chat template fails on a system and a user message: {e:#}");
            }
        }
        Ok(AppState {
            engine,
            token_text: TokenText::new(&tokenizer),
            tokenizer: Arc::new(tokenizer),
            template,
            served_names,
            model_dir: dir,
            max_model_len,
            max_prompt_bytes,
            vocab_size,
            eos_token_ids: eos,
            default_sampling,
            default_max_tokens: gen.max_new_tokens,
            api_key: cfg.api_key.clone(),
            reasoning_parser: cfg.reasoning_parser,
            tool_call_parser: cfg.tool_call_parser.for_family(family),
            created: unix_time(),
            metrics: ServerMetrics::default(),
            timeouts: cfg.timeouts,
            text_work: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
            renderer,
        })
    }

    /// The name responses report.
    pub fn model_name(&self) -> &str {
        self.served_names.first().map_or("", String::as_str)
    }

    /// Checks the request's `model` (optional, as in vLLM) against the served names.
    /// Refuses, before tokenizing, a `param` whose text (`bytes`, all its strings together)
    /// could not fit in the context whatever its tokens.
    pub fn check_text_bytes(&self, bytes: usize, param: &str) -> error::ApiResult<()> {
        if bytes > self.max_prompt_bytes {
            return Err(ApiError::invalid(
                param,
                format!(
                    "'{param}' holds {bytes} bytes of text, more than {} tokens of context can hold \
                     (at most {} bytes); shorten it",
                    self.max_model_len, self.max_prompt_bytes
                ),
            ));
        }
        Ok(())
    }

    pub fn check_model(&self, body: &params::Body) -> error::ApiResult<()> {
        match body.str("model")? {
            None => Ok(()),
            Some(m) if self.served_names.iter().any(|n| n == m) => Ok(()),
            Some(m) => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!(
                    "The model `{m}` does not exist. This server serves: {}",
                    self.served_names.join(", ")
                ),
            )
            .with_param("model")),
        }
    }

    /// Token budget of a choice: the request's `max_tokens` (which must fit in the context
    /// with the prompt, as vLLM requires), else the checkpoint's default, else the rest of the
    /// context.
    pub fn max_tokens_for(
        &self,
        prompt_len: usize,
        asked: Option<usize>,
        asked_param: &str,
        prompt_param: &str,
    ) -> error::ApiResult<usize> {
        if prompt_len == 0 {
            return Err(ApiError::invalid(prompt_param, "the prompt is empty"));
        }
        if prompt_len >= self.max_model_len {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "context_length_exceeded",
                format!(
                    "This model's maximum context length is {} tokens. However, your prompt \
                     has {prompt_len} tokens, which leaves no room for output.",
                    self.max_model_len
                ),
            )
            .with_param(prompt_param));
        }
        let room = self.max_model_len - prompt_len;
        // What one sequence may hold within the K/V budget.
        let capacity = self.engine.kv_capacity();
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        let kv_exceeded = |total: usize| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "kv_cache_exceeded",
                format!(
                    "{total} tokens ({prompt_len} in the prompt) need {:.2} GiB of K/V cache, \
                     but this server holds at most {capacity} tokens per sequence ({:.2} GiB, \
                     --kv-cache-memory). Please reduce the prompt or '{asked_param}'.",
                    gib(self.engine.kv_bytes(total)),
                    gib(self.engine.config.kv_cache_memory.unwrap_or(0)),
                ),
            )
        };
        if prompt_len >= capacity {
            return Err(kv_exceeded(prompt_len + 1).with_param(prompt_param));
        }
        match asked {
            Some(m) if m > room => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "context_length_exceeded",
                format!(
                    "This model's maximum context length is {} tokens. However, you requested \
                     {} tokens ({prompt_len} in the prompt, {m} in the completion). Please \
                     reduce the prompt or '{asked_param}'.",
                    self.max_model_len,
                    prompt_len.saturating_add(m)
                ),
            )
            .with_param(asked_param)),
            Some(m) if prompt_len + m > capacity => {
                Err(kv_exceeded(prompt_len + m).with_param(asked_param))
            }
            Some(m) => Ok(m),
            // Unasked, the output may fill the context or the K/V budget, whichever is less.
            None => Ok(self
                .default_max_tokens
                .unwrap_or(room)
                .clamp(1, room.min(capacity - prompt_len))),
        }
    }
}

/// A running server.
pub struct ServerHandle {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
    state: Arc<AppState>,
}

impl ServerHandle {
    /// The bound address (the real port when the configured one was 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://HOST:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The shared state (engine, tokenizer, …), e.g. for leak checks in tests.
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Stops accepting connections, waits a few seconds for running requests, then returns.
    pub fn shutdown(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        self.join()
    }

    /// Blocks until the server stops (a signal with `handle_signals`, or an error).
    pub fn wait(mut self) -> Result<()> {
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        let _ = self.join();
    }
}

/// Resolves and loads the model, binds `host:port` and serves in the background.
pub fn start(cfg: ServerConfig) -> Result<ServerHandle> {
    let env = cfg.hub.clone().unwrap_or_else(hub::HubEnv::from_env);
    let dir = hub::resolve_model(&cfg.model, &env)?;
    let state = Arc::new(AppState::load(&cfg, dir)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // Requests are I/O and light text work; the model runs on its own threads.
        .worker_threads(
            std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .clamp(2, 4),
        )
        .thread_name("qnext-http")
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port)))
        .with_context(|| format!("cannot listen on {}:{}", cfg.host, cfg.port))?;
    let addr = listener.local_addr()?;
    let (stop, stop_rx) = watch::channel(false);
    let app = router(state.clone());
    let signal_stop = stop.clone();
    let handle_signals = cfg.handle_signals;
    let timeouts = cfg.timeouts;
    let thread = std::thread::Builder::new()
        .name("qnext-server".into())
        .spawn(move || -> Result<()> {
            let result = runtime.block_on(async move {
                if handle_signals {
                    tokio::spawn(async move {
                        wait_for_signal().await;
                        let _ = signal_stop.send(true);
                    });
                }
                listener::serve(listener, app, timeouts, stop_rx, SHUTDOWN_GRACE).await;
                Ok(())
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
            result
        })
        .context("spawning the server thread")?;
    Ok(ServerHandle {
        addr,
        stop,
        thread: Some(thread),
        state,
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The routes, for serving on a listener of one's own.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat::handle))
        .route("/v1/completions", post(completions::handle))
        .route("/v1/models", get(misc::models))
        .route("/v1/models/{*id}", get(misc::model))
        .route("/health", get(misc::health))
        .route("/metrics", get(misc::metrics))
        .route("/version", get(misc::version))
        .route("/tokenize", post(misc::tokenize))
        .route("/detokenize", post(misc::detokenize))
        .route("/v1/chat/completions/render", post(router_api::render_chat))
        .route(
            "/v1/completions/render",
            post(router_api::render_completions),
        )
        .route("/get_load", get(router_api::get_load))
        .route("/v1/loads", get(router_api::loads))
        .route("/loads", get(router_api::loads))
        .route("/flush_cache", post(router_api::flush_cache))
        .route("/reset_prefix_cache", post(router_api::flush_cache))
        .route("/get_model_info", get(router_api::model_info))
        .route("/get_server_info", get(router_api::server_info))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            listener::body_deadline,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Paths open without the API key: health, version and the read-only load reports that
/// monitors and routers poll. Everything else, `/tokenize` and `/flush_cache` included,
/// needs the key when one is set.
const OPEN_PATHS: [&str; 8] = [
    "/health",
    "/metrics",
    "/version",
    "/get_load",
    "/loads",
    "/v1/loads",
    "/get_model_info",
    "/get_server_info",
];

async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        if !OPEN_PATHS.contains(&req.uri().path()) {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
                st.metrics.errors.fetch_add(1, Ordering::Relaxed);
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_api_key",
                    "Missing or incorrect API key: send 'Authorization: Bearer <key>'",
                )
                .into_response();
            }
        }
    }
    let resp = next.run(req).await;
    if resp.status().is_client_error() || resp.status().is_server_error() {
        st.metrics.errors.fetch_add(1, Ordering::Relaxed);
    }
    resp
}

/// Compares without an early exit, so the time taken does not reveal the key's prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// The body of a POST, or the error that reading it gave (too large, …).
pub(crate) fn read_body(
    body: std::result::Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> error::ApiResult<params::Body> {
    match body {
        Ok(bytes) => params::Body::parse(&bytes),
        Err(rej) => Err(ApiError::new(
            rej.status(),
            "invalid_body",
            format!("cannot read the request body: {}", rej.body_text()),
        )),
    }
}

/// Runs `work` (request parsing, template rendering, tokenizing: milliseconds to seconds for
/// the largest bodies) on a blocking thread once one of the state's permits is free.
pub(crate) async fn off_runtime<T: Send + 'static>(
    st: &AppState,
    work: impl FnOnce() -> T + Send + 'static,
) -> error::ApiResult<T> {
    let permit = st
        .text_work
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::internal("the server is shutting down"))?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work()
    })
    .await
    .map_err(|e| ApiError::internal(format!("preparing the request failed: {e}")))
}

pub(crate) fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A random id suffix (`chatcmpl-<32 hex>`): unique enough to tell requests apart.
pub(crate) fn random_hex() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut out = String::with_capacity(32);
    for _ in 0..2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}
