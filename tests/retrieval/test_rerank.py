"""The language-model reranker (retrieval/rerank.py): its log-likelihoods against transformers on unpadded
sequences, the PMI and its prior cache, the fused ranking, the training rows, and bad settings."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_phi3 import save_tiny

from phiforge.engine.formats.loader import load_model
from phiforge.engine.model.tokenizer import load_tokenizer
from phiforge.retrieval.rerank import (PRIOR, PROMPT, RerankConfig, Reranker, passage_text, reranker_dir,
                                       training_rows)
from phiforge.retrieval.store import Hit

PASSAGES = ["Pump stations switch to standby power within 30 seconds of a mains failure.",
            "Yes.",
            "Metered water costs 1.87 pounds per cubic metre in 2026, billed twice a year to every household "
            "that has a meter fitted, with a standing charge on top and a discount for customers on benefits.",
            "Free chlorine is sampled daily."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, hf = save_tiny(tmp_path_factory.mktemp("rr") / "m", with_tokenizer=True)
    return load_model(path, dtype=torch.float32), load_tokenizer(path), hf.eval()


def reference_loglik(hf, tok, context: str, passage: str, budget: int) -> float:
    """transformers on the one unpadded sequence context + passage: sum of the passage tokens' log-probabilities."""
    ctx = tok.encode(context, add_special_tokens=False)
    cont = tok.encode(" " + passage, add_special_tokens=False)[:budget]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ctx + cont])).logits[0].double(), -1)  # (L, V)
    return float(sum(logp[len(ctx) - 1 + t, c] for t, c in enumerate(cont)))


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_loglik_matches_transformers(tiny, one_thread, rows):
    model, tok, hf = tiny
    rr = Reranker(model, tok, RerankConfig(passage_tokens=12, rows=rows))  # padding, and the budget cuts two
    ctx = PROMPT.format(question="How fast do pumps get standby power?")
    got = rr.loglik(ctx, PASSAGES)
    want = [reference_loglik(hf, tok, ctx, p, 12) for p in PASSAGES]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_pmi_is_conditional_minus_cached_prior(tiny, one_thread):
    model, tok, hf = tiny
    rr = Reranker(model, tok, RerankConfig(passage_tokens=16))
    calls = []
    real = rr.loglik
    rr.loglik = lambda ctx, ps: calls.append((ctx, list(ps))) or real(ctx, ps)
    q = "Where is chlorine sampled?"
    got = rr.pmi(q, PASSAGES)
    want = [reference_loglik(hf, tok, PROMPT.format(question=q), p, 16) - reference_loglik(hf, tok, PRIOR, p, 16)
            for p in PASSAGES]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    calls.clear()
    rr.pmi("Another question?", PASSAGES[1:] + ["Something new."])
    assert [c[0] for c in calls] == [PRIOR, PROMPT.format(question="Another question?")]
    assert calls[0][1] == ["Something new."]  # only the passage never seen gets its prior computed


class FixedPMI(Reranker):
    def __init__(self, pmi: dict[str, float], cfg: RerankConfig) -> None:
        self.cfg, self.values, self.asked = cfg, pmi, []

    def pmi(self, question, passages):
        self.asked.append(list(passages))
        return np.array([self.values[p] for p in passages])


def hits(scores: list[float]) -> list[Hit]:
    return [Hit(i, f"/d/{i}.md", f"text {i}", s, "" if i % 2 else f"Head {i}", 0, 10) for i, s in enumerate(scores)]


def test_rerank_fuses_cosine_and_pmi_over_the_top_depth():
    hs = hits([0.9, 0.8, 0.7, 0.6, 0.5])
    pmi = {passage_text(h): v for h, v in zip(hs, [0.0, -5.0, 20.0, 3.0, 100.0])}
    rr = FixedPMI(pmi, RerankConfig(depth=4, weight=0.02))
    got = rr.rerank("q", hs, k=3)
    # fused: 0.9, 0.7, 1.1, 0.66; the fifth (pmi 100) is beyond depth 4 and never scored
    assert [h.chunk_id for h in got] == [2, 0, 1]
    assert [h.score for h in got] == pytest.approx([1.1, 0.9, 0.7])
    assert rr.asked == [["Head 0\ntext 0", "text 1", "Head 2\ntext 2", "text 3"]]  # heading + text, as embedded
    assert hs[2].score == 0.7  # the encoder's hits are left as they were
    assert rr.rerank("q", [], k=3) == []
    with pytest.raises(ValueError, match="k must be >= 1"):
        rr.rerank("q", hs, k=0)


def test_training_rows_and_reranker_dir(tmp_path):
    assert training_rows([("Where?", "At the outlet.")]) == [
        {"prompt": "Question: Where?\nAnswer:", "completion": " At the outlet."}]
    assert reranker_dir(None) is None and reranker_dir(tmp_path) is None
    (tmp_path / "reranker").mkdir()
    assert reranker_dir(tmp_path) is None  # a folder without an adapter is not a reranker
    (tmp_path / "reranker" / "adapter_config.json").write_text("{}")
    assert reranker_dir(tmp_path) == tmp_path / "reranker"


@pytest.mark.parametrize("field, value, message", [("depth", 0, "depth: must be >= 1"),
                                                   ("passage_tokens", 0, "passage_tokens: must be >= 1"),
                                                   ("rows", 0, "rows: must be >= 1"),
                                                   ("weight", 0.0, "weight: must be > 0")])
def test_bad_config(tiny, field, value, message):
    model, tok, _ = tiny
    with pytest.raises(ValueError, match=message):
        Reranker(model, tok, RerankConfig(**{field: value}))
