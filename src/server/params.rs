//! Reading request bodies field by field, so that every error names the parameter at fault
//! (a derive-based parser reports the first serde error, without the field path in a form a
//! client can use), and the request parameters shared by `/v1/chat/completions` and
//! `/v1/completions`.
//!
//! As in vLLM, unknown fields are ignored and `null` is the same as absent; fields that would
//! change the output but are not implemented are rejected.

use serde_json::{Map, Value};

use super::error::{ApiError, ApiResult};
use super::AppState;
use crate::sampling::SamplingParams;

/// Most choices per request (OpenAI's limit).
pub const MAX_N: usize = 128;
/// `stop` strings per request, and bytes per string: each is matched against the text of
/// every generated token, so their number and length bound the work per token. (OpenAI takes
/// 4; some clients written for vLLM send a dozen.)
pub const MAX_STOP: usize = 16;
pub const MAX_STOP_BYTES: usize = 512;
/// `logit_bias` entries per request (each is applied at every sampling step).
pub const MAX_LOGIT_BIAS_ENTRIES: usize = 1024;
/// Most log-probabilities per token (OpenAI's and vLLM's default limit).
pub const MAX_LOGPROBS: usize = 20;
/// Largest |logit_bias| (OpenAI's range); larger values are clamped, as vLLM does.
const MAX_LOGIT_BIAS: f32 = 100.0;

/// A JSON request body.
pub struct Body {
    map: Map<String, Value>,
}

impl Body {
    pub fn parse(bytes: &[u8]) -> ApiResult<Body> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| {
            ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the request body is not valid JSON: {e}"),
            )
        })?;
        match v {
            Value::Object(map) => Ok(Body { map }),
            other => Err(ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "invalid_json",
                format!(
                    "the request body must be a JSON object, not {}",
                    super::error::kind(&other)
                ),
            )),
        }
    }

    /// The value of a field; `null` reads as absent.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn bool(&self, name: &str) -> ApiResult<Option<bool>> {
        self.get(name).map(|v| as_bool(v, name)).transpose()
    }

    pub fn f32(&self, name: &str) -> ApiResult<Option<f32>> {
        self.get(name).map(|v| as_f32(v, name)).transpose()
    }

    pub fn i64(&self, name: &str) -> ApiResult<Option<i64>> {
        self.get(name).map(|v| as_i64(v, name)).transpose()
    }

    pub fn str(&self, name: &str) -> ApiResult<Option<&str>> {
        self.get(name)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| ApiError::wrong_type(name, "a string", v))
            })
            .transpose()
    }

    /// A non-negative integer no larger than `max`.
    pub fn count(&self, name: &str, min: usize, max: usize) -> ApiResult<Option<usize>> {
        let Some(i) = self.i64(name)? else {
            return Ok(None);
        };
        if i < min as i64 || i > max as i64 {
            return Err(ApiError::invalid(
                name,
                format!("'{name}' must be between {min} and {max}, got {i}"),
            ));
        }
        Ok(Some(i as usize))
    }
}

pub fn as_bool(v: &Value, name: &str) -> ApiResult<bool> {
    v.as_bool()
        .ok_or_else(|| ApiError::wrong_type(name, "a boolean", v))
}

pub fn as_f32(v: &Value, name: &str) -> ApiResult<f32> {
    let f = v
        .as_f64()
        .ok_or_else(|| ApiError::wrong_type(name, "a number", v))?;
    let x = f as f32;
    if !x.is_finite() {
        return Err(ApiError::invalid(
            name,
            format!("'{name}' = {f} is out of range"),
        ));
    }
    Ok(x)
}

/// An integer; a float with no fractional part is accepted, as pydantic does.
pub fn as_i64(v: &Value, name: &str) -> ApiResult<i64> {
    if let Some(i) = v.as_i64() {
        return Ok(i);
    }
    if v.as_u64().is_some() {
        return Err(ApiError::invalid(name, format!("'{name}' is too large")));
    }
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
        _ => Err(ApiError::wrong_type(name, "an integer", v)),
    }
}

/// Parameters common to chat and text completions.
pub struct Common {
    /// Sampling settings without the per-choice seed.
    pub sampling: SamplingParams,
    pub seed: Option<u64>,
    pub n: usize,
    /// `max_tokens` / `max_completion_tokens` as asked; `None`: the rest of the context.
    pub max_tokens: Option<usize>,
    /// The parameter name `max_tokens` came from, for errors.
    pub max_tokens_param: &'static str,
    pub stop: Vec<String>,
    /// Ids that end generation: the user's, plus EOS unless `ignore_eos`.
    pub stop_token_ids: Vec<u32>,
    pub stream: bool,
    pub include_usage: bool,
    pub include_stop_str_in_output: bool,
    pub skip_special_tokens: bool,
}

