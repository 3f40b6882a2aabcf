"""Data-parallel fine-tuning on CPU with gloo, two real processes launched by `phiforge finetune --nproc 2`
(torch.distributed.run), against the one-process run at the same global batch: per-step losses, eval loss and the
final adapter agree to 1e-5 (LoRA packed, QLoRA with a rank left without rows; both with gradient accumulation).
A rank killed mid-run fails the job with a clear error and --resume reaches the uninterrupted run's losses. Every
two-process run here has its non-zero rank refused any write under OUT (an audit hook), so only rank 0 writes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phiforge.commands.finetune import argv_for
from phiforge.engine.train.config import TrainConfig, TrainConfigError
from phiforge.engine.train.distributed import World
from phiforge.engine.train.loop import finetune, setup
from tiny_phi3 import save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).resolve().parents[3] / "data"
FAST = dict(rank=4, alpha=8, seq_len=128, dtype="float32", warmup_steps=1, lr=5e-3, threads=1, progress=False)
TOL = 1e-5

# Imported by every Python process started with PYTHONPATH=<this dir>: a process that is a rank other than 0 gets
# PermissionError on any write, rename, mkdir or removal under the guarded folder.
GUARD = '''
import os, sys
if os.environ.get("RANK", "0") != "0" and os.environ.get("GUARD_DIR"):
    root = os.path.realpath(os.environ["GUARD_DIR"])
    def check(path):
        if isinstance(path, (str, bytes, os.PathLike)) and not isinstance(path, int):
            p = os.path.realpath(os.fsdecode(path))
            if p == root or p.startswith(root + os.sep):
                raise PermissionError(f"rank {os.environ['RANK']} writes {p}")
    WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def hook(event, args):
        if event == "open" and ((isinstance(args[1], str) and set(args[1]) & set("wax+"))
                                or (isinstance(args[2], int) and args[2] > 0 and args[2] & WRITES)):
            check(args[0])
        elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "os.truncate", "os.chmod",
                       "shutil.rmtree", "os.symlink", "os.link"):
            check(args[0])
            if event in ("os.rename", "os.symlink", "os.link"):
                check(args[1])
    sys.addaudithook(hook)
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    path, _ = save_tiny(d / "model", with_tokenizer=True)
    seven = d / "seven.jsonl"  # 7 rows: at global batch 6 the second batch is one row, so rank 1 gets none
    seven.write_text("".join((DATA / "train.jsonl").read_text().splitlines(keepends=True)[:7]))
    (d / "site").mkdir()
    (d / "site" / "sitecustomize.py").write_text(GUARD)
    return dict(model=path, seven=seven, site=d / "site")


def cli(env, popen: bool = False, **options):
    """`phiforge finetune` with these TrainConfig options in a fresh process, its non-zero ranks barred from writing
    under OUT."""
    config = TrainConfig(model=str(env["model"]), **options)
    out = Path(config.out)
    cmd = [sys.executable, "-m", "phiforge.cli", "finetune", *argv_for(config)]
    e = dict(os.environ, PYTHONPATH=str(env["site"]), GUARD_DIR=str(out), OMP_NUM_THREADS="1")
    if popen:
        return subprocess.Popen(cmd, env=e, cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=e, cwd=out.parent, capture_output=True, text=True, timeout=240)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_guard_stops_a_nonzero_rank_from_writing(env, tmp_path):
    e = dict(os.environ, PYTHONPATH=str(env["site"]), GUARD_DIR=str(tmp_path))
    code = f"open({str(tmp_path / 'x')!r}, 'w')"
    assert subprocess.run([sys.executable, "-c", code], env={**e, "RANK": "1"}, capture_output=True).returncode != 0
    assert subprocess.run([sys.executable, "-c", code], env={**e, "RANK": "0"}).returncode == 0


@pytest.mark.parametrize("case", [
    dict(method="lora", data=DATA / "train.jsonl", pack=True, batch_size=2, grad_accum=2, max_steps=4),
    dict(method="qlora", data="seven", pack=False, batch_size=3, grad_accum=2, max_steps=3),
], ids=["lora-packed-accum", "qlora-accum-empty-share"])
def test_two_processes_equal_one_at_the_same_global_batch(env, tmp_path, case):
    data = env["seven"] if case["data"] == "seven" else case["data"]
    kw = dict(FAST, method=case["method"], data=data, eval_data=DATA / "eval.jsonl", pack=case["pack"],
              grad_accum=case["grad_accum"], max_steps=case["max_steps"], dropout=0.0)
    one = finetune(model=env["model"], out=tmp_path / "one", batch_size=2 * case["batch_size"], **kw)
    two = cli(env, out=tmp_path / "two", batch_size=case["batch_size"], nproc=2, **kw)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("finetune: done") == 1  # rank 0 alone reports

    recs = records(tmp_path / "two")
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == case["max_steps"] == len(one["losses"])  # one record per step: rank 0 alone logs
    d_loss = max(abs(a - b) for a, b in zip(losses, one["losses"]))
    d_eval = abs([r["eval_loss"] for r in recs if "eval_loss" in r][-1] - one["eval_loss"])
    a, b = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(tmp_path / "two" /
                                                                             "adapter_model.safetensors")
    assert a.keys() == b.keys()
    d_adapter = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float(a[k].abs().max()) for k in a if "lora_B" in k)
    print(json.dumps(dict(case=case["method"], max_dloss=d_loss, deval=d_eval, max_dadapter=d_adapter)))
    assert d_loss <= TOL and d_eval <= TOL and d_adapter <= TOL, (d_loss, d_eval, d_adapter)
    assert moved > 100 * TOL  # the adapter trained, so equality is not two zeros
    assert one["losses"][-1] < one["losses"][0]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def _rank_pid(root: int, rank: int) -> int | None:
    """The pid of the descendant of `root` that torchrun started as `rank`."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b"".join(environ):
            return pid
    return None


