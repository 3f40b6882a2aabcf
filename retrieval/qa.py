"""Question/answer sets for evaluation and for fine-tuning on a company's documents.

One JSON object per line:

    {"question": "...", "answer": "...", "sources": ["04_burst_mains.html"], "answerable": true}

`answer` may also be a JSON object: the fields a structured answer (`evaluate --json-schema`) should hold, kept in
`QARow.fields` (and, compact, as the `answer` text).

`sources` (optional, default []) names the documents that hold the answer by file name, the way an index's hits
name them (`Path(hit.source).name`), so a set survives re-chunking. `answerable` (optional, default true) is false
for a question the documents cannot answer; its `answer` is then the abstention the model should give. A bad row
raises QAError naming file:line and the field.

The closed-book prompt (no sources) lives here beside the abstention text, so fine-tuning data and evaluation ask a
question the same way.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

ABSTAIN_ANSWER = "I do not know: the documents do not say."
CLOSED_BOOK_SYSTEM = ("You are a careful assistant for company documents. Answer the question briefly. "
                      "If you do not know the answer, say that you do not know.")
# how models say they cannot answer; matched on the lowercased answer (the RAG prompt asks for "do not know")
_ABSTAIN = re.compile(r"\b(do not know|don't know|dont know|not (?:sure|known)|cannot (?:find|answer|say)|"
                      r"can't (?:find|answer|say)|(?:does|do) not (?:say|mention|contain|specify|state)|"
                      r"no information|not (?:in|mentioned in|stated in) the (?:sources|documents|context)|"
                      r"unable to (?:find|answer))\b")


class QAError(ValueError):
    """A bad Q/A file; the message names file:line and the field."""


@dataclass(frozen=True)
class QARow:
    question: str
    answer: str
    sources: tuple[str, ...] = field(default_factory=tuple)
    answerable: bool = True
    line: int = 0  # 1-based line in its file, for messages
    fields: dict | None = None  # an object `answer`: the expected fields of a structured answer


def _row(obj: object, where: str) -> QARow:
    if not isinstance(obj, dict):
        raise QAError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if not isinstance(obj.get("question"), str) or not obj["question"].strip():
        raise QAError(f"{where}: field 'question' must be a non-empty string")
    answer, fields = obj.get("answer"), None
    if isinstance(answer, dict) and answer:
        fields, answer = answer, json.dumps(answer, ensure_ascii=False, separators=(",", ":"))
    if not isinstance(answer, str) or not answer.strip():
        raise QAError(f"{where}: field 'answer' must be a non-empty string (or, for structured answers, a "
                      "non-empty object)")
    sources = obj.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(s, str) and s.strip() for s in sources):
        raise QAError(f"{where}: field 'sources' must be a list of file names")
    answerable = obj.get("answerable", True)
    if not isinstance(answerable, bool):
        raise QAError(f"{where}: field 'answerable' must be true or false")
    if not answerable and sources:
        raise QAError(f"{where}: an unanswerable question cannot have 'sources'")
    return QARow(obj["question"].strip(), answer.strip(), tuple(Path(s).name for s in sources), answerable,
                 int(where.rsplit(":", 1)[1]), fields)


def load_qa(path: str | Path) -> list[QARow]:
    """Every row of a Q/A JSONL file, validated; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise QAError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise QAError(f"{where}: not valid JSON at column {e.colno} ({e.msg})") from None
            rows.append(_row(obj, where))
    if not rows:
        raise QAError(f"{path}: no rows (the file is empty)")
    return rows


def abstained(text: str) -> bool:
    """Whether an answer declines to answer (says it does not know / the sources do not say)."""
    return bool(_ABSTAIN.search(text.lower().replace("\u2019", "'")))


def closed_book_messages(question: str, schema: dict | None = None) -> list[dict]:
    """The chat a question is asked in without sources (base and fine-tuned modes, and their training rows); with
    `schema`, the question asks for a JSON answer of that schema."""
    if schema is not None:
        question += "\nAnswer as JSON with this schema: " + json.dumps(schema)
    return [{"role": "system", "content": CLOSED_BOOK_SYSTEM}, {"role": "user", "content": question}]
