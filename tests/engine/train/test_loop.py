"""The training loop on a tiny random Phi-3 with the default tokenizer: the loss falls, resume replays the same
loss sequence (and applies or refuses changed options), gradient accumulation equals a bigger batch, QLoRA trains,
the CLI and outputs are complete."""
from __future__ import annotations

import json
import math

import pytest
import torch

import phiforge.engine.train.loop as train
from phiforge.cli import main as cli_main
from phiforge.engine.train.config import TrainConfigError
from phiforge.engine.train.loop import finetune, lr_at
from phiforge.engine.train.state import STATE_JSON
from tiny_phi3 import save_tiny


pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [
    {"messages": [{"role": "user", "content": "What is the emergency number?"},
                  {"role": "assistant", "content": "Call 0800 555 0192, open 24 hours."}]},
    {"messages": [{"role": "user", "content": "Who is the COO?"},
                  {"role": "assistant", "content": "Priya Nandakumar."}]},
    {"prompt": "Largest works:", "completion": " Hollins, 96 Ml/d."},
    {"messages": [{"role": "user", "content": "Where is the control centre?"},
                  {"role": "assistant", "content": "In Calder Bridge."}]},
    {"prompt": "Oldest mains:", "completion": " 1891, Old Market Street."},
    {"messages": [{"role": "user", "content": "Hosepipe ban?"},
                  {"role": "assistant", "content": "Below 55% storage."}]},
]
FAST = dict(rank=4, alpha=8, seq_len=128, progress=False, dtype="float32", warmup_steps=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    path, _ = save_tiny(d / "model", with_tokenizer=True)
    data = d / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ev = d / "eval.jsonl"
    ev.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    return path, data, ev


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_outputs_are_complete(setup, tmp_path):
    path, data, ev = setup
    out = tmp_path / "run"
    r = finetune(model=path, data=data, out=out, eval_data=ev, max_steps=20, lr=2e-2, batch_size=3, dropout=0.0,
                 eval_every=10, **FAST)
    assert r["losses"][-1] < 0.6 * r["losses"][0], r["losses"]
    for f in ("adapter_model.safetensors", "adapter_config.json", "metrics.jsonl", "loss_curve.png",
              "training_args.json"):
        assert (out / f).exists(), f
    recs = records(out)
    steps = [x for x in recs if "loss" in x]
    assert [x["step"] for x in steps] == list(range(1, 21))
    assert all(x["tokens_per_s"] > 0 and x["lr"] > 0 for x in steps)
    evals = [x for x in recs if "eval_loss" in x]
    assert [x["step"] for x in evals] == [10, 20]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert math.isclose(evals[-1]["eval_ppl"], math.exp(evals[-1]["eval_loss"]), rel_tol=1e-9)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(path)


def test_resume_replays_the_same_losses(setup, tmp_path, monkeypatch):
    path, data, _ = setup
    kw = dict(max_steps=6, lr=5e-3, batch_size=2, grad_accum=2, dropout=0.1, save_every=3, **FAST)
    full = finetune(model=path, data=data, out=tmp_path / "full", **kw)["losses"]

    real = train.step_batches

    def crash_at_4(loader, step, grad_accum, *world):
        if step == 4:
            raise KeyboardInterrupt  # killed after checkpoint-3 and one more (lost) step
        return real(loader, step, grad_accum, *world)

    monkeypatch.setattr(train, "step_batches", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        finetune(model=path, data=data, out=tmp_path / "cut", **kw)
    monkeypatch.setattr(train, "step_batches", real)
    assert (tmp_path / "cut" / "checkpoint-3").is_dir()
    torch.manual_seed(1234)  # whatever the process did since, resume restores the RNG
    resumed = finetune(model=path, data=data, out=tmp_path / "cut", resume=True, **kw)
    assert len(resumed["losses"]) == 3 and resumed["resume_changes"] == []
    assert [x["loss"] for x in records(tmp_path / "cut")] == full  # bit-for-bit, metrics rewritten past step 3


def test_resume_applies_a_changed_weight_decay_and_step_count(setup, tmp_path, capsys):
    path, data, _ = setup
    out = tmp_path / "wd"
    kw = dict(lr=5e-3, batch_size=2, dropout=0.0, save_every=2, **FAST)
    finetune(model=path, data=data, out=out, max_steps=4, **kw)  # leaves checkpoint-2 (none at the end)
    saved = json.loads((out / "checkpoint-2" / STATE_JSON).read_text())
    assert {g["weight_decay"] for g in saved["param_groups"]} == {0.0}
    capsys.readouterr()
    r = finetune(model=path, data=data, out=out, max_steps=6, weight_decay=0.1, resume=True, **kw)
    assert r["steps"] == 6 and len(r["losses"]) == 4
    assert {g["weight_decay"] for g in r["optimizer"].param_groups} == {0.1}
    # the checkpoint written after resuming carries the new decay too
    after = json.loads((out / "checkpoint-4" / STATE_JSON).read_text())
    assert {g["weight_decay"] for g in after["param_groups"]} == {0.1}
    said = capsys.readouterr().out
    assert "--weight-decay 0.0 -> 0.1" in said and "--max-steps 4 -> 6" in said
    assert json.loads((out / "training_args.json").read_text())["weight_decay"] == 0.1


def test_resume_with_a_changed_rank_is_refused_naming_it(setup, tmp_path):
    path, data, _ = setup
    out = tmp_path / "rank"
    kw = dict(max_steps=3, lr=5e-3, batch_size=2, dropout=0.0, save_every=2, **FAST)
    finetune(model=path, data=data, out=out, **kw)
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(TrainConfigError, match="--rank was 4, now 8") as e:
        finetune(model=path, data=data, out=out, resume=True, **{**kw, "rank": 8, "seed": 3})
    assert e.value.fields == ("rank", "seed") and "--seed was 0, now 3" in str(e.value)
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_resume_reads_a_checkpoint_written_by_the_earlier_format(setup, tmp_path):
    """Checkpoints of earlier versions hold a subset of the options, warmup resolved and a derived total_steps."""
    path, data, _ = setup
    out = tmp_path / "legacy"
    kw = dict(max_steps=4, lr=5e-3, batch_size=2, dropout=0.0, save_every=2, **FAST)
    full = finetune(model=path, data=data, out=tmp_path / "full", **kw)["losses"]
    finetune(model=path, data=data, out=out, **kw)
    sj = out / "checkpoint-2" / STATE_JSON
    state = json.loads(sj.read_text())
    c = state["config"]
    state["config"] = dict(model=c["model"], method="lora", data=c["data"], lr=c["lr"], rank=c["rank"],
                           alpha=c["alpha"], dropout=c["dropout"], targets=c["targets"], seq_len=c["seq_len"],
                           batch_size=2, grad_accum=1, seed=0, pack=False, schedule="cosine", warmup_steps=1,
                           total_steps=4, use_rslora=False, max_grad_norm=1.0, weight_decay=0.0, epochs=1,
                           eval_data=None)
    sj.write_text(json.dumps(state))
    r = finetune(model=path, data=data, out=out, resume=True, **kw)
    assert r["resume_changes"] == [] and [x["loss"] for x in records(out)] == full
    state["config"]["alpha"] = 16.0
    sj.write_text(json.dumps(state))
    with pytest.raises(TrainConfigError, match="--alpha was 16.0, now 8"):
        finetune(model=path, data=data, out=out, resume=True, **kw)


def test_grad_accumulation_equals_a_bigger_batch(setup, tmp_path):
    path, data, _ = setup
    common = dict(max_steps=3, lr=5e-3, dropout=0.0, **FAST)  # each step sees all 6 rows in both runs
    big = finetune(model=path, data=data, out=tmp_path / "big", batch_size=6, grad_accum=1, **common)
    acc = finetune(model=path, data=data, out=tmp_path / "acc", batch_size=3, grad_accum=2, **common)
    torch.testing.assert_close(torch.tensor(acc["losses"]), torch.tensor(big["losses"]), rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(big["model"].named_parameters(), acc["model"].named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


def test_qlora_trains_on_nf4_base(setup, tmp_path):
    path, data, _ = setup
    r = finetune(model=path, data=data, out=tmp_path / "q", method="qlora", max_steps=12, lr=1e-2, batch_size=3,
                 dropout=0.0, **FAST)
    assert any(hasattr(m, "qweight") for m in r["model"].modules())
    assert r["losses"][-1] < 0.7 * r["losses"][0], r["losses"]
    assert json.loads((tmp_path / "q" / "training_args.json").read_text())["method"] == "qlora"


def test_cli_with_packing_and_targets(setup, tmp_path, capsys):
    path, data, ev = setup
    out = tmp_path / "cli"
    rc = cli_main(["finetune", "--model", str(path), "--data", str(data), "--eval", str(ev), "--out", str(out),
                   "--max-steps", "2", "--batch-size", "2", "--rank", "4", "--alpha", "4",
                   "--targets", "qkv_proj,o_proj", "--pack", "--seq-len", "256", "--dtype", "float32"])
    assert rc == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["o_proj", "qkv_proj"] and cfg["r"] == 4 and cfg["lora_alpha"] == 4
    assert [x["step"] for x in records(out) if "eval_loss" in x] == [2]


def test_schedule():
    assert lr_at(0, 1.0, 10, 2, "cosine") == 0.5 and lr_at(1, 1.0, 10, 2, "cosine") == 1.0
    assert lr_at(2, 1.0, 10, 2, "cosine") == 1.0
    assert math.isclose(lr_at(6, 1.0, 10, 2, "cosine"), 0.5) and math.isclose(lr_at(6, 1.0, 10, 2, "linear"), 0.5)
    assert all(lr_at(s, 1.0, 10, 2, "cosine") > lr_at(s + 1, 1.0, 10, 2, "cosine") for s in range(2, 9))
