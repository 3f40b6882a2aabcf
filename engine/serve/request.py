"""What a caller hands the serving engine and what comes back: Request in, a Handle streaming Deltas, then a Result.

    h = engine.submit(Request(prompt_ids=ids, max_tokens=64, stop=("\\n\\n",)))
    for d in h: print(d.text, end="")          # blocking; `async for d in h` from asyncio
    r = h.result()                             # text, token_ids, finish_reason, usage, ttft_s, latency_s
    hs = engine.submit_choices(Request(ids, 64, sampling, seed=7), n=3)   # 3 choices, one prefill between them

A Handle is filled by the engine's scheduler thread and read from any thread or event loop: events are appended
under a lock, blocking readers wait on a condition, asyncio readers are woken with `call_soon_threadsafe` (the
scheduler never blocks on a slow reader). Every Delta is kept, so several readers (an iterator and `result()`)
see the same stream. Errors raised by `Engine.submit` before any compute carry the request `field` at fault.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator
from uuid import uuid4

from .constraint import Constraint
from .sampling import MAX_LOGPROBS, SamplingParams, TokenLogprob


@dataclass
class Request:
    prompt_ids: list[int]                      # tokenized already (chat template applied by the caller)
    max_tokens: int
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    seed: int | None = None
    stop: tuple[str, ...] = ()                 # stop strings: held back while they may still match, cut exactly
    stop_token_ids: frozenset[int] | None = None   # None: the tokenizer's stop set
    adapter: str | None = None                 # a registered adapter name; None = the base model
    constraint: Constraint | None = None       # the output must match it (engine/serve/constraint.py); None: free
    logprobs: int | None = None                # k: each output token's logprob and the k most likely (0 <= k <= 20)
    id: str = field(default_factory=lambda: uuid4().hex)

    def check(self, vocab_size: int, max_context: int, row_len: int) -> None:
        """The engine's checks before any compute: InvalidRequest / PromptTooLong naming the field."""
        if not self.prompt_ids:
            raise InvalidRequest("prompt_ids is empty (at least one token is needed to start generating)",
                                 "prompt_ids")
        bad = [t for t in self.prompt_ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
        if bad:
            raise InvalidRequest(f"prompt_ids: token id {bad[0]!r} outside the vocabulary [0, {vocab_size})",
                                 "prompt_ids")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be a positive int, got {self.max_tokens!r}", "max_tokens")
        k = self.logprobs
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_LOGPROBS):
            raise InvalidRequest(f"logprobs must be an int in [0, {MAX_LOGPROBS}], got {k!r}", "logprobs")
        need = len(self.prompt_ids) + self.max_tokens
        for limit, what in ((max_context, "the model's context of"),
                            (row_len, "the KV slots a request may hold (kv_tokens / max_batch):")):
            if need > limit:
                raise PromptTooLong(f"{len(self.prompt_ids)} prompt tokens + max_tokens {self.max_tokens} = {need} "
                                    f"> {what} {limit}", "max_tokens")


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0                     # prompt tokens whose K/V came from the prefix cache


@dataclass
class Result:
    id: str
    text: str
    token_ids: list[int]
    finish_reason: str                         # "stop" | "length" | "abort" | "error" (a failed step: see `error`)
    usage: Usage
    ttft_s: float                              # submit -> first token (0 when none came)
    latency_s: float                           # submit -> final
    rope_long: bool = False                    # the LongRoPE regime chosen at admission
    error: str | None = None                   # finish_reason "error": the exception that ended the step
    logprobs: list[TokenLogprob] | None = None  # Request.logprobs set: one per output token but a stop token


@dataclass
class Delta:
    text: str                                  # "" while a stop string is held back or a character is incomplete
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # Request.logprobs set: those of token_ids (a stop token has none)


class EngineError(ValueError):
    """A request the engine refuses before any compute; `field` names the request field at fault."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class QueueFull(EngineError): ...             # the waiting queue is at max_queue (server: 429 with Retry-After)
class InvalidRequest(EngineError): ...        # a field the engine cannot take (empty prompt, bad id; server: 400)
class PromptTooLong(EngineError): ...         # prompt + max_tokens over the context or a KV row (server: 400)
class UnknownAdapter(EngineError): ...        # no adapter of that name is loaded (server: 404)
class AdapterBusy(EngineError): ...           # unload_adapter while requests of it run or wait (server: 409)
class EngineStopped(EngineError): ...         # submitted after shutdown (server: 503)


class Handle:
    """The caller's side of one request: iterate Deltas (blocking or async), `result()`, `abort()`."""

    def __init__(self, request_id: str, abort: Callable[[str], None]) -> None:
        self.id = request_id
        self._abort = abort
        self._events: list[Delta] = []
        self._result: Result | None = None
        self._cond = threading.Condition()
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._read = 0                            # events handed out by poll()

    # ---- the engine's side -----------------------------------------------------------------------------------
    def _push(self, delta: Delta | None = None, result: Result | None = None) -> None:
        with self._cond:
            if delta is not None:
                self._events.append(delta)
            if result is not None:
                self._result = result
            wakers, self._wakers = self._wakers, []
            self._cond.notify_all()
        for loop, ev in wakers:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # the reader's loop is closed: nobody is waiting any more
                pass

    # ---- the caller's side -----------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._result is not None

    def abort(self) -> None:
        self._abort(self.id)

    def poll(self) -> list[Delta]:
        """The Deltas that arrived since the last poll, without blocking (for a caller driving `Engine.step`)."""
        with self._cond:
            new, self._read = self._events[self._read:], len(self._events)
        return new

    def result(self, timeout: float | None = None) -> Result:
        with self._cond:
            if not self._cond.wait_for(lambda: self._result is not None, timeout):
                raise TimeoutError(f"request {self.id} not finished after {timeout} s")
            return self._result

    def __iter__(self) -> Iterator[Delta]:
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: i < len(self._events) or self._result is not None)
                new, finished = self._events[i:], self._result is not None
            i += len(new)
            yield from new
            if finished and i == len(self._events):
                return

    async def __aiter__(self) -> AsyncIterator[Delta]:
        loop, i = asyncio.get_running_loop(), 0
        while True:
            ev = asyncio.Event()
            with self._cond:
                new, finished = self._events[i:], self._result is not None
                if not new and not finished:
                    self._wakers.append((loop, ev))
            if not new and not finished:
                await ev.wait()
                continue
            i += len(new)
            for d in new:
                yield d
            if finished and i == len(self._events):
                return
