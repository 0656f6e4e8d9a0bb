#!/usr/bin/env python3
"""Requests/s and latency of `qnext serve` replicas behind a router (or one server alone), on
127.0.0.1 (standard library only; the router binaries from `pip install vllm-router smg`).

C clients each run short chat conversations (2 turns, greedy, --max-tokens) for --duration
seconds; reported: requests completed per second, median and 95th-percentile latency of a
request, errors.

  python3 tools/bench/router_load.py --replicas 1                      # one server, no router
  python3 tools/bench/router_load.py --replicas 3 --router vllm-router
  python3 tools/bench/router_load.py --replicas 3 --router smg --clients 6 --duration 60

Replicas on one machine share its cores: on a 2-core machine three replicas do not compute
three times as much. The default model is the bundled one (models/qnext-tiny)."""

import argparse
import concurrent.futures as cf
import json
import pathlib
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
QUESTIONS = ["What is {a} * {b}?", "What is {a} + {b}?", "What is {a} - {b}?",
             "Convert {b} hours to minutes."]
FOLLOW_UPS = ["Add {b} to the result.", "Now subtract {b} from that."]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            chat(url, [{"role": "user", "content": "Hi"}], 4)
            return
        except Exception:
            time.sleep(0.5)
    sys.exit(f"{url} did not answer within {timeout} s")


def chat(url, messages, max_tokens):
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"] or ""


def client(url, seed, until, max_tokens):
    rng = random.Random(seed)
    lat, errors = [], 0
    while time.time() < until:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        messages = [{"role": "user", "content": rng.choice(QUESTIONS).format(a=a, b=b)}]
        for turn in range(2):
            t0 = time.perf_counter()
            try:
                answer = chat(url, messages, max_tokens)
                lat.append(time.perf_counter() - t0)
            except Exception:
                errors += 1
                break
            messages += [{"role": "assistant", "content": answer},
                         {"role": "user", "content": rng.choice(FOLLOW_UPS).format(b=rng.randint(10, 999))}]
            if time.time() >= until:
                break
    return lat, errors


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "qnext-tiny"))
    ap.add_argument("--qnext", default=str(ROOT / "target" / "release" / "qnext"))
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--router", choices=["vllm-router", "smg"], help="needed with more than one replica")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=4)
    a = ap.parse_args()
    if a.replicas > 1 and not a.router:
        sys.exit("give --router with more than one replica")
    procs = []
    try:
        ports = [free_port() for _ in range(a.replicas)]
        for p in ports:
            procs.append(subprocess.Popen(
                [a.qnext, "serve", a.model, "--host", "127.0.0.1", "--port", str(p), "--served-model-name", "m",
                 "--max-num-seqs", str(a.max_num_seqs)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for u in urls:
            wait_ready(u)
        url = urls[0]
        if a.router:
            binary = shutil.which(a.router) or str(pathlib.Path(sys.executable).parent / a.router)
            port, metrics = free_port(), free_port()
            if a.router == "vllm-router":
                cmd = [binary, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls,
                       "--policy", "cache_aware", "--prometheus-port", str(metrics)]
            else:
                cmd = [binary, "launch", "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls,
                       "--policy", "cache_aware", "--disable-tokenizer-autoload",
                       "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            url = f"http://127.0.0.1:{port}"
            wait_ready(url)
            time.sleep(3)
        until = time.time() + a.duration
        t0 = time.time()
        with cf.ThreadPoolExecutor(a.clients) as ex:
            results = list(ex.map(lambda i: client(url, i, until, a.max_tokens), range(a.clients)))
        wall = time.time() - t0
        lat = sorted(x for r in results for x in r[0])
        errors = sum(r[1] for r in results)
        p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan")
        print(json.dumps({"replicas": a.replicas, "router": a.router, "clients": a.clients,
                          "requests": len(lat), "errors": errors, "seconds": round(wall, 1),
                          "requests_per_s": round(len(lat) / wall, 2),
                          "p50_s": round(statistics.median(lat), 3) if lat else None, "p95_s": round(p95, 3)}))
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
