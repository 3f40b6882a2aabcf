"""`phiforge doctor`: what this machine runs. torch and triton versions, torch threads, CUDA, the CPU's relevant
instruction sets, and for each native CPU kernel library whether it is active and, if not, why (disabled, CPU
lacks an instruction set, no compiler, compile error with the compiler's first lines)."""
from __future__ import annotations

import argparse
import json
import os
import platform

import torch
import triton

from phiforge.kernels.cpu import attention as cpu_attention, decode as cpu_decode, gemv as cpu_gemv, native
from phiforge.kernels.cpu import nf4 as nf4_cpu, ops as cpu_ops

ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16")
LIBRARIES = (cpu_ops.LIB, cpu_gemv.LIB, nf4_cpu.LIB, cpu_attention.LIB, cpu_decode.LIB)


def _library(lib: native.NativeLib) -> dict:
    try:
        status = lib.status()
    except native.NativeBuildError as e:  # PHIFORGE_CPU_NATIVE=require: report it instead of stopping
        return {"name": lib.name, "source": lib.source.name, "state": "compile error", "detail": str(e)}
    return {"name": lib.name, "source": lib.source.name, "needs": list(lib.needs), "state": status.state,
            "detail": status.detail}


def diagnose() -> dict:
    """Everything `phiforge doctor` prints, as one dict."""
    flags = native.cpu_flags().split()
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(), "machine": platform.machine(), "torch": torch.__version__,
        "triton": triton.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "cuda": cuda, "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "cpu_isa": {f: f in flags for f in ISA_FLAGS},
        "cpu_native_mode": native.mode(), "cpu_tier": native.cpu_tier(),
        "native_libraries": [_library(lib) for lib in LIBRARIES],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    d = diagnose()
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    print(f"python {d['python']} on {d['machine']}, torch {d['torch']}, triton {d['triton']}")
    print(f"torch threads {d['torch_threads']} of {d['cpu_count']} CPUs; CUDA: "
          + (d["cuda_device"] if d["cuda"] else "not available (CPU path)"))
    print("CPU instruction sets: " + " ".join(f"{f}{'+' if ok else '-'}" for f, ok in d["cpu_isa"].items()))
    print(f"native CPU kernels: PHIFORGE_CPU_NATIVE={d['cpu_native_mode']}, tier {d['cpu_tier']}")
    width = max(len(lib["name"]) for lib in d["native_libraries"])
    for lib in d["native_libraries"]:
        detail = lib["detail"].splitlines()
        print(f"  {lib['name']:<{width}}  {lib['state']}" + (f": {detail[0]}" if detail else ""))
        for line in detail[1:8]:  # the compiler's first lines
            print(f"  {'':<{width}}    {line}")
    return 0
