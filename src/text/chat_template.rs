//! Chat templates: messages (+ tools) → prompt text, byte-identical to
//! `transformers.PreTrainedTokenizerBase.apply_chat_template(..., tokenize=False)`.
//!
//! transformers renders with Jinja2 (`ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True)` + loop controls) and its own globals; this module rebuilds that
//! environment on minijinja:
//! - `tojson` is `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
//!   sort_keys=False)`: Python separators, non-ASCII kept, key order kept, no HTML escaping;
//! - `raise_exception(msg)`, `strftime_now(fmt)`; Python string/dict methods (`startswith`,
//!   `split`, `rstrip('\n')`, `items()`, …) via minijinja-contrib's pycompat;
//! - `{{ x }}` prints Python's `str(x)` (`True`, `None`, `['a']`);
//! - the inputs are prepared as transformers does: `None`-valued message keys dropped,
//!   `reasoning_content`/`thinking`/`reasoning` aliased, special tokens (`eos_token`, …) from
//!   `tokenizer_config.json` passed as variables, extra kwargs overriding them;
//! - objects keep their key order ([`OrderedJson`]).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use minijinja::value::{ArgType, Kwargs, Rest, Value};
use minijinja::{Environment, Error, ErrorKind, State};

use super::ordered_json::OrderedJson;
use super::pyjson::{self, DumpOptions};
use super::strftime;

/// The file names a checkpoint may carry its template in, in transformers' order of priority.
const CHECKPOINT_TEMPLATE_FILES: [&str; 3] = [
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer_config.json",
];

/// The named special tokens transformers passes to every template (`special_tokens_map`).
const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Template arguments set by the renderer itself; an extra kwarg of the same name would be a
/// "multiple values for keyword argument" TypeError in Python.
const RESERVED_ARGS: [&str; 3] = ["messages", "tools", "add_generation_prompt"];

/// Message keys that carry reasoning, in the order transformers looks for one.
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// A compiled chat template (or a set of named ones) with the special tokens it sees.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Names of the compiled templates, as found in the source.
    names: Vec<String>,
    /// `(name, token)` for the special tokens of `tokenizer_config.json` that are set.
    special_tokens: Vec<(String, String)>,
    /// Where the template came from, for errors.
    origin: String,
    limits: RenderLimits,
}

/// Bounds on one rendering, so that a template that loops or grows its output without end
/// (a checkpoint's is code its author wrote) ends with an error instead of taking the
/// process's time and memory.
#[derive(Clone, Copy, Debug)]
pub struct RenderLimits {
    /// Bytes of rendered text.
    pub max_output_bytes: usize,
    /// Template instructions executed (minijinja's fuel): the real templates take about
    /// 60 per message and 40 per tool.
    pub fuel: u64,
}

impl Default for RenderLimits {
    /// 256 MiB of text and 100 million instructions (about a second of rendering): far above
    /// any conversation a request can carry (64 MiB, 8,192 messages, 128 tools).
    fn default() -> Self {
        RenderLimits {
            max_output_bytes: 256 << 20,
            fuel: 100_000_000,
        }
    }
}

impl ChatTemplate {
    /// A single template from its source text.
    pub fn from_source(source: &str, origin: &str) -> Result<Self> {
        Self::build(
            vec![("default".to_owned(), source.to_owned())],
            Vec::new(),
            origin,
        )
    }

