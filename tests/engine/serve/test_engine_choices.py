"""n choices of one request and per-token logprobs in the serving engine: logprobs equal log_softmax of
transformers' logits for the same ids (fp32, 1e-4), masked tokens floored; n choices share one prefill and each
equals the same request run alone with its own seed; choices admitted together or not at all; a choice whose
choice 0 left prefills itself."""
from __future__ import annotations

import math

import pytest
import torch
from tiny_phi3 import StubTokenizer, make_hf_checkpoint, random_prompt
from transformers import Phi3ForCausalLM as HFModel

from phiforge.engine import load_model
from phiforge.engine.serve.engine import Engine
from phiforge.engine.serve.request import InvalidRequest, Request
from phiforge.engine.serve.sampling import LOGPROB_FLOOR, SamplingParams, choice_seed

SAMPLED = SamplingParams(temperature=1.0, top_p=0.95)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_hf_checkpoint(d, dict(num_key_value_heads=2))
    return d


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt, dtype=torch.float32)


def _engine(model, rows=4, **kw) -> Engine:
    return Engine(model, StubTokenizer(), max_batch=rows, kv_tokens=rows * 128, **kw)


def test_logprobs_equal_transformers_log_softmax(model, ckpt):
    prompt = random_prompt(11, 3)
    e = _engine(model)
    try:
        greedy = e.submit(Request(prompt, 12, logprobs=5, stop_token_ids=frozenset())).result(120)
        sampled = e.submit(Request(prompt, 12, SAMPLED, seed=3, logprobs=0, stop_token_ids=frozenset())).result(120)
    finally:
        e.shutdown()
    hf = HFModel.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    for r, k in ((greedy, 5), (sampled, 0)):
        ids = prompt + r.token_ids
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)[len(prompt) - 1:-1]  # (T, V)
        assert len(r.logprobs) == len(r.token_ids)
        for t, lp in enumerate(r.logprobs):
            assert lp.id == r.token_ids[t]
            assert lp.logprob == pytest.approx(ref[t, lp.id].item(), abs=1e-4)
            assert len(lp.top) == k
            if k:
                want = ref[t].topk(k)
                assert [i for i, _ in lp.top] == want.indices.tolist()
                assert [v for _, v in lp.top] == pytest.approx(want.values.tolist(), abs=1e-4)
    assert greedy.logprobs[0].logprob == greedy.logprobs[0].top[0][1]  # greedy: the best is what was chosen


def test_logprobs_of_masked_tokens_are_floored_and_stop_tokens_have_none(model):
    class OnlyTwo:  # a matcher that allows two tokens (what a grammar's mask does), ends after 3 tokens
        def __init__(self): self.n = 0
        def mask_(self, logits):
            keep = logits[[5, 9]].clone()
            logits.fill_(float("-inf"))
            logits[[5, 9]] = keep
            return logits
        def advance(self, t): self.n += 1
        done = property(lambda self: self.n == 3)
    e = _engine(model, start=False)
    h = e.submit(Request(random_prompt(6, 1), 8, logprobs=4, stop_token_ids=frozenset()))
    e._inbox[0].matcher = OnlyTwo()  # where submit attaches a constraint's matcher
    while not h.done:
        e.step()
    r = h.result()
    assert r.finish_reason == "stop" and set(r.token_ids) <= {5, 9}
    for lp in r.logprobs:
        assert {i for i, _ in lp.top[:2]} == {5, 9} and all(v == LOGPROB_FLOOR for _, v in lp.top[2:])
        assert math.isclose(sum(math.exp(v) for _, v in lp.top[:2]), 1.0, abs_tol=1e-5)
    e = _engine(model)
    try:  # every id stops: the first token ends the request, and a stop token is no part of the output
        every = frozenset(range(model.config.vocab_size))
        r = e.submit(Request(random_prompt(6, 1), 40, logprobs=1, stop_token_ids=every)).result(120)
    finally:
        e.shutdown()
    assert r.finish_reason == "stop" and len(r.token_ids) == 1 and r.logprobs == []


def test_n_choices_share_one_prefill_and_each_equals_its_request_alone(model):
    prompt = random_prompt(40, 5)
    e = _engine(model, prefill_chunk=16)
    try:
        calls = []
        forward = e.model.forward
        e.model.forward = lambda *a, **kw: (calls.append(a[0].shape[1]), forward(*a, **kw))[1]
        hs = e.submit_choices(Request(prompt, 10, SAMPLED, seed=11, stop_token_ids=frozenset()), n=3)
        got = [h.result(120) for h in hs]
        e.model.forward = forward
        assert sum(calls) == len(prompt)                      # the prompt ran once, not three times
        assert [h.id for h in hs] == [f"{hs[0].id[:-2]}-{i}" for i in range(3)]
        alone = [e.submit(Request(prompt, 10, SAMPLED, seed=choice_seed(11, i), stop_token_ids=frozenset(),
                                  )).result(120) for i in range(3)]
        assert [g.token_ids for g in got] == [a.token_ids for a in alone]
        assert len({tuple(g.token_ids) for g in got}) == 3    # three distinct seed streams
        greedy = [h.result(120).token_ids for h in e.submit_choices(Request(prompt, 10, stop_token_ids=frozenset()), 3)]
        assert greedy[0] == greedy[1] == greedy[2]
    finally:
        e.shutdown()


def test_choices_wait_for_rows_for_all_and_a_choice_whose_choice_0_left_prefills_itself(model):
    e = _engine(model, rows=3, start=False)
    busy = e.submit(Request(random_prompt(5, 2), 30, stop_token_ids=frozenset()))
    e.step()
    hs = e.submit_choices(Request(random_prompt(30, 6), 6, SAMPLED, seed=4, stop_token_ids=frozenset()), n=3)
    e.step()
    assert len(e.scheduler.running) == 1 and len(e.scheduler.waiting) == 3   # 2 rows free: none of the 3 start
    busy.abort()
    e.step()
    assert len(e.scheduler.running) == 3
    hs[0].abort()   # choice 0 leaves mid-prefill: the others prefill themselves
    while not (hs[1].done and hs[2].done):
        e.step()
    assert hs[0].result().finish_reason == "abort"
    for i in (1, 2):
        alone = _engine(model, start=False)
        h = alone.submit(Request(random_prompt(30, 6), 6, SAMPLED, seed=choice_seed(4, i), stop_token_ids=frozenset()))
        while not h.done:
            alone.step()
        assert hs[i].result().token_ids == h.result().token_ids
    with pytest.raises(InvalidRequest, match="n must be") as err:
        e.submit_choices(Request([1, 2], 4), n=4)
    assert err.value.field == "n"
    with pytest.raises(InvalidRequest, match="logprobs") as err:
        e.submit(Request([1, 2], 4, logprobs=21))
    assert err.value.field == "logprobs"
