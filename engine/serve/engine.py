"""The serving engine: one model, one scheduler thread, many concurrent requests (continuous batching).

    engine = Engine(model, tokenizer, max_batch=16, kv_tokens=16 * 2048)
    h = engine.submit(Request(prompt_ids=ids, max_tokens=64))   # from any thread; `async for d in h` from asyncio
    print(h.result().text)
    engine.shutdown(drain=True)

Each `step()` (engine/serve/scheduler.py gives the order) decodes one token for every running request in one call of
engine/serve/decode.py's step over their KV rows, each row at its own length (native C for dense/NF4 models, torch for
the rest), prefills prompt chunks of newly admitted requests through `model.forward` on their own rows (a chunk
per request within a per-step token budget), samples every request with its own parameters and seeded
generator, applies its stop rules, and streams a Delta to its Handle. A request that ends (stop id, stop string,
length, abort) frees its row at once; the next step admits the next waiting one. KV memory and the admission rule
(reserve prompt + max_tokens: no request ever outgrows its row, no preemption) are in engine/serve/kv_memory.py.

**What a request's output depends on: only on itself** (`batch_invariant`, on by default). Rows never see each
other (each attends its own row), every request draws from its own generator, and its prompt is prefilled alone, in
chunks of `prefill_chunk` tokens counted from position 0. What could still tie a row's numbers to the rest of the
step is fixed: the native decode step sums every row with the same kernel whatever the row count (csrc/decode.c's
gemv: one FMA chain per output, NF4's tile GEMM), a step never hands it more rows than it takes (the torch step
would sum otherwise), a prompt chunk is never cut short by the step's token budget (it waits a step instead), and
prefix reuse takes only whole chunks that a prefill wrote (decode-written K/V, and a cut chunk, differ in their last
bits from a fresh prefill's), so what is left runs in the very chunks a cold prefill would. A request's logits are
then bitwise the same alone, in any batch (adapter rows included), warm or cold
(tests/engine/serve/test_batch_invariance.py), in fp32, bf16 and NF4. Not covered: the torch decode step (no native library, fp16, a single-adapter LoRALinear model), and
a different `prefill_chunk` (another chunking is another sum). `batch_invariant=False` gives back token-granular
prefix reuse and the two-chain GEMV.

**LongRoPE.** A request's regime is fixed at admission (engine/serve/scheduler.py's rule). Rows of both regimes
share the cache but never a step call: decodes run one call per regime, each with its own cos/sin table.

**Adapters** (engine/serve/multi_lora.py). `Engine(model, tok, adapters={"name": dir}, max_adapters=8)` wraps the
model's projections once, at start, in an AdapterSet; a request names one in `Request.adapter` (None: the base). Every
prefill chunk runs inside `rows([its slot])`, every decode call inside `rows(slots of its rows)`, so rows of
different adapters and of none share a step, natively where the base model runs natively (the decode step adds
each row's adapter delta itself). The base must be the one the adapters were
trained on: QLoRA adapters (training_args.json) get an NF4 base (a dense model is quantized in place at start),
LoRA ones the dense base; a set mixing both is refused. `load_adapter`/`unload_adapter` run on the scheduler thread
between steps (the caller waits for it). **Unloading an adapter that a running, waiting or just-submitted request
uses is refused** (AdapterBusy naming it and a request), never deferred: the caller decides whether to abort those
requests or retry later, and a request never finds its adapter gone. Prefix reuse only joins requests of the same
adapter load (K/V depend on the weights that wrote them).

**Threads.** `submit`, `abort`, `stats`, `shutdown` and the adapter calls are thread-safe; only the scheduler
thread touches the model, the cache and the queues. `Engine(start=False)` runs no thread: the caller drives
`step()` itself (engine/serve/generate.py's Generator does, to check its cancel callback between steps). Starting the
scheduler thread gives back the constructing thread's OpenMP pool (kernels/cpu/omp_pool.py): beside the scheduler
thread's own, it would make more OpenMP threads than cores, and libgomp then sleeps at every barrier of every step.
A caller that runs parallel torch work of its own while the engine serves makes a pool again, with the same effect
for that time.
"""
from __future__ import annotations

import itertools
import logging
import threading
from contextlib import nullcontext
from dataclasses import replace
from typing import Any, Callable

import torch

from phiforge.kernels.cpu import omp_pool

