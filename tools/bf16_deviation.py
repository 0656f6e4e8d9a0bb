"""How far transformers' own BF16 inference is from its float32 reference, on the committed
random checkpoints: the bound the fast (bfloat16 dot product) path is held to in
tests/reference_logits.rs.

For each fixture: load the stored weights (FP8 dequantised with its block scales, BF16 upcast),
run Qwen3NextForCausalLM on the fixture's ids in float32 and again after `.to(torch.bfloat16)`,
and record max and mean |Δ log-probability| over every position and vocabulary entry.

    /work/venv/bin/python tools/bf16_deviation.py    # writes tests/fixtures/bf16_deviation.json
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import gen_fixtures as gf  # noqa: E402

FIXTURES = ["bf16-interval2", "fp8-f32scale", "fp8-bf16scale"]


def effective_weights(folder: Path) -> dict:
    stored = {}
    for f in sorted(folder.glob("model*.safetensors")):
        stored.update(load_file(f))
    out = {}
    for k, v in stored.items():
        if k.endswith("weight_scale_inv"):
            continue
        if v.dtype == torch.float8_e4m3fn:
            out[k] = gf.fp8_dequantize(v, stored[k[: -len("weight")] + "weight_scale_inv"])
        else:
            out[k] = v.float()
    return out


def logprobs(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids[None], use_cache=False).logits[0].float(), -1)


def main() -> None:
    result = {"generator": "tools/bf16_deviation.py", "torch": torch.__version__.split("+")[0],
              "fixtures": {}}
    for name in FIXTURES:
        folder = gf.FIX / name
        cfg_json = json.loads((folder / "config.json").read_text())
        model = gf.new_model(gf.hf_config_from_json(cfg_json))
        n_experts = cfg_json.get("num_experts", 0)
        model.load_state_dict(gf.fuse_experts(effective_weights(folder), n_experts), strict=True)
        ids = load_file(folder / "reference.safetensors")["ids"]
        lp32 = logprobs(model, ids)
        ref = load_file(folder / "reference.safetensors")["logprobs"]
        assert (lp32 - ref).abs().max().item() < 1e-4, "reloaded model does not reproduce the reference"
        lp16 = logprobs(model.to(torch.bfloat16), ids)
        d = (lp16 - lp32).abs()
        result["fixtures"][name] = {"max_abs": d.max().item(), "mean_abs": d.mean().item()}
        print(name, result["fixtures"][name])
    (gf.FIX / "bf16_deviation.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
