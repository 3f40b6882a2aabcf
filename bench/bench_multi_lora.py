"""Many adapters in one decode batch on the default model: throughput against the base model alone, one JSON object.

16 rows decode greedily after a short prompt; each configuration is timed over the same decode steps, repeats
interleaved (this machine is shared: only same-run ratios mean anything):

  - base_native: the plain model through DecodeStep, i.e. the native whole-step decode (kernels/cpu/decode.py)
    where it runs: what the engine runs when no row has an adapter;
  - base_torch: the plain model through the torch decode step;
  - adapters_none: an AdapterSet with the adapters loaded but every row on the base model (-1): the wrappers' cost;
  - adapters_mixed: 8 distinct random rank-16 adapters on every projection, two rows each (the issue's case),
    through DecodeStep as the engine runs it: natively, the LoRA epilogue grouping rows by adapter
    (csrc/decode_lora.h);
  - adapters_mixed_rowwise: the same with the epilogue one row at a time (each adapter read once per row);
  - adapters_mixed_torch: the same through the torch decode step (what steps with adapter rows ran before);
  - ratio_vs_base = adapters_mixed / base_native tokens/s (the issue's target is >= 0.8 at concurrency 16),
    grouped_vs_rowwise = adapters_mixed / adapters_mixed_rowwise, and ratio_torch_vs_base_torch =
    adapters_mixed_torch / base_torch (the torch LoRA delta's own cost on the same step); `paths` counts the steps
    each configuration ran natively, natively with adapters, and in torch, so a fallback cannot pass unnoticed;
  - delta_cpu_path: the gathered LoRA delta of one qkv projection for the 16 rows in the CPU path's two forms
    (all slots at once, what runs up to DENSE_ROWS rows; grouped by adapter) and the gather+bmm reference, in ms.

`multi_lora_decode(...)` is the function bench/bench_serve.py may call.

    python bench/bench_multi_lora.py [--dtype float32|bfloat16] [--rows 16] [--adapters 8] [--rank 16]
                                     [--new-tokens 32] [--repeats 3] [--threads T]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from phiforge.engine.formats.loader import load_model
from phiforge.engine.formats.peft import save_adapter
from phiforge.engine.model.lora import apply_lora, lora_modules
from phiforge.engine.model.phi3 import KVCache
from phiforge.engine.pretrained import default_model_path
from phiforge.engine.serve.decode import DecodeStep
from phiforge.engine.serve.multi_lora import AdapterSet
from phiforge.kernels.lora_gather import all_slots_, grouped_, lora_gather_ref

PROMPT_LEN = 32


def make_adapters(model_dir: Path, out: Path, n: int, rank: int, dtype: torch.dtype) -> list[Path]:
    """n random rank-`rank` adapters on every projection (B non-zero, so each changes the output)."""
    model = load_model(model_dir, dtype=dtype)
    apply_lora(model, r=rank, alpha=2 * rank, dropout=0.0)
    dirs = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, m in lora_modules(model):
                m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.02)
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.02)
        dirs.append(save_adapter(model, out / f"adapter{i}"))
    return dirs


def _decode_tokens_per_s(model, ids: torch.Tensor, steps: int, native: bool, adapters=None, slots=None,
                         rowwise: bool = False) -> tuple[float, dict]:
    """(tokens/s, the step's path counts) over `steps` decode steps after a prefill."""
    cache = KVCache(model.config, ids.shape[0], ids.shape[1] + steps + 1, model.dtype)
    step = DecodeStep(model, cache)
    if not native:
        step.native = None
    elif rowwise:
        step.native.set_lora_rowwise(True)
    ctx = adapters.rows(slots) if adapters is not None else torch.no_grad()
    with torch.no_grad(), ctx:
        tok = model(ids, cache=cache, num_logits=1)[:, -1].argmax(-1)  # (B,)
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = step(tok, torch.full_like(tok, cache.length)).argmax(-1)
        dt = time.perf_counter() - t0
    return ids.shape[0] * steps / dt, dict(step.steps)


def delta_path_ms(rows: int, n_adapters: int, rank: int, K: int, N: int, dtype: torch.dtype,
                  repeats: int = 20) -> dict:
    """One projection's gathered delta: grouped by adapter (shipped CPU path) vs gather+bmm (the reference)."""
    g = torch.Generator().manual_seed(0)
    A = (torch.randn(n_adapters, rank, K, generator=g) * 0.02).to(dtype)
    B = (torch.randn(n_adapters, N, rank, generator=g) * 0.02).to(dtype)
    scales = torch.full((n_adapters,), 2.0)
    x, y = torch.randn(rows, K, generator=g).to(dtype), torch.zeros(rows, N, dtype=dtype)
    slots = torch.arange(rows) % n_adapters

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    Bv = B.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # stored (N, S, R), as MultiLoRALinear keeps it
    dense = best(lambda: all_slots_(y, x, A, Bv, scales, slots))
    grouped = best(lambda: grouped_(y, x, A, Bv, scales, slots))
    ref = best(lambda: lora_gather_ref(y, x, A, B, scales, slots))
    return dict(shape=dict(rows=rows, K=K, N=N, rank=rank, adapters=n_adapters), all_slots_ms=dense,
                grouped_ms=grouped, gather_bmm_ms=ref)


def multi_lora_decode(model_dir: str | Path | None = None, dtype: torch.dtype = torch.float32, rows: int = 16,
                      n_adapters: int = 8, rank: int = 16, new_tokens: int = 32, repeats: int = 3) -> dict:
    """Decode tokens/s of `rows` rows over `n_adapters` distinct adapters vs the base model; see the docstring."""
    model_dir = Path(model_dir or default_model_path())
    ids = torch.randint(100, 10000, (rows, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(model_dir, Path(tmp), n_adapters, rank, dtype)
        base = load_model(model_dir, dtype=dtype)
        served = load_model(model_dir, dtype=dtype)
        adapters = AdapterSet(served, max_adapters=n_adapters, max_rank=rank)
        for i, d in enumerate(dirs):
            adapters.load(f"adapter{i}", d)
    mixed = torch.arange(rows) % n_adapters
    none = torch.full((rows,), -1)
    configs = {"base_native": (base, True, None, None, False), "base_torch": (base, False, None, None, False),
               "adapters_none": (served, True, adapters, none, False),
               "adapters_mixed": (served, True, adapters, mixed, False),
               "adapters_mixed_rowwise": (served, True, adapters, mixed, True),
               "adapters_mixed_torch": (served, False, adapters, mixed, False)}
    runs, paths = {k: [] for k in configs}, {}
    native_ran = DecodeStep(base, KVCache(base.config, rows, 2, dtype)).native is not None
    for _ in range(repeats):  # interleaved, so drifting load hits every configuration alike
        for name, (model, native, ads, slots, rowwise) in configs.items():
            tps, paths[name] = _decode_tokens_per_s(model, ids, new_tokens, native, ads, slots, rowwise)
            runs[name].append(tps)
    tps = {k: statistics.median(v) for k, v in runs.items()}
    cfg = base.config
    K, N = cfg.hidden_size, (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    return dict(
        model=str(model_dir), dtype=str(dtype).removeprefix("torch."), rows=rows, adapters=n_adapters, rank=rank,
        prompt_len=PROMPT_LEN, new_tokens=new_tokens, repeats=repeats, threads=torch.get_num_threads(),
        native_step_available=native_ran, decode_tokens_per_s=tps, paths=paths,
        ratio_vs_base=tps["adapters_mixed"] / tps["base_native"],
        grouped_vs_rowwise=tps["adapters_mixed"] / tps["adapters_mixed_rowwise"],
        ratio_torch_vs_base_torch=tps["adapters_mixed_torch"] / tps["base_torch"],
        load_average=os.getloadavg(),
        delta_cpu_path=delta_path_ms(rows, n_adapters, rank, K, N, dtype))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the default model)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    report = multi_lora_decode(a.model, getattr(torch, a.dtype), a.rows, a.adapters, a.rank, a.new_tokens, a.repeats)
    print(json.dumps(report, indent=1, default=lambda x: round(x, 4) if isinstance(x, float) else str(x)))


if __name__ == "__main__":
    main()
