#!/usr/bin/env python3
"""Generate the Qwen3.5 / 3.6 family test fixtures of qnext (tests/fixtures/q35-*).

Small random checkpoints laid out as the Qwen3.5 releases are, which transformers saves as
vision-language models (`Qwen3_5ForConditionalGeneration`, `Qwen3_5MoeForConditionalGeneration`):
config.json with the text model under `text_config` (v5 rope layout with the multimodal-RoPE fields
`mrope_section` / `mrope_interleaved`), a tiny `vision_config`, tensors under
`model.language_model.*`, `model.visual.*` and `lm_head.*`, DeltaNet projections `in_proj_qkv`,
`in_proj_z`, `in_proj_b`, `in_proj_a`, and `mtp.*`. Variants: a dense model with tied embeddings,
a BF16 MoE with fused 3-D experts (and per-expert MTP experts, as Qwen3.5-35B-A3B ships them), and
an FP8 MoE with experts stored one by one with BF16 block scales (as the FP8 releases are).

The reference log-probabilities come from transformers' own classes in float32, fed the token ids
alone, so its text-only 3-D (interleaved multimodal) RoPE positions are what the engine is compared
with. The MTP reference is built from transformers' decoder layer, RMSNorm, embedding and lm_head,
wired as spec §11.1 (the same construction as tools/gen_fixtures.py).

Usage (from the repository root):

    venv/bin/python tools/gen_qwen35_fixtures.py             # every fixture
    venv/bin/python tools/gen_qwen35_fixtures.py q35-dense   # only the named one(s)

Deterministic (fixed seeds, single-threaded float32 on the CPU). See tests/fixtures/README.md.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import (Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5MoeConfig,
                          Qwen3_5MoeForConditionalGeneration)
from transformers.models.qwen3_5 import modeling_qwen3_5 as q35
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as q35moe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_fixtures import (FIX, dir_size, fp8_dequantize, fp8_quantization_config, fp8_quantize, gen,  # noqa: E402
                          load_st, normal, random_param, routing_stats, save_st, small_ids, unfuse_experts,
                          write_checkpoint, write_json)

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parent.parent
TEXT = "model.language_model."
GENERATED = ["model*.safetensors", "model.safetensors.index.json", "reference.safetensors", "config.json",
             "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]


# ---------------------------------------------------------------------------------------------
# config.json as the releases write it
# ---------------------------------------------------------------------------------------------

def layer_types(s) -> list[str]:
    return ["full_attention" if c == "F" else "linear_attention" for c in s["pattern"]]


def text_config(s) -> dict:
    c = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_output_gate": True,
        "bos_token_id": s["bos"],
        "dtype": "bfloat16",
        "eos_token_id": s["eos"],
        "full_attention_interval": s["pattern"].index("F") + 1,
        "head_dim": s["head_dim"],
        "hidden_act": "silu",
        "hidden_size": s["hidden"],
        "initializer_range": 0.02,
        "layer_types": layer_types(s),
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": s["dk"],
        "linear_num_key_heads": s["hk"],
        "linear_num_value_heads": s["hv"],
        "linear_value_head_dim": s["dv"],
        "mamba_ssm_dtype": "float32",
        "max_position_embeddings": 4096,
        "model_type": "qwen3_5_moe_text" if s["moe"] else "qwen3_5_text",
        "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False,
        "num_attention_heads": s["heads"],
        "num_hidden_layers": len(s["pattern"]),
        "num_key_value_heads": s["kv_heads"],
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "mrope_interleaved": True,
            "mrope_section": s["mrope_section"],
            "partial_rotary_factor": s["partial"],
            "rope_theta": 10000000,
            "rope_type": "default",
        },
        "tie_word_embeddings": s["tied"],
        "use_cache": True,
        "vocab_size": s["vocab"],
    }
    if s["moe"]:
        c.update(moe_intermediate_size=s["moe_i"], shared_expert_intermediate_size=s["shared_i"],
                 num_experts=s["experts"], num_experts_per_tok=s["topk"], router_aux_loss_coef=0.001)
    else:
        c["intermediate_size"] = s["inter"]
    return c


def vision_config(s) -> dict:
    # A vision tower small enough to cost nothing: the engine must skip it without reading it.
    return {"depth": 1, "hidden_size": 32, "hidden_act": "gelu_pytorch_tanh", "intermediate_size": 32,
            "num_heads": 2, "in_channels": 3, "patch_size": 2, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "out_hidden_size": s["hidden"], "num_position_embeddings": 16,
            "initializer_range": 0.02, "model_type": "qwen3_5_moe" if s["moe"] else "qwen3_5"}


def config_json(s) -> dict:
    cfg = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration" if s["moe"] else "Qwen3_5ForConditionalGeneration"],
        "image_token_id": 248056,
        "model_type": "qwen3_5_moe" if s["moe"] else "qwen3_5",
        "text_config": text_config(s),
        "tie_word_embeddings": s["tied"],
        "transformers_version": transformers.__version__,
        "video_token_id": 248057,
        "vision_config": vision_config(s),
        "vision_end_token_id": 248054,
        "vision_start_token_id": 248053,
    }
    if s["dtype"] == "fp8":
        cfg["quantization_config"] = fp8_quantization_config(not_converted(s))
    return cfg


def hf_config(cfg_json: dict):
    d = json.loads(json.dumps({k: v for k, v in cfg_json.items() if k != "quantization_config"}))
    cls = Qwen3_5MoeConfig if cfg_json["model_type"] == "qwen3_5_moe" else Qwen3_5Config
    return cls.from_dict(d)


def model_class(s):
    return Qwen3_5MoeForConditionalGeneration if s["moe"] else Qwen3_5ForConditionalGeneration


# ---------------------------------------------------------------------------------------------
# FP8: which Linear weights the releases quantize
# ---------------------------------------------------------------------------------------------

QUANTIZED = (".linear_attn.in_proj_qkv.weight", ".linear_attn.in_proj_z.weight", ".linear_attn.out_proj.weight",
             ".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight",
             ".self_attn.o_proj.weight", ".mlp.shared_expert.gate_proj.weight", ".mlp.shared_expert.up_proj.weight",
             ".mlp.shared_expert.down_proj.weight", ".mlp.gate_proj.weight", ".mlp.up_proj.weight",
             ".mlp.down_proj.weight")


def is_quantized(name: str) -> bool:
    """The text and MTP layers' Linear weights except in_proj_a/b, the router and the shared-expert
    gate (the FP8 releases' 250 non-expert scales of Qwen3.6-35B-A3B-FP8 count exactly these)."""
    if not (name.startswith(TEXT + "layers.") or name.startswith("mtp.layers.")):
        return False
    if name.endswith(QUANTIZED):
        return True
    p = name.split(".")
    return len(p) >= 4 and p[-4] == "experts" and p[-2] in ("gate_proj", "up_proj", "down_proj")


def not_converted(s) -> list[str]:
    out = ["lm_head", "model.visual", "mtp.fc"]
    for i, lt in enumerate(layer_types(s)):
        if lt == "linear_attention":
            out += [f"{TEXT}layers.{i}.linear_attn.in_proj_a", f"{TEXT}layers.{i}.linear_attn.in_proj_b"]
        out += [f"{TEXT}layers.{i}.mlp.gate", f"{TEXT}layers.{i}.mlp.shared_expert_gate"] if s["moe"] else []
    return out


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------

def randomise(module, g, s, prefix=""):
    with torch.no_grad():
        for name, p in module.named_parameters():
            full = prefix + name
            if full.startswith("model.visual."):
                continue                                  # default init; never read by the engine
            rule = full.replace(TEXT, "model.", 1)        # gen_fixtures' rules use Qwen3-Next names
            p.copy_(random_param(rule, tuple(p.shape), g, s))


def mtp_layer(s, text_cfg):
    one = json.loads(json.dumps(text_cfg.to_dict()))
    one.update(num_hidden_layers=1, layer_types=["full_attention"])
    cfg1 = type(text_cfg).from_dict(one)
    cfg1._attn_implementation = "eager"
    cfg1._experts_implementation = "eager"
    cls = q35moe.Qwen3_5MoeDecoderLayer if s["moe"] else q35.Qwen3_5DecoderLayer
    return cls(cfg1, 0).float().eval()


def make_weights(s, cfg_json, seed):
    """(f32 model holding exactly the stored values, stored tensors, MTP layer with the stored values)."""
    torch.manual_seed(seed)                               # the vision tower's default init
    g = gen(seed)
    model = model_class(s)._from_config(hf_config(cfg_json), dtype=torch.float32, attn_implementation="eager",
                                        experts_implementation="eager").eval()
    randomise(model, g, s)
    if s["tied"]:   # the embedding is the lm_head too: scaled so that logits are not too peaked
        with torch.no_grad():
            model.model.language_model.embed_tokens.weight.mul_(2.0 / math.sqrt(s["hidden"]))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if s["tied"]:
        sd.pop("lm_head.weight")
    layer = mtp_layer(s, model.config.text_config)
    randomise(layer, g, s, prefix="mtp.layers.0.")
    H = s["hidden"]
    mtp = {"mtp.layers.0." + k: v.clone() for k, v in layer.state_dict().items()}
    mtp["mtp.fc.weight"] = normal(g, (H, 2 * H), 1.0 / math.sqrt(2 * H))
    for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        mtp[f"mtp.{n}.weight"] = normal(g, (H,), 0.3)

    if s["experts_layout"] == "per-expert":
        sd, mtp = unfuse_experts(sd), unfuse_experts(mtp)
    elif s["experts_layout"] == "fused, MTP per-expert":
        mtp = unfuse_experts(mtp)
    ckpt = {**sd, **mtp}

    stored, effective = {}, {}
    for k, v in ckpt.items():
        if s["dtype"] == "f32":
            stored[k] = effective[k] = v.float()
        elif s["dtype"] == "bf16" or not is_quantized(k):
            stored[k] = v.to(torch.bfloat16)
            effective[k] = stored[k].float()
        else:
            q, sinv = fp8_quantize(v)
            stored[k] = q
            stored[k[: -len("weight")] + "weight_scale_inv"] = sinv.to(s["scale_dtype"])
            effective[k] = fp8_dequantize(q, stored[k[: -len("weight")] + "weight_scale_inv"])

    # The reference runs on exactly the stored values.
    main = {k: v for k, v in effective.items() if not k.startswith("mtp.")}
    main = refuse(main, s["experts"]) if s["experts_layout"] == "per-expert" else main
    if s["tied"]:
        main["lm_head.weight"] = main[TEXT + "embed_tokens.weight"]
    model.load_state_dict(main, strict=True)
    mtp_eff = {k[len("mtp.layers.0."):]: v for k, v in effective.items() if k.startswith("mtp.layers.0.")}
    layer.load_state_dict(refuse(mtp_eff, s["experts"]) if s["moe"] else mtp_eff, strict=True)
    heads = {k: v for k, v in effective.items() if k.startswith("mtp.") and not k.startswith("mtp.layers.")}
    return model, stored, layer, heads


def refuse(sd: dict, n_experts: int) -> dict:
    """Per-expert names back to transformers' fused in-memory `experts.gate_up_proj` / `down_proj`."""
    out, bases = {}, set()
    for k, v in sd.items():
        p = k.split(".")
        if len(p) >= 4 and p[-4] == "experts" and p[-3].isdigit():
            bases.add(".".join(p[:-3]))
        else:
            out[k] = v
    for b in sorted(bases):
        gu = [torch.cat([sd[f"{b}.{e}.gate_proj.weight"], sd[f"{b}.{e}.up_proj.weight"]], 0) for e in range(n_experts)]
        out[f"{b}.gate_up_proj"] = torch.stack(gu)
        out[f"{b}.down_proj"] = torch.stack([sd[f"{b}.{e}.down_proj.weight"] for e in range(n_experts)])
    return out


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------

def run_reference(model, ids):
    captured = []
    hooks = []
    for layer in model.model.language_model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and not isinstance(gate, torch.nn.Linear):
            hooks.append(gate.register_forward_hook(lambda m, a, o: captured.append(o[0].float())))
    try:
        with torch.no_grad():
            out = model(input_ids=ids[None], use_cache=False, output_hidden_states=False)
    finally:
        for h in hooks:
            h.remove()
    logits = out.logits[0]
    with torch.no_grad():     # the post-norm hidden state the MTP head reads
        hidden = model.model.language_model(input_ids=ids[None], use_cache=False).last_hidden_state[0]
    assert torch.allclose(hidden @ model.lm_head.weight.T, logits, atol=1e-4, rtol=1e-5)
    return logits, hidden, captured


def mtp_reference(model, layer, heads, ids, hidden_final):
    """Row i (0..T-2): token ids[i+1], the main model's post-norm hidden state at i, position i."""
    lm = model.model.language_model
    H, eps = lm.config.hidden_size, lm.config.rms_norm_eps
    norm_cls = q35moe.Qwen3_5MoeRMSNorm if isinstance(layer, q35moe.Qwen3_5MoeDecoderLayer) else q35.Qwen3_5RMSNorm
    n_e, n_h, n_o = (norm_cls(H, eps=eps) for _ in range(3))
    captured = []
    gate = getattr(layer.mlp, "gate", None)
    if gate is not None and not isinstance(gate, torch.nn.Linear):
        gate.register_forward_hook(lambda m, a, o: captured.append(o[0].float()))
    with torch.no_grad():
        n_e.weight.copy_(heads["mtp.pre_fc_norm_embedding.weight"])
        n_h.weight.copy_(heads["mtp.pre_fc_norm_hidden.weight"])
        n_o.weight.copy_(heads["mtp.norm.weight"])
        T1 = ids.shape[0] - 1
        n_e, n_h, n_o = n_e.double(), n_h.double(), n_o.double()
        x = torch.cat([n_e(lm.embed_tokens(ids[1:])), n_h(hidden_final[:-1])], -1) @ heads["mtp.fc.weight"].T
        x = x[None]
        pos = torch.arange(T1)[None]
        cos_sin = lm.rotary_emb(x, pos[None].expand(3, 1, -1))
        mask = torch.full((T1, T1), torch.finfo(torch.float64).min, dtype=torch.float64).triu(1)[None, None]
        y = layer(x, position_embeddings=cos_sin, attention_mask=mask, position_ids=pos)
        y = y[0] if isinstance(y, tuple) else y
        logits = n_o(y[0]) @ model.lm_head.weight.T
    return torch.log_softmax(logits, -1).float(), captured


def check_rope_is_partial_rope(model, s, T):
    """Text-only positions: the interleaved multimodal RoPE must equal plain partial RoPE."""
    lm = model.model.language_model
    R = int(s["head_dim"] * s["partial"])
    pos = torch.arange(T)
    x = torch.zeros(1, T, s["hidden"])
    cos, sin = lm.rotary_emb(x, pos[None, None].expand(3, 1, -1))
    inv = 1.0 / (10000000 ** (torch.arange(0, R, 2, dtype=torch.float) / R))
    ph = pos.float()[:, None] * inv[None]
    d = max((cos[0] - torch.cat([ph.cos(), ph.cos()], -1)).abs().max().item(),
            (sin[0] - torch.cat([ph.sin(), ph.sin()], -1)).abs().max().item())
    assert cos.shape[-1] == R and d < 1e-6, (cos.shape, d)
    return d


# ---------------------------------------------------------------------------------------------
# one fixture
# ---------------------------------------------------------------------------------------------

def build(s) -> dict:
    t0 = time.time()
    folder = FIX / s["name"]
    folder.mkdir(parents=True, exist_ok=True)
    for pat in GENERATED:
        for f in folder.glob(pat):
            f.unlink()
    cfg_json = config_json(s)
    ids = small_ids(s["seed"], s["T"], s["vocab"])
    print(f"[{s['name']}] {s['dtype']} {'MoE ' + s['experts_layout'] if s['moe'] else 'dense'} "
          f"layers={s['pattern']} tied={s['tied']}")
    for attempt in range(50):
        seed = s["seed"] + 1000 * attempt
        model, stored, layer, heads = make_weights(s, cfg_json, seed)
        # The reference in float64 (the stored values are exact in it): transformers' own float32
        # run of q35-dense is 1.8e-4 from it in log-probability, too close to the engine's bound.
        model, layer = model.double(), layer.double()
        heads = {k: v.double() for k, v in heads.items()}
        logits, hidden, routers = run_reference(model, ids)
        mtp_lp, mtp_routers = mtp_reference(model, layer, heads, ids, hidden)
        if not s["moe"]:
            margin = float("inf")
            break
        _, margin, _ = routing_stats(routers + mtp_routers, s["topk"], s["experts"])
        if margin > 1e-4:
            break
        print(f"  (seed {seed}: router near-tie {margin:.1e}, next seed)")
    else:
        raise RuntimeError("no seed without routing near-ties")
    logprobs = torch.log_softmax(logits.double(), -1).float()
    logits = logits.float()
    # How far transformers' own float32 run is from the float64 reference: the scale of f32
    # rounding on this checkpoint, which the engine's tolerance is stated against.
    with torch.no_grad():
        lp32 = torch.log_softmax(model.float()(input_ids=ids[None], use_cache=False).logits[0], -1)
    f32_dev = (lp32 - logprobs).abs().max().item()
    rope_d = check_rope_is_partial_rope(model, s, s["T"])

    write_checkpoint(folder, stored, s["shards"], sorted(stored))
    write_json(folder / "config.json", cfg_json)
    write_json(folder / "generation_config.json", {"bos_token_id": s["bos"], "do_sample": True,
                                                   "eos_token_id": [s["eos"], s["bos"]], "temperature": 0.6,
                                                   "top_k": 20, "top_p": 0.95})
    save_st(folder / "reference.safetensors", {"ids": ids, "logprobs": logprobs.contiguous(),
                                               "mtp_logprobs": mtp_lp.contiguous(),
                                               "f32_max_abs": torch.tensor([f32_dev])})
    roundtrip(folder, s, ids, logits)
    if s.get("chat"):
        add_chat_files(folder)
    std = logits.std(-1).mean().item()
    print(f"  logit std {std:.3f}; min router gap {margin:.1e}; mRoPE vs partial RoPE {rope_d:.1e}; "
          f"transformers f32 vs the f64 reference {f32_dev:.1e}; "
          f"size {dir_size(folder) / 1e6:.2f} MB ({time.time() - t0:.1f}s)")
    assert std > 1.0, "logits too flat"
    return {"T": s["T"], "V": s["vocab"], "weight_seed": seed, "router_min_logit_gap": margin,
            "logit_std": std, "f32_max_abs": f32_dev, "size_bytes": dir_size(folder)}


def roundtrip(folder, s, ids, logits):
    """transformers' own loader reads the written files (dequantised first for FP8) and gives the same
    logits; for the unquantised ones its save_pretrained writes the same tensor names."""
    raw = {}
    for f in sorted(folder.glob("model*.safetensors")):
        raw.update(load_st(f))
    with tempfile.TemporaryDirectory() as td:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.pop("quantization_config", None)
        write_json(Path(td) / "config.json", cfg)
        plain = {}
        for k, v in raw.items():
            if k.endswith("weight_scale_inv"):
                continue
            plain[k] = fp8_dequantize(v, raw[k[:-len("weight")] + "weight_scale_inv"]) \
                if v.dtype == torch.float8_e4m3fn else v.float()
        save_st(Path(td) / "model.safetensors", plain)
        m2 = model_class(s).from_pretrained(td, dtype=torch.float32, attn_implementation="eager",
                                            experts_implementation="eager").eval()
        with torch.no_grad():
            d = (m2(input_ids=ids[None], use_cache=False).logits[0].float() - logits).abs().max().item()
        assert d < 1e-3, f"round-trip logits differ by {d}"
        if s["experts_layout"] != "per-expert" and s["dtype"] != "fp8":
            m2.save_pretrained(Path(td) / "saved")
            saved = set()
            for f in (Path(td) / "saved").glob("*.safetensors"):
                saved |= set(load_st(f))
            ours = {k for k in raw if not k.startswith("mtp.")}
            assert saved == ours, sorted(saved ^ ours)[:10]
            print("  save_pretrained writes the same tensor names")
    print(f"  round-trip via from_pretrained: max |logit diff| {d:.1e}")


def specs() -> list[dict]:
    out = []
    # Dense (Qwen3.5-27B / 9B / 0.8B style), tied embeddings as the small dense releases have.
    out.append(dict(name="q35-dense", seed=7007, moe=False, dtype="f32", pattern="LLFLLF", hidden=48, heads=4,
                    kv_heads=2, head_dim=32, partial=0.25, mrope_section=[2, 1, 1], hk=2, hv=6, dk=16, dv=24,
                    inter=80, vocab=311, tied=True, bos=308, eos=310, T=150, shards=1,
                    experts_layout="none", experts=0))
    # MoE as the BF16 releases store it: fused 3-D experts, MTP experts one by one (Qwen3.5-35B-A3B).
    out.append(dict(name="q35-moe-bf16", seed=8008, moe=True, dtype="bf16", pattern="LLLF", hidden=64, heads=4,
                    kv_heads=2, head_dim=32, partial=0.25, mrope_section=[2, 1, 1], hk=2, hv=4, dk=16, dv=16,
                    experts=8, topk=3, moe_i=24, shared_i=40, vocab=300, tied=False, bos=297, eos=299, T=160,
                    shards=2, experts_layout="fused, MTP per-expert"))
    # MoE as the FP8 releases store it: experts one by one, BF16 block scales, ragged 128-blocks.
    out.append(dict(name="q35-moe-fp8", seed=9009, moe=True, dtype="fp8", scale_dtype=torch.bfloat16,
                    pattern="LF", hidden=160, heads=4, kv_heads=2, head_dim=40, partial=0.25,
                    mrope_section=[3, 1, 1], hk=2, hv=4, dk=32, dv=24, experts=4, topk=2, moe_i=96, shared_i=136,
                    vocab=290, tied=False, bos=287, eos=289, T=150, shards=1, experts_layout="per-expert"))
    # For the server tests: the bundled model's small byte-level BPE (Qwen's special and added
    # tokens, ids 0-25) with the Qwen3.5 chat template as the releases ship it (chat_template.jinja,
    # which takes priority over tokenizer_config.json's).
    out.append(dict(name="q35-chat", seed=1010, moe=True, dtype="bf16", pattern="LLLF", hidden=32, heads=2,
                    kv_heads=1, head_dim=32, partial=0.25, mrope_section=[2, 1, 1], hk=1, hv=2, dk=16, dv=16,
                    experts=4, topk=2, moe_i=16, shared_i=16, vocab=1024, tied=False, bos=0, eos=2, T=140,
                    shards=1, experts_layout="fused, MTP per-expert", chat=True))
    return out


def add_chat_files(folder: Path) -> None:
    tiny = ROOT / "models" / "qnext-tiny"
    shutil.copyfile(tiny / "tokenizer.json", folder / "tokenizer.json")
    cfg = json.loads((tiny / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    write_json(folder / "tokenizer_config.json", cfg)
    shutil.copyfile(FIX / "chat_templates" / "qwen3.5.jinja", folder / "chat_template.jinja")


def main():
    wanted = set(sys.argv[1:])
    manifest_path = FIX / "manifest_qwen35.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.update(generator="tools/gen_qwen35_fixtures.py", torch=torch.__version__,
                    transformers=transformers.__version__)
    manifest.setdefault("fixtures", {})
    for s in specs():
        if wanted and s["name"] not in wanted:
            continue
        manifest["fixtures"][s["name"]] = build(s)
    write_json(manifest_path, manifest)


if __name__ == "__main__":
    main()
