"""docs/benchmarks.md and its charts, rendered from bench/results/*.json, the one place the measured figures live.

Each results file is one bench area: its rows (what was measured, phiforge's figures, the reference's from the same
run, the ratio, the command, the date where one was given), optional tables with their captions and notes, and for
the rows a chart draws from, `figures`: the same numbers as JSON values (a pair [low, high] for a range over runs).
The page is generated, never edited, so a figure cannot drift between the JSON and what a reader sees; the README's
short table links here and its numbers are checked against the JSON by tests/bench/test_benchmarks_page.py.

    python bench/charts.py                        # rewrite docs/benchmarks.md and docs/img/*.png
    python bench/charts.py --check                # exit 1 if docs/benchmarks.md is not what the JSON renders to
    python bench/charts.py --results DIR --out DIR

--check compares the markdown only: PNG bytes depend on matplotlib's version and fonts, the figures on the page do
not. Charts draw only numbers that are in the JSON: a range is a bar to its low end with a whisker to its high end.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from phiforge.engine.atomic import write_bytes_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"
PAGE = "benchmarks.md"
# The page's order; machine.json is the page's introduction, not a section.
AREAS = ("load", "nf4", "decode", "cpu_kernels", "training", "serving", "structured", "invariance", "export",
         "retrieval", "evaluate")
INTRO = "machine"
ROW_FIELDS = ("id", "what", "phiforge", "reference", "ratio", "command")
# Small and stable: no build date or version in the PNG, a fixed hash salt for matplotlib's SVG ids.
RC = {"svg.hashsalt": "phiforge", "font.size": 7, "axes.titlesize": 8, "legend.fontsize": 6,
      "axes.spines.top": False, "axes.spines.right": False}
SIZE, DPI = (6.0, 3.5), 100
COLOURS = {"phiforge": "#1f77b4", "phiforge, later runs": "#9ecae1", "transformers": "#ff7f0e",
           "llama.cpp": "#2ca02c", "llama-server": "#2ca02c"}

Value = float | list[float] | None


class ResultsError(ValueError):
    """A results file that cannot be rendered; the message names the file and the field."""


# ---- reading -------------------------------------------------------------------------------------------------------

def load_results(results: Path) -> dict[str, dict]:
    """Every results file by area, checked enough to render: each row has its fields as strings."""
    names = {p.stem for p in results.glob("*.json")}
    missing = [a for a in (INTRO, *AREAS) if a not in names]
    if missing:
        raise ResultsError(f"{results}: no {', '.join(m + '.json' for m in missing)}")
    unknown = sorted(names - {INTRO, *AREAS})
    if unknown:  # a file the page would silently leave out
        raise ResultsError(f"{results / (unknown[0] + '.json')}: not an area bench/charts.py renders ({', '.join(AREAS)})")
    out = {}
    for name in (INTRO, *AREAS):
        path = results / f"{name}.json"
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ResultsError(f"{path}:{e.lineno}: not JSON: {e.msg}") from None
        if not isinstance(data, dict) or not isinstance(data.get("source"), str):
            raise ResultsError(f"{path}: needs an object with a \"source\" string")
        for i, row in enumerate(data.get("rows", [])):
            bad = [f for f in ROW_FIELDS if not isinstance(row.get(f), str)]
            if bad:
                raise ResultsError(f"{path}: rows[{i}] needs string field(s) {', '.join(bad)}")
        out[name] = data
    return out


def row(area: dict, row_id: str) -> dict:
    for r in area.get("rows", []):
        if r["id"] == row_id:
            return r
    raise ResultsError(f"no row {row_id!r} in {area.get('title', 'a results file')}")


def figures(area: dict, row_id: str) -> dict:
    return row(area, row_id).get("figures", {})


def table(area: dict, table_id: str) -> dict:
    for t in area.get("tables", []):
        if t["id"] == table_id:
            return t
    raise ResultsError(f"no table {table_id!r} in {area.get('title', 'a results file')}")


# ---- the page ------------------------------------------------------------------------------------------------------

def _md_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + \
           ["| " + " | ".join(c if c else " " for c in r) + " |" for r in rows]


def render_markdown(results: dict[str, dict]) -> str:
    intro = results[INTRO]
    out = ["# Benchmarks", "",
           "<!-- Generated by bench/charts.py from bench/results/*.json: edit the JSON, then run "
           "`python bench/charts.py` (tests/bench/test_benchmarks_page.py fails when the two differ). -->", ""]
    for note in intro.get("notes", []):
        out += [note, ""]
    out += [f"Source: {intro['source']}", "",
            "Sections: " + " · ".join(f"[{results[a]['title']}](#{a})" for a in AREAS), ""]
    for name in AREAS:
        area = results[name]
        out += [f'<a id="{name}"></a>', "", f"## {area['title']}", ""]
        if area.get("bench"):
            out += [f"Bench: `{area['bench']}`. Source: {area['source']}", ""]
        else:
            out += [f"Source: {area['source']}", ""]
        for png, _, alt in CHARTS.get(name, ()):
            out += [f"![{alt}](img/{png})", ""]
        if area.get("rows"):
            out += _md_table(["what", "when", "phiforge", "reference (same run)", "ratio", "command"],
                             [[r["what"], r.get("date") or "–", r["phiforge"], r["reference"], r["ratio"],
                               r["command"]] for r in area["rows"]]) + [""]
        for note in area.get("notes", []):
            out += [note, ""]
        for t in area.get("tables", []):
            out += [f'<a id="{t["id"].replace("_", "-")}"></a>', "", f"### {t['title']}", ""]
            if t.get("caption"):
                out += [t["caption"], ""]
            out += _md_table(t["columns"], t["rows"]) + [""]
            for note in t.get("notes", []):
                out += [note, ""]
    return "\n".join(out).rstrip("\n") + "\n"


# ---- the charts ----------------------------------------------------------------------------------------------------

def _low_high(v: Value) -> tuple[float, float] | None:
    if v is None:
        return None
    return (float(v[0]), float(v[1])) if isinstance(v, list) else (float(v), float(v))


def _label(v: Value) -> str:
    return "" if v is None else "-".join(map(str, v)) if isinstance(v, list) else str(v)


def _bars(ax: Any, groups: list[str], series: list[tuple[str, list[Value]]], unit: str) -> None:
    """Grouped bars, one group per x label: a bar up to each series' low figure, a whisker to its high one."""
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series):
        for g, v in enumerate(values):
            lh = _low_high(v)
            if lh is None:
                continue
            x = g - 0.4 + width * (k + 0.5)
            ax.bar(x, lh[0], width * 0.9, color=COLOURS.get(name), label=name if g == next(
                i for i, u in enumerate(values) if u is not None) else None)
            if lh[1] > lh[0]:
                ax.errorbar(x, lh[0], yerr=[[0], [lh[1] - lh[0]]], color="black", capsize=2, linewidth=0.8)
            ax.annotate(_label(v), (x, lh[1]), xytext=(0, 2), textcoords="offset points", ha="center",
                        fontsize=5.5)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(unit)
    ax.margins(y=0.15)


