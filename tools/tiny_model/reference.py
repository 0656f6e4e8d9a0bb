"""Reference log-probabilities of the trained tiny model from transformers, for the Rust tests:
tests/fixtures/qnext-tiny{,-fp8}/reference.safetensors with `ids` (a held-out conversation,
prompt and answer, > 2 DeltaNet chunks), `logprobs` [T, V] and `mtp_logprobs` [T-1, V], computed in
float32 from the stored weights (BF16 widened, FP8 dequantised with its block scales).

    venv/bin/python tools/tiny_model/reference.py models/qnext-tiny models/qnext-tiny-fp8
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import gen_fixtures as gf  # noqa: E402

import render  # noqa: E402
import tasks  # noqa: E402


def effective_weights(folder: Path) -> dict:
    st = load_file(folder / "model.safetensors")
    out = {}
    for k, v in st.items():
        if k.endswith("weight_scale_inv"):
            continue
        sinv = st.get(k[: -len("weight")] + "weight_scale_inv")
        out[k] = gf.fp8_dequantize(v, sinv) if sinv is not None else v.float()
    return out


def conversation(tok: Tokenizer) -> tuple[str, torch.Tensor]:
    rng = random.Random(99)
    ex = tasks.sample(rng, "eval", "mul")
    text = "".join(t for t, _ in render.Renderer().pieces(ex, rng))
    # The first 200 tokens (the prompt and the start of the worked reasoning): past two DeltaNet
    # chunks, and 0.8 MB of log-probabilities per tensor.
    ids = tok.encode(text).ids[:200]
    text = tok.decode(ids, skip_special_tokens=False)
    assert tok.encode(text).ids == ids
    return text, torch.tensor(ids)


def main(folders: list[Path]) -> None:
    torch.set_num_threads(1)
    for folder in folders:
        cfg_json = json.loads((folder / "config.json").read_text())
        hf_cfg = gf.hf_config_from_json(cfg_json)
        model = gf.new_model(hf_cfg)
        w = effective_weights(folder)
        model.load_state_dict(gf.fuse_experts(w, cfg_json["num_experts"]), strict=True)
        text, ids = conversation(Tokenizer.from_file(str(folder / "tokenizer.json")))
        ref = gf.run_reference(model, ids)
        cfg1 = gf.hf_config_from_json({**cfg_json, "num_hidden_layers": 1, "full_attention_interval": 1})
        cfg1._attn_implementation = "eager"
        cfg1._experts_implementation = "eager"
        assert cfg1.layer_types == ["full_attention"]
        mtp_lp, _ = gf.mtp_reference(model, {k: v for k, v in w.items() if k.startswith("mtp.")}, cfg1, ids,
                                     ref["hidden_final"])
        out = gf.FIX / folder.name
        out.mkdir(parents=True, exist_ok=True)
        gf.save_st(out / "reference.safetensors", {"ids": ids.to(torch.int64), "logprobs": ref["logprobs"].contiguous(),
                                                  "mtp_logprobs": mtp_lp.contiguous()})
        (out / "reference_text.txt").write_text(text)
        top = ref["logprobs"].max(-1).values
        print(f"{out}: {len(ids)} tokens, mean top-1 probability {top.exp().mean():.3f}")


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
