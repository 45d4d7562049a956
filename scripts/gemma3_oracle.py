#!/usr/bin/env python3
"""Independent reference ("oracle") for Gemma 3 text models stored as GGUF.

Written from public sources only, without looking at this repository's Rust
code, so that Rust integration tests can compare their Gemma 3 conversion
(tokenizer and forward pass) against a second, separate implementation.
It uses nothing but numpy, sentencepiece and llama.cpp's `gguf` package
(versions pinned in scripts/oracle-requirements.txt); no candle, mistral.rs,
HF transformers or HF tokenizers.

Subcommands (JSON on stdin, JSON on stdout):
  tokenize --gguf PATH   stdin: ["text", ...]   stdout: [[id, ...], ...]  (no BOS)
  nll      --gguf PATH   stdin: [id, ...]       stdout: {"nll": [...]}
      nll[i] = -ln p(ids[i+1] | ids[..=i]), natural log, from one forward
      pass over the whole sequence (causal mask plus the sliding window).
      Weights are dequantized once to float32 with gguf.quants.dequantize;
      matmuls are float32, RMSNorm and the softmax / log-sum-exp sums float64.

Sliding window: on local layers query position q sees key position k iff
q - 512 < k <= q, i.e. itself and the 511 tokens before it (HF and llama.cpp
agree, see below); it only matters past 512 tokens.  Tokenizer: plain
SentencePiece behaviour, so control-token text such as "<start_of_turn>" is
not parsed as a special token.  Embedding scale is the exact sqrt(640), as in
llama.cpp (HF multiplies by sqrt(640) rounded to the weight dtype).

Architecture facts and where they come from:
  * HF transformers src/transformers/models/gemma3/modeling_gemma3.py
    (https://github.com/huggingface/transformers): embeddings scaled by
    sqrt(hidden_size); sandwich norms (input / post_attention /
    pre_feedforward / post_feedforward RMSNorm); RMSNorm on q and k per head;
    attention scale query_pre_attn_scalar**-0.5; gated MLP
    down(gelu_tanh(gate(x)) * up(x)); rotate_half RoPE (NEOX, halves paired);
    local layers use rope_local_base_freq 10000, global ones rope_theta.
  * HF src/transformers/masking_utils.py, sliding_window_overlay:
    key kv is visible from query q iff q - sliding_window < kv <= q.
  * llama.cpp src/models/gemma3.cpp (https://github.com/ggml-org/llama.cpp):
    the same graph on GGUF names (attn_norm, attn_q_norm, attn_k_norm,
    post_attention_norm, ffn_norm, post_ffw_norm, output_norm; output tied to
    token_embd); no final-logit softcapping on the sliding-window (iswa) path.
  * llama.cpp src/llama-model.cpp, LLM_ARCH_GEMMA3 hparams: swa pattern 6
    via llama_hparams::set_swa_pattern, i.e. layer il is global iff
    il % 6 == 5; rope_freq_base_train_swa = 10000; f_attention_scale =
    1/sqrt(n_embd_head_k) (= 256**-0.5, query_pre_attn_scalar, for all sizes
    but 27B); llama_model_rope_type(GEMMA3) = NEOX.
  * llama.cpp src/llama-hparams.cpp is_masked_swa (STANDARD): masked iff
    p1 - p0 >= n_swa, the same window as HF: each token sees itself and the
    n_swa - 1 tokens before it.
  * llama.cpp convert_hf_to_gguf.py Gemma3Model: adds 1 to every
    "*norm.weight" (Gemma3RMSNorm multiplies by 1 + w), so GGUF norm weights
    multiply directly; q/k are not permuted (unlike the llama converter).
  * sentencepiece src/sentencepiece_model.proto: the ModelProto built below.
"""
import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")  # keep CPU use modest (set before numpy)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
from gguf import GGUFReader  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

SWA_PATTERN = 6  # llama.cpp set_swa_pattern(6): every 6th layer is global
ROPE_BASE_LOCAL = 10000.0  # HF rope_local_base_freq / llama.cpp freq_base_swa
LOGIT_CHUNK = 128  # rows of the (tokens x vocab) logit matrix at a time


