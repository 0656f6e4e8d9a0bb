//! `qnext serve`: the OpenAI-compatible server, with vLLM's flag names.

use anyhow::{bail, Result};
use clap::{Args as ClapArgs, ValueEnum};
use qnext::server::{self, ReasoningParser, ServerConfig, ToolCallParser};
use std::path::PathBuf;

#[derive(Clone, Copy, ValueEnum)]
enum Reasoning {
    /// `<think>…</think>` → `reasoning_content` (Qwen3-Next-Thinking).
    #[value(name = "deepseek_r1")]
    DeepseekR1,
    /// As deepseek_r1, also ended by `<tool_call>`, and all content when thinking is off
    /// (Qwen3.5 / 3.6).
    Qwen3,
    None,
}

#[derive(Clone, Copy, ValueEnum)]
enum ToolParser {
    /// The model's own: hermes for Qwen3-Next, qwen3_coder for Qwen3.5 / 3.6.
    Auto,
    /// `<tool_call>{json}</tool_call>` → `tool_calls` (Qwen3-Next).
    Hermes,
    /// `<tool_call><function=…><parameter=…>` → `tool_calls` (Qwen3.5 / 3.6).
    #[value(name = "qwen3_coder")]
    Qwen3Coder,
    None,
}

#[derive(ClapArgs)]
pub struct Args {
    /// Checkpoint folder or Hugging Face repo id (looked up in the Hugging Face cache).
    /// Default: the bundled model, models/qnext-tiny, served as `qnext-tiny`.
    model: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Model name(s) clients use in `model` (default: MODEL as given).
    #[arg(long, num_args = 1..)]
    served_model_name: Vec<String>,
    /// Require `Authorization: Bearer KEY` (all but health, metrics, version and load reports).
    #[arg(long)]
    api_key: Option<String>,
    /// Prompt + output tokens of one request at most (default: the model's context length).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Sequences generated together at most; more requests wait.
    #[arg(long, default_value_t = 8)]
    max_num_seqs: usize,
    /// Prompt tokens one step processes at most while no sequence is generating (whole
    /// pieces between the prompt's cuts; with others generating, 256, so that their streams
    /// keep flowing). Longer steps read each expert once for more tokens: with 512 experts a
    /// cold 8K-token chat took 15.4 s in steps of up to 2048 against 18.5 s in steps of 256
    /// (BENCHMARKS.md). Default: enough for each expert to see about 64 tokens, from 256 to
    /// 2048 (2048 for Qwen3-Next).
    #[arg(long)]
    max_num_batched_tokens: Option<usize>,
    #[arg(long, value_enum, default_value = "none")]
    reasoning_parser: Reasoning,
    #[arg(long, value_enum, default_value = "auto")]
    tool_call_parser: ToolParser,
    /// Chat template replacing the checkpoint's (.jinja, or JSON with `chat_template`).
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Keep the states of prompts so that requests sharing a prefix with an earlier one (the
    /// next turn of a chat, an agent's next step, a shared system prompt) compute only the
    /// rest; `--no-enable-prefix-caching` turns it off. Outputs are the same either way.
    #[arg(
        long,
        default_value_t = true,
        overrides_with = "no_enable_prefix_caching"
    )]
    enable_prefix_caching: bool,
    #[arg(long, hide = true, overrides_with = "enable_prefix_caching")]
    no_enable_prefix_caching: bool,
    /// Memory the prefix cache may hold, e.g. `4GiB`, `512MiB` (default: a quarter of the
    /// memory available at start-up, at most 8 GiB).
    #[arg(long, value_parser = parse_bytes)]
    prefix_cache_memory: Option<usize>,
    /// Memory for the K/V cache of the running sequences together, e.g. `16GiB`: a request
    /// is admitted when what its prompt and max_tokens can need fits, and refused (400) if
    /// it never could (default: the memory available once the model is loaded, less the
    /// prefix cache's budget and 10 %).
    #[arg(long, value_parser = parse_bytes)]
    kv_cache_memory: Option<usize>,
    /// JSON merged into the checkpoint's config.json, as vLLM's (objects key by key), e.g.
    /// `{"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
    /// "original_max_position_embeddings": 262144}}` for contexts beyond 262,144 tokens.
    #[arg(long, value_parser = parse_object)]
    hf_overrides: Option<serde_json::Map<String, serde_json::Value>>,
    /// JSON of a `rope_scaling` to use instead of the checkpoint's, e.g.
    /// `{"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":262144}`: YaRN
    /// then allows the original context times the factor (use it only for contexts that need
    /// it: static YaRN costs some quality on short texts).
    #[arg(long, value_parser = parse_object)]
    rope_scaling: Option<serde_json::Map<String, serde_json::Value>>,
    /// Speculative decoding: draft this many tokens per decode step with the checkpoint's MTP
    /// head and verify them in one step of the model (output unchanged; 0: off).
    #[arg(long, default_value_t = 0)]
    speculative_tokens: usize,
    /// vLLM's spelling of the same, e.g. `{"method":"qwen3_next_mtp","num_speculative_tokens":2}`
    /// (method `qwen3_next_mtp` or `mtp`).
    #[arg(long, value_parser = parse_object)]
    speculative_config: Option<serde_json::Map<String, serde_json::Value>>,
    /// Seconds a connection may take to send a request's headers, from connecting or from
    /// its previous response; idle keep-alive connections close after this (uvicorn's and
    /// vLLM's 5 s by default).
    #[arg(long, default_value_t = 5.0, value_parser = parse_seconds)]
    timeout_keep_alive: f64,
    /// Seconds a request's body may take to arrive after its headers (408 after that).
    #[arg(long, default_value_t = 60.0, value_parser = parse_seconds)]
    timeout_request_body: f64,
    #[command(flatten)]
    load: super::LoadArg,
    #[command(flatten)]
    precision: super::PrecisionArg,
}

