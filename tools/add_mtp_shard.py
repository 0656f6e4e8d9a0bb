"""Adds a random MTP head (spec §3.5: mtp.fc, mtp.pre_fc_norm_*, mtp.norm, mtp.layers.0.*) to a
fixture checkpoint as a second shard, `mtp.safetensors`, with a `model.safetensors.index.json`
naming both shards. The main model's tensors and its reference logits stay as they are
(transformers ignores mtp.*), so the real-vocabulary fixture can serve speculative decoding
in the CLI and server tests.

    python tools/add_mtp_shard.py tests/fixtures/qwen-vocab

The MTP layer copies the shapes, dtypes and per-tensor spread of the checkpoint's last
full-attention layer; values are drawn with a fixed seed."""
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def main(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    H = cfg["hidden_size"]
    g = torch.Generator().manual_seed(7007)
    with safe_open(folder / "model.safetensors", "pt") as f:
        main_keys = list(f.keys())
        layers = cfg["num_hidden_layers"]
        interval = cfg.get("full_attention_interval", 4)
        full = max(l for l in range(layers) if l % interval == interval - 1)
        src = f"model.layers.{full}."
        out = {}
        for k in main_keys:
            if not k.startswith(src):
                continue
            t = f.get_tensor(k).float()
            std = t.std().item() if t.numel() > 1 else 0.1
            out["mtp.layers.0." + k[len(src):]] = (torch.randn(t.shape, generator=g) * std).to(f.get_tensor(k).dtype)
        dtype = f.get_tensor("model.norm.weight").dtype
    out["mtp.fc.weight"] = (torch.randn(H, 2 * H, generator=g) / (2 * H) ** 0.5).to(dtype)
    for n in ["pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"]:
        out[f"mtp.{n}.weight"] = (torch.randn(H, generator=g) * 0.1).to(dtype)
    save_file(out, folder / "mtp.safetensors", metadata={"format": "pt"})
    weight_map = {k: "model.safetensors" for k in main_keys}
    weight_map.update({k: "mtp.safetensors" for k in out})
    size = sum((folder / n).stat().st_size for n in ["model.safetensors", "mtp.safetensors"])
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    print(f"{folder}: {len(out)} MTP tensors in mtp.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
