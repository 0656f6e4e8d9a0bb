//! The `qwen3_coder` tool-call parser: the XML-like calls the Qwen3.5 / 3.6 chat templates ask
//! for (and Qwen3-Coder's), as vLLM parses them with `--tool-call-parser qwen3_coder`:
//!
//! ```text
//! <tool_call>
//! <function=NAME>
//! <parameter=KEY>
//! VALUE (raw text, may span lines)
//! </parameter>
//! </function>
//! </tool_call>
//! ```
//!
//! Behaviour of vLLM's `vllm/tool_parsers/qwen3coder_tool_parser.py` as released in 0.22–0.23
//! (the last releases with that file; later ones run the same format through a new parser
//! engine), `extract_tool_calls`:
//!
//! 1. Blocks are what `<tool_call>(.*?)</tool_call>|<tool_call>(.*?)$` captures (DOTALL): to the
//!    first `</tool_call>`, or to the end for an unterminated last block, where Python's `$`
//!    also matches before one final `"\n"`, which is therefore not part of the block.
//! 2. In each block, every `<function=(.*?)</function>|<function=(.*)$` is a call: the name is
//!    the text up to the first `>` (not stripped; a function without `>` is skipped), the
//!    parameters are the matches of
//!    `<parameter=(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>)|$)` after it: the key up
//!    to the first `>` (not stripped; a parameter without `>` makes the whole parse fail), the
//!    value after it with exactly one leading and one trailing `"\n"` removed. A repeated key
//!    keeps its first place and takes the last value.
//! 3. Each value is typed by the request's tool schema (`parameters.properties[key]`):
//!    its types are `type` (a string or a list), the types of its `enum` values and those of its
//!    `anyOf` / `oneOf` / `allOf` branches, aliases folded (`int`, `long`, … → integer; `float`,
//!    `double` → number; `bool` → boolean; `dict` → object; `list`, `arr` → array; `str`, `text`,
//!    `enum` … → string), `string` when there are none (an unknown function or key too). They are
//!    tried in the order null (`"null"` in any case), integer (Python `int()`), number (Python
//!    `float()`, an integral value as an integer; infinity makes the whole parse fail), boolean
//!    (`true`/`1`, `false`/`0` after stripping, in any case), object/array (`json.loads`), string
//!    (the raw text); when none applies, `json.loads` of the text, else the text.
//! 4. `arguments` is Python's `json.dumps(params, ensure_ascii=False)`.
//! 5. Content is the text before the first `<tool_call>`, `None` when empty or only whitespace
//!    (vLLM's serving layer); text between and after blocks is dropped. Without any call the
//!    whole text is content, and so it is when anything in 2–3 fails.
//!
//! One deliberate difference: vLLM also accepts a bare `<function=…>` without `<tool_call>`
//! around it (its streaming path does not); here a call needs its `<tool_call>`, as the
//! templates write it, so that streaming and non-streaming agree.

use std::sync::Arc;

use serde_json::Value;

use super::ordered_json::OrderedJson;
use super::tool_calls::write_py_json;

const FUNCTION: &str = "<function=";
const FUNCTION_END: &str = "</function>";
const PARAMETER: &str = "<parameter=";
const PARAMETER_END: &str = "</parameter>";

/// The parameter schemas of a request's tools, by function name: what the values are typed by.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToolSchemas {
    functions: Vec<(String, serde_json::Map<String, Value>)>,
}

impl ToolSchemas {
    /// From an OpenAI `tools` array (`[{"type": "function", "function": {"name", "parameters"}}]`);
    /// the first tool of a name counts.
    pub fn from_tools(tools: Option<&Value>) -> Arc<ToolSchemas> {
        let functions = tools
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|t| {
                let f = t.get("function")?;
                let name = f.get("name")?.as_str()?.to_owned();
                let props = f
                    .get("parameters")
                    .and_then(|p| p.get("properties"))
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                Some((name, props))
            })
            .collect();
        Arc::new(ToolSchemas { functions })
    }

    fn schema(&self, function: &str, key: &str) -> Option<&Value> {
        let (_, props) = self.functions.iter().find(|(n, _)| n == function)?;
        props.get(key)
    }
}

