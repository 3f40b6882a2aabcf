"""Iteration-level scheduling: what each engine step computes (Orca's iterations, Sarathi's chunked prefill).

Every step, in this order:
  1. **Aborts** leave at once: a waiting request is dropped, a running one ends ("abort") and its row is freed.
  2. **Admission**, first come first served: while a KV row is free (engine/serve/kv_memory.py), the oldest waiting
     request takes one (the free row sharing the longest prefix with its prompt, among rows written under the same
     adapter: `Sequence.kv_key`), with its LongRoPE regime fixed from the largest position it may run at (below).
  3. **Work**: every running request whose prompt is in the cache decodes one token; every request still
     prefilling gets its next prompt chunk of up to `prefill_chunk` tokens, oldest first, while the step's
     `step_tokens` prompt budget lasts. Decodes and chunks share the step, so a long prompt arriving delays the
     running streams by one chunk per step, never by the whole prompt.
     Why a chunk per request rather than one chunk per step in all: requests that arrive together (a burst, the
     refill after a batch finished together) are prefilled together, each getting its first token in the same
     step, and then stream without stalling one another. With one chunk per step in all, the first of them to
     finish its prompt starts streaming and is stalled again by every chunk of the others, so a burst of n prompts
     stalls the early streams n times (vLLM V1 splits the same two budgets: `long_prefill_token_threshold` per
     request, `max_num_batched_tokens` per step).
  4. After the model ran: each request with logits samples a token and tests its stop rules; one that ends
     frees its row, which the next step's admission hands to the next waiting request.

Batch-invariant (`invariant`, the engine's default): a chunk is always `chunk` tokens (or the prompt's rest), never
cut to what the step's budget has left (the request waits a step), and admission reuses only whole chunks of a
prefill-written prefix (KVMemory.acquire's `align`), so a prompt runs the same chunks however busy the engine is.

The engine (engine/serve/engine.py) runs the model and sampling; this module holds the queues and decides.

**LongRoPE policy.** A longrope model (Phi-3-mini-128k, 3.5-mini, 4-mini) has two rotary tables: short factors
while the sequence fits `original_max_position_embeddings`, long factors beyond. transformers decides *per forward*
(from the largest position so far) and, the first time a sequence crosses the boundary, drops its KV cache and
re-prefills everything with the long table. Here the regime is decided once, at admission (`admit`), from the
largest position the model can be run at, prompt_len + max_tokens − 2 (the last new token is sampled, never fed
back): long iff `prompt_len + max_tokens − 1 > original_max` (`rotary_emb.use_long`), the test transformers
applies at that last forward, so a request that cannot cross the boundary gets exactly transformers' short-table
result. The cache is then never recomputed (TTFT stays predictable and the cache static), at the price that a
request *allowed* to cross the boundary but stopping early was computed with the long table from its first token,
where transformers would have used the short one until the crossing. Rows of both regimes share the cache; the
engine runs one decode call per regime, each with its own cos/sin table.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from .detokenize import IncrementalDetokenizer
from .kv_memory import KVMemory
from .request import Handle, Request


@dataclass(eq=False)
class Sequence:
    """A request's state inside the engine (compared by identity: queues hold the very object)."""
    req: Request
    handle: Handle
    stop_ids: frozenset[int]
    detok: IncrementalDetokenizer
    t_submit: float
    rope_long: bool = False
    slot: int = -1                   # its adapter's slot in the engine's AdapterSet (-1: the base model)
    kv_key: object = None            # its adapter's load (None: base): prefix reuse only among equal keys
    row: int = -1
    cached: int = 0                  # prompt tokens whose K/V were reused
    computed: int = 0                # prompt tokens in the cache so far
    out: list[int] = field(default_factory=list)
    finish: str | None = None
    t_first: float = 0.0
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None     # (V,) bool: prompt + output tokens, for the repetition penalty
    counts: torch.Tensor | None = None   # (V,) output token counts, for presence/frequency penalties
    matcher: Any = None                  # its constraint's place in the grammar (constraint.Matcher); None: free
    logprobs: list = field(default_factory=list)   # request.TokenLogprob of each output token (Request.logprobs)
    forks: list["Sequence"] = field(default_factory=list)   # the other choices of an n > 1 request (on choice 0)
    fork_of: "Sequence | None" = None    # choice 0, whose prefill this choice copies (engine.submit_choices)

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.req.prompt_ids)


@dataclass
class Plan:
    """One step's work: prompt chunks (sequence, start, length) and the sequences that decode one token."""
    chunks: list[tuple[Sequence, int, int]]
    decodes: list[Sequence]


class Scheduler:
    def __init__(self, kv: KVMemory, prefill_chunk: int, step_tokens: int, use_long, invariant: bool = False) -> None:
        self.kv, self.prefill_chunk, self.step_tokens, self.use_long = kv, prefill_chunk, step_tokens, use_long
        self.invariant = invariant
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []       # in admission order
        self.prefix_reuse = True

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def find(self, request_id: str) -> Sequence | None:
        for s in (*self.running, *self.waiting):
            if s.req.id == request_id:
                return s
        return None

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues, freeing its row at once."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
            self.kv.release(seq.row)

    def admit(self) -> list[Sequence]:
        """The choices of one request are admitted together or not at all, so they share choice 0's prefill."""
        admitted = []
        while self.waiting and self.kv.free:
            forks = [f for f in self.waiting[0].forks if f in self.waiting]
            if len(self.kv.free) < 1 + len(forks):
                break
            for seq in [self.waiting[0], *forks]:
                self.waiting.remove(seq)
                self._run(seq)
                admitted.append(seq)
        return admitted

    def _run(self, seq: Sequence) -> None:
        prompt = seq.req.prompt_ids
        # the largest position it may run at: the last new token is sampled, never fed back
        seq.rope_long = self.use_long(len(prompt) + seq.req.max_tokens - 2)
        seq.row, seq.cached = self.kv.acquire(prompt, self.prefix_reuse and seq.fork_of is None, seq.kv_key,
                                              self.chunk if self.invariant else None)
        seq.computed = seq.cached
        self.running.append(seq)

    def plan(self) -> Plan:
        chunks, budget, decodes = [], self.step_tokens, []
        for seq in self.running:
            if seq.prefilling:
                if seq.fork_of is not None and seq.fork_of in self.running and seq.fork_of.prefilling:
                    continue  # its K/V will be copied from choice 0's (a choice 0 that left: it prefills itself)
                n = min(self.chunk, len(seq.req.prompt_ids) - seq.computed)
                if n > budget:  # batch-invariant: a whole chunk next step, never a cut one that depends on load
                    n = 0 if self.invariant else budget
                if n > 0:
                    chunks.append((seq, seq.computed, n))
                    budget -= n
            elif seq.out:
                decodes.append(seq)
        return Plan(chunks, decodes)

    @property
    def chunk(self) -> int:
        """A request's prompt chunk: a batch-invariant prefill runs exactly these, from position 0."""
        return min(self.prefill_chunk, self.step_tokens) if self.invariant else self.prefill_chunk

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting


def now() -> float:
    return time.perf_counter()
