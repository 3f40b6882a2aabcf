"""STAND-IN for the serving engine (engine/engine.py, engine/request.py), for the server's tests before it merges.

The real Engine (s-serve) batches requests continuously; this stand-in runs them ONE AT A TIME through today's
Generator, behind the same contract (/tmp/engine_api.md): submit / abort / shutdown / stats / adapters /
max_context, a Handle iterable sync and async, Result / Usage / Delta, the EngineError family. It lets the HTTP
layer be exercised end to end now; nothing measured through it is the engine's. At merge the tests switch to the
real Engine and this file goes.

If `phiforge.engine.request` does not exist yet, `install_request_module()` registers a stand-in module of that
name, so engine/server.py and engine/openai_api.py import what they will import once merged.
"""
from __future__ import annotations

import asyncio
import collections
import importlib
import importlib.util
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

from phiforge.engine.generate import Generator
from phiforge.engine.loader import load_model
from phiforge.engine.sampling import SamplingParams


def install_request_module() -> types.ModuleType:
    """The real engine/request.py if present, else the stand-in registered under its name."""
    if importlib.util.find_spec("phiforge.engine.request") is not None:
        return importlib.import_module("phiforge.engine.request")
    mod = types.ModuleType("phiforge.engine.request")

    @dataclass
    class Request:
        prompt_ids: list[int]
        max_tokens: int
        sampling: SamplingParams = SamplingParams(temperature=0.0)
        seed: int | None = None
        stop: tuple[str, ...] = ()
        stop_token_ids: frozenset[int] | None = None
        adapter: str | None = None
        id: str = field(default_factory=lambda: uuid4().hex)

    @dataclass
    class Usage:
        prompt_tokens: int
        completion_tokens: int
        cached_tokens: int = 0

    @dataclass
    class Result:
        id: str
        text: str
        token_ids: list[int]
        finish_reason: str
        usage: Usage
        ttft_s: float
        latency_s: float

    @dataclass
    class Delta:
        text: str
        token_ids: list[int]

    class EngineError(ValueError):
        def __init__(self, message: str, field: str | None = None) -> None:
            super().__init__(message)
            self.field = field

    for cls in (Request, Usage, Result, Delta, EngineError):
        cls.__module__ = mod.__name__
        setattr(mod, cls.__name__, cls)
    for name in ("QueueFull", "PromptTooLong", "UnknownAdapter", "EngineStopped"):
        setattr(mod, name, type(name, (EngineError,), {"__module__": mod.__name__}))
    sys.modules[mod.__name__] = mod
    return mod


R = install_request_module()


class StandInHandle:
    def __init__(self, engine: "GeneratorEngine", request: Any) -> None:
        self.id, self.request, self._engine = request.id, request, engine
        self._events: list[Any] = []
        self._result = None
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.cancel = threading.Event()
        self.t_submit = time.perf_counter()

    def _push(self, delta: Any = None, result: Any = None) -> None:
        with self._cond:
            if delta is not None:
                self._events.append(delta)
            if result is not None:
                self._result = result
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, ev in waiters:
            loop.call_soon_threadsafe(ev.set)

    def __iter__(self):
        i = 0
        while True:
            with self._cond:
                while i == len(self._events) and self._result is None:
                    self._cond.wait()
                batch, i, done = self._events[i:], len(self._events), self._result is not None
            yield from batch
            if done:
                return

    async def _aiter(self):
        loop, ev = asyncio.get_running_loop(), asyncio.Event()
        with self._cond:
            self._waiters.append((loop, ev))
        i = 0
        while True:
            with self._cond:
                batch, i, done = self._events[i:], len(self._events), self._result is not None
                ev.clear()
            for d in batch:
                yield d
            if done:
                return
            if not batch:
                await ev.wait()

    def __aiter__(self):
        return self._aiter()

    def result(self, timeout: float | None = None) -> Any:
        with self._cond:
            if not self._cond.wait_for(lambda: self._result is not None, timeout):
                raise TimeoutError(f"request {self.id} not done after {timeout} s")
            return self._result

    def abort(self) -> None:
        self._engine.abort(self.id)

    @property
    def done(self) -> bool:
        return self._result is not None


