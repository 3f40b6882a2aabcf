"""The table's rows from records, and the recommendation's claims against clear-cut and overlapping cases."""
from __future__ import annotations

import pytest

from phiforge.evaluation.summary import recommend, summarize, summarize_retrieval


def _rec(mode, context, line, f1, answerable=True, abstain=None, prompt_tokens=50, latency=1.0):
    return {"mode": mode, "context": context, "line": line, "answerable": answerable,
            "f1": f1 if answerable else None, "em": f1 if answerable else None,
            "contains": f1 if answerable else None, "abstain": abstain, "false_abstain": 0.0 if answerable else None,
            "cite_precision": None, "cite_recall": None, "cited_any": None, "ttft_s": 0.1, "latency_s": latency,
            "prompt_tokens": prompt_tokens}


def _records(scores: dict[tuple[str, str], list[float]], **kw) -> list[dict]:
    return [_rec(m, c, i + 1, f, **kw) for (m, c), fs in scores.items() for i, f in enumerate(fs)]


def test_rows_in_mode_then_context_order_with_means():
    recs = _records({("rag", "gold"): [1, 1], ("base", "none"): [0, 1], ("rag", "retrieved"): [0, 0]})
    table = summarize(recs, {"base": 2.0, "rag": 3.0}, seed=0)
    assert [r["label"] for r in table] == ["rag", "rag (gold ctx)", "base"]  # modes in the records' first-seen order
    assert [r["mode_seconds"] for r in table] == [3.0, 3.0, 2.0]
    base = table[2]["metrics"]
    assert base["f1"]["mean"] == 0.5 and base["f1"]["n"] == 2
    assert base["abstain"] is None and base["cite_precision"] is None  # no value defined: no cell


def test_a_clear_winner_and_where_retrieval_costs():
    n = 30
    recs = _records({("base", "none"): [0.0] * n, ("rag", "retrieved"): [0.4] * n, ("rag", "gold"): [1.0] * n})
    for r in recs:
        if r["mode"] == "rag":
            r["prompt_tokens"] = 600
    lines = recommend(summarize(recs, {}, seed=0))
    text = "\n".join(lines)
    assert lines[0] == "Best answers (token F1, answerable questions): rag with 40.0."
    assert "F1: rag 40.0 vs base 0.0 F1 (+40.0 points, intervals apart" in text
    assert "rag: F1 40.0 with retrieved context, 100.0 with the gold documents (+60.0 points): retrieval loses" in text
    assert "Cost: rag reads 600 prompt tokens per answer against 50 for base" in text
    assert "gold ctx" not in lines[0]  # the oracle row is never the recommended deployment


def test_overlapping_intervals_cannot_separate():
    recs = _records({("base", "none"): [0, 1, 0, 1, 1, 0], ("ft", "none"): [1, 0, 1, 0, 1, 1]})
    text = "\n".join(recommend(summarize(recs, {}, seed=0)))
    assert "Best answers (token F1, answerable questions): ft with 66.7." in text
    assert "overlap, so these 6 questions cannot separate them" in text


def test_abstention_claims():
    recs = _records({("base", "none"): [0.5]}) + [_rec("base", "none", 9, None, answerable=False, abstain=0.0)]
    assert "Abstention: no mode declined any of the 1 unanswerable questions." in recommend(summarize(recs, {}))
    recs = _records({("base", "none"): [0.5], ("rag", "retrieved"): [0.5]})
    recs += [_rec("base", "none", 9, None, False, 0.0), _rec("rag", "retrieved", 9, None, False, 1.0)]
    text = "\n".join(recommend(summarize(recs, {})))
    assert "rag declines best (100.0% of 1), and wrongly declines 0.0% of answerable ones." in text


def test_retriever_before_and_after():
    recs = [{"after": {"recall": 1.0, "mrr": 1.0}, "before": {"recall": 0.0, "mrr": 0.5}} for _ in range(20)]
    ret = summarize_retrieval(recs, k=4, seed=0)
    assert ret["after"]["recall"]["mean"] == 1.0 and ret["before"]["mrr"]["mean"] == 0.5 and ret["k"] == 4
    text = "\n".join(recommend(summarize(_records({("rag", "retrieved"): [1.0]}), {}), ret))
    assert "Retriever recall@4: after 100.0 vs before 0.0 recall@4 (+100.0 points, intervals apart" in text
    assert summarize_retrieval([], k=4) is None
    assert "before" not in summarize_retrieval([{"after": {"recall": 1.0, "mrr": 1.0}}], k=4)


@pytest.mark.parametrize("seed", [0, 1])
def test_seeded(seed):
    recs = _records({("base", "none"): [0, 1, 0.5, 0.2, 0.9]})
    assert summarize(recs, {}, seed) == summarize(recs, {}, seed)


def test_containment_named_only_when_another_mode_contains_more():
    recs = _records({("base", "none"): [0.9, 0.9], ("rag", "retrieved"): [0.5, 0.5]})
    for r in recs:
        r["contains"] = 1.0 if r["mode"] == "rag" else 0.0
    assert any(x.startswith("Containment (gold answer inside the reply): rag 100.0 vs base 0.0")
               for x in recommend(summarize(recs, {})))
    for r in recs:
        r["contains"] = 1.0
    assert not any(x.startswith("Containment") for x in recommend(summarize(recs, {})))
