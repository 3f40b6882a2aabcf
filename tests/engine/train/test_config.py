"""TrainConfig: every field survives argparse and JSON, --help shows each with its default, bad values name their
flag, and the resume rule applies resumable fields and refuses the rest."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from phiforge.commands.finetune import add_arguments, argv_for, config_from_args
from phiforge.engine.train.config import (NOT_COMPARED, RESUMABLE, TrainConfig, TrainConfigError, flag,
                                          resume_changes)


@pytest.fixture
def files(tmp_path):
    data, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    data.write_text("{}\n")
    ev.write_text("{}\n")
    return str(data), str(ev), str(tmp_path / "out")


def parser(width: int | None = None) -> argparse.ArgumentParser:
    wide = {} if width is None else dict(formatter_class=lambda prog: argparse.HelpFormatter(prog, width=width,
                                                                                             max_help_position=80))
    p = argparse.ArgumentParser(prog="phiforge finetune", **wide)
    add_arguments(p)
    return p


def off_default(files) -> TrainConfig:
    """A config in which every field differs from its default."""
    data, ev, out = files
    return TrainConfig(data=data, out=out, model="/models/phi3", method="qlora", eval_data=ev, seq_len=256,
                       pack=True, skip_bad=True, rank=8, alpha=12.5, dropout=0.1, targets=("qkv_proj", "down_proj"),
                       use_rslora=True, lr=3e-3, weight_decay=0.01, max_grad_norm=0.5, batch_size=2, grad_accum=3,
                       seed=7, max_steps=40, epochs=2, schedule="linear", warmup_steps=5, warmup_ratio=0.1,
                       save_every=10, save_minutes=2.5, eval_every=5, resume=True, dtype="float32", device="cpu", threads=1, nproc=2,
                       gradient_checkpointing=False, progress=False, raft=True, index=str(Path(out).parent),
                       raft_p=0.5, raft_k=3)


def test_every_field_round_trips_through_argparse_and_json(files):
    c = off_default(files)
    defaults = TrainConfig(data=c.data, out=c.out)
    same = [f.name for f in dataclasses.fields(c) if f.name not in ("data", "out")
            and getattr(c, f.name) == getattr(defaults, f.name)]
    assert same == ["overwrite"]  # so the round trips below cover every field (overwrite excludes resume: below)
    fresh = dataclasses.replace(c, resume=False, overwrite=True)
    for cfg in (c, fresh):
        assert config_from_args(parser().parse_args(argv_for(cfg))) == cfg
        assert TrainConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert config_from_args(parser().parse_args(["--data", c.data, "--out", c.out])) == defaults


def test_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit):
        parser(width=1000).parse_args(["--help"])  # wide: one line per option
    options = capsys.readouterr().out.split("options:", 1)[1].splitlines()
    for f in dataclasses.fields(TrainConfig):
        [line] = [ln for ln in options if ln.strip().split(" ", 1)[0] == flag(f.name)]
        assert ("(required)" if f.default is dataclasses.MISSING else "(default: ") in line, line
    text = "\n".join(options)
    assert "(default: 0.0002)" in text and "(default: qkv_proj,o_proj,gate_up_proj,down_proj)" in text


@pytest.mark.parametrize("field,value,message", [
    ("lr", 0.0, "--lr: must be > 0"),
    ("rank", 0, "--rank: must be >= 1"),
    ("dropout", 1.0, "--dropout: must be in [0, 1)"),
    ("targets", "qkv_proj,k_proj", "--targets: must be a non-empty subset"),
    ("method", "full", "--method: must be one of lora, qlora"),
    ("save_every", 0, "--save-every: must be >= 1 when given"),
    ("warmup_ratio", 1.5, "--warmup-ratio: must be in [0, 1]"),
    ("data", "missing.jsonl", "--data: no such file: missing.jsonl"),
    ("eval_data", "missing.jsonl", "--eval: no such file"),
    ("raft", True, "--raft: needs --index DIR"),
    ("index", "missing-index", "--index: no such index directory: missing-index"),
    ("raft_p", 1.5, "--raft-p: must be in [0, 1], got 1.5"),
    ("raft_k", 0, "--raft-k: must be >= 1"),
])
def test_bad_values_raise_naming_the_flag(files, field, value, message):
    data, _, out = files
    with pytest.raises(TrainConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) \
            as e:
        TrainConfig(**{"data": data, "out": out, field: value})
    assert e.value.fields == (field,)


def test_targets_and_paths_normalise(files, tmp_path):
    data, _, out = files
    c = TrainConfig(data=tmp_path / "train.jsonl", out=tmp_path / "out", targets="o_proj, qkv_proj")
    assert c.data == data and c.out == out and c.targets == ("o_proj", "qkv_proj")


def test_derived_steps_and_warmup(files):
    data, _, out = files
    c = TrainConfig(data=data, out=out, epochs=3, grad_accum=2)
    assert c.total_steps(5) == 9 and c.warmup(9) == 1  # ceil(5/2) per epoch; ceil(0.03 * 9)
    assert TrainConfig(data=data, out=out, max_steps=4, warmup_steps=0).total_steps(100) == 4


def test_resume_rule_covers_every_field(files):
    base = TrainConfig(data=files[0], out=files[2])
    changed = off_default(files)
    assert RESUMABLE | NOT_COMPARED <= {f.name for f in dataclasses.fields(TrainConfig)}
    # the decisions the training loop relies on: these shape the adapter, its base or the data order ...
    assert not RESUMABLE & {"model", "data", "method", "seq_len", "pack", "rank", "alpha", "dropout", "targets",
                            "use_rslora", "batch_size", "grad_accum", "seed"}
    # ... and these are re-read or re-applied after the checkpoint is restored
    assert {"lr", "weight_decay", "max_grad_norm", "max_steps", "epochs", "schedule", "eval_data"} <= RESUMABLE
    for f in dataclasses.fields(TrainConfig):
        start = dataclasses.replace(base, index=changed.index) if f.name == "raft" else base  # --raft needs --index
        new = dataclasses.replace(start, **{f.name: getattr(changed, f.name)})
        if f.name in NOT_COMPARED or f.name == "data" and new.data == start.data:
            assert resume_changes(start.to_json(), new, "ckpt") == []
        elif f.name in RESUMABLE:
            assert resume_changes(start.to_json(), new, "ckpt") == [
                f"{flag(f.name)} {getattr(start, f.name)!r} -> {getattr(new, f.name)!r}"]
        else:
            with pytest.raises(TrainConfigError, match=f"ckpt: cannot resume: {flag(f.name)} was") as e:
                resume_changes(start.to_json(), new, "ckpt")
            assert e.value.fields == (f.name,)


def test_json_of_the_earlier_format_reads(files):
    data, _, out = files
    legacy = dict(model="/m", method="lora", data=data, lr=2e-4, rank=16, alpha=32, dropout=0.05,
                  targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], seq_len=512, batch_size=4,
                  grad_accum=1, seed=0, pack=False, schedule="cosine", warmup_steps=3, total_steps=100,
                  use_rslora=False, max_grad_norm=1.0, weight_decay=0.0, epochs=1, eval_data=None)
    c = TrainConfig.from_json(legacy, out=out)
    assert c == TrainConfig(data=data, out=out, model="/m")  # the resolved warmup is not taken for the option
    with pytest.raises(TrainConfigError, match="unknown training option"):
        TrainConfig.from_json({**legacy, "learning_rate": 1.0}, out=out)
