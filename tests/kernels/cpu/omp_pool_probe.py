"""Run by tests/kernels/cpu/test_omp_pool.py in a fresh process (OpenMP pools live as long as their threads, so a
shared pytest process would count other tests' pools): prints, as JSON, the process's native threads (OS threads
that are not Python threads: the OpenMP workers, here) at each stage.

    python omp_pool_probe.py release        a thread's pool, released, then built again
    python omp_pool_probe.py engine DIR     a pool from loading a model, then Engine(start=True), then shutdown"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

import torch

from phiforge.kernels.cpu import omp_pool


def native_threads() -> int:
    return len(os.listdir("/proc/self/task")) - threading.active_count()


def settled(expected: int, seconds: float = 10.0) -> int:
    """native_threads() once it equals `expected`, or after `seconds`: a joined Python thread's OS thread still runs
    its thread-exit destructors (libgomp ends the thread's pool in one) for a moment after join returns."""
    deadline = time.monotonic() + seconds
    while native_threads() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return native_threads()


def parallel_sum(scale: float) -> float:
    """A reduction large enough that torch runs it on an OpenMP team (starting this thread's pool)."""
    return float((torch.ones(1 << 22, dtype=torch.float64) * scale).sum())


def main() -> None:
    torch.set_num_threads(2)
    out = {"start": native_threads()}
    assert parallel_sum(1.0) == 1 << 22
    out["pool"] = native_threads()
    if sys.argv[1] == "release":
        out["released"] = omp_pool.release()
        out["after_release"] = native_threads()
        assert parallel_sum(2.0) == 2 << 22
        out["pool_again"] = native_threads()
    else:
        from tiny_phi3 import StubTokenizer, random_prompt

        from phiforge.engine import load_model
        from phiforge.engine.serve.engine import Engine
        from phiforge.engine.serve.request import Request

        model = load_model(sys.argv[2], dtype=torch.float32)
        assert parallel_sum(1.0) == 1 << 22
        out["pool_after_load"] = native_threads()
        engine = Engine(model, StubTokenizer(), max_batch=2, kv_tokens=2 * 64)
        out["engine_started"] = native_threads()
        out["tokens"] = len(engine.submit(Request(random_prompt(9, 0), 5)).result(60).token_ids)
        engine.shutdown()
        out["engine_stopped"] = settled(out["engine_started"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