/// Reads the fields shared by both completion endpoints, with the checkpoint's generation
/// defaults (vLLM's `--generation-config auto`) for those the request leaves out.
pub fn common(body: &Body, st: &AppState) -> ApiResult<Common> {
    common_with(
        body,
        &Defaults {
            sampling: &st.default_sampling,
            vocab_size: st.vocab_size,
            eos_token_ids: &st.eos_token_ids,
        },
    )
}

/// What [`common`] takes from the server: the checkpoint's sampling defaults, vocabulary size
/// and end-of-sequence ids.
pub struct Defaults<'a> {
    pub sampling: &'a SamplingParams,
    pub vocab_size: usize,
    pub eos_token_ids: &'a [u32],
}

/// [`common`] with the server's part given apart (the fuzz target calls it so).
pub fn common_with(body: &Body, st: &Defaults) -> ApiResult<Common> {
    let mut s = st.sampling.clone();
    if let Some(t) = body.f32("temperature")? {
        if t < 0.0 {
            return Err(ApiError::invalid(
                "temperature",
                format!("'temperature' must be >= 0, got {t}"),
            ));
        }
        s.temperature = t;
    }
    if let Some(p) = body.f32("top_p")? {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("'top_p' must be in (0, 1], got {p}"),
            ));
        }
        s.top_p = p;
    }
    if let Some(k) = body.i64("top_k")? {
        // vLLM: -1 and 0 both mean "off".
        if k < -1 {
            return Err(ApiError::invalid(
                "top_k",
                format!("'top_k' must be -1 (off), 0 (off) or positive, got {k}"),
            ));
        }
        s.top_k = usize::try_from(k.max(0)).unwrap_or(0).min(st.vocab_size);
    }
    if let Some(m) = body.f32("min_p")? {
        if !(0.0..=1.0).contains(&m) {
            return Err(ApiError::invalid(
                "min_p",
                format!("'min_p' must be in [0, 1], got {m}"),
            ));
        }
        s.min_p = m;
    }
    for (name, slot) in [
        ("presence_penalty", &mut s.presence_penalty),
        ("frequency_penalty", &mut s.frequency_penalty),
    ] {
        if let Some(v) = body.f32(name)? {
            if !(-2.0..=2.0).contains(&v) {
                return Err(ApiError::invalid(
                    name,
                    format!("'{name}' must be in [-2, 2], got {v}"),
                ));
            }
            *slot = v;
        }
    }
    if let Some(r) = body.f32("repetition_penalty")? {
        if r <= 0.0 {
            return Err(ApiError::invalid(
                "repetition_penalty",
                format!("'repetition_penalty' must be > 0, got {r}"),
            ));
        }
        s.repetition_penalty = r;
    }
    s.logit_bias = logit_bias(body, st.vocab_size)?;
    s.seed = None;
    // Anything the checks above missed (e.g. a bad generation_config default) is still a 400.
    s.validate().map_err(|e| {
        let msg = format!("{e:#}");
        let param = [
            "temperature",
            "top_p",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "logit_bias",
        ]
        .into_iter()
        .find(|p| msg.contains(p))
        .unwrap_or("sampling");
        ApiError::invalid(param, msg)
    })?;

    // A seed is any 64-bit integer; negative ones are reinterpreted, not rejected.
    let seed = body.i64("seed")?.map(|x| x as u64);
    let n = body.count("n", 1, MAX_N)?.unwrap_or(1);

    let (max_tokens, max_tokens_param) = match body.get("max_completion_tokens") {
        Some(_) => (body.i64("max_completion_tokens")?, "max_completion_tokens"),
        None => (body.i64("max_tokens")?, "max_tokens"),
    };
    let max_tokens = match max_tokens {
        None => None,
        Some(m) if m < 1 => {
            return Err(ApiError::invalid(
                max_tokens_param,
                format!("'{max_tokens_param}' must be at least 1, got {m}"),
            ))
        }
        Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
    };

    let stop = stop_strings(body)?;
    let mut stop_token_ids = Vec::new();
    if let Some(v) = body.get("stop_token_ids") {
        let items = v
            .as_array()
            .ok_or_else(|| ApiError::wrong_type("stop_token_ids", "an array of token ids", v))?;
        for (i, item) in items.iter().enumerate() {
            let name = format!("stop_token_ids[{i}]");
            stop_token_ids.push(token_id(item, &name, st.vocab_size)?);
        }
    }
    if !body.bool("ignore_eos")?.unwrap_or(false) {
        stop_token_ids.extend(st.eos_token_ids);
    }
    stop_token_ids.sort_unstable();
    stop_token_ids.dedup();

    let stream = body.bool("stream")?.unwrap_or(false);
    let mut include_usage = false;
    if let Some(opts) = body.get("stream_options") {
        if !stream {
            return Err(ApiError::invalid(
                "stream_options",
                "'stream_options' is only allowed when 'stream' is true",
            ));
        }
        let obj = opts
            .as_object()
            .ok_or_else(|| ApiError::wrong_type("stream_options", "an object", opts))?;
        if let Some(v) = obj.get("include_usage").filter(|v| !v.is_null()) {
            include_usage = as_bool(v, "stream_options.include_usage")?;
        }
    }
    if let Some(m) = body.i64("min_tokens")? {
        if m != 0 {
            return Err(ApiError::unsupported(
                "min_tokens",
                "'min_tokens' is not supported by this server",
            ));
        }
    }
    if let Some(b) = body.i64("best_of")? {
        if b != n as i64 {
            return Err(ApiError::unsupported(
                "best_of",
                "'best_of' is not supported by this server (use 'n')",
            ));
        }
    }
    if let Some(rf) = body.get("response_format") {
        let t = rf.get("type").and_then(Value::as_str);
        if t != Some("text") {
            return Err(ApiError::unsupported(
                "response_format",
                "only 'response_format' {\"type\": \"text\"} is supported (no guided decoding)",
            ));
        }
    }
    Ok(Common {
        sampling: s,
        seed,
        n,
        max_tokens,
        max_tokens_param,
        stop,
        stop_token_ids,
        stream,
        include_usage,
        include_stop_str_in_output: body.bool("include_stop_str_in_output")?.unwrap_or(false),
        skip_special_tokens: body.bool("skip_special_tokens")?.unwrap_or(true),
    })
}

