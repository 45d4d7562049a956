#!/usr/bin/env python3
"""Write a random-weight llama in safetensors form, shaped like SmolLM2-135M (or larger), for
speed and cross-device checks where the real model cannot travel (scripts/device-check.sh).

The directory holds what mistral.rs's plain loader reads: config.json, a word-level
tokenizer.json (words w3, w4, ... as in tests/tiny), tokenizer_config.json and one
model.safetensors in bf16, plus text.txt, a stream of random vocabulary words for `eval --text`.
Perplexity on random weights means nothing; the cache comparisons (KL, top-1) and the speed do.

Needs numpy only (safetensors is written by hand: an 8-byte little-endian header length, the
JSON header, then the raw tensors).

    scripts/random-llama.py DIR [--shape smollm2-135m|llama-1b] [--seed N]
"""
import argparse
import json
import os
import struct

import numpy as np

SHAPES = {
    # SmolLM2-135M-Instruct's config: what the CPU results in docs/ (quality.md, speed.md) use.
    "smollm2-135m": dict(vocab=49152, hidden=576, intermediate=1536, layers=30, heads=9,
                         kv_heads=3, rope_theta=100000.0, tied=True),
    # Llama-3.2-1B's attention shape (head_dim 64, 8 KV heads), a GPU-sized load.
    "llama-1b": dict(vocab=32000, hidden=2048, intermediate=8192, layers=16, heads=32,
                     kv_heads=8, rope_theta=500000.0, tied=True),
}
FIRST_WORD = 3  # <unk>, <s>, </s> come first.


def bf16_bytes(a):
    """f32 -> bf16 by rounding to nearest even on the upper 16 bits."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype("<u2").tobytes()


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name, (shape, blob) in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def tokenizer(vocab_size):
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(FIRST_WORD, vocab_size)]
    vocab = {(w if i < FIRST_WORD else "\u2581" + w): i for i, w in enumerate(words)}
    added = [{"id": i, "content": w, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, w in enumerate(words[:FIRST_WORD])]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581",
                          "prepend_scheme": "always", "split": True},
        "post_processor": None,
        # Byte fallback: llguidance, which mistral.rs builds for every model, needs it.
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-words", type=int, default=40000)
    args = parser.parse_args()
    s = SHAPES[args.shape]
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.dir, exist_ok=True)
    head_dim = s["hidden"] // s["heads"]

    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": s["vocab"], "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"], "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"],
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": s["rope_theta"],
        "hidden_act": "silu", "tie_word_embeddings": s["tied"], "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": "bfloat16",
    }
    with open(os.path.join(args.dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(args.dir, "tokenizer.json"), "w") as f:
        json.dump(tokenizer(s["vocab"]), f)
    with open(os.path.join(args.dir, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "add_bos_token": False, "add_eos_token": False,
                   "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}, f)

    tensors = {}

    def normal(name, shape, std):
        tensors[name] = (shape, bf16_bytes(rng.standard_normal(shape, dtype=np.float32) * std))

    def ones(name, n):
        tensors[name] = ((n,), bf16_bytes(np.ones(n, dtype=np.float32)))

    h, kv = s["hidden"], s["kv_heads"] * head_dim
    # Tied with the output: logits have a standard deviation of about 0.1 * sqrt(hidden) (2.4).
    normal("model.embed_tokens.weight", (s["vocab"], h), 0.1)
    for i in range(s["layers"]):
        p = f"model.layers.{i}"
        # Gains large enough that attention is not uniform (keys and queries of unit scale).
        normal(f"{p}.self_attn.q_proj.weight", (h, h), 1.0 / np.sqrt(h))
        normal(f"{p}.self_attn.k_proj.weight", (kv, h), 1.0 / np.sqrt(h))
        normal(f"{p}.self_attn.v_proj.weight", (kv, h), 1.0 / np.sqrt(h))
        normal(f"{p}.self_attn.o_proj.weight", (h, h), 0.5 / np.sqrt(h))
        normal(f"{p}.mlp.gate_proj.weight", (s["intermediate"], h), 1.0 / np.sqrt(h))
        normal(f"{p}.mlp.up_proj.weight", (s["intermediate"], h), 1.0 / np.sqrt(h))
        normal(f"{p}.mlp.down_proj.weight", (h, s["intermediate"]),
               0.5 / np.sqrt(s["intermediate"]))
        ones(f"{p}.input_layernorm.weight", h)
        ones(f"{p}.post_attention_layernorm.weight", h)
    ones("model.norm.weight", h)
    if not s["tied"]:
        normal("lm_head.weight", (s["vocab"], h), 1.0 / np.sqrt(h))
    write_safetensors(os.path.join(args.dir, "model.safetensors"), tensors)

    # Words drawn from a Zipf-like law so that some repeat, as in text.
    ranks = np.arange(1, s["vocab"] - FIRST_WORD + 1, dtype=np.float64)
    p = 1.0 / ranks
    ids = rng.choice(len(ranks), size=args.text_words, p=p / p.sum()) + FIRST_WORD
    with open(os.path.join(args.dir, "text.txt"), "w") as f:
        f.write(" ".join(f"w{i}" for i in ids))
    print(f"random-llama: {args.shape} in {args.dir} "
          f"({sum(len(b) for _, b in tensors.values()) / 2**20:.0f} MiB of bf16 weights)")


if __name__ == "__main__":
    main()