class Reader(GGUFReader):
    """gguf.GGUFReader with a faster `_get` (same fields and tensors as the
    stock reader on this model): the stock one slices an np.memmap once per
    string, which takes tens of seconds for the 262144-entry token list."""

    def _get(self, offset, dtype, count=1, override_order=None):
        if type(self.data) is np.memmap:
            self.data = self.data.view(np.ndarray)  # same mapping, plain views
        dt = np.dtype(dtype)
        order = self.byte_order if override_order is None else override_order
        if order != "I":
            dt = dt.newbyteorder(order)
        return self.data[offset:offset + dt.itemsize * int(count)].view(dt)


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


# ---------------------------------------------------------------- tokenizer

def build_sentencepiece(reader):
    """SentencePiece BPE model rebuilt from the GGUF tokenizer metadata."""
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens = field(reader, "tokenizer.ggml.tokens")
    scores = field(reader, "tokenizer.ggml.scores")
    types = field(reader, "tokenizer.ggml.token_type")
    unk = field(reader, "tokenizer.ggml.unknown_token_id")
    # GGUF / llama.cpp token types -> sentencepiece piece types.
    kinds = {1: pb.ModelProto.SentencePiece.NORMAL,
             2: pb.ModelProto.SentencePiece.UNKNOWN,
             3: pb.ModelProto.SentencePiece.CONTROL,
             4: pb.ModelProto.SentencePiece.USER_DEFINED,
             5: pb.ModelProto.SentencePiece.UNUSED,
             6: pb.ModelProto.SentencePiece.BYTE}
    m = pb.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        if kind == 4 and piece.strip(" ") == "":
            # Whitespace-run user-defined pieces are stored with literal
            # spaces in this GGUF; sentencepiece matches user-defined pieces
            # against the normalized (space -> U+2581) text, so restore the
            # escaped form the original tokenizer.model has.
            piece = piece.replace(" ", "\u2581")
        p = m.pieces.add()
        p.piece, p.score = piece, float(score)
        p.type = pb.ModelProto.SentencePiece.UNKNOWN if i == unk else kinds[int(kind)]
    t = m.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = len(tokens)
    t.byte_fallback = True
    for name in ("unk", "bos", "eos", "pad"):
        tid = field(reader, f"tokenizer.ggml.{name}_token_id", -1)
        setattr(t, f"{name}_id", int(tid))
        if tid >= 0:
            setattr(t, f"{name}_piece", tokens[tid])
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = bool(field(reader, "tokenizer.ggml.add_space_prefix", False))
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    return SentencePieceProcessor(model_proto=m.SerializeToString())


def cmd_tokenize(reader, texts):
    sp = build_sentencepiece(reader)
    return [list(sp.encode(s)) for s in texts]


# ---------------------------------------------------------------- model

class Gemma3:
    """Weights (dequantized once to float32) and hyper-parameters."""

    def __init__(self, reader):
        arch = field(reader, "general.architecture")
        if arch != "gemma3":
            raise SystemExit(f"expected a gemma3 GGUF, got {arch!r}")

        def hp(key, default=None):
            v = field(reader, f"{arch}.{key}", default)
            if v is None:
                raise SystemExit(f"missing GGUF key {arch}.{key}")
            return v

        for key in ("rope.scaling.type", "final_logit_softcapping",
                    "attn_logit_softcapping"):
            if field(reader, f"{arch}.{key}") is not None:
                raise SystemExit(f"{arch}.{key} is set; this oracle does not model it")
        self.n_layer = int(hp("block_count"))
        self.n_embd = int(hp("embedding_length"))
        self.n_head = int(hp("attention.head_count"))
        self.n_head_kv = int(hp("attention.head_count_kv"))
        self.head_dim = int(hp("attention.key_length"))
        assert int(hp("attention.value_length")) == self.head_dim
        self.eps = float(hp("attention.layer_norm_rms_epsilon"))
        self.rope_base_global = float(hp("rope.freq_base"))
        self.window = int(hp("attention.sliding_window"))
        # query_pre_attn_scalar = head_dim for Gemma 3 (llama.cpp: all but 27B).
        self.q_scale = self.head_dim ** -0.5
        self.w = {}
        for t in reader.tensors:
            a = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            # GGUF shapes are (ne0=in, ne1=out); numpy rows are ne1.
            self.w[t.name] = np.ascontiguousarray(
                a.reshape([int(d) for d in reversed(t.shape)]))

    def is_global(self, il):
        return il % SWA_PATTERN == SWA_PATTERN - 1


