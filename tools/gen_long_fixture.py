#!/usr/bin/env python3
"""Generate tests/fixtures/long-f32: a tiny random Qwen3-Next checkpoint (three DeltaNet layers
and one attention layer, dense SwiGLU MLPs, YaRN) and its log-probabilities over 32,768 tokens (YaRN's 4 × 8192),
recomputed in float64 from the specification — for the test that our forward pass stays exact
at long context (RoPE at large positions, attention over tens of thousands of positions,
the DeltaNet state carried through hundreds of chunks).

The float64 recomputation is written here from the spec (recurrent delta rule, attention in
query blocks so no T×T matrix is formed), not taken from transformers, which cannot run 32K
tokens in float64 within memory. With transformers installed, it is first checked against
transformers' float32 forward on the first 400 tokens (where both fit).

Dense MLPs, not experts: over 32K tokens a random router has near-ties somewhere, where a
float32 engine may rightly pick another expert than the float64 reference.

    python3 tools/gen_long_fixture.py        # needs torch, safetensors; transformers optional
"""

import json
import math
import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "long-f32"
T = 32768
VOCAB = 263
H, HEADS, KV, HD, PARTIAL = 32, 2, 1, 32, 0.25
HK, HV, DK, DV, KC = 1, 2, 16, 16, 4
INTER = 48
EPS = 1e-6
THETA = 10000000.0
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}
LAYERS = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]
# Rows whose log-probabilities are kept: every 512th position and the last 64.
ROWS = sorted(set(range(0, T, 512)) | set(range(T - 64, T)))

CONFIG = {
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "dtype": "float32",
    "vocab_size": VOCAB, "hidden_size": H, "num_hidden_layers": len(LAYERS), "layer_types": LAYERS,
    "full_attention_interval": 4, "num_attention_heads": HEADS, "num_key_value_heads": KV,
    "head_dim": HD, "partial_rotary_factor": PARTIAL, "rope_theta": THETA, "rope_scaling": YARN,
    "max_position_embeddings": 32768, "rms_norm_eps": EPS, "hidden_act": "silu",
    "linear_num_key_heads": HK, "linear_num_value_heads": HV, "linear_key_head_dim": DK,
    "linear_value_head_dim": DV, "linear_conv_kernel_dim": KC, "intermediate_size": INTER,
    "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
    "shared_expert_intermediate_size": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": list(range(len(LAYERS))), "tie_word_embeddings": False,
    "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
    "bos_token_id": VOCAB - 2, "eos_token_id": VOCAB - 1, "use_cache": True,
}