    /// Reads a checkpoint directory: the template from `chat_template.jinja`, else
    /// `chat_template.json`, else `tokenizer_config.json`; special tokens from
    /// `tokenizer_config.json` when present.
    pub fn from_checkpoint_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("tokenizer_config.json");
        let special_tokens = if config_path.exists() {
            special_tokens_of(&read_json(&config_path)?, &config_path)?
        } else {
            Vec::new()
        };
        let Some(path) = CHECKPOINT_TEMPLATE_FILES
            .iter()
            .map(|name| dir.join(name))
            .find(|p| p.exists())
        else {
            bail!(
                "no chat template in {}: none of {} exists",
                dir.display(),
                CHECKPOINT_TEMPLATE_FILES.join(", ")
            );
        };
        let mut template = Self::from_file(&path)?;
        template.special_tokens = special_tokens;
        Ok(template)
    }

    /// Reads `--chat-template FILE`: a JSON file with a `chat_template` field (a string, or a
    /// list of `{name, template}`), with its special tokens if it is a `tokenizer_config.json`;
    /// any other file is the Jinja source itself.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        let is_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        if !is_json {
            let source = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read chat template {origin}"))?;
            return Self::from_source(&source, &origin);
        }
        let config = read_json(path)?;
        let templates = templates_of(&config, path)?;
        let special_tokens = special_tokens_of(&config, path)?;
        Self::build(templates, special_tokens, &origin)
    }

    /// Parses a `tokenizer_config.json` (or `chat_template.json`) held in memory.
    pub fn from_config_json(text: &str, origin: &str) -> Result<Self> {
        let config = OrderedJson::parse(text).with_context(|| format!("{origin}: invalid JSON"))?;
        let path = Path::new(origin);
        let templates = templates_of(&config, path)?;
        let special_tokens = special_tokens_of(&config, path)?;
        Self::build(templates, special_tokens, origin)
    }

    /// The special token of a name (`"eos_token"`), as the template sees it.
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
    }

    /// `bos_token` from the config; `None` for Qwen.
    pub fn bos_token(&self) -> Option<&str> {
        self.special_token("bos_token")
    }

    /// `eos_token` from the config (`<|im_end|>` for Qwen3-Next).
    pub fn eos_token(&self) -> Option<&str> {
        self.special_token("eos_token")
    }

    /// Names of the templates held (`["default"]` for a single template).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Bounds every later rendering by `limits`.
    pub fn set_limits(&mut self, limits: RenderLimits) {
        self.env.set_fuel(Some(limits.fuel));
        self.limits = limits;
    }

    /// Renders `messages` (a JSON array of message objects) with optional `tools` (a JSON array of
    /// OpenAI tool objects). `extra` are further template variables (e.g. `enable_thinking`).
    ///
    /// Object key order is that of the `serde_json` values: sorted unless serde_json's
    /// `preserve_order` feature is on. Use [`ChatTemplate::render_ordered`] with
    /// [`OrderedJson`] to keep the order of the request text regardless.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let extra: Vec<(String, OrderedJson)> = extra
            .iter()
            .map(|(k, v)| (k.clone(), OrderedJson::from(v)))
            .collect();
        self.render_ordered(
            &OrderedJson::from(messages),
            tools.map(OrderedJson::from).as_ref(),
            add_generation_prompt,
            &extra,
        )
    }

    /// [`ChatTemplate::render`] on order-preserving JSON.
    pub fn render_ordered(
        &self,
        messages: &OrderedJson,
        tools: Option<&OrderedJson>,
        add_generation_prompt: bool,
        extra: &[(String, OrderedJson)],
    ) -> Result<String> {
        let messages = prepare_messages(messages)?;
        let tools = match tools {
            None | Some(OrderedJson::Null) => None,
            Some(OrderedJson::Array(items)) => {
                if let Some((i, bad)) = items
                    .iter()
                    .enumerate()
                    .find(|(_, t)| !matches!(t, OrderedJson::Object(_)))
                {
                    bail!("tools[{i}] must be an object, not {}", bad.kind());
                }
                Some(items)
            }
            Some(other) => bail!("tools must be an array, not {}", other.kind()),
        };
        if let Some((name, _)) = extra
            .iter()
            .find(|(k, _)| RESERVED_ARGS.contains(&k.as_str()))
        {
            bail!("extra template argument {name:?} is set by the renderer itself");
        }

        let name = self.pick_template(tools.is_some())?;
        let template = self
            .env
            .get_template(name)
            .map_err(|e| anyhow!("chat template {}: {}", self.origin, describe(&e)))?;

        // Later entries win, as in `{**special_tokens_map, **kwargs}`.
        let mut ctx: Vec<(String, Value)> = Vec::new();
        let mut set = |k: &str, v: Value| match ctx.iter_mut().find(|(n, _)| n == k) {
            Some(slot) => slot.1 = v,
            None => ctx.push((k.to_owned(), v)),
        };
        set("messages", Value::from(messages));
        set(
            "tools",
            tools.map_or(Value::from(()), |t| {
                Value::from(
                    t.iter()
                        .map(OrderedJson::to_template_value)
                        .collect::<Vec<_>>(),
                )
            }),
        );
        set("documents", Value::from(()));
        set("add_generation_prompt", Value::from(add_generation_prompt));
        for (k, v) in &self.special_tokens {
            set(k, Value::from(v.as_str()));
        }
        for (k, v) in extra {
            set(k, v.to_template_value());
        }
        let ctx: Value = ctx.into_iter().collect();
        let mut out = Bounded {
            text: Vec::new(),
            max: self.limits.max_output_bytes,
        };
        match template.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.text)
                .map_err(|_| anyhow!("chat template {}: output is not UTF-8", self.origin)),
            Err(_) if out.text.len() > out.max => bail!(
                "chat template {}: its output passed {} bytes, the bound on one rendering",
                self.origin,
                out.max
            ),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => bail!(
                "chat template {}: rendering took more than {} template instructions, the \
                 bound on one rendering",
                self.origin,
                self.limits.fuel
            ),
            Err(e) => bail!("chat template {}: {}", self.origin, describe(&e)),
        }
    }

    fn build(
        templates: Vec<(String, String)>,
        special_tokens: Vec<(String, String)>,
        origin: &str,
    ) -> Result<Self> {
        let mut env = jinja2_environment();
        let mut names = Vec::new();
        for (name, source) in templates {
            env.add_template_owned(name.clone(), source)
                .map_err(|e| anyhow!("chat template {origin} ({name}): {}", describe(&e)))?;
            names.push(name);
        }
        let mut template = Self {
            env,
            names,
            special_tokens,
            origin: origin.to_owned(),
            limits: RenderLimits::default(),
        };
        template.set_limits(RenderLimits::default());
        Ok(template)
    }

    /// transformers' `get_chat_template`: "tool_use" when tools are given and it exists, else
    /// "default", else the only one.
    fn pick_template(&self, has_tools: bool) -> Result<&str> {
        let has = |n: &str| self.names.iter().any(|x| x == n);
        if has_tools && has("tool_use") {
            return Ok("tool_use");
        }
        if has("default") {
            return Ok("default");
        }
        match self.names.as_slice() {
            [only] => Ok(only),
            _ => bail!(
                "chat template {}: several templates ({}) and none named \"default\"",
                self.origin,
                self.names.join(", ")
            ),
        }
    }
}

