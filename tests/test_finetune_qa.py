"""`phiforge finetune` on Q/A data (phiforge/commands/finetune.py): closed-book rows, `--raft --index` rows built
with the real MiniLM retriever over three bundled documents, a tiny random Phi-3 trained on them for a few steps, an
exact resume that reuses the built rows, and the one-line errors naming the flag."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from phiforge.cli import main
from phiforge.retrieval.qa import ABSTAIN_ANSWER, closed_book_messages, load_qa
from phiforge.retrieval.raft import closed_book_rows
from phiforge.retrieval.store import Index
from tiny_phi3 import save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "data" / "docs"
QA = [
    {"question": "How fast must a crew reach a trunk main burst?", "answer": "within 1 hour",
     "sources": ["04_burst_mains.html"]},
    {"question": "What is the lead limit in drinking water?", "answer": "10 micrograms per litre",
     "sources": ["06_water_quality_sampling.txt"]},
    {"question": "Which storage level starts a hosepipe ban in summer?", "answer": "below 55%",
     "sources": ["09_drought_plan.md"]},
    {"question": "How long is a valve chamber permit valid?", "answer": ABSTAIN_ANSWER, "answerable": False},
]
TINY = ["--rank", "4", "--alpha", "8", "--dtype", "float32", "--no-progress", "--batch-size", "2", "--lr", "5e-3",
        "--seq-len", "1024"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ftqa")
    model, _ = save_tiny(d / "model", with_tokenizer=True)
    docs = d / "docs"
    docs.mkdir()
    for name in ("04_burst_mains.html", "06_water_quality_sampling.txt", "09_drought_plan.md"):
        shutil.copy(DOCS / name, docs / name)
    with Index.open(d / "index") as ix:  # the default encoder: what finetune opens the index with
        ix.add([docs])
    qa = d / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in QA))
    chat = d / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    return model, d / "index", qa, chat


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in rows(out / "metrics.jsonl") if "loss" in r]


def test_raft_end_to_end_and_exact_resume(setup, tmp_path, capsys):
    model, index, qa, _ = setup
    base = ["finetune", "--model", str(model), "--data", str(qa), "--raft", "--index", str(index), "--raft-k", "3",
            "--raft-p", "1.0", "--schedule", "constant", "--warmup-steps", "0", *TINY]
    assert main([*base, "--out", str(tmp_path / "full"), "--max-steps", "3"]) == 0
    said = capsys.readouterr().out
    assert "4 RAFT rows (k=3, p=1.0: gold chunk in 3 of 3 answerable contexts, 1 unanswerable)" in said
    built = rows(tmp_path / "full" / "train_data.jsonl")
    assert len(built) == 4
    for r, q in zip(built, QA):
        system, user, reply = r["messages"]
        assert user["content"].startswith("Sources:\n\n[1] ") and f"Question: {q['question']}" in user["content"]
        assert re.findall(r"(?:^|\n)\[(\d)\] 0\d_", user["content"]) == ["1", "2", "3"]  # k numbered sources
        if q.get("answerable", True):
            quote = reply["content"].split('says: "', 1)[1].split('"\nAnswer:', 1)[0]
            assert quote in user["content"] and reply["content"].endswith(f"Answer: {q['answer']} "
                                                                       f"[{reply['content'][1]}]")
        else:
            assert reply["content"] == f"Answer: {ABSTAIN_ANSWER}"
    args = json.loads((tmp_path / "full" / "training_args.json").read_text())
    assert args["raft"] and args["raft_k"] == 3 and args["index"] == str(index)
    assert args["data"] == str(tmp_path / "full" / "train_data.jsonl")

    cut = tmp_path / "cut"
    assert main([*base, "--out", str(cut), "--max-steps", "2", "--save-every", "1"]) == 0
    qa_changed = tmp_path / "qa2.jsonl"  # resume trains on the rows it started with, not on a rebuilt set
    qa_changed.write_text(json.dumps(QA[0]) + "\n")
    capsys.readouterr()
    resumed = [*base, "--out", str(cut), "--max-steps", "3", "--resume"]
    assert main([x if x != str(qa) else str(qa_changed) for x in resumed]) == 0
    assert "resume reuses the training rows" in capsys.readouterr().out
    assert losses(cut) == losses(tmp_path / "full")  # bit-for-bit

    assert main([*resumed[:-3], "--raft-p", "0.5", "--out", str(cut), "--max-steps", "4", "--resume"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--raft-p was 1.0, now 0.5" in err and len(err.splitlines()) == 1


def test_closed_book_rows_for_data_and_eval(setup, tmp_path, capsys):
    model, _, qa, _ = setup
    out = tmp_path / "ft"
    assert main(["finetune", "--model", str(model), "--data", str(qa), "--eval", str(qa), "--out", str(out),
                 "--max-steps", "2", *TINY]) == 0
    expected = closed_book_rows(load_qa(qa))
    assert rows(out / "train_data.jsonl") == expected == rows(out / "eval_data.jsonl")
    assert expected[0]["messages"][:2] == closed_book_messages(QA[0]["question"])
    assert [r["step"] for r in rows(out / "metrics.jsonl") if "eval_loss" in r] == [2]
    assert json.loads((out / "training_args.json").read_text())["eval_data"] == str(out / "eval_data.jsonl")


@pytest.mark.parametrize("extra, says", [
    (["--raft"], "--raft: needs --index DIR"),
    (["--raft", "--index", "{index}", "--raft-p", "1.5"], "--raft-p: must be in [0, 1], got 1.5"),
    (["--raft", "--index", "{index}", "--data", "{chat}"], "--raft: {chat} holds chat or prompt/completion rows"),
    (["--raft", "--index", "{tmp}/nowhere"], "--index: no such index directory: {tmp}/nowhere"),
    (["--raft", "--index", "{tmp}"], "--index: {tmp}: no index there"),
    (["--raft", "--index", "{index}", "--raft-k", "0"], "--raft-k: must be >= 1, got 0"),
])
def test_errors_name_the_flag(setup, tmp_path, capsys, extra, says):
    model, index, qa, chat = setup
    fill = dict(index=index, chat=chat, tmp=tmp_path)
    argv = ["finetune", "--model", str(model), "--data", str(qa), "--out", str(tmp_path / "out"), "--max-steps", "1",
            *TINY, *[x.format(**fill) for x in extra]]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == err.splitlines()[0] and err.startswith("error: ") and says.format(**fill) in err, err
    assert not (tmp_path / "out").exists()  # nothing left behind
