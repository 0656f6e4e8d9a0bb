"""The bundled trained model through the official openai client: the reasoning split, a right
answer, and a tool call answered in a second turn with the tool's values.

The questions are from the held-out split of tools/tiny_model/tasks.py (never trained on) and
from families the model answers well (BENCHMARKS.md, "The bundled model", gives its accuracy per
family: it fails letter tasks, so none is asked here). The expected values are computed here or
are the tool's own values, not taken from the model."""

import json

from conftest import MODEL


def test_reasoning_split_and_right_answer(tiny_client):
    r = tiny_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 71 * 67?"}], temperature=0, max_tokens=800)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    # like vLLM's parser, the "\n\n" after </think> stays in content
    assert m.content.strip() == f"71 * 67 = {71 * 67}"
    assert "<think>" not in m.content and "</think>" not in m.content
    # the partial products are in the reasoning, not in the answer
    assert "Write" in m.reasoning_content and str(71 * 7) in m.reasoning_content


def test_unit_conversion_with_a_system_prompt(tiny_client):
    r = tiny_client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=400,
        messages=[{"role": "system", "content": "You are qnext-tiny, a small Qwen3-Next model. Answer briefly."},
                  {"role": "user", "content": "Convert 39 hours to minutes."}])
    assert r.choices[0].message.content.strip() == f"39 hours = {39 * 60} minutes"
    assert r.choices[0].message.reasoning_content


def _tool(name, description, props):
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props, "required": list(props)}}}


CALCULATOR = _tool("calculator", "Evaluate an arithmetic expression exactly.",
                   {"expression": {"type": "string", "description": "The expression, e.g. 12 * 34."}})
TIME = _tool("get_time", "Get the current local time in a city.",
             {"city": {"type": "string", "description": "The city name."}})


def test_tool_call_and_answer(tiny_client):
    tools = [CALCULATOR, TIME]
    msgs = [{"role": "system", "content": "You are qnext-tiny, a small Qwen3-Next model. Answer briefly."},
            {"role": "user", "content": "What time is it in Lisbon?"}]
    r = tiny_client.chat.completions.create(model=MODEL, messages=msgs, tools=tools, temperature=0, max_tokens=400)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert len(calls) == 1 and calls[0].type == "function"
    assert calls[0].function.name == "get_time"
    assert json.loads(calls[0].function.arguments) == {"city": "Lisbon"}
    assert choice.message.reasoning_content

    result = {"city": "Lisbon", "time": "22:39"}
    msgs += [{"role": "assistant", "content": choice.message.content or "",
              "tool_calls": [c.model_dump() for c in calls]},
             {"role": "tool", "tool_call_id": calls[0].id, "content": json.dumps(result)}]
    r = tiny_client.chat.completions.create(model=MODEL, messages=msgs, tools=tools, temperature=0, max_tokens=400)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content.strip() == "It is 22:39 in Lisbon."


def test_streamed_reasoning_then_content(tiny_client):
    stream = tiny_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 44 * 62?"}],
        temperature=0, max_tokens=800, stream=True)
    reasoning, content, order = "", "", []
    for chunk in stream:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        if getattr(d, "reasoning_content", None):
            reasoning += d.reasoning_content
            order.append("r")
        if d.content:
            content += d.content
            order.append("c")
    assert content.strip() == f"44 * 62 = {44 * 62}"
    assert str(44 * 2) in reasoning and str(44 * 60) in reasoning
    assert order and order[0] == "r" and "r" not in order[order.index("c"):]
