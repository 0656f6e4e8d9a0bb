"""Held-out conversations of the bundled model's task families, rendered as it was trained on
them (Thinking template, reasoning and answers included): text for `qnext score` and
`qnext compare` that no training step has seen.

    python3 tools/tiny_model/heldout_text.py --n 24 > heldout.txt
"""
from __future__ import annotations

import argparse
import random

import render
import tasks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=24, help="conversations")
    ap.add_argument("--seed", type=int, default=2024)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    r = render.Renderer()
    for _ in range(a.n):
        ex = tasks.sample(rng, "eval")
        text = "".join(t for t, _ in r.pieces(ex, rng))
        print(text, end="" if text.endswith("\n") else "\n")


if __name__ == "__main__":
    main()
