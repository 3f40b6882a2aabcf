"""CLI hooks for `phiforge index add|rm|stats`, `phiforge search` and `phiforge ask` (routed by phiforge/cli.py).

    phiforge index add docs/ notes.md --index idx/ [--encoder TUNED_DIR]
    phiforge index tune --data qa.jsonl --out TUNED_DIR [--index idx/] [--epochs N] [--lr X] [--lora-rank R]
    phiforge index rm docs/old.md --index idx/
    phiforge index stats --index idx/
    phiforge search --index idx/ "boil water notice" -k 5 [--rerank]
    phiforge ask --index idx/ [--model DIR] [--adapter DIR] [--rerank] "When is a boil water notice issued?"

Errors the user can fix (no index, empty index, corrupt file, wrong encoder, unknown source, a path that does not
exist, a bad Q/A row) print one line to stderr and exit 1 instead of a traceback. Only `index add` creates an
index; the other commands open it read-only and say when there is none. Re-adding a folder syncs it: files deleted
from it leave the index. An index keeps the encoder it was built with (`index add --encoder DIR` for a tuned one)
and every later command loads that one. `--rerank` (search, ask) rescores the encoder's top candidates with the
language model (retrieval/rerank.py): with the reranker `index tune --rerank` trained beside the index's encoder
when there is one, else the default model zero-shot.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from phiforge.engine.model.weights import resolve_model
from phiforge.engine.pretrained import compute_dtype, load_generator
from phiforge.engine.serve.constraint import read_schema

from .chunking import Skipped
from .encoder import TUNED_CONFIG, load_encoder
from .manifest import IndexCorrupt, IndexMismatch
from .qa import load_qa
from .rag import answer_question, context_length, format_sources
from .rerank import RERANKER_DIR, RerankConfig, reranker_for, train_reranker
from .store import EmptyIndexError, Index, NoIndexError
from .tune import NEGATIVE_POOLS, TuneConfig, save_tuned, tune
from .tune_data import answer_pairs, index_pairs

LORA_LR = 3e-4  # LoRA's few weights want a larger step than full fine-tuning
# Errors the user can fix: one line on stderr, exit 1.
USER_ERRORS = (EmptyIndexError, NoIndexError, IndexCorrupt, IndexMismatch, Skipped, KeyError, ValueError,
               FileNotFoundError)


def _index_arg(p: argparse.ArgumentParser, creates: bool = False) -> None:
    p.add_argument("--index", required=True, metavar="DIR",
                   help="index folder" + (" (created if missing)" if creates else " (made by `phiforge index add`)"))


def _fail(e: BaseException) -> int:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {msg}", file=sys.stderr)
    return 1


# ---------------------------------------------------------------------------------------------------- index
def add_arguments_index(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="add or update files and folders (.txt .md .html .jsonl)")
    add.add_argument("paths", nargs="+", metavar="PATH", help="files and folders; re-adding a folder also drops the "
                     "files deleted from it")
    _index_arg(add, creates=True)
    add.add_argument("--encoder", metavar="DIR", help="a tuned encoder from `phiforge index tune` (default: the "
                     "index's own encoder, or all-MiniLM-L6-v2 for a new index)")
    rm = sub.add_parser("rm", help="remove a source file (or every file under a folder)")
    rm.add_argument("source", metavar="SOURCE")
    _index_arg(rm)
    stats = sub.add_parser("stats", help="counts, sizes and search settings")
    _index_arg(stats)
    stats.add_argument("--json", action="store_true", help="print JSON")
    t = sub.add_parser("tune", help="fine-tune the embedding model on question/answer pairs (see README)")
    t.add_argument("--data", required=True, metavar="QA.jsonl", help="rows {question, answer, sources, answerable}")
    t.add_argument("--out", required=True, metavar="DIR", help="folder for the tuned encoder")
    t.add_argument("--index", metavar="DIR", help="index whose chunks are the passages (gold: the chunk of a "
                   "question's sources holding its answer); without it the answers are the passages")
    d = TuneConfig()
    t.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    t.add_argument("--lr", type=float, default=None, help=f"learning rate (default {d.lr} for all weights, "
                   f"{LORA_LR} with --lora-rank)")
    t.add_argument("--batch", type=int, default=d.batch, help=f"questions per step (default {d.batch})")
    t.add_argument("--hard-negatives", type=int, default=d.hard_negatives,
                   help=f"mined negatives per question (default {d.hard_negatives})")
    t.add_argument("--negatives-from", choices=NEGATIVE_POOLS, default=d.negatives_from,
                   help="mine hard negatives among the other questions' gold passages, or the whole corpus "
                   f"(default {d.negatives_from})")
    t.add_argument("--remine", action=argparse.BooleanOptionalAction, default=d.remine,
                   help="mine the hard negatives again with the partly tuned encoder before each later epoch "
                   f"(default {'on' if d.remine else 'off'})")
    t.add_argument("--lora-rank", type=int, default=0,
                   help="train a LoRA adapter of this rank (default 0: all weights)")
    t.add_argument("--interpolate", type=float, default=d.interpolate, metavar="A",
                   help=f"keep A * tuned + (1 - A) * untuned weights, WiSE-FT (default {d.interpolate})")
    t.add_argument("--rerank", action="store_true", help="also LoRA-tune the language model as a reranker on the "
                   f"same pairs, into OUT/{RERANKER_DIR} (search/ask --rerank use it; default off)")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; on a busy "
                   "machine 1 can be faster)")


def run_tune(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir()) and not (out / TUNED_CONFIG).is_file()):
        # the folder is replaced as a whole: never a folder that holds something else
        raise ValueError(f"--out {out}: exists and is not a tuned encoder folder (give a new or empty folder)")
    lr = (LORA_LR if args.lora_rank else TuneConfig.lr) if args.lr is None else args.lr
    cfg = TuneConfig(epochs=args.epochs, lr=lr, batch=args.batch, hard_negatives=args.hard_negatives,
                     lora_rank=args.lora_rank, interpolate=args.interpolate, seed=args.seed,
                     negatives_from=args.negatives_from, remine=args.remine)
    cfg.check()
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: must be >= 1 when given, got {args.threads}")
        torch.set_num_threads(args.threads)
    rows = load_qa(args.data)
    enc = load_encoder()
    ts = index_pairs(rows, args.data, args.index, enc) if args.index else answer_pairs(rows, args.data)
    left = ", ".join(f"{n} {k}" for k, n in ts.skipped.items() if n)
    print(f"{len(ts.pairs)} questions over {len(ts.corpus)} passages{f' ({left} left out)' if left else ''}")
    res = tune(enc, ts.corpus, ts.pairs, cfg, log=print, corpus_vecs=ts.corpus_vecs)
    if not res.steps:
        raise KeyboardInterrupt("interrupted before the first step: nothing saved")
    name = save_tuned(res.encoder, args.out, cfg, {"data": str(Path(args.data).resolve()), "steps": res.steps,
                      "index": str(Path(args.index).resolve()) if args.index else None,
                      "interrupted": res.interrupted})
    print(f"saved {name} to {args.out} ({res.steps} steps, loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f}, "
          f"{res.seconds:.0f} s); build an index with it: phiforge index add DOCS --index NEW --encoder {args.out}")
    if res.interrupted:
        raise KeyboardInterrupt(f"interrupted: saved the encoder as trained so far to {args.out}")
    if args.rerank:
        where = Path(args.out) / RERANKER_DIR
        print(f"training the reranker on the same {len(ts.pairs)} pairs -> {where}")
        rr = train_reranker([(p.query, ts.corpus[p.gold]) for p in ts.pairs], where, seed=args.seed,
                            threads=args.threads, progress=True)
        print(f"saved the reranker to {where} ({rr['steps']} steps, loss {rr['losses'][0]:.3f} -> "
              f"{rr['losses'][-1]:.3f})")
    return 0


def run_index(args: argparse.Namespace) -> int:
    try:
        if args.action == "tune":
            return run_tune(args)
        enc = None
        if args.action == "add":
            missing = [p for p in args.paths if not Path(p).exists()]
            if missing:  # before the index is opened (or created)
                raise FileNotFoundError(f"{missing[0]}: no such file or folder (nothing was indexed)")
            if args.encoder:
                if not Path(args.encoder).is_dir():
                    raise FileNotFoundError(f"--encoder {args.encoder}: no such folder (`phiforge index tune` "
                                            "makes one)")
                enc = load_encoder(args.encoder)
        with Index.open(args.index, enc, create=args.action == "add") as ix:
            if args.action == "add":
                t0 = time.perf_counter()
                r = ix.add(args.paths, log=print)
                for w in r.warnings:
                    print(f"warning: {w}")
                print(f"{r.files_added} added, {r.files_replaced} replaced, {r.files_unchanged} unchanged, "
                      f"{len(r.files_removed)} removed (gone from their folder), "
                      f"{len(r.skipped)} skipped; {r.chunks_added} chunks written, {r.chunks_embedded} embedded, "
                      f"{r.chunks_removed} removed; {len(ix)} chunks in index ({time.perf_counter() - t0:.1f} s)")
            elif args.action == "rm":
                print(f"removed {ix.remove(args.source)} chunks; {len(ix)} left")
            else:
                s = ix.stats()
                print(json.dumps(s, indent=2) if args.json else "\n".join(f"{k:>16}: {v}" for k, v in s.items()))
    except USER_ERRORS as e:
        return _fail(e)
    return 0


# --------------------------------------------------------------------------------------------------- search
def add_arguments_search(parser: argparse.ArgumentParser) -> None:
    _index_arg(parser)
    parser.add_argument("query")
    parser.add_argument("-k", type=int, default=5, help="number of hits (default 5)")
    parser.add_argument("--json", action="store_true", help="print hits as JSON lines")
    _rerank_arg(parser)


def _rerank_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rerank", action="store_true", help=f"rescore the encoder's top {RerankConfig.depth} "
                        "with the language model: the index's tuned reranker (index tune --rerank) or the default "
                        "model zero-shot (default off)")


def run_search(args: argparse.Namespace) -> int:
    try:
        if args.k < 1:
            raise ValueError(f"-k: must be >= 1, got {args.k}")
        with Index.open(args.index, create=False) as ix:
            hits = reranker_for(ix).search(ix, args.query, args.k) if args.rerank else ix.search(args.query, k=args.k)
    except USER_ERRORS as e:
        return _fail(e)
    for i, h in enumerate(hits, 1):
        if args.json:
            print(json.dumps(h.__dict__))
            continue
        snippet = " ".join(h.text.split())
        snippet = snippet[:240] + ("…" if len(snippet) > 240 else "")
        print(f"{i:>2}. {h.score:.3f}  {Path(h.source).name}"
              f"{' — ' + h.heading if h.heading else ''}  [chunk {h.chunk_id}, chars {h.start}-{h.end}]\n"
              f"    {snippet}\n    {h.source}")
    return 0


# ------------------------------------------------------------------------------------------------------ ask
def add_arguments_ask(parser: argparse.ArgumentParser) -> None:
    _index_arg(parser)
    parser.add_argument("question")
    parser.add_argument("--model", metavar="DIR", help="model directory or Hugging Face id (default: the built-in "
                        "default model)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--adapter", metavar="DIR", help="LoRA adapter directory (PEFT format)")
    parser.add_argument("-k", type=int, default=4, help="chunks retrieved into the prompt (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--max-prompt-tokens", type=int, default=3072,
                        help="prompt budget, further capped by the model's context (default 3072)")
    parser.add_argument("--json-schema", metavar="FILE", default=None,
                        help="answer as one JSON object valid against the schema in FILE, with a 'citations' field "
                             "listing the sources used")
    _rerank_arg(parser)


def _check_ask(args: argparse.Namespace) -> None:
    for flag, v in (("-k", args.k), ("--max-new-tokens", args.max_new_tokens),
                    ("--max-prompt-tokens", args.max_prompt_tokens)):
        if v < 1:
            raise ValueError(f"{flag}: must be >= 1, got {v}")
    if args.model is not None:
        args.model = str(resolve_model(args.model))
        if not Path(args.model).is_dir():
            raise FileNotFoundError(f"--model {args.model}: no such directory (a Hugging Face model directory or id)")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: must be >= 1 when given, got {args.threads}")
        torch.set_num_threads(args.threads)


def run_ask(args: argparse.Namespace) -> int:
    try:
        _check_ask(args)
        schema = read_schema(args.json_schema) if args.json_schema else None
        with Index.open(args.index, create=False) as ix:
            if not len(ix):
                ix.search(args.question)  # raises the empty-index error with its hint
            gen = load_generator(args.model, args.adapter, dtype=compute_dtype())
            ctx = context_length(gen)
            if args.max_new_tokens >= ctx:
                raise ValueError(f"--max-new-tokens {args.max_new_tokens}: exceeds the model's context of {ctx} "
                                 "tokens, which must also hold the question and its sources; give less")
            ans = answer_question(args.question, ix, gen, k=args.k, max_new_tokens=args.max_new_tokens,
                                  max_prompt_tokens=args.max_prompt_tokens,
                                  reranker=reranker_for(ix) if args.rerank else None, json_schema=schema,
                                  on_piece=lambda s: print(s, end="", flush=True))
    except USER_ERRORS as e:
        return _fail(e)
    print("\n\n" + format_sources(ans))
    return 0
