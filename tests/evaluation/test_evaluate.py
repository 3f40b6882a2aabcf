"""`evaluate` end to end on a tiny random Phi-3 (the default model's tokenizer), two tiny LoRA adapters (ft, raft)
and a tiny index over three documents embedded by a deterministic bag-of-words encoder: every mode and context
answers every question through the engine, the files are written, and the report's numbers equal those
recomputed from the per-question records. Then the CLI's one-line errors for bad input."""
from __future__ import annotations

import json
import re
import sys

import jsonschema
import numpy as np
import pytest
from hash_encoder import HashEncoder
import torch
from tiny_phi3 import randomize_lora_B, save_tiny

from phiforge.cli import main
from phiforge.engine.formats.loader import load_model
from phiforge.engine.formats.peft import save_adapter
from phiforge.engine.model.lora import apply_lora
from phiforge.engine.model.tokenizer import load_tokenizer
from phiforge.evaluation import evaluate
from phiforge.evaluation import metrics
from phiforge.evaluation.report import FILES
from phiforge.evaluation.runner import run_mode
from phiforge.evaluation.summary import METRICS
from phiforge.retrieval.qa import ABSTAIN_ANSWER, QAError, closed_book_messages
from phiforge.retrieval.rag import with_citations
from phiforge.retrieval.store import Index

pytestmark = pytest.mark.usefixtures("one_thread")
K = 2
DOCS = {
    "pumps.md": "# Pumps\n\nPump 4 at Hollins station is serviced every 6 months by the mechanical team.",
    "tariff.txt": "Residential water costs 1.87 per cubic metre. Sewerage costs 2.31 per cubic metre.",
    "bursts.md": "# Bursts\n\nA crew must reach a burst on a trunk main within 1 hour, day or night.",
}
QA = [
    {"question": "How often is pump 4 serviced?", "answer": "every 6 months", "sources": ["pumps.md"]},
    {"question": "What does residential water cost?", "answer": "1.87 per cubic metre", "sources": ["tariff.txt"]},
    {"question": "How fast must a crew reach a trunk main burst?", "answer": "within 1 hour",
     "sources": ["bursts.md", "pumps.md"]},
    {"question": "What is the CEO's favourite colour?", "answer": ABSTAIN_ANSWER, "answerable": False},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    model = save_tiny(root / "model", with_tokenizer=True)[0]
    adapters = {}
    for i, name in enumerate(("ft", "raft")):
        net = load_model(model, dtype=torch.float32)
        torch.manual_seed(10 + i)
        apply_lora(net, r=4, alpha=8, dropout=0.0, targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
        randomize_lora_B(net, seed=20 + i, std=0.3)
        adapters[name] = save_adapter(net, root / name)
    docs = root / "docs"
    docs.mkdir()
    for n, text in DOCS.items():
        (docs / n).write_text(text)
    for folder, enc in (("index", HashEncoder()), ("baseline", HashEncoder(48, "test-baseline"))):
        with Index.open(root / folder, encoder=enc) as ix:
            ix.add([docs])
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in QA))
    return root, model, adapters, data


@pytest.fixture(scope="module")
def run(setup):
    root, model, adapters, data = setup
    out = root / "out"
    report = evaluate(model, data, index=root / "index", adapters=adapters, k=K, out=out, max_new_tokens=6,
                      max_batch=4, seed=5, retriever_baseline=root / "baseline", dtype=torch.float32,
                      encoder=HashEncoder(), baseline_encoder=HashEncoder(48, "test-baseline"), log=None)
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    ret = [json.loads(x) for x in (out / "retrieval.jsonl").read_text().splitlines()]
    return report, records, ret, out


def test_every_mode_and_context_answers_every_question(run, setup):
    report, records, _, out = run
    assert report["modes"] == ["base", "rag", "ft", "rag+ft", "raft+rag"]
    got = {(r["mode"], r["context"], r["line"]) for r in records}
    want = {(m, "none", i) for m in ("base", "ft") for i in range(1, 5)}
    want |= {(m, c, i) for m in ("rag", "rag+ft", "raft+rag") for c in ("retrieved", "gold") for i in range(1, 5)}
    assert got == want and len(records) == len(want)
    assert [r["label"] for r in report["table"]] == ["base", "rag", "rag (gold ctx)", "ft", "rag+ft",
                                                     "rag+ft (gold ctx)", "raft+rag", "raft+rag (gold ctx)"]
    assert set(report["seconds"]) == set(report["modes"])
    assert all(r["completion_tokens"] >= 1 and r["latency_s"] >= r["ttft_s"] > 0 for r in records)


