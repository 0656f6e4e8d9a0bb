"""The server through the official `openai` client: chat and completions, streaming, usage,
stop strings, seeds, logprobs, n, tools, reasoning, errors and the API key."""

import json
import urllib.request

import openai
import pytest

from conftest import API_KEY, MAX_MODEL_LEN, MODEL

HI = [{"role": "user", "content": "Hello, who are you?"}]


def post(server, path, body):
    req = urllib.request.Request(
        server.base + path, data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def get_text(server, path):
    with urllib.request.urlopen(server.base + path, timeout=60) as r:
        return r.status, r.read().decode()


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_models_health_and_api_key(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert get_text(server, "/health")[0] == 200
    bad = openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)


def test_chat_and_usage(server, client):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=0)
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert r.model == MODEL
    c = r.choices[0]
    assert c.message.role == "assistant"
    assert c.finish_reason == "length"
    assert c.message.content
    tok = post(server, "/tokenize", {"messages": HI})
    assert r.usage.prompt_tokens == tok["count"]
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == tok["count"] + 8


def test_chat_stream_equals_non_stream(client):
    full = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=HI, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_stream_and_echo(client):
    r = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0)
    assert r.id.startswith("cmpl-")
    text = r.choices[0].text
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == 8
    e = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0, echo=True)
    assert e.choices[0].text == "The quick brown fox" + text


def test_stop_string_across_tokens(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0, logprobs=0)
    tokens = r.choices[0].logprobs.tokens
    text = r.choices[0].text
    k = next(
        i for i in range(2, len(tokens) - 1)
        if len(tokens[i]) >= 2 and len(tokens[i + 1]) >= 2 and "\ufffd" not in tokens[i] + tokens[i + 1]
    )
    stop = tokens[k][-2:] + tokens[k + 1][:2]
    expected = text[: text.index(stop)]
    s = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0, stop=[stop])
    assert s.choices[0].text == expected
    assert s.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0, stop=stop, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert stop not in "".join(c.choices[0].text for c in chunks if c.choices)


def test_seed_and_n(client):
    def run(seed, n=1):
        return client.completions.create(
            model=MODEL, prompt="Random:", max_tokens=10, temperature=1.0, top_p=1.0, seed=seed, n=n,
            extra_body={"top_k": -1},
        )

    a, b = run(1234), run(1234)
    assert a.choices[0].text == b.choices[0].text
    two = run(1234, n=2)
    assert len(two.choices) == 2
    assert two.choices[0].text == a.choices[0].text
    assert two.choices[1].text == run(1235).choices[0].text
    assert two.usage.completion_tokens == 20
    chat = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, n=3, seed=5)
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]
    assert chat.usage.completion_tokens == 12


def test_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for e in content:
        assert len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token
        assert e.logprob <= 0
        assert isinstance(e.bytes, list)
    c = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4


def test_vllm_extra_parameters(client):
    r = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=4, temperature=0.8, seed=3,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True},
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"151645": -100},
    )
    assert r.usage.completion_tokens == 4
    # EOS forced: stops at once with finish_reason stop.
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, logit_bias={"151645": 100})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == ""


TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]


def test_tools(server, client):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    tok = post(server, "/tokenize", {"messages": msgs, "tools": TOOLS})
    prompt = post(server, "/detokenize", {"tokens": tok["tokens"]})["prompt"]
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt
    assert tok["max_model_len"] == MAX_MODEL_LEN
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=4)
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    # A forced, malformed `<tool_call>` stays content.
    r = client.chat.completions.create(
        model=MODEL, messages=msgs, tools=TOOLS, max_tokens=2, temperature=0, logit_bias={"151657": 100}
    )
    assert r.choices[0].message.content == "<tool_call><tool_call>"
    assert not r.choices[0].message.tool_calls
    # A full tool round trip renders.
    convo = msgs + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=convo, tools=TOOLS, max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_reasoning_parser(thinking_server):
    c = openai.OpenAI(base_url=thinking_server.base + "/v1", api_key=API_KEY, max_retries=0)
    r = c.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=3, temperature=0, logit_bias={"151668": 100}
    )
    m = r.choices[0].message
    assert m.reasoning_content == ""
    assert m.content == "</think></think>"
    chunks = list(c.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0, stream=True))
    reasoning = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks if ch.choices)
    full = c.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0)
    assert reasoning == full.choices[0].message.reasoning_content
    assert full.choices[0].message.content is None


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": MAX_MODEL_LEN * 2}, "max_tokens"),
        ({"presence_penalty": 5}, "presence_penalty"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"stop": [""]}, "stop[0]"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),
        ({"extra_body": {"top_k": -5}}, "top_k"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
    ],
)
def test_bad_requests(client, kwargs, param):
    args = {"model": MODEL, "messages": HI, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param


def test_unknown_model_and_recovery(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[], max_tokens=2)
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    assert r.usage.completion_tokens == 2
    status, text = get_text(server, "/metrics")
    assert status == 200
    assert metric(text, "qnext:generation_tokens_total") > 0
    assert "qnext:time_to_first_token_seconds_bucket" in text
