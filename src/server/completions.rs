//! `POST /v1/completions`: raw prompts (text or token ids, one or a batch) → text.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::error::{ApiError, ApiResult};
use super::generate::{
    lp_json, usage, usage_chunk, Choice, ChoiceSpec, Finish, GenSettings, Submitted, TokenLogprob,
};
use super::params::{self, Body, MAX_LOGPROBS};
use super::{misc, read_body, sse, AppState};

/// Prompts of one request at most (a batch is a list of prompts).
const MAX_PROMPTS: usize = 128;
/// Choices (prompts × n) of one request at most, each an engine request.
const MAX_CHOICES: usize = 256;

/// The prompts of a request, as token ids, with the parameter name each came from.
pub(super) fn prompts(st: &AppState, body: &Body) -> ApiResult<Vec<(Vec<u32>, String)>> {
    let v = body
        .get("prompt")
        .ok_or_else(|| ApiError::missing("prompt"))?;
    if let Value::String(s) = v {
        st.check_text_bytes(s.len(), "prompt")?;
    }
    let add_special = body.bool("add_special_tokens")?.unwrap_or(true);
    let ids = |v: &[Value], name: &str| -> ApiResult<Vec<u32>> {
        v.iter()
            .enumerate()
            .map(|(i, t)| params::token_id(t, &format!("{name}[{i}]"), st.vocab_size))
            .collect()
    };
    let out = match v {
        Value::String(s) => vec![(misc::encode(st, s, add_special, "prompt")?, "prompt".into())],
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::invalid("prompt", "'prompt' must not be empty"))
        }
        Value::Array(items) if items.iter().all(|x| x.is_number()) => {
            vec![(ids(items, "prompt")?, "prompt".into())]
        }
        Value::Array(items) => {
            if items.len() > MAX_PROMPTS {
                return Err(ApiError::invalid(
                    "prompt",
                    format!("at most {MAX_PROMPTS} prompts per request"),
                ));
            }
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let name = format!("prompt[{i}]");
                let toks = match item {
                    Value::String(s) => {
                        st.check_text_bytes(s.len(), &name)?;
                        misc::encode(st, s, add_special, &name)?
                    }
                    Value::Array(t) => ids(t, &name)?,
                    other => {
                        return Err(ApiError::wrong_type(
                            &name,
                            "a string or an array of token ids",
                            other,
                        ))
                    }
                };
                out.push((toks, name));
            }
            out
        }
        other => {
            return Err(ApiError::wrong_type(
                "prompt",
                "a string, an array of strings, or an array of token ids",
                other,
            ))
        }
    };
    Ok(out)
}

pub async fn handle(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let t0 = Instant::now();
    match run(st, body, t0).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn run(
    st: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    t0: Instant,
) -> ApiResult<Response> {
    let state = st.clone();
    let (job, stream_usage) = super::off_runtime(&st, move || prepare(state, body, t0)).await??;
    match stream_usage {
        Some(include_usage) => Ok(sse::response(move |tx| stream(job, include_usage, tx))),
        None => complete(job).await,
    }
}

/// Everything before the engine's answers: the body parsed and checked, the prompts
/// tokenized, the choices submitted. With `Some(include_usage)` where the answer streams.
fn prepare(
    st: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    t0: Instant,
) -> ApiResult<(Job, Option<bool>)> {
    let body = read_body(body)?;
    st.check_model(&body)?;
    let common = params::common(&body, &st)?;
    let logprobs = body.count("logprobs", 0, MAX_LOGPROBS)?;
    let echo = body.bool("echo")?.unwrap_or(false);
    if echo && logprobs.is_some() {
        return Err(ApiError::unsupported(
            "echo",
            "'echo' with 'logprobs' needs prompt log-probabilities, which this server does not compute",
        ));
    }
    if body
        .get("suffix")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty())
    {
        return Err(ApiError::unsupported("suffix", "'suffix' is not supported"));
    }
    let prompts = prompts(&st, &body)?;
    if prompts.len() * common.n > MAX_CHOICES {
        return Err(ApiError::invalid(
            "n",
            format!(
                "{} prompts × n = {} is more than {MAX_CHOICES} choices per request",
                prompts.len(),
                common.n
            ),
        ));
    }
    let mut specs = Vec::with_capacity(prompts.len() * common.n);
    let mut echoes = Vec::new();
    let user_stop_ids: Vec<u32> = body
        .get("stop_token_ids")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64().map(|x| x as u32))
                .collect()
        })
        .unwrap_or_default();
    let settings = GenSettings {
        sampling: common.sampling,
        seed: common.seed,
        stop: Arc::new(common.stop),
        stop_token_ids: common.stop_token_ids,
        include_stop_str_in_output: common.include_stop_str_in_output,
        skip_special_tokens: common.skip_special_tokens,
        logprobs,
    };
    let user_stop_ids = Arc::new(user_stop_ids);
    let mut choices = Vec::new();
    let mut prompt_tokens = 0;
    for (toks, name) in prompts {
        let max_tokens = st.max_tokens_for(
            toks.len(),
            common.max_tokens,
            common.max_tokens_param,
            &name,
        )?;
        prompt_tokens += toks.len();
        let echo_text = if echo {
            st.tokenizer
                .decode(&toks, common.skip_special_tokens)
                .map_err(|e| ApiError::invalid(name.as_str(), format!("{e:#}")))?
        } else {
            String::new()
        };
        let toks = Arc::new(toks);
        for j in 0..common.n {
            let index = specs.len();
            choices.push(Choice::new(
                index,
                toks.len(),
                &settings,
                user_stop_ids.clone(),
            ));
            specs.push(ChoiceSpec {
                index,
                prompt: toks.clone(),
                max_tokens,
                sample_index: j,
            });
            echoes.push(echo_text.clone());
        }
    }
    let sub = Submitted::submit(&st.engine, &settings, &specs)?;
    let job = Job {
        st,
        id: format!("cmpl-{}", super::random_hex()),
        created: super::unix_time(),
        prompt_tokens,
        sub,
        choices,
        echoes,
        want_logprobs: logprobs.is_some(),
        t0,
    };
    Ok((job, common.stream.then_some(common.include_usage)))
}

