"""`phiforge kernels report`: compile every shipped kernel configuration for real GPUs, on a machine without one.

For each (kernel, config, arch) this runs Triton's full pipeline ahead of time,

    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))  ->  PTX + cubin

then re-runs Triton's bundled `ptxas -v --gpu-name sm_XX` on the PTX, whose log Triton discards, to read what a
profiler would show: registers per thread, spill bytes (any spill is local-memory traffic in the inner loop),
and shared memory (Triton's dynamic allocation, `metadata.shared`, plus ptxas' static smem). It also scans the PTX
for tensor-core `mma` instructions and `cp.async` (the asynchronous global->shared copies that software
pipelining relies on).

The configurations come from the kernel modules themselves (`aot_specs()` in each), the same tables their
dispatch heuristics pick from, so what is reported is what ships.

    phiforge kernels report [--arch 80,86,89] [--out DIR] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from phiforge.kernels import lora, lora_gather, nf4_matmul

# Shared memory a block may use (opt-in maximum per block), CUDA programming guide, compute capabilities table.
SMEM_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DEFAULT_ARCHS = (80, 86, 89)


def all_specs() -> list[dict]:
    return nf4_matmul.aot_specs() + lora.aot_specs() + lora_gather.aot_specs()


def _ptxas_stats(ptx: str, arch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}", str(src), "-o", os.devnull],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{arch}:\n{log}")
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    return dict(registers=int(regs.group(1)) if regs else 0,
                spill_bytes=(int(stores.group(1)) if stores else 0) + (int(loads.group(1)) if loads else 0),
                static_smem=int(smem.group(1)) if smem else 0)


def compile_spec(spec: dict, arch: int, out_dir: Path | None = None) -> dict:
    """Compile one spec for sm_<arch>; returns the report record."""
    src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"],
                    attrs=spec.get("attrs"))
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec["options"], enable_fp_fusion=True))
    ptx = k.asm["ptx"]
    stats = _ptxas_stats(ptx, arch)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{spec['kernel']}.{spec['config']}.sm{arch}.ptx").write_text(ptx)
    return dict(kernel=spec["kernel"], config=spec["config"], arch=arch, registers=stats["registers"],
                spill_bytes=stats["spill_bytes"], shared_bytes=k.metadata.shared + stats["static_smem"],
                mma=bool(re.search(r"\bmma\.sync|\bwgmma", ptx)), cp_async=("cp.async" in ptx))


def build_report(archs=DEFAULT_ARCHS, out_dir: Path | None = None, workers: int | None = None) -> list[dict]:
    """Every shipped spec x arch. Compiles run in threads: most of the time is in LLVM and ptxas, which release
    the GIL, so two cores give close to 2x."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        # @triton.jit read it at import: the kernels are interpreter objects, which have nothing to compile
        raise RuntimeError("phiforge kernels report compiles real GPU code: unset TRITON_INTERPRET")
    jobs = [(s, a) for s in all_specs() for a in archs]
    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: compile_spec(job[0], job[1], out_dir), jobs))


def format_table(records: list[dict]) -> str:
    head = f"{'kernel':<22} {'config':<24} {'arch':>5} {'regs':>5} {'spill':>6} {'smem KB':>8}  mma  cp.async"
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(f"{r['kernel']:<22} {r['config']:<24} sm_{r['arch']:<2} {r['registers']:>5} "
                     f"{r['spill_bytes']:>6} {r['shared_bytes'] / 1024:>8.1f}  {'yes' if r['mma'] else 'no':<4} "
                     f"{'yes' if r['cp_async'] else 'no'}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["report"], help="compile every shipped kernel config and report")
    parser.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)),
                        help="comma-separated compute capabilities (default 80,86,89)")
    parser.add_argument("--out", type=Path, default=None, help="keep the PTX files in this directory")
    parser.add_argument("--json", action="store_true", help="print the records as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        archs = tuple(int(a) for a in str(args.arch).split(",") if a.strip())
    except ValueError:
        print(f"phiforge kernels report: --arch must be numbers like 80,86,89, got {args.arch!r}", file=sys.stderr)
        return 2
    records = build_report(archs, args.out)
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print(format_table(records))
    bad = [r for r in records if r["spill_bytes"] or r["shared_bytes"] > SMEM_LIMIT.get(r["arch"], 99 * 1024)]
    for r in bad:
        print(f"WARNING: {r['kernel']} {r['config']} sm_{r['arch']}: {r['spill_bytes']} spill bytes, "
              f"{r['shared_bytes']} bytes shared memory", file=sys.stderr)
    return 1 if bad else 0