class GeneratorEngine:
    """STAND-IN Engine: one worker thread runs queued requests one by one through a Generator (per adapter)."""

    def __init__(self, model: Any, tokenizer: Any, *, max_queue: int = 256, model_dir: str | Path | None = None,
                 dtype: Any = None) -> None:
        self.model, self.tokenizer, self.max_queue = model, tokenizer, max_queue
        self.model_dir, self.dtype = model_dir, dtype
        self._gens: dict[str | None, Any] = {None: Generator(model, tokenizer)}
        self._queue: collections.deque = collections.deque()
        self._handles: dict[str, StandInHandle] = {}
        self._lock = threading.Condition()
        self._running: StandInHandle | None = None
        self._stopping = False
        self._counts = collections.Counter()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="stand-in-engine")
        self._thread.start()

    @property
    def max_context(self) -> int:
        return self.model.config.max_position_embeddings

    def load_adapter(self, name: str, path: str) -> None:
        self._gens[name] = Generator(load_model(self.model_dir, dtype=self.dtype, adapter=path), self.tokenizer)

    def unload_adapter(self, name: str) -> None:
        self._gens.pop(name, None)

    def adapters(self) -> list[str]:
        return [n for n in self._gens if n is not None]

    def submit(self, request: Any) -> StandInHandle:
        with self._lock:
            if self._stopping:
                raise R.EngineStopped("the engine is shutting down")
            if request.adapter not in self._gens:
                raise R.UnknownAdapter(f"no adapter named {request.adapter!r}", "model")
            if len(request.prompt_ids) + request.max_tokens > self.max_context:
                raise R.PromptTooLong(f"prompt + max_tokens over the context of {self.max_context}", "max_tokens")
            if len(self._queue) >= self.max_queue:
                self._counts["rejected_total"] += 1
                raise R.QueueFull(f"{len(self._queue)} requests waiting (max_queue {self.max_queue})")
            h = StandInHandle(self, request)
            self._handles[h.id] = h
            self._queue.append(h)
            self._lock.notify_all()
            return h

    def abort(self, request_id: str) -> None:
        with self._lock:
            h = self._handles.get(request_id)
            if h is None or h.done:
                return
            h.cancel.set()
            if h in self._queue:
                self._queue.remove(h)
                self._finish(h, "", [], "abort", 0.0)

    def _finish(self, h: StandInHandle, text: str, ids: list[int], reason: str, ttft: float, cached: int = 0) -> None:
        if reason == "abort":
            self._counts["aborted_total"] += 1
        self._handles.pop(h.id, None)
        usage = R.Usage(len(h.request.prompt_ids), len(ids), cached)
        h._push(result=R.Result(h.id, text, ids, reason, usage, ttft, time.perf_counter() - h.t_submit))

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not (self._stopping and self._running is None):
                    self._lock.wait()
                if not self._queue:
                    return
                h = self._running = self._queue.popleft()
            try:
                self._run(h)
            finally:
                with self._lock:
                    self._running = None
                    self._lock.notify_all()

    def _run(self, h: StandInHandle) -> None:
        r = h.request
        s = r.sampling
        first = None
        run = self._gens[r.adapter].stream(r.prompt_ids, max_new_tokens=r.max_tokens, temperature=s.temperature,
                                            top_k=s.top_k, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
                                            seed=r.seed, stop=list(r.stop), cancel=h.cancel)
        self._counts["prompt_tokens_total"] += len(r.prompt_ids)
        while True:
            try:
                piece = next(run)
            except StopIteration as done:
                g = done.value[0]
                break
            first = first or time.perf_counter()
            h._push(R.Delta(piece, []))
        self._counts["generation_tokens_total"] += len(g.token_ids)
        reason = "abort" if g.finish_reason == "cancelled" else g.finish_reason
        ttft = (time.perf_counter() if first is None else first) - h.t_submit
        self._finish(h, g.text, g.token_ids, reason, ttft, g.cached_tokens)

    def stats(self) -> dict:
        with self._lock:
            run = self._running
            used = 0 if run is None else len(run.request.prompt_ids) + run.request.max_tokens
            return {"running": int(run is not None), "waiting": len(self._queue), "kv_used_tokens": used,
                    "kv_total_tokens": self.max_context, **{k: self._counts[k] for k in (
                        "prompt_tokens_total", "generation_tokens_total", "aborted_total", "rejected_total")},
                    "preempted_total": 0}

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        with self._lock:
            self._stopping = True
            if not drain:
                for h in list(self._queue):
                    self._queue.remove(h)
                    self._finish(h, "", [], "abort", 0.0)
                if self._running is not None:
                    self._running.cancel.set()
            self._lock.notify_all()
        self._thread.join(timeout)
