"""The evaluation's files: the table (Markdown and JSON), a PNG chart of the main metrics with their 95% intervals,
the per-question records (JSONL) and the recommendation. Every file is written atomically (engine/atomic.py), so an
interrupted run never leaves a half-written report beside a complete one.

    out/
      report.md        the table, the retriever table (when an index was used), the recommendation
      report.json      the same numbers (mean, lo, hi, n per cell) plus the run's settings
      chart.png        F1, containment, EM, citation recall and abstention per mode, with interval whiskers
      results.jsonl    one record per question, mode and context (evaluation/runner.py `score`)
      retrieval.jsonl  one record per question with gold documents: ranked documents, recall@k, MRR per index
"""
from __future__ import annotations

import io
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from phiforge.engine.atomic import write_bytes_atomic, write_json_atomic, write_jsonl_atomic, write_text_atomic

from .summary import CHART_METRICS, METRICS, RETRIEVAL_METRICS, STRUCTURED

FILES = ("report.md", "report.json", "chart.png", "results.jsonl", "retrieval.jsonl")


def _cell(cell: dict | None, percent: bool) -> str:
    if not cell:
        return "–"
    if percent:
        return f"{100 * cell['mean']:.1f} [{100 * cell['lo']:.1f}, {100 * cell['hi']:.1f}]"
    if cell["mean"] >= 100:
        return f"{cell['mean']:.0f} [{cell['lo']:.0f}, {cell['hi']:.0f}]"
    return f"{cell['mean']:.2f} [{cell['lo']:.2f}, {cell['hi']:.2f}]"


def table_markdown(table: list[dict]) -> str:
    # the structured-answer columns only when some row has them (evaluate --json-schema)
    shown = [m for m in METRICS if m.key not in STRUCTURED or any(r["metrics"].get(m.key) for r in table)]
    head = ["mode", "questions"] + [m.label for m in shown] + ["mode s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        secs = f"{r['mode_seconds']:.1f}" if r.get("mode_seconds") is not None else "–"
        cells = [r["label"], str(r["questions"])] + [_cell(r["metrics"].get(m.key), m.percent) for m in shown]
        lines.append("| " + " | ".join(cells + [secs]) + " |")
    return "\n".join(lines)


def retrieval_markdown(retrieval: dict, reranked: bool = False) -> str:
    k = retrieval["k"]
    head = ["index"] + [m.label.replace("@k", f"@{k}") for m in RETRIEVAL_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    index = "--index, reranked" if reranked else "--index"
    names = {"after": f"after ({index})" if "before" in retrieval else index, "before": "before (baseline)"}
    for tag in ("before", "after"):
        if tag in retrieval:
            lines.append("| " + " | ".join([names[tag]] + [_cell(retrieval[tag].get(m.key), True)
                                                           for m in RETRIEVAL_METRICS]) + " |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    parts = [f"# phiforge evaluate: {report['data']}", "",
             f"{report['questions']} questions ({report['answerable']} answerable), model {report['model']}, "
             f"k={report['k']}, max {report['max_new_tokens']} new tokens, greedy. Cells: mean [95% bootstrap "
             "interval]; rates in %, over the questions where the metric is defined (answer scores on answerable "
             "questions, abstention on unanswerable ones, citations where sources were shown). TTFT and latency "
             "are measured from submission with the whole mode's batch queued.", "",
             table_markdown(report["table"])]
    if report.get("retrieval"):
        parts += ["", f"## Retrieval by document ({report['retrieval']['questions']} questions with gold sources)",
                  "", retrieval_markdown(report["retrieval"], bool(report.get("rerank")))]
    parts += ["", "## Recommendation", ""] + [f"- {line}" for line in report["recommendation"]]
    return "\n".join(parts) + "\n"


def chart_png(table: list[dict]) -> bytes:
    """Grouped bars: one group per metric in CHART_METRICS, one bar per table row, whiskers at the interval."""
    by_key = {m.key: m for m in METRICS}
    keys = [k for k in CHART_METRICS if any(r["metrics"].get(k) for r in table)]
    fig = Figure(figsize=(max(6.0, 1.9 * len(keys) + 2), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(table))
    for j, r in enumerate(table):
        xs, ys, lo, hi = [], [], [], []
        for i, k in enumerate(keys):
            c = r["metrics"].get(k)
            if c:
                xs.append(i - 0.4 + (j + 0.5) * width)
                ys.append(100 * c["mean"])
                lo.append(100 * (c["mean"] - c["lo"]))
                hi.append(100 * (c["hi"] - c["mean"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=r["label"],
               hatch="//" if r["context"] == "gold" else None)
    ax.set_xticks(range(len(keys)), [by_key[k].label for k in keys])
    ax.set_ylabel("% (mean, 95% interval)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    ax.set_title("phiforge evaluate")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(out: str | Path, report: dict, records: list[dict], retrieval_records: list[dict]) -> dict[str, Path]:
    """Write the five files into `out`; returns {file name: path}."""
    out = Path(out)
    paths = {name: out / name for name in FILES}
    write_jsonl_atomic(paths["results.jsonl"], records)
    write_jsonl_atomic(paths["retrieval.jsonl"], retrieval_records)
    write_bytes_atomic(paths["chart.png"], chart_png(report["table"]))
    write_json_atomic(paths["report.json"], report)
    write_text_atomic(paths["report.md"], markdown(report))
    return paths
