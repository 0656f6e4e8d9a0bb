//! From engine events to text: per choice, the streaming detokenizer, stop strings (matched on
//! the text, across token boundaries, never leaked), log-probabilities and the finish reason.
//! Shared by both completion endpoints and by their streamed and non-streamed forms, so the
//! two forms give the same text.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::stream::{self, SelectAll, Stream, StreamExt};
use tokio::sync::mpsc::UnboundedReceiver;

use super::error::{ApiError, ApiResult};
use crate::engine::{Engine, Event, FinishReason, GenRequest, RequestId};
use crate::sampling::SamplingParams;
use crate::text::{DecodeStream, Tokenizer};

/// What one request asks of every choice.
#[derive(Clone)]
pub struct GenSettings {
    pub sampling: SamplingParams,
    /// Choice `i` of a prompt samples with `seed + i`, so that choices differ but a request
    /// repeated with the same seed gives the same choices.
    pub seed: Option<u64>,
    pub stop: Arc<Vec<String>>,
    pub stop_token_ids: Vec<u32>,
    pub include_stop_str_in_output: bool,
    pub skip_special_tokens: bool,
    /// `Some(k)`: report each token's log-probability and the `k` most likely.
    pub logprobs: Option<usize>,
}

/// One choice to generate: a prompt and a token budget.
pub struct ChoiceSpec {
    pub index: usize,
    pub prompt: Arc<Vec<u32>>,
    pub max_tokens: usize,
    /// Which choice of its prompt this is (for the seed).
    pub sample_index: usize,
}

type EventStream = Pin<Box<dyn Stream<Item = (usize, Event)> + Send>>;

/// The engine requests of one HTTP request. Dropping it cancels whatever is unfinished, so a
/// client that goes away frees its slots at once.
pub struct Submitted {
    engine: Engine,
    ids: Vec<(usize, RequestId)>,
    done: HashSet<usize>,
    pub events: SelectAll<EventStream>,
}

impl Submitted {
    /// Queues every choice; events arrive tagged with the choice index.
    pub fn submit(
        engine: &Engine,
        settings: &GenSettings,
        specs: &[ChoiceSpec],
    ) -> ApiResult<Self> {
        let mut sub = Submitted {
            engine: engine.clone(),
            ids: Vec::with_capacity(specs.len()),
            done: HashSet::new(),
            events: SelectAll::new(),
        };
        for spec in specs {
            let mut sampling = settings.sampling.clone();
            sampling.seed = settings
                .seed
                .map(|s| s.wrapping_add(spec.sample_index as u64));
            let req = GenRequest {
                prompt: spec.prompt.as_ref().clone(),
                sampling,
                max_tokens: spec.max_tokens,
                stop_token_ids: settings.stop_token_ids.clone(),
                logprobs: settings.logprobs,
            };
            // The prompt was checked against the context length before, so a failure here is
            // the engine's, not the client's.
            let (id, rx) = engine
                .submit(req)
                .map_err(|e| ApiError::internal(format!("cannot queue the request: {e:#}")))?;
            sub.ids.push((spec.index, id));
            sub.events.push(tagged(spec.index, rx));
        }
        Ok(sub)
    }

    /// Stops one choice early (a stop string matched).
    pub fn cancel(&mut self, index: usize) {
        if self.done.insert(index) {
            if let Some(&(_, id)) = self.ids.iter().find(|(i, _)| *i == index) {
                self.engine.cancel(id);
            }
        }
    }

    /// The next step of any choice (`choices[i].index == i`), or `None` once every choice has
    /// finished. Cancel-safe: the only await is the event receive.
    pub async fn next(&mut self, tok: &Tokenizer, choices: &mut [Choice]) -> Option<(usize, Step)> {
        loop {
            if choices.iter().all(Choice::is_finished) {
                return None;
            }
            match self.events.next().await {
                Some((i, event)) => {
                    let Some(choice) = choices.get_mut(i) else {
                        continue;
                    };
                    if choice.is_finished() {
                        continue;
                    }
                    let step = choice.on_event(tok, event);
                    if step.cancel {
                        self.cancel(i);
                    } else if step.finished {
                        self.done.insert(i);
                    }
                    return Some((i, step));
                }
                None => {
                    // Every event stream ended, yet a choice had no end: the engine is gone.
                    let i = choices.iter().position(|c| !c.is_finished())?;
                    self.done.insert(i);
                    return Some((i, choices[i].on_closed()));
                }
            }
        }
    }
}

