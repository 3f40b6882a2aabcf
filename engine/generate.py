"""The generation loop a service embeds: static KV cache, chunked prefill, sampling, streaming, stop rules, batches.

    gen = Generator(model, tokenizer)
    [r] = gen.generate("Once upon a time", max_new_tokens=64, temperature=0)      # r.text, r.token_ids, ...
    for piece in gen.stream([{"role": "user", "content": "Hi!"}]): print(piece, end="")

One call runs its prompts as one batch:

  1. **Admission.** Every prompt is tokenized (a chat goes through the model's chat template) and checked against the
     context: prompt + max_new_tokens > max_position_embeddings is a ValueError naming the prompt, before any
     compute. The LongRoPE regime is chosen here, per sequence, and never changes (below).
  2. **Prefill.** Prompts are left-padded to the longest one; pad tokens get position -1, which the model's mask
     treats as empty slots, so each row computes what it would alone (exactly in fp32; in bf16 up to rounding:
     padded rows take SDPA with a mask, a lone prompt the native attention, so a near-tie can flip). The prompt
     goes through the model in chunks of `prefill_chunk` tokens (bounded activation memory; cancellation is
     checked between chunks); only the last chunk goes through the lm_head, and only for its last position.
  3. **Decode.** One token per row per step into the next cache slot (engine/decode.py's step): sample
     (engine/sampling.py), detokenize (engine/detokenize.py), test the stop rules, check `cancel`, run the model on
     the (B, 1) new tokens. A row ends on any id of the full stop set (`tokenizer.stop_ids`: generation_config's
     EOS ids plus the end-of-turn token), on a stop string (text cut right before it), at max_new_tokens, or when
     cancelled. A finished row keeps riding along (its outputs are ignored) until every row is done: rows never
     move between slots.

**LongRoPE policy.** A longrope model (Phi-3-mini-128k, 3.5-mini, 4-mini) has two rotary tables: short factors
while the sequence fits `original_max_position_embeddings`, long factors beyond. transformers decides *per forward*
(from the largest position so far) and, the first time a sequence crosses the boundary, drops its KV cache and
re-prefills everything with the long table. Here the regime is decided once, at admission, from the largest
position the model can be run at, prompt_len + max_new_tokens − 2 (the last new token is sampled, never fed back):
long iff `prompt_len + max_new_tokens − 1 > original_max` (`rotary_emb.use_long`), the test transformers applies
at that last forward, so a request that cannot cross the boundary gets exactly transformers' short-table result.
The cache is then never recomputed (TTFT stays predictable and the cache static), at the price that a request
*allowed* to cross the boundary but stopping early was computed with the long table from its first token, where
transformers would have used the short one until the crossing. Prompts of one call that choose different regimes
run as separate sub-batches with separate caches (never mixed in one cache); each row's result is still what it
would be alone. Tests compare against transformers run with that same regime for the whole sequence.

**Sliding window** (mini-4k, 2047): the model masks keys older than the window. The cache here is linear (slot =
order in the sequence), sized prompt + max_new_tokens, which for a 4k model is at most 4096 slots.

**Prefix cache.** A one-prompt call keeps the cache and the tokens it holds; the next one-prompt call reuses the
K/V of its longest common prefix with them (all but its own last token, which must run to give logits) and
prefills only the rest. A chat's next turn repeats the conversation so far, so its TTFT shrinks to the new turn's
tokens. `cached_tokens` in the result says how many were reused. It is opt-in (`prefix_cache=True`; `phiforge
chat` turns it on): reused K/V are what the earlier call computed (by prefill or decode step, in other chunks),
equal to a fresh prefill's only up to rounding, so with it a call's tokens can depend on the calls before it (in
bf16 a near-tie can flip); off, the same inputs and seed give the same tokens whatever ran before. A batch call
starts from an empty cache.

**Results** (one per prompt, in order): `text` (special tokens skipped, cut before a stop string), `token_ids` (the
new tokens, including the stop id that ended the row), `finish_reason` ("stop", "length", "cancelled"), `ttft_s`
(call start → first token) and `decode_tokens_per_s` (tokens after the first ÷ the time they took).

**Seeds.** `seed=int` gives every row a generator seeded with that int (so a row equals the same prompt run alone
with the same seed); `seed=[...]` gives one seed per prompt; None draws from torch's global RNG.

**Streaming.** `stream(one prompt)` yields `str` pieces; `stream(several prompts)` yields `(index, str)` pairs,
interleaved in step order. Pieces of one prompt concatenate to its `text`. A Generator runs one call at a time
(it owns one KV cache); use one per thread.

Legend for shape comments: B batch rows, P padded prompt length, C prefill chunk, V vocabulary.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, Union

import torch

from .decode import DecodeStep
from .detokenize import IncrementalDetokenizer
from .sampling import SamplingParams, make_generators, sample

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
    detok: IncrementalDetokenizer = field(init=False, repr=False)
    out: list[int] = field(default_factory=list)
    finish: str | None = None
    cached: int = 0
    rope_long: bool = False  # the LongRoPE regime, chosen at admission
    t_first: float = 0.0
    t_last: float = 0.0


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(m, dict) for m in x)


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _last_position(r: _Request, max_new_tokens: int) -> int:
    """The largest position the model runs for this request: the last new token is sampled, never fed back."""
    return len(r.ids) + max_new_tokens - 2


def _cancel_fn(cancel: Cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if hasattr(cancel, "is_set"):
        return cancel.is_set
    if callable(cancel):
        return lambda: bool(cancel())
    raise TypeError(f"cancel must be a callable or have is_set() (threading.Event), got {type(cancel).__name__}")


class Generator:
    """The generation loop over one model and its tokenizer, owning one KV cache: `generate` returns a
    GenerationResult per prompt, `stream` yields text pieces as they decode. One call runs at a time (a second,
    concurrent one is a RuntimeError: use one Generator per thread); the module docstring gives the loop, its policies and the results."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, prefill_chunk: int = 512,
                 lean_decode: bool = True, prefix_cache: bool = False) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.stop_ids = frozenset(int(i) for i in tokenizer.stop_ids)
        self.prefill_chunk = prefill_chunk
        self.lean_decode = lean_decode  # engine/decode.py's DecodeStep (else model.forward) for one-token steps
        self._cache = None     # reused across calls while batch size and regime match and it is long enough
        self.prefix_cache = prefix_cache  # opt-in: a one-prompt call reuses the previous call's leading K/V
        self._cached_ids: list[int] = []  # the tokens whose K/V the cache holds, slot by slot (one-prompt calls)
        self.reused_tokens = 0            # how many prompt tokens the last call took from the cache
        self._busy = threading.Lock()     # one call at a time: the Generator owns one KV cache

    # ---- public API -----------------------------------------------------------------------------------------------
    def generate(self, prompts: Prompts, max_new_tokens: int = 256, temperature: float = 0.7,
                 top_k: int | None = None, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 seed: int | Sequence[int] | None = None, stop: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
                 cancel: Cancel = None) -> list[GenerationResult]:
        """One GenerationResult per prompt, in order. `prompts`: a string, a chat (list of messages), token ids,
        or a list of those. `stop`: strings for every prompt, or one list per prompt."""
        run = self._run(prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, cancel)
        while True:
            try:
                with torch.inference_mode():
                    next(run)
            except StopIteration as done:
                return done.value

    def stream(self, prompts: Prompts, max_new_tokens: int = 256, temperature: float = 0.7,
               top_k: int | None = None, top_p: float = 1.0, repetition_penalty: float = 1.0,
               seed: int | Sequence[int] | None = None, stop: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
               cancel: Cancel = None) -> Iterator[str] | Iterator[tuple[int, str]]:
        """Text pieces as they are decoded: `str` for one prompt, `(prompt index, str)` for several.
        The generator's return value (StopIteration.value) is the list of GenerationResults."""
        single = not self._is_batch(prompts)
        run = self._run(prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, cancel)
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

    def _new_cache(self, batch: int, need: int, rope_long: bool, ids: list[int] | None = None):
        """(cache, reused): a cache for `batch` rows and `need` slots, and how many leading tokens of `ids` (a
        one-prompt call) it already holds from the previous call: the prompt's longest common prefix with the
        tokens cached then, less its last token (which must run to give logits). A chat's next turn repeats the
        whole conversation, so its prefill shrinks to the new turn."""
        c, reuse = self._cache, 0
        if (c is not None and c.k.shape[1] == batch and c.max_len >= need and c.rope_long == rope_long
                and c.k.dtype == self.model.dtype):
            if ids is not None and self.prefix_cache:
                held, limit = self._cached_ids, min(len(ids) - 1, len(self._cached_ids))
                while reuse < limit and held[reuse] == ids[reuse]:
                    reuse += 1
            c.pos[:, reuse:] = -1  # slots past the reused prefix hold nothing (the next writes overwrite them)
            c.length = reuse
        else:
            self._cache = None  # free the old one before allocating
            slots = min(max(need, -(-need // 256) * 256), self.config.max_position_embeddings)
            self._cache = c = self.model.new_cache(batch, slots, rope_long=rope_long)
        self._cached_ids = self._cached_ids[:reuse]
        return c, reuse

    # ---- the loop -------------------------------------------------------------------------------------------------
    def _run(self, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, cancel):
        """Yields (prompt index, text piece); returns the results. Validation happens before any compute."""
        if not self._busy.acquire(blocking=False):  # taken before admission, so two threads cannot both pass
            raise RuntimeError("this Generator is already running a call; use one Generator per thread")
        try:
            t0 = time.perf_counter()
            params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
            cancelled = _cancel_fn(cancel)
            reqs = self._admit(prompts, max_new_tokens, seed, stop)
            rope = self.model.rotary_emb
            groups: dict[bool, list[_Request]] = {}
            for r in reqs:
                r.rope_long = rope.use_long(_last_position(r, max_new_tokens))
                groups.setdefault(r.rope_long, []).append(r)
            for rope_long, group in groups.items():  # only a one-prompt call tracks (and reuses) its cache
                yield from self._run_group(group, max_new_tokens, params, rope_long, cancelled, len(reqs) == 1)
        finally:
            self._busy.release()
        return [GenerationResult(
            text=r.detok.text, token_ids=r.out, finish_reason=r.finish or "cancelled", prompt_tokens=len(r.ids),
            ttft_s=(r.t_first - t0) if r.out else 0.0,
            decode_tokens_per_s=(len(r.out) - 1) / (r.t_last - r.t_first) if r.t_last > r.t_first else 0.0,
            rope_long=r.rope_long, cached_tokens=r.cached) for r in reqs]

    def _run_group(self, reqs: list[_Request], max_new: int, params: SamplingParams, rope_long: bool,
                   cancelled: Callable[[], bool], one: bool) -> Iterator[tuple[int, str]]:
        model, B = self.model, len(reqs)
        P = max(len(r.ids) for r in reqs)
        ids = torch.zeros(B, P, dtype=torch.long)                     # (B, P) left-padded with id 0 (masked out)
        pos = torch.full((B, P), -1, dtype=torch.long)                 # (B, P) -1 marks pad tokens
        for b, r in enumerate(reqs):
            n = len(r.ids)
            ids[b, P - n:] = torch.tensor(r.ids)
            pos[b, P - n:] = torch.arange(n)
            r.detok = IncrementalDetokenizer(self.tokenizer, r.stop)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(B, self.config.vocab_size, dtype=torch.bool)  # (B, V)
            for b, r in enumerate(reqs):
                seen[b, r.ids] = True
        gens = make_generators([r.seed for r in reqs])
        cache, start = self._new_cache(B, P + max_new, rope_long, reqs[0].ids if one else None)
        reqs[0].cached = start
        self.reused_tokens = start if one else 0

        # Prefill in chunks, from the first token the cache does not hold; only the last chunk's last position
        # needs logits.
        C = self.prefill_chunk
        for s in range(start, P, C):
            if cancelled():
                return
            last = s + C >= P
            out = model(ids[:, s:s + C], position_ids=pos[:, s:s + C], cache=cache, num_logits=1,
                        return_hidden=not last)
            if one:
                self._cached_ids = reqs[0].ids[:s + C]
        logits = out[:, -1]                                            # (B, V)

        next_pos = pos[:, -1] + 1                                      # (B,) position of the next token
        if self.lean_decode:
            decode = DecodeStep(model, cache)
        else:
            def decode(tokens, positions):
                return model(tokens[:, None], position_ids=positions[:, None], cache=cache)[:, -1]
        active = list(range(B))
        for step in range(max_new):
            tokens = sample(logits, params, gens, seen)               # (B,)
            now = time.perf_counter()
            toks = tokens.tolist()
            for b in list(active):
                r, t = reqs[b], toks[b]
                if not r.out:
                    r.t_first = now
                r.out.append(t)
                r.t_last = now
                if t in self.stop_ids:
                    r.finish, piece = "stop", r.detok.finish()
                else:
                    piece = r.detok.push(t)
                    if r.detok.stopped:
                        r.finish = "stop"
                    elif len(r.out) == max_new:
                        r.finish, piece = "length", piece + r.detok.finish()
                if r.finish:
                    active.remove(b)
                if piece:
                    yield r.index, piece
            if not active:
                return
            if cancelled():
                break
            if seen is not None:
                seen[torch.arange(B), tokens] = True
            logits = decode(tokens, next_pos)                         # (B, V)
            next_pos += 1
            if one:
                self._cached_ids.append(toks[0])
        for b in active:  # cancelled: release what was held back, as the text so far
            r = reqs[b]
            r.finish = "cancelled"
            piece = r.detok.finish()
            if piece:
                yield r.index, piece
