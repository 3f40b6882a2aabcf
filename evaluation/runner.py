"""Answer every question in every mode through the serving engine, and score each answer (evaluation/metrics.py).

Contexts. A closed-book mode (base, ft) is asked once, context "none". A retrieval mode (rag, rag+ft, raft+rag)
is asked twice with the same prompt builder (retrieval/rag.py build_prompt, sources numbered in rank order within
the prompt budget):
* "retrieved": the index's top-k chunks for the question, as a deployment would see them;
* "gold": the k chunks of the question's gold documents closest to the question (an exact cosine scan over
  those documents' stored vectors), i.e. what a perfect document retriever would hand over.
  A question with no gold documents (unanswerable, or a row without `sources`) has no gold context: it gets
  its retrieved context again, so the gold-context score of abstention is the retrieved one's.
A mode that reads well with gold context and badly with retrieved context loses its points in retrieval; one
that is bad with both loses them in reading.

Shapes: c = chunks of the gold documents, d = the encoder's dimension.

Batching. All prompts of one mode (both contexts) are submitted to the Engine at once and decoded greedily in
continuous batches of up to `max_batch`; identical prompts (always: an unanswerable question's two contexts;
sometimes: retrieval that found exactly the gold chunks) are answered once and that answer scored for each.
Each Result gives the prompt tokens, the time to first token and the total latency of that answer, both
measured from submission, so they include the wait in the queue behind the rest of the mode's questions (a
loaded server's view, not one request alone). The mode's wall seconds are kept.

Structured answers (`schema`, evaluate --json-schema): every prompt asks for a JSON answer of the schema and the
engine holds the output to it (retrieval prompts: with the citations field of retrieval/rag.py, whose numbers are
the cited sources). `json_valid` is whether the answer is a complete document of the grammar (it ended by the
grammar, not by max_new_tokens, and parses); `field_em` (rows whose `answer` is an object) the share of its fields
the answer got (metrics.field_exact_match). The text metrics (EM, F1, contains, abstention) stay off for these.

Retrieval scores (recall@k and MRR by document) belong to the index, not to a mode: `retrieval_records` computes
them per question for the index and, optionally, a baseline index over the same documents (before/after a tuned
retriever), and every "retrieved" record of a retrieval mode repeats the index's so a record stands alone.
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phiforge.engine.serve.constraint import Constraint
from phiforge.engine.serve.request import Request, Result
from phiforge.retrieval.chunkdb import DB, chunks_with_vectors, connect_reader
from phiforge.retrieval.qa import QARow, closed_book_messages
from phiforge.retrieval.rag import build_prompt, parse_citations, with_citations
from phiforge.retrieval.store import Hit

from . import metrics
from .modes import Mode


@dataclass
class Contexts:
    """Per question (in data order): the retrieved hits and the gold-context hits of one index."""
    retrieved: list[list]
    gold: list[list]
    gold_known: list[bool]   # False: no gold documents, so `gold` repeats `retrieved`


def doc(hit) -> str:
    return Path(hit.source).name


def gold_context(conn: sqlite3.Connection, q: np.ndarray, sources: list[str], k: int) -> list[Hit]:
    """The k chunks of `sources` (as the index stores them) closest to the query vector `q` (cosine, exact), best
    first. Reads only those documents' chunks and stored vectors from the index's database (`conn`), so the cost
    follows the gold documents' size, not the index's."""
    if not sources:
        return []
    rows = chunks_with_vectors(conn, sources)
    if not rows:
        return []
    vecs = np.frombuffer(b"".join(r[6] for r in rows), dtype=np.float32).reshape(len(rows), -1)  # (c, d)
    vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    scores = vecs @ (q / max(float(np.linalg.norm(q)), 1e-12))  # (c, d) @ (d,) -> (c,)
    order = np.argsort(-scores, kind="stable")[:k]
    return [Hit.of(rows[i], scores[i]) for i in order.tolist()]


def retrieve(index, rows: list[QARow], k: int, reranker=None) -> Contexts:
    """Top-k hits per question (the encoder's top `reranker.cfg.depth` reranked to k when given a
    retrieval/rerank.Reranker), and the k best chunks of its gold documents (one query encoding per question)."""
    vecs = index.encoder.encode([r.question for r in rows])  # (questions, d)
    retrieved, gold, known = [], [], []
    by_name: dict[str, list[str]] = {}
    for source in index.sources():
        by_name.setdefault(Path(source).name, []).append(source)
    conn = connect_reader(Path(index.folder) / DB)
    try:
        for row, q in zip(rows, vecs):
            hits = index.search_vector(q, k=k) if reranker is None else reranker.search(index, row.question, k, q)
            retrieved.append(hits)
            if row.sources:
                gold.append(gold_context(conn, q, [s for n in row.sources for s in by_name.get(n, [])], k))
                known.append(True)
            else:
                gold.append(hits)
                known.append(False)
    finally:
        conn.close()
    return Contexts(retrieved, gold, known)


def index_documents(index) -> set[str]:
    return {Path(s).name for s in index.sources()}


def retrieval_records(rows: list[QARow], after: Contexts, before: Contexts | None, k: int) -> list[dict]:
    """Per answerable question with gold documents: ranked documents, recall@k and MRR for each index."""
    out = []
    for i, row in enumerate(rows):
        if not row.sources:
            continue
        rec = {"line": row.line, "question": row.question, "gold_sources": list(row.sources)}
        for tag, ctx in (("after", after), ("before", before)):
            if ctx is None:
                continue
            ranked = [doc(h) for h in ctx.retrieved[i]]
            rec[tag] = {"docs": ranked, "recall": metrics.recall_at_k(ranked, row.sources, k),
                        "mrr": metrics.mrr(ranked, row.sources)}
        out.append(rec)
    return out


@dataclass
class _Prompt:
    row: QARow
    context: str            # none | retrieved | gold
    ids: list[int]
    shown: list[str]        # documents of the numbered sources, in prompt order ([] closed-book)
    ranked: list[str] | None  # the retrieved documents, best first (retrieved context only)
    schema: dict | None = None  # the structured answer's schema (with its citations field in a retrieval mode)


def _prompts(mode: Mode, rows: list[QARow], tokenizer, contexts: Contexts | None, budget: int, k: int,
             schema: dict | None = None) -> list[_Prompt]:
    out = []
    for i, row in enumerate(rows):
        if not mode.retrieval:
            ids = tokenizer.apply_chat_template(closed_book_messages(row.question, schema), add_generation_prompt=True)
            out.append(_Prompt(row, "none", list(ids), [], None, schema))
            continue
        for context, hits in (("retrieved", contexts.retrieved[i]), ("gold", contexts.gold[i])):
            messages, sources, _ = build_prompt(row.question, hits, tokenizer, budget, schema)
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            ranked = [doc(h) for h in contexts.retrieved[i]][:k] if context == "retrieved" else None
            held = None if schema is None else with_citations(schema, max(1, len(sources)))
            out.append(_Prompt(row, context, list(ids), [doc(s.hit) for s in sources], ranked, held))
    return out


def _structured(p: _Prompt, r: Result) -> tuple[dict | None, bool]:
    """(the parsed answer, whether it is a complete document of the schema's grammar)."""
    try:
        data = json.loads(r.text)
    except ValueError:
        return None, False
    return (data if isinstance(data, dict) else {"answer": data}), r.finish_reason == "stop"


def score(mode: Mode, p: _Prompt, r: Result, gold_known: bool = True) -> dict:
    """One per-question record: what was asked and answered, every metric, and the cost."""
    row, text = p.row, r.text
    answer = metrics.extract_answer(text)
    ok = row.answerable and p.schema is None
    abstain, false_abstain = metrics.abstention(answer, row.answerable) if p.schema is None else (None, None)
    cited = parse_citations(text) if p.shown else []
    data = valid = field_em = None
    if p.schema is not None:
        data, valid = _structured(p, r)
        cited = [n for n in dict.fromkeys((data or {}).get("citations", [])) if isinstance(n, int)] if p.shown else []
        field_em = metrics.field_exact_match(data, row.fields) if row.fields else None
    cite_p, cite_r = metrics.citation_scores(cited, p.shown, row.sources) if p.shown else (None, None)
    return {
        "mode": mode.name, "context": p.context, "line": row.line, "question": row.question,
        "answerable": row.answerable, "gold_answer": row.answer, "gold_sources": list(row.sources),
        "gold_context": gold_known if p.context == "gold" else None,
        "text": text, "answer": answer,
        "em": metrics.exact_match(answer, row.answer) if ok else None,
        "f1": metrics.token_f1(answer, row.answer) if ok else None,
        "contains": metrics.contains(answer, row.answer) if ok else None,
        "abstain": abstain, "false_abstain": false_abstain,
        "shown": p.shown, "cited": cited, "cited_any": float(bool(cited)) if p.shown else None,
        "cite_precision": cite_p, "cite_recall": cite_r,
        "json_valid": None if p.schema is None else float(valid), "field_em": field_em,
        "retrieved": p.ranked,
        "recall": metrics.recall_at_k(p.ranked, row.sources, len(p.ranked)) if p.ranked is not None else None,
        "mrr": metrics.mrr(p.ranked, row.sources) if p.ranked is not None else None,
        "ttft_s": r.ttft_s, "latency_s": r.latency_s, "prompt_tokens": r.usage.prompt_tokens,
        "completion_tokens": r.usage.completion_tokens, "finish_reason": r.finish_reason,
    }


def run_mode(engine, tokenizer, mode: Mode, rows: list[QARow], contexts: Contexts | None, *, k: int,
             budget: int, max_new_tokens: int, seed: int = 0,
             schema: dict | None = None) -> tuple[list[dict], float]:
    """Every question of `rows` answered in `mode` (both contexts for a retrieval mode): (records, wall seconds).
    schema: structured answers held to it (module docstring)."""
    if mode.retrieval and contexts is None:
        raise ValueError(f"mode {mode.name} needs an index (--index)")
    prompts = _prompts(mode, rows, tokenizer, contexts, budget, k, schema)
    known = {row.line: (contexts.gold_known[i] if contexts else True) for i, row in enumerate(rows)}
    t0 = time.perf_counter()
    handles: dict[tuple[int, ...], object] = {}
    for p in prompts:  # a prompt met twice (an unanswerable question's gold context is its retrieved one) runs once
        key = tuple(p.ids)
        if key not in handles:
            held = None if p.schema is None else Constraint("json_schema", p.schema, "--json-schema")
            handles[key] = engine.submit(Request(p.ids, max_new_tokens, seed=seed, adapter=mode.adapter,
                                                 constraint=held))
    results = [handles[tuple(p.ids)].result() for p in prompts]
    wall = time.perf_counter() - t0
    aborted = [r for r in results if r.finish_reason == "abort"]
    if aborted:
        raise RuntimeError(f"mode {mode.name}: {len(aborted)} request(s) aborted by the engine")
    return [score(mode, p, r, known[p.row.line]) for p, r in zip(prompts, results)], wall


def prompt_budget(context: int, max_prompt_tokens: int, max_new_tokens: int) -> int:
    """Tokens a prompt may take: the model's context (capped by max_prompt_tokens + the answer) minus the answer."""
    budget = min(context, max_prompt_tokens + max_new_tokens) - max_new_tokens
    if budget < 16:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: leaves {budget} of the model's {context} tokens of "
                         "context for the prompt; give less")
    return budget