/// Drafts per step from `--speculative-tokens` and `--speculative-config`.
fn speculative_tokens(a: &Args) -> Result<usize> {
    let Some(c) = &a.speculative_config else {
        return Ok(a.speculative_tokens);
    };
    for key in c.keys() {
        if key != "method" && key != "num_speculative_tokens" {
            bail!("--speculative-config: unsupported key {key:?} (supported: method, num_speculative_tokens)");
        }
    }
    match c.get("method").and_then(|m| m.as_str()) {
        Some("qwen3_next_mtp" | "mtp") | None => {}
        Some(m) => {
            bail!("--speculative-config: method {m:?} is not supported (qwen3_next_mtp, mtp)")
        }
    }
    let Some(k) = c.get("num_speculative_tokens").and_then(|k| k.as_u64()) else {
        bail!("--speculative-config: num_speculative_tokens must be a non-negative integer");
    };
    let k = k as usize;
    if a.speculative_tokens != 0 && a.speculative_tokens != k {
        bail!(
            "--speculative-tokens {} and --speculative-config's num_speculative_tokens {k} disagree",
            a.speculative_tokens
        );
    }
    Ok(k)
}

fn parse_object(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(other) => Err(format!("expected a JSON object, got {other}")),
        Err(e) => Err(format!("not valid JSON: {e}")),
    }
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x > 0.0 && x <= 86_400.0 => Ok(x),
        Ok(x) => Err(format!(
            "{x} s: give a number of seconds above 0 and at most 86400"
        )),
        Err(e) => Err(format!("not a number of seconds: {e}")),
    }
}

fn parse_bytes(s: &str) -> Result<usize, String> {
    s.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64() as usize)
        .map_err(|e| format!("not a size such as 4GiB or 512MiB: {e}"))
}

pub fn main(a: Args, verbose: bool) -> Result<()> {
    let filter = if verbose { "info" } else { "warn" };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let speculative_tokens = speculative_tokens(&a)?;
    let (model, served_model_name) = match a.model {
        Some(m) => (m, a.served_model_name),
        None => {
            let dir = super::bundled::model_dir(None)?;
            let names = if a.served_model_name.is_empty() {
                vec![super::bundled::NAME.to_string()]
            } else {
                a.served_model_name
            };
            (dir.display().to_string(), names)
        }
    };
    if a.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        anyhow::bail!(
            "--api-key is empty: no client could send it; give a key or leave the flag out"
        );
    }
    let cfg = ServerConfig {
        speculative_tokens,
        model,
        host: a.host,
        port: a.port,
        served_model_name,
        api_key: a.api_key,
        max_model_len: a.max_model_len,
        max_num_seqs: a.max_num_seqs,
        max_num_batched_tokens: a.max_num_batched_tokens,
        reasoning_parser: match a.reasoning_parser {
            Reasoning::DeepseekR1 => ReasoningParser::DeepseekR1,
            Reasoning::Qwen3 => ReasoningParser::Qwen3,
            Reasoning::None => ReasoningParser::None,
        },
        tool_call_parser: match a.tool_call_parser {
            ToolParser::Auto => ToolCallParser::Auto,
            ToolParser::Hermes => ToolCallParser::Hermes,
            ToolParser::Qwen3Coder => ToolCallParser::Qwen3Coder,
            ToolParser::None => ToolCallParser::None,
        },
        chat_template: a.chat_template,
        handle_signals: true,
        hub: None,
        load_mode: a.load.mode(),
        precision: a.precision.precision(),
        lm_head_q8: a.precision.lm_head == super::LmHeadChoice::Q8,
        prefix_caching: a.enable_prefix_caching && !a.no_enable_prefix_caching,
        prefix_cache_memory: a.prefix_cache_memory,
        kv_cache_memory: a.kv_cache_memory,
        overrides: qnext::config::Overrides {
            hf: a.hf_overrides,
            rope_scaling: a.rope_scaling,
        },
        // Chat templates render in child processes of this executable, memory-bounded.
        render_worker: std::env::current_exe().ok(),
        timeouts: server::Timeouts {
            keep_alive: std::time::Duration::from_secs_f64(a.timeout_keep_alive),
            request_body: std::time::Duration::from_secs_f64(a.timeout_request_body),
        },
    };
    let handle = server::start(cfg)?;
    if verbose {
        let st = handle.state();
        eprintln!(
            "model {} from {}: max_model_len {}, max_num_seqs {}, RSS {:.1} MB",
            st.model_name(),
            st.model_dir.display(),
            st.max_model_len,
            st.engine.config.max_num_seqs,
            super::rss_bytes().unwrap_or(0) as f64 / 1e6
        );
    }
    eprintln!("qnext serve: listening on {}", handle.url());
    handle.wait()
}
