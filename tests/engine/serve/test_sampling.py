"""Sampling: transformers' logits processors give the same distribution; seeds reproduce; greedy is argmax."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    SequenceBiasLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from phiforge.engine.serve.sampling import (SamplingParams, apply_repetition_penalty, filter_logits, make_generators,
                                           sample)


@pytest.mark.parametrize("top_k,top_p", [(None, 0.9), (20, 1.0), (20, 0.5), (None, 0.05)])
def test_filters_equal_transformers(top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 100, generator=g) * 3
    history = torch.randint(0, 100, (3, 12), generator=g)
    seen = torch.zeros(3, 100, dtype=torch.bool).scatter_(1, history, True)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    ref = TemperatureLogitsWarper(0.7)(history, ref)
    if top_k:
        ref = TopKLogitsWarper(top_k)(history, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(history, ref)
    got = filter_logits(apply_repetition_penalty(logits, seen, 1.3) / 0.7, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    kept = ~torch.isinf(ref)
    assert torch.allclose(got[kept], ref[kept])
    assert kept.sum(-1).min() >= 1


def test_seeded_draws_reproduce_and_follow_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -30.0]]).repeat(4000, 1)
    params = SamplingParams(temperature=1.0, top_k=3)
    a = sample(logits, params, make_generators([5] * 4000))
    assert torch.equal(a, sample(logits, params, make_generators([5] * 4000)))  # same seeds, same draws
    b = sample(logits, params, make_generators(list(range(4000))))
    freq = torch.bincount(b, minlength=4).float() / 4000
    assert freq[3] == 0  # cut by top-k
    assert torch.allclose(freq[:3], logits[0, :3].softmax(-1), atol=0.03)


def test_greedy_and_bad_params():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    assert sample(logits, SamplingParams(temperature=0), [None, None]).tolist() == [1, 0]
    seen = torch.tensor([[False, False, False], [True, False, False]])
    # the penalty applies to greedy too, as in transformers: 5.0 / 1.1 < 4.9
    assert sample(logits, SamplingParams(temperature=0, repetition_penalty=1.1), [None, None], seen).tolist() == [1, 2]
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


@pytest.mark.parametrize("top_k", [2.5, True, -1, "3"])
def test_bad_top_k_is_an_error_at_construction(top_k):
    """Validation before any compute: a float, bool, negative or str top_k fails when the params are built."""
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(0.7, top_k)


@pytest.mark.parametrize("min_p,top_p", [(0.1, 1.0), (0.3, 0.9), (1.0, 1.0)])
def test_min_p_and_logit_bias_equal_transformers(min_p, top_p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 100, generator=g) * 3
    history = torch.randint(0, 100, (3, 12), generator=g)
    seen = torch.zeros(3, 100, dtype=torch.bool).scatter_(1, history, True)
    bias = ((7, -100.0), (42, 5.5), (3, 100.0))
    ref = SequenceBiasLogitsProcessor({(t,): b for t, b in bias})(history, logits.clone())
    ref = RepetitionPenaltyLogitsProcessor(1.3)(history, ref)
    ref = TemperatureLogitsWarper(0.7)(history, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(history, ref)
    ref = MinPLogitsWarper(min_p)(history, ref)
    params = SamplingParams(temperature=0.7, top_p=top_p, repetition_penalty=1.3, min_p=min_p, logit_bias=bias)
    biased = logits.clone()
    biased[:, [7, 42, 3]] += torch.tensor([-100.0, 5.5, 100.0])
    got = filter_logits(apply_repetition_penalty(biased, seen, 1.3) / 0.7, None, top_p, min_p)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    kept = ~torch.isinf(ref)
    assert torch.allclose(got[kept], ref[kept], atol=1e-5)
    draws = sample(logits, params, make_generators(list(range(3))), seen)
    assert all(kept[b, t] for b, t in enumerate(draws.tolist()))        # only what survives is drawn
    assert sample(logits, SamplingParams(temperature=0, logit_bias=((9, 100.0),)), [None] * 3).tolist() == [9] * 3
    for bad in (dict(min_p=1.5), dict(min_p=-0.1), dict(logit_bias=((1, 101.0),)), dict(logit_bias=((-1, 1.0),))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
