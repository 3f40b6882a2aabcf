"""Judge-free scores for one answer, and the bootstrap mean that turns a column of them into mean [lo, hi].

Every function scores one question; `None` means "not defined for this question" (no gold documents, no
citation) and is left out of the mean, never counted as 0 or 1. The empty cases, each decided once here:

* **Answer text** (`extract_answer`): citation brackets are removed; when the text has an `Answer:` marker (a
  RAFT-style target ends with `Answer: <answer> [n]`), only what follows the last marker is scored, so the
  reasoning before it neither helps nor hurts.
* **EM / token F1** (SQuAD): both sides normalised (lowercase, punctuation and the articles a/an/the dropped,
  whitespace collapsed). F1 over the bag of tokens; when either side has no tokens, F1 = EM = whether both have
  none.
* **Containment**: the normalised gold answer occurs in the normalised prediction on token boundaries ("1 hour"
  is in "within 1 hour", not in "11 hours"). An empty normalised gold answer is contained in nothing.
* **Retrieval recall@k / MRR** by document: `ranked` is the document name of each retrieved chunk, best first
  (a document may repeat). recall@k = share of gold documents among the first k; MRR = 1 / rank of the first
  chunk from a gold document (0 when none is in the list). No gold documents: None.
* **Citation precision / recall** by document: the numbers the model cites ([n]) are mapped to the documents
  of the sources it was shown. precision = cited numbers whose document is a gold one / cited numbers (a
  number naming no source, say [9] of 4, is a wrong citation); recall = gold documents cited / gold documents.
  No gold documents: both None (abstention scores those questions). Gold documents but no citation:
  precision None (nothing was claimed, so nothing is wrong; the share of answers citing at all is reported
  beside it), recall 0.
* **Abstention**: on an unanswerable question, 1 when the answer declines (retrieval/qa.py `abstained`), else
  0, None on answerable ones; false abstention is the mirror (1 when an answerable question is declined).

The bootstrap resamples questions with replacement (numpy's seeded generator), so the same seed and column give
the same interval; the interval is the 2.5th and 97.5th percentile of the resampled means.
Shapes: samples = bootstrap resamples, n = questions with a defined value.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from phiforge.retrieval.qa import abstained
from phiforge.retrieval.rag import CITATION

ANSWER_MARKER = "Answer:"
BOOTSTRAP_SAMPLES = 2000
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | set("‘’“”–—…£€")


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation, drop articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def extract_answer(text: str) -> str:
    """The part of a model's text that is scored: after the last `Answer:` marker if any, citations removed."""
    i = text.rfind(ANSWER_MARKER)
    if i >= 0:
        text = text[i + len(ANSWER_MARKER):]
    return " ".join(CITATION.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: str, gold: str) -> float:
    g = normalize_answer(gold)
    return float(bool(g) and f" {g} " in f" {normalize_answer(prediction)} ")


def field_exact_match(prediction: dict | None, gold: dict) -> float:
    """The share of the gold fields the structured answer got exactly: numbers equal as numbers (1.5 == 1.50),
    booleans only to booleans, strings after normalize_answer, anything else by ==. A missing answer (cut, not JSON) scores 0."""
    if not gold:
        raise ValueError("field_exact_match needs at least one gold field")
    if not isinstance(prediction, dict):
        return 0.0

    def same(p, g) -> bool:
        if isinstance(g, bool) or isinstance(p, bool):  # JSON's true is not the number 1
            return p is g
        if isinstance(g, (int, float)):
            return isinstance(p, (int, float)) and abs(p - g) <= 1e-9 * max(1, abs(g))
        if isinstance(g, str):
            return isinstance(p, str) and normalize_answer(p) == normalize_answer(g)
        return p == g
    return sum(same(prediction.get(k), v) for k, v in gold.items()) / len(gold)


def recall_at_k(ranked: Sequence[str], gold: Iterable[str], k: int) -> float | None:
    gold = set(gold)
    if not gold:
        return None
    return len(gold & set(ranked[:k])) / len(gold)


def mrr(ranked: Sequence[str], gold: Iterable[str]) -> float | None:
    gold = set(gold)
    if not gold:
        return None
    return next((1.0 / (i + 1) for i, d in enumerate(ranked) if d in gold), 0.0)


def citation_scores(cited: Sequence[int], shown: Sequence[str], gold: Iterable[str]) -> tuple[float | None,
                                                                                               float | None]:
    """(precision, recall) of cited numbers (1-based into `shown`, the documents of the sources shown)."""
    gold = set(gold)
    if not gold:
        return None, None
    docs = [shown[n - 1] if 1 <= n <= len(shown) else None for n in cited]
    precision = sum(d in gold for d in docs) / len(docs) if docs else None
    recall = len(gold & {d for d in docs if d is not None}) / len(gold)
    return precision, recall


def abstention(text: str, answerable: bool) -> tuple[float | None, float | None]:
    """(abstained on an unanswerable question, abstained on an answerable one): the other is None."""
    a = float(abstained(text))
    return (None, a) if answerable else (a, None)


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    n: int

    def overlaps(self, other: "Interval") -> bool:
        return self.lo <= other.hi and other.lo <= self.hi

    def to_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n}


def bootstrap_mean(values: Iterable[float | None], seed: int = 0,
                   samples: int = BOOTSTRAP_SAMPLES) -> Interval | None:
    """Mean of the defined values with a 95% percentile bootstrap interval; None when no value is defined."""
    x = np.array([float(v) for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return None
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, mean, mean, 1)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)  # (samples, n) -> (samples,)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return Interval(mean, float(min(lo, mean)), float(max(hi, mean)), int(x.size))
