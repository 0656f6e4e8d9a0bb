#!/usr/bin/env python3
"""Load test of `qnext serve` (standard library only; loopback only; bounded in time and count).

N concurrent clients each send streaming chat or completion requests (varied prompt lengths and
token budgets; a fraction hang up midway) until the duration is over. Reports requests, errors,
aggregate tokens/s and latencies; afterwards checks that /metrics shows no request running or
waiting and every slot free, and that the server's resident memory stayed stable.

  python3 tests/python/loadtest.py --model tests/fixtures/qwen-vocab --max-num-seqs 8
  python3 tests/python/loadtest.py --url http://127.0.0.1:8000 --pid 1234
  python3 tests/python/loadtest.py --model tests/fixtures/qwen-vocab --duration 600 --mix 0.4  # soak

Exit status 0 when there were no errors, no leaked slots and RSS was stable."""

import argparse
import asyncio
import json
import os
import pathlib
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega").split()


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def get(url, key=None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read().decode()


class Stats:
    def __init__(self):
        self.requests = 0
        self.completed = 0
        self.cancelled = 0
        self.errors = 0
        self.error_samples = []
        self.tokens = 0
        self.ttft = []
        self.e2e = []
        self.refused = 0
        self.by_kind = {}

    def error(self, what):
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(what)


async def stream_request(host, port, key, path, body, stats, hang_up_after):
    """One streaming request over a raw HTTP/1.1 connection; returns when it ends."""
    payload = json.dumps(body).encode()
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n")
        if key:
            head += f"Authorization: Bearer {key}\r\n"
        writer.write(head.encode() + b"\r\n" + payload)
        await writer.drain()
        status_line = await reader.readline()
        status = int(status_line.split()[1]) if status_line else 0
        chunked = False
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
                chunked = True
        if status != 200:
            stats.error(f"HTTP {status}: {(await reader.read(500)).decode(errors='replace')}")
            return
        buf = b""
        events = 0
        done = False
        first = None
        usage = None
        while not done:
            if chunked:
                size_line = await reader.readline()
                if not size_line:
                    break
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                data = await reader.readexactly(size + 2)
                buf += data[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    break
                buf += data
            while b"\n\n" in buf:
                frame, buf = buf.split(b"\n\n", 1)
                if not frame.startswith(b"data: "):
                    continue
                d = frame[6:]
                if d == b"[DONE]":
                    done = True
                    break
                ev = json.loads(d)
                if "error" in ev:
                    stats.error(f"stream error: {ev['error'].get('message')}")
                    return
                if ev.get("usage"):
                    usage = ev["usage"]
                elif ev.get("choices"):
                    events += 1
                    c = ev["choices"][0]
                    delta = c.get("delta") or {}
                    has_text = c.get("text") or delta.get("content") or delta.get("reasoning_content")
                    if first is None and has_text:
                        first = time.monotonic() - t0
                    if hang_up_after is not None and events >= hang_up_after:
                        stats.cancelled += 1
                        return
        if not done:
            stats.error("stream ended without [DONE]")
            return
        if usage is None:
            stats.error("no usage chunk")
            return
        stats.completed += 1
        stats.tokens += usage["completion_tokens"]
        if first is not None:
            stats.ttft.append(first)
        stats.e2e.append(time.monotonic() - t0)
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        stats.error(f"{type(e).__name__}: {e}")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def plain_request(host, port, key, path, payload):
    """One non-streamed request (raw bytes as the body); returns (status, parsed JSON or None)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n")
        if key:
            head += f"Authorization: Bearer {key}\r\n"
        writer.write(head.encode() + b"\r\n" + payload)
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    if any(l.lower().startswith(b"transfer-encoding:") and b"chunked" in l.lower() for l in lines):
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


# Requests every server must refuse with a 400 and a JSON error (the soak's invalid traffic).
INVALID = [
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}',
    b'{"messages": [{"role": "wizard", "content": "hi"}]}',
    b'{"messages": "not a list"}',
    b'{"prompt": "x", "stop": ["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"]}',
    b'{"prompt": "x", "n": 0}',
    b'{"prompt": "x", "logit_bias": {"-5": 1}}',
    b'{"prompt": "x", "max_tokens": 100000000}',
    b'{"prompt": 12}',
    b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 7',
    b'\xff\xfe not json',
]


async def mixed_request(rng, args, host, port, stats, words):
    """One request of the soak's mix: non-streamed, n > 1, invalid, or a long prompt."""
    kind = rng.random()
    common = {"max_tokens": rng.randint(args.min_tokens, args.max_tokens),
              "temperature": rng.choice([0.0, 0.7, 1.0]), "ignore_eos": True}
    if args.model_name:
        common["model"] = args.model_name
    t0 = time.monotonic()
    if kind < 0.3:
        label = "invalid"
        status, body = await plain_request(host, port, args.api_key, rng.choice(
            ["/v1/chat/completions", "/v1/completions"]), rng.choice(INVALID))
        if status == 400 and isinstance(body, dict) and "error" in body:
            stats.refused += 1
        else:
            stats.error(f"invalid request answered {status}: {str(body)[:200]}")
        return
    if kind < 0.55:
        label, n = "n>1", rng.randint(2, 4)
    elif kind < 0.8:
        label, n = "non-streamed", 1
    else:
        label, n = "long prompt", 1
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(args.max_model_len // 5,
                                                                        args.max_model_len // 3)))
    if rng.random() < 0.5:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": words}]}
    else:
        path, body = "/v1/completions", {"prompt": words}
    body.update(common, n=n)
    try:
        status, out = await plain_request(host, port, args.api_key, path, json.dumps(body).encode())
    except (OSError, asyncio.IncompleteReadError) as e:
        stats.error(f"{label}: {type(e).__name__}: {e}")
        return
    if status != 200 or not isinstance(out, dict) or len(out.get("choices", [])) != n:
        stats.error(f"{label}: HTTP {status}: {str(out)[:200]}")
        return
    stats.completed += 1
    stats.tokens += out["usage"]["completion_tokens"]
    stats.by_kind.setdefault(label, []).append(time.monotonic() - t0)


async def client(i, args, host, port, deadline, stats, budget):
    rng = random.Random(args.seed * 1000 + i)
    while time.monotonic() < deadline and budget[0] > 0:
        budget[0] -= 1
        stats.requests += 1
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, args.max_prompt_words)))
        max_tokens = rng.randint(args.min_tokens, args.max_tokens)
        common = {"max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
                  "temperature": rng.choice([0.0, 0.7, 1.0]), "ignore_eos": True}
        if args.model_name:
            common["model"] = args.model_name
        if rng.random() < 0.5:
            path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": words}], **common}
        else:
            path, body = "/v1/completions", {"prompt": words, **common}
        if rng.random() < args.mix:
            await mixed_request(rng, args, host, port, stats, words)
            continue
        hang_up = rng.randint(1, 8) if rng.random() < args.hang_up_fraction else None
        await stream_request(host, port, args.api_key, path, body, stats, hang_up)