def test_prompts_are_the_closed_book_and_the_sourced_ones(run, setup):
    _, records, _, _ = run
    tok = load_tokenizer(setup[1])
    for r in records:
        if r["context"] == "none":
            assert r["shown"] == [] and r["cited_any"] is None
            assert r["prompt_tokens"] == len(tok.apply_chat_template(closed_book_messages(r["question"])))
        else:
            assert 1 <= len(r["shown"]) <= K and r["cited_any"] in (0.0, 1.0)
        if r["context"] == "retrieved":
            assert r["shown"] == r["retrieved"][:len(r["shown"])]
        if r["context"] == "gold" and r["answerable"]:
            # the gold context holds only chunks of the gold documents, as many as they have up to k
            assert set(r["shown"]) <= set(r["gold_sources"]) and r["gold_context"] is True
            assert len(r["shown"]) == min(K, len(r["gold_sources"]))
        if r["context"] == "gold" and not r["answerable"]:
            twin = next(x for x in records if (x["mode"], x["line"], x["context"]) == (r["mode"], r["line"],
                                                                                        "retrieved"))
            assert r["shown"] == twin["shown"] and r["gold_context"] is False
            # the same prompt is answered once: the very same result (timings included) scored for both contexts
            assert (r["text"], r["latency_s"], r["ttft_s"]) == (twin["text"], twin["latency_s"], twin["ttft_s"])


def test_adapters_change_the_answers(run):
    _, records, _, _ = run
    text = {(r["mode"], r["context"], r["line"]): r["text"] for r in records}
    assert any(text[("base", "none", i)] != text[("ft", "none", i)] for i in range(1, 5))
    assert any(text[("rag+ft", "retrieved", i)] != text[("raft+rag", "retrieved", i)] for i in range(1, 5))


def _recomputed(r: dict, k: int) -> dict:
    """A record's metrics from its text and gold fields alone."""
    ans = metrics.extract_answer(r["text"])
    gold = set(r["gold_sources"])
    out = {"em": None, "f1": None, "contains": None, "abstain": None, "false_abstain": None,
           "cite_precision": None, "cite_recall": None, "recall": None, "mrr": None}
    declined = float(metrics.abstained(ans))
    if r["answerable"]:
        out.update(em=metrics.exact_match(ans, r["gold_answer"]), f1=metrics.token_f1(ans, r["gold_answer"]),
                   contains=metrics.contains(ans, r["gold_answer"]), false_abstain=declined)
    else:
        out["abstain"] = declined
    if r["shown"] and gold:
        nums = [int(n) for m in re.findall(r"\[(\d+(?:\s*,\s*\d+)*)\]", r["text"]) for n in m.split(",")]
        cited = list(dict.fromkeys(nums))
        docs = [r["shown"][n - 1] if 1 <= n <= len(r["shown"]) else None for n in cited]
        out["cite_precision"] = sum(d in gold for d in docs) / len(docs) if docs else None
        out["cite_recall"] = len(gold & set(docs)) / len(gold)
    if r["context"] == "retrieved" and gold:
        out["recall"] = len(gold & set(r["retrieved"][:k])) / len(gold)
        out["mrr"] = next((1 / (i + 1) for i, d in enumerate(r["retrieved"]) if d in gold), 0.0)
    return out


