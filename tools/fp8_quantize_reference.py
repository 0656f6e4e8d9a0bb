#!/usr/bin/env python3
"""The FP8 checkpoint that transformers' own FineGrainedFP8 quantiser makes of a BF16 checkpoint:
the reference `qnext quantize` is tested against byte for byte (tests/quantize.rs).

    venv/bin/python tools/fp8_quantize_reference.py models/qnext-tiny models/qnext-tiny-fp8

Each Linear weight that the released FP8 checkpoints store as e4m3 (spec §4.2) goes through
`transformers.integrations.finegrained_fp8.Fp8Quantize._quantize_one` with 128×128 blocks.
That function leaves a matrix whose sides are not multiples of 128 unquantised; the released
loaders (and qnext) take partial edge blocks instead, so such a matrix is padded with zeros to
the next multiple of 128 (which changes no block's amax), quantised by the same function, and
cropped. Everything else is copied; config.json gains the quantization_config the releases have.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import Fp8Quantize

BLOCK = 128
PROJ = {("linear_attn", "in_proj_qkvz"), ("linear_attn", "out_proj"), ("self_attn", "q_proj"),
        ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"), ("mlp", "gate_proj"),
        ("mlp", "up_proj"), ("mlp", "down_proj")}


def is_quantized(name: str) -> bool:
    """The same rule as `is_quantized` in src/commands/quantize.rs."""
    if not name.endswith(".weight") or not name.startswith(("model.layers.", "mtp.layers.")):
        return False
    tail = name[: -len(".weight")].split(".")[3:]
    if len(tail) == 2:
        return tuple(tail) in PROJ
    if len(tail) == 3:
        return tail[:2] == ["mlp", "shared_expert"] and tail[2] in ("gate_proj", "up_proj", "down_proj")
    return len(tail) == 4 and tail[:2] == ["mlp", "experts"] and tail[3] in ("gate_proj", "up_proj", "down_proj")


def not_converted(kept: list[str]) -> list[str]:
    """`modules_to_not_convert`: lm_head, then the layers in order (modules alphabetically), then MTP."""
    mods = set()
    for name in kept:
        m = name.removesuffix(".weight") if name.endswith(".weight") else name.removesuffix(".bias")
        if m not in ("model.embed_tokens", "model.norm"):
            mods.add(m)

    def key(m: str):
        if m == "lm_head":
            return (0, 0, m)
        if m.startswith("model.layers."):
            return (1, int(m.split(".")[2]), m)
        return (2, 0, m) if m.startswith("mtp.") else (3, 0, m)
    return sorted(mods, key=key)


def main(src: Path, out: Path) -> None:
    torch.set_num_threads(1)

    class Holder:
        quantization_config = FineGrainedFP8Config(weight_block_size=(BLOCK, BLOCK))
    op = Fp8Quantize(Holder())
    if (src / "model.safetensors.index.json").exists():
        sys.exit("sharded input: this reference handles a single model.safetensors")
    tensors = load_file(src / "model.safetensors")
    stored, kept = {}, []
    for name, w in tensors.items():
        if not is_quantized(name):
            stored[name] = w
            kept.append(name)
            continue
        n, k = w.shape
        padded = torch.zeros(-(-n // BLOCK) * BLOCK, -(-k // BLOCK) * BLOCK, dtype=w.dtype)
        padded[:n, :k] = w
        q = op._quantize_one(name, padded)
        scale_name = name.removesuffix("weight") + "weight_scale_inv"
        assert q[name].dtype == torch.float8_e4m3fn and q[scale_name].dtype == torch.float32
        stored[name] = q[name][:n, :k].contiguous()
        stored[scale_name] = q[scale_name].contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(stored, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    assert "quantization_config" not in config, "the input is already quantised"
    config["quantization_config"] = {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
        "weight_block_size": [BLOCK, BLOCK], "modules_to_not_convert": not_converted(kept)}
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    for f in src.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copyfile(f, out / f.name)
    print(f"{out}: {sum(is_quantized(n) for n in tensors)} matrices quantised, {len(kept)} tensors kept")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
