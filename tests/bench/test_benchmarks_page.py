"""docs/benchmarks.md against bench/results/*.json, and the README's short Measurements table against both.

The page is generated from the JSON (bench/charts.py), so the test that they agree fails when one is edited without
the other; the README's table is written by hand, so every number in it must be one the JSON holds.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phiforge.bench import charts

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# A figure as the README and the JSON write it: 5.09x, 1.51-1.56x, 0.997, 1,967, 2026-11-30 (as 2026-11 and 30).
# Not the digits inside a word (bfloat16, sm_80, 2_4_gb).
NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?:-\d+(?:[.,]\d+)*)?x?(?!\w)")


def numbers(text: str) -> set[str]:
    return set(NUMBER.findall(text))


def readme_tables(text: str) -> list[tuple[int, list[str]]]:
    """Every markdown table row of `text` (separator rows left out): (line number, cells)."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("|") and not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line):
            rows.append((n, [c.strip() for c in line.strip()[1:-1].split("|")]))
    return rows


def measurement_rows(text: str) -> list[tuple[int, list[str]]]:
    """The rows of the table under '## Measurements', header left out."""
    lines = text.splitlines()
    start = lines.index("## Measurements")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("## "))
    section = "\n".join(lines[start:end])
    rows = readme_tables(section)
    return [(start + n, cells) for n, cells in rows[1:]]


def unbacked(rows: list[tuple[int, list[str]]], results_dir: Path) -> list[str]:
    """README rows with a number that no single results file holds (each row's figures come from one area)."""
    files = {p.name: numbers(p.read_text()) for p in sorted(results_dir.glob("*.json"))}
    bad = []
    for n, cells in rows:
        wanted = numbers(" ".join(cells))
        best = min(files.items(), key=lambda kv: len(wanted - kv[1]))
        if wanted - best[1]:
            bad.append(f"README.md:{n}: {sorted(wanted - best[1])} in no results file "
                       f"(closest: bench/results/{best[0]})")
    return bad


def _figure_values(obj: object) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, list):
        return [v for x in obj for v in _figure_values(x)]
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in _figure_values(x)]
    return []


def _text_values(text: str) -> set[float]:
    """Every value a row's text writes: each end of a range, 1,967 as 1967 and 1,8,16 as 1, 8 and 16."""
    out = set()
    for tok in numbers(text):
        for part in tok.rstrip("x").split("-"):
            for p in (part.replace(",", ""), *part.split(",")):
                try:
                    out.add(float(p))
                except ValueError:  # a version such as 0.3.36
                    pass
    return out


def _run_charts(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "charts.py"), *args], capture_output=True, text=True,
                          cwd=ROOT)


# (a) the page is the JSON's rendering

def test_page_is_what_the_results_render_to():
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert page == charts.render_markdown(charts.load_results(ROOT / "bench" / "results")), \
        "docs/benchmarks.md differs from bench/results/*.json: run python bench/charts.py"


def test_every_chart_the_page_shows_exists():
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\((img/[\w.-]+\.png)\)", page)
    assert len(images) == sum(len(c) for c in charts.CHARTS.values()) >= 4
    assert all((ROOT / "docs" / i).is_file() for i in images)


def test_every_row_of_the_old_table_is_kept():
    """Nothing was dropped on the way from the README's old table: each results row has all its fields."""
    results = charts.load_results(ROOT / "bench" / "results")
    old = [a for a in (charts.INTRO, *charts.AREAS) if "24387e1" in results[a]["source"]]
    rows = [r for a in old for r in results[a].get("rows", [])]
    assert len(rows) == 39 and len({r["id"] for r in rows}) == 39
    assert set(charts.AREAS) - set(old) <= {"structured", "invariance"}   # measured since, each with its own source


def test_figures_are_numbers_their_row_says():
    """A chart's values come from `figures`; each of them must be written in the same row's transcribed text."""
    results = charts.load_results(ROOT / "bench" / "results")
    bad = []
    for area in charts.AREAS:
        for r in results[area].get("rows", []):
            said = _text_values(" ".join(r[f] for f in ("what", "phiforge", "reference", "ratio", "command")))
            bad += [f"{area}.json {r['id']}: {v}" for v in _figure_values(r.get("figures", {})) if v not in said]
    assert not bad, "figures not in their row's text:\n  " + "\n  ".join(bad)


# (b) the README's numbers are the JSON's

