"""One answer scored by hand: the answer after `Answer:`, citations mapped to the shown documents, retrieval by
document, abstention; the prompt budget; the gold context against an exact scan of the whole index."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from phiforge.engine.serve.request import Result, Usage
from phiforge.evaluation.modes import MODES
from phiforge.evaluation.runner import _Prompt, prompt_budget, retrieve, score
from phiforge.retrieval.qa import ABSTAIN_ANSWER, QARow
from phiforge.retrieval.store import Index


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


class _Words:
    """A deterministic stand-in encoder: counts of a fixed vocabulary, so scores are easy to reason about."""
    name, dim = "test-words", 8
    VOCAB = ("pump", "serviced", "months", "water", "costs", "crew", "burst", "hour")

    def encode(self, texts):
        out = np.array([[t.lower().count(w) for w in self.VOCAB] for t in texts], np.float32) + 1e-3
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_gold_context_equals_the_exact_scan_kept_to_gold_documents(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "pumps.md").write_text("# Pumps\n\n" + " ".join(
        f"Pump {i} is serviced every {i + 6} months{' and its water costs rise' * (i % 3)}." for i in range(80)))
    (docs / "tariff.txt").write_text("Water costs 1.87. " * 40)
    (docs / "bursts.md").write_text("A crew must reach a burst within 1 hour. " * 30)
    with Index.open(tmp_path / "ix", encoder=_Words()) as ix:
        ix.add([docs])
        assert len(ix) > 4
        rows = [QARow("Which pump is serviced every 9 months?", "pump 3", ("pumps.md",), True, 1),
                QARow("What does water cost?", "1.87", ("tariff.txt", "bursts.md"), True, 2),
                QARow("Favourite colour?", ABSTAIN_ANSWER, (), False, 3)]
        ctx = retrieve(ix, rows, k=3)
        for row, got, known, hits in zip(rows, ctx.gold, ctx.gold_known, ctx.retrieved):
            assert [h.chunk_id for h in hits] == [h.chunk_id for h in ix.search(row.question, k=3)]
            if not row.sources:
                assert got is hits and not known
                continue
            ranked = ix.search(row.question, k=len(ix), mode="exact")  # every chunk, best first: the reference
            want = [h for h in ranked if Path(h.source).name in row.sources][:3]
            assert known and [h.chunk_id for h in got] == [h.chunk_id for h in want]
            assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-6)
            assert [(h.text, h.source, h.start) for h in got] == [(h.text, h.source, h.start) for h in want]
