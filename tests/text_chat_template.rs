//! Chat templates against transformers: `tests/fixtures/chat_templates/goldens.json` holds prompts
//! rendered by `apply_chat_template(..., tokenize=False)` (tools/gen_chat_goldens.py); each must be
//! reproduced byte for byte.

use std::path::{Path, PathBuf};

use qnext::text::{ChatTemplate, OrderedJson};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates")
}

fn template(variant: &str) -> ChatTemplate {
    ChatTemplate::from_file(fixtures().join(format!("tokenizer_config.{variant}.json")))
        .expect("fixture template loads")
}

struct Case {
    name: String,
    template: String,
    messages: OrderedJson,
    tools: Option<OrderedJson>,
    add_generation_prompt: bool,
    extra: Vec<(String, OrderedJson)>,
    expected: String,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("goldens.json")).expect("goldens.json");
    let doc = OrderedJson::parse(&text).expect("goldens.json is JSON");
    let Some(OrderedJson::Array(cases)) = doc.get("cases") else {
        panic!("goldens.json: no cases array");
    };
    cases
        .iter()
        .map(|c| {
            let str_field = |k: &str| c.get(k).and_then(OrderedJson::as_str).unwrap().to_owned();
            Case {
                name: str_field("name"),
                template: str_field("template"),
                messages: c.get("messages").unwrap().clone(),
                tools: c.get("tools").filter(|t| !t.is_null()).cloned(),
                add_generation_prompt: matches!(
                    c.get("add_generation_prompt"),
                    Some(OrderedJson::Bool(true))
                ),
                extra: match c.get("extra") {
                    Some(OrderedJson::Object(e)) => e.clone(),
                    _ => Vec::new(),
                },
                expected: str_field("expected"),
            }
        })
        .collect()
}

/// Fails with every differing case listed.
fn assert_no_failures(failures: &[String], total: usize) {
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        total,
        failures.join("\n")
    );
}

/// Where two renderings part, with some context, for a readable failure.
fn first_difference(got: &str, want: &str) -> String {
    let at = got
        .bytes()
        .zip(want.bytes())
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let window = |s: &str| {
        let start = at.saturating_sub(40);
        String::from_utf8_lossy(&s.as_bytes()[start..(at + 40).min(s.len())]).into_owned()
    };
    format!(
        "first difference at byte {at} (got {} bytes, want {}):\n  got:  {:?}\n  want: {:?}",
        got.len(),
        want.len(),
        window(got),
        window(want)
    )
}

#[test]
fn goldens_render_byte_identical() {
    let instruct = template("instruct");
    let thinking = template("thinking");
    let cases = cases();
    assert!(cases.len() >= 20, "only {} golden cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let tpl = match case.template.as_str() {
            "instruct" => &instruct,
            "thinking" => &thinking,
            other => panic!("{}: unknown template {other}", case.name),
        };
        let got = tpl.render_ordered(
            &case.messages,
            case.tools.as_ref(),
            case.add_generation_prompt,
            &case.extra,
        );
        match got {
            Ok(got) if got == case.expected => {}
            Ok(got) => failures.push(format!(
                "{}: {}",
                case.name,
                first_difference(&got, &case.expected)
            )),
            Err(e) => failures.push(format!("{}: error {e:#}", case.name)),
        }
    }
    assert_no_failures(&failures, cases.len());
}

