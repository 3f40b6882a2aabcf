"""`phiforge kernels report`: compile every shipped kernel configuration for real GPUs, on a machine without one.

For each (kernel, config, arch) this runs Triton's full pipeline ahead of time,

    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))  ->  PTX + cubin

then re-runs Triton's bundled `ptxas -v --gpu-name sm_XX` on the PTX, whose log Triton discards, to read what a
profiler would show: registers per thread, spill bytes (any spill is local-memory traffic in the inner loop),
and shared memory (Triton's dynamic allocation, `metadata.shared`, plus ptxas' static smem). It also scans the PTX
for tensor-core `mma` instructions and `cp.async` (the asynchronous global->shared copies that software
pipelining relies on).

Hopper (H100, H200: compute capability 9.0). Triton always emits `.target sm_90a` for cc 90, the arch-specific
target whose PTX may use wgmma (warpgroup tensor-core MMA) and setmaxnreg, and ptxas refuses to build sm_90a PTX
for plain sm_90. So `--arch 90` reports, per kernel, the target the code actually needs on an H100/H200: `sm_90`
when its PTX uses no sm_90a-only instruction (the PTX is retargeted and ptxas builds it for sm_90, as a portable
cubin would be), `sm_90a` when it does (ptxas builds it for sm_90a). `--arch 90a` builds every kernel for sm_90a,
which is what Triton itself loads on those GPUs. Both use Hopper's 227 KB per-block shared-memory limit.

The configurations come from the kernel modules themselves (`aot_specs()` in each), the same tables their
dispatch heuristics pick from, so what is reported is what ships.

    phiforge kernels report [--arch 80,86,89,90,90a] [--out DIR] [--json]
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
SMEM_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, "90a": 227 * 1024}
DEFAULT_ARCHS = (80, 86, 89, 90)
# PTX instructions that exist only on the arch-specific sm_90a target (PTX ISA: wgmma.*, setmaxnreg)
SM90A_ONLY = re.compile(r"\bwgmma\.|\bsetmaxnreg\b")


def all_specs() -> list[dict]:
    return nf4_matmul.aot_specs() + lora.aot_specs() + lora_gather.aot_specs()


def parse_arch(token: str) -> int | str:
    """'86' -> 86, '90a' -> '90a' (the arch-specific Hopper target); anything else is a ValueError."""
    token = token.strip()
    if token == "90a":
        return token
    return int(token)


def _cc(arch: int | str) -> int:
    return 90 if arch == "90a" else int(arch)


def ptx_target(ptx: str, arch: int | str) -> tuple[str, str]:
    """(PTX to hand ptxas, its target name) for one report row. Triton writes `.target sm_90a` for cc 90: a row
    for plain 90 keeps that only when the code needs it (see the module docstring)."""
    if arch == 90 and not SM90A_ONLY.search(ptx):
        return re.sub(r"^\.target sm_90a\b", ".target sm_90", ptx, count=1, flags=re.M), "sm_90"
    target = re.search(r"^\.target (sm_\w+)", ptx, re.M)
    return ptx, target.group(1) if target else f"sm_{arch}"


def _ptxas_stats(ptx: str, target: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([get_ptxas(int(target[3:5])).path, "-v", f"--gpu-name={target}", str(src), "-o",
                               os.devnull], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {target}:\n{log}")
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    return dict(registers=int(regs.group(1)) if regs else 0,
                spill_bytes=(int(stores.group(1)) if stores else 0) + (int(loads.group(1)) if loads else 0),
                static_smem=int(smem.group(1)) if smem else 0)


def compile_spec(spec: dict, arch: int | str, out_dir: Path | None = None) -> dict:
    """Compile one spec for `arch` (a compute capability, or '90a'); returns the report record."""
    src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"],
                    attrs=spec.get("attrs"))
    k = triton.compile(src, target=GPUTarget("cuda", _cc(arch), 32),
                       options=dict(spec["options"], enable_fp_fusion=True))
    ptx, target = ptx_target(k.asm["ptx"], arch)
    stats = _ptxas_stats(ptx, target)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{spec['kernel']}.{spec['config']}.sm{arch}.ptx").write_text(ptx)
    return dict(kernel=spec["kernel"], config=spec["config"], arch=arch, target=target,
                registers=stats["registers"], spill_bytes=stats["spill_bytes"],
                shared_bytes=k.metadata.shared + stats["static_smem"],
                mma=bool(re.search(r"\bmma\.sync|\bwgmma", ptx)), wgmma=bool(re.search(r"\bwgmma\.", ptx)),
                cp_async=("cp.async" in ptx))


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
    head = (f"{'kernel':<22} {'config':<24} {'arch':<5} {'target':<7} {'regs':>5} {'spill':>6} {'smem KB':>8}  "
            f"mma  wgmma  cp.async")
    lines = [head, "-" * len(head)]
    for r in records:
        yes = {True: "yes", False: "no"}
        lines.append(f"{r['kernel']:<22} {r['config']:<24} sm_{r['arch']:<3} {r['target']:<7} {r['registers']:>5} "
                     f"{r['spill_bytes']:>6} {r['shared_bytes'] / 1024:>8.1f}  {yes[r['mma']]:<4} "
                     f"{yes[r.get('wgmma', False)]:<6} {yes[r['cp_async']]}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["report"], help="compile every shipped kernel config and report")
    parser.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)),
                        help="comma-separated compute capabilities; 90a = Hopper's arch-specific target "
                             "(default 80,86,89,90)")
    parser.add_argument("--out", type=Path, default=None, help="keep the PTX files in this directory")
    parser.add_argument("--json", action="store_true", help="print the records as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        archs = tuple(parse_arch(a) for a in str(args.arch).split(",") if a.strip())
    except ValueError:
        print(f"phiforge kernels report: --arch must be compute capabilities like 80,86,89,90,90a, got "
              f"{args.arch!r}", file=sys.stderr)
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
