"""Trains the bundled tiny Qwen3-Next (with its MTP head) on the task conversations of tasks.py and
writes it in the released checkpoint layout, BF16 and fine-grained FP8.

    venv/bin/python tools/tiny_model/train.py --out models/qnext-tiny

Every part of the architecture is there: Gated DeltaNet and gated-attention layers (3:1), routed
experts with a shared expert, partial RoPE, zero-centred norms, and the MTP head of spec §11.1,
trained jointly on the token after next. The model is transformers' `Qwen3NextForCausalLM`; the MTP
head is assembled from transformers' own modules the way tools/gen_fixtures.py builds its
reference (transformers has no MTP forward). Fixed seeds: the same command on the same machine
gives the same weights.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import fp8_quantize_reference  # noqa: E402  (the FP8 copy, as transformers quantises it)
import gen_fixtures as gf  # noqa: E402  (config writer, expert (un)fusing)
from transformers.models.qwen3_next import modeling_qwen3_next as hf  # noqa: E402

import build_tokenizer  # noqa: E402
import render  # noqa: E402
import tasks  # noqa: E402

SPEC = {  # the gen_fixtures spec dict: released flat config layout, BF16
    "bos": 0, "eos": 2, "vocab": 1024, "hidden": 256, "layers": 8, "interval": 4,
    "heads": 4, "kv_heads": 2, "head_dim": 64, "partial": 0.25, "theta": 10000000, "max_pos": 8192,
    "hk": 4, "hv": 8, "dk": 32, "dv": 32, "conv_k": 4,
    "experts": 16, "topk": 2, "moe_i": 64, "shared_i": 128, "norm_topk": True,
    "dtype": "bf16", "layout": "flat", "mtp": True, "intermediate": 512,
}
ROW = 768          # tokens per packed row
MTP_WEIGHT = 0.3   # the MTP loss beside the main one
AUX_WEIGHT = 0.01  # router load balancing


class MtpHead(torch.nn.Module):
    """Spec §11.1: fc([norm_e(embed(t_{i+1})); norm_h(h_i)]) → one full-attention MoE layer → norm;
    logits through the main model's lm_head."""

    def __init__(self, cfg):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        one = gf.hf_config_from_json(dict(json.loads(cfg.to_json_string()), num_hidden_layers=1,
                                          layer_types=["full_attention"]))
        one._attn_implementation = cfg._attn_implementation
        self.pre_fc_norm_embedding = hf.Qwen3NextRMSNorm(H, eps=eps)
        self.pre_fc_norm_hidden = hf.Qwen3NextRMSNorm(H, eps=eps)
        self.fc = torch.nn.Linear(2 * H, H, bias=False)
        self.layer = hf.Qwen3NextDecoderLayer(one, 0)
        self.norm = hf.Qwen3NextRMSNorm(H, eps=eps)

    def forward(self, model, ids, hidden):
        """ids [B, T], hidden [B, T, H] (post final norm) → logits [B, T-1, V] predicting ids[:, 2:]."""
        e = model.model.embed_tokens(ids[:, 1:])
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(e), self.pre_fc_norm_hidden(hidden[:, :-1])], -1))
        T1 = x.shape[1]
        pos = torch.arange(T1)[None].expand(x.shape[0], -1)
        mask = torch.full((T1, T1), torch.finfo(x.dtype).min).triu(1)[None, None]
        y = self.layer(x, position_embeddings=model.model.rotary_emb(x, pos), attention_mask=mask, position_ids=pos)
        y = y[0] if isinstance(y, tuple) else y
        return model.lm_head(self.norm(y))

    def released(self) -> dict:
        sd = {k: v for k, v in self.state_dict().items() if not k.startswith("layer.")}
        out = {f"mtp.{k}": v for k, v in sd.items()}
        out.update(gf.unfuse_experts({k: v for k, v in self.layer.state_dict().items()}, "", "mtp.layers.0."))
        return out


def encode_example(tok, r: render.Renderer, ex, rng):
    ids, mask = [], []
    for text, trained in r.pieces(ex, rng):
        t = tok.encode(text).ids
        ids += t
        mask += [trained] * len(t)
    return ids, mask


def batches(tok, seed: int, rows: int):
    """Packed rows of whole examples; the loss mask covers what the model generates."""
    rng = random.Random(seed)
    r = render.Renderer()
    pending = None
    while True:
        ids = torch.zeros(rows, ROW, dtype=torch.long)
        mask = torch.zeros(rows, ROW, dtype=torch.bool)
        for b in range(rows):
            n = 0
            while True:
                if pending is None:
                    pending = encode_example(tok, r, tasks.sample(rng, "train"), rng)
                    if len(pending[0]) > ROW:
                        pending = None
                        continue
                e_ids, e_mask = pending
                if n + len(e_ids) > ROW:
                    break
                ids[b, n:n + len(e_ids)] = torch.tensor(e_ids)
                mask[b, n:n + len(e_ids)] = torch.tensor(e_mask)
                n += len(e_ids)
                pending = None
        yield ids, mask


