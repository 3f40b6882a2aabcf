"""The generation loop a service embeds: static KV cache, chunked prefill, sampling, streaming, stop rules, batches.

    gen = Generator(model, tokenizer)
    [r] = gen.generate("Once upon a time", max_new_tokens=64, temperature=0)      # r.text, r.token_ids, ...
    for piece in gen.stream([{"role": "user", "content": "Hi!"}]): print(piece, end="")

A Generator is a client of the serving engine (engine/serve/engine.py), the one generation code path: a call submits
its prompts as Requests to an Engine it owns (one KV row per prompt, built for the call's size and kept while
later calls fit) and drives the engine's steps itself, checking `cancel` before each one.

  1. **Admission.** Every prompt is tokenized (a chat goes through the model's chat template) and checked against the
     context: prompt + max_new_tokens > max_position_embeddings is a ValueError naming the prompt, before any
     compute. The LongRoPE regime is chosen per sequence, at admission, and never changes (below).
  2. **Prefill.** Each prompt is prefilled into its own row, in chunks of `prefill_chunk` tokens per step
     (bounded activation memory; cancellation is checked between steps); only the last chunk goes through the
     lm_head, and only for its last position. No padding: each row computes what it would alone.
  3. **Decode.** One token per running row per step (engine/serve/decode.py's step, every row at its own length):
     sample (engine/serve/sampling.py), detokenize (engine/serve/detokenize.py), test the stop rules. A row ends on any
     id of the full stop set (`tokenizer.stop_ids`: generation_config's EOS ids plus the end-of-turn token), on a stop
     string (text cut right before it), at max_new_tokens, or when cancelled; its row is freed at once.

**LongRoPE.** A longrope model's regime (short or long rotary factors) is chosen per request at admission and never
changes: engine/serve/scheduler.py states the rule and why. Prompts of one call may choose different regimes; they
share the call's engine and its one KV cache, each row computed in its own regime (decodes run one step call per
regime), so each row's result is still what it would be alone. Tests compare against transformers run with that
same regime for the whole sequence.

**Sliding window** (mini-4k, 2047): the model masks keys older than the window. A row is linear (slot = position),
sized for the call's longest prompt + max_new_tokens, which for a 4k model is at most 4096 slots.

**Prefix cache.** A one-prompt call's row keeps its K/V and the tokens they hold (engine/serve/kv_memory.py); the next
one-prompt call reuses the K/V of its longest common prefix with them (all but its own last token, which must run to
give logits) and prefills only the rest. A chat's next turn repeats the conversation so far, so its TTFT shrinks to the
new turn's tokens. `cached_tokens` in the result says how many were reused. It is opt-in (`prefix_cache=True`; `phiforge
chat` turns it on): reused K/V are what the earlier call computed (by prefill or decode step, in other chunks),
equal to a fresh prefill's only up to rounding, so with it a call's tokens can depend on the calls before it (in
bf16 a near-tie can flip); off, the same inputs and seed give the same tokens whatever ran before. A batch call
neither reuses nor leaves anything to reuse.

**Results** (one per prompt, in order): `text` (special tokens skipped, cut before a stop string), `token_ids` (the
new tokens, including the stop id that ended the row), `finish_reason` ("stop", "length", "cancelled"), `ttft_s`
(call start → first token) and `decode_tokens_per_s` (tokens after the first ÷ the time they took).

**Seeds.** `seed=int` gives every row a generator seeded with that int (so a row equals the same prompt run alone
with the same seed); `seed=[...]` gives one seed per prompt; None draws from torch's global RNG.

**Streaming.** `stream(one prompt)` yields `str` pieces; `stream(several prompts)` yields `(index, str)` pairs,
interleaved in step order. Pieces of one prompt concatenate to its `text`. A Generator runs one call at a time
(it owns its engine); use one per thread, or share an Engine between threads.

"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, Union

import torch

from .constraint import Constraint
from .engine import Engine
from .request import Request
from .sampling import SamplingParams

Message = dict[str, Any]
Prompt = Union[str, list[Message], list[int]]
Prompts = Union[Prompt, list[Prompt]]
Cancel = Union[Callable[[], bool], Any, None]  # a callable, or anything with is_set() (threading.Event)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str                  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    rope_long: bool = False             # the LongRoPE regime chosen at admission
    cached_tokens: int = 0              # prompt tokens whose K/V came from the previous call (prefix cache)


@dataclass
class _Request:
    index: int
    ids: list[int]
    stop: list[str]
    seed: int | None


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(m, dict) for m in x)


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _cancel_fn(cancel: Cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if hasattr(cancel, "is_set"):
        return cancel.is_set
    if callable(cancel):
        return lambda: bool(cancel())
    raise TypeError(f"cancel must be a callable or have is_set() (threading.Event), got {type(cancel).__name__}")


def _constraint(json_schema: dict | None, constraint: Constraint | None) -> Constraint | None:
    if json_schema is not None and constraint is not None:
        raise ValueError("json_schema and constraint: give one (json_schema is Constraint('json_schema', ...))")
    return Constraint("json_schema", json_schema, "json_schema") if json_schema is not None else constraint


class Generator:
    """The generation loop over one model and its tokenizer, owning one KV cache: `generate` returns a
    GenerationResult per prompt, `stream` yields text pieces as they decode. One call runs at a time (a second,
    concurrent one is a RuntimeError: use one Generator per thread); the module docstring gives the loop, its policies and the results."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, prefill_chunk: int = 512,
                 lean_decode: bool = True, prefix_cache: bool = False, batch_invariant: bool = True) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.stop_ids = frozenset(int(i) for i in tokenizer.stop_ids)
        self.prefill_chunk = prefill_chunk
        self.lean_decode = lean_decode  # engine/serve/decode.py's DecodeStep (else model.forward) for one-token steps
        self._engine: Engine | None = None  # kept across calls while the row count matches and rows are long enough
        self.prefix_cache = prefix_cache  # opt-in: a one-prompt call reuses the previous call's leading K/V
        self.batch_invariant = batch_invariant  # Engine's: a prompt's output does not depend on its batch mates
        self.reused_tokens = 0            # how many prompt tokens the last call took from the cache
        self._busy = threading.Lock()     # one call at a time: the Generator owns one KV cache

    # ---- public API -----------------------------------------------------------------------------------------------
    def generate(self, prompts: Prompts, max_new_tokens: int = 256, temperature: float = 0.7,
                 top_k: int | None = None, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 seed: int | Sequence[int] | None = None, stop: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
                 cancel: Cancel = None, json_schema: dict | None = None,
                 constraint: Constraint | None = None) -> list[GenerationResult]:
        """One GenerationResult per prompt, in order. `prompts`: a string, a chat (list of messages), token ids,
        or a list of those. `stop`: strings for every prompt, or one list per prompt. `json_schema` (or any
        `constraint`, engine/serve/constraint.py): every output is held to it."""
        run = self._run(prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, cancel,
                        _constraint(json_schema, constraint))
        while True:
            try:
                with torch.inference_mode():
                    next(run)
            except StopIteration as done:
                return done.value

    def stream(self, prompts: Prompts, max_new_tokens: int = 256, temperature: float = 0.7,
               top_k: int | None = None, top_p: float = 1.0, repetition_penalty: float = 1.0,
               seed: int | Sequence[int] | None = None, stop: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
               cancel: Cancel = None, json_schema: dict | None = None,
               constraint: Constraint | None = None) -> Iterator[str] | Iterator[tuple[int, str]]:
        """Text pieces as they are decoded: `str` for one prompt, `(prompt index, str)` for several.
        The generator's return value (StopIteration.value) is the list of GenerationResults."""
        single = not self._is_batch(prompts)
        run = self._run(prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, cancel,
                        _constraint(json_schema, constraint))
        while True:
            try:
                # inference mode only while the loop runs: the caller's code between pieces (and a stream left
                # unfinished, or resumed from another thread) keeps its own grad mode
                with torch.inference_mode():
                    i, piece = next(run)
            except StopIteration as done:
                return done.value
            yield piece if single else (i, piece)

    # ---- admission ------------------------------------------------------------------------------------------------
    @staticmethod
    def _is_batch(prompts: Prompts) -> bool:
        if isinstance(prompts, str) or _is_messages(prompts) or _is_ids(prompts):
            return False
        return isinstance(prompts, (list, tuple))

    def _tokenize(self, prompt: Prompt, i: int) -> list[int]:
        if isinstance(prompt, (list, tuple)) and not prompt:
            ids = []
        elif isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif _is_messages(prompt):
            ids = list(self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
        elif _is_ids(prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt {i}: token id {bad[0]} outside the vocabulary [0, {self.config.vocab_size})")
        else:
            raise TypeError(f"prompt {i}: expected a string, a list of messages (dicts) or a list of token ids, "
                            f"got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"prompt {i}: empty (at least one token is needed to start generating)")
        return ids

    def _admit(self, prompts: Prompts, max_new_tokens: int, seed: Any, stop: Any) -> list[_Request]:
        items = list(prompts) if self._is_batch(prompts) else [prompts]
        if not items:
            raise ValueError("no prompts given")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        n = len(items)
        if seed is None or isinstance(seed, int):
            seeds = [seed] * n
        else:
            seeds = list(seed)
            if len(seeds) != n:
                raise ValueError(f"seed: {len(seeds)} seeds for {n} prompts")
        if stop is None or isinstance(stop, str):
            stops = [[stop] if stop else []] * n
        elif all(isinstance(s, str) for s in stop):
            stops = [list(stop)] * n
        else:
            stops = [[s] if isinstance(s, str) else list(s or []) for s in stop]
            if len(stops) != n:
                raise ValueError(f"stop: {len(stops)} stop lists for {n} prompts")
        context = self.config.max_position_embeddings
        reqs = []
        for i, p in enumerate(items):
            ids = self._tokenize(p, i)
            if len(ids) + max_new_tokens > context:
                raise ValueError(f"prompt {i}: {len(ids)} prompt tokens + max_new_tokens {max_new_tokens} = "
                                 f"{len(ids) + max_new_tokens} > the model's context of {context} tokens; "
                                 "shorten the prompt or lower max_new_tokens")
            reqs.append(_Request(i, ids, stops[i], seeds[i]))
        return reqs

    def _engine_for(self, rows: int, need: int, one: bool) -> Engine:
        """An engine with `rows` KV rows of at least `need` slots: the last call's when it fits (its rows keep
        their K/V for the prefix cache), else a new one."""
        e = self._engine
        if e is None or e.kv.rows != rows or e.kv.row_len < need or e.kv.cache.k.dtype != self.model.dtype:
            self._engine = e = None  # free the old cache before allocating
            slots = min(max(need, -(-need // 256) * 256), self.config.max_position_embeddings)
            e = self._engine = Engine(self.model, self.tokenizer, max_batch=rows, kv_tokens=rows * slots,
                                      prefill_chunk=self.prefill_chunk, lean_decode=self.lean_decode,
                                      batch_invariant=self.batch_invariant, start=False)
        e.prefill_chunk = self.prefill_chunk
        e.scheduler.prefix_reuse = self.prefix_cache and one
        if not one:
            e.forget_prefixes()
        return e

    # ---- the loop -------------------------------------------------------------------------------------------------
    def _run(self, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, cancel,
             constraint):
        """Yields (prompt index, text piece); returns the results. Validation happens before any compute."""
        if not self._busy.acquire(blocking=False):  # taken before admission, so two threads cannot both pass
            raise RuntimeError("this Generator is already running a call; use one Generator per thread")
        handles, live, engine = [], set(), None
        try:
            t0 = time.perf_counter()
            params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
            cancelled = _cancel_fn(cancel)
            reqs = self._admit(prompts, max_new_tokens, seed, stop)
            one = len(reqs) == 1
            engine = self._engine_for(len(reqs), max(len(r.ids) for r in reqs) + max_new_tokens, one)
            t_submit = time.perf_counter()
            # one constraint for all: the first submit compiles it (or refuses it) before any other is queued
            handles = [engine.submit(Request(r.ids, max_new_tokens, params, r.seed, tuple(r.stop),
                                             constraint=constraint)) for r in reqs]
            live = set(range(len(reqs)))
            while live:
                if cancelled():
                    for i in live:
                        handles[i].abort()
                engine.step()
                for i in sorted(live):
                    for d in handles[i].poll():
                        if d.text:
                            yield i, d.text
                    if handles[i].done:
                        live.discard(i)
            results = [h.result() for h in handles]
            if not one:
                engine.forget_prefixes()
        finally:
            if live:  # a stream closed early: its requests end now, freeing their rows
                for i in live:
                    handles[i].abort()
                engine.step()
            self._busy.release()
        self.reused_tokens = results[0].usage.cached_tokens if one else 0
        out = []
        for r in results:
            ttft = r.ttft_s + (t_submit - t0) if r.token_ids else 0.0
            decode_s = r.latency_s + (t_submit - t0) - ttft
            out.append(GenerationResult(
                text=r.text, token_ids=r.token_ids, finish_reason="cancelled" if r.finish_reason == "abort"
                else r.finish_reason, prompt_tokens=r.usage.prompt_tokens, ttft_s=ttft,
                decode_tokens_per_s=(len(r.token_ids) - 1) / decode_s if len(r.token_ids) > 1 and decode_s > 0 else 0.0,
                rope_long=r.rope_long, cached_tokens=r.usage.cached_tokens))
        return out
