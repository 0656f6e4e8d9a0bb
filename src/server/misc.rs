//! The small endpoints: models, health, version, metrics, tokenize, detokenize.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use prometheus_client::encoding::text::encode as encode_text;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
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

/// A histogram of the engine's, as prometheus-client encodes one.
#[derive(Debug)]
struct Buckets(HistState);

impl EncodeMetric for Buckets {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        // Per-bucket counts (the encoder sums them up), the last bucket (f64::MAX, written
        // as +Inf) holding what lies above the largest bound.
        let finite: u64 = self.0.counts.iter().sum();
        let buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .copied()
            .zip(self.0.counts.iter().copied())
            .chain([(f64::MAX, self.0.count - finite)])
            .collect();
        encoder.encode_histogram::<NoLabelSet>(self.0.sum, self.0.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// OpenMetrics text (prometheus-client), with vLLM's metric names under `qnext:`, each
/// labelled with the model name.
pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let s = &st.engine.stats;
    let mut reg = Registry::with_labels(
        [(
            Cow::Borrowed("model_name"),
            Cow::Owned(st.model_name().to_owned()),
        )]
        .into_iter(),
    );
    let load = |a: &AtomicUsize| a.load(Ordering::Relaxed) as i64;
    let count = |a: &AtomicU64| ConstCounter::new(a.load(Ordering::Relaxed));
    let free = s.free_slots.load(Ordering::Relaxed);
    let gauges: [(&str, &str, i64); 6] = [
        (
            "num_requests_running",
            "Number of requests in the running batch",
            load(&s.running),
        ),
        (
            "num_requests_waiting",
            "Number of requests waiting for a slot",
            load(&s.queued),
        ),
        (
            "num_free_slots",
            "Sequence slots (caches) not in use",
            free as i64,
        ),
        (
            "prefix_cache_bytes",
            "Bytes the prefix cache holds (DeltaNet states and distinct K/V blocks)",
            load(&s.prefix_bytes),
        ),
        (
            "prefix_cache_snapshots",
            "Sequence states the prefix cache holds",
            load(&s.prefix_snapshots),
        ),
        (
            "kv_cache_reserved_bytes",
            "K/V bytes the running sequences reserved",
            load(&s.kv_reserved),
        ),
    ];
    for (name, help, v) in gauges {
        reg.register(format!("qnext:{name}"), help, ConstGauge::new(v));
    }
    let usage = kv_usage(&st);
    reg.register(
        "qnext:kv_cache_usage_perc",
        "Fraction of the K/V budget the running sequences reserved (of the slots in use, \
         without a budget; 1 = all)",
        ConstGauge::new(usage),
    );
    // The names endpoint pickers read (smg, the Gateway API Inference Extension, llm-d):
    // vLLM's, with the same meaning as ours above.
    reg.register(
        "vllm:num_requests_running",
        "Number of requests in the running batch (= qnext:num_requests_running)",
        ConstGauge::new(load(&s.running)),
    );
    reg.register(
        "vllm:num_requests_waiting",
        "Number of requests waiting for a slot (= qnext:num_requests_waiting)",
        ConstGauge::new(load(&s.queued)),
    );
    reg.register(
        "vllm:kv_cache_usage_perc",
        "Fraction of the K/V budget in use (= qnext:kv_cache_usage_perc)",
        ConstGauge::new(usage),
    );
    let (queries, hits) = (
        s.prefix_queries.load(Ordering::Relaxed),
        s.prefix_hits.load(Ordering::Relaxed),
    );
    reg.register(
        "vllm:gpu_prefix_cache_hit_rate",
        "Share of prompt tokens found in the prefix cache so far (0 before the first query)",
        ConstGauge::new(if queries == 0 {
            0.0
        } else {
            hits as f64 / queries as f64
        }),
    );
    let counters = [
        (
            "request",
            "Generation requests submitted to the engine (one per choice)",
            &s.requests_total,
        ),
        ("prompt_tokens", "Prompt tokens processed", &s.prompt_tokens),
        ("generation_tokens", "Tokens generated", &s.generated_tokens),
        (
            "request_errors",
            "HTTP requests answered with an error status",
            &st.metrics.errors,
        ),
        (
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            &s.prefix_queries,
        ),
        (
            "prefix_cache_hits",
            "Prompt tokens found in the prefix cache (not computed)",
            &s.prefix_hits,
        ),
        (
            "prefix_cache_evictions",
            "Sequence states evicted from the prefix cache",
            &s.prefix_evictions,
        ),
        (
            "prefix_cache_warm_tokens",
            "Tokens of conversations computed ahead of their next request",
            &s.warm_tokens,
        ),
        (
            "spec_decode_num_drafts",
            "Speculative verification steps (one per sequence and step)",
            &s.spec_rounds,
        ),
        (
            "spec_decode_num_draft_tokens",
            "Tokens drafted by the MTP head",
            &s.spec_draft_tokens,
        ),
        (
            "spec_decode_num_accepted_tokens",
            "Drafted tokens accepted",
            &s.spec_accepted_tokens,
        ),
    ];
    for (name, help, c) in counters {
        reg.register(format!("qnext:{name}"), help, count(c));
    }
    let per_position = Family::<Vec<(String, String)>, Counter>::default();
    let accepted = s
        .spec_accepted_per_position
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for (pos, n) in accepted.iter().enumerate() {
        per_position
            .get_or_create(&vec![("position".into(), pos.to_string())])
            .inc_by(*n);
    }
    reg.register(
        "qnext:spec_decode_num_accepted_tokens_per_pos",
        "Drafted tokens accepted, by draft position (0: the first draft of a step)",
        per_position,
    );
    let rounds = s.spec_rounds.load(Ordering::Relaxed);
    reg.register(
        "qnext:spec_decode_mean_accepted_length",
        "Tokens a speculative verification step yields on average (accepted drafts + 1; \
         0 before the first)",
        ConstGauge::new(if rounds == 0 {
            0.0
        } else {
            1.0 + s.spec_accepted_tokens.load(Ordering::Relaxed) as f64 / rounds as f64
        }),
    );
    let finished = Family::<Vec<(String, String)>, Counter>::default();
    for (i, reason) in ["stop", "length", "abort"].iter().enumerate() {
        finished
            .get_or_create(&vec![("finished_reason".into(), (*reason).into())])
            .inc_by(st.metrics.finished[i].load(Ordering::Relaxed));
    }
    reg.register(
        "qnext:request_success",
        "Finished choices by finish reason",
        finished,
    );
    let histograms = [
        (
            "time_to_first_token_seconds",
            "Time from submission to the first generated token",
            s.ttft.snapshot(),
        ),
        (
            "inter_token_latency_seconds",
            "Time between consecutive generated tokens of a sequence",
            s.itl.snapshot(),
        ),
        (
            "e2e_request_latency_seconds",
            "Time from receiving a generation request to its last byte",
            st.metrics.e2e.snapshot(),
        ),
    ];
    for (name, help, h) in histograms {
        reg.register(format!("qnext:{name}"), help, Buckets(h));
    }
    let mut out = String::new();
    if let Err(e) = encode_text(&mut out, &reg) {
        return ApiError::internal(format!("encoding the metrics: {e}")).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// The share of the K/V budget the running sequences reserved; without a budget, of the
/// sequence slots in use.
pub fn kv_usage(st: &AppState) -> f64 {
    let s = &st.engine.stats;
    let max = st.engine.config.max_num_seqs;
    match st.engine.config.kv_cache_memory {
        Some(b) => s.kv_reserved.load(Ordering::Relaxed) as f64 / b.max(1) as f64,
        None => {
            let free = s.free_slots.load(Ordering::Relaxed);
            max.saturating_sub(free) as f64 / max.max(1) as f64
        }
    }
}

/// vLLM's `/tokenize`: a `prompt`, or chat `messages` rendered through the chat template.
pub async fn tokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    reply_from(&st, move |st| tokenize_inner(st, body)).await
}

/// [`reply`] with what `work` answers, computed off the runtime's threads
/// ([`super::off_runtime`]).
pub async fn reply_from(
    st: &Arc<AppState>,
    work: impl FnOnce(&AppState) -> ApiResult<Value> + Send + 'static,
) -> Response {
    let state = st.clone();
    reply(
        super::off_runtime(st, move || work(&state))
            .await
            .and_then(|r| r),
    )
}

/// A JSON answer, or the error's.
pub fn reply(r: ApiResult<Value>) -> Response {
    match r {
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
        st.check_text_bytes(text.len(), "prompt")?;
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
    let run = move |st: &AppState| -> ApiResult<Value> {
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
    reply_from(&st, run).await
}