impl Drop for Submitted {
    fn drop(&mut self) {
        for &(index, id) in &self.ids {
            if !self.done.contains(&index) {
                self.engine.cancel(id);
            }
        }
    }
}

fn tagged(index: usize, rx: UnboundedReceiver<Event>) -> EventStream {
    Box::pin(
        stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
            .map(move |e| (index, e)),
    )
}

/// A generated token's log-probability and the most likely alternatives.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Why a choice ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    /// EOS, a stop token id (`Some(id)` when the user asked for it) or a stop string.
    Stop(Option<StopReason>),
    Length,
    /// The engine dropped the request without our asking.
    Abort,
    Error(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum StopReason {
    Token(u32),
    Text(String),
}

impl Finish {
    pub fn reason(&self) -> &'static str {
        match self {
            Finish::Stop(_) => "stop",
            Finish::Length => "length",
            Finish::Abort | Finish::Error(_) => "abort",
        }
    }

    /// vLLM's `stop_reason`: the stop string or the user's stop token id that ended the
    /// choice, `null` for EOS and other ends.
    pub fn stop_reason(&self) -> serde_json::Value {
        match self {
            Finish::Stop(Some(StopReason::Token(id))) => serde_json::json!(id),
            Finish::Stop(Some(StopReason::Text(s))) => serde_json::json!(s),
            _ => serde_json::Value::Null,
        }
    }
}

/// What one engine event adds to a choice.
#[derive(Debug, Default)]
pub struct Step {
    /// Text released by this event (possibly empty: held back or not yet a whole character).
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    /// The choice ended with this event.
    pub finished: bool,
    /// The server ended it (stop string): the engine request must be cancelled.
    pub cancel: bool,
}

/// The state of one choice while it generates.
pub struct Choice {
    pub index: usize,
    pub prompt_tokens: usize,
    decode: DecodeStream,
    stop: StopMatcher,
    /// Tokens generated so far (the stop token included, as vLLM counts them).
    pub completion_tokens: usize,
    /// Prompt tokens the prefix cache held.
    pub cached_tokens: usize,
    pub finish: Option<Finish>,
    user_stop_ids: Arc<Vec<u32>>,
    want_logprobs: bool,
}

