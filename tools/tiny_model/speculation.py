"""What MTP speculation gives on the bundled model: `qnext run --chat` on held-out questions of
every family, greedy, with --speculative-tokens 0..K, rounds alternating between the settings;
reports the acceptance per draft position and the decode rate (generated tokens over generation
time, as `run` prints them), medians over rounds, and checks that every setting prints the same
text (speculation is lossless).

    venv/bin/python tools/tiny_model/speculation.py [--model models/qnext-tiny] [--k 3] [--rounds 5]
"""
from __future__ import annotations

import argparse
import random
import re
import statistics
import subprocess
from pathlib import Path

import tasks

REPO = Path(__file__).resolve().parents[2]
RATE = re.compile(r"generated (\d+) tokens in ([0-9.]+)s")
SPEC = re.compile(r"speculation: \d+ rounds, (\d+)/(\d+) drafts accepted .*per position \[([^\]]*)\]")


def run(binary: Path, model: Path, question: str, k: int, threads: int) -> tuple[str, int, float, tuple]:
    args = [str(binary), "run", "--model", str(model), "--chat", "--prompt", question, "--temperature", "0",
            "--threads", str(threads)]
    if k:
        args += ["--speculative-tokens", str(k)]
    p = subprocess.run(args, capture_output=True, text=True, check=True)
    m = RATE.search(p.stderr)
    s = SPEC.search(p.stderr)
    spec = (int(s.group(1)), int(s.group(2)), [float(x) for x in s.group(3).split(",")]) if s else None
    return p.stdout, int(m.group(1)), float(m.group(2)), spec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=REPO / "models/qnext-tiny")
    ap.add_argument("--qnext", type=Path, default=REPO / "target/release/qnext")
    ap.add_argument("--k", type=int, default=3, help="largest number of draft tokens")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-family", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    rng = random.Random(7)
    fams = [f for f in tasks.FAMILIES if f not in ("hello", "tool", "followup")]  # single-turn questions
    questions = [tasks.question_of(tasks.sample(rng, "eval", f)) for f in fams for _ in range(a.per_family)]
    questions = [q[2:-2] for q in questions]  # the JSON list of one user message -> the message
    ks = list(range(a.k + 1))
    rates = {k: [] for k in ks}
    accepted = {k: [0, 0] for k in ks}
    per_pos = {k: [] for k in ks}
    texts: dict[str, str] = {}
    for _ in range(a.rounds):
        for k in ks:
            tokens, secs = 0, 0.0
            for q in questions:
                out, n, t, spec = run(a.qnext, a.model, q, k, a.threads)
                if texts.setdefault(q, out) != out:
                    raise SystemExit(f"k={k} changed the output for {q!r}")
                tokens += n
                secs += t
                if spec:
                    accepted[k][0] += spec[0]
                    accepted[k][1] += spec[1]
                    per_pos[k].append((spec[1] // k, spec[2]))  # (verification rounds, per-position rates)
            rates[k].append(tokens / secs)
    base = statistics.median(rates[0])
    print(f"{len(questions)} held-out questions ({', '.join(fams)}), {a.rounds} rounds, {a.threads} threads")
    for k in ks:
        r = statistics.median(rates[k])
        line = f"k={k}: {r:7.0f} tokens/s (median; {r / base:.2f}x k=0)"
        if k:
            acc, drafts = accepted[k]
            rounds = sum(n for n, _ in per_pos[k])
            pos = [sum(n * p[i] for n, p in per_pos[k]) / rounds for i in range(k)]
            line += (f"  accepted {acc}/{drafts} ({100 * acc / drafts:.1f} %), per position "
                     + ", ".join(f"{x:.2f}" for x in pos) + f", mean accepted length {1 + acc / drafts * k:.2f}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
