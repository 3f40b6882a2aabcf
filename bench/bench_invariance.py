"""What batch invariance costs: output tokens/s with it on and off, on the default model, measured in one run.

At each concurrency C, C requests (different prompts, each decoding exactly --new tokens) run at once through two
Engines over the same weights, one batch-invariant and one not, in turn for --repeats rounds; output tokens/s of
each and their ratio (on / off; the issue's target is >= 0.95x). What on changes in a decode step: a one-row step
runs the batched GEMM instead of the GEMV (csrc/decode.c), an NF4 model's small batches the tile GEMM instead of
the fused GEMV. The prefix cache is off on both sides here, so the ratio is the kernels' alone (what on costs the
prefix cache is in the README).

    python bench/bench_invariance.py [--dtypes bfloat16,float32] [--quants none,nf4] [--concurrency 1,4,16]
                                     [--new 48] [--repeats 3] [--threads T] [--out FILE]
    python bench/bench_invariance.py --diagnose [--dtypes bfloat16,float32] [--quants none,nf4] [--chunks 16,32]

`--diagnose` names what is still not invariant in the prefill: one prompt prefilled through `model.forward` in
chunks of each size in --chunks, every module's output at the same positions compared bitwise, layer by layer; it
prints the first module whose output differs between chunkings (or that none does), in the order the forward
runs. That is the work left for prefill-chunk invariance (engine/serve/engine.py's docstring).
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


def diagnose(model, prompt: list[int], chunks: list[int]) -> dict:
    """{"first": the first module (in forward order) whose outputs at the same positions differ between the
    chunkings, or None; "modules": how many were compared}."""
    outputs: dict[int, dict[str, list[torch.Tensor]]] = {}
    order: list[str] = []

    def record(name):
        def hook(_module, _args, out):
            if isinstance(out, torch.Tensor):
                if name not in order:
                    order.append(name)
                outputs[current].setdefault(name, []).append(out.detach()[0].clone())   # (T, ...) of the chunk
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n and not list(m.children())]
    try:
        for current in chunks:
            outputs[current] = {}
            cache = model.new_cache(1, len(prompt) + 1)
            with torch.inference_mode():
                for start in range(0, len(prompt), current):
                    ids = prompt[start:start + current]
                    model(torch.tensor([ids]), cache=cache, return_hidden=True)   # advances cache.length
    finally:
        for h in hooks:
            h.remove()
    whole = {c: {n: torch.cat(v) for n, v in outs.items() if all(t.dim() >= 1 for t in v)}
             for c, outs in outputs.items()}                                   # per module: (T, ...) over the prompt
    a, b = chunks[0], chunks[1]
    for name in order:
        x, y = whole[a].get(name), whole[b].get(name)
        if x is not None and y is not None and x.shape == y.shape and not torch.equal(x, y):
            return {"first": name, "modules": len(order)}
    return {"first": None, "modules": len(order)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--quants", default="none,nf4")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--new", type=int, default=48, help="new tokens per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--diagnose", action="store_true", help="name the first prefill module that chunking changes")
    ap.add_argument("--chunks", default="16,32", help="--diagnose: two prefill chunk sizes")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.diagnose:
        path = default_model_path()
        tok = load_tokenizer(path)
        prompt = tok.encode(" ".join(f"Station {i} reported {i * 37 % 101} psi." for i in range(12)))
        chunks = [int(c) for c in a.chunks.split(",")][:2]
        out = {f"{d}_{q}": diagnose(load_model(path, dtype=getattr(torch, d), quant=None if q == "none" else q),
                                    prompt, chunks) for d in a.dtypes.split(",") for q in a.quants.split(",")}
        emit({"prompt_tokens": len(prompt), "chunks": chunks, **out}, a.out)
        return 0
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