/// The calls of one block's text (between `<tool_call>` and `</tool_call>`, or to the end of
/// the output when `terminated` is false) as `(name, arguments JSON text)`, or `None` where
/// vLLM's parse raises (which makes the whole output content).
pub(super) fn parse_block(
    block: &str,
    terminated: bool,
    schemas: &ToolSchemas,
) -> Option<Vec<(String, String)>> {
    // Python's `$` matches before one final newline: an unterminated block stops there.
    let block = if terminated {
        block
    } else {
        block.strip_suffix('\n').unwrap_or(block)
    };
    let mut calls = Vec::new();
    let mut pos = 0;
    while let Some(s) = block[pos..].find(FUNCTION) {
        let start = pos + s + FUNCTION.len();
        let (text, next) = match block[start..].find(FUNCTION_END) {
            Some(e) => (&block[start..start + e], start + e + FUNCTION_END.len()),
            None => (&block[start..], block.len()),
        };
        pos = next;
        let Some(gt) = text.find('>') else { continue };
        let name = &text[..gt];
        let params = parameters(&text[gt + 1..], name, schemas)?;
        let mut json = String::new();
        write_py_json(&mut json, &OrderedJson::Object(params));
        calls.push((name.to_owned(), json));
    }
    Some(calls)
}

/// The typed parameters of one function's text after its name, in first-seen key order.
fn parameters(
    text: &str,
    function: &str,
    schemas: &ToolSchemas,
) -> Option<Vec<(String, OrderedJson)>> {
    let mut out: Vec<(String, OrderedJson)> = Vec::new();
    let mut pos = 0;
    while let Some(s) = text[pos..].find(PARAMETER) {
        let v0 = pos + s + PARAMETER.len();
        // The lazy match ends at the earliest terminator: `</parameter>` (consumed), the next
        // `<parameter=` or `</function>` (not consumed), or `$` (before a final newline, or
        // at the end).
        let rest = &text[v0..];
        let mut end = (rest.len(), rest.len());
        if rest.ends_with('\n') {
            end = (rest.len() - 1, rest.len() - 1);
        }
        if let Some(e) = rest.find(PARAMETER_END) {
            end = end.min((e, e + PARAMETER_END.len()));
        }
        for tag in [PARAMETER, FUNCTION_END] {
            if let Some(e) = rest.find(tag) {
                end = end.min((e, e));
            }
        }
        let m = &rest[..end.0];
        pos = v0 + end.1;
        let gt = m.find('>')?;
        let key = &m[..gt];
        let value = &m[gt + 1..];
        let value = value.strip_prefix('\n').unwrap_or(value);
        let value = value.strip_suffix('\n').unwrap_or(value);
        let typed = typed(value, schemas.schema(function, key))?;
        match out.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = typed,
            None => out.push((key.to_owned(), typed)),
        }
    }
    Some(out)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Type {
    Null,
    Integer,
    Number,
    Boolean,
    Object,
    Array,
    String,
    /// A type name none of the above folds to: it types nothing, but the schema then has a
    /// type, so an untyped value goes to the final `json.loads`.
    Other,
}

fn fold(t: &str) -> Option<Type> {
    Some(match t.trim().to_lowercase().as_str() {
        "null" => Type::Null,
        "integer" | "int" | "int32" | "int64" | "uint" | "uint32" | "uint64" | "long" | "short"
        | "unsigned" => Type::Integer,
        "number" | "float" | "float32" | "float64" | "double" => Type::Number,
        "boolean" | "bool" => Type::Boolean,
        "object" | "dict" => Type::Object,
        "array" | "arr" | "list" | "sequence" => Type::Array,
        "string" | "str" | "text" | "varchar" | "char" | "enum" => Type::String,
        _ => Type::Other,
    })
}

/// The types a parameter schema allows (see the module docs).
fn types_of(schema: &Value, out: &mut Vec<Type>) {
    let Some(o) = schema.as_object() else { return };
    match o.get("type") {
        Some(Value::String(t)) => out.extend(fold(t)),
        Some(Value::Array(ts)) => out.extend(ts.iter().filter_map(Value::as_str).filter_map(fold)),
        _ => {}
    }
    if let Some(Value::Array(values)) = o.get("enum") {
        out.extend(values.iter().map(|v| match v {
            Value::Null => Type::Null,
            Value::Bool(_) => Type::Boolean,
            Value::Number(n) if n.is_f64() => Type::Number,
            Value::Number(_) => Type::Integer,
            Value::String(_) => Type::String,
            Value::Array(_) => Type::Array,
            Value::Object(_) => Type::Object,
        }));
    }
    for k in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(branches)) = o.get(k) {
            for b in branches {
                types_of(b, out);
            }
        }
    }
}

