"""Held-out evaluation of the bundled tiny model, run through qnext itself: starts `qnext serve`
on the checkpoint, sends every question with the official `openai` client (greedy), and checks
what comes back — the exact final answer in `content`, reasoning in `reasoning_content`, tool
calls as `tool_calls` with the expected name and arguments, and the answer after the tool's result.

    venv/bin/python tools/tiny_model/eval.py --model models/qnext-tiny [--n 50] [--json out.json]

Questions come from tasks.py's held-out split (bucket 0 of the question hash, never trained on).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import tasks

REPO = Path(__file__).resolve().parents[2]
FAMILIES = [f for f in tasks.FAMILIES if f != "hello"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, binary: Path, model: Path, extra: list[str]):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(binary), "serve", str(model), "--port", str(self.port), "--served-model-name", "tiny",
             "--reasoning-parser", "deepseek_r1", "--tool-call-parser", "hermes", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while True:
            line = self.proc.stderr.readline()
            if not line or time.time() > deadline:
                raise RuntimeError("qnext serve did not start")
            if "listening on" in line:
                break
        self.url = f"http://127.0.0.1:{self.port}"

    def metrics(self) -> str:
        return urllib.request.urlopen(self.url + "/metrics").read().decode()

    def close(self):
        self.proc.terminate()
        self.proc.wait()


def request_messages(ex: tasks.Example) -> list:
    """The conversation up to the first assistant turn to be generated (history turns as sent by a
    client: content only)."""
    last_user = max(i for i, m in enumerate(ex.messages) if m["role"] == "user")
    return [{"role": m["role"], "content": m["content"]} for m in ex.messages[: last_user + 1]]


def check(client, ex: tasks.Example, max_tokens: int) -> dict:
    msgs = request_messages(ex)
    kw = dict(model="tiny", temperature=0, max_tokens=max_tokens)
    usage = 0
    r = client.chat.completions.create(messages=msgs, tools=ex.tools, **kw)
    usage += r.usage.completion_tokens
    m = r.choices[0].message
    reasoning = getattr(m, "reasoning_content", None) or ""
    out = {"family": ex.family, "question": msgs[-1]["content"], "reasoning": bool(reasoning.strip())}
    if ex.family == "tool":
        calls = m.tool_calls or []
        got = None
        if len(calls) == 1:
            try:
                got = {"name": calls[0].function.name, "arguments": json.loads(calls[0].function.arguments)}
            except json.JSONDecodeError:
                got = {"unparsed": calls[0].function.arguments}
        out["call"] = got
        out["call_ok"] = got == ex.call
        if not out["call_ok"]:
            out.update(ok=False, content=m.content)
            return out | {"tokens": usage}
        result = next(x["content"] for x in ex.messages if x["role"] == "tool")
        msgs2 = msgs + [{"role": "assistant", "content": m.content or "",
                         "tool_calls": [c.model_dump() for c in calls]},
                        {"role": "tool", "tool_call_id": calls[0].id, "content": result}]
        r = client.chat.completions.create(messages=msgs2, tools=ex.tools, **kw)
        usage += r.usage.completion_tokens
        m = r.choices[0].message
    out["content"] = m.content
    out["ok"] = (m.content or "").strip() == ex.answer and out["reasoning"]
    out["tokens"] = usage
    return out


def spec_metrics(text: str) -> dict:
    vals = {}
    for name in ["num_drafts", "num_draft_tokens", "num_accepted_tokens"]:
        m = re.search(rf"^qnext:spec_decode_{name}(?:_total)? ([0-9.e+]+)$", text, re.M)
        if m:
            vals[name] = float(m.group(1))
    per_pos = {int(p): float(v) for p, v in re.findall(
        r'^qnext:spec_decode_num_accepted_tokens_per_pos(?:_total)?\{position="(\d+)"\} ([0-9.e+]+)$', text, re.M)}
    if vals.get("num_drafts"):
        vals["acceptance_per_position"] = [per_pos[p] / vals["num_drafts"] for p in sorted(per_pos)]
        vals["mean_acceptance_length"] = 1 + vals["num_accepted_tokens"] / vals["num_drafts"]
    return vals


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=REPO / "models/qnext-tiny")
    ap.add_argument("--qnext", type=Path, default=REPO / "target/release/qnext")
    ap.add_argument("--n", type=int, default=50, help="questions per family")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--families", nargs="*", default=FAMILIES)
    ap.add_argument("--json", type=Path)
    ap.add_argument("serve_args", nargs="*", help="extra `qnext serve` arguments (after --)")
    a = ap.parse_args()
    from openai import OpenAI

    rng = random.Random(a.seed)
    exs = [tasks.sample(rng, "eval", f) for f in a.families for _ in range(a.n)]
    server = Server(a.qnext, a.model, a.serve_args)
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", timeout=600)
        t0 = time.time()
        with cf.ThreadPoolExecutor(a.concurrency) as pool:
            results = list(pool.map(lambda ex: check(client, ex, a.max_tokens), exs))
        wall = time.time() - t0
        spec = spec_metrics(server.metrics())
    finally:
        server.close()
    summary = {}
    for f in a.families:
        rs = [r for r in results if r["family"] == f]
        summary[f] = {"correct": sum(r["ok"] for r in rs), "total": len(rs),
                      "accuracy": sum(r["ok"] for r in rs) / len(rs)}
        if f == "tool":
            summary[f]["calls_ok"] = sum(bool(r.get("call_ok")) for r in rs)
        print(f"{f:10s} {summary[f]['correct']:4d}/{len(rs):<4d} {100 * summary[f]['accuracy']:6.1f} %", flush=True)
    tokens = sum(r["tokens"] for r in results)
    print(f"{len(results)} conversations, {tokens} generated tokens in {wall:.1f} s "
          f"({tokens / wall:.1f} tokens/s at concurrency {a.concurrency})")
    if spec:
        print("speculation:", json.dumps(spec))
    for r in results:
        if not r["ok"]:
            print("WRONG", json.dumps(r)[:300], file=sys.stderr)
    if a.json:
        a.json.write_text(json.dumps({"model": str(a.model), "serve_args": a.serve_args, "n": a.n, "seed": a.seed,
                                      "summary": summary, "wall_s": wall, "generated_tokens": tokens,
                                      "speculation": spec, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