impl Choice {
    pub fn new(
        index: usize,
        prompt_tokens: usize,
        settings: &GenSettings,
        user_stop_ids: Arc<Vec<u32>>,
    ) -> Self {
        Choice {
            index,
            prompt_tokens,
            decode: DecodeStream::new(settings.skip_special_tokens),
            stop: StopMatcher::new(settings.stop.clone(), settings.include_stop_str_in_output),
            completion_tokens: 0,
            cached_tokens: 0,
            finish: None,
            user_stop_ids,
            want_logprobs: settings.logprobs.is_some(),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Takes one engine event. Events after the choice finished (already in flight when a
    /// stop string matched) are ignored.
    pub fn on_event(&mut self, tok: &Tokenizer, event: Event) -> Step {
        let mut step = Step::default();
        if self.finish.is_some() {
            return step;
        }
        match event {
            Event::Started { cached_tokens } => self.cached_tokens = cached_tokens,
            Event::Token {
                id,
                logprob,
                top_logprobs,
                is_stop,
            } => {
                self.completion_tokens += 1;
                if self.want_logprobs {
                    step.logprobs.push(TokenLogprob {
                        id,
                        logprob: logprob.unwrap_or(f32::NEG_INFINITY),
                        top: top_logprobs,
                    });
                }
                if is_stop {
                    // The stop token is not text; the engine's Done follows.
                    let reason = self
                        .user_stop_ids
                        .contains(&id)
                        .then_some(StopReason::Token(id));
                    self.end(&mut step, tok, Finish::Stop(reason));
                    return step;
                }
                match self.decode.step(tok, id) {
                    Ok(Some(piece)) => self.push_text(&mut step, &piece),
                    Ok(None) => {}
                    Err(e) => self.fail(&mut step, format!("detokenizing: {e:#}")),
                }
            }
            Event::Done { reason, .. } => {
                let finish = match reason {
                    FinishReason::Stop => Finish::Stop(None),
                    FinishReason::Length => Finish::Length,
                    FinishReason::Cancelled => Finish::Abort,
                };
                self.end(&mut step, tok, finish);
            }
            Event::Error(msg) => self.fail(&mut step, msg),
        }
        step
    }

    /// The stream of events ended without `Done` (the engine stopped).
    pub fn on_closed(&mut self) -> Step {
        let mut step = Step::default();
        if self.finish.is_none() {
            self.fail(&mut step, "the engine stopped".into());
        }
        step
    }

    fn push_text(&mut self, step: &mut Step, piece: &str) {
        let (text, matched) = self.stop.push(piece);
        step.text.push_str(&text);
        if let Some(s) = matched {
            self.finish = Some(Finish::Stop(Some(StopReason::Text(s))));
            step.finished = true;
            step.cancel = true;
        }
    }

    /// Releases what the detokenizer and the stop matcher still hold, then finishes (unless a
    /// stop string in that tail finishes first).
    fn end(&mut self, step: &mut Step, tok: &Tokenizer, finish: Finish) {
        match self.decode.flush(tok) {
            Ok(Some(rest)) => self.push_text(step, &rest),
            Ok(None) => {}
            Err(e) => return self.fail(step, format!("detokenizing: {e:#}")),
        }
        if self.finish.is_none() {
            step.text.push_str(&self.stop.finish());
            self.finish = Some(finish);
            step.finished = true;
        }
    }

    fn fail(&mut self, step: &mut Step, msg: String) {
        self.finish = Some(Finish::Error(msg));
        step.finished = true;
        step.cancel = true;
    }
}

/// Finds stop strings in text that arrives in pieces. Text that could be the beginning of a
/// stop string is held back until the next piece decides, so a stop string split over tokens
/// is still found and nothing of it is released.
pub struct StopMatcher {
    stops: Arc<Vec<String>>,
    include: bool,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Arc<Vec<String>>, include: bool) -> Self {
        StopMatcher {
            stops,
            include,
            pending: String::new(),
        }
    }

    /// Adds text; returns what can be released, and the stop string if one matched (then
    /// nothing after it is ever released).
    pub fn push(&mut self, piece: &str) -> (String, Option<String>) {
        if self.stops.is_empty() {
            return (piece.to_owned(), None);
        }
        self.pending.push_str(piece);
        // Everything released so far ended with no prefix of a stop string, so a match can
        // only start inside `pending`. The earliest match wins; at one position, the longest.
        let mut best: Option<(usize, &String)> = None;
        for s in self.stops.iter() {
            if let Some(pos) = self.pending.find(s.as_str()) {
                let better = match best {
                    None => true,
                    Some((p, b)) => pos < p || (pos == p && s.len() > b.len()),
                };
                if better {
                    best = Some((pos, s));
                }
            }
        }
        if let Some((pos, s)) = best {
            let end = if self.include { pos + s.len() } else { pos };
            let out = self.pending[..end].to_owned();
            let s = s.clone();
            self.pending.clear();
            return (out, Some(s));
        }
        let keep = self
            .stops
            .iter()
            .map(|s| partial_prefix_len(&self.pending, s))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        (out, None)
    }

    /// The end of the output: what was held back is plain text after all.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`. Such a suffix
/// starts at a character boundary of `text`, since a prefix of `stop` starts with one.
fn partial_prefix_len(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| stop.is_char_boundary(n) && text.as_bytes().ends_with(&stop.as_bytes()[..n]))
        .unwrap_or(0)
}

/// The raw bytes of each token, for log-probability reports (`bytes`, and `token` as their
/// lossy UTF-8): a byte-level BPE token is a run of bytes that need not be whole characters.
pub struct TokenText {
    added: HashSet<u32>,
}

impl TokenText {
    pub fn new(tok: &Tokenizer) -> Self {
        TokenText {
            added: tok
                .inner()
                .get_added_tokens_decoder()
                .keys()
                .copied()
                .collect(),
        }
    }

    pub fn bytes(&self, tok: &Tokenizer, id: u32) -> Vec<u8> {
        let Some(piece) = tok.id_to_token(id) else {
            // Padding rows of the embedding beyond the tokenizer: they decode to nothing.
            return Vec::new();
        };
        if self.added.contains(&id) {
            return piece.into_bytes();
        }
        let mapped: Option<Vec<u8>> = piece.chars().map(byte_level_to_byte).collect();
        // A vocabulary that is not byte-level: its pieces are text already.
        mapped.unwrap_or_else(|| piece.into_bytes())
    }

    pub fn text(&self, tok: &Tokenizer, id: u32) -> String {
        String::from_utf8_lossy(&self.bytes(tok, id)).into_owned()
    }
}

/// GPT-2's byte-level alphabet in reverse: printable bytes stand for themselves, the other 68
/// bytes (0–32, 127–160, 173) are the characters from U+0100 on, in byte order.
fn byte_level_to_byte(c: char) -> Option<u8> {
    let u = c as u32;
    if (33..=126).contains(&u) || (161..=172).contains(&u) || (174..=255).contains(&u) {
        return Some(u as u8);
    }
    let n = u.checked_sub(256)?;
    let others = (0u32..=32).chain(127..=160).chain(173..=173);
    others.clone().nth(n as usize).map(|b| b as u8)
}

/// A log-probability as JSON: -inf is not JSON, vLLM reports it as -9999.
pub fn lp_json(x: f32) -> serde_json::Value {
    let v = if x.is_finite() { x } else { -9999.0 };
    serde_json::json!(v)
}

/// The `usage` object of a response: prompt tokens once, completion tokens of every choice;
/// as cached prompt tokens, the fewest any choice found in the prefix cache (each choice
/// runs as its own sequence).
pub fn usage(prompt: usize, choices: &[Choice]) -> serde_json::Value {
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    let cached = choices.iter().map(|c| c.cached_tokens).min().unwrap_or(0);
    serde_json::json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// The last chunk of a stream with `stream_options.include_usage`: no choices, only usage.
pub fn usage_chunk(
    id: &str,
    object: &str,
    created: u64,
    model: &str,
    usage: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "object": object,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(
            Arc::new(stops.iter().map(|s| s.to_string()).collect()),
            false,
        )
    }

    #[test]
    fn stop_split_over_pieces() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("abc S"), ("abc ".into(), None));
        assert_eq!(m.push("T"), ("".into(), None));
        assert_eq!(m.push("OPxyz"), ("".into(), Some("STOP".into())));
    }

