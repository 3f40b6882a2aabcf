"""chunks.sqlite's write transactions: all or nothing, and the generation moves only with a commit."""
from __future__ import annotations

import numpy as np
import pytest

from phiforge.retrieval.chunkdb import (drop_source, file_sha, generation, open_db, replace_source,
                                        sources_matching)
from phiforge.retrieval.chunking import Chunk


def chunks(source: str, texts: list[str]) -> list[Chunk]:
    return [Chunk(source, "", 10 * i, 10 * i + len(t), t, len(t.split())) for i, t in enumerate(texts)]


def test_a_failed_replace_leaves_the_old_chunks_and_generation(tmp_path):
    db, gen, _, _ = open_db(tmp_path / "c.sqlite")
    old, new = replace_source(db, "/d/a.md", "sha1", 10, chunks("/d/a.md", ["one", "two"]), np.ones((2, 4), np.float32))
    assert old == [] and len(new) == 2 and generation(db) == gen + 1

    class Broken:  # fails after the old chunks were deleted inside the transaction
        heading = start = end = text = hash = n_tokens = None
    with pytest.raises(Exception):
        replace_source(db, "/d/a.md", "sha2", 10, chunks("/d/a.md", ["three"]) + [Broken()],
                       np.ones((2, 4), np.float32))
    assert generation(db) == gen + 1 and file_sha(db, "/d/a.md") == "sha1"
    assert [r[0] for r in db.execute("SELECT text FROM chunks ORDER BY id")] == ["one", "two"]
    # the connection is out of the failed transaction: the next write commits
    replace_source(db, "/d/b.md", "sha3", 5, chunks("/d/b.md", ["four"]), np.ones((1, 4), np.float32))
    assert sorted(sources_matching(db, under="/d")) == ["/d/a.md", "/d/b.md"] and generation(db) == gen + 2
    assert drop_source(db, "/d/a.md") == new and sources_matching(db, "/d/a.md") == [] and generation(db) == gen + 3