/// True when `serde_json::Value` keeps object keys in document order (its `preserve_order`
/// feature); without it, only cases whose `tojson`-printed objects (tools, tool-call arguments)
/// are already sorted can go through `render`.
fn serde_json_preserves_order() -> bool {
    let v: serde_json::Value = serde_json::from_str(r#"{"b": 1, "a": 2}"#).unwrap();
    v.as_object().unwrap().keys().next().map(String::as_str) == Some("b")
}

fn keys_sorted(v: &OrderedJson) -> bool {
    match v {
        OrderedJson::Object(entries) => {
            entries.windows(2).all(|w| w[0].0 < w[1].0)
                && entries.iter().all(|(_, v)| keys_sorted(v))
        }
        OrderedJson::Array(items) => items.iter().all(keys_sorted),
        _ => true,
    }
}

/// Whether every object-valued tool-call `arguments` in the messages has sorted keys.
fn arguments_sorted(messages: &OrderedJson) -> bool {
    let OrderedJson::Array(messages) = messages else {
        return true;
    };
    messages.iter().all(|m| match m.get("tool_calls") {
        Some(OrderedJson::Array(calls)) => calls.iter().all(|c| {
            let f = c.get("function").unwrap_or(c);
            f.get("arguments").is_none_or(keys_sorted)
        }),
        _ => true,
    })
}

#[test]
fn goldens_through_serde_json_values() {
    let preserved = serde_json_preserves_order();
    let instruct = template("instruct");
    let thinking = template("thinking");
    let mut checked = 0;
    for case in cases() {
        let order_safe =
            case.tools.as_ref().is_none_or(keys_sorted) && arguments_sorted(&case.messages);
        if !preserved && !order_safe {
            continue;
        }
        let tpl = if case.template == "instruct" {
            &instruct
        } else {
            &thinking
        };
        let to_serde = |j: &OrderedJson| serde_json::to_value(j).unwrap();
        let messages = to_serde(&case.messages);
        let tools = case.tools.as_ref().map(to_serde);
        let extra: serde_json::Map<String, serde_json::Value> = case
            .extra
            .iter()
            .map(|(k, v)| (k.clone(), to_serde(v)))
            .collect();
        let got = tpl
            .render(
                &messages,
                tools.as_ref(),
                case.add_generation_prompt,
                &extra,
            )
            .unwrap();
        assert_eq!(got, case.expected, "{}", case.name);
        checked += 1;
    }
    assert!(checked > 0);
}

#[test]
fn thinking_generation_prompt_opens_think() {
    let msgs = OrderedJson::parse(r#"[{"role": "user", "content": "Hello"}]"#).unwrap();
    let got = template("thinking")
        .render_ordered(&msgs, None, true, &[])
        .unwrap();
    assert_eq!(
        got,
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n"
    );
}

#[test]
fn special_tokens_come_from_the_config() {
    let t = template("instruct");
    assert_eq!(t.bos_token(), None);
    assert_eq!(t.eos_token(), Some("<|im_end|>"));
    assert_eq!(t.special_token("pad_token"), Some("<|endoftext|>"));
    assert_eq!(t.names(), ["default"]);
}

fn render_source(source: &str, messages: &str) -> anyhow::Result<String> {
    let config = serde_json::json!({"chat_template": source, "eos_token": "</s>", "bos_token": {"content": "<s>"}});
    let t = ChatTemplate::from_config_json(&config.to_string(), "inline.json")?;
    t.render_ordered(&OrderedJson::parse(messages).unwrap(), None, false, &[])
}

#[test]
fn tojson_is_pythons_json_dumps() {
    let msgs = r#"[{"z": 1, "a": "<&>'\"é😀\n", "n": [1.0, 1e-7, 1e20, true, null]}]"#;
    assert_eq!(
        render_source("{{ messages[0] | tojson }}", msgs).unwrap(),
        r#"{"z": 1, "a": "<&>'\"é😀\n", "n": [1.0, 1e-07, 1e+20, true, null]}"#
    );
    assert_eq!(
        render_source("{{ messages[0].n | tojson(indent=2) }}", msgs).unwrap(),
        "[\n  1.0,\n  1e-07,\n  1e+20,\n  true,\n  null\n]"
    );
    assert_eq!(
        render_source(
            "{{ messages[0] | tojson(separators=(',', ':'), sort_keys=true, ensure_ascii=true) }}",
            msgs
        )
        .unwrap(),
        r#"{"a":"<&>'\"\u00e9\ud83d\ude00\n","n":[1.0,1e-07,1e+20,true,null],"z":1}"#
    );
}

#[test]
fn prints_like_python() {
    let msgs = r#"[{"t": true, "f": 2.0, "n": null, "l": ["a", 1, false], "m": {"k": "it's"}}]"#;
    let got = render_source(
        "{{ messages[0].t }}|{{ messages[0].f }}|{{ messages[0].n }}|{{ messages[0].l }}|{{ messages[0].m }}|{{ nothing }}",
        msgs,
    )
    .unwrap();
    // The message's null key is dropped (as transformers does), so `n` is undefined → "".
    assert_eq!(got, "True|2.0||['a', 1, False]|{'k': \"it's\"}|");
}

#[test]
fn template_globals_and_python_methods() {
    let src = "{{ bos_token }}{{ eos_token }}|{{ 'a,b,,c'.split(',') | length }}|{{ '\\n x \\n'.strip('\\n') }}|\
               {{ messages[::-1][0].role }}|{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|\
               {{ messages[0].items() | list | length }}|{{ strftime_now('%Y') | length }}";
    let got = render_source(src, r#"[{"role": "a"}, {"role": "b"}]"#).unwrap();
    assert_eq!(got, "<s></s>|4| x |b|2|1|4");
}

#[test]
fn raise_exception_is_an_error() {
    let err = render_source(
        "{{ raise_exception('Only user and assistant roles') }}",
        r#"[{"role": "x"}]"#,
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("Only user and assistant roles"), "{msg}");
    assert!(msg.contains("inline.json"), "{msg}");
}

#[test]
fn bad_inputs_are_errors_naming_the_field() {
    let t = template("instruct");
    let render = |m: &str, tools: Option<&str>| {
        let tools = tools.map(|s| OrderedJson::parse(s).unwrap());
        t.render_ordered(&OrderedJson::parse(m).unwrap(), tools.as_ref(), true, &[])
            .unwrap_err()
            .to_string()
    };
    assert!(render("{}", None).contains("messages must be an array"));
    assert!(render("[]", None).contains("empty"));
    assert!(render(r#"[{"role": "user", "content": "x"}, 3]"#, None).contains("messages[1]"));
    assert!(render(r#"[{"role": "user", "content": "x"}]"#, Some("{}"))
        .contains("tools must be an array"));
    assert!(render(r#"[{"role": "user", "content": "x"}]"#, Some("[1]")).contains("tools[0]"));
    let msgs = OrderedJson::parse(r#"[{"role": "user", "content": "x"}]"#).unwrap();
    let extra = vec![("messages".to_owned(), OrderedJson::Null)];
    assert!(t.render_ordered(&msgs, None, true, &extra).is_err());
}

#[test]
fn loads_every_source_form() {
    let dir = tempfile::tempdir().unwrap();
    let msgs = OrderedJson::parse(r#"[{"role": "user", "content": "hi"}]"#).unwrap();
    let render = |t: &ChatTemplate, tools: bool| {
        let tools = tools.then(|| OrderedJson::parse(r#"[{"type": "function"}]"#).unwrap());
        t.render_ordered(&msgs, tools.as_ref(), false, &[]).unwrap()
    };

    // A .jinja file: Jinja2 drops a single trailing newline of the source.
    let jinja = dir.path().join("t.jinja");
    std::fs::write(&jinja, "J:{{ messages[0].content }}\n").unwrap();
    assert_eq!(
        render(&ChatTemplate::from_file(&jinja).unwrap(), false),
        "J:hi"
    );

    // The list-of-named-templates form: "tool_use" when tools are given, else "default".
    let listed = dir.path().join("listed.json");
    std::fs::write(
        &listed,
        r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_file(&listed).unwrap();
    assert_eq!(render(&t, false), "D");
    assert_eq!(render(&t, true), "T");

    // A checkpoint directory: chat_template.jinja wins over tokenizer_config.json, whose special
    // tokens are still used.
    let ckpt = dir.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    std::fs::write(
        ckpt.join("tokenizer_config.json"),
        r#"{"chat_template": "config", "eos_token": "<|im_end|>"}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_checkpoint_dir(&ckpt).unwrap();
    assert_eq!(render(&t, false), "config");
    std::fs::write(ckpt.join("chat_template.jinja"), "jinja {{ eos_token }}").unwrap();
    let t = ChatTemplate::from_checkpoint_dir(&ckpt).unwrap();
    assert_eq!(render(&t, false), "jinja <|im_end|>");

    // Errors name the file.
    let missing = dir.path().join("missing.json");
    let err = ChatTemplate::from_file(&missing).err().unwrap();
    assert!(format!("{err:#}").contains("missing.json"));
    let no_field = dir.path().join("nofield.json");
    std::fs::write(&no_field, r#"{"eos_token": "x"}"#).unwrap();
    let err = ChatTemplate::from_file(&no_field).err().unwrap();
    assert!(err.to_string().contains("nofield.json") && err.to_string().contains("chat_template"));
    let bad_syntax = dir.path().join("bad.jinja");
    std::fs::write(&bad_syntax, "{% if %}").unwrap();
    assert!(ChatTemplate::from_file(&bad_syntax).is_err());
    assert!(ChatTemplate::from_checkpoint_dir(dir.path().join("nowhere")).is_err());
}

#[test]
fn text_types_can_be_shared_across_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<ChatTemplate>();
    shared::<qnext::text::Tokenizer>();
    shared::<OrderedJson>();
    fn owned<T: Send>() {}
    owned::<qnext::text::DecodeStream>();
    owned::<qnext::sampling::Sampler>();
}

/// A template that loops without end stops at the instruction bound, one that writes without
/// end at the output bound, each with an error that says so; the real templates render the
/// largest conversation a request may carry (8,192 messages, 128 tools) well within both.
#[test]
fn rendering_is_bounded_in_work_and_output() {
    use qnext::text::RenderLimits;
    let msgs = serde_json::json!([{"role": "user", "content": "hi"}]);
    let none = serde_json::Map::new();
    let spin = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
    let t = ChatTemplate::from_source(spin, "spin.jinja").unwrap();
    let e = format!("{:#}", t.render(&msgs, None, true, &none).unwrap_err());
    assert!(
        e.contains("spin.jinja") && e.contains("template instructions"),
        "{e}"
    );

    let flood = "{% for i in range(100000) %}{{ 'x' * 10000 }}{% endfor %}";
    let mut t = ChatTemplate::from_source(flood, "flood.jinja").unwrap();
    t.set_limits(RenderLimits {
        max_output_bytes: 1 << 20,
        ..RenderLimits::default()
    });
    let e = format!("{:#}", t.render(&msgs, None, true, &none).unwrap_err());
    assert!(
        e.contains("flood.jinja") && e.contains("1048576 bytes"),
        "{e}"
    );

    let messages: Vec<serde_json::Value> = (0..8192)
        .map(|i| match i % 4 {
            0 => serde_json::json!({"role": "user", "content": format!("question {i}")}),
            1 => serde_json::json!({"role": "assistant", "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "f0", "arguments": {"x": i}}}]}),
            2 => serde_json::json!({"role": "tool", "content": format!("result {i}")}),
            _ => serde_json::json!({"role": "assistant", "content": format!("answer {i}")}),
        })
        .collect();
    let tools: Vec<serde_json::Value> = (0..128)
        .map(|i| {
            serde_json::json!({"type": "function", "function": {"name": format!("f{i}"),
            "description": "a tool", "parameters": {"type": "object",
            "properties": {"x": {"type": "integer"}}}}})
        })
        .collect();
    for variant in ["instruct", "thinking"] {
        let mut t = template(variant);
        // A tenth of the default instruction bound is enough.
        t.set_limits(RenderLimits {
            fuel: RenderLimits::default().fuel / 10,
            ..RenderLimits::default()
        });
        let text = t
            .render(
                &serde_json::Value::Array(messages.clone()),
                Some(&serde_json::Value::Array(tools.clone())),
                true,
                &none,
            )
            .unwrap_or_else(|e| panic!("{variant}: {e:#}"));
        assert!(text.contains("answer 8191"));
    }
}

/// The Qwen3.5 / 3.6 family's templates (`qwen3.5.jinja`, `qwen3.5-small.jinja`,
/// `qwen3.6.jinja`) against transformers: `goldens_qwen35.json`, the same scenarios with
/// tool-call arguments as objects (as vLLM passes them), `enable_thinking` both ways and
/// Qwen3.6's `preserve_thinking`. A case the template refuses must be refused here too.
#[test]
fn qwen35_goldens_render_byte_identical() {
    let text = std::fs::read_to_string(fixtures().join("goldens_qwen35.json")).unwrap();
    let doc = OrderedJson::parse(&text).unwrap();
    let Some(OrderedJson::Object(files)) = doc.get("templates") else {
        panic!("goldens_qwen35.json: no templates");
    };
    let templates: Vec<(String, ChatTemplate)> = files
        .iter()
        .map(|(name, file)| {
            let path = fixtures().join(file.as_str().unwrap());
            (name.clone(), ChatTemplate::from_file(path).unwrap())
        })
        .collect();
    let Some(OrderedJson::Array(cases)) = doc.get("cases") else {
        panic!("goldens_qwen35.json: no cases");
    };
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for c in cases {
        let name = c.get("name").and_then(OrderedJson::as_str).unwrap();
        let variant = c.get("template").and_then(OrderedJson::as_str).unwrap();
        let tpl = &templates.iter().find(|(n, _)| n == variant).unwrap().1;
        let extra = match c.get("extra") {
            Some(OrderedJson::Object(e)) => e.clone(),
            _ => Vec::new(),
        };
        let got = tpl.render_ordered(
            c.get("messages").unwrap(),
            c.get("tools").filter(|t| !t.is_null()),
            matches!(
                c.get("add_generation_prompt"),
                Some(OrderedJson::Bool(true))
            ),
            &extra,
        );
        match (got, c.get("expected").and_then(OrderedJson::as_str)) {
            (Ok(got), Some(want)) if got == want => {}
            (Ok(got), Some(want)) => {
                failures.push(format!("{name}: {}", first_difference(&got, want)))
            }
            (Err(e), Some(_)) => failures.push(format!("{name}: error {e:#}")),
            (Err(_), None) => {}
            (Ok(_), None) => failures.push(format!("{name}: rendered, transformers refused it")),
        }
    }
    assert_no_failures(&failures, cases.len());
}
