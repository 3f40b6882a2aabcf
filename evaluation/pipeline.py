"""`evaluate(...)`: RAG or fine-tuning, measured on the user's own questions; what `phiforge evaluate` runs.

    report = evaluate("runs/base-model", "data/qa/test.jsonl", index="runs/index",
                      adapters={"ft": "runs/ft-lora", "raft": "runs/raft-lora"}, out="runs/eval")
    print(report["recommendation"])

1. Check everything a run needs before any model is loaded: the Q/A file (file:line errors), the modes and
   their inputs (evaluation/modes.py), the adapters, the index, and that every gold source of the Q/A file is a
   document of the index (else recall and gold context would silently be zero).
2. Retrieve once per question: top-k from the index (and from the baseline index, for retrieval before/after),
   and the gold context (evaluation/runner.py).
3. Load the model once, with every adapter the chosen modes use, into one serving Engine; answer mode by mode
   (all of a mode's prompts submitted at once), greedily.
4. Summarise (evaluation/summary.py) and write the report (evaluation/report.py).

Ctrl-C between or during modes keeps what finished: the report of the completed modes is written (marked
`interrupted`) before the interrupt goes on to the caller.

An adapter runs on the base it was trained on: when a QLoRA adapter is among them, the Engine quantizes the
base to NF4 at start, so every mode (base included) answers on that same NF4 base.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from phiforge.engine.formats.peft import check_adapter_dir
from phiforge.engine.model.config import Phi3Config
from phiforge.engine.pretrained import load_engine, model_path
from phiforge.retrieval.qa import QAError, load_qa
from phiforge.retrieval.rerank import reranker_for
from phiforge.retrieval.store import Index

from .modes import ModeError, parse_adapters, parse_modes, select_modes
from .report import write_report
from .runner import index_documents, prompt_budget, retrieval_records, retrieve, run_mode
from .summary import recommend, summarize, summarize_retrieval

DEFAULT_K = 4
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_PROMPT_TOKENS = 1024  # prefill time grows with the prompt; k=4 chunks of the bundled docs fit


def _positive(**flags: int) -> None:
    for flag, v in flags.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"--{flag.replace('_', '-')}: must be >= 1, got {v}")


def _adapter_dirs(adapters: dict[str, str | Path] | list[str] | None) -> dict[str, Path]:
    if adapters is None:
        return {}
    if isinstance(adapters, dict):
        adapters = [f"{n}={d}" for n, d in adapters.items()]
    return parse_adapters(list(adapters))


def _check_sources(rows, docs: set[str], data: Path, folder: Path) -> None:
    for row in rows:
        for s in row.sources:
            if s not in docs:
                raise QAError(f"{data}:{row.line}: field 'sources' names {s!r}, which is not a document of the "
                              f"index {folder}")


def evaluate(model: str | Path | None, data: str | Path, *, index: str | Path | None = None,
             adapters: dict[str, str | Path] | list[str] | None = None, modes: str | list[str] | None = None,
             k: int = DEFAULT_K, out: str | Path | None = None, quant: str | None = None,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_batch: int = DEFAULT_MAX_BATCH, seed: int = 0,
             retriever_baseline: str | Path | None = None, max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
             dtype: torch.dtype | None = None, encoder=None, baseline_encoder=None, rerank: bool = False,
             json_schema: dict | None = None, batch_invariant: bool = True,
             log: Callable[[str], None] | None = print) -> dict:
    """Answer every question of `data` in every chosen mode, score, and (with `out`) write the report files.

    model: a model directory or Hugging Face id (None: the default model). adapters: {"ft": dir, "raft": dir}
    or ["ft=DIR", ...]. modes: "base,rag" or a list (None: every mode whose inputs are given). encoder /
    baseline_encoder: the query encoders of `index` / `retriever_baseline` (None: the index's default). rerank:
    `index`'s retrieval reranked by the language model (retrieval/rerank.py: the reranker `index tune --rerank`
    saved beside the index's encoder, else the default model zero-shot); the baseline's never is. json_schema:
    structured answers held to it, scored for validity and per-field exact match (evaluation/runner.py).
    batch_invariant: the Engine's (an answer does not depend on the other questions in its batch).
    Returns the report dict (what report.json holds).
    """
    log = log or (lambda s: None)
    _positive(k=k, max_new_tokens=max_new_tokens, max_batch=max_batch, max_prompt_tokens=max_prompt_tokens)
    if quant not in (None, "nf4"):
        raise ValueError(f"--quant {quant!r}: the one quantization is nf4")
    data = Path(data)
    if not data.is_file():
        raise QAError(f"--data {data}: no such file")
    rows = load_qa(data)
    adapter_dirs = _adapter_dirs(adapters)
    chosen = select_modes(parse_modes(modes), index is not None, adapter_dirs)
    if rerank and index is None:
        raise ModeError("--rerank: needs --index (the retrieval it reranks)")
    if retriever_baseline is not None and index is None:
        raise ModeError("--retriever-baseline: needs --index (the retriever it is compared with)")
    used = {m.adapter for m in chosen if m.adapter}
    adapter_dirs = {n: check_adapter_dir(d) for n, d in adapter_dirs.items() if n in used}
    path = model_path(model)

    contexts = baseline = None
    if index is not None:
        with Index.open(index, encoder=encoder, create=False) as ix:
            _check_sources(rows, index_documents(ix), data, Path(index))
            reranker = reranker_for(ix) if rerank else None
            log(f"retrieving top-{k} for {len(rows)} questions from {index}"
                + (f", reranked from the top {reranker.cfg.depth}" if reranker else ""))
            contexts = retrieve(ix, rows, k, reranker)
            del reranker
        if retriever_baseline is not None:
            with Index.open(retriever_baseline, encoder=baseline_encoder, create=False) as bx:
                _check_sources(rows, index_documents(bx), data, Path(retriever_baseline))
                baseline = retrieve(bx, rows, k)
    ret_records = retrieval_records(rows, contexts, baseline, k) if contexts else []

    ctx = int(Phi3Config.from_file(path).max_position_embeddings)
    budget = prompt_budget(ctx, max_prompt_tokens, max_new_tokens)
    row_len = min(ctx, budget + max_new_tokens)
    # a mode submits every prompt at once (two per question in a retrieval mode): the queue must hold them all
    engine, tokenizer = load_engine(path, adapter_dirs or None, dtype=dtype, quant=quant, max_batch=max_batch,
                                    kv_tokens=max_batch * row_len, max_queue=2 * len(rows),
                                    max_adapters=len(adapter_dirs) or None, batch_invariant=batch_invariant)
    records: list[dict] = []
    seconds: dict[str, float] = {}

    def finish(interrupted: bool) -> dict:
        report = _report(path, data, index, retriever_baseline, adapter_dirs, rows, k, max_new_tokens,
                         max_prompt_tokens, seed, list(seconds), records, seconds, ret_records, interrupted)
        report["rerank"] = rerank
        report["json_schema"] = json_schema
        if out is not None:
            write_report(out, report, records, ret_records)
        return report

    try:
        for mode in chosen:
            log(f"mode {mode.name}: answering {len(rows)} questions"
                + (" with retrieved and gold context" if mode.retrieval else ""))
            recs, wall = run_mode(engine, tokenizer, mode, rows, contexts, k=k, budget=budget,
                                  max_new_tokens=max_new_tokens, seed=seed, schema=json_schema)
            records += recs
            seconds[mode.name] = wall
            log(f"mode {mode.name}: {len(recs)} answers in {wall:.1f} s")
    except KeyboardInterrupt:
        if records:
            finish(interrupted=True)
            if out is not None:
                log(f"interrupted: the report of the finished modes ({', '.join(seconds)}) is in {out}")
        raise
    finally:
        engine.shutdown(drain=False)
    return finish(interrupted=False)


def _report(model: Path, data: Path, index, baseline, adapters: dict[str, Path], rows, k: int, max_new_tokens: int,
            max_prompt_tokens: int, seed: int, modes: list[str], records: list[dict], seconds: dict[str, float],
            ret_records: list[dict], interrupted: bool) -> dict:
    table = summarize(records, seconds, seed)
    retrieval = summarize_retrieval(ret_records, k, seed)
    return {
        "model": str(model), "data": str(data), "index": str(index) if index else None,
        "retriever_baseline": str(baseline) if baseline else None,
        "adapters": {n: str(d) for n, d in adapters.items()}, "modes": modes, "k": k,
        "max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens, "seed": seed,
        "questions": len(rows), "answerable": sum(r.answerable for r in rows), "seconds": seconds,
        "table": table, "retrieval": retrieval, "recommendation": recommend(table, retrieval),
        "interrupted": interrupted,
    }

