"""The report files: cells formatted as mean [lo, hi], a real PNG, JSONL records, nothing half-written."""
from __future__ import annotations

import io
import json

from matplotlib.image import imread

from phiforge.evaluation.report import FILES, markdown, table_markdown, write_report

ROW = {"label": "rag (gold ctx)", "mode": "rag", "context": "gold", "questions": 3, "mode_seconds": 12.34,
       "metrics": {"f1": {"mean": 0.5, "lo": 0.25, "hi": 0.75, "n": 3}, "abstain": None,
                   "prompt_tokens": {"mean": 612.4, "lo": 500.0, "hi": 700.2, "n": 3},
                   "latency_s": {"mean": 1.234, "lo": 1.0, "hi": 1.5, "n": 3}}}
REPORT = {"data": "qa.jsonl", "questions": 3, "answerable": 3, "model": "m", "k": 4, "max_new_tokens": 64,
          "table": [ROW], "retrieval": {"k": 4, "questions": 3,
                                        "after": {"recall": {"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 3}, "mrr": None}},
          "recommendation": ["Best answers: rag."]}


def test_cells():
    md = table_markdown([ROW])
    row = md.splitlines()[2]
    assert row.startswith("| rag (gold ctx) | 3 | 50.0 [25.0, 75.0] |")
    assert "| 612 [500, 700] |" in row and "| 1.23 [1.00, 1.50] |" in row and row.endswith("| 12.3 |")
    assert "| – |" in row  # undefined cells
    assert len(md.splitlines()[0].split("|")) == len(row.split("|"))


def test_files(tmp_path):
    recs = [{"mode": "rag", "line": 1, "text": "é [1]"}]
    paths = write_report(tmp_path / "out", REPORT, recs, [])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(FILES)  # no temp files left
    assert [json.loads(x) for x in paths["results.jsonl"].read_text().splitlines()] == recs
    assert paths["retrieval.jsonl"].read_text() == ""
    img = imread(io.BytesIO(paths["chart.png"].read_bytes()), format="png")
    assert img.shape[0] > 100 and img.shape[1] > 100
    md = paths["report.md"].read_text()
    assert md == markdown(REPORT) and "| --index | 100.0 [100.0, 100.0] | – |" in md
    assert "- Best answers: rag." in md