/// A parameter's text as its schema types it; `None` where Python raises (infinity).
fn typed(value: &str, schema: Option<&Value>) -> Option<OrderedJson> {
    let mut types = Vec::new();
    if let Some(s) = schema {
        types_of(s, &mut types);
    }
    if types.is_empty() {
        types.push(Type::String);
    }
    let has = |t: Type| types.contains(&t);
    if has(Type::Null) && value.to_lowercase() == "null" {
        return Some(OrderedJson::Null);
    }
    if has(Type::Integer) {
        if let Some(i) = py_int(value) {
            return Some(i);
        }
    }
    if has(Type::Number) {
        if let Some(f) = py_float(value) {
            if f.is_infinite() {
                return None; // OverflowError from int(inf), not caught
            }
            if !f.is_nan() {
                return Some(integral(f).unwrap_or(OrderedJson::Float(f)));
            }
        }
    }
    if has(Type::Boolean) {
        match value.trim().to_lowercase().as_str() {
            "true" | "1" => return Some(OrderedJson::Bool(true)),
            "false" | "0" => return Some(OrderedJson::Bool(false)),
            _ => {}
        }
    }
    if has(Type::Object) || has(Type::Array) {
        if let Ok(v) = OrderedJson::parse(value) {
            return Some(v);
        }
    }
    if has(Type::String) {
        return Some(OrderedJson::String(value.to_owned()));
    }
    Some(OrderedJson::parse(value).unwrap_or_else(|_| OrderedJson::String(value.to_owned())))
}

/// `int(f)` of an integral float, where it fits 64 bits.
fn integral(f: f64) -> Option<OrderedJson> {
    if f.fract() != 0.0 {
        return None;
    }
    if f >= -(2f64.powi(63)) && f < 2f64.powi(63) {
        Some(OrderedJson::Int(f as i64))
    } else if f >= 0.0 && f < 2f64.powi(64) {
        Some(OrderedJson::UInt(f as u64))
    } else {
        None
    }
}

/// Python's `int(text)`: surrounding whitespace, a sign, ASCII digits with single `_` between
/// them. Values beyond 64 bits are not taken (Python's would be exact big integers).
fn py_int(text: &str) -> Option<OrderedJson> {
    let t = text.trim();
    let (neg, digits) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    let clean = underscores_removed(digits)?;
    if clean.is_empty() || !clean.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if neg {
        clean
            .parse::<i128>()
            .ok()
            .and_then(|v| i64::try_from(-v).ok())
            .map(OrderedJson::Int)
    } else {
        match clean.parse::<i64>() {
            Ok(v) => Some(OrderedJson::Int(v)),
            Err(_) => clean.parse::<u64>().ok().map(OrderedJson::UInt),
        }
    }
}

/// Python's `float(text)`: surrounding whitespace, `_` between digits, `inf`, `infinity`,
/// `nan` in any case.
fn py_float(text: &str) -> Option<f64> {
    let t = text.trim();
    let (sign, body) = match t.as_bytes().first()? {
        b'-' => (-1.0, &t[1..]),
        b'+' => (1.0, &t[1..]),
        _ => (1.0, t),
    };
    match body.to_lowercase().as_str() {
        "inf" | "infinity" => return Some(sign * f64::INFINITY),
        "nan" => return Some(f64::NAN),
        _ => {}
    }
    let clean = underscores_removed(body)?;
    let ok = !clean.is_empty()
        && clean
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
        && clean.bytes().any(|b| b.is_ascii_digit());
    if !ok {
        return None;
    }
    clean.parse::<f64>().ok().map(|v| sign * v)
}

