"""`index tune`'s training pairs from an index: the gold chunk is picked by the rule RAFT uses (raft.overlap)."""
from __future__ import annotations

import numpy as np

from phiforge.retrieval.chunking import Chunk
from phiforge.retrieval.qa import QARow
from phiforge.retrieval.store import Index
from phiforge.retrieval.tune_data import index_pairs

TEXTS = {
    "/docs/tariff.md": ["The tariff is reviewed every year and the tariff is published.",  # the answer's small words
                        "Water costs 1.87 per cubic metre."],  # the answer's number
    "/docs/leaks.md": ["Report leaks on the emergency line.", "Leak repairs take four hours."],
}
QUESTION_VECS = {"What is the tariff?": [1, 0, 0], "How long do leak repairs take?": [0, 1, 0]}


class TableEncoder:
    name, dim = "table-encoder", 3

    def __init__(self):  # chunk vectors: the chunk *without* the answer is the one closer to its question
        self.table = dict(QUESTION_VECS)
        self.table.update({TEXTS["/docs/tariff.md"][0]: [1, 0.1, 0], TEXTS["/docs/tariff.md"][1]: [0.5, 0.5, 0.7],
                           TEXTS["/docs/leaks.md"][0]: [0.1, 1, 0], TEXTS["/docs/leaks.md"][1]: [0.5, 0.5, 0.7]})

    def encode(self, texts):
        v = np.array([self.table[t] for t in texts], np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_gold_chunk_holds_the_answers_numbers_and_content_words(tmp_path):
    enc = TableEncoder()
    chunks = [Chunk(src, "", 100 * i, 100 * i + len(t), t, len(t.split())) for src, ts in TEXTS.items()
              for i, t in enumerate(ts)]
    with Index.open(tmp_path / "ix", encoder=enc) as ix:
        ix.add_chunks(chunks, enc.encode([c.text for c in chunks]))
    rows = [QARow("What is the tariff?", "The tariff is 1.87", ("tariff.md",)),
            QARow("How long do leak repairs take?", "Four hours", ("leaks.md",))]
    ts = index_pairs(rows, "qa.jsonl", tmp_path / "ix", enc)
    golds = [ts.corpus[p.gold] for p in ts.pairs]
    # a share of all the answer's words would pick the first tariff chunk (the, tariff, is: 3 of 5 words), and so
    # would the untuned encoder; the number 1.87 (2 points) outweighs the one content word "tariff" (1 point)
    assert golds == [TEXTS["/docs/tariff.md"][1], TEXTS["/docs/leaks.md"][1]]
    # every chunk of a row's source documents is relevant to it, so none is ever its negative
    assert [sorted(ts.corpus[j] for j in p.relevant) for p in ts.pairs] == [sorted(ts_) for ts_ in TEXTS.values()]
