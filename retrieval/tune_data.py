"""Training pairs for `phiforge index tune`: each Q/A row's question and its gold passage.

With an index, the passages are the index's chunks (the text the encoder embeds: heading + text), and a question's
gold is the chunk of its source documents that holds most of the answer's numbers and content words, the rule RAFT
picks its gold chunk by (raft.overlap; ties: the one the untuned encoder ranks higher for the question); every
chunk of its source documents counts as relevant, so none of them is ever used as its negative (a document often
repeats a fact in a second chunk). Without an index, the answers are the passages (question -> reply data, like the
chatterbot corpus): one passage per distinct answer, and every answer given to the same question text is relevant
to it.

Unanswerable rows are left out (they have no gold passage); with an index, so are rows without sources.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .chunkdb import DB, all_chunks, connect_reader
from .chunking import Chunk
from .encoder import Encoder
from .manifest import MANIFEST
from .qa import QAError, QARow
from .raft import overlap
from .store import NoIndexError
from .tune import Pair


@dataclass
class TuneSet:
    corpus: list[str]
    pairs: list[Pair]
    corpus_vecs: np.ndarray | None = None  # the untuned encoder's chunk vectors, when computed here
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows


def index_chunks(folder: str | Path) -> list[tuple[str, str]]:
    """(source file name, embed text) of every chunk of an index, in id order; read-only."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file() or not (folder / DB).is_file():
        raise NoIndexError(f"--index {folder}: no index there (`phiforge index add PATH --index {folder}` makes one)")
    conn = connect_reader(folder / DB)
    try:
        rows = all_chunks(conn)
    finally:
        conn.close()
    if not rows:
        raise ValueError(f"--index {folder}: the index is empty")
    return [(Path(src).name, Chunk(src, head, 0, 0, text, 0).embed_text) for src, head, text in rows]


def answer_pairs(rows: list[QARow], path: str) -> TuneSet:
    """Answers as passages (no index)."""
    ids: dict[str, int] = {}
    by_question: dict[str, set[int]] = {}
    usable = [r for r in rows if r.answerable]
    for r in usable:
        by_question.setdefault(r.question, set()).add(ids.setdefault(r.answer, len(ids)))
    pairs = [Pair(r.question, ids[r.answer], frozenset(by_question[r.question])) for r in usable]
    return _checked(TuneSet(list(ids), pairs, skipped={"unanswerable": len(rows) - len(usable)}), path)


def index_pairs(rows: list[QARow], path: str, index: str | Path, enc: Encoder) -> TuneSet:
    """Index chunks as passages; gold = the source chunk holding most of the answer, by the rule RAFT picks its
    gold chunk with (raft.overlap: numbers and content words), ties to the chunk closest to the question."""
    chunks = index_chunks(index)
    by_source: dict[str, list[int]] = {}
    for i, (src, _) in enumerate(chunks):
        by_source.setdefault(src, []).append(i)
    skipped = {"unanswerable": sum(not r.answerable for r in rows),
               "no sources": sum(r.answerable and not r.sources for r in rows)}
    usable = [r for r in rows if r.answerable and r.sources]
    for r in usable:
        gone = [s for s in r.sources if s not in by_source]
        if gone:
            raise QAError(f"{path}:{r.line}: source {gone[0]!r} is not in index {index} "
                          f"(it holds {len(by_source)} files)")
    corpus = [text for _, text in chunks]
    cv = enc.encode(corpus) if usable else None  # (N, H)
    qv = enc.encode([r.question for r in usable]) if usable else None  # (Q, H)
    pairs = []
    for qi, r in enumerate(usable):
        cands = [i for s in r.sources for i in by_source[s]]
        gold = max(cands, key=lambda i: (overlap(r.answer, corpus[i]), float(qv[qi] @ cv[i])))
        pairs.append(Pair(r.question, gold, frozenset(cands)))
    return _checked(TuneSet(corpus, pairs, cv, skipped), path)


def _checked(ts: TuneSet, path: str) -> TuneSet:
    if len(ts.pairs) < 2:
        why = ", ".join(f"{n} {k}" for k, n in ts.skipped.items() if n)
        raise QAError(f"{path}: {len(ts.pairs)} usable rows, need at least 2 answerable questions with a gold "
                      f"passage to tune on ({why or 'nothing else'} left out)")
    return ts
