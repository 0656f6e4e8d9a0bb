#!/usr/bin/env python3
"""Time to first token of each turn of a growing conversation, served by `qnext serve` with
and without the prefix cache (standard library only).

A chat: per turn a user message of about --turn-tokens tokens, an answer of --answer tokens
sent back in the next turn. An agent: one user message, then after each answer a tool result
of about --turn-tokens tokens, as an agent loop sends them. Both servers
get the same conversation (the same seeded answers: outputs do not depend on the cache).

  python3 tools/bench/chat_ttft.py --model /path/to/checkpoint --turns 10 --turn-tokens 800
  python3 tools/bench/chat_ttft.py --model DIR --mode agent --out results.json

The same conversation on llama.cpp's server, with its prompt cache and context checkpoints of
the recurrent state (its defaults) and then without (`cache_prompt: false` in each request):

  python3 tools/bench/chat_ttft.py --llama-server /path/to/llama-server --model model.gguf

The checkpoint needs tokenizer files; if it has none (a `qnext synth` checkpoint), the real
Qwen tokenizer and chat template of tests/fixtures/qwen-vocab are copied into it. Prints one
line per turn and server (prompt tokens, cached tokens, TTFT) and a table of the ratios."""

import argparse
import json
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega").split()


def words(n, seed):
    return " ".join(WORDS[(seed * 7 + i * i * 3 + i) % len(WORDS)] for i in range(n))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, binary, model, extra, max_model_len):
        self.port = free_port()
        args = [binary, "serve", str(model), "--port", str(self.port), "--max-num-seqs", "2",
                "--max-model-len", str(max_model_len), "--served-model-name", "m", *extra]
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
        self.log = []
        while True:
            line = self.proc.stderr.readline()
            if not line:
                sys.exit("server exited:\n" + "".join(self.log))
            self.log.append(line)
            if "listening on" in line:
                break

    def post_stream(self, body):
        """(seconds to the first token, the answer text, usage) of a streamed chat request."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/chat/completions",
            data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        first, text, usage = None, [], None
        self.timings = {}
        with urllib.request.urlopen(req, timeout=7200) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if ev.get("usage"):
                    usage = ev["usage"]
                if ev.get("timings"):
                    self.timings = ev["timings"]
                for c in ev.get("choices", []):
                    # Every token's chunk carries its log-probability, also when its text is
                    # empty (the first chunk, the role, carries none).
                    if c.get("logprobs") and first is None:
                        first = time.perf_counter() - t0
                    text.append(c.get("delta", {}).get("content") or "")
        return first, "".join(text), usage

    def cached_tokens(self, usage, timings):
        return (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)

    def rss_gib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / (1 << 20)
        return float("nan")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


class LlamaServer(Server):
    """llama.cpp's `llama-server` on a GGUF, one slot, 2 threads, the GGUF's chat template."""

    def __init__(self, binary, gguf, extra, max_model_len):
        self.port = free_port()
        args = [binary, "-m", str(gguf), "--port", str(self.port), "-t", "2", "-np", "1",
                "-c", str(max_model_len), "--jinja", "-a", "m", *extra]
        self.log_file = open(pathlib.Path("/tmp") / f"llama-server-{self.port}.log", "w+")
        self.proc = subprocess.Popen(args, stdout=self.log_file, stderr=subprocess.STDOUT)
        for _ in range(1200):
            if self.proc.poll() is not None:
                self.log_file.seek(0)
                sys.exit("llama-server exited:\n" + self.log_file.read())
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        self.log = []

    def cached_tokens(self, usage, timings):
        # Its `timings.cache_n`: prompt tokens taken from the slot's cache or a checkpoint.
        return (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or timings.get("cache_n", 0)


def conversation(server, a, label):
    # One small request first, so that the weights are in memory before the first turn.
    server.post_stream({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                        "stream": True, "logprobs": True, "seed": 0,
                        "stream_options": {"include_usage": True}})
    messages = [{"role": "system", "content": "You are a helpful assistant. " + words(200, 0)}]
    rows = []
    for turn in range(a.turns):
        if a.mode == "chat" or turn == 0:
            n = a.first_tokens if turn == 0 and a.first_tokens else a.turn_tokens
            messages.append({"role": "user", "content": words(n, turn + 1)})
        body = {"model": "m", "messages": messages, "max_tokens": a.answer, "temperature": 0.7,
                "seed": turn, "stream": True, "logprobs": True,
                "stream_options": {"include_usage": True}}
        if isinstance(server, LlamaServer) and label == "nocache":
            body["cache_prompt"] = False
        ttft, text, usage = server.post_stream(body)
        cached = server.cached_tokens(usage, server.timings)
        rss = server.rss_gib()
        rows.append({"turn": turn + 1, "prompt_tokens": usage["prompt_tokens"],
                     "cached_tokens": cached, "ttft_s": ttft, "rss_gib": rss})
        print(f"{label:9} turn {turn + 1:2}: prompt {usage['prompt_tokens']:6} tokens, "
              f"cached {cached:6}, TTFT {ttft:8.2f} s, RSS {rss:.2f} GiB", flush=True)
        messages.append({"role": "assistant", "content": text})
        if a.mode == "agent":
            # A tool result follows every answer, as in an agent loop. (Random weights make
            # no tool calls of their own, and calls written in here would not be what the
            # model said, which a real loop sends back.)
            messages.append({"role": "tool", "tool_call_id": f"call_{turn}",
                             "content": words(a.turn_tokens, 100 + turn)})
        # The pause a person or a tool takes before the next request.
        time.sleep(a.think)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=pathlib.Path)
    p.add_argument("--qnext", default=str(ROOT / "target" / "release" / "qnext"))
    p.add_argument("--llama-server", help="run llama.cpp's llama-server (this binary) on --model, a GGUF")
    p.add_argument("--mode", choices=["chat", "agent"], default="chat")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--turn-tokens", type=int, default=780)
    p.add_argument("--first-tokens", type=int, help="words of the first user message (default: --turn-tokens)")
    p.add_argument("--answer", type=int, default=20)
    p.add_argument("--think", type=float, default=2.0, help="seconds between a response and the next request")
    p.add_argument("--max-model-len", type=int, default=32768)
    p.add_argument("--only", choices=["cache", "nocache"], help="run one server only")
    p.add_argument("--extra", default="", help="more `qnext serve` arguments, space-separated")
    p.add_argument("--out", type=pathlib.Path)
    a = p.parse_args()
    if not a.llama_server:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if not (a.model / f).exists():
                shutil.copy(ROOT / "tests" / "fixtures" / "qwen-vocab" / f, a.model / f)
    results = {}
    for label, flags in [("cache", []), ("nocache", ["--no-enable-prefix-caching"])]:
        if a.only and a.only != label:
            continue
        if a.llama_server:
            s = LlamaServer(a.llama_server, a.model, a.extra.split(), a.max_model_len)
        else:
            s = Server(a.qnext, a.model, flags + a.extra.split(), a.max_model_len)
        print("".join(l for l in s.log if l.startswith("memory plan")), end="", flush=True)
        try:
            results[label] = conversation(s, a, label)
        finally:
            s.stop()
    if len(results) == 2:
        print("\n| turn | prompt tokens | cached | TTFT with cache (s) | without (s) | ratio |")
        print("|---:|---:|---:|---:|---:|---:|")
        for c, n in zip(results["cache"], results["nocache"]):
            print(f"| {c['turn']} | {c['prompt_tokens']} | {c['cached_tokens']} | {c['ttft_s']:.2f} "
                  f"| {n['ttft_s']:.2f} | {n['ttft_s'] / c['ttft_s']:.1f}× |")
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
