"""Three `qnext serve` replicas of the bundled model behind the routers the vLLM and SGLang
ecosystems use, installed from PyPI: `vllm-router` and `smg` (Shepherd Model Gateway), each
with its `cache_aware` policy, everything on 127.0.0.1.

- Greedy answers of concurrent multi-turn conversations through the router equal a single
  server's.
- The turns of a conversation stay on one replica: from the second turn on, each finds the
  whole earlier conversation in its replica's prefix cache (`cached_tokens`), which only the
  replica that served the earlier turns holds.
- A replica killed mid-run: every request in flight ends (answered or a clean error) within a
  bound, the router stops sending to the dead replica, and every conversation goes on with
  the same answers.
- The replica restarted on its port rejoins: with the two others stopped, it serves alone.

Each router is skipped when it is not installed (`pip install -r tests/python/requirements.txt`
installs both). Every process started is stopped, also on failure."""

import concurrent.futures as cf
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from conftest import API_KEY, MODEL, Server, free_port

BIN = Path(sys.executable).parent
CONVERSATIONS = [
    ["What is 37 * 24?", "Add 118 to the result."],
    ["Convert 7 hours to minutes.", "Now subtract 45 from that."],
    ["What is 905 - 388?", "Add 71 to the result."],
    ["What is 66 + 587?", "Now subtract 99 from that."],
]
# Short answers keep the run bounded; greedy, so every server gives the same ones.
MAX_TOKENS = 120


def router_command(name, port, workers):
    metrics = str(free_port())
    if name == "vllm-router":
        return [str(BIN / "vllm-router"), "--host", "127.0.0.1", "--port", str(port),
                "--worker-urls", *workers, "--policy", "cache_aware",
                "--health-check-interval-secs", "1", "--prometheus-port", metrics]
    return [str(BIN / "smg"), "launch", "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", *workers, "--policy", "cache_aware", "--disable-tokenizer-autoload",
            "--health-check-interval-secs", "1", "--load-monitor-interval", "1",
            "--prometheus-host", "127.0.0.1", "--prometheus-port", metrics]


def installed(name):
    return (BIN / name).exists() or shutil.which(name) is not None


def wait_until(what, check, timeout):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout} s (last error: {last})")


# Bounds for a debug build of qnext (CI), several times slower than a release one.
SLOW = 300


def client(base, timeout=SLOW):
    return openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0, timeout=timeout)


def ask(c, messages):
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    m = r.choices[0].message
    cached = (r.usage.prompt_tokens_details.cached_tokens or 0) if r.usage.prompt_tokens_details else 0
    return m.content, r.usage.prompt_tokens, cached


def system_prompt(questions):
    """A system prompt of its own per conversation, long enough that the conversation's
    history is most of each next request (the routers' cache-aware policies follow a prefix
    only where it is a large enough share of the request: 30 % by default)."""
    return {"role": "system", "content": f"You are a careful assistant. Topic: {questions[0]} "
            + "Show your work, check each step, and give the final answer on its own line. " * 8}


def converse(c, questions, answers=None):
    """The turns of one conversation; returns (answers, per turn (prompt tokens, cached))."""
    messages, out, usage = [system_prompt(questions)], [], []
    for i, q in enumerate(questions):
        messages.append({"role": "user", "content": q})
        content, prompt, cached = ask(c, messages)
        out.append(content)
        usage.append((prompt, cached))
        messages.append({"role": "assistant", "content": answers[i] if answers else content})
    return out, usage


def metric(base, name):
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


class Replicas:
    def __init__(self, n):
        self.ports = [free_port() for _ in range(n)]
        self.servers = [self.start(p) for p in self.ports]

    @staticmethod
    def start(port):
        # Behind a router on a private network: no API key (the routers' own --api-key would
        # send one to the workers).
        return Server(model=None, port=port, api_key=False)

    @property
    def urls(self):
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def stop(self):
        for s in self.servers:
            if s is not None and s.proc.poll() is None:
                s.stop()


@pytest.fixture(scope="module")
def reference():
    """Each conversation's greedy answers from one server, alone."""
    s = Server(model=None)
    try:
        c = client(s.base)
        yield [converse(c, q)[0] for q in CONVERSATIONS]
    finally:
        s.stop()


@pytest.mark.parametrize("name", ["vllm-router", "smg"])
def test_replicas_behind_a_router(name, reference):
    if not installed(name):
        pytest.skip(f"{name} is not installed")
    reps = Replicas(3)
    port = free_port()
    router = subprocess.Popen(router_command(name, port, reps.urls), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        c = client(base)
        # Registered and routing: a request goes through (smg registers workers in the background).
        hi = [{"role": "user", "content": "Hi"}]
        wait_until(f"{name} routes a request",
                   lambda: client(base, 60).chat.completions.create(model=MODEL, messages=hi, max_tokens=2), 120)
        time.sleep(2)  # every worker registered and found healthy

        # Concurrent conversations, answers as a single server gives them.
        with cf.ThreadPoolExecutor(len(CONVERSATIONS)) as ex:
            runs = list(ex.map(lambda q: converse(c, q), CONVERSATIONS))
        for (answers, usage), want in zip(runs, reference):
            assert answers == want
            # Turn 2 found turn 1's prompt cached up to where its last message ends (the
            # Thinking template's generation prompt adds `<think>\n` after that cut): only the
            # replica that served turn 1 holds it.
            assert usage[1][1] >= usage[0][0] - 2, usage
        served = [metric(u, "qnext:request_total") for u in reps.urls]
        assert sum(served) >= 2 * len(CONVERSATIONS), served

        # A replica dies while requests run: each ends (an answer or an error) in bounded time.
        victim = max(range(3), key=lambda i: served[i])
        def long_turn(q):
            try:
                return converse(client(base), q[:1])[0][0]
            except Exception as e:  # a clean error from the router, not a hang
                return e
        with cf.ThreadPoolExecutor(len(CONVERSATIONS)) as ex:
            futures = [ex.submit(long_turn, q) for q in CONVERSATIONS]
            time.sleep(0.5)
            reps.servers[victim].proc.kill()
            reps.servers[victim].proc.wait()
            done, pending = cf.wait(futures, timeout=SLOW)
        assert not pending, "a request hung after its replica was killed"

        # The router stops sending to it: every conversation goes on, with the same answers
        # (a request may fail until the router has seen the replica fail its health checks).
        def all_answer():
            return all(converse(client(base), q)[0] == want for q, want in zip(CONVERSATIONS, reference))
        wait_until("conversations after the kill", all_answer, SLOW)
        survivors = [u for i, u in enumerate(reps.urls) if i != victim]
        before = sum(metric(u, "qnext:request_total") for u in survivors)
        assert converse(c, CONVERSATIONS[0])[0] == reference[0]
        assert sum(metric(u, "qnext:request_total") for u in survivors) >= before + len(CONVERSATIONS[0])

        # Restarted on its port, it rejoins: with the other two stopped, it serves alone.
        reps.servers[victim] = Replicas.start(reps.ports[victim])
        time.sleep(3)  # health checks see it up
        for i in range(3):
            if i != victim:
                reps.servers[i].stop()
        wait_until("the restarted replica serves",
                   lambda: converse(client(base), CONVERSATIONS[1])[0] == reference[1], SLOW)
        assert metric(reps.urls[victim], "qnext:request_total") >= 1
    finally:
        router.terminate()
        try:
            router.wait(timeout=15)
        except subprocess.TimeoutExpired:
            router.kill()
            router.wait()
        reps.stop()