def test_every_number_in_the_readme_table_is_in_the_results():
    rows = measurement_rows(README.read_text())
    assert len(rows) >= 15
    bad = unbacked(rows, ROOT / "bench" / "results")
    assert not bad, "\n".join(bad)


def test_a_number_the_results_lack_is_caught():
    rows = measurement_rows(README.read_text())
    n, cells = next((n, c) for n, c in rows if "**5.39-5.47x**" in c[1])
    assert not unbacked([(n, cells)], ROOT / "bench" / "results")
    changed = [cells[0], cells[1].replace("5.39-5.47x", "5.39-5.48x"), *cells[2:]]
    assert unbacked([(n, changed)], ROOT / "bench" / "results")
    # one row's figures must come from one area: decode's ratio beside serving's is not backed by either file
    assert unbacked([(n, ["decode", "**5.39-5.47x**; **2.78x**", "", ""])], ROOT / "bench" / "results")


def test_the_number_finder():
    assert numbers("**5.09x** / 1.51-1.56x, 0.997, 1,967 ms, bfloat16, 2_4_gb, sm_80") == \
        {"5.09x", "1.51-1.56x", "0.997", "1,967"}


# (c) the README reads at a glance

def test_readme_is_short_and_its_table_cells_are_short():
    text = README.read_text()
    assert len(text.splitlines()) < 450, f"README.md has {len(text.splitlines())} lines (under 450)"
    long = [f"README.md:{n}: a cell of {len(c)} characters: {c[:60]}..."
            for n, cells in readme_tables(text) for c in cells if len(c) > 300]
    assert not long, "\n".join(long)


def test_readme_links_to_docs_that_exist():
    links = re.findall(r"\]\((docs/[\w./-]+?)(?:#[\w-]+)?\)", README.read_text())
    assert "docs/benchmarks.md" in links
    assert all((ROOT / link).is_file() for link in links), [link for link in links if not (ROOT / link).is_file()]


# (d) --check catches a page that is not the JSON's

@pytest.fixture
def copies(tmp_path):
    results, docs = tmp_path / "results", tmp_path / "docs"
    shutil.copytree(ROOT / "bench" / "results", results)
    docs.mkdir()
    shutil.copy(ROOT / "docs" / "benchmarks.md", docs / "benchmarks.md")
    return results, docs


def test_check_passes_on_the_copies(copies):
    results, docs = copies
    r = _run_charts("--check", "--results", str(results), "--out", str(docs))
    assert r.returncode == 0, r.stderr


def test_check_fails_when_the_json_changes(copies):
    results, docs = copies
    decode = results / "decode.json"
    text = decode.read_text()
    assert "**5.09x**" in text
    decode.write_text(text.replace("**5.09x**", "**5.19x**"))
    r = _run_charts("--check", "--results", str(results), "--out", str(docs))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "benchmarks.md" in lines[0] and "not what" in lines[0], r.stderr


def test_check_fails_when_the_page_is_edited(copies):
    results, docs = copies
    page = docs / "benchmarks.md"
    page.write_text(page.read_text().replace("**1.93x**", "**1.95x**", 1))
    r = _run_charts("--check", "--results", str(results), "--out", str(docs))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "benchmarks.md" in r.stderr


def test_render_then_check_round_trips(copies):
    """Writing from edited JSON makes the page (and the charts) follow it."""
    results, docs = copies
    data = json.loads((results / "load.json").read_text())
    data["rows"][0]["ratio"] = data["rows"][0]["ratio"].replace("6.6x", "6.7x")
    (results / "load.json").write_text(json.dumps(data))
    assert _run_charts("--check", "--results", str(results), "--out", str(docs)).returncode == 1
    r = _run_charts("--results", str(results), "--out", str(docs))
    assert r.returncode == 0, r.stderr
    assert "6.7x" in (docs / "benchmarks.md").read_text()
    assert {p.name for p in (docs / "img").glob("*.png")} == {c[0] for cs in charts.CHARTS.values() for c in cs}
    assert _run_charts("--check", "--results", str(results), "--out", str(docs)).returncode == 0


def test_bad_json_is_one_line_naming_the_file(copies):
    results, docs = copies
    (results / "nf4.json").write_text('{"source": "x", "rows": [}')
    r = _run_charts("--check", "--results", str(results), "--out", str(docs))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "nf4.json:1" in r.stderr
