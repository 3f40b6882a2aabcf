"""Q/A files: valid rows load with defaults, every kind of bad row names file:line and the field; abstentions."""
import json

import pytest

from phiforge.retrieval.qa import ABSTAIN_ANSWER, QAError, abstained, closed_book_messages, load_qa


def _write(tmp_path, lines):
    p = tmp_path / "qa.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_rows_load_with_defaults(tmp_path):
    p = _write(tmp_path, [{"question": " Q1? ", "answer": "A1", "sources": ["docs/a.md"]}, "",
                          {"question": "Q2?", "answer": ABSTAIN_ANSWER, "answerable": False}])
    a, b = load_qa(p)
    assert (a.question, a.answer, a.sources, a.answerable, a.line) == ("Q1?", "A1", ("a.md",), True, 1)
    assert (b.sources, b.answerable, b.line) == ((), False, 3)
    assert a.fields is None and b.fields is None


def test_an_object_answer_is_the_fields_of_a_structured_answer(tmp_path):
    (row,) = load_qa(_write(tmp_path, [{"question": "Price?", "answer": {"price": 1.87, "unit": "m³"}}]))
    assert row.fields == {"price": 1.87, "unit": "m³"} and row.answer == '{"price":1.87,"unit":"m³"}'


@pytest.mark.parametrize("row, why", [
    ("{not json", "not valid JSON at column 2"),
    ([1, 2], "expected a JSON object, got list"),
    ({"answer": "x"}, "field 'question' must be a non-empty string"),
    ({"question": "q", "answer": " "}, "field 'answer' must be a non-empty string"),
    ({"question": "q", "answer": {}}, "(or, for structured answers, a non-empty object)"),
    ({"question": "q", "answer": 3}, "field 'answer' must be a non-empty string"),
    ({"question": "q", "answer": "a", "sources": "a.md"}, "field 'sources' must be a list of file names"),
    ({"question": "q", "answer": "a", "answerable": "no"}, "field 'answerable' must be true or false"),
    ({"question": "q", "answer": "a", "answerable": False, "sources": ["a.md"]}, "cannot have 'sources'"),
])
def test_bad_row_names_file_line_and_field(tmp_path, row, why):
    p = _write(tmp_path, [{"question": "q", "answer": "a"}, row])
    with pytest.raises(QAError) as e:
        load_qa(p)
    assert str(e.value).startswith(f"{p}:2: ") and why in str(e.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(QAError, match="no such file"):
        load_qa(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(QAError, match="no rows"):
        load_qa(tmp_path / "e.jsonl")


@pytest.mark.parametrize("text, expected", [
    (ABSTAIN_ANSWER, True), ("I don’t know.", True), ("The sources do not say how long.", True),
    ("There is no information about that.", True), ("Call 0800 555 0192 [1].", False),
    ("The charge is £1.87 per cubic metre.", False),
])
def test_abstained(text, expected):
    assert abstained(text) is expected


def test_closed_book_messages():
    m = closed_book_messages("Who runs it?")
    assert [x["role"] for x in m] == ["system", "user"] and m[1]["content"] == "Who runs it?"
