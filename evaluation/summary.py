"""From per-question records (evaluation/runner.py) to the table's numbers and a recommendation written from them.

Each row of the table is one mode in one context (closed-book "none", "retrieved", "gold"); each cell is a
bootstrap mean with its 95% interval (evaluation/metrics.py) over the questions where the metric is defined.
Every column is resampled with the same seed, so rows with the same questions are resampled alike.

The recommendation compares the rows a deployment can have (closed-book and retrieved context; gold context is
an oracle, used only to split retrieval failures from reading failures). Two rows "cannot be separated" when
their 95% intervals overlap: a conservative reading (overlapping intervals can still hide a real difference),
and the honest one to give on a few dozen questions.
"""
from __future__ import annotations

from dataclasses import dataclass

from .metrics import Interval, bootstrap_mean


@dataclass(frozen=True)
class Metric:
    key: str               # the per-question record field
    label: str
    higher_better: bool
    percent: bool          # a rate shown as 0-100


METRICS = (
    Metric("f1", "F1", True, True),
    Metric("em", "EM", True, True),
    Metric("contains", "contains", True, True),
    Metric("cite_precision", "cite P", True, True),
    Metric("cite_recall", "cite R", True, True),
    Metric("cited_any", "cites", True, True),
    Metric("abstain", "abstain (unans.)", True, True),
    Metric("false_abstain", "false abstain", False, True),
    Metric("json_valid", "JSON valid", True, True),      # evaluate --json-schema only
    Metric("field_em", "field EM", True, True),          # rows whose answer is an object of fields
    Metric("ttft_s", "TTFT s", False, False),
    Metric("latency_s", "latency s", False, False),
    Metric("prompt_tokens", "prompt tok", False, False),
)
STRUCTURED = ("json_valid", "field_em")
RETRIEVAL_METRICS = (Metric("recall", "recall@k", True, True), Metric("mrr", "MRR", True, True))
CHART_METRICS = ("f1", "contains", "em", "cite_recall", "abstain")
CONTEXT_ORDER = {"none": 0, "retrieved": 1, "gold": 2}


def label(mode: str, context: str) -> str:
    return f"{mode} (gold ctx)" if context == "gold" else mode


