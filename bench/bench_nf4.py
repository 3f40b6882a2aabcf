"""NF4 matmul vs dense bf16 matmul on Phi-3-mini layer shapes, on the machine at hand. Prints JSON.

    python bench/bench_nf4.py [--quick] [--iters N] [--threads N] [--dtype bfloat16|float32]

For each layer (qkv 3072->9216, gate_up 3072->16384, down 8192->3072) and M in (1, 16, 512):
  - checks both NF4 providers against the pure-torch reference first (within twice its own error in x's dtype,
    both measured against fp64), on up to 64 rows of x, which keeps M's dispatch bucket;
  - times the providers interleaved, one call each per round, and reports medians (robust on a shared machine):
        dense_bf16     x @ W.T with W in bf16                      (oneDNN on CPU, cuBLAS on CUDA; dense_fp32 with
                                                                     --dtype float32, x's dtype too: what a CPU
                                                                     without AVX512-BF16 computes in)
        nf4            nf4_matmul(x, w): the dispatched path        (CPU: native GEMV for M <= nf4_cpu.GEMV_MAX_M,
                                                                     bf16 x of tile_min_m()..TILE_MAX_M rows the tile
                                                                     GEMM, else dequant+matmul;
                                                                     CUDA: the Triton GEMV / GEMM)
        nf4_dequant    dequantize into the reused buffer, then dense matmul     (the unfused alternative)
  - bytes moved = weight bytes (NF4: nibbles + absmax codes + nested scales) + x + y; effective GB/s = bytes / time;
  - on CUDA, the fraction of peak DRAM bandwidth (from the device's memory clock and bus width).
The headline is `decode_ratio`: NF4 time / dense bf16 time at M = 1 (target <= 1.5).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from phiforge.kernels.nf4 import quantize_nf4
from phiforge.kernels.nf4_matmul import nf4_matmul, nf4_matmul_ref

LAYERS = {"qkv_proj": (3072, 9216), "gate_up_proj": (3072, 16384), "down_proj": (8192, 3072)}  # (K, N)
DECODE_TARGET = 1.5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_interleaved(fns: dict, iters: int, device: torch.device) -> dict[str, float]:
    """Median ms per provider; providers alternate within each round so load spikes hit them alike."""
    for f in fns.values():  # warm-up: compile, allocate the dequant buffer, fault in pages
        f()
        f()
    samples = {k: [] for k in fns}
    for _ in range(iters):
        for name, f in fns.items():
            _sync(device)
            t = time.perf_counter()
            f()
            _sync(device)
            samples[name].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def _check(x: torch.Tensor, w) -> dict:
    """Both NF4 providers vs the reference in bf16 and fp64, on up to 64 rows of x (the same dispatch bucket)."""
    x = x[:64]
    out = {"nf4": nf4_matmul(x, w), "nf4_dequant": nf4_matmul(x, w, method="dequant")}
    ref, ref64 = nf4_matmul_ref(x, w), nf4_matmul_ref(x.double(), w)
    ref_err = (ref.double() - ref64).abs().max().item()
    errs = {k: (v.double() - ref64).abs().max().item() for k, v in out.items()}
    for k, err in errs.items():
        if err > 2 * ref_err + 1e-6 * ref64.abs().max().item():
            raise SystemExit(f"bench_nf4: {k} is wrong for {tuple(w.shape)}, M={x.shape[0]}: error {err:.3g} vs "
                             f"the reference's own {ref_err:.3g}")
    return dict(max_abs_err=errs, ref_bf16_max_abs_err=ref_err)


def _peak_gbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    p = torch.cuda.get_device_properties(device)
    clock, width = getattr(p, "memory_clock_rate", None), getattr(p, "memory_bus_width", None)  # kHz, bits
    return None if not clock or not width else 2 * clock * 1e3 * width / 8 / 1e9  # DDR: two transfers per clock


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="qkv and down only, M in (1, 16), fewer rounds")
    ap.add_argument("--iters", type=int, default=None, help="timed rounds per case (default 30, quick 8)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="x's dtype and the dense reference weight's (default bfloat16)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    iters = args.iters or (8 if args.quick else 30)
    layers = {k: v for k, v in LAYERS.items() if not args.quick or k != "gate_up_proj"}
    ms_list = (1, 16) if args.quick else (1, 16, 512)
    peak = _peak_gbps(device)
    g = torch.Generator().manual_seed(0)
    results, ratios = [], {}
    dtype = getattr(torch, args.dtype)
    dense = {torch.bfloat16: "dense_bf16", torch.float32: "dense_fp32"}[dtype]
    for name, (K, N) in layers.items():
        W = (torch.randn(N, K, generator=g) * 0.02).to(torch.bfloat16).to(dtype).to(device)  # (N, K)
        w = quantize_nf4(W)  # double-quantized, bitsandbytes' default
        for M in ms_list:
            x = torch.randn(M, K, generator=g).to(dtype).to(device)  # (M, K)
            check = _check(x, w)
            fns = {dense: lambda: x @ W.T, "nf4": lambda: nf4_matmul(x, w),
                   "nf4_dequant": lambda: nf4_matmul(x, w, method="dequant")}
            times = _time_interleaved(fns, iters, device)
            io = (M * K + M * N) * dtype.itemsize  # activations in and out
            bytes_moved = {dense: N * K * dtype.itemsize + io, "nf4": w.nbytes + io, "nf4_dequant": w.nbytes + io}
            row = dict(layer=name, M=M, K=K, N=N, check=check, providers={})
            for p, ms in times.items():
                gbps = bytes_moved[p] / (ms * 1e-3) / 1e9
                row["providers"][p] = dict(ms=round(ms, 4), bytes=bytes_moved[p], gbps=round(gbps, 2),
                                           gflops=round(2 * M * N * K / (ms * 1e-3) / 1e9, 2))
                if peak:
                    row["providers"][p]["frac_peak_bw"] = round(gbps / peak, 3)
            row["nf4_over_dense"] = round(times["nf4"] / times[dense], 3)
            row["fused_over_dequant"] = round(times["nf4"] / times["nf4_dequant"], 3)
            if M == 1:
                ratios[name] = row["nf4_over_dense"]
            results.append(row)
            print(f"# {name:<13} M={M:<4} dense {times[dense]:8.3f} ms  nf4 {times['nf4']:8.3f} ms  "
                  f"dequant+mm {times['nf4_dequant']:8.3f} ms", file=os.sys.stderr, flush=True)
        del W, w
    report = dict(
        device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(), threads=torch.get_num_threads(), dtype=args.dtype,
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None, peak_gbps=peak, iters=iters,
        results=results, decode_ratio=ratios, decode_target=DECODE_TARGET,
        decode_pass=all(r <= DECODE_TARGET for r in ratios.values()),
    )
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
