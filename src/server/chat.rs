//! `POST /v1/chat/completions`: messages → chat template → tokens → engine → text, split into
//! `reasoning_content`, `content` and `tool_calls` by the configured parsers.

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
use super::params::{self, as_bool, Body, MAX_LOGPROBS};
use super::{misc, read_body, sse, AppState, ReasoningParser, ToolCallParser};
use crate::text::tool_calls::ParsedOutput;
use crate::text::{
    parse_output, OutputDelta, OutputParsers, OutputStream, ReasoningRule, ToolCallIds, ToolFormat,
    ToolSchemas,
};

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];
/// Messages per request: each is a pass of the template's loop, however short.
const MAX_MESSAGES: usize = 8192;
/// Tools per request (OpenAI's limit).
const MAX_TOOLS: usize = 128;

/// A rendered chat prompt and the output parsers that apply to the request.
pub struct Rendered {
    pub text: String,
    pub parsers: OutputParsers,
    /// What renders the conversation with this request's answer appended, as the next
    /// request will send it; `None` when the prompt is not a new assistant turn.
    pub next_turn: Option<NextTurn>,
}

/// The normalised messages, tools and template arguments of a request.
pub struct NextTurn {
    messages: Vec<Value>,
    tools: Option<Value>,
    extra: Map<String, Value>,
}

/// Checks and normalises `messages` and `tools` as vLLM does, and renders the chat template.
pub fn render(st: &AppState, body: &Body) -> ApiResult<Rendered> {
    st.template.as_ref().map_err(|e| {
        if e.broken {
            ApiError::internal(format!(
                "the server's chat template does not load ({}); its operator must fix it or \
                 start the server with --chat-template",
                e.why
            ))
        } else {
            ApiError::invalid(
                "messages",
                format!(
                    "this model has no chat template ({}); start the server with --chat-template, \
                     or send /v1/completions",
                    e.why
                ),
            )
        }
    })?;
    if let Some(m) = body.get("messages") {
        st.check_text_bytes(params::text_bytes(m), "messages")?;
    }
    if let Some(t) = body.get("tools") {
        st.check_text_bytes(params::text_bytes(t), "tools")?;
    }
    let messages = normalize_messages(body.get("messages"))?;
    let tools = match body.get("tools") {
        None => None,
        Some(v) => Some(Value::Array(check_tools(v)?)),
    };
    let has_tools = tools
        .as_ref()
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty());
    let tool_choice = match body.get("tool_choice") {
        None => {
            if has_tools {
                "auto"
            } else {
                "none"
            }
        }
        Some(Value::String(s)) if s == "none" || s == "auto" => s.as_str(),
        Some(Value::String(s)) if s == "required" => {
            return Err(ApiError::unsupported(
                "tool_choice",
                "tool_choice \"required\" needs guided decoding, which this server does not have; use \"auto\"",
            ))
        }
        Some(Value::Object(_)) => {
            return Err(ApiError::unsupported(
                "tool_choice",
                "a named tool_choice needs guided decoding, which this server does not have; use \"auto\"",
            ))
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "tool_choice",
                format!("'tool_choice' must be \"none\", \"auto\", \"required\" or an object, got {other}"),
            ))
        }
    };
    if tool_choice == "auto" && body.has("tool_choice") && !has_tools {
        return Err(ApiError::invalid(
            "tool_choice",
            "'tool_choice' is only allowed when 'tools' are given",
        ));
    }
    if tool_choice == "auto" && has_tools && st.tool_call_parser == ToolCallParser::None {
        return Err(ApiError::invalid(
            "tool_choice",
            "\"auto\" tool choice needs a tool-call parser: start the server with --tool-call-parser hermes",
        ));
    }
    let add_generation_prompt = body.bool("add_generation_prompt")?.unwrap_or(true);
    let continue_final = body.bool("continue_final_message")?.unwrap_or(false);
    if continue_final && add_generation_prompt {
        return Err(ApiError::invalid(
            "continue_final_message",
            "'continue_final_message' needs 'add_generation_prompt': false",
        ));
    }
    if body.has("chat_template") {
        return Err(ApiError::unsupported(
            "chat_template",
            "a per-request chat template is not accepted; start the server with --chat-template",
        ));
    }
    let extra = match body.get("chat_template_kwargs") {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => {
            return Err(ApiError::wrong_type(
                "chat_template_kwargs",
                "an object",
                other,
            ))
        }
    };
    let next_turn = (add_generation_prompt && !continue_final).then(|| NextTurn {
        messages: messages.clone(),
        tools: tools.clone(),
        extra: extra.clone(),
    });
    let msgs = Value::Array(messages);
    let mut text = st
        .render_chat(&msgs, tools.as_ref(), add_generation_prompt, &extra)
        .unwrap_or_else(|no| Err(anyhow::anyhow!("{}", no.why)))
        .map_err(|e| {
            let msg = format!("{e:#}");
            let param = if msg.contains("extra template argument") {
                "chat_template_kwargs"
            } else {
                "messages"
            };
            ApiError::invalid(param, format!("cannot apply the chat template: {msg}"))
        })?;
    if continue_final {
        let last = msgs.as_array().and_then(|m| m.last());
        let content = last
            .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
            .and_then(|m| m.get("content"))
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                ApiError::invalid(
                    "continue_final_message",
                    "'continue_final_message' needs a last assistant message with text content",
                )
            })?;
        // As vLLM: cut the prompt right after the final message's text, so the model continues it.
        let end = text
            .rfind(content)
            .map(|p| p + content.len())
            .ok_or_else(|| {
                ApiError::invalid(
                    "continue_final_message",
                    "the chat template does not render the final message's content verbatim",
                )
            })?;
        text.truncate(end);
    }
    let reasoning = match st.reasoning_parser {
        ReasoningParser::None => None,
        ReasoningParser::DeepseekR1 => Some(ReasoningRule::DeepseekR1),
        ReasoningParser::Qwen3 => Some(ReasoningRule::Qwen3 {
            thinking: thinking_on(&text, &extra),
        }),
    };
    let tool_calls = match st.tool_call_parser {
        _ if !(has_tools && tool_choice == "auto") => None,
        ToolCallParser::Hermes => Some(ToolFormat::Hermes),
        ToolCallParser::Qwen3Coder => Some(ToolFormat::Qwen3Coder(ToolSchemas::from_tools(
            tools.as_ref(),
        ))),
        ToolCallParser::None | ToolCallParser::Auto => None,
    };
    Ok(Rendered {
        text,
        next_turn,
        parsers: OutputParsers {
            reasoning,
            tool_calls,
        },
    })
}