def masked_ce(logits, targets, mask):
    lg = logits[mask]
    return F.cross_entropy(lg.float(), targets[mask])


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def build(seed: int):
    torch.manual_seed(seed)
    cfg_json = gf.make_config_json(SPEC)
    cfg = gf.hf_config_from_json(cfg_json)
    cfg._attn_implementation = "sdpa"
    cfg.output_router_logits = True
    cfg.router_aux_loss_coef = AUX_WEIGHT
    model = hf.Qwen3NextForCausalLM(cfg)
    mtp = MtpHead(cfg)
    for m in mtp.modules():       # same initialisation as the main model's modules
        model._init_weights(m)
    return cfg_json, model, mtp


def export(out: Path, cfg_json: dict, model, mtp, tok_dir: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sd = gf.unfuse_experts({k: v.detach() for k, v in model.state_dict().items()})
    sd.update({k: v.detach() for k, v in mtp.released().items()})
    f32 = {k: v.float().contiguous() for k, v in sd.items()}
    s = dict(SPEC, dtype="bf16", scale_dtype=torch.float32)
    stored, _ = gf.to_storage(f32, s)
    gf.save_st(out / "model.safetensors", {k: stored[k] for k in gf.ordered_keys(stored)})
    gf.write_json(out / "config.json", gf.make_config_json(s))
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        (out / name).write_text((tok_dir / name).read_text())
    gf.write_json(out / "training.json", meta)
    # The FP8 copy is what transformers' FineGrainedFP8 quantiser makes of the BF16 weights, as
    # a user's `qnext quantize` of them does (tests/quantize.rs holds the two byte-equal).
    fp8_quantize_reference.main(out, out.with_name(out.name + "-fp8"))


def tokenizer_files(tok_dir: Path, tok) -> None:
    """tokenizer_config.json (the Thinking template, Qwen's settings, our ids) and generation_config.json."""
    qwen = json.loads((render.REPO / "tests/fixtures/chat_templates/tokenizer_config.thinking.json").read_text())
    vocab = tok.get_vocab(with_added_tokens=True)
    spec = json.loads(tok.to_str())
    qwen["added_tokens_decoder"] = {
        str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for a in spec["added_tokens"]}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(qwen, indent=2, ensure_ascii=False) + "\n")
    # Greedy by default: a model this small is reliable at its argmax, not in its tails.
    gen = {"bos_token_id": vocab["<|endoftext|>"], "do_sample": False,
           "eos_token_id": [vocab["<|im_end|>"], vocab["<|endoftext|>"]], "pad_token_id": vocab["<|endoftext|>"]}
    (tok_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True, help="BF16 folder; the FP8 copy goes to OUT-fp8")
    ap.add_argument("--steps", type=int, default=1250)
    ap.add_argument("--rows", type=int, default=4, help=f"packed rows of {ROW} tokens per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--measure", type=int, default=0, help="time this many steps and stop")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()

    tok_dir = a.out.with_name(a.out.name + "-tokenizer.tmp")
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer.build(SPEC["vocab"], 20000, a.seed + 1234)
    tok.save(str(tok_dir / "tokenizer.json"))
    tokenizer_files(tok_dir, tok)
    print(f"tokenizer: {tok.get_vocab_size()} tokens ({time.time() - t0:.0f} s)", flush=True)

    cfg_json, model, mtp = build(a.seed)
    n_params = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in mtp.parameters())
    print(f"parameters: {n_params / 1e6:.2f} M (MTP {sum(p.numel() for p in mtp.parameters()) / 1e6:.2f} M)", flush=True)
    params = list(model.parameters()) + list(mtp.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    steps = a.measure or a.steps
    data = batches(tok, a.seed + 1, a.rows)
    model.train()
    mtp.train()
    t_train = time.time()
    for step in range(steps):
        ids, mask = next(data)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, a.lr, min(100, steps // 10 + 1))
        out = model.model(input_ids=ids, output_router_logits=True)
        h = out.last_hidden_state
        logits = model.lm_head(h)
        loss_main = masked_ce(logits[:, :-1], ids[:, 1:], mask[:, 1:])
        loss_mtp = masked_ce(mtp(model, ids, h)[:, :-1], ids[:, 2:], mask[:, 2:])
        aux = hf.load_balancing_loss_func(out.router_logits, SPEC["experts"], SPEC["topk"])
        loss = loss_main + MTP_WEIGHT * loss_mtp + AUX_WEIGHT * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            el = time.time() - t_train
            tps = (step + 1) * a.rows * ROW / el
            print(f"step {step:5d}  loss {loss_main.item():.4f}  mtp {loss_mtp.item():.4f}  aux {aux.item():.3f}  "
                  f"lr {opt.param_groups[0]['lr']:.2e}  {el:.0f} s  {tps:.0f} tok/s", flush=True)
    if a.measure:
        return
    model.eval()
    meta = {"command": " ".join(sys.argv), "steps": steps, "rows": a.rows, "row_tokens": ROW, "lr": a.lr,
            "seed": a.seed, "threads": a.threads, "parameters": n_params, "final_loss": loss_main.item(),
            "final_mtp_loss": loss_mtp.item(), "train_seconds": round(time.time() - t_train),
            "total_seconds": round(time.time() - t0), "torch": torch.__version__}
    export(a.out, cfg_json, model, mtp, tok_dir, meta)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    print(f"wrote {a.out} and {a.out}-fp8 in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
