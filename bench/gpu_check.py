"""One prepared run that proves phiforge's CUDA path end to end and times it beside its references.

    python bench/gpu_check.py --device cuda --out runs/gpu-check        (`make gpu-check`; under 8 minutes on one GPU)
    python bench/gpu_check.py --device cpu --tiny --out DIR              (CI: small shapes, Triton's interpreter)

Parts (each isolated: a failure is recorded with its traceback and the run goes on; `--parts a,b` picks some):

  correctness (bench/gpu_check_correct.py)
    kernels       every Triton kernel against its pure-torch reference, Phi-3-mini and odd shapes, fp16 and bf16
    model_triton  a tiny Phi-3 (NF4 bases + LoRA) forward and backward through Triton equal to the torch path
    qlora_train   QLoRA training steps on the device match the CPU torch reference's losses
    generate      greedy generation of the default model equal to transformers' on the same device
    cuda_graph    CUDAGraphDecode's replayed step equal to the eager DecodeStep (CUDA only)
  speed (bench/gpu_check_speed.py), each beside its reference in the same run
    nf4_speed     NF4 GEMV/GEMM vs cuBLAS bf16 (and bitsandbytes if installed), GB/s vs measured copy bandwidth
    lora_speed    fused LoRA forward+backward vs the unfused torch form
    decode_speed  batch 1 and 8 decode tokens/s and TTFT, bf16 and NF4, eager / CUDA graph vs transformers
    train_speed   QLoRA vs LoRA training tokens/s and peak memory, seq 2048, r=16, vs transformers+PEFT

Writes DIR/gpu_check.json (rewritten after every part, so a run cut short keeps what it measured) and
DIR/gpu_check.log. Exit status 1 if any part failed. Needs only torch and triton; transformers, peft and
bitsandbytes are used where installed, and the default model where ~/.cache/phiforge (PHIFORGE_HOME) holds it.
It runs from a plain checkout too: without an installed phiforge, the package is assembled from this directory.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("phiforge") is None:
    # A checkout that was never pip-installed (the GPU machine): phiforge/ is the package and the repo root holds its
    # subpackages (engine/, kernels/, bench/), as setup.py's package_dir maps them. The root itself never goes on
    # sys.path: a bare `kernels` there would be imported by transformers.
    _spec = importlib.util.spec_from_file_location("phiforge", ROOT / "phiforge" / "__init__.py",
                                                   submodule_search_locations=[str(ROOT / "phiforge"), str(ROOT)])
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["phiforge"] = _mod
    _spec.loader.exec_module(_mod)

import torch  # noqa: E402
import triton  # noqa: E402

from phiforge.bench import gpu_check_correct, gpu_check_speed  # noqa: E402
from phiforge.bench.gpu_check_common import Ctx, Skip  # noqa: E402
from phiforge.engine.atomic import write_json_atomic  # noqa: E402

PARTS = {**gpu_check_correct.PARTS, **gpu_check_speed.PARTS}


def environment(device: str) -> dict:
    env = dict(python=platform.python_version(), torch=torch.__version__, machine=platform.machine(),
               date=datetime.date.today().isoformat(), device=device,
               triton_interpret=os.environ.get("TRITON_INTERPRET") == "1")
    env["triton"] = triton.__version__
    for name in ("transformers", "peft", "bitsandbytes"):
        env[name] = None if importlib.util.find_spec(name) is None else "installed"
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, multiprocessors=p.multi_processor_count)
    return env


def run_part(name: str, ctx: Ctx) -> dict:
    t0 = time.perf_counter()
    ctx.log(f"== {name}")
    try:
        res = dict(status="ok", result=PARTS[name](ctx))
    except Skip as e:
        res = dict(status="skip", reason=str(e))
    except Exception as e:  # noqa: BLE001  every part is isolated: record and go on
        res = dict(status="fail", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    res["seconds"] = round(time.perf_counter() - t0, 2)
    ctx.log(f"   {res['status']} in {res['seconds']} s" + (f": {res.get('reason') or res.get('error')}"
                                                           if res["status"] != "ok" else ""))
    if res["status"] == "fail":
        ctx.log(res["traceback"])
    if ctx.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small shapes and few iterations (CI on CPU)")
    ap.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    a = ap.parse_args(argv)
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"gpu_check: --parts: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}",
              file=sys.stderr)
        return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device (use --device cpu --tiny for the CI mode)",
              file=sys.stderr)
        return 2
    if a.device == "cpu":
        # the kernels run under Triton's interpreter on CPU tensors (must be set before triton is first imported)
        os.environ.setdefault("PHIFORGE_KERNELS", "triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("gpu_check: --device cpu needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
            return 2
    a.out.mkdir(parents=True, exist_ok=True)
    log_path, json_path = a.out / "gpu_check.log", a.out / "gpu_check.json"
    with open(log_path, "w") as logf:
        def log(msg: str) -> None:
            print(msg, flush=True)
            logf.write(msg + "\n")
            logf.flush()

        ctx = Ctx(device=a.device, tiny=a.tiny, log=log)
        report = dict(environment=environment(a.device), tiny=a.tiny, parts={})
        log(json.dumps(report["environment"]))
        t0 = time.perf_counter()
        for name in parts:
            report["parts"][name] = run_part(name, ctx)
            report["total_seconds"] = round(time.perf_counter() - t0, 1)
            write_json_atomic(json_path, report)
    failed = [n for n, r in report["parts"].items() if r["status"] == "fail"]
    print(f"gpu_check: {len(parts) - len(failed)}/{len(parts)} parts without failure; {json_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
