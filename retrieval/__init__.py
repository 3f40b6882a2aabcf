"""phiforge.retrieval: a from-scratch MiniLM encoder, an hnswlib + SQLite document index, and RAG with citations.

    from phiforge.retrieval import load_encoder, Index
    idx = Index.open("my_index")          # created if missing
    idx.add(["docs/"])                    # incremental: unchanged files embed nothing
    for hit in idx.search("boil water notice", k=5):
        print(hit.score, hit.source, hit.heading)

Public names are imported on first use (PEP 562), so importing one module (`phiforge.retrieval.rag`) does not
load the whole retrieval layer.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_encoder": "encoder",
    "Encoder": "encoder",
    "Index": "store",
    "Hit": "store",
    "chunk_file": "chunking",
    "Chunk": "chunking",
    "answer": "rag",
    "Reranker": "rerank",
    "load_reranker": "rerank",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'phiforge.retrieval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"phiforge.retrieval.{_EXPORTS[name]}"), name)
