"""The serving engine under concurrency, on the default model: one JSON object, ratios measured in one run.

  - throughput: N concurrent greedy requests (prompts of ~P tokens, T new tokens each, stop ids ignored so every
    request decodes exactly T) through one Engine (max_batch N), vs the same N requests one after another
    through an Engine of max_batch 1. Output tokens/s of each and the ratio.
  - long_prompt: K streams decode; a long prompt (L tokens) arrives. Its TTFT, and the streams' inter-token gaps
    while it is prefilled (max and median) vs their gaps before it arrived: chunked prefill bounds the stall to
    one chunk per step. Once per prefill chunk size in --chunks: the trade between the streams' stall and the
    long prompt's TTFT that sets the engine's default.
  - multi_adapter: N concurrent greedy requests spread over A distinct random LoRA adapters (rank R, every
    projection; request i uses adapter i mod A) through one Engine holding all A, vs the same N requests on the
    base model alone (an Engine without adapters: the native whole-step decode). Output tokens/s of each and the
    ratio; also the adapter engine with every request on the base (what carrying the adapter layer costs).
  - next_turn: a chat's next turn (the first request's prompt + its reply + a new message) on an engine that just
    served the first turn (prefix reuse on) vs a fresh engine (off): TTFT of each.

`throughput`, `long_prompt_stall` and `next_turn_ttft` take any (model, tokenizer) for bench/bench_serve.py to reuse.

    python bench/bench_engine.py [--dtype bfloat16] [--requests 16] [--prompt 200] [--new 64] [--threads T]
                                 [--adapters 8] [--rank 16] [--chunks 64,128,256,512] [--only multi_adapter]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from phiforge.bench.bench_multi_lora import make_adapters
from phiforge.engine import load_model, load_tokenizer
from phiforge.engine.formats.default_model import default_model_path
from phiforge.engine.serve.engine import Engine
from phiforge.engine.serve.request import Request


def _prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab, (length + i % 7,), generator=g).tolist() for i in range(n)]


def _run(engine: Engine, prompts: list[list[int]], new: int, concurrent: bool,
         adapters: list[str | None] | None = None) -> tuple[float, int]:
    t0 = time.perf_counter()
    reqs = [Request(p, new, stop_token_ids=frozenset(), adapter=None if adapters is None else adapters[i])
            for i, p in enumerate(prompts)]
    if concurrent:
        results = [h.result() for h in [engine.submit(r) for r in reqs]]
    else:
        results = [engine.submit(r).result() for r in reqs]
    return time.perf_counter() - t0, sum(len(r.token_ids) for r in results)


def throughput(model, tokenizer, n: int = 16, prompt: int = 200, new: int = 64) -> dict:
    prompts = _prompts(model.config.vocab_size, n, prompt)
    row = prompt + 8 + new
    out = {}
    for name, batch, concurrent in (("concurrent", n, True), ("one_by_one", 1, False)):
        e = Engine(model, tokenizer, max_batch=batch, kv_tokens=batch * row, prefix_cache=False)
        _run(e, prompts[:1], 4, False)                                    # warm-up (native library, tables)
        secs, toks = _run(e, prompts, new, concurrent)
        e.shutdown()
        out[name] = dict(seconds=round(secs, 3), output_tokens=toks, output_tokens_per_s=round(toks / secs, 1))
    out["ratio_concurrent_over_one_by_one"] = round(out["concurrent"]["output_tokens_per_s"]
                                                    / out["one_by_one"]["output_tokens_per_s"], 2)
    return out


def long_prompt_stall(model, tokenizer, streams: int = 8, long: int = 1500, new: int = 400,
                      prefill_chunk: int = 256) -> dict:
    vocab = model.config.vocab_size
    e = Engine(model, tokenizer, max_batch=streams + 1, kv_tokens=(streams + 1) * (long + 80),
               prefill_chunk=prefill_chunk, prefix_cache=False)
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    handles = [e.submit(Request(p, min(new, long + 70 - len(p)), stop_token_ids=frozenset()))
               for p in _prompts(vocab, streams, 20, seed=1)]

    def read(i):
        for _ in handles[i]:
            arrivals[i].append(time.perf_counter())
    readers = [threading.Thread(target=read, args=(i,)) for i in range(streams)]
    for t in readers:
        t.start()
    while min(len(a) for a in arrivals) < 20:                              # streams in steady decode
        time.sleep(0.01)
    t_arrive = time.perf_counter()
    big = e.submit(Request(_prompts(vocab, 1, long, seed=2)[0][:long], 8, stop_token_ids=frozenset()))
    r = big.result()
    t_first = t_arrive + r.ttft_s
    for h in handles:
        h.abort()
    for t in readers:
        t.join()
    e.shutdown()
    before = [b - a for ts in arrivals for a, b in zip(ts, ts[1:]) if b < t_arrive]
    during = [b - a for ts in arrivals for a, b in zip(ts, ts[1:]) if t_arrive <= b <= t_first]
    return dict(long_prompt_tokens=long, prefill_chunk=prefill_chunk, streams=streams,
                ttft_s=round(r.ttft_s, 3), gap_before_median_s=round(statistics.median(before), 4),
                gap_during_median_s=round(statistics.median(during), 4) if during else None,
                gap_during_max_s=round(max(during), 4) if during else None)


def multi_adapter(model_dir: str | Path, tokenizer, dtype: torch.dtype, n: int = 16, n_adapters: int = 8,
                  rank: int = 16, prompt: int = 200, new: int = 64) -> dict:
    """n concurrent requests over n_adapters distinct adapters through one Engine vs the base alone (docstring)."""
    base = load_model(model_dir, dtype=dtype)
    prompts = _prompts(base.config.vocab_size, n, prompt)
    row = prompt + 8 + new
    names = [f"adapter{i % n_adapters}" for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(Path(model_dir), Path(tmp), n_adapters, rank, dtype)
        served = Engine(load_model(model_dir, dtype=dtype), tokenizer, max_batch=n, kv_tokens=n * row,
                        prefix_cache=False, adapters={f"adapter{i}": str(d) for i, d in enumerate(dirs)})
    out = {}
    for name, e, which in (("base_alone", Engine(base, tokenizer, max_batch=n, kv_tokens=n * row,
                                                  prefix_cache=False), None),
                           ("adapters_mixed", served, names), ("adapter_engine_base_rows", served, None)):
        _run(e, prompts[:2], 4, True, None if which is None else which[:2])       # warm-up (native library, tables)
        secs, toks = _run(e, prompts, new, True, which)
        out[name] = dict(seconds=round(secs, 3), output_tokens=toks, output_tokens_per_s=round(toks / secs, 1))
        if e is not served:
            e.shutdown()
    served.shutdown()
    out.update(requests=n, adapters=n_adapters, rank=rank, prompt_tokens=prompt, new_tokens=new,
               ratio_mixed_over_base=round(out["adapters_mixed"]["output_tokens_per_s"]
                                           / out["base_alone"]["output_tokens_per_s"], 3),
               ratio_base_rows_over_base=round(out["adapter_engine_base_rows"]["output_tokens_per_s"]
                                               / out["base_alone"]["output_tokens_per_s"], 3))
    return out


def next_turn_ttft(model, tokenizer, prompt: int = 800, new: int = 32) -> dict:
    vocab = model.config.vocab_size
    first = _prompts(vocab, 1, prompt, seed=3)[0]
    out = {}
    for name, reuse in (("prefix_reuse", True), ("fresh", False)):
        e = Engine(model, tokenizer, max_batch=1, kv_tokens=prompt + 2 * new + 64, prefix_cache=reuse)
        r1 = e.submit(Request(first, new, stop_token_ids=frozenset())).result()
        turn2 = first + r1.token_ids + _prompts(vocab, 1, 20, seed=4)[0][:20]
        r2 = e.submit(Request(turn2, new, stop_token_ids=frozenset())).result()
        e.shutdown()
        out[name] = dict(ttft_s=round(r2.ttft_s, 4), cached_tokens=r2.usage.cached_tokens)
    out["ttft_ratio_reuse_over_fresh"] = round(out["prefix_reuse"]["ttft_s"] / out["fresh"]["ttft_s"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=200)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--chunks", default="256", help="prefill chunk sizes for long_prompt, comma-separated")
    ap.add_argument("--only", choices=["throughput", "long_prompt", "multi_adapter", "next_turn"], default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = default_model_path()
    dtype = getattr(torch, args.dtype)
    model = load_model(path, dtype=dtype)
    tok = load_tokenizer(path)
    parts = dict(throughput=lambda: throughput(model, tok, args.requests, args.prompt, args.new),
                 long_prompt=lambda: [long_prompt_stall(model, tok, prefill_chunk=int(c))
                                      for c in args.chunks.split(",")],
                 multi_adapter=lambda: multi_adapter(path, tok, dtype, args.requests, args.adapters, args.rank,
                                                     args.prompt, args.new),
                 next_turn=lambda: next_turn_ttft(model, tok))
    out = dict(model=str(path), dtype=args.dtype, threads=torch.get_num_threads())
    out.update((k, f()) for k, f in parts.items() if args.only in (None, k))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