/// `text` without the `_` separators Python allows between two digits; `None` for one
/// elsewhere.
fn underscores_removed(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    for (i, &c) in b.iter().enumerate() {
        if c == b'_' {
            let between =
                i > 0 && i + 1 < b.len() && b[i - 1].is_ascii_digit() && b[i + 1].is_ascii_digit();
            if !between {
                return None;
            }
        } else {
            out.push(c as char);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schemas() -> Arc<ToolSchemas> {
        let tools = serde_json::json!([{"type": "function", "function": {"name": "f",
            "parameters": {"type": "object", "properties": {
                "s": {"type": "string"}, "i": {"type": "integer"}, "n": {"type": "number"},
                "b": {"type": "boolean"}, "o": {"type": "object"}, "a": {"type": "array"},
                "opt": {"type": ["integer", "null"]}, "e": {"enum": [1, 2]},
                "any": {"anyOf": [{"type": "number"}, {"type": "string"}]}}}}}]);
        ToolSchemas::from_tools(Some(&tools))
    }

    fn one(body: &str) -> Option<Vec<(String, String)>> {
        parse_block(body, true, &schemas())
    }

    #[test]
    fn values_are_typed_by_the_schema() {
        let got = one("\n<function=f>\n<parameter=s>\n007\n</parameter>\n<parameter=i>\n 42 \n</parameter>\n\
            <parameter=n>\n3.0\n</parameter>\n<parameter=b>\nTrue\n</parameter>\n\
            <parameter=o>\n{\"k\": [1, 2.5]}\n</parameter>\n<parameter=a>\n[\"x\"]\n</parameter>\n\
            <parameter=opt>\nNULL\n</parameter>\n<parameter=e>\n2\n</parameter>\n\
            <parameter=any>\n1e-5\n</parameter>\n<parameter=unknown>\n5\n</parameter>\n</function>\n")
        .unwrap();
        assert_eq!(
            got,
            vec![(
                "f".to_owned(),
                "{\"s\": \"007\", \"i\": 42, \"n\": 3, \"b\": true, \"o\": {\"k\": [1, 2.5]}, \
                 \"a\": [\"x\"], \"opt\": null, \"e\": 2, \"any\": 1e-05, \"unknown\": \"5\"}"
                    .to_owned()
            )]
        );
    }

    #[test]
    fn one_newline_is_trimmed_on_each_side() {
        let got = one("<function=f>\n<parameter=s>\n\nline1\n  line2\n\n</parameter>\n</function>")
            .unwrap();
        assert_eq!(got[0].1, "{\"s\": \"\\nline1\\n  line2\\n\"}");
    }

    #[test]
    fn unterminated_parts_run_to_the_end() {
        // An unterminated block loses a final newline (Python's `$`), the parameter another,
        // then the value its trailing newline.
        let got = parse_block(
            "\n<function=f>\n<parameter=s>\nabc\n\n\n",
            false,
            &schemas(),
        )
        .unwrap();
        assert_eq!(got, vec![("f".to_owned(), "{\"s\": \"abc\"}".to_owned())]);
        // A parameter ended by the next one; a repeated key keeps its place.
        let got = one("<function=f>\n<parameter=s>\nx\n<parameter=i>\n1\n</parameter>\n<parameter=s>\ny\n</parameter>\n</function>").unwrap();
        assert_eq!(got[0].1, "{\"s\": \"y\", \"i\": 1}");
    }

    #[test]
    fn failures_and_skips() {
        assert_eq!(
            one("<function=f>\n<parameter=s"),
            None,
            "parameter without '>'"
        );
        assert_eq!(
            one("<function=f>\n<parameter=n>\ninf\n</parameter>\n</function>"),
            None
        );
        assert_eq!(
            one("<function=f\n"),
            Some(vec![]),
            "function without '>' is skipped"
        );
        let got = one("<function=f>\n<parameter=n>\nnan\n</parameter>\n</function>").unwrap();
        assert_eq!(got[0].1, "{\"n\": \"nan\"}");
        let got = one("<function=f>\n<parameter=i>\n5.0\n</parameter>\n</function>").unwrap();
        assert_eq!(
            got[0].1, "{\"i\": 5.0}",
            "integer-typed 5.0 falls back to json.loads"
        );
    }

    #[test]
    fn several_functions_in_one_block_and_unknown_names() {
        let got = one("<function=f>\n</function>\n<function= g >\n<parameter=x>\n1\n</parameter>\n</function>").unwrap();
        assert_eq!(
            got,
            vec![
                ("f".to_owned(), "{}".to_owned()),
                (" g ".to_owned(), "{\"x\": \"1\"}".to_owned())
            ]
        );
    }
}
