"""bench/report.py: what a bench prints is what it writes, and a result that cannot be written leaves the old file."""
import json

import pytest

from phiforge.bench.report import emit


def test_printed_and_written_json_are_the_same(tmp_path, capsys):
    out = tmp_path / "r.json"
    result = {"ratio": 1.5, "rows": [{"name": "a", "tok_s": 12.0}]}
    emit(result, str(out))
    printed = capsys.readouterr().out
    assert printed == out.read_text()
    assert json.loads(printed) == result


def test_no_out_writes_nothing(tmp_path, capsys):
    emit({"x": 1}, None)
    assert json.loads(capsys.readouterr().out) == {"x": 1}
    assert list(tmp_path.iterdir()) == []


def test_unserialisable_result_leaves_the_previous_file(tmp_path):
    out = tmp_path / "r.json"
    out.write_text('{"old": true}\n')
    with pytest.raises(TypeError):
        emit({"bad": object()}, str(out))
    assert out.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
