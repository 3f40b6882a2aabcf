"""The demo's judge of an answer: right only with every number of the expected answer (whole numbers, not digits
inside others), or the whole expected text when it has none; every bundled question has an answer to judge by."""
from __future__ import annotations

import json

import pytest

from phiforge.retrieval.demo import DATA, answered


@pytest.mark.parametrize("expected,text,ok", [
    ("within 1 hour (Priority A)", "Crews must be on site within 1 hour [1].", True),
    ("within 1 hour (Priority A)", "Within 10 hours.", False),
    ("within 1 hour (Priority A)", "Within 1.5 hours.", False),
    ("below 0.2 mg/l for more than 2 hours", "When chlorine is below 0.2 mg/l for 2 hours [2].", True),
    ("below 0.2 mg/l for more than 2 hours", "When chlorine is below 0.2 mg/l.", False),
    ("the duty manager", "It is issued by the Duty  Manager.", True),
    ("the duty manager", "It is issued by the board.", False),
])
def test_answered(expected, text, ok):
    assert answered(expected, text) is ok


def test_every_bundled_question_has_an_expected_answer():
    rows = [json.loads(line) for line in (DATA / "docs_questions.jsonl").read_text().splitlines() if line.strip()]
    assert rows and all(r.get("answer") for r in rows)
