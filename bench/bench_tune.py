"""Retriever tuning bench: the MiniLM encoder tuned to a domain (retrieval/tune.py), measured on real labels.

    python bench/bench_tune.py [--select] [--tune-seeds 3] [--rerank] [--out results.json]

chatterbot-corpus==1.3.3 (bench/bench_retrieval.py's quality set: every English conversation's first line a
question, its replies the relevant passages) has its questions split (seeded) into a tuning half and a held-out half,
all passages kept in the corpus. The encoder is tuned on the tuning half's (question, relevant passage) pairs, and
recall@1/5/10 and MRR@10 are measured on the held-out half before and after, in the same run. Out of its domain: the
12 questions of data/docs_questions.jsonl over the bundled documents' chunks (source found, MRR by source), before
and after, with a paired bootstrap interval of the MRR change. `--select` first picks the settings by 3-fold
cross-validation inside the tuning half; the held-out half is never seen while choosing. The tuning runs once per
seed (`--tune-seeds`, default 3) on the same split, and the gain is their mean: one run's seed moves held-out
recall@10 by about as much as any setting does. Beside it, a paired bootstrap 95% interval of that mean gain over
the held-out questions: how far it could move on another set of questions like these.

`--rerank` adds the second stage (retrieval/rerank.py): the default model's reranker LoRA-tuned on the tuning half's
pairs (as `index tune --rerank` trains it), and the default model zero-shot, each reranking the top 20 of the
untuned encoder and of every tuned run on the held-out half; then the docs questions through each tuned encoder
and the tuned reranker.

Targets: tuned held-out recall@10 >= untuned + 0.05 (mean over the tuning seeds), and no out-of-domain MRR drop
beyond its 95% interval; with --rerank, the same two for the tuned encoder followed by the tuned reranker.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

from phiforge.bench.bench_retrieval import chatterbot, metrics, recall_each
from phiforge.bench.report import emit


def ranks(enc, corpus: list[str], queries: list[str], k: int = 10, cv: np.ndarray | None = None) -> list[list[int]]:
    """Exact top-k corpus ids per query (what the index does below its exact-search threshold)."""
    cv = enc.encode(corpus) if cv is None else cv
    scores = enc.encode(queries) @ cv.T  # (Q, N)
    return [list(map(int, np.argsort(-row, kind="stable")[:k])) for row in scores]


def docs_set() -> tuple[list[str], list[str], list[set[int]]]:
    """Chunks of the bundled documents, data/docs_questions.jsonl's questions, and each one's source chunks."""
    from phiforge.retrieval.chunking import chunk_file

    data = Path(__file__).resolve().parents[1] / "data"
    chunks = [c for f in sorted((data / "docs").iterdir()) for c in chunk_file(f)[1]]
    rows = [json.loads(x) for x in (data / "docs_questions.jsonl").read_text().splitlines() if x.strip()]
    rel = [{i for i, c in enumerate(chunks) if Path(c.source).name == r["source"]} for r in rows]
    return [c.embed_text for c in chunks], [r["question"] for r in rows], rel


def first_hit(ranked: list[list[int]], relevant: list[set[int]]) -> list[float]:
    """Reciprocal rank of each query's first relevant id (0 when none is ranked)."""
    return [next((1.0 / (i + 1) for i, d in enumerate(r) if d in rel), 0.0) for r, rel in zip(ranked, relevant)]


