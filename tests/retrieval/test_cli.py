"""`phiforge index tune`, `index add --encoder` and an index keeping its encoder, end to end on a tiny index with
the real MiniLM (one short LoRA run shared by the module)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from phiforge.cli import main
from phiforge.retrieval.encoder import ENCODER_NAME, load_encoder
from phiforge.retrieval.manifest import IndexMismatch
from phiforge.retrieval.rerank import load_reranker, passage_text, reranker_dir
from phiforge.retrieval.store import Hit, Index

DOCS = {
    "pumps.md": "# Pumps\n\nPump stations switch to standby power within 30 seconds of a mains failure.",
    "tariff.md": "# Tariff\n\nMetered water costs 1.87 pounds per cubic metre in 2026.",
    "quality.md": "# Sampling\n\nFree chlorine is sampled daily at every service reservoir outlet.",
    "drought.md": "# Drought\n\nA hosepipe ban starts when reservoir storage falls below 60 percent.",
}
QA = [
    {"question": "How fast do pumps get standby power?", "answer": "within 30 seconds", "sources": ["pumps.md"]},
    {"question": "What does metered water cost?", "answer": "1.87 pounds per cubic metre", "sources": ["tariff.md"]},
    {"question": "Where is chlorine sampled?", "answer": "at every service reservoir outlet",
     "sources": ["quality.md"]},
    {"question": "When does a hosepipe ban start?", "answer": "storage below 60 percent", "sources": ["drought.md"]},
    {"question": "Who is the chief executive?", "answer": "I do not know: the documents do not say.",
     "answerable": False},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("tune")
    docs = root / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    assert main(["index", "add", str(docs), "--index", str(root / "base")]) == 0
    qa = write_jsonl(root / "qa.jsonl", QA)
    rc = main(["index", "tune", "--data", str(qa), "--out", str(root / "enc"), "--index", str(root / "base"),
               "--epochs", "2", "--batch", "4", "--lora-rank", "2", "--lr", "1e-3", "--seed", "3", "--threads", "1",
               "--negatives-from", "corpus", "--remine"])
    assert rc == 0
    return root


def test_tune_end_to_end(setup, capsys):
    meta = json.loads((setup / "enc" / "encoder.json").read_text())
    assert meta["mode"] == "lora" and meta["training"]["seed"] == 3 and meta["training"]["steps"] == 2
    assert meta["training"]["negatives_from"] == "corpus" and meta["training"]["remine"] is True
    assert meta["name"].startswith(ENCODER_NAME + "+tuned-")
    enc = load_encoder(setup / "enc")
    assert enc.name == meta["name"]
    base = load_encoder()
    assert np.abs(enc.encode(["What does metered water cost?"]) - base.encode(["What does metered water cost?"])
                  ).max() > 1e-5


def test_add_with_encoder_then_search_uses_it(setup, capsys):
    ix_dir = setup / "tuned-index"
    assert main(["index", "add", str(setup / "docs"), "--index", str(ix_dir), "--encoder", str(setup / "enc")]) == 0
    manifest = json.loads((ix_dir / "manifest.json").read_text())
    enc = load_encoder(setup / "enc")
    assert manifest["encoder"] == enc.name and manifest["encoder_path"] == str((setup / "enc").resolve())
    capsys.readouterr()
    q = "When does a hosepipe ban start?"
    assert main(["search", "--index", str(ix_dir), q, "-k", "4", "--json"]) == 0  # no flag: the index's encoder
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with Index.open(ix_dir) as ix:
        assert ix.encoder.name == enc.name
        want = {h.chunk_id: float(enc.encode([q])[0] @ enc.encode([h.text if not h.heading else
                                                                     f"{h.heading}\n{h.text}"])[0])
                for h in ix.search_vector(enc.encode([q])[0], 4)}
    for h in hits:  # scores are the tuned encoder's cosines
        assert h["score"] == pytest.approx(want[h["chunk_id"]], abs=1e-5)
    # adding again without --encoder keeps the tuned encoder (nothing changed: nothing embedded)
    (setup / "docs" / "extra.md").write_text("# Extra\n\nMeters are read twice a year.")
    try:
        assert main(["index", "add", str(setup / "docs"), "--index", str(ix_dir)]) == 0
    finally:
        (setup / "docs" / "extra.md").unlink()
    assert json.loads((ix_dir / "manifest.json").read_text())["encoder"] == enc.name


def test_index_refuses_mismatched_encoder(setup, capsys):
    tuned = load_encoder(setup / "enc")
    capsys.readouterr()
    # a base-model index refuses the tuned encoder, naming both
    assert main(["index", "add", str(setup / "docs"), "--index", str(setup / "base"), "--encoder",
                 str(setup / "enc")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ENCODER_NAME in err and tuned.name in err
    # a tuned index refuses queries from the base model
    ix_dir = setup / "tuned-index2"
    assert main(["index", "add", str(setup / "docs"), "--index", str(ix_dir), "--encoder", str(setup / "enc")]) == 0
    with pytest.raises(IndexMismatch, match=r"\+tuned-"):
        Index.open(ix_dir, load_encoder())
    # the tuned encoder moved away: a one-line error, not the base model's vectors under the tuned name
    moved = setup / "enc-moved"
    shutil.move(str(setup / "enc"), str(moved))
    try:
        capsys.readouterr()
        assert main(["search", "--index", str(ix_dir), "pumps"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "gone" in err and tuned.name in err
    finally:
        shutil.move(str(moved), str(setup / "enc"))


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("bad_json", "qa.jsonl:2: not valid JSON"),
    ("bad_field", "qa.jsonl:1: field 'answer'"),
    ("unanswerable_only", "0 usable rows"),
    ("unknown_source", "qa.jsonl:1: source 'nope.md' is not in index"),
    ("no_index", "no index there"),
    ("epochs", "--epochs: must be >= 1"),
    ("interpolate", "--interpolate: must be in (0, 1]"),
    ("out_in_use", "is not a tuned encoder folder"),
])
def test_tune_bad_input_is_one_line(setup, tmp_path, capsys, case, message):
    qa = tmp_path / "qa.jsonl"
    args = ["--index", str(setup / "base")]
    if case == "missing":
        qa = tmp_path / "none.jsonl"
    elif case == "bad_json":
        write_jsonl(qa, [QA[0], "{not json"])
    elif case == "bad_field":
        write_jsonl(qa, [{"question": "q"}])
    elif case == "unanswerable_only":
        write_jsonl(qa, [QA[4], QA[4]])
    elif case == "unknown_source":
        write_jsonl(qa, [{**QA[0], "sources": ["nope.md"]}, QA[1]])
    else:
        write_jsonl(qa, QA)
        if case == "no_index":
            args = ["--index", str(tmp_path / "nothing")]
        elif case == "epochs":
            args += ["--epochs", "0"]
        elif case == "interpolate":
            args += ["--interpolate", "0"]
        else:  # a folder holding the user's files is never replaced by the tuned encoder
            (tmp_path / "out").mkdir()
            (tmp_path / "out" / "notes.md").write_text("mine")
    capsys.readouterr()
    assert main(["index", "tune", "--data", str(qa), "--out", str(tmp_path / "out"), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.md"] if case == "out_in_use" else \
        not (tmp_path / "out").exists()


def test_add_with_missing_encoder_folder(tmp_path, capsys):
    (tmp_path / "a.md").write_text("text")
    assert main(["index", "add", str(tmp_path / "a.md"), "--index", str(tmp_path / "ix"), "--encoder",
                 str(tmp_path / "nope")]) == 1
    assert "--encoder" in capsys.readouterr().err
    assert not (tmp_path / "ix").exists()


def _search_json(capsys, args: list[str]) -> list[dict]:
    capsys.readouterr()
    assert main(["search", *args, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_tune_with_reranker_then_search_reranks_with_it(setup, tmp_path, capsys, one_thread):
    qa = write_jsonl(tmp_path / "qa.jsonl", QA)
    out = tmp_path / "enc"
    assert main(["index", "tune", "--data", str(qa), "--out", str(out), "--index", str(setup / "base"), "--epochs",
                 "1", "--batch", "4", "--lora-rank", "2", "--seed", "1", "--threads", "1", "--rerank"]) == 0
    assert "saved the reranker to" in capsys.readouterr().out
    adapter = reranker_dir(out)
    assert adapter == out / "reranker" and (adapter / "adapter_model.safetensors").is_file()
    rows = [json.loads(x) for x in (adapter / "train_data.jsonl").read_text().splitlines()]
    assert {r["prompt"] for r in rows} == {f"Question: {r['question']}\nAnswer:" for r in QA[:4]}
    assert main(["index", "add", str(setup / "docs"), "--index", str(tmp_path / "ix"), "--encoder", str(out)]) == 0
    q = "When does a hosepipe ban start?"
    plain = _search_json(capsys, ["--index", str(tmp_path / "ix"), q, "-k", "4"])
    got = _search_json(capsys, ["--index", str(tmp_path / "ix"), q, "-k", "2", "--rerank"])
    # the tuned reranker's fused scores, recomputed here from the encoder's hits
    rr = load_reranker(adapter)
    hits = [Hit(**h) for h in plain]
    fused = {h.chunk_id: h.score + rr.cfg.weight * p for h, p in zip(hits, rr.pmi(q, [passage_text(h) for h in hits]))}
    want = sorted(fused, key=lambda c: -fused[c])[:2]
    assert [h["chunk_id"] for h in got] == want
    assert [h["score"] for h in got] == pytest.approx([fused[c] for c in want], abs=1e-4)
    # an index of the untuned encoder reranks with the default model zero-shot
    base = _search_json(capsys, ["--index", str(setup / "base"), q, "-k", "4", "--rerank"])
    zero = load_reranker(None)
    plain = [Hit(**h) for h in _search_json(capsys, ["--index", str(setup / "base"), q, "-k", "4"])]
    pmi = dict(zip([h.chunk_id for h in plain], zero.pmi(q, [passage_text(h) for h in plain])))
    assert [h["score"] for h in base] == pytest.approx(
        sorted((h.score + zero.cfg.weight * pmi[h.chunk_id] for h in plain), reverse=True), abs=1e-4)