from .constraint import Constraint, ConstraintError, Grammars, Matcher
from .decode import DecodeStep
from .detokenize import IncrementalDetokenizer
from .kv_memory import KVMemory
from .multi_lora import serving_adapters
from .request import (AdapterBusy, Delta, EngineError, EngineStopped, Handle, InvalidRequest, QueueFull, Request, Result, UnknownAdapter, Usage)
from .sampling import choice_seed, make_generators, sample, token_logprob
from .scheduler import Scheduler, Sequence, now

DEFAULT_ROW_TOKENS = 2048   # a row's slots when kv_tokens is not given (capped by the model's context)
log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_batch: int = 16, kv_tokens: int | None = None,
                 prefill_chunk: int = 256, step_tokens: int = 4096, max_queue: int = 256,
                 max_adapters: int | None = None, adapters: dict[str, str] | None = None, prefix_cache: bool = True,
                 lean_decode: bool = True, batch_invariant: bool = True, start: bool = True) -> None:
        """prefill_chunk: prompt tokens a request prefills per step; step_tokens: prompt tokens per step in all
        (engine/serve/scheduler.py says why two budgets); max_adapters: adapter slots (None:
        multi_lora.DEFAULT_MAX_ADAPTERS when `adapters` are given, else none; 0: none, and the model is left as it is);
        adapters: name -> PEFT directory, loaded at start; batch_invariant: a request's logits do not depend on what
        else runs (module docstring), at the price of engine/serve/scheduler.py's rules for it."""
        cfg = model.config
        for name, v in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk), ("step_tokens", step_tokens),
                        ("max_queue", max_queue)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        row_len = (kv_tokens // max_batch if kv_tokens is not None
                   else min(DEFAULT_ROW_TOKENS, cfg.max_position_embeddings))
        if row_len < 2:
            raise ValueError(f"kv_tokens {kv_tokens} gives {max_batch} rows of {row_len} slots; need >= 2 each")
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, cfg
        self.stop_ids = frozenset(int(i) for i in tokenizer.stop_ids)
        self.kv = KVMemory(model, max_batch, min(row_len, cfg.max_position_embeddings))
        self.scheduler = Scheduler(self.kv, prefill_chunk, step_tokens, model.rotary_emb.use_long, batch_invariant)
        self.scheduler.prefix_reuse = prefix_cache
        self.batch_invariant = batch_invariant
        self.adapter_set = serving_adapters(model, dict(adapters or {}), max_adapters)
        self.max_adapters = 0 if self.adapter_set is None else self.adapter_set.max_adapters
        self._loads = itertools.count()
        self._adapter_keys = {n: next(self._loads) for n in self.adapters()}  # prefix reuse key per load
        self.max_queue, self.lean_decode = max_queue, lean_decode
        self._decode: dict[bool, DecodeStep] = {}   # LongRoPE -> step
        self._ops: list[tuple[Callable[[], None], threading.Event, list]] = []  # adapter calls for the loop
        self._exited = False
        self._lock = threading.Condition()
        self._inbox: list[Sequence] = []
        self._aborts: set[str] = set()
        self._queued = 0                       # waiting requests as of the last step (read by submit)
        self._stopped, self._drain = False, True
        self._grammars: Grammars | None = None   # built on the first constrained request
        self._grammars_lock = threading.Lock()
        self._stats = dict(prompt_tokens_total=0, generation_tokens_total=0, aborted_total=0, rejected_total=0,
                           failed_total=0, cached_tokens_total=0)
        self._thread = None
        if start:
            omp_pool.release()  # this thread's pool (from loading the model) would make the engine's barriers sleep
            self._thread = threading.Thread(target=self._loop, name="phiforge-engine", daemon=True)
            self._thread.start()

    # ---- the public API (any thread) --------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    @property
    def prefill_chunk(self) -> int:
        return self.scheduler.prefill_chunk

    @prefill_chunk.setter
    def prefill_chunk(self, n: int) -> None:
        self.scheduler.prefill_chunk = n

    def submit(self, request: Request) -> Handle:
        return self.submit_choices(request, 1)[0]

    def submit_choices(self, request: Request, n: int) -> list[Handle]:
        """n completions of one request (OpenAI's `n`), admitted together: the first choice prefills the prompt, the
        others copy its K/V rows and sample its last logits, each from its own generator (choice i > 0 of a seeded
        request draws from `choice_seed(seed, i)`) and with its own matcher. Choice i's id is `{id}-{i}` (n > 1)."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or n > self.kv.rows:
            raise InvalidRequest(f"n must be an int in [1, {self.kv.rows}] (the engine's rows), got {n!r}", "n")
        request.check(self.config.vocab_size, self.max_context, self.kv.row_len)
        reqs = [request] if n == 1 else [
            replace(request, id=f"{request.id}-{i}", seed=choice_seed(request.seed, i)) for i in range(n)]
        seqs = []
        for r in reqs:
            seq = Sequence(req=r, handle=Handle(r.id, self.abort),
                           stop_ids=self.stop_ids if r.stop_token_ids is None else frozenset(r.stop_token_ids),
                           detok=IncrementalDetokenizer(self.tokenizer, r.stop), t_submit=now())
            if r.constraint is not None:  # compiled here, on the caller's thread: a new grammar never stalls a step
                seq.matcher = self.check_constraint(r.constraint)
            seqs.append(seq)
        for seq in seqs[1:]:
            seq.fork_of = seqs[0]
        seqs[0].forks = seqs[1:]
        with self._lock:  # with unload_adapter's check: an adapter is never unloaded under a request it admitted
            if self._stopped:
                raise EngineStopped("the engine is shut down", None)
            if request.adapter is not None:
                if self.adapter_set is None or request.adapter not in self.adapter_set:
                    raise UnknownAdapter(f"adapter {request.adapter!r} is not loaded (loaded: "
                                         f"{', '.join(self.adapters()) or 'none'})", "adapter")
                for seq in seqs:
                    seq.slot = self.adapter_set.slot(request.adapter)
                    seq.kv_key = self._adapter_keys[request.adapter]
            if len(self._inbox) + self._queued >= self.max_queue:
                self._stats["rejected_total"] += 1
                raise QueueFull(f"{self.max_queue} requests are already waiting (max_queue)", None)
            self._inbox.extend(seqs)
            self._lock.notify_all()
        return [seq.handle for seq in seqs]

    def check_constraint(self, constraint: Constraint) -> Matcher:
        """A fresh matcher of the constraint (its grammar cached for later requests), or InvalidRequest naming its
        field."""
        try:
            return self._grammar_set().matcher(constraint)
        except ConstraintError as e:
            raise InvalidRequest(str(e), e.field) from None

    def _grammar_set(self) -> Grammars:
        """The grammar machinery, built on the first constrained request (reading the tokenizer takes a moment)."""
        with self._grammars_lock:  # not the engine's lock: the scheduler thread steps on meanwhile
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.config.vocab_size)
            return self._grammars

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)
            self._lock.notify_all()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; drain: finish the running and waiting ones first, else abort them; then stop."""
        with self._lock:
            self._stopped, self._drain = True, drain
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict:
        with self._lock:
            s = self.scheduler
            return dict(self._stats, running=len(s.running), waiting=self._queued + len(self._inbox),
                        kv_used_tokens=self.kv.used_tokens, kv_total_tokens=self.kv.total_tokens)

    def load_adapter(self, name: str, path: str) -> None:
        """Read the PEFT directory into a free slot, between steps. AdapterError: bad directory, base mismatch, no
        free slot, name taken; EngineError: the engine was started without adapter slots."""
        def load() -> None:
            if self.adapter_set is None:
                raise EngineError(f"adapter {name!r}: this engine has no adapter slots (start it with max_adapters "
                                  f"> 0 or with adapters)", "adapter")
            self.adapter_set.load(name, path)
            self._adapter_keys[name] = next(self._loads)
        self._between_steps(load)

    def unload_adapter(self, name: str) -> None:
        """Free the adapter's slot, between steps. UnknownAdapter: not loaded; AdapterBusy: a request uses it."""
        def unload() -> None:
            if self.adapter_set is None or name not in self.adapter_set:
                raise UnknownAdapter(f"adapter {name!r} is not loaded", "adapter")
            with self._lock:
                users = [q.req.id for q in (*self._inbox, *self.scheduler.running, *self.scheduler.waiting)
                         if q.req.adapter == name]
                if users:
                    raise AdapterBusy(f"adapter {name!r} is in use by {len(users)} request(s) (e.g. {users[0]}): "
                                      f"unload it when they finish, or abort them first", "adapter")
                self.adapter_set.unload(name)
                del self._adapter_keys[name]
        self._between_steps(unload)

    def adapters(self) -> list[str]:
        return [] if self.adapter_set is None else self.adapter_set.names()

    def _between_steps(self, fn: Callable[[], None]) -> None:
        """Run fn on the scheduler thread between two steps and wait for it (inline when no loop runs: the caller
        drives step() itself, or the loop has ended), re-raising its error here."""
        done, box = threading.Event(), []
        with self._lock:
            inline = self._thread is None or self._exited
            if not inline:
                self._ops.append((fn, done, box))
                self._lock.notify_all()
        if inline:
            return fn()
        done.wait()
        if box:
            raise box[0]

    def _run_ops(self, ops) -> None:
        for fn, done, box in ops:
            try:
                fn()
            except Exception as e:  # the caller's error, raised in its thread
                box.append(e)
            done.set()

    # ---- the scheduler thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._inbox or self._aborts or self._ops or not self.scheduler.idle
                                    or self._stopped)
                if self._stopped and not self._drain:
                    self._aborts.update(s.req.id for s in (*self._inbox, *self.scheduler.running,
                                                           *self.scheduler.waiting))
                if self._stopped and not self._inbox and not self._aborts and not self._ops and self.scheduler.idle:
                    self._exited = True  # adapter calls from now on run inline
                    return
            try:
                self.step()
            except Exception as e:  # a failing step must not leave callers waiting forever
                log.exception("engine step failed; ending its requests with the error")
                self._fail_all(e)

    def _fail_all(self, error: Exception) -> None:
        """Every running and waiting request ends with finish_reason "error" and the error's text, so a caller
        tells a failed step from its own abort."""
        s = self.scheduler
        self._stats["failed_total"] += len(s.running) + len(s.waiting)
        for seq in [*s.running, *s.waiting]:
            s.remove(seq)
            self._finish(seq, "error", f"{type(error).__name__}: {error}")

    # ---- one iteration ----------------------------------------------------------------------------------------
    def step(self) -> None:
        """Aborts, admission, one prompt-chunk budget and one decode token per running request (module docstring)."""
        s = self.scheduler
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
            ops, self._ops = self._ops, []
        for seq in inbox:
            s.add(seq)
        for rid in aborts:
            seq = s.find(rid)
            if seq is not None:
                s.remove(seq)
                self._finish(seq, "abort")
        self._run_ops(ops)  # after the aborts: an adapter whose requests were just aborted can go
        for seq in s.admit():
            self._start(seq)
        plan = s.plan()
        with torch.inference_mode():
            ready = self._prefill(plan.chunks)
            ready += self._decode_all(plan.decodes)
            for seq, logits in ready:
                self._emit(seq, logits)
        with self._lock:
            self._queued = len(s.waiting)

    def _start(self, seq: Sequence) -> None:
        p, V = seq.req.sampling, self.config.vocab_size
        seq.generator = make_generators([seq.req.seed])[0]
        if p.repetition_penalty != 1.0:
            seq.seen = torch.zeros(V, dtype=torch.bool)                               # (V,)
            seq.seen[seq.req.prompt_ids] = True
        if p.presence_penalty or p.frequency_penalty:
            seq.counts = torch.zeros(V)                                                # (V,)
        self._stats["prompt_tokens_total"] += len(seq.req.prompt_ids)
        self._stats["cached_tokens_total"] += seq.cached

    def _prefill(self, chunks) -> list[tuple[Sequence, torch.Tensor]]:
        ready = []
        for seq, start, n in chunks:
            ids = seq.req.prompt_ids[start:start + n]
            last = start + n == len(seq.req.prompt_ids)
            with self._rows([seq.slot]):
                out = self.model(torch.tensor([ids]), position_ids=torch.arange(start, start + n)[None],
                                 cache=self.kv.view(seq.row, seq.rope_long), num_logits=1,
                                 return_hidden=not last)
            self.kv.wrote(seq.row, ids, prefill=True)
            seq.computed += n
            if last:
                ready.append((seq, out[0, -1]))                                       # (V,)
                for fork in seq.forks:  # the other choices: the same K/V, the same last logits
                    if fork.fork_of is seq and fork in self.scheduler.running and fork.prefilling:
                        self.kv.copy_row(seq.row, fork.row)
                        fork.computed = len(fork.req.prompt_ids)
                        ready.append((fork, out[0, -1]))
        return ready

    def _decode_all(self, seqs: list[Sequence]) -> list[tuple[Sequence, torch.Tensor]]:
        ready = []
        for long in (False, True):  # never two LongRoPE regimes in one call
            group = [q for q in seqs if q.rope_long == long]
            if not group:
                continue
            if not self.lean_decode:  # model.forward, one row at a time (any model that takes a cache)
                for q in group:
                    ready += self._decode_call(None, [q], long)
                continue
            step = self._decode.get(long)
            if step is None:
                step = self._decode[long] = DecodeStep(self.model, self.kv.cache, rope_long=long,
                                                       batch_invariant=self.batch_invariant)
            # batch-invariant: never more rows a call than the native step takes (the torch step's sums differ)
            size = step.native.max_rows if self.batch_invariant and step.native is not None else len(group)
            for i in range(0, len(group), size):
                ready += self._decode_call(step, group[i:i + size], long)
        return ready

    def _decode_call(self, step: DecodeStep | None, group: list[Sequence],
                     long: bool) -> list[tuple[Sequence, torch.Tensor]]:
        tokens = torch.tensor([q.out[-1] for q in group])                              # (B,)
        slots = torch.tensor([self.kv.length[q.row] for q in group])                   # (B,) slot = position
        lora = torch.tensor([q.slot for q in group])                                   # (B,) adapter slots
        with self._rows(lora):
            if step is not None:
                logits = step(tokens, slots, torch.tensor([q.row for q in group]), slots)   # (B, V)
            else:
                logits = self.model(tokens[:, None], position_ids=slots[:, None],
                                    cache=self.kv.view(group[0].row, long))[:, -1]  # (1, V)
        for b, q in enumerate(group):
            self.kv.wrote(q.row, [q.out[-1]])
        return [(q, logits[b]) for b, q in enumerate(group)]

    def _rows(self, slots):
        return nullcontext() if self.adapter_set is None else self.adapter_set.rows(torch.as_tensor(slots))

    def _emit(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Sample the next token, apply the stop rules, stream the Delta; finish the request if it ended."""
        r = seq.req
        if seq.matcher is not None:  # this row's logits only, on a copy: what its grammar forbids cannot be drawn
            logits = seq.matcher.mask_(logits.to(torch.float32, copy=True))
        t = int(sample(logits[None], r.sampling, [seq.generator], None if seq.seen is None else seq.seen[None],
                       None if seq.counts is None else seq.counts[None])[0])
        if seq.matcher is not None:
            seq.matcher.advance(t)
        if not seq.out:
            seq.t_first = now()
        seq.out.append(t)
        self._stats["generation_tokens_total"] += 1
        if seq.seen is not None:
            seq.seen[t] = True
        if seq.counts is not None:
            seq.counts[t] += 1
        if t in seq.stop_ids:
            seq.finish, piece = "stop", seq.detok.finish()
        else:
            piece = seq.detok.push(t)
            if seq.detok.stopped:
                seq.finish = "stop"
            elif seq.matcher is not None and seq.matcher.done:  # the grammar is complete: nothing may follow
                seq.finish, piece = "stop", piece + seq.detok.finish()
            elif len(seq.out) == r.max_tokens:
                seq.finish, piece = "length", piece + seq.detok.finish()
        lp = None if r.logprobs is None else [] if t in seq.stop_ids else [token_logprob(logits, t, r.logprobs)]
        if lp:
            seq.logprobs.extend(lp)
        seq.handle._push(Delta(piece, [t], lp))
        if seq.finish:
            self.scheduler.remove(seq)
            self._finish(seq, seq.finish)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if reason in ("abort", "error"):
            self._stats["aborted_total"] += reason == "abort"
            piece = seq.detok.finish()  # what was held back, released as the text so far
            if piece:
                seq.handle._push(Delta(piece, []))
        t = now()
        seq.handle._push(result=Result(
            id=seq.req.id, text=seq.detok.text, token_ids=seq.out, finish_reason=reason,
            usage=Usage(len(seq.req.prompt_ids), len(seq.out), seq.cached),
            ttft_s=seq.t_first - seq.t_submit if seq.out else 0.0, latency_s=t - seq.t_submit,
            rope_long=seq.rope_long, error=error, logprobs=None if seq.req.logprobs is None else seq.logprobs))

    def forget_prefixes(self) -> None:
        """Nothing cached before this call is reused (between a caller's unrelated batches)."""
        self.kv.forget()