/// Whether the model starts its answer thinking: not when the request says
/// `enable_thinking: false`, nor when the prompt's last think tag closes the block (the
/// Qwen3.5 templates write `<think>\n\n</think>\n\n` when thinking is off, which the 0.8B
/// and 2B templates do by default).
fn thinking_on(prompt: &str, extra: &Map<String, Value>) -> bool {
    if extra.get("enable_thinking") == Some(&Value::Bool(false)) {
        return false;
    }
    match (prompt.rfind("<think>"), prompt.rfind("</think>")) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(open), Some(close)) => open > close,
    }
}

/// Stands in for the next user message when the conversation is rendered ahead.
const NEXT_USER: &str = "\u{1}qnext: the next user message\u{1}";

/// Asks the engine to compute ahead the conversation as its next request will render it:
/// the messages so far and `answer` (the assistant message of the response), so that the
/// next request finds its state after the answer in the prefix cache (`Engine::warm`).
/// Templates may render an answer differently depending on what follows (the Thinking
/// template keeps the reasoning of an answer only while no user message follows it), so
/// both continuations are rendered: followed by a user message (cut where it begins) and as
/// the last message (a tool result follows). Where they agree the engine computes one.
///
/// Rendering and tokenizing the whole conversation runs off the runtime's threads; it is
/// awaited before the response ends so that the next request finds it queued.
async fn warm_next_turn(st: &Arc<AppState>, next: NextTurn, answer: Value) {
    let state = st.clone();
    let _ = super::off_runtime(st, move || warm_now(&state, &next, answer)).await;
}

