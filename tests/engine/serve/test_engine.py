"""The serving engine: concurrent requests each equal to the request alone, seeded sampling independent of batch
mates, stop strings split across tokens, abort and a full KV budget, shutdown with drain, asyncio streaming."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from tiny_phi3 import StubTokenizer, make_hf_checkpoint, random_prompt

from phiforge.engine import load_model
from phiforge.engine.serve.engine import Engine
from phiforge.engine.serve.request import (EngineStopped, InvalidRequest, PromptTooLong, QueueFull, Request,
                                          UnknownAdapter)
from phiforge.engine.serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_hf_checkpoint(d, dict(sliding_window=15, num_key_value_heads=2))
    return load_model(d, dtype=torch.float32)


def _alone(model, req: Request, **kw):
    e = Engine(model, StubTokenizer(), max_batch=1, kv_tokens=128, **kw)
    try:
        return e.submit(req).result(120)
    finally:
        e.shutdown()


def test_16_concurrent_greedy_each_equal_alone(model):
    """16 requests of different lengths submitted from 16 threads at once, through 8 rows (so rows are freed and
    reused mid-run, next to rows still decoding): each equals the same request run alone (fp32)."""
    reqs = [dict(prompt_ids=random_prompt(3 + 5 * i, i), max_tokens=8 + (i * 7) % 20) for i in range(16)]
    e = Engine(model, StubTokenizer(), max_batch=8, kv_tokens=8 * 128, prefill_chunk=16, prefix_cache=False)
    handles = [None] * 16

    def go(i):
        handles[i] = e.submit(Request(**reqs[i]))
    threads = [threading.Thread(target=go, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = [h.result(120) for h in handles]
    e.shutdown()
    for r, g in zip(reqs, got):
        a = _alone(model, Request(**r))
        assert (g.token_ids, g.text, g.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        assert g.usage.prompt_tokens == len(r["prompt_ids"]) and g.usage.completion_tokens == len(g.token_ids)
    assert {g.finish_reason for g in got} >= {"length"}


def test_seeded_sampling_reproducible_regardless_of_batch_mates(model):
    sp = SamplingParams(temperature=1.0, top_k=40, top_p=0.9, repetition_penalty=1.1, presence_penalty=0.5,
                        frequency_penalty=0.3)
    p = random_prompt(9, 4)
    a = _alone(model, Request(p, 20, sp, seed=7))
    e = Engine(model, StubTokenizer(), max_batch=4, kv_tokens=4 * 128)
    mates = [e.submit(Request(random_prompt(4 + i, 10 + i), 20, sp, seed=i)) for i in range(3)]
    mine = e.submit(Request(p, 20, sp, seed=7))
    assert mine.result(120).token_ids == a.token_ids
    assert [m.result(120).token_ids for m in mates] != [a.token_ids] * 3
    assert _alone(model, Request(p, 20, sp, seed=8)).token_ids != a.token_ids
    e.shutdown()


def test_stop_string_split_across_tokens_is_cut_exactly(model):
    """The stub decodes token t as one letter, so any two-letter stop string spans two tokens."""
    ref = _alone(model, Request(random_prompt(6, 2), 30))
    text = ref.text
    stop = text[5:7]  # two letters: the 6th and 7th tokens' text
    first = text.index(stop)
    e = Engine(model, StubTokenizer(), max_batch=2, kv_tokens=256)
    h = e.submit(Request(random_prompt(6, 2), 30, stop=(stop,)))
    pieces = [d.text for d in h]
    r = h.result()
    e.shutdown()
    assert r.text == text[:first] == "".join(pieces) and r.finish_reason == "stop"
    assert len(r.token_ids) == first + 2  # generation stopped at the token completing the stop string


def test_abort_frees_memory_within_a_step_and_full_budget_makes_new_requests_wait(model):
    e = Engine(model, StubTokenizer(), max_batch=2, kv_tokens=2 * 128, start=False)
    a = e.submit(Request(random_prompt(5, 1), 100))
    b = e.submit(Request(random_prompt(6, 2), 100))
    c = e.submit(Request(random_prompt(7, 3), 4))
    for _ in range(3):
        e.step()
    st = e.stats()
    assert (st["running"], st["waiting"]) == (2, 1) and not c.poll()     # both rows taken: c waits
    assert st["kv_used_tokens"] == 5 + 6 + 2 * 2 and st["kv_total_tokens"] == 256
    a.abort()
    e.step()                                    # the abort frees a's row; c is admitted into it in this step
    assert a.done and a.result().finish_reason == "abort" and len(a.result().token_ids) == 3
    assert e.stats()["running"] == 2 and c.poll()                       # c has its first token already
    while not c.done:
        e.step()
    assert c.result().token_ids == _alone(model, Request(random_prompt(7, 3), 4)).token_ids
    assert e.stats()["aborted_total"] == 1 and not b.done


def test_prompts_arriving_together_prefill_together_a_chunk_each_within_the_step_budget(model):
    """A burst is prefilled in the same step (each request up to prefill_chunk tokens, oldest first while
    step_tokens lasts), so its short prompts all get their first token together; a long one advances one chunk a
    step beside the running stream; the outputs still equal each request alone."""
    e = Engine(model, StubTokenizer(), max_batch=4, kv_tokens=4 * 128, prefill_chunk=16, step_tokens=40,
               prefix_cache=False, start=False)
    reqs = [Request(random_prompt(5, 0), 30), Request(random_prompt(12, 1), 6), Request(random_prompt(12, 2), 6),
            Request(random_prompt(50, 3), 6)]
    running = e.submit(reqs[0])
    e.step()
    assert len(running.poll()) == 1                                     # streaming before the burst comes
    burst = [e.submit(r) for r in reqs[1:]]
    e.step()
    seqs = {s.req.id: s for s in e.scheduler.running}
    assert [len(h.poll()) for h in burst[:2]] == [1, 1]                 # both short prompts done in one step
    assert seqs[reqs[3].id].computed == 16 and not burst[2].poll()     # the long one: one chunk (12 + 12 + 16 = 40)
    e.step()
    assert seqs[reqs[3].id].computed == 32                              # one chunk a step, not the whole prompt
    while not all(h.done for h in [running, *burst]):
        e.step()
    for r, h in zip(reqs, [running, *burst]):
        assert h.result().token_ids == _alone(model, Request(r.prompt_ids, r.max_tokens)).token_ids
    for invariant, want in ((False, [12, 8, 0]), (True, [12, 0, 0])):  # batch-invariant: whole chunks only
        tight = Engine(model, StubTokenizer(), max_batch=4, kv_tokens=4 * 128, prefill_chunk=16, step_tokens=20,
                       prefix_cache=False, batch_invariant=invariant, start=False)
        hs = [tight.submit(Request(r.prompt_ids, r.max_tokens)) for r in reqs[1:]]
        tight.step()
        computed = [s.computed for s in tight.scheduler.running]
        assert computed == want and len(hs[0].poll()) == 1 and not hs[1].poll()  # oldest first within the budget


def test_admission_errors_before_any_compute(model):
    e = Engine(model, StubTokenizer(), max_batch=2, kv_tokens=2 * 64, max_queue=2, start=False)
    with pytest.raises(PromptTooLong, match="context") as err:
        e.submit(Request(random_prompt(250, 1), 10))
    assert err.value.field == "max_tokens"
    with pytest.raises(PromptTooLong, match="KV slots"):
        e.submit(Request(random_prompt(60, 1), 10))              # fits the context, not a 64-slot row
    # what is not too long is not reported as such: an empty prompt, a bad id, max_tokens < 1 name their field
    for req, field in ((Request([], 10), "prompt_ids"), (Request([3, 10**6], 10), "prompt_ids"),
                       (Request([3], 0), "max_tokens")):
        with pytest.raises(InvalidRequest) as err:
            e.submit(req)
        assert err.value.field == field and not isinstance(err.value, PromptTooLong)
    with pytest.raises(UnknownAdapter):
        e.submit(Request(random_prompt(5, 1), 10, adapter="sql"))
    e.submit(Request(random_prompt(5, 1), 10))
    e.submit(Request(random_prompt(5, 2), 10))
    with pytest.raises(QueueFull):
        e.submit(Request(random_prompt(5, 3), 10))
    assert e.stats()["rejected_total"] == 1


def test_a_failed_step_ends_its_requests_with_the_error(model, monkeypatch):
    """A step that raises on the scheduler thread ends every running and waiting request with finish_reason
    "error" and the cause (not as "abort", which a caller reads as its own), counts them, and the engine serves on."""
    def failing_prefill(self, chunks):
        raise RuntimeError("the native step returned -1")
    monkeypatch.setattr(Engine, "_prefill", failing_prefill)
    e = Engine(model, StubTokenizer(), max_batch=1, kv_tokens=256)
    hs = [e.submit(Request(random_prompt(5, i), 8)) for i in range(2)]    # one runs, one waits for the row
    rs = [h.result(60) for h in hs]
    assert [r.finish_reason for r in rs] == ["error", "error"]
    assert all(r.error == "RuntimeError: the native step returned -1" for r in rs)
    assert e.stats()["failed_total"] == 2 and e.stats()["aborted_total"] == 0
    monkeypatch.undo()                                                       # and the engine serves on
    ok = e.submit(Request(random_prompt(5, 9), 3, stop_token_ids=frozenset()))
    assert ok.result(60).finish_reason == "length"
    e.shutdown(drain=False, timeout=60)


def test_shutdown_drain_finishes_running_and_waiting_requests(model):
    e = Engine(model, StubTokenizer(), max_batch=2, kv_tokens=2 * 128)
    hs = [e.submit(Request(random_prompt(5 + i, i), 12)) for i in range(4)]  # two of them wait for a row
    e.shutdown(drain=True, timeout=120)
    assert all(h.done and h.result().finish_reason in ("length", "stop") for h in hs)
    with pytest.raises(EngineStopped):
        e.submit(Request(random_prompt(5, 1), 2))
    e2 = Engine(model, StubTokenizer(), max_batch=1, kv_tokens=256)
    h = e2.submit(Request(random_prompt(5, 1), 250, stop_token_ids=frozenset()))
    e2.shutdown(drain=False, timeout=120)
    assert h.result(0).finish_reason == "abort"


def test_asyncio_stream_and_prefix_reuse_across_requests(model):
    """`async for` over a Handle; a chat's next turn reuses the finished request's K/V and generates what a cold
    engine generates. Batch-invariant, only whole prefill chunks a prefill wrote are reused (the rest is prefilled
    in the chunks a cold prefill runs)."""
    e = Engine(model, StubTokenizer(), max_batch=2, kv_tokens=2 * 128, batch_invariant=False)
    first = random_prompt(20, 4)

    async def run(req):
        return [d async for d in e.submit(req)]
    deltas = asyncio.run(run(Request(first, 10)))
    r1_ids = [t for d in deltas for t in d.token_ids]
    turn2 = first + r1_ids + random_prompt(7, 5)
    r2 = e.submit(Request(turn2, 10)).result(120)
    e.shutdown()
    assert r2.usage.cached_tokens == len(first) + len(r1_ids) - 1
    cold = _alone(model, Request(turn2, 10), prefix_cache=False)
    assert r2.token_ids == cold.token_ids and cold.usage.cached_tokens == 0

    e = Engine(model, StubTokenizer(), max_batch=2, kv_tokens=2 * 128, prefill_chunk=16)   # batch-invariant
    r1 = e.submit(Request(first, 10)).result(120)
    turn2 = first + r1.token_ids + random_prompt(7, 5)
    r2 = e.submit(Request(turn2, 10)).result(120)
    again = e.submit(Request(turn2, 10)).result(120)
    e.shutdown()
    assert r2.usage.cached_tokens == 16            # of the 20 prefilled prompt tokens, one whole chunk
    assert again.usage.cached_tokens == 32         # turn2's own prefill wrote 37: two whole chunks
    cold = _alone(model, Request(turn2, 10), prefill_chunk=16)
    assert r2.token_ids == again.token_ids == cold.token_ids