def test_report_numbers_equal_those_recomputed_from_the_records(run):
    report, records, ret, out = run
    for r in records:
        for key, v in _recomputed(r, K).items():
            assert r[key] == pytest.approx(v) if v is not None else r[key] is None, (key, r)
    for row in report["table"]:
        recs = [r for r in records if r["mode"] == row["mode"] and r["context"] == row["context"]]
        assert row["questions"] == len(recs) == 4
        for m in METRICS:
            vals = [r[m.key] for r in recs if r[m.key] is not None]
            cell = row["metrics"][m.key]
            if not vals:
                assert cell is None, (row["label"], m.key)
                continue
            assert cell["n"] == len(vals) and cell["mean"] == pytest.approx(float(np.mean(vals)))
            assert cell["lo"] <= cell["mean"] <= cell["hi"]
            assert cell == metrics.bootstrap_mean(vals, seed=5).to_dict()
    # retrieval: the index's numbers ("after") are the retrieved records' own, the baseline's from its docs
    assert report["retrieval"]["questions"] == len(ret) == 3
    for tag in ("after", "before"):
        for key in ("recall", "mrr"):
            vals = [x[tag][key] for x in ret]
            assert report["retrieval"][tag][key]["mean"] == pytest.approx(float(np.mean(vals)))
    rag = {r["line"]: r for r in records if (r["mode"], r["context"]) == ("rag", "retrieved")}
    for x in ret:
        assert (x["after"]["recall"], x["after"]["mrr"]) == (rag[x["line"]]["recall"], rag[x["line"]]["mrr"])


def test_files_are_written(run):
    report, _, _, out = run
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    for row in report["table"]:
        assert f"| {row['label']} | 4 |" in md
    assert "## Recommendation" in md and "before (baseline)" in md and "after (--index)" in md
    assert report["recommendation"] and all(line in md for line in report["recommendation"])


def test_a_gold_source_missing_from_the_index_names_file_line(setup, tmp_path):
    root, model, adapters, _ = setup
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps(QA[0]) + "\n" + json.dumps({**QA[1], "sources": ["nowhere.md"]}) + "\n")
    with pytest.raises(QAError, match=rf"^{re.escape(str(data))}:2: field 'sources' names 'nowhere.md'"):
        evaluate(model, data, index=root / "index", encoder=HashEncoder(), log=None)