/// Rendered text, refused past `max` bytes.
struct Bounded {
    text: Vec<u8>,
    max: usize,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.max {
            self.text
                .extend_from_slice(&buf[..(self.max + 1 - self.text.len()).min(buf.len())]);
            return Err(std::io::Error::other("the rendering's output bound"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A minijinja environment that behaves as transformers' Jinja2 one.
fn jinja2_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(|out, _state, value| {
        out.write_str(&pyjson::py_str(value)).map_err(Error::from)
    });
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`,
/// arguments by position or by name.
fn tojson(value: &Value, args: Rest<Value>) -> Result<String, Error> {
    let mut positional: Vec<Value> = args.0;
    let kwargs = match positional.last() {
        Some(last) if last.is_kwargs() => {
            let last = positional.pop().unwrap_or_default();
            Kwargs::from_value(Some(&last))?
        }
        _ => Kwargs::from_iter(std::iter::empty::<(String, Value)>()),
    };
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if positional.len() > NAMES.len() {
        return Err(invalid("tojson: too many arguments"));
    }
    let mut arg = |i: usize| -> Result<Option<Value>, Error> {
        let named: Option<Value> = kwargs.get(NAMES[i])?;
        let value = named.or_else(|| positional.get_mut(i).map(std::mem::take));
        Ok(value.filter(|v| !v.is_none() && !v.is_undefined()))
    };
    let ensure_ascii = arg(0)?.is_some_and(|v| v.is_true());
    let indent = match arg(1)? {
        None => None,
        Some(v) if v.is_integer() => {
            let n = i64::try_from(v)?;
            Some(" ".repeat(usize::try_from(n).unwrap_or(0)))
        }
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_owned()),
            None => return Err(invalid("tojson: indent must be an integer or a string")),
        },
    };
    let separators = match arg(2)? {
        None => None,
        Some(v) => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [item, key] => match (item.as_str(), key.as_str()) {
                    (Some(i), Some(k)) => Some((i.to_owned(), k.to_owned())),
                    _ => return Err(invalid("tojson: separators must be two strings")),
                },
                _ => return Err(invalid("tojson: separators must be two strings")),
            }
        }
    };
    let sort_keys = arg(3)?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    pyjson::dumps(
        value,
        &DumpOptions::new(ensure_ascii, indent, separators, sort_keys),
    )
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(invalid(message))
}

fn strftime_now(_state: &State, format: String) -> Result<String, Error> {
    strftime::strftime_now(&format).map_err(invalid)
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg.into())
}

/// The message, plus the template line it failed on when minijinja knows it.
fn describe(e: &Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        msg.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    msg
}

/// What transformers does to the conversation before rendering: `_normalize_chat_messages`
/// (drop keys whose value is None) then `_alias_reasoning_fields`.
fn prepare_messages(messages: &OrderedJson) -> Result<Vec<Value>> {
    let OrderedJson::Array(list) = messages else {
        bail!("messages must be an array, not {}", messages.kind());
    };
    if list.is_empty() {
        bail!("messages is empty: cannot apply the chat template to an empty conversation");
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, message) in list.iter().enumerate() {
        let OrderedJson::Object(entries) = message else {
            bail!("messages[{i}] must be an object, not {}", message.kind());
        };
        let mut entries: Vec<(String, OrderedJson)> = entries
            .iter()
            .filter(|(_, v)| !v.is_null())
            .cloned()
            .collect();
        let reasoning = REASONING_FIELDS
            .iter()
            .find_map(|f| entries.iter().find(|(k, _)| k == f).map(|(_, v)| v.clone()));
        if let Some(reasoning) = reasoning {
            // `{"thinking": r, **message, "reasoning_content": r}`: `thinking` comes first and
            // keeps a value of its own; `reasoning_content` keeps its place or goes last.
            let thinking = entries
                .iter()
                .find(|(k, _)| k == "thinking")
                .map_or_else(|| reasoning.clone(), |(_, v)| v.clone());
            let mut aliased = Vec::with_capacity(entries.len() + 2);
            aliased.push(("thinking".to_owned(), thinking));
            let mut has_reasoning_content = false;
            for (k, v) in entries {
                match k.as_str() {
                    "thinking" => {}
                    "reasoning_content" => {
                        has_reasoning_content = true;
                        aliased.push((k, reasoning.clone()));
                    }
                    _ => aliased.push((k, v)),
                }
            }
            if !has_reasoning_content {
                aliased.push(("reasoning_content".to_owned(), reasoning));
            }
            entries = aliased;
        }
        out.push(OrderedJson::Object(entries).to_template_value());
    }
    Ok(out)
}

fn read_json(path: &Path) -> Result<OrderedJson> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    OrderedJson::parse(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// `chat_template` of a config: a string, a list of `{name, template}`, or (as transformers
/// stores it in memory) an object of name → template.
fn templates_of(config: &OrderedJson, path: &Path) -> Result<Vec<(String, String)>> {
    let where_ = path.display();
    match config.get("chat_template") {
        None | Some(OrderedJson::Null) => bail!("{where_}: no chat_template field"),
        Some(OrderedJson::String(s)) => Ok(vec![("default".to_owned(), s.clone())]),
        Some(OrderedJson::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let name = item.get("name").and_then(OrderedJson::as_str);
                let template = item.get("template").and_then(OrderedJson::as_str);
                match (name, template) {
                    (Some(n), Some(t)) => Ok((n.to_owned(), t.to_owned())),
                    _ => {
                        bail!("{where_}: chat_template[{i}] needs string fields name and template")
                    }
                }
            })
            .collect(),
        Some(OrderedJson::Object(entries)) => entries
            .iter()
            .map(|(name, t)| match t.as_str() {
                Some(t) => Ok((name.clone(), t.to_owned())),
                None => bail!("{where_}: chat_template.{name} must be a string"),
            })
            .collect(),
        Some(other) => bail!(
            "{where_}: chat_template must be a string or a list, not {}",
            other.kind()
        ),
    }
}

/// The named special tokens of a tokenizer config: a string, or an AddedToken object with
/// `content`; null or absent means unset.
fn special_tokens_of(config: &OrderedJson, path: &Path) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for name in SPECIAL_TOKEN_NAMES {
        let token = match config.get(name) {
            None | Some(OrderedJson::Null) => continue,
            Some(OrderedJson::String(s)) => s.clone(),
            Some(obj @ OrderedJson::Object(_)) => {
                match obj.get("content").and_then(OrderedJson::as_str) {
                    Some(s) => s.to_owned(),
                    None => bail!("{}: {name}.content must be a string", path.display()),
                }
            }
            Some(other) => bail!(
                "{}: {name} must be a string or null, not {}",
                path.display(),
                other.kind()
            ),
        };
        out.push((name.to_owned(), token));
    }
    Ok(out)
}