fn warm_now(st: &AppState, next: &NextTurn, answer: Value) {
    let Ok(answer) = normalize_message(next.messages.len(), &answer) else {
        return;
    };
    let calls_tools = answer.get("tool_calls").is_some();
    let mut msgs = next.messages.clone();
    msgs.push(answer);
    let render = |msgs: Vec<Value>| {
        st.render_chat(&Value::Array(msgs), next.tools.as_ref(), false, &next.extra)
            .ok()?
            .ok()
    };
    let last = render(msgs.clone());
    msgs.push(json!({"role": "user", "content": NEXT_USER}));
    let before_user = render(msgs).and_then(|text| {
        let at = text.rfind(NEXT_USER)?;
        // Back to where the user message begins: the template's header before the text.
        let header = text[..at].rfind("<|im_start|>")?;
        Some(text[..header].to_owned())
    });
    let mut texts = [before_user, last];
    if calls_tools {
        texts.reverse();
    }
    for text in texts.into_iter().flatten() {
        if let Ok(tokens) = misc::encode(st, &text, false, "messages") {
            st.engine.warm(tokens);
        }
    }
}

/// The assistant message of a response.
fn assistant_message(parsed: &ParsedOutput, reasoning: bool) -> Map<String, Value> {
    let mut message = Map::new();
    message.insert("role".into(), json!("assistant"));
    // No text at all is "" (as OpenAI and vLLM answer, and as the stream's first chunk
    // says); null only beside tool calls, or after reasoning that used the whole budget.
    let nothing =
        parsed.tool_calls.is_empty() && parsed.reasoning.as_deref().is_none_or(str::is_empty);
    let content = match &parsed.content {
        Some(c) => json!(c),
        None if nothing => json!(""),
        None => Value::Null,
    };
    message.insert("content".into(), content);
    if reasoning {
        message.insert("reasoning_content".into(), json!(parsed.reasoning));
    }
    if !parsed.tool_calls.is_empty() {
        let calls: Vec<Value> = parsed
            .tool_calls
            .iter()
            .map(|t| {
                json!({
                    "id": t.id,
                    "type": "function",
                    "function": {"name": t.name, "arguments": t.arguments},
                })
            })
            .collect();
        message.insert("tool_calls".into(), Value::Array(calls));
    }
    message
}

fn normalize_messages(v: Option<&Value>) -> ApiResult<Vec<Value>> {
    let v = v.ok_or_else(|| ApiError::missing("messages"))?;
    let items = v
        .as_array()
        .ok_or_else(|| ApiError::wrong_type("messages", "an array of messages", v))?;
    if items.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "'messages' must not be empty",
        ));
    }
    if items.len() > MAX_MESSAGES {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "'messages' has {} messages; at most {MAX_MESSAGES}",
                items.len()
            ),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| normalize_message(i, m))
        .collect()
}

fn normalize_message(i: usize, m: &Value) -> ApiResult<Value> {
    let at = format!("messages[{i}]");
    let obj = m
        .as_object()
        .ok_or_else(|| ApiError::wrong_type(&at, "an object", m))?;
    let field = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let role_param = format!("{at}.role");
    let role_v = field("role").ok_or_else(|| ApiError::missing(&role_param))?;
    let role = role_v
        .as_str()
        .ok_or_else(|| ApiError::wrong_type(&role_param, "a string", role_v))?;
    if !ROLES.contains(&role) {
        return Err(ApiError::invalid(
            role_param,
            format!(
                "unknown role {role:?} in {at}: expected one of {}",
                ROLES.join(", ")
            ),
        ));
    }
    let mut out = Map::new();
    out.insert("role".into(), json!(role));
    let content_param = format!("{at}.content");
    match field("content") {
        None if role == "assistant" => {}
        None => return Err(ApiError::missing(&content_param)),
        Some(Value::String(s)) => {
            out.insert("content".into(), json!(s));
        }
        Some(Value::Array(parts)) => {
            out.insert("content".into(), json!(text_parts(&content_param, parts)?));
        }
        Some(other) => {
            return Err(ApiError::wrong_type(
                &content_param,
                "a string or an array of content parts",
                other,
            ))
        }
    }
    for key in ["name", "tool_call_id", "reasoning_content", "reasoning"] {
        if let Some(v) = field(key) {
            if !v.is_string() {
                return Err(ApiError::wrong_type(&format!("{at}.{key}"), "a string", v));
            }
            out.insert(key.into(), v.clone());
        }
    }
    if let Some(calls) = field("tool_calls") {
        if role != "assistant" {
            return Err(ApiError::invalid(
                format!("{at}.tool_calls"),
                "only assistant messages carry 'tool_calls'",
            ));
        }
        out.insert("tool_calls".into(), normalize_tool_calls(&at, calls)?);
    }
    Ok(Value::Object(out))
}

