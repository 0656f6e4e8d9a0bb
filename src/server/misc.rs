//! The small endpoints: models, health, version, metrics, tokenize, detokenize.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::{ApiError, ApiResult};
use super::{chat, params, read_body, AppState};
use crate::engine::stats::{HistState, BUCKETS};

fn model_card(st: &AppState, name: &str) -> Value {
    json!({
        "id": name,
        "object": "model",
        "created": st.created,
        "owned_by": "qnext",
        "root": st.model_dir.display().to_string(),
        "parent": null,
        "max_model_len": st.max_model_len,
    })
}

pub async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = st.served_names.iter().map(|n| model_card(&st, n)).collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn model(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match st.served_names.iter().find(|n| **n == id) {
        Some(n) => Json(model_card(&st, n)).into_response(),
        None => ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "model_not_found",
            format!("The model `{id}` does not exist."),
        )
        .with_param("model")
        .into_response(),
    }
}

pub async fn health() -> &'static str {
    ""
}

pub async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

/// Prometheus text format, with vLLM's metric names under `qnext:`.
pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let s = &st.engine.stats;
    let model = escape_label(st.model_name());
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(out, "# HELP qnext:{name} {help}");
        let _ = writeln!(out, "# TYPE qnext:{name} {kind}");
        let _ = writeln!(out, "qnext:{name}{{model_name=\"{model}\"}} {value}");
    };
    let max = st.engine.config.max_num_seqs;
    let free = s.free_slots.load(Ordering::Relaxed);
    metric(
        "num_requests_running",
        "gauge",
        "Number of requests in the running batch.",
        s.running.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "num_requests_waiting",
        "gauge",
        "Number of requests waiting for a slot.",
        s.queued.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "num_free_slots",
        "gauge",
        "Sequence slots (caches) not in use.",
        free.to_string(),
    );
    metric(
        "kv_cache_usage_perc",
        "gauge",
        "Fraction of the K/V budget the running sequences reserved (of the slots in use, \
         without a budget; 1 = all).",
        match st.engine.config.kv_cache_memory {
            Some(b) => format!(
                "{}",
                s.kv_reserved.load(Ordering::Relaxed) as f64 / b.max(1) as f64
            ),
            None => format!("{}", (max.saturating_sub(free)) as f64 / max.max(1) as f64),
        },
    );
    metric(
        "request_total",
        "counter",
        "Generation requests submitted to the engine (one per choice).",
        s.requests_total.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens processed.",
        s.prompt_tokens.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "generation_tokens_total",
        "counter",
        "Tokens generated.",
        s.generated_tokens.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "prefix_cache_queries_total",
        "counter",
        "Prompt tokens looked up in the prefix cache.",
        s.prefix_queries.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "prefix_cache_hits_total",
        "counter",
        "Prompt tokens found in the prefix cache (not computed).",
        s.prefix_hits.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "prefix_cache_bytes",
        "gauge",
        "Bytes the prefix cache holds (DeltaNet states and distinct K/V blocks).",
        s.prefix_bytes.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "prefix_cache_snapshots",
        "gauge",
        "Sequence states the prefix cache holds.",
        s.prefix_snapshots.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "prefix_cache_evictions_total",
        "counter",
        "Sequence states evicted from the prefix cache.",
        s.prefix_evictions.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "prefix_cache_warm_tokens_total",
        "counter",
        "Tokens of conversations computed ahead of their next request.",
        s.warm_tokens.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "request_errors_total",
        "counter",
        "HTTP requests answered with an error status.",
        st.metrics.errors.load(Ordering::Relaxed).to_string(),
    );
    let _ = writeln!(
        out,
        "# HELP qnext:request_success_total Finished choices by finish reason.\n\
         # TYPE qnext:request_success_total counter"
    );
    for (i, reason) in ["stop", "length", "abort"].iter().enumerate() {
        let _ = writeln!(
            out,
            "qnext:request_success_total{{model_name=\"{model}\",finished_reason=\"{reason}\"}} {}",
            st.metrics.finished[i].load(Ordering::Relaxed)
        );
    }
    histogram(
        &mut out,
        "time_to_first_token_seconds",
        "Time from submission to the first generated token.",
        &model,
        &s.ttft.snapshot(),
    );
    histogram(
        &mut out,
        "inter_token_latency_seconds",
        "Time between consecutive generated tokens of a sequence.",
        &model,
        &s.itl.snapshot(),
    );
    histogram(
        &mut out,
        "e2e_request_latency_seconds",
        "Time from receiving a generation request to its last byte.",
        &model,
        &st.metrics.e2e.snapshot(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

fn histogram(out: &mut String, name: &str, help: &str, model: &str, h: &HistState) {
    let _ = writeln!(out, "# HELP qnext:{name} {help}");
    let _ = writeln!(out, "# TYPE qnext:{name} histogram");
    let mut cumulative = 0;
    for (bound, count) in BUCKETS.iter().zip(h.counts.iter()) {
        cumulative += count;
        let _ = writeln!(
            out,
            "qnext:{name}_bucket{{model_name=\"{model}\",le=\"{bound}\"}} {cumulative}"
        );
    }
    let _ = writeln!(
        out,
        "qnext:{name}_bucket{{model_name=\"{model}\",le=\"+Inf\"}} {}",
        h.count
    );
    let _ = writeln!(out, "qnext:{name}_sum{{model_name=\"{model}\"}} {}", h.sum);
    let _ = writeln!(
        out,
        "qnext:{name}_count{{model_name=\"{model}\"}} {}",
        h.count
    );
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// vLLM's `/tokenize`: a `prompt`, or chat `messages` rendered through the chat template.
pub async fn tokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match tokenize_inner(&st, body) {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

fn tokenize_inner(st: &AppState, body: Result<Bytes, BytesRejection>) -> ApiResult<Value> {
    let body = read_body(body)?;
    st.check_model(&body)?;
    let tokens = if body.has("messages") {
        let add_special = body.bool("add_special_tokens")?.unwrap_or(false);
        let prompt = chat::render(st, &body)?.text;
        encode(st, &prompt, add_special, "messages")?
    } else if let Some(v) = body.get("prompt") {
        let add_special = body.bool("add_special_tokens")?.unwrap_or(true);
        let text = v
            .as_str()
            .ok_or_else(|| ApiError::wrong_type("prompt", "a string", v))?;
        encode(st, text, add_special, "prompt")?
    } else {
        return Err(ApiError::missing("prompt"));
    };
    let mut out = json!({
        "count": tokens.len(),
        "max_model_len": st.max_model_len,
        "tokens": tokens,
    });
    if body.bool("return_token_strs")?.unwrap_or(false) {
        let strs: Vec<String> = tokens
            .iter()
            .map(|&t| st.tokenizer.id_to_token(t).unwrap_or_default())
            .collect();
        out["token_strs"] = json!(strs);
    }
    Ok(out)
}

pub fn encode(st: &AppState, text: &str, add_special: bool, param: &str) -> ApiResult<Vec<u32>> {
    st.tokenizer
        .encode(text, add_special)
        .map_err(|e| ApiError::invalid(param, format!("cannot tokenize: {e:#}")))
}

/// vLLM's `/detokenize`: `tokens` → `prompt`.
pub async fn detokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = || -> ApiResult<Value> {
        let body = read_body(body)?;
        st.check_model(&body)?;
        let v = body
            .get("tokens")
            .ok_or_else(|| ApiError::missing("tokens"))?;
        let items = v
            .as_array()
            .ok_or_else(|| ApiError::wrong_type("tokens", "an array of token ids", v))?;
        let ids = items
            .iter()
            .enumerate()
            .map(|(i, t)| params::token_id(t, &format!("tokens[{i}]"), st.vocab_size))
            .collect::<ApiResult<Vec<u32>>>()?;
        let text = st
            .tokenizer
            .decode(&ids, false)
            .map_err(|e| ApiError::invalid("tokens", format!("{e:#}")))?;
        Ok(json!({"prompt": text}))
    };
    match run() {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
