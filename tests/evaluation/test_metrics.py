"""Metric functions against hand-computed cases; the bootstrap against a reference loop and its own seed."""
from __future__ import annotations

import numpy as np
import pytest

from phiforge.evaluation.metrics import (Interval, abstention, bootstrap_mean, citation_scores, contains,
                                         exact_match, extract_answer, field_exact_match, mrr, normalize_answer,
                                         recall_at_k, token_f1)
from phiforge.retrieval.qa import ABSTAIN_ANSWER


@pytest.mark.parametrize("text, norm", [
    ("The Cat sat on a mat.", "cat sat on mat"),
    ("  An  apple,\tan orange!  ", "apple orange"),
    ("£1.87 per cubic metre", "187 per cubic metre"),
    ("theory of the anthem", "theory of anthem"),   # articles only as whole words
    ("...", ""),
])
def test_normalisation(text, norm):
    assert normalize_answer(text) == norm


def test_exact_match_ignores_case_punctuation_and_articles():
    assert exact_match("The answer: 1 hour.", "answer 1 hour") == 1.0
    assert exact_match("1 hour", "2 hours") == 0.0


def test_token_f1_partial_overlap_by_hand():
    # prediction tokens: within 2 hours  (3); gold: within 1 hour priority (4); common: within -> 1
    # P = 1/3, R = 1/4, F1 = 2PR/(P+R) = (2/12)/(7/12) = 2/7
    assert token_f1("Within 2 hours.", "within 1 hour (Priority)") == pytest.approx(2 / 7)
    # repeated tokens count as a multiset: pred "x y y" vs gold "y y z" -> common 2, P = R = 2/3
    assert token_f1("x y y", "y y z") == pytest.approx(2 / 3)
    assert token_f1("1 hour", "1 hour") == 1.0
    assert token_f1("nothing alike", "1 hour") == 0.0


def test_no_answer_cases():
    assert token_f1("", "1 hour") == 0.0 and exact_match("", "1 hour") == 0.0
    assert token_f1("the", "a") == 1.0 and exact_match("", "the") == 1.0  # both normalise to nothing
    assert contains("anything", "the") == 0.0  # an empty gold answer is in nothing
    assert contains("", "1 hour") == 0.0


def test_containment_on_token_boundaries():
    assert contains("Crews must arrive within 1 hour, day or night.", "within 1 hour") == 1.0
    assert contains("within 11 hours", "1 hour") == 0.0
    assert contains("It costs £1.87 per cubic metre [2].", "£1.87 per cubic metre") == 1.0


@pytest.mark.parametrize("text, answer", [
    ("Crews arrive within 1 hour [1].", "Crews arrive within 1 hour ."),
    ("Reasoning: [2] says ##begin_quote## one hour ##end_quote##. Answer: within 1 hour [2]", "within 1 hour"),
    ("Answer: first. Then more. Answer: second [1, 3]", "second"),
    ("no marker [12] here", "no marker here"),
    ("the answer: lowercase is not a marker", "the answer: lowercase is not a marker"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_recall_and_mrr_by_document():
    ranked = ["a.md", "b.md", "a.md", "c.md"]
    assert recall_at_k(ranked, {"b.md", "c.md"}, 4) == 1.0
    assert recall_at_k(ranked, {"b.md", "c.md"}, 2) == 0.5
    assert recall_at_k(ranked, {"z.md"}, 4) == 0.0
    assert mrr(ranked, {"c.md"}) == 0.25
    assert mrr(ranked, {"b.md", "c.md"}) == 0.5
    assert mrr(ranked, {"z.md"}) == 0.0
    assert recall_at_k(ranked, set(), 4) is None and mrr(ranked, []) is None  # unanswerable: undefined


def test_citation_precision_and_recall():
    shown = ["a.md", "b.md", "a.md", "c.md"]
    # cites [1] (a, gold), [2] (b, not gold), [3] (a again): P = 2/3; gold {a, c}: only a cited, R = 1/2
    assert citation_scores([1, 2, 3], shown, {"a.md", "c.md"}) == (pytest.approx(2 / 3), 0.5)
    # a number naming no source is a wrong citation
    assert citation_scores([4, 9], shown, {"c.md"}) == (0.5, 1.0)
    # nothing cited: precision undefined, recall 0
    assert citation_scores([], shown, {"a.md"}) == (None, 0.0)
    # no gold documents (unanswerable): both undefined
    assert citation_scores([1], shown, set()) == (None, None)


def test_abstention_and_false_abstention():
    assert abstention(ABSTAIN_ANSWER, answerable=False) == (1.0, None)
    assert abstention("It is blue.", answerable=False) == (0.0, None)
    assert abstention("I don't know.", answerable=True) == (None, 1.0)
    assert abstention("Within 1 hour.", answerable=True) == (None, 0.0)


def _reference_bootstrap(x, seed, samples):
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(samples):  # one resample at a time: the loop the vectorised version must equal
        idx = rng.integers(0, len(x), size=len(x))
        means.append(np.mean([x[i] for i in idx]))
    return np.percentile(means, [2.5, 97.5])


def test_bootstrap_is_seeded_and_covers_the_mean():
    x = [0.0, 1.0, 0.5, 1.0, 0.0, 0.25, 1.0, None, 0.75]
    a, b = bootstrap_mean(x, seed=3), bootstrap_mean(x, seed=3)
    assert a == b
    assert a.n == 8 and a.mean == pytest.approx(4.5 / 8)
    assert a.lo < a.mean < a.hi and 0.0 <= a.lo and a.hi <= 1.0
    assert bootstrap_mean(x, seed=4) != a  # another seed, another interval


def test_bootstrap_equals_a_plain_resampling_loop():
    x = [float(v) for v in np.random.default_rng(0).random(7)]
    lo, hi = _reference_bootstrap(x, 11, 300)
    iv = bootstrap_mean(x, seed=11, samples=300)
    assert (iv.lo, iv.hi) == (pytest.approx(lo), pytest.approx(hi))


def test_bootstrap_interval_narrows_with_more_questions_and_covers_the_truth():
    rng = np.random.default_rng(1)
    small = bootstrap_mean(rng.random(20).tolist(), seed=0)
    large = bootstrap_mean(rng.random(2000).tolist(), seed=0)
    assert large.hi - large.lo < (small.hi - small.lo) / 4
    assert large.lo < 0.5 < large.hi  # uniform(0, 1) has mean 0.5


def test_bootstrap_edge_cases():
    assert bootstrap_mean([None, None]) is None
    assert bootstrap_mean([0.4]) == Interval(0.4, 0.4, 0.4, 1)
    assert bootstrap_mean([1.0, 1.0, 1.0]) == Interval(1.0, 1.0, 1.0, 3)
    assert Interval(0.1, 0.0, 0.2, 5).overlaps(Interval(0.3, 0.2, 0.4, 5))
    assert not Interval(0.1, 0.0, 0.19, 5).overlaps(Interval(0.3, 0.2, 0.4, 5))


def test_field_exact_match():
    gold = {"price": 1.87, "unit": "cubic metre", "metered": True}
    assert field_exact_match({"price": 1.870, "unit": "Cubic metre.", "metered": True}, gold) == 1.0
    assert field_exact_match({"price": 1.88, "unit": "cubic metre", "metered": 1}, gold) == pytest.approx(1 / 3)
    assert field_exact_match({"price": "1.87"}, gold) == 0.0      # a string is not the number
    assert field_exact_match(None, gold) == 0.0                   # cut or not JSON
    with pytest.raises(ValueError):
        field_exact_match({}, {})
