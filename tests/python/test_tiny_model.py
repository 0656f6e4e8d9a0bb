"""The bundled trained model through the official openai client: the reasoning split, a right
answer, and a tool call answered in a second turn with the tool's values. The questions are
from the held-out split of tools/tiny_model/tasks.py (never trained on); the expected values are
computed here, not taken from the model."""

import json

from conftest import MODEL


def test_reasoning_split_and_right_answer(tiny_client):
    r = tiny_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 48 * 27?"}], temperature=0, max_tokens=800)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    # like vLLM's parser, the "\n\n" after </think> stays in content
    assert m.content.strip() == f"48 * 27 = {48 * 27}"
    assert "<think>" not in m.content and "</think>" not in m.content
    # the column work is in the reasoning, not in the answer
    assert "Write" in m.reasoning_content and str(48 * 7) in m.reasoning_content


def test_string_task(tiny_client):
    s = "ZSWAPE"
    r = tiny_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Reverse the string {s}."}], temperature=0,
        max_tokens=400)
    assert r.choices[0].message.content.strip() == s[::-1]


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "description": "The city name."}},
                                                "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Get the current local time in a city.",
                                         "parameters": {"type": "object", "properties": {
                                             "city": {"type": "string", "description": "The city name."}},
                                             "required": ["city"]}}}


def test_tool_call_and_answer(tiny_client):
    tools = [TIME, WEATHER]
    msgs = [{"role": "user", "content": "What's the weather in Hamburg?"}]
    r = tiny_client.chat.completions.create(model=MODEL, messages=msgs, tools=tools, temperature=0, max_tokens=400)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert len(calls) == 1 and calls[0].type == "function"
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Hamburg"}
    assert choice.message.reasoning_content

    result = {"city": "Hamburg", "temperature_c": 21, "condition": "sunny"}
    msgs += [{"role": "assistant", "content": choice.message.content or "",
              "tool_calls": [c.model_dump() for c in calls]},
             {"role": "tool", "tool_call_id": calls[0].id, "content": json.dumps(result)}]
    r = tiny_client.chat.completions.create(model=MODEL, messages=msgs, tools=tools, temperature=0, max_tokens=400)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content.strip() == "It is 21 °C and sunny in Hamburg right now."


def test_streamed_reasoning_then_content(tiny_client):
    stream = tiny_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Sort the letters of HYBRID in alphabetical order."}],
        temperature=0, max_tokens=400, stream=True)
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
    assert content.strip() == "BDHIRY"
    assert "B, D, H, I, R, Y" in reasoning
    assert order and order[0] == "r" and "r" not in order[order.index("c"):]