/// Text parts joined by newlines (vLLM's "string" content format, which Qwen's template uses).
fn text_parts(param: &str, parts: &[Value]) -> ApiResult<String> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, p) in parts.iter().enumerate() {
        let at = format!("{param}[{j}]");
        let ty = p.get("type").and_then(Value::as_str);
        match ty {
            Some("text") => {}
            Some(other) => {
                return Err(ApiError::unsupported(
                    &format!("{at}.type"),
                    format!(
                    "content parts of type {other:?} are not supported: this model takes text only"
                ),
                ))
            }
            None => return Err(ApiError::missing(&format!("{at}.type"))),
        }
        let t = p
            .get("text")
            .ok_or_else(|| ApiError::missing(&format!("{at}.text")))?;
        let t = t
            .as_str()
            .ok_or_else(|| ApiError::wrong_type(&format!("{at}.text"), "a string", t))?;
        texts.push(t);
    }
    Ok(texts.join("\n"))
}

/// Assistant tool calls with their JSON-string arguments parsed, as vLLM passes them to the
/// template (which then prints them with `tojson`).
fn normalize_tool_calls(at: &str, calls: &Value) -> ApiResult<Value> {
    let param = format!("{at}.tool_calls");
    let items = calls
        .as_array()
        .ok_or_else(|| ApiError::wrong_type(&param, "an array", calls))?;
    let mut out = Vec::with_capacity(items.len());
    for (j, c) in items.iter().enumerate() {
        let cp = format!("{param}[{j}]");
        let obj = c
            .as_object()
            .ok_or_else(|| ApiError::wrong_type(&cp, "an object", c))?;
        let f = obj
            .get("function")
            .ok_or_else(|| ApiError::missing(&format!("{cp}.function")))?;
        let fobj = f
            .as_object()
            .ok_or_else(|| ApiError::wrong_type(&format!("{cp}.function"), "an object", f))?;
        let name = fobj
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::missing(&format!("{cp}.function.name")))?;
        let ap = format!("{cp}.function.arguments");
        let args = match fobj.get("arguments") {
            None | Some(Value::Null) => json!({}),
            Some(Value::String(s)) => serde_json::from_str::<Value>(s)
                .map_err(|e| ApiError::invalid(&ap, format!("'{ap}' is not valid JSON: {e}")))?,
            Some(v @ Value::Object(_)) => v.clone(),
            Some(other) => return Err(ApiError::wrong_type(&ap, "a JSON string", other)),
        };
        let mut call = Map::new();
        if let Some(id) = obj.get("id").filter(|v| !v.is_null()) {
            call.insert("id".into(), id.clone());
        }
        call.insert("type".into(), json!("function"));
        call.insert("function".into(), json!({"name": name, "arguments": args}));
        out.push(Value::Object(call));
    }
    Ok(Value::Array(out))
}

fn check_tools(v: &Value) -> ApiResult<Vec<Value>> {
    let items = v
        .as_array()
        .ok_or_else(|| ApiError::wrong_type("tools", "an array of tools", v))?;
    if items.len() > MAX_TOOLS {
        return Err(ApiError::invalid(
            "tools",
            format!("'tools' has {} tools; at most {MAX_TOOLS}", items.len()),
        ));
    }
    for (i, t) in items.iter().enumerate() {
        let at = format!("tools[{i}]");
        let obj = t
            .as_object()
            .ok_or_else(|| ApiError::wrong_type(&at, "an object", t))?;
        match obj.get("type").and_then(Value::as_str) {
            Some("function") | None => {}
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("{at}.type"),
                    format!("tool type {other:?} is not supported: only \"function\""),
                ))
            }
        }
        let f = obj
            .get("function")
            .ok_or_else(|| ApiError::missing(&format!("{at}.function")))?;
        if !f.get("name").is_some_and(Value::is_string) {
            return Err(ApiError::missing(&format!("{at}.function.name")));
        }
        if let Some(p) = f.get("parameters").filter(|p| !p.is_null()) {
            if !p.is_object() {
                return Err(ApiError::wrong_type(
                    &format!("{at}.function.parameters"),
                    "an object (a JSON schema)",
                    p,
                ));
            }
        }
    }
    Ok(items.clone())
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

