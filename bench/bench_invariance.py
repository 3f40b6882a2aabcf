"""What batch invariance costs: output tokens/s with it on and off, on the default model, measured in one run.

At each concurrency C, C requests (different prompts, each decoding exactly --new tokens) run at once through two
Engines over the same weights, one batch-invariant and one not, in turn for --repeats rounds; output tokens/s of
each and their ratio (on / off; the issue's target is >= 0.95x). What on changes in a decode step: a one-row step
runs the batched GEMM instead of the GEMV (csrc/decode.c), an NF4 model's small batches the tile GEMM instead of
the fused GEMV. The prefix cache is off on both sides here, so the ratio is the kernels' alone (what on costs the
prefix cache is in the README).

    python bench/bench_invariance.py [--dtypes bfloat16,float32] [--quants none,nf4] [--concurrency 1,4,16]
                                     [--new 48] [--repeats 3] [--threads T] [--out FILE]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from phiforge.bench.report import emit
from phiforge.engine import load_model, load_tokenizer
from phiforge.engine.formats.default_model import default_model_path
from phiforge.engine.serve.engine import Engine
from phiforge.engine.serve.request import Request


def run(engine: Engine, prompts: list[list[int]], new: int) -> float:
    """Output tokens/s of the prompts run at once."""
    t0 = time.perf_counter()
    handles = [engine.submit(Request(p, new, stop_token_ids=frozenset())) for p in prompts]
    results = [h.result(600) for h in handles]
    wall = time.perf_counter() - t0
    assert all(len(r.token_ids) == new for r in results)
    return sum(len(r.token_ids) for r in results) / wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--quants", default="none,nf4")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--new", type=int, default=48, help="new tokens per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    levels = [int(c) for c in a.concurrency.split(",")]
    path = default_model_path()
    tok = load_tokenizer(path)
    topics = ["rivers", "birds", "cities", "tools", "trees", "colours", "metals", "planets"]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": f"Tell me about {topics[i % 8]}, {i}."}],
                                            add_generation_prompt=True, tokenize=True)) for i in range(max(levels))]
    result: dict = {"model": path.name, "new_tokens": a.new, "threads": torch.get_num_threads(),
                    "repeats": a.repeats}
    for dtype_name in a.dtypes.split(","):
        for quant in a.quants.split(","):
            model = load_model(path, dtype=getattr(torch, dtype_name), quant=None if quant == "none" else quant)
            engines = {on: Engine(model, tok, max_batch=max(levels), kv_tokens=max(levels) * 256,
                                  prefix_cache=False, batch_invariant=on) for on in (True, False)}
            side: dict = {}
            for c in levels:
                for e in engines.values():   # warm-up: the native step, the first allocations
                    run(e, prompts[:c], 8)
                tps: dict[bool, list[float]] = {True: [], False: []}
                for _ in range(a.repeats):   # interleaved, so drift hits both sides alike
                    for on, e in engines.items():
                        tps[on].append(run(e, prompts[:c], a.new))
                side[f"concurrency_{c}"] = {
                    "on_tokens_per_s": tps[True], "off_tokens_per_s": tps[False],
                    "ratio_median": statistics.median(x / y for x, y in zip(tps[True], tps[False]))}
            for e in engines.values():
                e.shutdown(drain=False)
            result[f"{dtype_name}_{quant}"] = side
    emit(result, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