def start_server(args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    binary = args.bin or os.environ.get("QNEXT_BIN") or next(
        (str(p) for p in (ROOT / "target/release/qnext", ROOT / "target/debug/qnext") if p.exists()), None)
    if not binary:
        sys.exit("no qnext binary: build it or pass --bin")
    cmd = [binary, "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
           "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len)]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    cmd += args.server_args.split()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    while True:
        line = proc.stderr.readline()
        if not line:
            sys.exit("qnext serve exited before listening")
        if "listening on" in line:
            break
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, f"http://127.0.0.1:{port}"


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="start `qnext serve MODEL` (a checkpoint folder) for the test")
    ap.add_argument("--bin", help="the qnext binary (default: $QNEXT_BIN, target/release, target/debug)")
    ap.add_argument("--url", help="test a running server instead (loopback only)")
    ap.add_argument("--pid", type=int, help="the running server's process id, for RSS")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model-name", default=None, help="`model` to send (default: none)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--min-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--max-prompt-words", type=int, default=300)
    ap.add_argument("--hang-up-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-args", default="",
                    help="more `qnext serve` arguments, space-separated, e.g. '--prefix-cache-memory 256MiB'")
    ap.add_argument("--rss-log", help="write the RSS samples (CSV) here")
    ap.add_argument("--mix", type=float, default=0.0,
                    help="fraction of requests drawn from the soak's mix instead of plain streams: "
                         "invalid (expect 400), n > 1, non-streamed, long prompts")
    args = ap.parse_args()
    if args.duration > 3600 or args.clients > 1024:
        sys.exit("bounded: --duration <= 3600 and --clients <= 1024")

    proc = None
    if args.model:
        proc, url = start_server(args)
        pid = proc.pid
    elif args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        sys.exit("pass --model or --url")
    parsed = urllib.parse.urlparse(url)
    if parsed.hostname not in LOOPBACK:
        sys.exit("loopback only: the URL must be 127.0.0.1, localhost or ::1")
    host, port = parsed.hostname, parsed.port or 80

    try:
        m0 = get(url + "/metrics")
        slots = int(metric(m0, "qnext:num_free_slots") + metric(m0, "qnext:num_requests_running"))
        gen0 = metric(m0, "qnext:generation_tokens_total")
        stats = Stats()
        rss = []
        stop_sampling = threading.Event()

        def sample():
            while not stop_sampling.wait(2.0):
                r = rss_kb(pid) if pid else None
                if r:
                    try:
                        cached = metric(get(url + "/metrics"), "qnext:prefix_cache_bytes") / 1024
                    except (OSError, KeyError, ValueError):
                        cached = 0.0
                    rss.append((time.monotonic(), r, cached))

        threading.Thread(target=sample, daemon=True).start()
        print(f"load: {args.clients} streaming clients for {args.duration:.0f} s against {url} "
              f"(server pid {pid}, {slots} slots)", flush=True)
        t0 = time.monotonic()
        budget = [args.max_requests]

        async def run():
            deadline = time.monotonic() + args.duration
            await asyncio.gather(*(client(i, args, host, port, deadline, stats, budget)
                                   for i in range(args.clients)))

        asyncio.run(run())
        elapsed = time.monotonic() - t0
        stop_sampling.set()

        # No leaked slots: wait for the engine to publish its last step.
        deadline = time.time() + 15
        while True:
            m = get(url + "/metrics")
            running = metric(m, "qnext:num_requests_running")
            waiting = metric(m, "qnext:num_requests_waiting")
            free = metric(m, "qnext:num_free_slots")
            if (running == 0 and waiting == 0 and free == slots) or time.time() > deadline:
                break
            time.sleep(0.1)
        gen = metric(m, "qnext:generation_tokens_total") - gen0

        print(f"requests: {stats.requests} sent, {stats.completed} completed, "
              f"{stats.cancelled} hung up on purpose, {stats.refused} invalid ones refused with "
              f"a 400 as expected, {stats.errors} unexpected errors")
        for e in stats.error_samples:
            print(f"  error: {e}")
        print(f"tokens: {stats.tokens} in completed streams; {gen:.0f} generated by the engine "
              f"(incl. hung-up requests) in {elapsed:.1f} s = {gen / elapsed:.1f} tokens/s aggregate")
        if stats.ttft:
            print(f"time to first token: median {statistics.median(stats.ttft) * 1000:.0f} ms, "
                  f"p90 {pct(stats.ttft, 0.9) * 1000:.0f} ms; request latency median "
                  f"{statistics.median(stats.e2e):.2f} s, p90 {pct(stats.e2e, 0.9):.2f} s")
        for label, xs in sorted(stats.by_kind.items()):
            print(f"  {label}: {len(xs)} completed, latency p50 {pct(xs, 0.5):.2f} s, "
                  f"p95 {pct(xs, 0.95):.2f} s")
        if stats.e2e:
            print(f"  streams: latency p50 {pct(stats.e2e, 0.5):.2f} s, p95 {pct(stats.e2e, 0.95):.2f} s; "
                  f"TTFT p50 {pct(stats.ttft, 0.5) * 1000:.0f} ms, p95 {pct(stats.ttft, 0.95) * 1000:.0f} ms")
        print(f"after: running {running:.0f}, waiting {waiting:.0f}, free slots {free:.0f}/{slots}")
        leaked = not (running == 0 and waiting == 0 and free == slots)
        stable = True
        if rss:
            # The prefix cache grows by design up to its budget (--prefix-cache-memory): what
            # it holds is taken out of the growth that counts.
            warm = [x for x in rss if x[0] - t0 >= min(10.0, elapsed / 4)] or rss
            (_, first, cache0), (_, last, cache1) = warm[0], rss[-1]
            peak = max(x[1] for x in rss)
            growth = (last - first) - (cache1 - cache0)
            stable = growth <= first * 0.2 + 16 * 1024
            print(f"RSS: {first / 1024:.1f} MB after warm-up, {peak / 1024:.1f} MB peak, "
                  f"{last / 1024:.1f} MB at the end ({len(rss)} samples); prefix cache "
                  f"{cache0 / 1024:.1f} → {cache1 / 1024:.1f} MB; growth besides the cache "
                  f"{growth / 1024:.1f} MB: {'stable' if stable else 'GROWING'}")
            if args.rss_log:
                with open(args.rss_log, "w") as f:
                    f.write("seconds,rss_mb,prefix_cache_mb\n")
                    for t, r, c in rss:
                        f.write(f"{t - t0:.1f},{r / 1024:.1f},{c / 1024:.1f}\n")
        else:
            print("RSS: not sampled (no pid)")
        ok = stats.errors == 0 and not leaked and stable and stats.completed > 0
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        if proc:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