/// Everything before the engine's answers: the body parsed and checked, the conversation
/// rendered and tokenized, the choices submitted. With `Some(include_usage)` where the
/// answer streams.
fn prepare(
    st: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    t0: Instant,
) -> ApiResult<(Job, Option<bool>)> {
    let body = read_body(body)?;
    st.check_model(&body)?;
    let common = params::common(&body, &st)?;
    let logprobs = match body.get("logprobs") {
        None => false,
        Some(v) => as_bool(v, "logprobs")?,
    };
    let top = body.count("top_logprobs", 0, MAX_LOGPROBS)?;
    if top.is_some_and(|k| k > 0) && !logprobs {
        return Err(ApiError::invalid(
            "top_logprobs",
            "'top_logprobs' needs 'logprobs': true",
        ));
    }
    if body.bool("echo")?.unwrap_or(false) {
        return Err(ApiError::unsupported(
            "echo",
            "'echo' is not supported for chat",
        ));
    }
    let rendered = render(&st, &body)?;
    let prompt = misc::encode(&st, &rendered.text, false, "messages")?;
    let max_tokens = st.max_tokens_for(
        prompt.len(),
        common.max_tokens,
        common.max_tokens_param,
        "messages",
    )?;
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
        logprobs: logprobs.then(|| top.unwrap_or(0)),
    };
    let prompt = Arc::new(prompt);
    let specs: Vec<ChoiceSpec> = (0..common.n)
        .map(|i| ChoiceSpec {
            index: i,
            prompt: prompt.clone(),
            max_tokens,
            sample_index: i,
        })
        .collect();
    let user_stop_ids = Arc::new(user_stop_ids);
    let choices: Vec<Choice> = (0..common.n)
        .map(|i| Choice::new(i, prompt.len(), &settings, user_stop_ids.clone()))
        .collect();
    let sub = Submitted::submit(&st.engine, &settings, &specs)?;
    let job = Job {
        st,
        id: format!("chatcmpl-{}", super::random_hex()),
        created: super::unix_time(),
        prompt_tokens: prompt.len(),
        parsers: rendered.parsers,
        next_turn: rendered.next_turn,
        sub,
        choices,
        want_logprobs: logprobs,
        t0,
    };
    Ok((job, common.stream.then_some(common.include_usage)))
}

/// One HTTP request's choices; dropped when it ends, including when the client goes away
/// first (the handler or the stream loop is dropped then), which counts what was unfinished.
struct Job {
    st: Arc<AppState>,
    id: String,
    created: u64,
    prompt_tokens: usize,
    parsers: OutputParsers,
    next_turn: Option<NextTurn>,
    sub: Submitted,
    choices: Vec<Choice>,
    want_logprobs: bool,
    t0: Instant,
}

impl Drop for Job {
    fn drop(&mut self) {
        self.st.metrics.count_unfinished(&self.choices);
    }
}

fn logprobs_json(st: &AppState, entries: &[TokenLogprob]) -> Value {
    let tok = &st.tokenizer;
    let item = |id: u32, lp: f32| {
        let bytes = st.token_text.bytes(tok, id);
        json!({
            "token": String::from_utf8_lossy(&bytes),
            "logprob": lp_json(lp),
            "bytes": bytes,
        })
    };
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut v = item(e.id, e.logprob);
            v["top_logprobs"] = Value::Array(e.top.iter().map(|&(id, lp)| item(id, lp)).collect());
            v
        })
        .collect();
    json!({ "content": content })
}

async fn complete(mut job: Job) -> ApiResult<Response> {
    let n = job.choices.len();
    let mut texts = vec![String::new(); n];
    let mut lps: Vec<Vec<TokenLogprob>> = vec![Vec::new(); n];
    while let Some((i, step)) = job.sub.next(&job.st.tokenizer, &mut job.choices).await {
        texts[i].push_str(&step.text);
        lps[i].extend(step.logprobs);
    }
    let want_logprobs = job.want_logprobs;
    let mut out = Vec::with_capacity(n);
    for (i, c) in job.choices.iter().enumerate() {
        let finish = c.finish.clone().unwrap_or(Finish::Abort);
        if let Finish::Error(msg) = &finish {
            return Err(ApiError::internal(format!("generation failed: {msg}")));
        }
        let parsed = parse_output(&texts[i], &job.parsers, &mut ToolCallIds::new());
        let message = assistant_message(&parsed, job.parsers.reasoning.is_some());
        if let (1, Some(next)) = (n, job.next_turn.take()) {
            warm_next_turn(&job.st, next, Value::Object(message.clone())).await;
        }
        let reason = parsed.finish_reason(finish.reason());
        job.st.metrics.count_finish(finish.reason());
        out.push(json!({
            "index": i,
            "message": message,
            "logprobs": if want_logprobs { logprobs_json(&job.st, &lps[i]) } else { Value::Null },
            "finish_reason": reason,
            "stop_reason": finish.stop_reason(),
        }));
    }
    job.st.metrics.e2e.observe(job.t0.elapsed());
    Ok(Json(json!({
        "id": job.id,
        "object": "chat.completion",
        "created": job.created,
        "model": job.st.model_name(),
        "choices": out,
        "usage": usage(job.prompt_tokens, &job.choices),
    }))
    .into_response())
}

