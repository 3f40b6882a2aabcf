"""`phiforge evaluate`: RAG or fine-tuning, side by side on the user's own questions (phiforge/evaluation).

    phiforge evaluate --data qa.jsonl                                   # base model, closed-book
    phiforge evaluate --model DIR --data data/qa/test.jsonl --index runs/index \\
        --adapter ft=runs/ft-lora --adapter raft=runs/raft-lora --out runs/eval
    phiforge evaluate --data qa.jsonl --index runs/tuned-index --retriever-baseline runs/index --modes rag
    phiforge evaluate --data data/qa/tariffs.jsonl --index runs/index --json-schema data/schemas/tariff.json

Prints the table and the recommendation; with --out also writes report.md, report.json, chart.png,
results.jsonl and retrieval.jsonl there. Bad flags, a bad Q/A row (file:line), an unknown mode, a mode without
its input, a missing adapter directory: one `error:` line, exit 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from phiforge.commands.generate import add_batch_invariant
from phiforge.engine.formats.peft import AdapterError
from phiforge.engine.serve.constraint import read_schema
from phiforge.engine.serve.request import EngineError
from phiforge.evaluation import evaluate
from phiforge.evaluation.pipeline import (DEFAULT_K, DEFAULT_MAX_BATCH, DEFAULT_MAX_NEW_TOKENS,
                                          DEFAULT_MAX_PROMPT_TOKENS)
from phiforge.evaluation.modes import MODES
from phiforge.evaluation.report import markdown
from phiforge.retrieval.manifest import IndexCorrupt, IndexMismatch
from phiforge.retrieval.store import EmptyIndexError

USER_ERRORS = (EmptyIndexError, IndexCorrupt, IndexMismatch, AdapterError, EngineError)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="model directory or Hugging Face id (default: the default model)")
    p.add_argument("--data", required=True, metavar="QA.jsonl",
                   help='questions, one JSON object a line: {"question", "answer", "sources": [...], "answerable"}')
    p.add_argument("--index", default=None, metavar="DIR", help="document index for the retrieval modes")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="ft=DIR (LoRA tuned without context) or raft=DIR (tuned on retrieved context); repeatable")
    p.add_argument("--modes", default=None, metavar="M,M",
                   help=f"comma-separated, of {','.join(MODES)} (default: every mode whose inputs are given)")
    p.add_argument("--k", type=int, default=DEFAULT_K, help=f"chunks retrieved per question (default {DEFAULT_K})")
    p.add_argument("--out", default=None, metavar="DIR", help="write the report files here")
    p.add_argument("--quant", choices=["nf4"], default=None, help="quantize the decoder projections while loading")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"answer length cap (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--max-prompt-tokens", type=int, default=DEFAULT_MAX_PROMPT_TOKENS,
                   help=f"prompt budget for the sources, capped by the model's context "
                        f"(default {DEFAULT_MAX_PROMPT_TOKENS})")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"answers decoded together (default {DEFAULT_MAX_BATCH})")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (answers are greedy)")
    p.add_argument("--retriever-baseline", default=None, metavar="DIR",
                   help="a second index over the same documents (e.g. the untuned encoder's): retrieval before/after")
    p.add_argument("--rerank", action="store_true", help="rerank --index's hits with the language model (the "
                   "reranker `index tune --rerank` saved beside its encoder, else the default model zero-shot)")
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="structured answers: every answer held to the JSON schema in FILE, scored for validity and, "
                        "on rows whose answer is an object, per-field exact match")
    add_batch_invariant(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: must be >= 1 when given, got {args.threads}")
        torch.set_num_threads(args.threads)
    for flag, v in (("--index", args.index), ("--retriever-baseline", args.retriever_baseline)):
        if v is not None and not Path(v).is_dir():
            raise FileNotFoundError(f"{flag} {v}: no such directory")
    report = evaluate(args.model, args.data, index=args.index, adapters=args.adapter, modes=args.modes, k=args.k,
                      out=args.out, quant=args.quant, max_new_tokens=args.max_new_tokens, max_batch=args.max_batch,
                      seed=args.seed, retriever_baseline=args.retriever_baseline, rerank=args.rerank,
                      max_prompt_tokens=args.max_prompt_tokens,
                      json_schema=read_schema(args.json_schema) if args.json_schema else None,
                      batch_invariant=args.batch_invariant == "on",
                      log=lambda s: print(f"phiforge evaluate: {s}", file=sys.stderr, flush=True))
    print(markdown(report), end="")
    if args.out:
        print(f"\nwritten to {args.out}: report.md, report.json, chart.png, results.jsonl, retrieval.jsonl")
    return 0
