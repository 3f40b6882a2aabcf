"""The bundled Q/A set (data/qa/train.jsonl, test.jsonl) for the water-utility documents in data/docs: it loads, every
source is a bundled document, every answer's key facts are in its document's text, no test question is a train
question, and the splits hold what the comparison of RAG and fine-tuning needs (unanswerable questions; test facts
that training covers in other words, and some it does not)."""
from __future__ import annotations

from pathlib import Path

import pytest

from phiforge.retrieval.chunking import read_document
from phiforge.retrieval.qa import ABSTAIN_ANSWER, load_qa
from phiforge.retrieval.raft import key_tokens

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "data" / "docs"
TRAIN, TEST = load_qa(REPO / "data" / "qa" / "train.jsonl"), load_qa(REPO / "data" / "qa" / "test.jsonl")
TEXT = {p.name: read_document(p).text for p in DOCS.iterdir()}  # as indexed: HTML without its tags


def norm(q: str) -> str:
    return " ".join(q.lower().split())


@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_are_in_their_documents(split):
    rows = TRAIN if split == "train" else TEST
    for r in rows:
        where = f"{split}:{r.line}"
        if not r.answerable:
            assert r.answer == ABSTAIN_ANSWER and not r.sources, where
            continue
        assert r.sources and all(s in TEXT for s in r.sources), where
        numbers, words = key_tokens(r.answer)
        doc_numbers, doc_words = set(), set()
        for s in r.sources:
            n, w = key_tokens(TEXT[s])
            doc_numbers |= n
            doc_words |= w
        assert numbers <= doc_numbers, (where, numbers - doc_numbers)
        assert words <= doc_words, (where, words - doc_words)
        assert numbers or words, where


def test_splits_have_the_shape_the_comparison_needs():
    assert len(TRAIN) + len(TEST) >= 60 + 7 and len(TRAIN) >= 45 and len(TEST) >= 20
    for rows in (TRAIN, TEST):
        share = sum(not r.answerable for r in rows) / len(rows)
        assert 0.10 <= share <= 0.15, share
        assert len({norm(r.question) for r in rows}) == len(rows)  # no question twice in a split
    assert not {norm(r.question) for r in TEST} & {norm(r.question) for r in TRAIN}
    train_facts = [key_tokens(r.answer) for r in TRAIN if r.answerable]
    # a test fact is covered when some train answer holds all its numbers and words
    covered = [r for r in TEST if r.answerable and any(key_tokens(r.answer)[0] <= n and key_tokens(r.answer)[1] <= w
                                                      for n, w in train_facts)]
    answerable = [r for r in TEST if r.answerable]
    assert len(covered) >= len(answerable) // 2  # most test facts are taught by a train question in other words ...
    assert len(answerable) - len(covered) >= 5  # ... and some are not, so fine-tuning alone cannot know them
    assert {s for r in TRAIN for s in r.sources} == set(TEXT)  # every document is trained on