struct Job {
    st: Arc<AppState>,
    id: String,
    created: u64,
    prompt_tokens: usize,
    sub: Submitted,
    choices: Vec<Choice>,
    /// Per choice, the prompt text to put in front (`echo`), else empty.
    echoes: Vec<String>,
    want_logprobs: bool,
    t0: Instant,
}

impl Drop for Job {
    fn drop(&mut self) {
        self.st.metrics.count_unfinished(&self.choices);
    }
}

/// The legacy completions form: parallel lists, `top_logprobs` as token → logprob maps, and
/// `text_offset` the running length (in characters) of the token strings before each token.
fn logprobs_json(st: &AppState, entries: &[TokenLogprob], offset: &mut usize) -> Value {
    let tok = &st.tokenizer;
    let mut tokens = Vec::with_capacity(entries.len());
    let mut lps = Vec::with_capacity(entries.len());
    let mut tops = Vec::with_capacity(entries.len());
    let mut offsets = Vec::with_capacity(entries.len());
    for e in entries {
        let text = st.token_text.text(tok, e.id);
        offsets.push(*offset);
        *offset += text.chars().count();
        lps.push(lp_json(e.logprob));
        let mut top = Map::new();
        for &(id, lp) in &e.top {
            top.entry(st.token_text.text(tok, id))
                .or_insert(lp_json(lp));
        }
        top.entry(text.clone()).or_insert(lp_json(e.logprob));
        tops.push(Value::Object(top));
        tokens.push(text);
    }
    json!({
        "tokens": tokens,
        "token_logprobs": lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    })
}

async fn complete(mut job: Job) -> ApiResult<Response> {
    let n = job.choices.len();
    let mut texts = job.echoes.clone();
    let mut lps: Vec<Vec<TokenLogprob>> = vec![Vec::new(); n];
    while let Some((i, step)) = job.sub.next(&job.st.tokenizer, &mut job.choices).await {
        texts[i].push_str(&step.text);
        lps[i].extend(step.logprobs);
    }
    let mut out = Vec::with_capacity(n);
    for (i, c) in job.choices.iter().enumerate() {
        let finish = c.finish.clone().unwrap_or(Finish::Abort);
        if let Finish::Error(msg) = &finish {
            return Err(ApiError::internal(format!("generation failed: {msg}")));
        }
        job.st.metrics.count_finish(finish.reason());
        let logprobs = if job.want_logprobs {
            let mut offset = 0;
            logprobs_json(&job.st, &lps[i], &mut offset)
        } else {
            Value::Null
        };
        out.push(json!({
            "index": i,
            "text": texts[i],
            "logprobs": logprobs,
            "finish_reason": finish.reason(),
            "stop_reason": finish.stop_reason(),
        }));
    }
    job.st.metrics.e2e.observe(job.t0.elapsed());
    Ok(Json(json!({
        "id": job.id,
        "object": "text_completion",
        "created": job.created,
        "model": job.st.model_name(),
        "choices": out,
        "usage": usage(job.prompt_tokens, &job.choices),
    }))
    .into_response())
}

fn chunk(job: &Job, index: usize, text: &str, logprobs: Value, finish: Option<&Finish>) -> Value {
    let mut choice = json!({
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish.map(Finish::reason),
    });
    if let Some(f) = finish {
        choice["stop_reason"] = f.stop_reason();
    }
    json!({
        "id": job.id,
        "object": "text_completion",
        "created": job.created,
        "model": job.st.model_name(),
        "choices": [choice],
    })
}

async fn stream(mut job: Job, include_usage: bool, tx: sse::Sender) {
    let n = job.choices.len();
    let mut offsets = vec![0usize; n];
    for i in 0..n {
        if !job.echoes[i].is_empty() {
            let c = chunk(&job, i, &job.echoes[i], Value::Null, None);
            if !tx.send_json(&c).await {
                return;
            }
        }
    }
    loop {
        let next = tokio::select! {
            _ = tx.closed() => return,
            r = job.sub.next(&job.st.tokenizer, &mut job.choices) => r,
        };
        let Some((i, step)) = next else { break };
        let finish = if step.finished {
            let f = job.choices[i].finish.clone().unwrap_or(Finish::Abort);
            if let Finish::Error(msg) = &f {
                let e = ApiError::internal(format!("generation failed: {msg}"));
                let _ = tx.send_json(&e.body()).await;
                let _ = tx.send_done().await;
                return;
            }
            job.st.metrics.count_finish(f.reason());
            Some(f)
        } else {
            None
        };
        let lp = if job.want_logprobs && !step.logprobs.is_empty() {
            logprobs_json(&job.st, &step.logprobs, &mut offsets[i])
        } else {
            Value::Null
        };
        if !step.text.is_empty() || !lp.is_null() || finish.is_some() {
            let c = chunk(&job, i, &step.text, lp, finish.as_ref());
            if !tx.send_json(&c).await {
                return;
            }
        }
    }
    if include_usage {
        let u = usage_chunk(
            &job.id,
            "text_completion",
            job.created,
            job.st.model_name(),
            usage(job.prompt_tokens, &job.choices),
        );
        if !tx.send_json(&u).await {
            return;
        }
    }
    job.st.metrics.e2e.observe(job.t0.elapsed());
    let _ = tx.send_done().await;
}