def summarize(records: list[dict], seconds: dict[str, float], seed: int = 0) -> list[dict]:
    """Table rows, in mode order then context order: label, mode, context, questions, mode seconds, metrics."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["mode"], r["context"]), []).append(r)
    order = {m: i for i, m in enumerate(dict.fromkeys(r["mode"] for r in records))}
    rows = []
    for (mode, context), recs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], CONTEXT_ORDER[kv[0][1]])):
        cells = {}
        for m in METRICS:
            iv = bootstrap_mean((r.get(m.key) for r in recs), seed)
            cells[m.key] = iv.to_dict() if iv else None
        rows.append({"label": label(mode, context), "mode": mode, "context": context, "questions": len(recs),
                     "mode_seconds": seconds.get(mode), "metrics": cells})
    return rows


def summarize_retrieval(records: list[dict], k: int, seed: int = 0) -> dict | None:
    """recall@k and MRR by document for the index ("after") and the baseline ("before") when there is one."""
    if not records:
        return None
    out: dict = {"k": k, "questions": len(records)}
    for tag in ("after", "before"):
        if tag in records[0]:
            out[tag] = {}
            for m in RETRIEVAL_METRICS:
                iv = bootstrap_mean((r[tag][m.key] for r in records), seed)
                out[tag][m.key] = iv.to_dict() if iv else None
    return out


def _iv(cell: dict | None) -> Interval | None:
    return Interval(cell["mean"], cell["lo"], cell["hi"], cell["n"]) if cell else None


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def _compare(name: str, a: dict, b: dict, key: str, what: str) -> str:
    """One sentence: a beats b on `key` by so many points, or cannot be told apart from it."""
    ia, ib = _iv(a["metrics"][key]), _iv(b["metrics"][key])
    diff = 100 * (ia.mean - ib.mean)
    if ia.overlaps(ib):
        return (f"{name}: {a['label']} {_pts(ia.mean)} vs {b['label']} {_pts(ib.mean)} {what} ({diff:+.1f} points); "
                f"the 95% intervals [{_pts(ia.lo)}, {_pts(ia.hi)}] and [{_pts(ib.lo)}, {_pts(ib.hi)}] overlap, "
                f"so these {ia.n} questions cannot separate them.")
    return (f"{name}: {a['label']} {_pts(ia.mean)} vs {b['label']} {_pts(ib.mean)} {what} ({diff:+.1f} points, "
            f"intervals apart: [{_pts(ia.lo)}, {_pts(ia.hi)}] vs [{_pts(ib.lo)}, {_pts(ib.hi)}]).")


def _best(rows: list[dict], key: str, higher: bool = True) -> list[dict]:
    have = [r for r in rows if r["metrics"].get(key)]
    return sorted(have, key=lambda r: r["metrics"][key]["mean"], reverse=higher)


def recommend(table: list[dict], retrieval: dict | None = None) -> list[str]:
    """Short sentences from the numbers: the winner on answers, on abstention, where retrieval costs, the price."""
    lines: list[str] = []
    deploy = [r for r in table if r["context"] != "gold"]
    # structured answers (evaluate --json-schema) are judged by their fields, text answers by token F1
    key, name, what = ("f1", "F1", "token F1, answerable questions")
    if not _best(deploy, "f1") and _best(deploy, "field_em"):
        key, name, what = ("field_em", "Field EM", "fields exactly right, structured answers")
    ranked = _best(deploy, key)
    if not ranked:
        lines.append("No answerable question: answer quality cannot be compared (only abstention).")
    else:
        top = ranked[0]
        lines.append(f"Best answers ({what}): {top['label']} with {_pts(top['metrics'][key]['mean'])}.")
        for other in ranked[1:]:
            lines.append(_compare(name, top, other, key, name))
        by_contain = _best(deploy, "contains")
        top_contains = (top["metrics"].get("contains") or {"mean": -1.0})["mean"]
        if by_contain and by_contain[0]["metrics"]["contains"]["mean"] > top_contains:
            lines.append(_compare("Containment (gold answer inside the reply)", by_contain[0], top, "contains",
                                  "contain the gold answer"))
    by_abstain = _best(deploy, "abstain")
    if by_abstain:
        a = by_abstain[0]
        ab, fa = a["metrics"]["abstain"], a["metrics"].get("false_abstain")
        if ab["mean"] == 0:
            lines.append(f"Abstention: no mode declined any of the {ab['n']} unanswerable questions.")
        else:
            lines.append(f"Abstention on unanswerable questions: {a['label']} declines best "
                         f"({_pts(ab['mean'])}% of {ab['n']})"
                         + (f", and wrongly declines {_pts(fa['mean'])}% of answerable ones." if fa else "."))
            if len(by_abstain) > 1:
                lines.append(_compare("Abstention", a, by_abstain[1], "abstain", "% declined"))
    for r in table:  # retrieval vs reading, per retrieval mode
        if r["context"] != "gold":
            continue
        ret = next((x for x in table if x["mode"] == r["mode"] and x["context"] == "retrieved"), None)
        if ret and r["metrics"].get(key) and ret["metrics"].get(key):
            g, t = _iv(r["metrics"][key]), _iv(ret["metrics"][key])
            gap = 100 * (g.mean - t.mean)
            if not g.overlaps(t):
                where = ("retrieval loses these points (a better retriever helps)" if gap > 0
                         else "retrieved context reads better than the gold documents alone")
            else:
                where = (f"the intervals overlap, so these {g.n} questions do not show retrieval costing anything; "
                         f"with the right documents in hand the reader reaches {name} {_pts(g.mean)}")
            lines.append(f"{r['mode']}: {name} {_pts(t.mean)} with retrieved context, {_pts(g.mean)} with the gold "
                         f"documents ({gap:+.1f} points): {where}.")
    if ranked:
        top = ranked[0]
        cheap = _best(deploy, "prompt_tokens", higher=False)[0]
        if cheap["label"] != top["label"]:
            tp, cp = top["metrics"]["prompt_tokens"]["mean"], cheap["metrics"]["prompt_tokens"]["mean"]
            tl, cl = top["metrics"]["latency_s"]["mean"], cheap["metrics"]["latency_s"]["mean"]
            lines.append(f"Cost: {top['label']} reads {tp:.0f} prompt tokens per answer against {cp:.0f} for "
                         f"{cheap['label']} (mean latency {tl:.2f} s vs {cl:.2f} s in this run).")
    if retrieval and "before" in retrieval:
        k = retrieval["k"]
        a, b = {"label": "after", "metrics": retrieval["after"]}, {"label": "before", "metrics": retrieval["before"]}
        if a["metrics"].get("recall") and b["metrics"].get("recall"):
            lines.append(_compare(f"Retriever recall@{k}", a, b, "recall", f"recall@{k}"))
            lines.append(_compare("Retriever MRR", a, b, "mrr", "MRR"))
    return lines