fn chunk(
    job: &Job,
    index: usize,
    delta: Value,
    logprobs: Value,
    finish: Option<(&str, Value)>,
) -> Value {
    let mut choice = json!({
        "index": index,
        "delta": delta,
        "logprobs": logprobs,
        "finish_reason": finish.as_ref().map(|f| f.0),
    });
    if let Some((_, stop_reason)) = finish {
        choice["stop_reason"] = stop_reason;
    }
    json!({
        "id": job.id,
        "object": "chat.completion.chunk",
        "created": job.created,
        "model": job.st.model_name(),
        "choices": [choice],
    })
}

/// The `delta` objects of what the parsers released, in order.
fn deltas(d: OutputDelta) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(r) = d.reasoning {
        out.push(json!({ "reasoning_content": r }));
    }
    if let Some(c) = d.content {
        out.push(json!({ "content": c }));
    }
    for t in d.tool_calls {
        let mut call = Map::new();
        call.insert("index".into(), json!(t.index));
        if let Some(id) = t.id {
            call.insert("id".into(), json!(id));
        }
        if let Some(ty) = t.call_type {
            call.insert("type".into(), json!(ty));
        }
        let mut f = Map::new();
        if let Some(name) = t.name {
            f.insert("name".into(), json!(name));
            f.insert(
                "arguments".into(),
                json!(t.arguments.clone().unwrap_or_default()),
            );
        } else if let Some(a) = t.arguments {
            f.insert("arguments".into(), json!(a));
        }
        call.insert("function".into(), Value::Object(f));
        out.push(json!({ "tool_calls": [Value::Object(call)] }));
    }
    out
}