def test_a_killed_rank_fails_the_job_and_resume_reaches_the_same_losses(env, tmp_path):
    # dropout on: each rank's own RNG stream must come back from the checkpoint
    kw = dict(FAST, data=DATA / "train.jsonl", batch_size=2, dropout=0.1, max_steps=10, save_every=1, nproc=2)
    full = cli(env, out=tmp_path / "full", **kw)
    assert full.returncode == 0, full.stderr[-3000:]
    want = [r["loss"] for r in records(tmp_path / "full")]

    out = tmp_path / "cut"
    p = cli(env, popen=True, out=out, **kw)
    deadline = time.monotonic() + 180
    while not (out / "checkpoint-2").is_dir():
        assert p.poll() is None and time.monotonic() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.02)
    pid = _rank_pid(p.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert "rank 1 (killed by signal SIGKILL) failed, so the job stopped" in err, err[-3000:]
    assert "with --resume continues from it" in err
    assert not (out / "adapter_model.safetensors").exists()

    resumed = cli(env, out=out, resume=True, **kw)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["loss"] for r in records(out)] == want  # the same two ranks replay bit for bit
    a, b = load_file(tmp_path / "full" / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(TrainConfigError, match="had 2 process\\(es\\), this one has 1") as e:
        finetune(model=env["model"], out=out, resume=True, **{**FAST, "data": DATA / "train.jsonl",
                                                               "batch_size": 2, "dropout": 0.1, "max_steps": 12})
    assert e.value.fields == ("nproc",)


def test_more_processes_than_rows_is_an_error_naming_nproc(env, tmp_path):
    one_row = tmp_path / "one.jsonl"
    one_row.write_text((DATA / "train.jsonl").read_text().splitlines()[0] + "\n")
    config = TrainConfig(model=str(env["model"]), data=one_row, out=tmp_path / "o", nproc=2, **FAST)
    with pytest.raises(TrainConfigError, match="--nproc: 2 processes but the data gives only 1 rows") as e:
        setup(config, world=World(rank=0, size=2, local_size=2))  # raised before any collective
    assert e.value.fields == ("nproc",)
    with pytest.raises(TrainConfigError, match="--nproc 2: finetune\\(\\) trains in this one process"):
        finetune(config)
