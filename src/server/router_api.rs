//! What request routers and endpoint pickers ask a model server besides the OpenAI API:
//! `vllm-router` (render endpoints for its cache-aware policy, `/get_load` for
//! power-of-two), `smg` (`/v1/loads`, or vLLM's gauges in `/metrics`), both (`/flush_cache`,
//! `/get_model_info`, `/get_server_info`). Each answers from the engine's real state.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::{ApiError, ApiResult};
use super::misc;
use super::{chat, completions, read_body, AppState};

/// The token ids a chat request's prompt becomes (`POST /v1/chat/completions/render`), as
/// vLLM renders it: template, tools and all, exactly what generation would be fed. A router
/// matches these against what each replica has seen.
pub async fn render_chat(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = move |st: &AppState| -> ApiResult<Value> {
        let body = read_body(body)?;
        st.check_model(&body)?;
        let rendered = chat::render(st, &body)?;
        let ids = misc::encode(st, &rendered.text, false, "messages")?;
        Ok(json!({"token_ids": ids}))
    };
    misc::reply_from(&st, run).await
}

/// The same for a completion request (`POST /v1/completions/render`): one entry per prompt.
pub async fn render_completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = move |st: &AppState| -> ApiResult<Value> {
        let body = read_body(body)?;
        st.check_model(&body)?;
        let prompts = completions::prompts(st, &body)?;
        Ok(Value::Array(
            prompts
                .into_iter()
                .map(|(ids, _)| json!({"token_ids": ids}))
                .collect(),
        ))
    };
    misc::reply_from(&st, run).await
}

fn running(st: &AppState) -> usize {
    st.engine.stats.running.load(Ordering::Relaxed)
}

fn waiting(st: &AppState) -> usize {
    st.engine.stats.queued.load(Ordering::Relaxed)
}

/// `GET /get_load` (SGLang's, as vllm-router's power-of-two policy reads it): requests
/// running and waiting.
pub async fn get_load(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"load": running(&st) + waiting(&st)}))
}

/// Generated tokens per second since the previous call (smg polls every few seconds); the
/// last rate again when calls come closer than a second apart.
fn gen_throughput(st: &AppState) -> f64 {
    let tokens = st.engine.stats.generated_tokens.load(Ordering::Relaxed);
    let now = Instant::now();
    let mut t = st
        .metrics
        .throughput
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some((at, before)) = t.last {
        let dt = now.duration_since(at).as_secs_f64();
        if dt < 1.0 {
            return t.rate;
        }
        t.rate = tokens.saturating_sub(before) as f64 / dt;
    }
    t.last = Some((now, tokens));
    t.rate
}

/// `GET /v1/loads` and `/loads` (smg's native load report; schema of its
/// `protocols::worker` loads response): one data-parallel rank.
pub async fn loads(State(st): State<Arc<AppState>>) -> Json<Value> {
    let s = &st.engine.stats;
    let kv_tokens = st.engine.kv_capacity().min(usize::MAX / 2);
    let used = (misc::kv_usage(&st) * kv_tokens as f64) as usize;
    let queries = s.prefix_queries.load(Ordering::Relaxed);
    let hits = s.prefix_hits.load(Ordering::Relaxed);
    Json(json!({
        "timestamp": "",
        "version": env!("CARGO_PKG_VERSION"),
        "dp_rank_count": 1,
        "loads": [{
            "dp_rank": 0,
            "num_running_reqs": running(&st),
            "num_waiting_reqs": waiting(&st),
            "num_used_tokens": used,
            "max_total_num_tokens": kv_tokens,
            "token_usage": misc::kv_usage(&st),
            "gen_throughput": gen_throughput(&st),
            "cache_hit_rate": if queries == 0 { 0.0 } else { hits as f64 / queries as f64 },
            "max_running_requests": st.engine.config.max_num_seqs,
        }],
    }))
}

/// `POST /flush_cache` (SGLang) and `/reset_prefix_cache` (vLLM): empties the prefix cache.
/// Requests that are running keep what they use.
pub async fn flush_cache(State(st): State<Arc<AppState>>) -> Response {
    let engine = st.engine.clone();
    match tokio::task::spawn_blocking(move || engine.flush_prefix_cache()).await {
        Ok(Some(n)) => format!("Cache flushed: {n} snapshots dropped.\n").into_response(),
        _ => ApiError::internal("the engine has stopped").into_response(),
    }
}

/// `GET /get_model_info` (SGLang's fields).
pub async fn model_info(State(st): State<Arc<AppState>>) -> Json<Value> {
    let dir = st.model_dir.display().to_string();
    Json(json!({
        "model_path": dir,
        "tokenizer_path": dir,
        "is_generation": true,
        "model_type": "qwen3_next",
        "architectures": ["Qwen3NextForCausalLM"],
        "has_image_understanding": false,
    }))
}

/// `GET /get_server_info` (the SGLang fields a router reads).
pub async fn server_info(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "model_path": st.model_dir.display().to_string(),
        "served_model_name": st.model_name(),
        "context_length": st.max_model_len,
        "max_running_requests": st.engine.config.max_num_seqs,
        "max_total_num_tokens": st.engine.kv_capacity().min(usize::MAX / 2),
        "tp_size": 1,
        "dp_size": 1,
        "is_embedding": false,
        "version": env!("CARGO_PKG_VERSION"),
    }))
}