# ------------------------------------------------------------------------------------------------------- CLI
def _cli_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(["evaluate", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_errors_are_one_line(setup, capsys, tmp_path):
    root, model, adapters, data = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(QA[0]) + "\n" + json.dumps({"question": "q", "answer": "a", "answerable": "no"}) + "\n")
    m = ["--model", str(model), "--data"]
    assert f"{bad}:2: field 'answerable'" in _cli_error(capsys, m + [str(bad)])
    assert "--data" in _cli_error(capsys, m + [str(tmp_path / "missing.jsonl")])
    assert "unknown mode 'rag+raft'" in _cli_error(capsys, m + [str(data), "--modes", "base,rag+raft"])
    assert "--modes rag: needs --index DIR" in _cli_error(capsys, m + [str(data), "--modes", "rag"])
    assert "--modes ft: needs --adapter ft=DIR" in _cli_error(capsys, m + [str(data), "--modes", "base,ft"])
    assert "is not a directory" in _cli_error(capsys, m + [str(data), "--adapter", f"ft={tmp_path / 'nope'}"])
    assert "expected NAME=DIR" in _cli_error(capsys, m + [str(data), "--adapter", "ft"])
    assert "one of ft, raft" in _cli_error(capsys, m + [str(data), "--adapter", f"sql={adapters['ft']}"])
    assert "no adapter_config.json" in _cli_error(capsys, m + [str(data), "--adapter", f"ft={tmp_path}"])
    assert "--index" in _cli_error(capsys, m + [str(data), "--index", str(tmp_path / "noindex")])
    assert "--k: must be >= 1" in _cli_error(capsys, m + [str(data), "--k", "0"])
    assert "--max-batch: must be >= 1" in _cli_error(capsys, m + [str(data), "--max-batch", "0"])
    assert "--retriever-baseline: needs --index" in _cli_error(capsys, m + [str(data), "--retriever-baseline",
                                                                            str(root / "baseline")])
    assert "--rerank: needs --index" in _cli_error(capsys, m + [str(data), "--rerank"])


def test_rerank_orders_the_retrieved_context(setup, tmp_path):
    """--rerank: the index's hits go through the default model's zero-shot reranker before the prompt; the
    baseline index's ranking is left as it was."""
    from phiforge.retrieval.rerank import load_reranker

    root, model, adapters, data = setup
    report = evaluate(model, data, index=root / "index", modes="rag", k=K, out=tmp_path / "o", max_new_tokens=2,
                      max_batch=4, retriever_baseline=root / "baseline", dtype=torch.float32, encoder=HashEncoder(),
                      baseline_encoder=HashEncoder(48, "test-baseline"), rerank=True, log=None)
    assert report["rerank"] is True
    assert "after (--index, reranked)" in (tmp_path / "o" / "report.md").read_text()
    records = [json.loads(x) for x in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    rr = load_reranker(None)
    with Index.open(root / "index", encoder=HashEncoder(), create=False) as ix:
        for r in (x for x in records if x["context"] == "retrieved"):
            want = rr.rerank(r["question"], ix.search(r["question"], k=rr.cfg.depth), K)
            assert r["retrieved"] == [h.source.rsplit("/", 1)[-1] for h in want]


def test_cli_prints_the_table_closed_book(setup, capsys, tmp_path):
    root, model, adapters, data = setup
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--adapter", f"ft={adapters['ft']}",
                 "--max-new-tokens", "4", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "| base | 4 |" in out and "| ft | 4 |" in out and "## Recommendation" in out
    assert json.loads((tmp_path / "o" / "report.json").read_text())["modes"] == ["base", "ft"]


def test_ctrl_c_keeps_the_finished_modes(setup, tmp_path, monkeypatch):
    root, model, adapters, data = setup
    pipeline = sys.modules["phiforge.evaluation.pipeline"]
    calls = []

    def interrupted_second(*a, **kw):
        calls.append(a[2].name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_mode(*a, **kw)

    monkeypatch.setattr(pipeline, "run_mode", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, data, adapters={"ft": adapters["ft"]}, out=tmp_path / "o", max_new_tokens=3,
                 dtype=torch.float32, log=None)
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert calls == ["base", "ft"] and report["interrupted"] is True and report["modes"] == ["base"]
    assert {json.loads(x)["mode"] for x in (tmp_path / "o" / "results.jsonl").read_text().splitlines()} == {"base"}


# ---- structured answers (--json-schema) ----------------------------------------------------------------------------
PRICE = {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 10,
                                                    "multipleOf": 0.01},
                                          "unit": {"enum": ["cubic metre", "litre"]}},
         "required": ["price", "unit"], "additionalProperties": False}


def test_json_schema_answers_validate_and_score_their_fields(setup, tmp_path, capsys):
    root, model, _, _ = setup
    data = tmp_path / "fields.jsonl"
    rows = [{"question": "What does residential water cost?", "answer": {"price": 1.87, "unit": "cubic metre"},
             "sources": ["tariff.txt"]},
            {"question": "What does sewerage cost?", "answer": {"price": 2.31, "unit": "cubic metre"},
             "sources": ["tariff.txt"]},
            {"question": "How often is pump 4 serviced?", "answer": "every 6 months", "sources": ["pumps.md"]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    report = evaluate(model, data, index=root / "index", modes="base,rag", k=K, out=out, max_new_tokens=40,
                      max_batch=4, dtype=torch.float32, encoder=HashEncoder(), json_schema=PRICE, log=None)
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 3
    for r in records:
        assert r["em"] is None and r["f1"] is None and r["abstain"] is None   # text metrics stay off
        valid = r["finish_reason"] == "stop"
        assert r["json_valid"] == float(valid)
        if not valid:
            continue
        got = json.loads(r["text"])
        if r["context"] == "none":
            jsonschema.validate(got, PRICE)
        else:  # the citations field names only sources shown, and they are what is scored as cited
            jsonschema.validate(got, with_citations(PRICE, len(r["shown"])))
            assert r["cited"] == list(dict.fromkeys(got["citations"]))
        gold = rows[r["line"] - 1]["answer"]
        want = None if isinstance(gold, str) else \
            (abs(got["price"] - gold["price"]) < 1e-9) / 2 + (got["unit"] == gold["unit"]) / 2
        assert r["field_em"] == (pytest.approx(want) if want is not None else None)
    assert any(r["json_valid"] for r in records)
    md = (out / "report.md").read_text()
    assert "| JSON valid | field EM |" in md and report["json_schema"] == PRICE
    assert report["recommendation"][0].startswith("Best answers (fields exactly right, structured answers)")
    assert "JSON valid" not in (setup[0] / "out" / "report.md").read_text()   # not shown for text answers
    (tmp_path / "bad.json").write_text("{nope")
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--json-schema",
                 str(tmp_path / "bad.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--json-schema" in err[0] and "not a JSON file" in err[0]
