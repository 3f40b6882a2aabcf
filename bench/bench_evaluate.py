"""Evaluate bench: `phiforge evaluate`'s modes on a Q/A set (their scores and the seconds each mode takes), and the
retriever tuned to a domain (recall before and after, on labelled data nobody here wrote).

    python bench/bench_evaluate.py [--sections evaluate,retriever] [--data data/qa/test.jsonl] [--index DIR \
        --adapter ft=DIR --adapter raft=DIR] [--model DIR] [--k 3] [--max-new-tokens 48] [--max-batch 16] \
        [--threads N] [--out results.json]

Without --index and --adapter the `evaluate` section uses `make demo`'s: the demo index of the bundled documents
and the ft and raft adapters trained on data/qa/train.jsonl (phiforge/demo_evaluate.py; trained on first use, a few
minutes, and kept in $PHIFORGE_HOME/demo-eval).

Prints one JSON document. `evaluate` section: per mode, the wall seconds of answering every question (a
retrieval mode answers each twice: retrieved and gold context) and seconds per answer; per table row (mode and
context), each metric as [mean, lo, hi] of its 95% bootstrap interval with the number of questions it is
defined on; the index's retrieval recall@k and MRR by document; and the recommendation. Every mode whose
inputs are given runs (all five with --index and both adapters). Seconds are this machine under its current
load; compare modes within one run, never across runs.

`retriever` section: bench/bench_tune.py's `tuning()`: chatterbot-corpus split by question into a tuning half
and a held-out half; recall@1/5/10 and MRR@10 on the held-out half before and after `index tune`'s training on the
tuning half (three tuning seeds and their mean), and the out-of-domain check on the bundled documents' questions.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from phiforge.bench.bench_tune import tuning
from phiforge.bench.report import emit
from phiforge.demo_evaluate import prepare
from phiforge.evaluation import evaluate

REPO = Path(__file__).resolve().parents[1]


def _cells(metrics: dict) -> dict:
    return {k: (None if c is None else {"mean": round(c["mean"], 4), "lo": round(c["lo"], 4),
                                        "hi": round(c["hi"], 4), "n": c["n"]}) for k, c in metrics.items()}


def run_evaluate(args: argparse.Namespace) -> dict:
    """The modes on the Q/A set: seconds per mode and per answer, the table's cells, retrieval, recommendation."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        report = evaluate(args.model, args.data, index=args.index, adapters=args.adapter, modes=args.modes,
                          k=args.k, out=out, max_new_tokens=args.max_new_tokens, max_batch=args.max_batch,
                          seed=args.seed, log=lambda s: print(s, file=sys.stderr, flush=True))
        total = time.perf_counter() - t0
    answers = {}
    for row in report["table"]:
        answers[row["mode"]] = answers.get(row["mode"], 0) + row["questions"]
    return {
        "data": report["data"], "questions": report["questions"], "answerable": report["answerable"],
        "model": report["model"], "k": report["k"], "max_new_tokens": report["max_new_tokens"],
        "threads": torch.get_num_threads(), "total_seconds": round(total, 2),
        "modes": {m: {"seconds": round(s, 2), "answers": answers[m], "seconds_per_answer": round(s / answers[m], 3)}
                  for m, s in report["seconds"].items()},
        "table": {row["label"]: _cells(row["metrics"]) for row in report["table"]},
        "retrieval": report["retrieval"], "recommendation": report["recommendation"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the default model)")
    ap.add_argument("--data", default=str(REPO / "data" / "qa" / "test.jsonl"), help="Q/A JSONL (default: the "
                    "bundled test split)")
    ap.add_argument("--index", default=None, help="document index (the retrieval modes need it)")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="ft=DIR, raft=DIR")
    ap.add_argument("--modes", default=None, help="default: every mode whose inputs are given")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--sections", default="evaluate,retriever", help="comma-separated: evaluate, retriever")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = {x for x in args.sections.split(",") if x}
    if not sections <= {"evaluate", "retriever"}:
        ap.error(f"--sections: unknown {sorted(sections - {'evaluate', 'retriever'})}")
    result = {}
    if "evaluate" in sections:
        if args.index is None and not args.adapter:
            index, adapters = prepare()
            args.index, args.adapter = str(index), [f"{n}={d}" for n, d in adapters.items()]
        result["evaluate"] = run_evaluate(args)
    if "retriever" in sections:
        result["retriever"] = tuning()
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
