"""Probe for the letter-copying failure of the bundled model: trains the main model (no MTP head,
to be quicker) on a chosen family mix and reports, every 50 steps, how often it predicts the
copied letters of held-out reverse tasks right, teacher-forced.

    venv/bin/python tools/tiny_model/letter_probe.py --steps 300 --mix reverse=1,count=1,sort=1

With the strings-only mix above, 300 steps (the string examples of ~1,000 steps of the full
recipe) stayed at 15-17 % (Emerald Rapids, 12 min): the mix is not what holds letters back.
"""
from __future__ import annotations

import argparse
import random
import string
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import build_tokenizer  # noqa: E402
import render  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402
from transformers.models.qwen3_next import modeling_qwen3_next as hf  # noqa: E402


def letter_accuracy(model, tok, n: int = 30) -> float:
    rng = random.Random(5)
    r = render.Renderer()
    ok = total = 0
    model.eval()
    for _ in range(n):
        ex = tasks.sample(rng, "eval", "reverse")
        ids, mask = [], []
        for text, trained in r.pieces(ex, rng):
            t = tok.encode(text).ids
            ids += t
            mask += [trained] * len(t)
        with torch.no_grad():
            pred = model(input_ids=torch.tensor([ids])).logits[0, :-1].argmax(-1)
        for j in range(len(ids) - 1):
            if mask[j + 1] and tok.id_to_token(ids[j + 1]) in string.ascii_uppercase:
                total += 1
                ok += int(pred[j] == ids[j + 1])
    model.train()
    return ok / total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--mix", default="reverse=1,count=1,sort=1", help="family=weight,...")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tasks.FAMILIES = {k: float(v) for k, v in (x.split("=") for x in a.mix.split(","))}
    tok = build_tokenizer.build(train.SPEC["vocab"], 20000, 1234)
    _, model, _ = train.build(0)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.05},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    data = train.batches(tok, 1, 4)
    t0 = time.time()
    for step in range(a.steps):
        ids, mask = next(data)
        for g in opt.param_groups:
            g["lr"] = train.lr_at(step, a.steps, a.lr, min(100, a.steps // 10 + 1))
        out = model.model(input_ids=ids, output_router_logits=True)
        loss = train.masked_ce(model.lm_head(out.last_hidden_state)[:, :-1], ids[:, 1:], mask[:, 1:])
        aux = hf.load_balancing_loss_func(out.router_logits, train.SPEC["experts"], train.SPEC["topk"])
        opt.zero_grad(set_to_none=True)
        (loss + train.AUX_WEIGHT * aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 49 or step == a.steps - 1:
            print(f"step {step + 1}  loss {loss.item():.3f}  copied letters right {letter_accuracy(model, tok):.3f}  "
                  f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