def paired_interval(before: np.ndarray, after: np.ndarray, seed: int, resamples: int = 2000) -> list[float]:
    """95% paired bootstrap interval (over questions) of mean(after - before)."""
    boot = np.random.default_rng(seed).integers(0, len(before), (resamples, len(before)))  # (resamples, questions)
    lo, hi = np.percentile((after - before)[boot].mean(1), [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def mrr_change(before: np.ndarray, after: np.ndarray, seed: int) -> dict:
    """MRR and hit@1 before and after, and a paired bootstrap 95% interval (over questions) of the MRR change."""
    ci = paired_interval(before, after, seed)
    return {"mrr@10_before": round(float(before.mean()), 4), "mrr@10_after": round(float(after.mean()), 4),
            "hit@1_before": float(np.mean(before == 1)), "hit@1_after": float(np.mean(after == 1)),
            "mrr_change_95ci": ci, "fell_beyond_noise": bool(ci[1] < 0)}


# TuneConfig settings (over its defaults) compared by --select with 3-fold cross-validation inside the tuning half:
# every tuning question is validated once, by a run that did not train on it; the held-out half is never seen.
# TuneConfig's defaults (which tuning() runs) are the setting it picked
SELECTION_GRID = [{"negatives_from": "corpus", "hard_negatives": 3}, {"negatives_from": "corpus", "hard_negatives": 7},
                  {"negatives_from": "corpus", "hard_negatives": 3, "remine": True},
                  {"negatives_from": "corpus", "hard_negatives": 3, "remine": True, "epochs": 3},
                  {"hard_negatives": 0}, {"negatives_from": "corpus", "hard_negatives": 3, "batch": 16},
                  {"negatives_from": "corpus", "hard_negatives": 3, "scale": 10.0}, {"hard_negatives": 3},
                  {"hard_negatives": 3, "remine": True}, {"hard_negatives": 7}]
CV_FOLDS = 3
TUNE_SEEDS = 3  # tuning runs on the one split whose mean is the figure
RERANK_THREADS = 2  # the language model's forwards are large enough to use both cores


def tuning(seed: int = 0, select: bool = False, grid: list[dict] | None = None, threads: int | None = 1,
           log=None, tune_seeds: int = TUNE_SEEDS, rerank: bool = False, **overrides) -> dict:
    """Held-out retrieval on chatterbot before and after tuning on the other half; out-of-domain check on the docs.

    overrides: TuneConfig fields (default: TuneConfig's defaults, the setting --select picked); seed splits the
    questions and seeds the tuning; tune_seeds > 1 tunes again with seeds seed+1, ... on the same split and reports
    each run and their mean (one run's seed moves held-out recall@10 by about as much as a setting does).
    threads: torch threads while tuning (None: torch's choice); one by default because on a shared 2-core machine a
    two-thread training step stalls whenever either thread is descheduled."""
    import torch

    from phiforge.retrieval.encoder import load_encoder
    from phiforge.retrieval.tune import Pair, TuneConfig, tune

    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if threads:
        torch.set_num_threads(threads)
    corpus, queries, relevant = chatterbot()
    order = list(range(len(queries)))
    random.Random(seed).shuffle(order)
    tune_q, held = order[: len(order) // 2], order[len(order) // 2:]
    base = load_encoder()
    cv = base.encode(corpus)  # (N, H)

    def pairs(qs: list[int]) -> list[Pair]:  # one pair per (question, relevant passage)
        return [Pair(queries[i], j, frozenset(relevant[i])) for i in qs for j in sorted(relevant[i])]

    def score(enc, qs: list[int], vecs=None) -> tuple[dict, np.ndarray]:  # metrics, each question's recall@10
        ranked, rel = ranks(enc, corpus, [queries[i] for i in qs], cv=vecs), [relevant[i] for i in qs]
        m = metrics(ranked, rel)
        return {k: round(m[k], 4) for k in ("recall@1", "recall@5", "recall@10", "mrr@10")}, recall_each(ranked, rel)

    cfg = TuneConfig(**overrides, seed=seed)
    out: dict = {"dataset": "chatterbot-corpus==1.3.3 (english)", "passages": len(corpus),
                 "tune_questions": len(tune_q), "heldout_questions": len(held), "split_seed": seed}
    if select:  # settings chosen by cross-validation inside the tuning half, never on the held-out half
        folds = [tune_q[f::CV_FOLDS] for f in range(CV_FOLDS)]
        rows = []
        for over in [None] + (grid or SELECTION_GRID):  # None: the untuned encoder
            ranked, rel = [], []
            for f, val in enumerate(folds):
                if over is None:
                    enc, vecs = base, cv
                else:
                    train = [q for g, fold in enumerate(folds) if g != f for q in fold]
                    enc = tune(base, corpus, pairs(train), dataclasses.replace(cfg, **over), say, cv).encoder
                    vecs = None
                ranked += ranks(enc, corpus, [queries[i] for i in val], cv=vecs)
                rel += [relevant[i] for i in val]
            m = metrics(ranked, rel)
            rows.append({"config": "untuned" if over is None else over, "cv_recall@10": round(m["recall@10"], 4),
                         "cv_mrr@10": round(m["mrr@10"], 4)})
            say(json.dumps(rows[-1]))
        out["selection"] = {"folds": CV_FOLDS, "rows": rows}
        best = max(rows[1:], key=lambda r: (r["cv_recall@10"], r["cv_mrr@10"]))
        cfg = dataclasses.replace(cfg, **best["config"])
        say(json.dumps({"selected": vars(cfg)}))
    d_corpus, d_queries, d_rel = docs_set()
    d_before = np.asarray(first_hit(ranks(base, d_corpus, d_queries), d_rel))
    out["heldout_before"], before = score(base, held, cv)
    out["runs"], afters = [], []
    for tseed in range(seed, seed + tune_seeds):  # the split stays; only the tuning's shuffle and init seed move
        res = tune(base, corpus, pairs(tune_q), dataclasses.replace(cfg, seed=tseed), say, cv)
        m, each = score(res.encoder, held)
        afters.append(each)
        run = {"seed": tseed, "steps": res.steps, "tune_s": round(res.seconds, 1),
               "loss_first_last": [round(res.losses[0], 4), round(res.losses[-1], 4)], "heldout_after": m}
        run["heldout_recall@10_gain"] = round(run["heldout_after"]["recall@10"] - out["heldout_before"]["recall@10"], 4)
        after = np.asarray(first_hit(ranks(res.encoder, d_corpus, d_queries), d_rel))
        run["docs_out_of_domain"] = {"questions": len(d_queries), "chunks": len(d_corpus),
                                     **mrr_change(d_before, after, seed)}
        run["_encoder"] = res.encoder  # for --rerank; dropped before the JSON is written
        out["runs"].append(run)
        say(json.dumps({k: run[k] for k in ("seed", "heldout_after", "heldout_recall@10_gain")}))
    runs = out["runs"]
    out["config"] = {**vars(cfg), "seed": [r["seed"] for r in runs]}
    out["heldout_after"] = {k: round(float(np.mean([r["heldout_after"][k] for r in runs])), 4)
                            for k in out["heldout_before"]}  # mean over the tuning seeds
    out["heldout_recall@10_gain"] = round(float(np.mean([r["heldout_recall@10_gain"] for r in runs])), 4)
    out["heldout_recall@10_gain_per_seed"] = [r["heldout_recall@10_gain"] for r in runs]
    # how far the gain could move on another 375 questions like these: resampling questions, the seeds' mean kept
    out["heldout_recall@10_gain_95ci"] = paired_interval(before, np.mean(afters, 0), seed)
    out["out_of_domain_fell_beyond_noise"] = any(r["docs_out_of_domain"]["fell_beyond_noise"] for r in runs)
    if rerank:
        out["rerank"] = reranking(base, cv, [r.pop("_encoder") for r in runs], corpus, queries, relevant, tune_q,
                                  held, before, seed, say, (d_corpus, d_queries, d_rel, d_before))
    for r in runs:
        r.pop("_encoder", None)
    return out


def docs_check(rr, tuned: list, docs: tuple, seed: int) -> list[dict]:
    """Each tuned encoder + the reranker on the docs questions, against the untuned encoder alone."""
    d_corpus, d_queries, d_rel, d_before = docs
    out = []
    for enc in tuned:
        ranked = []
        for q, row in zip(d_queries, enc.encode(d_queries) @ enc.encode(d_corpus).T):  # row: (N,)
            top = np.argsort(-row, kind="stable")[:rr.cfg.depth]
            _, order = rr.fuse(row[top], rr.pmi(q, [d_corpus[j] for j in top]))
            ranked.append([int(top[i]) for i in order[:10]])
        out.append(mrr_change(d_before, np.asarray(first_hit(ranked, d_rel)), seed))
    return out


def reranking(base, cv: np.ndarray, tuned: list, corpus: list[str], queries: list[str], relevant: list[set[int]],
              tune_q: list[int], held: list[int], before: np.ndarray, seed: int, say, docs: tuple) -> dict:
    """The second stage (retrieval/rerank.py) on the held-out half: the untuned encoder and each tuned run, each
    reranked by the default model zero-shot and by the reranker LoRA-tuned on the tuning half's pairs. Out of the
    domain, the docs questions' MRR by source with each tuned encoder and the tuned reranker against the untuned
    encoder alone (`docs`: their chunks, questions, relevant chunks and the untuned first-hit reciprocal ranks)."""
    import tempfile

    import torch

    from phiforge.retrieval.rerank import RerankConfig, Reranker, load_reranker, train_reranker

    torch.set_num_threads(RERANK_THREADS)
    rc = RerankConfig()
    encoders = {"untuned": (base, cv)} | {f"tuned seed {i}": (e, None) for i, e in enumerate(tuned)}
    cands = {}  # encoder -> held-out question -> its top `depth` (passage id, cosine), best first
    for name, (enc, vecs) in encoders.items():
        vecs = enc.encode(corpus) if vecs is None else vecs
        scores = enc.encode([queries[i] for i in held]) @ vecs.T  # (Q, N)
        cands[name] = {q: [(int(j), float(row[j])) for j in np.argsort(-row, kind="stable")[:rc.depth]]
                       for q, row in zip(held, scores)}
    out: dict = {"config": dataclasses.asdict(rc), "threads": RERANK_THREADS}
    each: dict[tuple[str, str], np.ndarray] = {}  # (encoder, reranker) -> each held-out question's recall@10
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tr = train_reranker([(queries[i], corpus[j]) for i in tune_q for j in sorted(relevant[i])],
                            Path(tmp) / "reranker", seed=seed)
        out["tuned_reranker"] = {"steps": tr["steps"], "train_s": round(time.perf_counter() - t0, 1),
                                 "loss_first_last": [round(tr["losses"][0], 4), round(tr["losses"][-1], 4)]}
        say(json.dumps({"reranker trained": out["tuned_reranker"]}))
        for lm, adapter in (("zero-shot", None), ("tuned", Path(tmp) / "reranker")):
            rr: Reranker = load_reranker(adapter, rc)
            t0 = time.perf_counter()
            pmi = {}
            for q in held:  # every encoder's candidates of a question in one call: each pair scored once
                union = list(dict.fromkeys(j for name in encoders for j, _ in cands[name][q]))
                pmi[q] = dict(zip(union, rr.pmi(queries[q], [corpus[j] for j in union]).tolist()))
            out[f"{lm}_score_s"] = round(time.perf_counter() - t0, 1)
            if lm == "tuned":
                out["docs_out_of_domain"] = docs_check(rr, tuned, docs, seed)
            for name in encoders:
                ranked = []
                for q in held:
                    ids = [j for j, _ in cands[name][q]]
                    _, order = rr.fuse(np.array([s for _, s in cands[name][q]]), np.array([pmi[q][j] for j in ids]))
                    ranked.append([ids[i] for i in order[:10]])
                m = metrics(ranked, [relevant[q] for q in held])
                row = {k: round(m[k], 4) for k in ("recall@1", "recall@5", "recall@10", "mrr@10")}
                out.setdefault(name, {})[f"reranked {lm}"] = row
                each[(name, lm)] = np.asarray(recall_each(ranked, [relevant[q] for q in held]))
                say(json.dumps({name: row, "reranker": lm}))
    untuned_r10 = float(np.mean(before))
    tuned_rr = [out[f"tuned seed {i}"]["reranked tuned"]["recall@10"] for i in range(len(tuned))]
    out["tuned_encoder_and_reranker_recall@10"] = round(float(np.mean(tuned_rr)), 4)
    out["gain_over_untuned_encoder"] = round(float(np.mean(tuned_rr)) - untuned_r10, 4)
    out["docs_fell_beyond_noise"] = any(r["fell_beyond_noise"] for r in out["docs_out_of_domain"])
    out["gain_over_untuned_encoder_zero_shot_reranked"] = round(
        float(np.mean(tuned_rr)) - out["untuned"]["reranked zero-shot"]["recall@10"], 4)
    # paired bootstrap over the held-out questions, the tuned runs' mean kept (as for the encoder alone)
    after = np.mean([each[(f"tuned seed {i}", "tuned")] for i in range(len(tuned))], 0)
    out["gain_over_untuned_encoder_95ci"] = paired_interval(before, after, seed)
    out["gain_over_untuned_encoder_zero_shot_reranked_95ci"] = paired_interval(each[("untuned", "zero-shot")], after,
                                                                               seed)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--select", action="store_true",
                    help="pick the settings by cross-validation inside the tuning half first")
    ap.add_argument("--tune-seeds", type=int, default=TUNE_SEEDS,
                    help=f"tuning runs (seeds 0..N-1) on the same split; the gain is their mean (default {TUNE_SEEDS})")
    ap.add_argument("--rerank", action="store_true", help="also rerank the held-out candidates with the language "
                    "model, zero-shot and LoRA-tuned on the tuning half (retrieval/rerank.py)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.tune_seeds < 1:
        ap.error(f"--tune-seeds: must be >= 1, got {args.tune_seeds}")
    t0 = time.perf_counter()
    result = {"tune": tuning(select=args.select, tune_seeds=args.tune_seeds, rerank=args.rerank)}
    result["targets"] = {
        "tuned_heldout_recall@10_gain>=0.05 (mean over tuning seeds)": result["tune"]["heldout_recall@10_gain"] >= 0.05,
        "no_out_of_domain_drop_beyond_noise": not result["tune"]["out_of_domain_fell_beyond_noise"]}
    if args.rerank:
        result["targets"]["tuned encoder + tuned reranker: heldout recall@10 gain>=0.05 over the untuned encoder"] = (
            result["tune"]["rerank"]["gain_over_untuned_encoder"] >= 0.05)
        result["targets"]["tuned encoder + tuned reranker: no docs drop beyond noise"] = (
            not result["tune"]["rerank"]["docs_fell_beyond_noise"])
    result["bench_s"] = round(time.perf_counter() - t0, 1)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
