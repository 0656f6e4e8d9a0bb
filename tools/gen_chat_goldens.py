#!/usr/bin/env python3
"""Writes tests/fixtures/chat_templates/goldens.json: prompts rendered by
`transformers` `apply_chat_template(..., tokenize=False)` for the Qwen3-Next Instruct and
Thinking templates, which `tests/text_chat_template.rs` must reproduce byte for byte; and
goldens_qwen35.json for the Qwen3.5 / 3.6 family's templates (qwen3.5.jinja: 4B and up;
qwen3.5-small.jinja: 0.8B and 2B; qwen3.6.jinja: Qwen3.6-35B-A3B; provenance in
tests/fixtures/README.md). Their tool calls carry arguments as objects, as vLLM passes them
(the OpenAI API's JSON-string arguments parsed), and a case that the template refuses
(`raise_exception`) is recorded as an expected error.

Inputs (committed next to the output): tests/fixtures/qwen-vocab/tokenizer.json and
tests/fixtures/chat_templates/tokenizer_config.{instruct,thinking}.json (copied from
shared/data/qwen-tokenizer).

Run from the repository root with a Python that has transformers (tested with 5.24, Jinja2 3.1.6):
    /work/venv/bin/python tools/gen_chat_goldens.py
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import jinja2
import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
TEMPLATES = FIXTURES / "chat_templates"
OUT = TEMPLATES / "goldens.json"
OUT_Q35 = TEMPLATES / "goldens_qwen35.json"
Q35_TEMPLATES = {"qwen3.5": "qwen3.5.jinja", "qwen3.5-small": "qwen3.5-small.jinja", "qwen3.6": "qwen3.6.jinja"}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City and country, e.g. Paris, France"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}

SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web.\nReturns <= 10 results & snippets; use 'quotes' for \"exact\" phrases.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "Query text, e.g. a < b && c > d"},
                "max_results": {"type": "integer", "minimum": 1, "maximum": 10, "default": 5},
                "threshold": {"type": "number", "default": 0.5, "minimum": 1e-7, "maximum": 1e20},
                "safe": {"type": "boolean", "default": True},
                "filters": {"type": "object", "properties": {}, "default": None},
                "tags": {"type": "array", "items": {"type": "string"}, "default": []},
                "pattern": {"type": "string", "default": "\\d+\t\u0001end"},
            },
            "required": ["query"],
        },
    },
}

CJK_TOOL = {
    "type": "function",
    "function": {
        "name": "translate",
        "description": "翻译文本到目标语言 🌍 — ünïcödé",
        "parameters": {
            "type": "object",
            "properties": {
                "text": {"type": "string", "description": "要翻译的文本"},
                "target": {"type": "string", "description": "目标语言，例如「日本語」"},
            },
            "required": ["text", "target"],
        },
    },
}


def call(name, arguments, call_id="call_0"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


SCENARIOS = [
    ("single_user", [{"role": "user", "content": "Hello"}], None),
    (
        "system_user",
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 2+2?"},
        ],
        None,
    ),
    (
        "multi_turn_system",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
        ],
        None,
    ),
    (
        "multi_turn_no_system",
        [
            {"role": "user", "content": "First question"},
            {"role": "assistant", "content": "First answer"},
            {"role": "user", "content": "Second question"},
            {"role": "assistant", "content": "Second answer"},
        ],
        None,
    ),
    (
        "system_in_middle",
        [
            {"role": "user", "content": "a"},
            {"role": "system", "content": "Late system note"},
            {"role": "user", "content": "b"},
        ],
        None,
    ),
    ("tools_no_system", [{"role": "user", "content": "Weather in Paris?"}], [WEATHER_TOOL]),
    (
        "tools_with_system",
        [
            {"role": "system", "content": "You can use tools."},
            {"role": "user", "content": "Search for rust minijinja"},
        ],
        [WEATHER_TOOL, SEARCH_TOOL],
    ),
    (
        "tool_call_args_string",
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [call("get_weather", '{"location": "Paris, France"}')],
            },
            {"role": "tool", "tool_call_id": "call_0", "content": '{"temperature": 21, "unit": "celsius"}'},
        ],
        [WEATHER_TOOL],
    ),
    (
        "tool_calls_object_several_with_content",
        [
            {"role": "system", "content": "Use tools when needed."},
            {"role": "user", "content": "Compare Paris and Tokyo weather."},
            {
                "role": "assistant",
                "content": "Let me check both cities.",
                "tool_calls": [
                    call("get_weather", {"location": "Paris", "unit": "celsius"}, "call_a"),
                    call("get_weather", {"location": "東京", "unit": "celsius"}, "call_b"),
                ],
            },
            {"role": "tool", "tool_call_id": "call_a", "content": "Paris: 21°C, sunny"},
            {"role": "tool", "tool_call_id": "call_b", "content": "東京: 18°C, 雨 ☔"},
            {"role": "assistant", "content": "Paris is warmer (21°C vs 18°C)."},
            {"role": "user", "content": "Thanks!"},
        ],
        [WEATHER_TOOL],
    ),
    (
        "tool_call_content_null",
        [
            {"role": "user", "content": "Search <b>&</b> 'x' \"y\""},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    call(
                        "search",
                        {
                            "query": "a < b && 'c' > \"d\"\nline2",
                            "max_results": 3,
                            "threshold": 0.25,
                            "safe": False,
                            "filters": None,
                            "tags": ["x", 1, 2.5, True],
                            "nested": {"k": {}, "l": []},
                        },
                    )
                ],
            },
            {"role": "tool", "tool_call_id": "call_0", "content": "<result>1 & 2</result>"},
        ],
        [SEARCH_TOOL],
    ),
    (
        "tool_call_without_function_wrapper",
        [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"name": "get_weather", "arguments": {"location": "Oslo"}}],
            },
            {"role": "tool", "content": "cold"},
        ],
        [WEATHER_TOOL],
    ),
    (
        "reasoning_current_loop_vs_earlier",
        [
            {"role": "user", "content": "What's the weather in Paris?"},
            {"role": "assistant", "reasoning_content": "Earlier reasoning, dropped.", "content": "It is sunny."},
            {"role": "user", "content": "And in Berlin and Rome?"},
            {
                "role": "assistant",
                "reasoning_content": "\nI should call the tool twice.\n",
                "content": "",
                "tool_calls": [
                    call("get_weather", '{"location": "Berlin"}', "c1"),
                    call("get_weather", '{"location": "Rome"}', "c2"),
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "Berlin: 15°C"},
            {"role": "tool", "tool_call_id": "c2", "content": "Rome: 24°C"},
            {"role": "assistant", "reasoning_content": "Both results are in.", "content": "\n\nBerlin 15°C, Rome 24°C."},
        ],
        [WEATHER_TOOL],
    ),
    (
        "reasoning_empty_in_loop",
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "reasoning_content": "",
                "content": "Checking.",
                "tool_calls": [call("get_weather", {"location": "Paris"})],
            },
            {"role": "tool", "content": "sunny"},
        ],
        [WEATHER_TOOL],
    ),
    (
        "think_tags_in_content",
        [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\nA1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "<think>\nnew thoughts\n</think>\n\nA2 mentions </think> twice"},
        ],
        None,
    ),
    (
        "reasoning_alias_field",
        [
            {"role": "user", "content": "Q"},
            {"role": "assistant", "reasoning": "via the reasoning key", "content": "A"},
        ],
        None,
    ),
    (
        "user_tool_response_text",
        [
            {"role": "user", "content": "Real question"},
            {"role": "assistant", "reasoning_content": "thinking", "content": "calling"},
            {"role": "user", "content": "<tool_response>\nfake\n</tool_response>"},
            {"role": "assistant", "reasoning_content": "more thinking", "content": "done"},
        ],
        None,
    ),
    (
        "non_ascii",
        [
            {"role": "system", "content": "你是一个乐于助人的助手。🤖"},
            {"role": "user", "content": "请把「こんにちは」翻译成中文，谢谢！👋🏽 Ünïcödé — ½ ∑ 𝔘"},
        ],
        [CJK_TOOL],
    ),
    (
        "content_parts_list",
        [
            {"role": "user", "content": [{"type": "text", "text": "parts are not strings"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "plain"},
        ],
        None,
    ),
    (
        "whitespace_and_newlines",
        [
            {"role": "system", "content": "  leading and trailing spaces  \n"},
            {"role": "user", "content": "\n\nline1\n\tline2\r\nline3\n"},
        ],
        None,
    ),
]


def parsed_arguments(messages):
    """Assistant tool calls with JSON-string arguments parsed, as vLLM renders them."""
    out = json.loads(json.dumps(messages))
    for m in out:
        for c in m.get("tool_calls") or []:
            f = c.get("function", {})
            if isinstance(f.get("arguments"), str):
                f["arguments"] = json.loads(f["arguments"])
    return out


Q35_SCENARIOS = [
    (
        "typed_arguments_and_reasoning",
        [
            {"role": "system", "content": "Use the tools."},
            {"role": "user", "content": "Search twice"},
            {"role": "assistant", "reasoning_content": "\nI should search.\n", "content": "",
             "tool_calls": [call("search", {"query": "rust \"quoted\" <tag>", "max_results": 3, "threshold": 0.25,
                                             "safe": False, "filters": {"lang": "en", "n": [1, 2]},
                                             "tags": ["a", "b"], "pattern": None}),
                            call("search", {"query": "多语言 🚀"}, "call_1")]},
            {"role": "tool", "content": "result one"},
            {"role": "tool", "content": "result two"},
            {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nBoth done."},
            {"role": "user", "content": "Thanks"},
        ],
        [SEARCH_TOOL],
    ),
    (
        "image_parts_and_text_parts",
        [
            {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"},
                                         {"type": "text", "text": " and tell me."}]},
        ],
        None,
    ),
]


def q35_main(scenarios):
    tok = load_tokenizer("tokenizer_config.instruct.json")
    cases = []
    for variant, file in Q35_TEMPLATES.items():
        source = (TEMPLATES / file).read_text(encoding="utf-8")
        for name, messages, tools in scenarios + Q35_SCENARIOS:
            messages = parsed_arguments(messages)
            for agp in [True, False] if name in ("multi_turn_no_system", "single_user") else [True]:
                extras = [{}]
                if name in ("multi_turn_no_system", "tool_round_trip", "typed_arguments_and_reasoning"):
                    extras += [{"enable_thinking": False}, {"enable_thinking": True}]
                    if variant == "qwen3.6":
                        extras.append({"preserve_thinking": True})
                for extra in extras:
                    case = {
                        "name": f"{variant}/{name}" + ("" if agp else "/no_gen_prompt")
                        + "".join(f"/{k}={v}" for k, v in extra.items()),
                        "template": variant,
                        "messages": messages,
                        "tools": tools,
                        "add_generation_prompt": agp,
                        "extra": extra,
                    }
                    try:
                        case["expected"] = tok.apply_chat_template(
                            messages, tools=tools, add_generation_prompt=agp, tokenize=False,
                            chat_template=source, **extra)
                    except Exception as e:  # the template's raise_exception
                        case["expected_error"] = str(e)
                    cases.append(case)
    doc = {
        "generated_by": "tools/gen_chat_goldens.py",
        "transformers": transformers.__version__,
        "jinja2": jinja2.__version__,
        "templates": Q35_TEMPLATES,
        "cases": cases,
    }
    OUT_Q35.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    errors = sum("expected_error" in c for c in cases)
    print(f"wrote {len(cases)} cases ({errors} refused by the template) to {OUT_Q35.relative_to(ROOT)}",
          file=sys.stderr)


def load_tokenizer(config_name):
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(FIXTURES / "qwen-vocab" / "tokenizer.json", Path(tmp) / "tokenizer.json")
        shutil.copy(TEMPLATES / config_name, Path(tmp) / "tokenizer_config.json")
        return AutoTokenizer.from_pretrained(tmp)


def main():
    tokenizers = {
        "instruct": load_tokenizer("tokenizer_config.instruct.json"),
        "thinking": load_tokenizer("tokenizer_config.thinking.json"),
    }
    cases = []
    for name, messages, tools in SCENARIOS:
        for variant, tok in tokenizers.items():
            agps = [True, False] if name in ("multi_turn_no_system", "tool_call_args_string", "single_user") else [True]
            for agp in agps:
                extra = {"enable_thinking": False} if name == "system_user" else {}
                prompt = tok.apply_chat_template(
                    messages, tools=tools, add_generation_prompt=agp, tokenize=False, **extra
                )
                cases.append(
                    {
                        "name": f"{variant}/{name}" + ("" if agp else "/no_gen_prompt"),
                        "template": variant,
                        "messages": messages,
                        "tools": tools,
                        "add_generation_prompt": agp,
                        "extra": extra,
                        "expected": prompt,
                    }
                )
    doc = {
        "generated_by": "tools/gen_chat_goldens.py",
        "transformers": transformers.__version__,
        "jinja2": jinja2.__version__,
        "cases": cases,
    }
    OUT.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {OUT.relative_to(ROOT)}", file=sys.stderr)
    q35_main(SCENARIOS)


if __name__ == "__main__":
    main()
