"""KV memory for the serving engine: one static cache, a row (slot) per running request, each row its own length.

    kv = KVMemory(model, rows=16, row_len=2048)
    row, cached = kv.acquire(prompt_ids, reuse=True)   # None when every row is taken (the request waits)
    forward(..., cache=kv.view(row, rope_long))        # prefill a chunk into that row alone
    kv.release(row)                                    # the row is free for the next request at once

**Layout: slots per row** (llama.cpp's server), not pages with a block table (vLLM). The cache is the model's
KVCache, k/v (L, rows, nkv, row_len, hs); a request owns one row from admission to its end and writes slot t of its
row for its token t, so slot = position and attention reads a contiguous run of slots. That is what both decode
paths already read (engine/serve/decode.py's torch step, kernels/cpu/csrc/decode.c), and what `model.forward` prefills
through a one-row view; pages would add a gather (or a block-table walk in C) to every attention on CPU, for a benefit
that only shows when requests' lengths vary widely. The price is llama.cpp's: a row is sized for the longest request
it may hold, so `kv_tokens` = rows × row_len is reserved up front. Pages were not built or measured.

**Admission rule: reserve prompt + max_tokens.** A request is admitted only into a free row, and only if its
prompt + max_tokens fit the row (else it is refused at submit, engine/serve/engine.py), so a running request can never
outgrow its memory: there is no preemption and no recompute. When every row is taken, new requests wait in order.

**Prefix reuse across requests.** A freed row keeps its K/V and the tokens they belong to (`held`). `acquire`
gives a new request the free row whose held tokens share the longest prefix with its prompt (llama.cpp's slot
prompt similarity) and reports how many leading tokens it can skip: all of the common prefix but the prompt's
last token, which must run to give logits. A chat's next turn (the conversation so far + a new message) or requests
sharing a RAG system prompt so prefill only what is new. Reused K/V equal a fresh prefill's up to rounding (they
may have been written by decode steps or other chunking), which is why the engine lets callers turn it off.
K/V depend on the weights that wrote them, so a row is reused only by a request with the same `key` (the engine's
key names the LoRA adapter and the load of it: rows written through adapter A, or the base, never serve B).

Legend: L layers, nkv KV heads, hs head dim, S slots of a row.
"""
from __future__ import annotations

from torch import nn


class KVRow:
    """One row of the cache as `model.forward` takes a KVCache: k/v (L, 1, nkv, S, hs) views, pos (1, S), the row's
    own `length` and LongRoPE regime. Writes through it land in the shared cache."""

    def __init__(self, cache, row: int, length: int, rope_long: bool) -> None:
        self.k = cache.k[:, row:row + 1]                      # (L, 1, nkv, S, hs)
        self.v = cache.v[:, row:row + 1]                      # (L, 1, nkv, S, hs)
        self.pos = cache.pos[row:row + 1]                     # (1, S)
        self.max_len, self.length, self.rope_long, self.row = cache.max_len, length, rope_long, row


class KVMemory:
    """The cache's rows: which are free, how many slots each holds, and which tokens a row's K/V belong to."""

    def __init__(self, model: nn.Module, rows: int, row_len: int) -> None:
        if rows < 1 or row_len < 2:
            raise ValueError(f"KV memory needs at least one row of two slots, got {rows} rows of {row_len}")
        self.cache = model.new_cache(rows, row_len)
        self.rows, self.row_len = rows, row_len
        self.free: list[int] = list(range(rows))
        self.length = [0] * rows                  # slots written in each row (the running request's tokens so far)
        self.held: list[list[int]] = [[] for _ in range(rows)]  # token of each written slot, for prefix reuse
        self.key: list[object] = [None] * rows    # what wrote the row's K/V (the adapter); reuse needs the same
        self.prefilled = [0] * rows               # leading slots written by prefill chunks (the rest: decode steps)

    @property
    def used_tokens(self) -> int:
        free = set(self.free)
        return sum(n for r, n in enumerate(self.length) if r not in free)

    @property
    def total_tokens(self) -> int:
        return self.rows * self.row_len

    def acquire(self, prompt: list[int], reuse: bool, key: object = None,
                align: int | None = None) -> tuple[int, int] | None:
        """(row, cached) for a new request: a free row and how many leading prompt tokens it already holds (only
        rows written under the same `key` count); None when no row is free. `align` (batch-invariant prefill):
        reuse only slots a prefill wrote, and a multiple of `align` of them, so what is left to prefill runs in the
        very chunks a fresh prefill would run, and each reused slot holds what that chunk wrote."""
        if not self.free:
            return None
        best, cached = self.free[0], 0
        if reuse:
            for r in self.free:
                if self.key[r] != key:
                    continue
                n = _common_prefix(self.held[r], prompt, len(prompt) - 1)
                if align:
                    n = min(n, self.prefilled[r]) // align * align
                if n > cached:
                    best, cached = r, n
        self.free.remove(best)
        self.cache.pos[best, cached:] = -1        # what follows the reused prefix is empty for the new request
        self.length[best] = cached
        del self.held[best][cached:]
        self.key[best] = key
        self.prefilled[best] = min(cached, self.prefilled[best])
        return best, cached

    def release(self, row: int) -> None:
        if row not in self.free:
            self.free.append(row)

    def forget(self) -> None:
        """Drop every free row's held tokens: nothing is reused from before this call."""
        for r in self.free:
            self.held[r].clear()
            self.length[r] = self.prefilled[r] = 0

    def view(self, row: int, rope_long: bool) -> KVRow:
        return KVRow(self.cache, row, self.length[row], rope_long)

    def copy_row(self, src: int, dst: int) -> None:
        """Row dst takes row src's written slots (K, V, positions, tokens, key): one prefill for n choices."""
        n = self.length[src]
        self.cache.k[:, dst, :, :n] = self.cache.k[:, src, :, :n]                 # (L, nkv, n, hs)
        self.cache.v[:, dst, :, :n] = self.cache.v[:, src, :, :n]                 # (L, nkv, n, hs)
        self.cache.pos[dst] = self.cache.pos[src]                                 # (S,)
        self.length[dst], self.held[dst], self.key[dst] = n, list(self.held[src]), self.key[src]
        self.prefilled[dst] = self.prefilled[src]

    def wrote(self, row: int, tokens: list[int], prefill: bool = False) -> None:
        """Record that `tokens` went into the row's next slots (`prefill`: by a prefill chunk)."""
        if prefill and self.prefilled[row] == self.length[row]:
            self.prefilled[row] += len(tokens)
        self.length[row] += len(tokens)
        self.held[row].extend(tokens)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n, limit = 0, min(limit, len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n