def draw_decode(results: dict[str, dict]) -> Figure:
    d = results["decode"]
    b1, b8 = figures(d, "decode_batch1"), figures(d, "decode_batch8_16")
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    bf16, fp32 = fig.subplots(1, 2)
    _bars(bf16, ["1", "8", "16"], [
        ("phiforge", [b1["bf16_tok_s"], b8["batch8_bf16_tok_s"], b8["batch16_bf16_tok_s"]]),
        ("transformers", [b1["transformers_bf16_tok_s"], b8["transformers_batch8_bf16_tok_s"],
                          b8["transformers_batch16_bf16_tok_s"]]),
        ("llama.cpp", [b1["llama_cpp_tok_s"], None, None])], "tokens/s per row")
    _bars(fp32, ["1", "8"], [
        ("phiforge", [b1["fp32_tok_s"], b8["batch8_fp32_tok_s"]]),
        ("transformers", [b1["transformers_fp32_tok_s"], b8["transformers_batch8_fp32_tok_s"]])],
        "tokens/s per row")
    bf16.set_title("bf16 decode, default model, 2 threads")
    fp32.set_title("fp32 decode")
    for ax in (bf16, fp32):
        ax.set_xlabel("batch size")
        ax.legend(frameon=False)
    fig.suptitle(f"batch 1: {row(d, 'decode_batch1')['date']}; batch 8 / 16: {row(d, 'decode_batch8_16')['date']}",
                 fontsize=6)
    return fig


