#!/usr/bin/env python3
"""Check and time the fused CUDA decode attention (src/kernels/cuda/decode_attention.cu)
without Rust: on the GPU machine (CuPy, PyTorch, numpy, nvcc) or, for the numpy parts, anywhere.

  cuda-kernel-check.py --out FILE.json     on a GPU: compile the .cu (nvcc -cubin, else NVRTC
                                           through CuPy), check the fused and the reference
                                           kernels against numpy textbook attention for every
                                           key/value width, both key groupings, rotation,
                                           ragged batches and GQA; then time the fused kernel
                                           against dense fp16 attention (PyTorch SDPA).
  cuda-kernel-check.py --cpu-check         numpy only: the quantizer against the spec's
                                           vectors, packing, and the fused math (codes,
                                           spans, rotation) against textbook attention.
  cuda-kernel-check.py --compile-only      nvcc --ptx and -cubin for sm_90 with warnings as
                                           errors (--nvcc PATH, else $NVCC, the repo's
                                           target/cuda-toolkit, or nvcc on PATH).

The numpy quantizer below is written from the spec (../shared/design/logquant-spec.md section 2)
and src/cache/quant.rs, independently of the kernel: asymmetric min/max groups, minimum rounded down
and scale rounded up to f16, codes round-half-even, little-endian bit-stream packing.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU = os.path.join(ROOT, "src", "kernels", "cuda", "decode_attention.cu")
TILE = 128  # LQ_TILE in the .cu: span lengths are multiples of it
BITS = (2, 3, 4, 8)
# Named thresholds (max |error| relative to the largest |output| of the case).
TOL_CPU_FORMULATIONS = 1e-4  # two f32 numpy formulations of the same math
TOL_KERNEL = 2e-3            # a kernel (f32, exp2, other summation order) vs the float64 oracle
H200_BANDWIDTH = 4.8e12      # bytes/s, HBM3e peak (spec sheet)


# ----------------------------------------------------------------------------- quantization

F16_MAX = np.float32(65504.0)


def sanitize(x):
    x = np.where(np.isnan(x), np.float32(0), x).astype(np.float32)
    return np.clip(x, -F16_MAX, F16_MAX)


def f16_at_most(x):
    """Largest f16 <= x (x finite, in range)."""
    h = x.astype(np.float16)
    over = h.astype(np.float32) > x
    return np.where(over, np.nextafter(h, np.float16(-np.inf)), h)


def f16_at_least(x):
    h = x.astype(np.float16)
    under = h.astype(np.float32) < x
    return np.where(under, np.nextafter(h, np.float16(np.inf)), h)


def group_params(x, axis, bits):
    """(scale, min) as f16 for the groups along `axis` of f32 x (kept as a size-1 axis)."""
    x = sanitize(x)
    lo = x.min(axis=axis, keepdims=True)
    hi = x.max(axis=axis, keepdims=True)
    mn = f16_at_most(lo)
    rng = (hi - mn.astype(np.float32)).astype(np.float32)
    step = np.minimum(rng / np.float32(2**bits - 1), F16_MAX).astype(np.float32)
    scale = np.where(rng > 0, f16_at_least(step), np.float16(0))
    return scale.astype(np.float16), mn.astype(np.float16)


def quantize_codes(x, scale, mn, bits):
    s = scale.astype(np.float32)
    safe = np.where(s == 0, np.float32(1), s)
    y = (sanitize(x) - mn.astype(np.float32)) / safe
    c = np.clip(np.rint(y), 0, 2**bits - 1)  # np.rint: round half to even
    return np.where(s == 0, 0, c).astype(np.uint8)


def dequantize(codes, scale, mn):
    # code * scale, then + min, each rounded in f32 (as quant::dequantize_value)
    return (codes.astype(np.float32) * scale.astype(np.float32)).astype(np.float32) + mn.astype(np.float32)


def pack_rows(codes, bits):
    """Codes [..., D] -> bytes [..., D*bits/8]: code i at bits bits*i.. of a little-endian stream."""
    *lead, d = codes.shape
    assert (d * bits) % 8 == 0
    bitplanes = ((codes[..., :, None].astype(np.uint16) >> np.arange(bits)) & 1).astype(np.uint8)
    stream = bitplanes.reshape(*lead, d * bits)
    return np.packbits(stream.reshape(*lead, d * bits // 8, 8), axis=-1, bitorder="little")[..., 0]


def unpack_rows(packed, bits, d):
    stream = np.unpackbits(packed, axis=-1, bitorder="little")[..., : d * bits]
    planes = stream.reshape(*packed.shape[:-1], d, bits).astype(np.uint16)
    return (planes << np.arange(bits)).sum(-1).astype(np.uint8)


def hadamard(d):
    """H / sqrt(d), Sylvester order (symmetric, orthogonal)."""
    h = np.array([[1.0]])
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(d)


def to_bf16(x):
    """f32 -> bf16 bit patterns (round half to even) and their f32 values."""
    u = x.astype(np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return rounded, (rounded.astype(np.uint32) << 16).view(np.float32)


# -------------------------------------------------------------------------------- caches

class Case:
    """One batch's cache in the layout the kernel reads (see the .cu header), plus the values it
    stands for. Keys per channel: chunks of `key_group` tokens (one params row each)."""

    def __init__(self, rng, *, kbits, vbits, per_channel, key_group, value_group, rotated, d,
                 n_q, n_kv, q_lens, d_lens, dense_dtype):
        self.__dict__.update(kbits=kbits, vbits=vbits, per_channel=per_channel, key_group=key_group,
                             value_group=value_group, rotated=rotated, d=d, n_q=n_q, n_kv=n_kv,
                             q_lens=list(q_lens), d_lens=list(d_lens), dense_dtype=dense_dtype)
        self.batch = len(q_lens)
        h = hadamard(d) if rotated else None
        self.hmat = h
        kc, kp, vc, vp, kq_hat, vq_hat, k_unp, v_unp = [], [], [], [], [], [], [], []
        self.k_params_raw, self.v_params_raw = [], []
        for n in q_lens:
            if per_channel:
                assert n % key_group == 0
            # Keys with outlier channels and an offset, values plain: what the cache holds.
            ch = np.exp(rng.normal(0, 0.7, size=(n_kv, 1, d))).astype(np.float32)
            k = (rng.normal(size=(n_kv, n, d)) * ch + rng.normal(0, 0.5, size=(n_kv, 1, d))).astype(np.float32)
            v = rng.normal(size=(n_kv, n, d)).astype(np.float32)
            if rotated:
                k = (k @ h).astype(np.float32)  # rows r -> H r (H symmetric)
                v = (v @ h).astype(np.float32)
            if per_channel:
                g = k.reshape(n_kv, n // key_group, key_group, d)
                ks, km = group_params(g, 2, kbits)             # (n_kv, chunks, 1, d)
                kcode = quantize_codes(g, ks, km, kbits).reshape(n_kv, n, d)
                khat = dequantize(kcode.reshape(g.shape), ks, km).reshape(n_kv, n, d)
                kpar = np.stack([ks[:, :, 0, :], km[:, :, 0, :]], -1)   # (n_kv, chunks, d, 2)
            else:
                g = k.reshape(n_kv, n, d // key_group, key_group)
                ks, km = group_params(g, 3, kbits)             # (n_kv, n, d/g, 1)
                kcode = quantize_codes(g, ks, km, kbits).reshape(n_kv, n, d)
                khat = dequantize(kcode.reshape(g.shape), ks, km).reshape(n_kv, n, d)
                kpar = np.stack([ks[..., 0], km[..., 0]], -1)           # (n_kv, n, d/g, 2)
            g = v.reshape(n_kv, n, d // value_group, value_group)
            vs, vm = group_params(g, 3, vbits)
            vcode = quantize_codes(g, vs, vm, vbits).reshape(n_kv, n, d)
            vhat = dequantize(vcode.reshape(g.shape), vs, vm).reshape(n_kv, n, d)
            vpar = np.stack([vs[..., 0], vm[..., 0]], -1)
            kc.append(pack_rows(kcode, kbits)); vc.append(pack_rows(vcode, vbits))
            kp.append(kpar); vp.append(vpar)
            k_unp.append(kcode); v_unp.append(vcode)
            kq_hat.append(khat); vq_hat.append(vhat)
        cat = lambda xs, axis=1: np.ascontiguousarray(np.concatenate(xs, axis=axis))
        self.k_codes, self.v_codes = cat(kc), cat(vc)
        self.k_params, self.v_params = cat(kp).astype(np.float16), cat(vp).astype(np.float16)
        self.k_unpacked, self.v_unpacked = k_unp, v_unp
        self.kq_hat_rot, self.vq_hat_rot = kq_hat, vq_hat  # as stored (rotated if rotated)
        back = (lambda x: (x.astype(np.float64) @ h)) if rotated else (lambda x: x.astype(np.float64))
        self.kq_orig = [back(x) for x in kq_hat]
        self.vq_orig = [back(x) for x in vq_hat]
        self.n_quant = int(sum(q_lens))
        self.q_start = np.concatenate([[0], np.cumsum(q_lens)[:-1]]).astype(np.int32)
        # Full-precision rows in the activation dtype; f32 copies of the values they hold.
        dk, dv = [], []
        for n in d_lens:
            dk.append(rng.normal(size=(n_kv, n, d)).astype(np.float32) * 1.5)
            dv.append(rng.normal(size=(n_kv, n, d)).astype(np.float32))
        self.n_dense = int(sum(d_lens))
        self.d_start = np.concatenate([[0], np.cumsum(d_lens)[:-1]]).astype(np.int32)
        dkc, dvc = cat(dk) if dk else None, cat(dv) if dv else None
        if dense_dtype == "f16":
            self.dk_dev, self.dv_dev = dkc.astype(np.float16), dvc.astype(np.float16)
            self.dk32, self.dv32 = self.dk_dev.astype(np.float32), self.dv_dev.astype(np.float32)
        elif dense_dtype == "bf16":
            (self.dk_dev, self.dk32), (self.dv_dev, self.dv32) = to_bf16(dkc), to_bf16(dvc)
        else:
            self.dk_dev, self.dv_dev, self.dk32, self.dv32 = dkc, dvc, dkc, dvc
        self.q = rng.normal(size=(self.batch, n_q, d)).astype(np.float32)
        self.scale = 1.0 / math.sqrt(d)

    def label(self):
        return (f"k{self.kbits}v{self.vbits} {'per-channel' if self.per_channel else 'per-token'} "
                f"kg{self.key_group} vg{self.value_group} d{self.d} q{self.n_q}/kv{self.n_kv} "
                f"{'rotated ' if self.rotated else ''}{self.dense_dtype} quant {self.q_lens} dense {self.d_lens}")


def textbook(case):
    """float64 softmax(q K^T * scale) V over [dequantized quantized rows | full-precision rows]."""
    out = np.zeros((case.batch, case.n_q, case.d))
    rep = case.n_q // case.n_kv
    for b in range(case.batch):
        s0, n0 = case.d_start[b], case.d_lens[b]
        for hq in range(case.n_q):
            h = hq // rep
            k = np.concatenate([case.kq_orig[b][h], case.dk32[h, s0:s0 + n0].astype(np.float64)])
            v = np.concatenate([case.vq_orig[b][h], case.dv32[h, s0:s0 + n0].astype(np.float64)])
            if len(k) == 0:
                continue
            s = k @ case.q[b, hq].astype(np.float64) * case.scale
            p = np.exp(s - s.max())
            out[b, hq] = p @ v / p.sum()
    return out


def fused_math(case, span=96):
    """The kernel's math in f32 numpy, from the packed bytes: q . k_hat from the codes and the
    group parameters, flash-decoding spans with (max, sum, output), rotated query for rotated
    blocks and the rotated output turned back once, values as (p*scale).codes + p.min."""
    d, rep = case.d, case.n_q // case.n_kv
    h32 = case.hmat.astype(np.float32) if case.rotated else None
    out = np.zeros((case.batch, case.n_q, d))
    for b in range(case.batch):
        q0, nq = int(case.q_start[b]), case.q_lens[b]
        d0, nd = int(case.d_start[b]), case.d_lens[b]
        for h in range(case.n_kv):
            qs = case.q[b, h * rep:(h + 1) * rep].astype(np.float32) * np.float32(case.scale)  # (rep, d)
            qr = qs @ h32 if case.rotated else qs
            kcodes = unpack_rows(case.k_codes[h, q0:q0 + nq], case.kbits, d).astype(np.float32)
            vcodes = unpack_rows(case.v_codes[h, q0:q0 + nq], case.vbits, d).astype(np.float32)
            parts = []  # (max, sum, out, rotated)
            for t0 in range(0, nq, span):
                t1 = min(nq, t0 + span)
                c = kcodes[t0:t1]
                if case.per_channel:
                    s = np.zeros((rep, t1 - t0), np.float32)
                    for t in range(t0, t1):  # the chunk of each token: (q*s).codes + q.m
                        g = (q0 + t) // case.key_group
                        ps = case.k_params[h, g].astype(np.float32)
                        s[:, t - t0] = (qr * ps[:, 0]) @ c[t - t0] + qr @ ps[:, 1]
                else:
                    kg = case.key_group
                    ps = case.k_params[h, q0 + t0:q0 + t1].astype(np.float32)  # (n, d/kg, 2)
                    qg = qr.reshape(rep, d // kg, kg)
                    dots = np.einsum("rjc,tjc->rtj", qg, c.reshape(-1, d // kg, kg))
                    s = (dots * ps[None, :, :, 0]).sum(-1) + qg.sum(-1) @ ps[:, :, 1].T
                m = s.max(1, keepdims=True)
                p = np.exp(s - m)
                vg = case.value_group
                pv = case.v_params[h, q0 + t0:q0 + t1].astype(np.float32)  # (n, d/vg, 2)
                w = p[:, :, None] * pv[None, :, :, 0]                       # (rep, n, d/vg)
                o = np.einsum("rtj,tjc->rjc", w, vcodes[t0:t1].reshape(-1, d // vg, vg)).reshape(rep, d)
                o += np.repeat(np.einsum("rt,tj->rj", p, pv[:, :, 1]), vg, axis=1)
                parts.append((m[:, 0], p.sum(1), o, case.rotated))
            if nd:
                k = case.dk32[h, d0:d0 + nd]
                v = case.dv32[h, d0:d0 + nd]
                for t0 in range(0, nd, span):
                    s = qs @ k[t0:t0 + span].T
                    m = s.max(1, keepdims=True)
                    p = np.exp(s - m)
                    parts.append((m[:, 0], p.sum(1), p @ v[t0:t0 + span], False))
            if not parts:
                continue
            mx = np.max([pt[0] for pt in parts], axis=0)
            tot = sum(np.exp(pt[0] - mx) * pt[1] for pt in parts)
            rot = sum(np.exp(pt[0] - mx)[:, None] * pt[2] for pt in parts if pt[3])
            plain = sum(np.exp(pt[0] - mx)[:, None] * pt[2] for pt in parts if not pt[3])
            if case.rotated and not np.isscalar(rot):
                rot = rot @ h32
            out[b, h * rep:(h + 1) * rep] = (rot + plain) / tot[:, None]
    return out


def rel_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(np.abs(want).max(), 1e-30)
    err = np.abs(got - want)
    i = np.unravel_index(np.argmax(np.nan_to_num(err, nan=np.inf)), err.shape)
    return {"max_rel": float(np.nan_to_num(err, nan=np.inf).max() / scale),
            "nmse": float(np.nan_to_num(((got - want) ** 2).sum(), nan=np.inf) / max((want ** 2).sum(), 1e-30)),
            "worst_index": [int(x) for x in i], "finite": bool(np.isfinite(got).all())}


def test_cases(rng, quick=False):
    """Every key/value width, both key groupings; rotation, head sizes, GQA factors, dense
    dtypes and ragged lengths vary across them (lengths off every tile, span and group size)."""
    gqa = [(8, 2), (6, 2), (2, 2), (16, 2), (4, 2)]  # n_rep 4, 3 (in the 4-wide kernel), 1, 8, 2
    dtypes = ["f16", "bf16", "f32"]
    cases, i = [], 0
    for kb in BITS:
        for vb in BITS:
            for per_channel in (True, False):
                d = [128, 64, 128, 96, 256][i % 5]
                rotated = (i % 3 != 1) and (d & (d - 1)) == 0
                n_q, n_kv = gqa[i % len(gqa)]
                if per_channel:
                    kg = [64, 32, 48][i % 3]
                    q_lens = [kg * m for m in ([5, 0, 1, 17] if i % 2 else [9, 3, 0, 12])]
                else:
                    kg = d // 2 if i % 2 else 32
                    q_lens = [301, 0, 1, 777] if i % 2 else [77, 130, 0, 1029]
                vg = d // 2 if i % 2 == 0 else 32
                d_lens = [126, 5, 190, 0] if i % 2 else [0, 131, 64, 126]
                if quick:
                    q_lens = [min(x, 4 * (kg if per_channel else 64)) for x in q_lens]
                cases.append(Case(rng, kbits=kb, vbits=vb, per_channel=per_channel, key_group=kg,
                                  value_group=vg, rotated=rotated, d=d, n_q=n_q, n_kv=n_kv, q_lens=q_lens,
                                  d_lens=d_lens, dense_dtype=dtypes[i % 3]))
                i += 1
    return cases


# ------------------------------------------------------------------------------- CPU check

def cpu_check(args):
    results, failures = [], []

    def expect(name, ok, detail=""):
        results.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
        if not ok:
            failures.append(name)

    def q1(x, bits=2):
        x = np.array([x], np.float32)
        s, m = group_params(x, 1, bits)
        c = quantize_codes(x, s, m, bits)
        return c[0].tolist(), dequantize(c, s, m)[0].tolist()

    # The spec's vectors (logquant-spec.md section 2 and quant.rs tests).
    expect("spec [0,1,2,3]", q1([0, 1, 2, 3]) == ([0, 1, 2, 3], [0, 1, 2, 3]))
    expect("spec [-1,0.2,0.5,2]", q1([-1, 0.2, 0.5, 2]) == ([0, 1, 2, 3], [-1, 0, 1, 2]))
    expect("spec ties to even [0,0.5,2.5,3]", q1([0, 0.5, 2.5, 3])[0] == [0, 0, 2, 3])
    expect("constant group exact", q1([1.5] * 8) == ([0] * 8, [1.5] * 8))
    expect("packing 2-bit", pack_rows(np.array([[1, 2, 3, 0]], np.uint8), 2)[0, 0] == 0b00111001)
    expect("packing 4-bit", pack_rows(np.array([[0xA, 0x5]], np.uint8), 4)[0, 0] == 0x5A)
    codes = np.arange(8, dtype=np.uint8)[None]
    stream = sum(int(c) << (3 * i) for i, c in enumerate(range(8)))
    expect("packing 3-bit straddles bytes",
           pack_rows(codes, 3)[0].tolist() == [stream & 255, (stream >> 8) & 255, stream >> 16])
    for bits in BITS:
        c = rng_global.integers(0, 2**bits, size=(3, 64)).astype(np.uint8)
        expect(f"pack/unpack round trip {bits}-bit", (unpack_rows(pack_rows(c, bits), bits, 64) == c).all())
    x = rng_global.normal(size=(4, 64)).astype(np.float32) * 10
    for bits in BITS:
        s, m = group_params(x, 1, bits)
        c = quantize_codes(x, s, m, bits)
        err = np.abs(dequantize(c, s, m) - x).max(axis=1)
        expect(f"error <= scale/2 at {bits} bits", (err <= s[:, 0].astype(np.float32) / 2 * (1 + 1e-5) + 1e-6).all())
    h = hadamard(16)
    expect("Hadamard symmetric orthogonal", np.allclose(h @ h, np.eye(16)) and np.allclose(h, h.T))
    # The fused math (what the kernel computes) against textbook attention.
    cases = test_cases(np.random.default_rng(7), quick=True)
    for case in cases:
        e = rel_error(fused_math(case), textbook(case))
        ok = e["finite"] and e["max_rel"] <= TOL_CPU_FORMULATIONS
        expect(f"fused math vs textbook: {case.label()}", ok, f"max_rel {e['max_rel']:.2e} (<= {TOL_CPU_FORMULATIONS:g})")
    return results, failures


# ------------------------------------------------------------------------------ compilation

def find_nvcc(explicit=None):
    for cand in [explicit, os.environ.get("NVCC"),
                 os.path.join(ROOT, "target", "cuda-toolkit", "site", "nvidia", "cu13", "bin", "nvcc"),
                 shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def nvcc_commands(nvcc, outdir, arch="sm_90"):
    base = [nvcc, f"-arch={arch}", "-O3", "-std=c++17", "-Werror", "all-warnings", CU]
    return [base + ["--ptx", "-o", os.path.join(outdir, "decode_attention.ptx")],
            base + ["-cubin", "-o", os.path.join(outdir, "decode_attention.cubin")]]


def compile_only(args):
    nvcc = find_nvcc(args.nvcc)
    if not nvcc:
        print("no nvcc found (--nvcc PATH or $NVCC)", file=sys.stderr)
        return 2
    outdir = args.build_dir or tempfile.mkdtemp(prefix="lq-cuda-")
    os.makedirs(outdir, exist_ok=True)
    status = 0
    for cmd in nvcc_commands(nvcc, outdir):
        t = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        print("$ " + " ".join(cmd))
        print((r.stdout + r.stderr).strip() or "(no output)")
        print(f"exit {r.returncode}, {time.time() - t:.1f} s")
        status |= r.returncode
    return status


def load_module(args, report):
    import cupy as cp
    nvcc = find_nvcc(args.nvcc)
    if nvcc:
        outdir = tempfile.mkdtemp(prefix="lq-cuda-")
        cc = cp.cuda.Device().compute_capability  # e.g. "90"
        cmd = nvcc_commands(nvcc, outdir, arch=f"sm_{cc}")[1]
        t = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        report["compile"] = {"how": "nvcc -cubin", "command": " ".join(cmd), "seconds": round(time.time() - t, 1),
                             "output": (r.stdout + r.stderr)[-4000:], "exit": r.returncode}
        if r.returncode == 0:
            return cp.RawModule(path=os.path.join(outdir, "decode_attention.cubin"))
        print("nvcc failed, trying NVRTC:\n" + r.stderr[-4000:], file=sys.stderr)
    t = time.time()
    mod = cp.RawModule(code=open(CU).read(), options=("--std=c++17",))
    mod.get_function("lq_decode_reduce")  # forces the compilation now
    report["compile"] = {"how": "NVRTC (cupy.RawModule)", "seconds": round(time.time() - t, 1)}
    return mod


# ---------------------------------------------------------------------------------- launches

def gt_for(n_rep):
    for g in (1, 2, 4, 8):
        if n_rep <= g:
            return g
    raise ValueError(f"{n_rep} query heads per kv head: the kernels take at most 8")


class Kernels:
    def __init__(self, mod):
        import cupy as cp
        self.cp, self.mod, self.smem_cache = cp, mod, {}

    def smem(self, kbits, vbits, pc, gt, d, kg, vg):
        key = (kbits, vbits, pc, gt, d, kg, vg)
        if key not in self.smem_cache:
            cp = self.cp
            out = cp.zeros(2, cp.int32)
            self.mod.get_function("lq_quant_smem_bytes_query")(
                (1,), (1,), (np.int32(kbits), np.int32(vbits), np.int32(pc), np.int32(gt), np.int32(d),
                             np.int32(kg), np.int32(vg), out))
            self.smem_cache[key] = [int(x) for x in out.get()]
        return self.smem_cache[key]

    def fused(self, dev, span_tokens, dense_span=TILE):
        """Launch quant spans, dense spans and the reduce; returns out (B, n_q, d) f32."""
        cp = self.cp
        B, n_q, n_kv, d = dev["batch"], dev["n_q"], dev["n_kv"], dev["d"]
        gt = gt_for(n_q // n_kv)
        qs = max([-(-n // span_tokens) for n in dev["q_lens"]] + [0])
        ds = max([-(-n // dense_span) for n in dev["d_lens"]] + [0])
        n_slots = max(1, qs + ds)
        key = (B, n_q, n_slots, d)
        if dev.get("_part_key") != key:
            dev["_part"] = (cp.empty((B, n_q, n_slots, d), cp.float32), cp.empty((B, n_q, n_slots), cp.float32),
                            cp.empty((B, n_q, n_slots), cp.float32), cp.empty((B, n_q, d), cp.float32))
            dev["_part_key"] = key
        po, pm, ps, out = dev["_part"]
        if qs == 0 and ds == 0:
            pm.fill(-np.inf)
        i32, f32 = np.int32, np.float32
        scale = f32(dev["scale"])
        if qs:
            qsm, _ = self.smem(dev["kbits"], dev["vbits"], int(dev["pc"]), gt, d, dev["kg"], dev["vg"])
            name = f"lq_decode_quant_k{dev['kbits']}v{dev['vbits']}_{'pc' if dev['pc'] else 'pt'}_g{gt}"
            k = self.mod.get_function(name)
            if qsm > 48 * 1024:
                k.max_dynamic_shared_size_bytes = qsm
            k((qs, n_kv, B), (TILE,),
              (dev["q"], dev["k_codes"], dev["k_params"], dev["v_codes"], dev["v_params"], dev["q_start"],
               dev["q_len"], np.int64(dev["n_quant"]), i32(n_q), i32(n_kv), i32(d), i32(dev["kg"]), i32(dev["vg"]),
               i32(span_tokens), scale, i32(int(dev["rotated"])), po, pm, ps, i32(n_slots), i32(0)),
              shared_mem=qsm)
        if ds:
            _, dsm = self.smem(2, 2, 1, gt, d, 64, d)
            k = self.mod.get_function(f"lq_decode_dense_{dev['dense_dtype']}_g{gt}")
            k((ds, n_kv, B), (TILE,),
              (dev["q"], dev["dk"], dev["dv"], dev["d_start"], dev["d_len"], np.int64(dev["n_dense"]), i32(n_q),
               i32(n_kv), i32(d), i32(dense_span), scale, po, pm, ps, i32(n_slots), i32(qs)),
              shared_mem=dsm)
        self.mod.get_function("lq_decode_reduce")(
            (n_q, B), (d,), (po, pm, ps, i32(n_slots), i32(qs), i32(d), i32(int(dev["rotated"])), out),
            shared_mem=4 * d)
        return out

    def reference(self, dev):
        """Dequantize into scratch, rotate back, textbook attention: the on-device oracle."""
        cp = self.cp
        B, n_q, n_kv, d = dev["batch"], dev["n_q"], dev["n_kv"], dev["d"]
        nq = max(dev["n_quant"], 1)
        grid = (1024,)
        kq = cp.zeros((n_kv, nq, d), cp.float32)
        vq = cp.zeros((n_kv, nq, d), cp.float32)
        if dev["n_quant"]:
            dq = self.mod.get_function("lq_ref_dequant")
            dq(grid, (256,), (dev["k_codes"], dev["k_params"], np.int32(dev["kbits"]), np.int32(int(dev["pc"])),
                              np.int32(dev["kg"]), np.int64(nq), np.int32(n_kv), np.int32(d), kq))
            dq(grid, (256,), (dev["v_codes"], dev["v_params"], np.int32(dev["vbits"]), np.int32(0),
                              np.int32(dev["vg"]), np.int64(nq), np.int32(n_kv), np.int32(d), vq))
            if dev["rotated"]:
                rot = self.mod.get_function("lq_ref_rotate_rows")
                for x in (kq, vq):
                    y = cp.empty_like(x)
                    rot(grid, (256,), (x, y, np.int64(n_kv * nq), np.int32(d)))
                    x[...] = y
        nd = max(dev["n_dense"], 1)
        kd = dev["dk32"] if dev["n_dense"] else cp.zeros((n_kv, 1, d), cp.float32)
        vd = dev["dv32"] if dev["n_dense"] else cp.zeros((n_kv, 1, d), cp.float32)
        out = cp.zeros((B, n_q, d), cp.float32)
        self.mod.get_function("lq_ref_attention")(
            grid, (128,), (dev["q"], kq, vq, dev["q_start"], dev["q_len"], np.int64(nq), kd, vd, dev["d_start"],
                           dev["d_len"], np.int64(nd), np.int32(B), np.int32(n_q), np.int32(n_kv), np.int32(d),
                           np.float32(dev["scale"]), out))
        return out


def upload(case):
    import cupy as cp
    a = lambda x: cp.asarray(np.ascontiguousarray(x))
    n_kv, d = case.n_kv, case.d
    empty_codes = lambda bits: cp.zeros((n_kv, 1, d * bits // 8), cp.uint8)
    dev = dict(batch=case.batch, n_q=case.n_q, n_kv=n_kv, d=d, kbits=case.kbits, vbits=case.vbits,
               pc=case.per_channel, kg=case.key_group, vg=case.value_group, rotated=case.rotated,
               dense_dtype=case.dense_dtype, scale=case.scale, q_lens=case.q_lens, d_lens=case.d_lens,
               n_quant=case.n_quant, n_dense=case.n_dense, q=a(case.q),
               q_start=a(case.q_start), q_len=a(np.array(case.q_lens, np.int32)),
               d_start=a(case.d_start), d_len=a(np.array(case.d_lens, np.int32)))
    if case.n_quant:
        dev.update(k_codes=a(case.k_codes), v_codes=a(case.v_codes), k_params=a(case.k_params),
                   v_params=a(case.v_params))
    else:
        dev.update(k_codes=empty_codes(case.kbits), v_codes=empty_codes(case.vbits),
                   k_params=cp.zeros(2 * d, cp.float16), v_params=cp.zeros(2 * d, cp.float16))
    if case.n_dense:
        dev.update(dk=a(case.dk_dev), dv=a(case.dv_dev), dk32=a(case.dk32), dv32=a(case.dv32))
    else:
        z = cp.zeros((n_kv, 1, d), cp.float32)
        dev.update(dk=z, dv=z, dk32=z, dv32=z, dense_dtype="f32")
    return dev


def gpu_checks(kern, report):
    failures = []
    cases = test_cases(np.random.default_rng(11))
    for i, case in enumerate(cases):
        want = textbook(case)
        dev = upload(case)
        # Spans of one tile and of several tiles; the reference once.
        got_ref = kern.reference(dev).get()
        entry = {"case": case.label(), "reference_vs_numpy": rel_error(got_ref, want)}
        for span in (TILE, 3 * TILE):
            entry[f"fused_span{span}_vs_numpy"] = rel_error(kern.fused(dev, span).get(), want)
        entry["fused_vs_reference"] = rel_error(kern.fused(dev, 2 * TILE).get(), got_ref)
        ok = all(v["finite"] and v["max_rel"] <= TOL_KERNEL for k, v in entry.items() if k != "case")
        entry["ok"] = ok
        report["checks"].append(entry)
        worst = max(v["max_rel"] for k, v in entry.items() if isinstance(v, dict))
        print(f"{'ok  ' if ok else 'FAIL'} [{i + 1}/{len(cases)}] {case.label()}: worst max_rel {worst:.2e}")
        if not ok:
            failures.append(case.label())
            print(json.dumps(entry, indent=1))
    return failures


# ------------------------------------------------------------------------------------ timing

def choose_span(max_quant, batch, n_kv, n_sm):
    """Spans per (sequence, kv head) so that the grid has about 8 blocks per SM (enough loads in
    flight to saturate HBM) but each block still covers at least one 128-token tile."""
    splits = max(1, -(-8 * n_sm // (batch * n_kv)))
    return max(TILE, -(-max_quant // (splits * TILE)) * TILE)


def cuda_time(fn, cp, min_iters=5, max_iters=50, budget_s=0.4):
    fn()
    cp.cuda.Device().synchronize()
    t = time.time()
    fn()
    cp.cuda.Device().synchronize()
    iters = int(min(max_iters, max(min_iters, budget_s / max(time.time() - t, 1e-6))))
    times = []
    for _ in range(iters):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b) * 1e-3)
    return float(np.median(times)), iters


def bench(kern, report, args):
    import cupy as cp
    import torch
    import torch.nn.functional as F
    n_sm = cp.cuda.Device().attributes["MultiProcessorCount"]
    n_q, n_kv, d, kg, vg = 32, 8, 128, 64, 64
    kbits, vbits = 4, 2
    fp_rows = 126  # LogQuant W = 42: at most 3W full-precision rows
    rows = []
    t_start = time.time()
    for T in args.contexts:
        for B in args.batches:
            tag = f"T={T} B={B}"
            if time.time() - t_start > args.bench_budget:
                report["skipped"].append(f"{tag}: time budget ({args.bench_budget} s) spent")
                print(f"skip {tag}: time budget spent")
                continue
            # Full-precision rows: the policy's 126 plus the staged rows of an unfinished key group.
            n_dense = min(T, fp_rows + (T - fp_rows) % kg)
            n_quant = T - n_dense
            quant_bytes = B * n_kv * n_quant * (d * (kbits + vbits) // 8 + 4 * d // vg) + \
                B * n_kv * (n_quant // kg) * d * 4
            dense_rows_bytes = 2 * B * n_kv * n_dense * d * 2
            dense16_bytes = 2 * B * n_kv * T * d * 2
            free, _ = torch.cuda.mem_get_info()
            if max(quant_bytes + dense_rows_bytes, dense16_bytes) * 1.3 > free:
                report["skipped"].append(f"{tag}: needs more than the {free / 2**30:.0f} GiB free")
                print(f"skip {tag}: memory")
                continue
            row = {"context": T, "batch": B, "quant_tokens": n_quant, "fp_tokens": n_dense,
                   "config": f"k{kbits}v{vbits} per-channel keys kg{kg}, vg{vg}, rotated, fp rows f16"}
            # Random packed cache (codes and parameters: the kernel's speed does not depend on them).
            g = torch.Generator(device="cuda").manual_seed(1)
            kc = torch.randint(0, 256, (n_kv, B * n_quant, d * kbits // 8), dtype=torch.uint8, device="cuda", generator=g)
            vc = torch.randint(0, 256, (n_kv, B * n_quant, d * vbits // 8), dtype=torch.uint8, device="cuda", generator=g)
            kp = (torch.rand((n_kv, B * n_quant // kg, d, 2), device="cuda", generator=g) * 0.1).half()
            vp = (torch.rand((n_kv, B * n_quant, d // vg, 2), device="cuda", generator=g) * 0.1).half()
            dk = torch.randn((n_kv, B * n_dense, d), device="cuda", generator=g).half()
            dv = torch.randn((n_kv, B * n_dense, d), device="cuda", generator=g).half()
            dev = dict(batch=B, n_q=n_q, n_kv=n_kv, d=d, kbits=kbits, vbits=vbits, pc=True, kg=kg, vg=vg,
                       rotated=True, dense_dtype="f16", scale=1 / math.sqrt(d), q_lens=[n_quant] * B,
                       d_lens=[n_dense] * B, n_quant=B * n_quant, n_dense=B * n_dense,
                       q=cp.asarray(torch.randn((B, n_q, d), device="cuda", generator=g)),
                       q_start=(cp.arange(B) * n_quant).astype(cp.int32), q_len=cp.full(B, n_quant, cp.int32),
                       d_start=(cp.arange(B) * n_dense).astype(cp.int32), d_len=cp.full(B, n_dense, cp.int32),
                       k_codes=cp.asarray(kc), v_codes=cp.asarray(vc), k_params=cp.asarray(kp),
                       v_params=cp.asarray(vp), dk=cp.asarray(dk), dv=cp.asarray(dv))
            span = args.span_tokens or choose_span(n_quant, B, n_kv, n_sm)
            out = kern.fused(dev, span)
            t_fused, it_f = cuda_time(lambda: kern.fused(dev, span), cp)
            finite = bool(cp.isfinite(out).all())
            del kc, vc, kp, vp, dk, dv, dev, out
            cp.get_default_memory_pool().free_all_blocks()
            torch.cuda.empty_cache()
            # Dense 16-bit attention of the same shape: GQA folded into the query length (the
            # 4 query heads of a kv head are 4 query rows, no mask), so K/V are read once.
            k16 = torch.randn((B, n_kv, T, d), device="cuda", dtype=torch.float16, generator=g)
            v16 = torch.randn((B, n_kv, T, d), device="cuda", dtype=torch.float16, generator=g)
            q16 = torch.randn((B, n_kv, n_q // n_kv, d), device="cuda", dtype=torch.float16, generator=g)
            t_dense, it_d = cuda_time(lambda: F.scaled_dot_product_attention(q16, k16, v16), cp)
            del k16, v16, q16
            torch.cuda.empty_cache()
            fused_bytes = quant_bytes + dense_rows_bytes
            row.update(span_tokens=span, fused_s=t_fused, dense_s=t_dense, fused_iters=it_f, dense_iters=it_d,
                       fused_bytes=fused_bytes, dense_bytes=dense16_bytes,
                       fused_gbps=fused_bytes / t_fused / 1e9, dense_gbps=dense16_bytes / t_dense / 1e9,
                       fused_bw_fraction=fused_bytes / t_fused / H200_BANDWIDTH,
                       speedup=t_dense / t_fused, output_finite=finite)
            rows.append(row)
            print(f"{tag}: fused {t_fused * 1e6:.1f} us ({row['fused_gbps']:.0f} GB/s), dense {t_dense * 1e6:.1f} us "
                  f"({row['dense_gbps']:.0f} GB/s), speed-up {row['speedup']:.2f}x")
    report["timings"] = rows
    print()
    print("| context | batch | fused (us) | bytes read | GB/s | % of 4.8 TB/s | dense fp16 SDPA (us) | GB/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {r['batch']} | {r['fused_s'] * 1e6:.1f} | {r['fused_bytes'] / 2**20:.1f} MiB "
              f"| {r['fused_gbps']:.0f} | {100 * r['fused_bw_fraction']:.0f}% | {r['dense_s'] * 1e6:.1f} "
              f"| {r['dense_gbps']:.0f} | {r['speedup']:.2f}x |")
    for s in report["skipped"]:
        print(f"skipped: {s}")


# -------------------------------------------------------------------------------------- main

rng_global = np.random.default_rng(2025)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-check", action="store_true", help="numpy parts only (no GPU)")
    ap.add_argument("--compile-only", action="store_true", help="nvcc --ptx and -cubin for sm_90, warnings as errors")
    ap.add_argument("--nvcc", help="nvcc to use")
    ap.add_argument("--build-dir", help="where --compile-only writes the .ptx and .cubin")
    ap.add_argument("--out", help="write the JSON report here")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 32768, 131072])
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    ap.add_argument("--span-tokens", type=int, default=0, help="fixed span length (multiple of 128)")
    ap.add_argument("--bench-budget", type=float, default=150, help="seconds of timing before skipping the rest")
    args = ap.parse_args()
    if args.compile_only:
        sys.exit(compile_only(args))
    report = {"checks": [], "timings": [], "skipped": [], "tolerances": {
        "cpu_formulations_max_rel": TOL_CPU_FORMULATIONS, "kernel_max_rel": TOL_KERNEL}}
    t0 = time.time()
    if args.cpu_check:
        results, failures = cpu_check(args)
        report["cpu_checks"] = results
    else:
        import cupy as cp
        report["device"] = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
        mod = load_module(args, report)
        print(f"compiled: {report['compile']['how']} in {report['compile']['seconds']} s")
        kern = Kernels(mod)
        failures = gpu_checks(kern, report)
        if not args.skip_bench:
            bench(kern, report, args)
    report["failures"] = failures
    report["seconds"] = round(time.time() - t0, 1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(f"{len(failures)} failure(s) in {report['seconds']} s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