    #[test]
    fn false_start_is_released() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("ST"), ("".into(), None));
        assert_eq!(m.push("ART"), ("START".into(), None));
        assert_eq!(m.push("ST"), ("".into(), None));
        assert_eq!(m.finish(), "ST");
    }

    #[test]
    fn earliest_match_wins_and_multibyte() {
        let mut m = matcher(&["é!", "b"]);
        assert_eq!(m.push("aé"), ("a".into(), None));
        assert_eq!(m.push("!b"), ("".into(), Some("é!".into())));
    }

    #[test]
    fn include_stop() {
        let mut m = StopMatcher::new(Arc::new(vec!["\n\n".into()]), true);
        assert_eq!(m.push("x\n"), ("x".into(), None));
        assert_eq!(m.push("\ny"), ("\n\n".into(), Some("\n\n".into())));
    }

    #[test]
    fn byte_level_alphabet() {
        assert_eq!(byte_level_to_byte('a'), Some(b'a'));
        assert_eq!(byte_level_to_byte('Ġ'), Some(b' '));
        assert_eq!(byte_level_to_byte('Ċ'), Some(b'\n'));
        assert_eq!(byte_level_to_byte('\u{100}'), Some(0));
        assert_eq!(byte_level_to_byte('\u{143}'), Some(173));
        assert_eq!(byte_level_to_byte('\u{144}'), None);
    }
}
