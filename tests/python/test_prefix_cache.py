"""The prefix cache through the official openai client: conversations with the Instruct and the
Thinking templates, a tool-call loop, requests sharing a long system prompt (in turn and at
once), and a budget so small that states are evicted all the time each give exactly the tokens
and log-probabilities of a server without the cache, while later turns report their history as
`usage.prompt_tokens_details.cached_tokens` and /metrics counts the hits.

Random weights, so the answers are noise; what matters is that they are the same noise."""

import concurrent.futures
import json
import urllib.request

import openai
import pytest

from conftest import API_KEY, MODEL, THINKING_TEMPLATE, Server

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega").split()


def words(n, seed):
    return " ".join(WORDS[(seed * 7 + i * i * 3 + i) % len(WORDS)] for i in range(n))


def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


def metric(server, name):
    req = urllib.request.Request(server.base + "/metrics")
    text = urllib.request.urlopen(req, timeout=30).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


@pytest.fixture(scope="module")
def servers():
    """Pairs of servers, with and without the cache, by template."""
    made = {}

    def get(kind):
        if kind not in made:
            extra = {
                "instruct": (),
                "thinking": ("--chat-template", str(THINKING_TEMPLATE), "--reasoning-parser", "deepseek_r1"),
                "tiny": ("--prefix-cache-memory", "40KiB"),
            }[kind]
            on = Server(*extra)
            off = Server(*extra, "--no-enable-prefix-caching")
            made[kind] = (on, off)
        return made[kind]

    yield get
    for on, off in made.values():
        on.stop()
        off.stop()


def ask(c, messages, stream=False, **kw):
    """The answer's message (as a dict the next request can send back), the bits that must
    match (text, reasoning, logprobs), and the usage."""
    args = dict(model=MODEL, messages=messages, max_tokens=12, temperature=0.9, seed=11,
                logprobs=True, top_logprobs=2, **kw)
    if stream:
        parts, reasoning, lps, usage = [], [], [], None
        for ch in c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args):
            if ch.usage:
                usage = ch.usage
            for choice in ch.choices:
                parts.append(choice.delta.content or "")
                reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
                if choice.logprobs and choice.logprobs.content:
                    lps += [(t.token, t.logprob, [(x.token, x.logprob) for x in t.top_logprobs])
                            for t in choice.logprobs.content]
        text = "".join(parts)
        message = {"role": "assistant", "content": text}
        return message, (text, "".join(reasoning), lps), usage
    r = c.chat.completions.create(**args)
    m = r.choices[0].message
    lps = [(t.token, t.logprob, [(x.token, x.logprob) for x in t.top_logprobs])
           for t in r.choices[0].logprobs.content]
    message = m.model_dump(exclude_none=True)
    reasoning = getattr(m, "reasoning_content", None) or ""
    return message, (m.content, reasoning, lps), r.usage


def cached(usage):
    details = usage.prompt_tokens_details
    return details.cached_tokens if details else 0


def converse(server, system, turns, stream=False, tools=None):
    c = client(server)
    messages = [{"role": "system", "content": system}]
    out = []
    for t in range(turns):
        messages.append({"role": "user", "content": words(15 + 11 * t, t)})
        kw = {"tools": tools} if tools else {}
        message, bits, usage = ask(c, messages, stream=stream or t % 2 == 1, **kw)
        out.append((bits, usage.prompt_tokens, cached(usage)))
        messages.append(message)
    return out


@pytest.mark.parametrize("kind", ["instruct", "thinking"])
def test_multi_turn_chat_matches_a_server_without_the_cache(servers, kind):
    on, off = servers(kind)
    system = "You are terse. " + words(120, 1)
    want = converse(off, system, 5)
    got = converse(on, system, 5)
    for turn, ((w, w_prompt, w_cached), (g, g_prompt, g_cached)) in enumerate(zip(want, got)):
        assert g == w, f"{kind} turn {turn}"
        assert (g_prompt, w_cached) == (w_prompt, 0)
        if turn > 0:
            # At least the previous request's prompt up to its assistant header, where this
            # one departs at the latest (the Thinking template's prompt has `<think>\n` after
            # it); usually the answer too, computed ahead.
            header = got[turn - 1][1] - (2 if kind == "thinking" else 0)
            assert g_cached >= header, f"{kind} turn {turn}: {g_cached} cached"
    # The same conversation again: every turn finds its whole history but the header.
    again = converse(on, system, 5)
    for turn, ((w, _, _), (g, prompt, hit)) in enumerate(zip(want, again)):
        assert g == w and hit >= prompt - 5, f"{kind} again, turn {turn}: {hit} of {prompt}"
    assert metric(on, "qnext:prefix_cache_hits_total") > 0
    assert metric(off, "qnext:prefix_cache_queries_total") == 0


TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "Looks a word up.",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}}]


def agent(server):
    """An agent loop: each step the model is asked, then a tool call and its result are added
    (random weights call no tools themselves, so the loop writes the calls)."""
    c = client(server)
    messages = [{"role": "system", "content": "Use the tools. " + words(60, 3)},
                {"role": "user", "content": words(20, 4)}]
    out = []
    for step in range(4):
        message, bits, usage = ask(c, messages, tools=TOOLS)
        out.append((bits, cached(usage)))
        call = {"id": f"call_{step}", "type": "function",
                "function": {"name": "lookup", "arguments": json.dumps({"word": WORDS[step]})}}
        messages.append({"role": "assistant", "content": message.get("content") or "", "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": f"call_{step}", "content": words(30, step + 9)})
    return out


def test_tool_call_loop_matches_a_server_without_the_cache(servers):
    on, off = servers("instruct")
    want, got = agent(off), agent(on)
    assert [w[0] for w in want] == [g[0] for g in got]
    assert all(g[1] > 0 for g in got[1:]), got


def test_shared_system_prompt_in_turn_and_at_once(servers):
    on, off = servers("instruct")
    system = "Shared instructions. " + words(300, 5)
    questions = [words(8 + i, 20 + i) for i in range(6)]

    def one(server, q):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": q}]
        _, bits, usage = ask(client(server), msgs)
        return bits, cached(usage)

    want = [one(off, q) for q in questions]
    first = one(on, questions[0])
    assert first[0] == want[0][0]
    with concurrent.futures.ThreadPoolExecutor(5) as ex:
        rest = list(ex.map(lambda q: one(on, q), questions[1:]))
    for i, (bits, hit) in enumerate(rest, 1):
        assert bits == want[i][0], f"request {i}"
        assert hit >= 300, f"request {i}: {hit} cached"


def test_eviction_under_a_tiny_budget_changes_nothing(servers):
    on, off = servers("tiny")
    system = "Small budget. " + words(200, 7)
    want = converse(off, system, 4)
    got = converse(on, system, 4)
    assert [w[0] for w in want] == [g[0] for g in got]
    assert metric(on, "qnext:prefix_cache_evictions_total") > 0
    assert metric(on, "qnext:prefix_cache_bytes") <= 40 * 1024