def draw_serving(results: dict[str, dict]) -> Figure:
    f = figures(results["serving"], "serving_concurrency")
    ours, theirs, later = f["pool_fix_runs"], f["llama_server"], f["prefetch_runs"]
    levels = [str(c) for c in f["concurrency"]]
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    tput, itl = fig.subplots(1, 2)
    _bars(tput, levels, [("phiforge", ours["tok_s"]), ("llama-server", theirs["tok_s"]),
                         ("phiforge, later runs", later["tok_s"])], "output tokens/s")
    _bars(itl, levels, [("phiforge", ours["itl_p99_ms"]), ("llama-server", theirs["itl_p99_ms"])],
          "p99 inter-token latency (ms)")
    tput.set_title("throughput (llama-server: the same runs)")
    itl.set_title("p99 ITL, lower is better")
    for ax in (tput, itl):
        ax.set_xlabel("concurrent requests")
        ax.legend(frameon=False, loc="upper left")
        ax.margins(y=0.3)
    return fig


def draw_training(results: dict[str, dict]) -> Figure:
    t = results["training"]
    lora, qlora, big = figures(t, "lora_bf16"), figures(t, "qlora_bf16"), figures(t, "phi3_mini_memory")
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    speed, memory, mini = fig.subplots(1, 3)
    _bars(speed, ["LoRA", "QLoRA"], [("phiforge", [lora["tok_s"], qlora["tok_s"]]),
                                     ("transformers", [lora["transformers_tok_s"], qlora["transformers_tok_s"]])],
          "tokens/s")
    _bars(memory, ["LoRA", "QLoRA"], [("phiforge", [lora["peak_gb"], qlora["peak_gb"]]),
                                      ("transformers", [lora["transformers_peak_gb"],
                                                        qlora["transformers_peak_gb"]])], "peak memory (GB)")
    _bars(mini, ["LoRA", "QLoRA"], [("phiforge", [big["lora_gb"], big["qlora_gb"]])], "peak RSS (GB)")
    speed.set_title("default model, bf16")
    memory.set_title("default model, bf16")
    mini.set_title("Phi-3-mini shapes, seq 512")
    memory.legend(frameon=False, loc="upper left")
    fig.suptitle("transformers: +PEFT for LoRA, +PEFT+bitsandbytes for QLoRA", fontsize=6)
    return fig


def _numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", cell)]


def _plain(cell: str) -> str:
    return re.sub(r"\s*\(`[^`]*`\)", "", cell).replace("**", "")


def draw_retrieval(results: dict[str, dict]) -> Figure:
    t = table(results["retrieval"], "reranker_table")
    names = [_plain(r[0]) for r in t["rows"]]
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, column in zip(axes, ("recall@10", "MRR@10")):
        c = t["columns"].index(column)
        values = [_numbers(r[c])[0] for r in t["rows"]]
        ax.scatter(values, range(len(values)), color=COLOURS["phiforge"], zorder=3)
        for y, (v, r) in enumerate(zip(values, t["rows"])):
            ax.annotate(r[c].replace("**", ""), (v, y), xytext=(4, -2), textcoords="offset points", fontsize=6)
        ax.set_title(f"{column}, held-out half")
        ax.grid(axis="x", linewidth=0.3)
        ax.margins(x=0.25)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    return fig