def weights(seed=7007):
    g = torch.Generator().manual_seed(seed)

    def n(shape, std, mean=0.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).float()

    conv_dim = 2 * HK * DK + HV * DV
    w = {"model.embed_tokens.weight": n((VOCAB, H), 1.0), "model.norm.weight": n((H,), 0.2),
         "lm_head.weight": n((VOCAB, H), 2.0 / math.sqrt(H))}
    for i, kind in enumerate(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = n((H,), 0.2)
        w[p + "post_attention_layernorm.weight"] = n((H,), 0.2)
        if kind == "linear_attention":
            q = p + "linear_attn."
            w[q + "in_proj_qkvz.weight"] = n((2 * HK * DK + 2 * HV * DV, H), 1 / math.sqrt(H))
            w[q + "in_proj_ba.weight"] = n((2 * HV, H), 1 / math.sqrt(H))
            w[q + "conv1d.weight"] = n((conv_dim, 1, KC), 0.5)
            w[q + "dt_bias"] = n((HV,), 0.5)
            # Slow and fast decays: log-decays from −0.0005 to −0.5 per token at a = 0.
            w[q + "A_log"] = torch.tensor([-7.0, -0.5])
            w[q + "norm.weight"] = n((DV,), 0.2, 1.0)
            w[q + "out_proj.weight"] = n((H, HV * DV), 1 / math.sqrt(HV * DV))
        else:
            q = p + "self_attn."
            w[q + "q_proj.weight"] = n((2 * HEADS * HD, H), 1 / math.sqrt(H))
            w[q + "k_proj.weight"] = n((KV * HD, H), 1 / math.sqrt(H))
            w[q + "v_proj.weight"] = n((KV * HD, H), 1 / math.sqrt(H))
            w[q + "o_proj.weight"] = n((H, HEADS * HD), 1 / math.sqrt(HEADS * HD))
            w[q + "q_norm.weight"] = n((HD,), 0.2)
            w[q + "k_norm.weight"] = n((HD,), 0.2)
        m = p + "mlp."
        w[m + "gate_proj.weight"] = n((INTER, H), 1 / math.sqrt(H))
        w[m + "up_proj.weight"] = n((INTER, H), 1 / math.sqrt(H))
        w[m + "down_proj.weight"] = n((H, INTER), 1 / math.sqrt(INTER))
    return w


def rms_zc(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * (1.0 + w)


def l2n(x):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


def gdn(x, W, p):
    """Spec §7, recurrent form, float64."""
    t_ = x.shape[0]
    r = HV // HK
    P = (x @ W[p + "in_proj_qkvz.weight"].T).view(t_, HK, 2 * DK + 2 * r * DV)
    BA = (x @ W[p + "in_proj_ba.weight"].T).view(t_, HK, 2 * r)
    q, k = P[..., :DK], P[..., DK:2 * DK]
    v = P[..., 2 * DK:2 * DK + r * DV].reshape(t_, HV, DV)
    z = P[..., 2 * DK + r * DV:].reshape(t_, HV, DV)
    b, a = BA[..., :r].reshape(t_, HV), BA[..., r:].reshape(t_, HV)
    mixed = torch.cat([q.reshape(t_, -1), k.reshape(t_, -1), v.reshape(t_, -1)], -1)
    cw = W[p + "conv1d.weight"][:, 0, :]
    xp = torch.cat([torch.zeros(KC - 1, mixed.shape[1], dtype=x.dtype), mixed], 0)
    y = F.silu(sum(cw[:, i] * xp[i:i + t_] for i in range(KC)))
    qc, kc = y[:, :HK * DK].view(t_, HK, DK), y[:, HK * DK:2 * HK * DK].view(t_, HK, DK)
    vc = y[:, 2 * HK * DK:].view(t_, HV, DV)
    beta = torch.sigmoid(b)
    g = -torch.exp(W[p + "A_log"]) * F.softplus(a + W[p + "dt_bias"])
    idx = torch.arange(HV) // r
    qh, kh = (l2n(qc) * DK ** -0.5)[:, idx], l2n(kc)[:, idx]
    S = torch.zeros(HV, DK, DV, dtype=x.dtype)
    o = torch.zeros(t_, HV, DV, dtype=x.dtype)
    alpha = torch.exp(g)
    for t in range(t_):
        S = S * alpha[t][:, None, None]
        d = beta[t][:, None] * (vc[t] - torch.einsum("hkv,hk->hv", S, kh[t]))
        S = S + kh[t][:, :, None] * d[:, None, :]
        o[t] = torch.einsum("hkv,hk->hv", S, qh[t])
    nrm = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + EPS)
    return (W[p + "norm.weight"] * nrm * F.silu(z)).reshape(t_, HV * DV) @ W[p + "out_proj.weight"].T


def inv_freq():
    """Spec §9.2 (YaRN), float64."""
    R = int(HD * PARTIAL)
    i = torch.arange(0, R, 2, dtype=torch.float64)
    extrap = 1.0 / (THETA ** (i / R))
    f, l0 = YARN["factor"], YARN["original_max_position_embeddings"]
    att = 0.1 * math.log(f) + 1.0

    def corr(rot):
        return R * math.log(l0 / (rot * 2 * math.pi)) / (2 * math.log(THETA))
    low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), R - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(R // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return (extrap / f) * ramp + extrap * (1 - ramp), att, R


def attn(x, W, p, block=512):
    """Spec §8, float64, queries in blocks (never a T×T matrix)."""
    t_ = x.shape[0]
    QG = (x @ W[p + "q_proj.weight"].T).view(t_, HEADS, 2 * HD)
    q, gate = QG[..., :HD], QG[..., HD:]
    k = (x @ W[p + "k_proj.weight"].T).view(t_, KV, HD)
    v = (x @ W[p + "v_proj.weight"].T).view(t_, KV, HD)
    q, k = rms_zc(q, W[p + "q_norm.weight"]), rms_zc(k, W[p + "k_norm.weight"])
    inv, att, R = inv_freq()
    ph = torch.arange(t_, dtype=torch.float64)[:, None] * inv[None]
    cos = torch.cat([ph.cos(), ph.cos()], -1)[:, None] * att
    sin = torch.cat([ph.sin(), ph.sin()], -1)[:, None] * att

    def rope(t):
        tr, tp = t[..., :R], t[..., R:]
        rot = torch.cat([-tr[..., R // 2:], tr[..., :R // 2]], -1)
        return torch.cat([tr * cos + rot * sin, tp], -1)
    q, k = rope(q), rope(k)
    kv = torch.arange(HEADS) // (HEADS // KV)
    kk, vv = k[:, kv], v[:, kv]
    o = torch.empty(t_, HEADS, HD, dtype=x.dtype)
    for s in range(0, t_, block):
        e = min(s + block, t_)
        sc = torch.einsum("thd,shd->hts", q[s:e], kk[:e]) * HD ** -0.5
        mask = torch.arange(e)[None, :] > torch.arange(s, e)[:, None]
        sc = sc.masked_fill(mask[None], float("-inf"))
        o[s:e] = torch.einsum("hts,shd->thd", torch.softmax(sc, -1), vv[:e])
    o = o.reshape(t_, HEADS * HD) * torch.sigmoid(gate.reshape(t_, HEADS * HD))
    return o @ W[p + "o_proj.weight"].T


def forward(W, ids):
    x = W["model.embed_tokens.weight"][ids]
    for i, kind in enumerate(LAYERS):
        p = f"model.layers.{i}."
        h = rms_zc(x, W[p + "input_layernorm.weight"])
        x = x + (gdn(h, W, p + "linear_attn.") if kind == "linear_attention" else attn(h, W, p + "self_attn."))
        h = rms_zc(x, W[p + "post_attention_layernorm.weight"])
        m = p + "mlp."
        x = x + (F.silu(h @ W[m + "gate_proj.weight"].T) * (h @ W[m + "up_proj.weight"].T)) @ W[m + "down_proj.weight"].T
    return rms_zc(x, W["model.norm.weight"]) @ W["lm_head.weight"].T


def check_against_transformers(w, ids):
    try:
        from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
    except ImportError:
        print("transformers not installed: the float64 recomputation is not cross-checked")
        return
    cfg = Qwen3NextConfig(**{k: v for k, v in CONFIG.items() if k not in ("architectures", "dtype")})
    model = Qwen3NextForCausalLM(cfg).float().eval()
    missing, unexpected = model.load_state_dict(w, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    with torch.no_grad():
        theirs = torch.log_softmax(model(input_ids=ids[None], use_cache=False).logits[0].double(), -1)
    ours = torch.log_softmax(forward({k: v.double() for k, v in w.items()}, ids), -1)
    d = (theirs - ours).abs().max().item()
    print(f"float64 recomputation vs transformers float32, {len(ids)} tokens: max |Δ logprob| {d:.2e}")
    assert d < 1e-3, d


def main():
    w = weights()
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, VOCAB - 2, (T,), generator=g)
    check_against_transformers(w, ids[:400])
    W = {k: v.double() for k, v in w.items()}
    with torch.no_grad():
        lp = torch.log_softmax(forward(W, ids), -1)
    rows = torch.tensor(ROWS, dtype=torch.int64)
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in w.items()}, str(OUT / "model.safetensors"),
              metadata={"format": "pt"})
    save_file({"ids": ids.to(torch.int64), "rows": rows, "logprobs_at": lp[rows].contiguous()},
              str(OUT / "reference.safetensors"))
    (OUT / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (OUT / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": VOCAB - 2, "eos_token_id": VOCAB - 1}, indent=2) + "\n")
    print(f"wrote {OUT}: {T} tokens, {len(ROWS)} rows of float64 log-probabilities; "
          f"min {lp.min().item():.2f}, mean next-token {lp[:-1].gather(1, ids[1:, None])[:, 0].mean().item():.3f}")


if __name__ == "__main__":
    main()
