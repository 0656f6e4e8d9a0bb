"""Trains the tiny model's byte-level BPE on rendered training conversations.

Qwen's own tokenizer, with three choices of ours:
- the 26 added tokens of Qwen (`<|endoftext|>` … `</think>`) with Qwen's flags (special or not), so
  the chat templates and the reasoning and tool-call parsers work unchanged; they take ids 0–25;
- Qwen's pre-tokenizer regex (digits one by one, NFC, byte-level), preceded by a split that
  isolates every capital letter: the string tasks work on strings like `QKZMB`, and a model of a
  few MB copies and spells them only if each letter is one token wherever it stands (a merged
  ` E` beside `E` halves what it sees of each and makes it learn the pairing);
- a vocabulary of 1,024: Qwen's 151,669 tokens would need 78 M embedding and output parameters at
  width 256, twenty times the rest of the model, for text this small model never sees.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import render
import tasks

QWEN_TOKENIZER = render.REPO / "tests/fixtures/qwen-vocab/tokenizer.json"
QWEN_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
              "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
CAPITALS = "\\p{Lu}"


def qwen_added_tokens() -> list[dict]:
    return json.loads(QWEN_TOKENIZER.read_text())["added_tokens"]


def corpus(n: int, seed: int):
    rng = random.Random(seed)
    r = render.Renderer()
    for _ in range(n):
        ex = tasks.sample(rng, "train")
        yield "".join(t for t, _ in r.pieces(ex, rng))


def build(vocab_size: int, n: int, seed: int) -> Tokenizer:
    added = qwen_added_tokens()
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CAPITALS), behavior="isolated"),
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[a["content"] for a in added],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(n, seed), trainer)
    # Qwen's flags: <tool_call>, <think> … are added but not special (they survive skip_special_tokens).
    spec = json.loads(tok.to_str())
    by_content = {a["content"]: a for a in added}
    for a in spec["added_tokens"]:
        q = by_content[a["content"]]
        a.update({k: q[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special")})
    return Tokenizer.from_str(json.dumps(spec))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--examples", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()
    tok = build(a.vocab_size, a.examples, a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    tok.save(str(a.out / "tokenizer.json"))
    print(f"{a.out / 'tokenizer.json'}: {tok.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
