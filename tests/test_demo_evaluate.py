"""The demo's evaluate part keeps its two adapters keyed by what shapes them: a matching key reuses the adapter
without training (from any checkout), a changed option or Q/A file trains again, and an interrupted training is never taken as done."""
from __future__ import annotations

import dataclasses
import json

import jsonschema
import pytest

from phiforge import demo_evaluate
from phiforge.retrieval.qa import load_qa


def _ft(tmp_path):
    (tmp_path / "idx").mkdir(exist_ok=True)  # the raft config checks its index exists; ft is the one used here
    return demo_evaluate._configs(60, 30, 3e-3, tmp_path / "idx", demo_evaluate._home())["ft"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PHIFORGE_HOME", str(tmp_path))
    calls = []

    def fake_finetune(config):
        calls.append(config)
        (tmp_path / "demo-eval" / "ft").mkdir(parents=True, exist_ok=True)
        if getattr(fake_finetune, "interrupt", False):
            raise KeyboardInterrupt
        return {"losses": [2.0], "final_loss": 1.0}

    monkeypatch.setattr(demo_evaluate, "finetune", fake_finetune)
    monkeypatch.setattr(demo_evaluate, "prepare_data", lambda c: c)
    return tmp_path, calls, fake_finetune


def test_adapter_reused_only_while_its_key_matches(home, tmp_path):
    _, calls, _ = home
    cfg = _ft(tmp_path)
    out = demo_evaluate._adapter("ft", cfg, retrain=False)
    assert len(calls) == 1 and json.loads((out / demo_evaluate.KEY_FILE).read_text()) == demo_evaluate._key(cfg)
    demo_evaluate._adapter("ft", cfg, retrain=False)
    assert len(calls) == 1  # reused
    demo_evaluate._adapter("ft", dataclasses.replace(cfg, max_steps=61), retrain=False)
    assert len(calls) == 2  # another option: trained again
    demo_evaluate._adapter("ft", dataclasses.replace(cfg, max_steps=61), retrain=True)
    assert len(calls) == 3  # --retrain


def test_key_follows_the_qa_file(home, tmp_path):
    cfg = _ft(tmp_path)
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "q", "answer": "a"}\n')
    a = demo_evaluate._key(dataclasses.replace(cfg, data=str(qa)))
    other = tmp_path / "another-checkout" / "qa.jsonl"  # the same file in another checkout: the same key
    other.parent.mkdir()
    other.write_text(qa.read_text())
    assert demo_evaluate._key(dataclasses.replace(cfg, data=str(other))) == a
    qa.write_text('{"question": "q", "answer": "b"}\n')
    assert demo_evaluate._key(dataclasses.replace(cfg, data=str(qa))) != a


def test_interrupted_training_is_not_taken_as_trained(home, tmp_path):
    _, calls, fake = home
    cfg = _ft(tmp_path)
    fake.interrupt = True
    with pytest.raises(KeyboardInterrupt):
        demo_evaluate._adapter("ft", cfg, retrain=False)
    assert not (demo_evaluate._home() / "ft" / demo_evaluate.KEY_FILE).exists()
    fake.interrupt = False
    demo_evaluate._adapter("ft", cfg, retrain=False)
    assert len(calls) == 2


def test_the_structured_demo_data_fits_its_schema():
    """Step 4's questions: each answer is an object valid against the shipped schema, its sources shipped, and
    the numbers are the documents' own (so a right answer can score)."""
    data = demo_evaluate.data_dir()
    schema = demo_evaluate.read_schema(data / "schemas" / "tariff.json")
    rows = load_qa(data / "qa" / "tariffs.jsonl")
    assert rows and all(r.fields for r in rows)
    for r in rows:
        jsonschema.validate(r.fields, schema)
        docs = [(data / "docs" / s).read_text() for s in r.sources]
        assert all(any(f"£{v:.2f}" in d for d in docs) for v in r.fields.values() if isinstance(v, float))