def draw_evaluate(results: dict[str, dict]) -> Figure:
    t = table(results["evaluate"], "modes_table")
    f1 = t["columns"].index("F1")
    modes = [r[0] for r in t["rows"]]
    mean, low, high = zip(*(_numbers(r[f1])[:3] for r in t["rows"]))
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(modes)), mean, 0.6, color=COLOURS["phiforge"])
    ax.errorbar(range(len(modes)), mean, yerr=[[m - lo for m, lo in zip(mean, low)],
                                               [hi - m for m, hi in zip(mean, high)]],
                fmt="none", color="black", capsize=3, linewidth=0.8)
    for x, r in enumerate(t["rows"]):
        ax.annotate(r[f1].replace("**", ""), (x, high[x]), xytext=(0, 2), textcoords="offset points",
                    ha="center", fontsize=6)
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel("token F1 (95% bootstrap interval)")
    ax.set_title("phiforge evaluate, bundled test split, 135M default model")
    ax.margins(y=0.15)
    return fig


# area -> (file under img/, drawing, alt text)
CHARTS: dict[str, list[tuple[str, Callable[[dict[str, dict]], Figure], str]]] = {
    "decode": [("decode.png", draw_decode, "decode tokens/s per row against batch size: phiforge, transformers, "
                                           "llama.cpp")],
    "training": [("training.png", draw_training, "LoRA and QLoRA training tokens/s and peak memory")],
    "serving": [("serving.png", draw_serving, "serving throughput and p99 inter-token latency against "
                                              "concurrency, beside llama-server")],
    "retrieval": [("retrieval.png", draw_retrieval, "held-out recall@10 and MRR@10 of each retriever")],
    "evaluate": [("evaluate.png", draw_evaluate, "token F1 of the five evaluate modes")],
}


def render_png(draw: Callable[[dict[str, dict]], Figure], results: dict[str, dict]) -> bytes:
    with matplotlib.rc_context(RC):
        fig = draw(results)
        FigureCanvasAgg(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# ---- the command ---------------------------------------------------------------------------------------------------

def write(results: dict[str, dict], out: Path) -> list[Path]:
    written = []
    for charts in CHARTS.values():
        for png, draw, _ in charts:
            write_bytes_atomic(out / "img" / png, render_png(draw, results))
            written.append(out / "img" / png)
    write_text_atomic(out / PAGE, render_markdown(results))
    return [out / PAGE, *written]


def check(results: dict[str, dict], out: Path, results_dir: Path) -> str | None:
    """None if out/benchmarks.md is what the results render to, else the one line that says it is not."""
    page = out / PAGE
    if not page.exists():
        return f"{_shown(page)} is missing: run python bench/charts.py to render it from {_shown(results_dir)}"
    if page.read_text() != render_markdown(results):
        return (f"{_shown(page)} is not what {_shown(results_dir)}/*.json renders to: edit the JSON, not the page, "
                f"and run python bench/charts.py")
    return None


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Render docs/benchmarks.md and docs/img/*.png from bench/results/*.json.")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the results folder (default bench/results)")
    ap.add_argument("--out", type=Path, default=DOCS, help="where benchmarks.md and img/ go (default docs)")
    ap.add_argument("--check", action="store_true", help="exit 1 if benchmarks.md is not what the JSON renders to")
    args = ap.parse_args(argv)
    try:
        results = load_results(args.results)
        if args.check:
            problem = check(results, args.out, args.results)
            if problem:
                print(problem, file=sys.stderr)
                return 1
            return 0
        for path in write(results, args.out):
            print(_shown(path))
    except (ResultsError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
