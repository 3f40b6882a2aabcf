"""Constrained decoding's cost beside the decode step, on the default model: one JSON object, measured in one run.

At each concurrency C, C requests run at once through one Engine, free (no constraint) and held to a JSON schema
(response_format json_schema's constraint) in turn for --repeats rounds; output tokens/s of each and their ratio
(constrained / free; the issue's target is >= 0.9x). Every request decodes exactly --new tokens: the free ones
ignore stop ids, and each schema's shortest completion is longer than --new (an array of at least --new strings),
so both sides do the same number of steps and the ratio is the masks' cost alone. Two schemas: `plain` (strings of
any length) and `bounded` (strings of at most 12 characters: llguidance tracks the length in its lexer, which makes
each mask several times dearer).

    python bench/bench_constraint.py [--dtype bfloat16] [--concurrency 1,16] [--new 48] [--repeats 3] [--threads T]
                                     [--schemas plain,bounded] [--out FILE]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from phiforge.bench.report import emit
from phiforge.engine import load_model, load_tokenizer
from phiforge.engine.formats.default_model import default_model_path
from phiforge.engine.pretrained import compute_dtype
from phiforge.engine.serve.constraint import Constraint
from phiforge.engine.serve.engine import Engine
from phiforge.engine.serve.request import Request


def schema(n: int, bounded: bool) -> dict:
    """Names of things, at least n of them: a completion longer than n tokens, all of it constrained."""
    item = {"type": "string", "maxLength": 12} if bounded else {"type": "string"}
    return {"type": "object", "properties": {"names": {"type": "array", "items": item, "minItems": n}},
            "required": ["names"], "additionalProperties": False}


def run(engine: Engine, prompts: list[list[int]], new: int, constraint: Constraint | None) -> float:
    """Output tokens/s of the prompts run at once."""
    t0 = time.perf_counter()
    handles = [engine.submit(Request(p, new, stop_token_ids=frozenset() if constraint is None else None,
                                     constraint=constraint)) for p in prompts]
    results = [h.result(600) for h in handles]
    wall = time.perf_counter() - t0
    assert all(len(r.token_ids) == new for r in results), [r.finish_reason for r in results]
    return sum(len(r.token_ids) for r in results) / wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: this machine's fastest)")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--new", type=int, default=48, help="new tokens per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--schemas", default="plain,bounded")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    levels = [int(c) for c in a.concurrency.split(",")]
    path = default_model_path()
    tok = load_tokenizer(path)
    dtype = getattr(torch, a.dtype) if a.dtype else compute_dtype()
    engine = Engine(load_model(path, dtype=dtype), tok, max_batch=max(levels), kv_tokens=max(levels) * 256)
    kinds = a.schemas.split(",")
    unknown = sorted(set(kinds) - {"plain", "bounded"})
    if unknown:
        ap.error(f"--schemas: unknown {', '.join(unknown)} (plain, bounded)")
    constraints = {k: Constraint("json_schema", schema(a.new, k == "bounded")) for k in kinds}
    topics = ["rivers", "birds", "cities", "tools", "trees", "colours", "metals", "planets"]
    result: dict = {"model": path.name, "dtype": str(dtype).removeprefix("torch."), "new_tokens": a.new,
                    "threads": torch.get_num_threads(), "repeats": a.repeats}
    for c in levels:
        prompts = [list(tok.apply_chat_template([{"role": "user", "content": f"List the names of {topics[i % 8]}."}],
                                                add_generation_prompt=True, tokenize=True)) for i in range(c)]
        for constraint in constraints.values():     # warm-up: compiles the grammars, builds the tokenizer trie
            run(engine, prompts, a.new, constraint)
        free: list[float] = []
        held: dict[str, list[float]] = {k: [] for k in constraints}
        for _ in range(a.repeats):
            free.append(run(engine, prompts, a.new, None))
            for k, constraint in constraints.items():
                held[k].append(run(engine, prompts, a.new, constraint))
        result[f"concurrency_{c}"] = {"free_tokens_per_s": free, **{
            k: {"constrained_tokens_per_s": v, "ratio_median": statistics.median(h / f for h, f in zip(v, free))}
            for k, v in held.items()}}
    engine.shutdown(drain=False)
    emit(result, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
