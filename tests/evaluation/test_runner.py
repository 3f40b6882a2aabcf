"""One answer scored by hand: the answer after `Answer:`, citations mapped to the shown documents, retrieval by
document, abstention; and the prompt budget."""
from __future__ import annotations

import pytest

from phiforge.engine.request import Result, Usage
from phiforge.evaluation.modes import MODES
from phiforge.evaluation.runner import _Prompt, prompt_budget, score
from phiforge.retrieval.qa import ABSTAIN_ANSWER, QARow


def _result(text: str) -> Result:
    return Result("id", text, [5, 6, 7], "stop", Usage(prompt_tokens=321, completion_tokens=3), 0.25, 1.5)


def test_a_raft_style_answer_scored_by_hand():
    row = QARow("How fast must a crew reach a trunk main burst?", "within 1 hour", ("bursts.md", "pumps.md"),
                True, 7)
    shown = ["bursts.md", "tariff.txt", "bursts.md"]
    p = _Prompt(row, "retrieved", [1, 2, 3], shown, ["bursts.md", "tariff.txt", "bursts.md", "pumps.md"])
    text = "[1] says ##begin_quote## within 1 hour ##end_quote## [2], [9]. Answer: Within 1 hour! [1, 3]"
    r = score(MODES["rag"], p, _result(text))
    assert r["answer"] == "Within 1 hour!"
    assert (r["em"], r["f1"], r["contains"]) == (1.0, 1.0, 1.0)
    assert r["cited"] == [1, 2, 9, 3]
    # cited documents: bursts (gold), tariff (not), [9] (no source), bursts (gold) -> P = 2/4; gold {bursts, pumps}:
    # bursts cited, pumps not -> R = 1/2
    assert (r["cite_precision"], r["cite_recall"], r["cited_any"]) == (0.5, 0.5, 1.0)
    # retrieved by document, k = 4: both gold documents among the 4 -> recall 1; first gold at rank 1 -> MRR 1
    assert (r["recall"], r["mrr"]) == (1.0, 1.0)
    assert (r["abstain"], r["false_abstain"]) == (None, 0.0)
    assert (r["prompt_tokens"], r["completion_tokens"], r["ttft_s"], r["latency_s"]) == (321, 3, 0.25, 1.5)
    assert (r["mode"], r["context"], r["line"]) == ("rag", "retrieved", 7)


def test_partial_answer_and_a_miss():
    row = QARow("What does water cost?", "1.87 per cubic metre", ("tariff.txt",), True, 2)
    p = _Prompt(row, "retrieved", [1], ["pumps.md", "bursts.md"], ["pumps.md", "bursts.md"])
    r = score(MODES["raft+rag"], p, _result("It costs 2.31 per cubic metre."))
    # prediction tokens: it costs 231 per cubic metre (6); gold: 187 per cubic metre (4); common 3
    assert r["f1"] == pytest.approx(2 * (3 / 6) * (3 / 4) / (3 / 6 + 3 / 4))
    assert (r["em"], r["contains"]) == (0.0, 0.0)
    assert (r["cite_precision"], r["cite_recall"], r["cited_any"]) == (None, 0.0, 0.0)
    assert (r["recall"], r["mrr"]) == (0.0, 0.0)


def test_unanswerable_and_closed_book():
    row = QARow("What is the CEO's favourite colour?", ABSTAIN_ANSWER, (), False, 3)
    gold_ctx = _Prompt(row, "gold", [1], ["pumps.md"], None)
    r = score(MODES["rag+ft"], gold_ctx, _result("The sources do not say [1]."), gold_known=False)
    assert (r["em"], r["f1"], r["contains"]) == (None, None, None)  # unanswerable: scored by abstention only
    assert (r["abstain"], r["false_abstain"]) == (1.0, None)
    assert (r["cite_precision"], r["cite_recall"], r["recall"], r["mrr"]) == (None, None, None, None)
    assert r["gold_context"] is False
    book = _Prompt(QARow("q?", "blue", (), True, 4), "none", [1], [], None)
    r = score(MODES["ft"], book, _result("I don't know [1]."))
    assert (r["false_abstain"], r["cited"], r["cited_any"], r["cite_precision"]) == (1.0, [], None, None)


def test_prompt_budget():
    assert prompt_budget(2048, 1024, 64) == 1024
    assert prompt_budget(512, 1024, 64) == 448  # the model's context caps it
    with pytest.raises(ValueError, match="--max-new-tokens 510"):
        prompt_budget(512, 1024, 510)
