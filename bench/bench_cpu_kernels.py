"""The CPU-path kernels against what they replace, on the default model's shapes, one JSON object.

Each row times the kernel and its torch counterpart interleaved in the same run (best of `--repeats` rounds of
`--iters` calls) and prints both and the speedup:

  - kernels/cpu/linear.py      oneDNN fp32 linear vs F.linear (MKL), forward and the backward dX form, 512 rows
  - kernels/cpu/attention.py   causal prefill attention vs SDPA, (1, 9 heads, 512, 64), 3 KV heads, fp32 and bf16
  - kernels/cpu/ops.py         RMSNorm (512 x 576), SwiGLU (512 x 2·1536) and RoPE on q (9 heads x 512 x 64) vs
                               their torch forms, fp32 and bf16
  - kernels/cpu/decode.py      the whole decode step vs the torch step, default model, 512 cached tokens a row,
                               at each batch of `--decode-rows` (default 1; the serving engine steps up to 16)

`--tier avx2` (any kernels/cpu/native.py tier) builds and runs every native library at that instruction-set tier or
below, as on a CPU that has no more: e.g. the AVX2 decode step against the torch step on an AVX2 machine (whose own
native GEMV and RMSNorm/SwiGLU/RoPE then run their AVX2 forms too). torch's own kernels keep what they detect
unless capped as well: `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`. The JSON records the tier each library
ran at and torch's capability.

    python bench/bench_cpu_kernels.py [--repeats 5] [--iters 20] [--threads T] [--skip-decode | --decode-only]
                                  [--decode-rows 1,8,16] [--tier TIER]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Callable

import torch
import torch.nn.functional as F

from phiforge.kernels.cpu import attention as cpu_attention, decode as cpu_decode, gemv as cpu_gemv, native
from phiforge.kernels.cpu import linear as cpu_linear, ops as cpu_ops

T, C, I, NH, NKV, HS = 512, 576, 1536, 9, 3, 64


def _best_ms(fn: Callable[[], object], iters: int) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters * 1e3


def compare(ours: Callable, theirs: Callable, repeats: int, iters: int) -> dict:
    ours(), theirs()
    a, b = [], []
    for _ in range(repeats):  # interleaved: machine load drifts over seconds
        a.append(_best_ms(ours, iters))
        b.append(_best_ms(theirs, iters))
    return {"phiforge_ms": min(a), "torch_ms": min(b), "speedup": min(b) / min(a)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-decode", action="store_true", help="skip the decode-step row (loads the default model)")
    ap.add_argument("--decode-only", action="store_true", help="only the decode-step rows")
    ap.add_argument("--decode-rows", default="1", help="comma-separated batch sizes of the decode-step rows (1-16)")
    ap.add_argument("--tier", choices=list(native.TIERS), default=None,
                    help="cap every native library at this instruction-set tier (default: the widest this CPU runs)")
    args = ap.parse_args()
    try:
        args.rows = [int(b) for b in args.decode_rows.split(",")]
    except ValueError:
        ap.error(f"--decode-rows: comma-separated integers, got {args.decode_rows!r}")
    if not all(1 <= b <= 16 for b in args.rows):
        ap.error(f"--decode-rows: each from 1 to 16 (the native step's rows), got {args.decode_rows!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    with native.forced_tier(args.tier) if args.tier else contextlib.nullcontext(), torch.inference_mode():
        out = run(args)
    print(json.dumps(out, indent=1, default=lambda x: round(x, 4) if isinstance(x, float) else str(x)))


def run(args: argparse.Namespace) -> dict:
    r, n = args.repeats, args.iters
    out: dict = {"threads": torch.get_num_threads(), "cpu_tier": native.cpu_tier(),
                 "torch_capability": torch.backends.cpu.get_cpu_capability(),
                 "libraries": {lib.name: str(lib.status())
                               for lib in (cpu_attention.LIB, cpu_decode.LIB, cpu_gemv.LIB, cpu_ops.LIB)}}
    g = torch.Generator().manual_seed(0)
    for N, K in () if args.decode_only else ((3 * 320, C), (C, C), (2 * I, C), (C, I)):  # qkv, o, gate_up, down
        x, w, dy = torch.randn(T, K, generator=g), torch.randn(N, K, generator=g), torch.randn(T, N, generator=g)
        row = compare(lambda: cpu_linear.matmul_nt(x, w), lambda: F.linear(x, w), r, n)
        row["phiforge_gflops"] = 2 * T * N * K / row["phiforge_ms"] / 1e6
        row["backward_dx"] = compare(lambda: cpu_linear.matmul_nt(dy, w.t()), lambda: dy @ w, r, n)
        out[f"linear_fp32_{N}x{K}"] = row
    for dt in () if args.decode_only else (torch.float32, torch.bfloat16):
        name = str(dt).split(".")[1]
        q = torch.randn(1, NH, T, HS, generator=g).to(dt)
        k, v = torch.randn(1, NKV, T, HS, generator=g).to(dt), torch.randn(1, NKV, T, HS, generator=g).to(dt)
        out[f"attention_{name}"] = compare(
            lambda: cpu_attention.causal_attention(q, k, v),
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            .transpose(1, 2).reshape(1, T, NH * HS), r, n)
        x, wn = torch.randn(1, T, C, generator=g).to(dt), (torch.rand(C, generator=g) + 0.5).to(dt)
        out[f"rms_norm_{name}"] = compare(lambda: cpu_ops.rms_norm(x, wn, 1e-5),
                                          lambda: cpu_ops.rms_norm_ref(x, wn, 1e-5), r, n)
        gu = torch.randn(1, T, 2 * I, generator=g).to(dt)
        out[f"swiglu_{name}"] = compare(lambda: cpu_ops.swiglu(gu), lambda: cpu_ops.swiglu_ref(gu), r, n)
        qr = torch.randn(1, T, NH, HS, generator=g).to(dt).transpose(1, 2)   # (1, nh, T, hs), as split from qkv
        ang = torch.rand(1, T, HS // 2, generator=g) * T
        cos, sin = (torch.cat((f(ang), f(ang)), -1).to(dt) for f in (torch.cos, torch.sin))
        out[f"rotary_{name}"] = compare(lambda: cpu_ops.rotary(qr, cos, sin),
                                        lambda: cpu_ops.rotary_ref(qr, cos, sin), r, n)
    if not args.skip_decode:
        from phiforge.engine import load_model
        from phiforge.engine.serve.decode import DecodeStep
        from phiforge.engine.formats.default_model import default_model_path
        for dt in (torch.float32, torch.bfloat16):
            model = load_model(default_model_path(), dtype=dt)
            for B in args.rows:
                caches = [model.new_cache(B, T + r * n * 2 + 8) for _ in range(2)]
                ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g)            # (B, T)
                for c in caches:
                    model(ids, cache=c, num_logits=1)
                fused = DecodeStep(model, caches[0])
                with cpu_decode.LIB.disabled():
                    plain = DecodeStep(model, caches[1])
                tok = torch.full((B,), 7)                                                       # (B,)
                row = compare(lambda: fused(tok, torch.full((B,), caches[0].length)),
                              lambda: plain(tok, torch.full((B,), caches[1].length)), r, n)
                row["phiforge_tokens_per_s"] = B * 1e3 / row["phiforge_ms"]
                out[f"decode_step_{str(dt).split('.')[1]}" + (f"_b{B}" if B > 1 else "")] = row
    return out


if __name__ == "__main__":
    main()