fn stop_strings(body: &Body) -> ApiResult<Vec<String>> {
    let Some(v) = body.get("stop") else {
        return Ok(Vec::new());
    };
    let list: Vec<(String, &Value)> = match v {
        Value::String(_) => vec![("stop".to_owned(), v)],
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, x)| (format!("stop[{i}]"), x))
            .collect(),
        other => {
            return Err(ApiError::wrong_type(
                "stop",
                "a string or an array of strings",
                other,
            ))
        }
    };
    if list.len() > MAX_STOP {
        return Err(ApiError::invalid(
            "stop",
            format!("'stop' has {} strings; at most {MAX_STOP}", list.len()),
        ));
    }
    let mut out = Vec::new();
    for (name, item) in list {
        let s = item
            .as_str()
            .ok_or_else(|| ApiError::wrong_type(&name, "a string", item))?;
        if s.len() > MAX_STOP_BYTES {
            return Err(ApiError::invalid(
                name.clone(),
                format!(
                    "'{name}' is {} bytes long; at most {MAX_STOP_BYTES}",
                    s.len()
                ),
            ));
        }
        if s.is_empty() {
            return Err(ApiError::invalid(
                name.clone(),
                format!("'{name}' must not be empty"),
            ));
        }
        out.push(s.to_owned());
    }
    Ok(out)
}

/// `logit_bias`: an object from token ids (as strings) to biases.
fn logit_bias(body: &Body, vocab: usize) -> ApiResult<Vec<(u32, f32)>> {
    let Some(v) = body.get("logit_bias") else {
        return Ok(Vec::new());
    };
    let obj = v.as_object().ok_or_else(|| {
        ApiError::wrong_type("logit_bias", "an object mapping token ids to biases", v)
    })?;
    if obj.len() > MAX_LOGIT_BIAS_ENTRIES {
        return Err(ApiError::invalid(
            "logit_bias",
            format!(
                "'logit_bias' has {} entries; at most {MAX_LOGIT_BIAS_ENTRIES}",
                obj.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(obj.len());
    for (k, b) in obj {
        let name = format!("logit_bias[{k}]");
        let id: u32 = k.trim().parse().map_err(|_| {
            ApiError::invalid(
                "logit_bias",
                format!("'logit_bias' keys must be token ids, got {k:?}"),
            )
        })?;
        if id as usize >= vocab {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("'logit_bias' token id {id} is out of the vocabulary (size {vocab})"),
            ));
        }
        let bias = as_f32(b, &name)?.clamp(-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS);
        out.push((id, bias));
    }
    Ok(out)
}

/// A token id within the model's vocabulary.
pub fn token_id(v: &Value, name: &str, vocab: usize) -> ApiResult<u32> {
    let i = as_i64(v, name)?;
    if i < 0 || i as u64 >= vocab as u64 {
        return Err(ApiError::invalid(
            name,
            format!("'{name}' = {i} is not a token id (the vocabulary has {vocab})"),
        ));
    }
    Ok(i as u32)
}

/// Bytes of all the strings in `v` (object keys aside): a lower bound on the text a prompt
/// made from it holds.
pub fn text_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(text_bytes).sum(),
        Value::Object(o) => o.values().map(text_bytes).sum(),
        _ => 0,
    }
}
