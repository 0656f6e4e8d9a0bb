#!/usr/bin/env python3
"""Medians of a side_by_side.sh sitting: per engine pp and tg (tokens/s), the read probe, and
per-round ratios to a baseline engine (its median over rounds).

    python3 tools/bench/summarize.py OUTDIR [BASELINE_NAME]
"""
import json
import pathlib
import statistics
import sys
from collections import defaultdict


def llama_bench(path):
    """(pp, tg) of a llama-bench -o json file: the mean of its samples per test."""
    pp = tg = None
    for test in json.loads(path.read_text()):
        if test.get("n_prompt", 0) > 0 and test.get("n_gen", 0) == 0:
            pp = test["avg_ts"]
        elif test.get("n_gen", 0) > 0 and test.get("n_prompt", 0) == 0:
            tg = test["avg_ts"]
    return pp, tg


def main():
    out = pathlib.Path(sys.argv[1])
    base = sys.argv[2] if len(sys.argv) > 2 else None
    runs = defaultdict(dict)  # name -> round -> (pp, tg, probe)
    for f in sorted(out.glob("*-*.json")):
        rnd, name = f.stem.split("-", 1)
        try:
            j = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue  # a run still going
        if name in ("llama", "ik"):
            pp, tg = llama_bench(f)
            runs[name][int(rnd)] = (pp, tg, None)
        else:
            runs[name][int(rnd)] = (
                j["pp_tokens_per_s"] or None,
                j["tg_tokens_per_s"] or None,
                j.get("read_bandwidth_gb_per_s") or None,
            )
    print((out / "machine.txt").read_text().strip() if (out / "machine.txt").exists() else "")
    print(f"{'engine':10} {'rounds':>6} {'pp t/s':>8} {'tg t/s':>8} {'probe GB/s':>10}  ratios to {base or '-'} (pp, tg)")
    for name, by_round in runs.items():
        med = lambda i: statistics.median([v[i] for v in by_round.values() if v[i]]) if any(v[i] for v in by_round.values()) else float("nan")
        line = f"{name:10} {len(by_round):>6} {med(0):8.2f} {med(1):8.2f} {med(2):10.1f}"
        if base and base in runs and name != base:
            pr, tr = [], []
            for rnd, v in by_round.items():
                b = runs[base].get(rnd)
                if b and v[0] and b[0]:
                    pr.append(v[0] / b[0])
                if b and v[1] and b[1]:
                    tr.append(v[1] / b[1])
            if pr or tr:
                line += f"  {statistics.median(pr) if pr else float('nan'):.2f}x, {statistics.median(tr) if tr else float('nan'):.2f}x"
        print(line)


if __name__ == "__main__":
    main()