async fn stream(mut job: Job, include_usage: bool, tx: sse::Sender) {
    {
        {
            let n = job.choices.len();
            for i in 0..n {
                let c = chunk(
                    &job,
                    i,
                    json!({"role": "assistant", "content": ""}),
                    Value::Null,
                    None,
                );
                if !tx.send_json(&c).await {
                    return;
                }
            }
            let mut parsers: Vec<OutputStream> = (0..n)
                .map(|_| OutputStream::new(&job.parsers, ToolCallIds::new()))
                .collect();
            // The whole text of a single choice, for the conversation's next turn.
            let mut whole = String::new();
            loop {
                let next = tokio::select! {
                    _ = tx.closed() => return,
                    r = job.sub.next(&job.st.tokenizer, &mut job.choices) => r,
                };
                let Some((i, step)) = next else { break };
                let mut out = Vec::new();
                if !step.text.is_empty() {
                    out.extend(deltas(parsers[i].push(&step.text)));
                    if n == 1 && job.next_turn.is_some() {
                        whole.push_str(&step.text);
                    }
                }
                let finish = if step.finished {
                    let finish = job.choices[i].finish.clone().unwrap_or(Finish::Abort);
                    if let Finish::Error(msg) = &finish {
                        let e = ApiError::internal(format!("generation failed: {msg}"));
                        let _ = tx.send_json(&e.body()).await;
                        let _ = tx.send_done().await;
                        return;
                    }
                    out.extend(deltas(parsers[i].finish()));
                    job.st.metrics.count_finish(finish.reason());
                    if let (1, Some(next)) = (n, job.next_turn.take()) {
                        let parsed = parse_output(&whole, &job.parsers, &mut ToolCallIds::new());
                        let message = assistant_message(&parsed, job.parsers.reasoning.is_some());
                        warm_next_turn(&job.st, next, Value::Object(message)).await;
                    }
                    Some(finish)
                } else {
                    None
                };
                let mut lp = if step.logprobs.is_empty() {
                    Value::Null
                } else {
                    logprobs_json(&job.st, &step.logprobs)
                };
                if out.is_empty() && !lp.is_null() {
                    out.push(json!({}));
                }
                for d in out {
                    let c = chunk(&job, i, d, std::mem::take(&mut lp), None);
                    if !tx.send_json(&c).await {
                        return;
                    }
                }
                if let Some(f) = finish {
                    let reason = parsers[i].finish_reason(f.reason()).to_owned();
                    let c = chunk(
                        &job,
                        i,
                        json!({}),
                        Value::Null,
                        Some((&reason, f.stop_reason())),
                    );
                    if !tx.send_json(&c).await {
                        return;
                    }
                }
            }
            if include_usage {
                let u = usage_chunk(
                    &job.id,
                    "chat.completion.chunk",
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Event, FinishReason};
    use crate::text::Tokenizer;

    /// Streamed deltas reassemble to the non-streamed message, for output with reasoning, text
    /// and two tool calls, fed token by token as the engine would.
    #[test]
    fn streamed_deltas_match_the_message() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen-vocab");
        let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let output = "Let me check the weather.</think>\n\nSure. <tool_call>\n{\"name\": \"get_weather\", \
                      \"arguments\": {\"city\": \"Paris\", \"unit\": \"°C\"}}\n</tool_call>\n<tool_call>\n\
                      {\"name\": \"f\", \"arguments\": {}}\n</tool_call>";
        let ids = tok.encode(output, false).unwrap();
        let parsers = OutputParsers::qwen3_next(true, true);
        let settings = GenSettings {
            sampling: Default::default(),
            seed: None,
            stop: Arc::new(Vec::new()),
            stop_token_ids: vec![151645],
            include_stop_str_in_output: false,
            skip_special_tokens: true,
            logprobs: None,
        };
        let mut choice = Choice::new(0, 5, &settings, Arc::new(Vec::new()));
        let mut stream = OutputStream::new(&parsers, ToolCallIds::from_seed(7));
        let mut out = Vec::new();
        let mut text = String::new();
        let events = ids
            .iter()
            .map(|&id| Event::Token {
                id,
                logprob: None,
                top_logprobs: vec![],
                is_stop: false,
            })
            .chain([
                Event::Token {
                    id: 151645,
                    logprob: None,
                    top_logprobs: vec![],
                    is_stop: true,
                },
                Event::Done {
                    reason: FinishReason::Stop,
                    prompt_tokens: 5,
                    completion_tokens: ids.len() + 1,
                },
            ]);
        for ev in events {
            let step = choice.on_event(&tok, ev);
            text.push_str(&step.text);
            out.extend(deltas(stream.push(&step.text)));
            if step.finished {
                out.extend(deltas(stream.finish()));
            }
        }
        assert_eq!(text, output);
        assert_eq!(choice.completion_tokens, ids.len() + 1);
        assert_eq!(stream.finish_reason("stop"), "tool_calls");

        let mut reasoning = String::new();
        let mut content = String::new();
        let mut calls: Vec<(String, String, String)> = Vec::new();
        for d in &out {
            if let Some(r) = d["reasoning_content"].as_str() {
                reasoning.push_str(r);
            }
            if let Some(c) = d["content"].as_str() {
                content.push_str(c);
            }
            for t in d["tool_calls"].as_array().into_iter().flatten() {
                let i = t["index"].as_u64().unwrap() as usize;
                if i == calls.len() {
                    assert_eq!(t["type"], "function");
                    calls.push((
                        t["id"].as_str().unwrap().into(),
                        t["function"]["name"].as_str().unwrap().into(),
                        String::new(),
                    ));
                }
                calls[i]
                    .2
                    .push_str(t["function"]["arguments"].as_str().unwrap_or(""));
            }
        }
        let parsed = parse_output(output, &parsers, &mut ToolCallIds::from_seed(7));
        assert_eq!(Some(reasoning), parsed.reasoning);
        assert_eq!(Some(content), parsed.content);
        assert_eq!(parsed.content.as_deref(), Some("\n\nSure. "));
        let expected: Vec<(String, String, String)> = parsed
            .tool_calls
            .iter()
            .map(|c| (c.id.clone(), c.name.clone(), c.arguments.clone()))
            .collect();
        assert_eq!(calls, expected);
        assert_eq!(calls[0].2, "{\"city\": \"Paris\", \"unit\": \"°C\"}");
        assert_eq!(parsed.finish_reason("stop"), "tool_calls");
    }
}