def rms_norm(x, weight, eps):
    x64 = x.astype(np.float64)
    y = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)
    return (y * weight).astype(np.float32)


def gelu_tanh(x):
    c = np.float32(np.sqrt(2.0 / np.pi))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


def rope_neox(x, base):
    """Rotate pairs (i, i + d/2) of x: (tokens, heads, d) at positions 0..T-1."""
    t, _, d = x.shape
    inv_freq = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.arange(t, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos = np.cos(ang)[:, None, :].astype(np.float32)
    sin = np.sin(ang)[:, None, :].astype(np.float32)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_bias(t, window):
    """Additive (T, T) mask: 0 where query q may see key k, -inf elsewhere.
    Causal; with a window, key k is visible iff q - window < k <= q."""
    q = np.arange(t)[:, None]
    k = np.arange(t)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= (q - k) < window
    return np.where(allowed, np.float32(0.0), np.float32(-np.inf))


def forward_hidden(model, ids):
    """Final-normed hidden states (T, n_embd) for the token ids."""
    w, t = model.w, len(ids)
    nh, nkv, hd = model.n_head, model.n_head_kv, model.head_dim
    h = w["token_embd.weight"][ids] * np.float32(np.sqrt(model.n_embd))
    bias = {True: attention_bias(t, None), False: attention_bias(t, model.window)}
    for il in range(model.n_layer):
        p = f"blk.{il}."
        glob = model.is_global(il)
        base = model.rope_base_global if glob else ROPE_BASE_LOCAL

        x = rms_norm(h, w[p + "attn_norm.weight"], model.eps)
        q = (x @ w[p + "attn_q.weight"].T).reshape(t, nh, hd)
        k = (x @ w[p + "attn_k.weight"].T).reshape(t, nkv, hd)
        v = (x @ w[p + "attn_v.weight"].T).reshape(t, nkv, hd)
        q = rope_neox(rms_norm(q, w[p + "attn_q_norm.weight"], model.eps), base)
        k = rope_neox(rms_norm(k, w[p + "attn_k_norm.weight"], model.eps), base)
        q = q * np.float32(model.q_scale)
        group = nh // nkv  # grouped-query attention: query head j uses kv head j // group
        out = np.empty((t, nh, hd), dtype=np.float32)
        for j in range(nh):
            s = q[:, j, :] @ k[:, j // group, :].T + bias[glob]
            s -= s.max(axis=-1, keepdims=True)
            pr = np.exp(s)
            pr /= pr.sum(axis=-1, keepdims=True, dtype=np.float64).astype(np.float32)
            out[:, j, :] = pr @ v[:, j // group, :]
        a = out.reshape(t, nh * hd) @ w[p + "attn_output.weight"].T
        h = h + rms_norm(a, w[p + "post_attention_norm.weight"], model.eps)

        x = rms_norm(h, w[p + "ffn_norm.weight"], model.eps)
        g = gelu_tanh(x @ w[p + "ffn_gate.weight"].T) * (x @ w[p + "ffn_up.weight"].T)
        f = g @ w[p + "ffn_down.weight"].T
        h = h + rms_norm(f, w[p + "post_ffw_norm.weight"], model.eps)
    return rms_norm(h, w["output_norm.weight"], model.eps)


def cmd_nll(reader, ids):
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or len(ids) < 1:
        raise SystemExit("nll: expected a non-empty JSON list of token ids")
    model = Gemma3(reader)
    hidden = forward_hidden(model, ids)
    head = model.w["token_embd.weight"]  # tied output projection
    nll = []
    for s in range(0, len(ids) - 1, LOGIT_CHUNK):
        e = min(s + LOGIT_CHUNK, len(ids) - 1)
        logits = hidden[s:e] @ head.T
        mx = logits.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(logits - mx).sum(axis=-1, dtype=np.float64)) + mx[:, 0]
        nll.extend((lse - logits[np.arange(e - s), ids[s + 1:e + 1]]).tolist())
    return {"nll": nll}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("tokenize", "nll"):
        sp = sub.add_parser(name)
        sp.add_argument("--gguf", required=True, help="path to a gemma3 GGUF file")
    args = ap.parse_args()
    reader = Reader(args.gguf)
    data = json.load(sys.stdin)
    result = cmd_tokenize(reader, data) if args.cmd == "tokenize" else cmd_nll(reader, data)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
