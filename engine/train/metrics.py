"""A run's metrics.jsonl (one JSON record per optimizer step, plus eval records) and its loss curve, loss_curve.png;
on resume the records written after the last checkpoint are dropped, since the resumed run writes them again."""
from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from phiforge.engine.atomic import write_atomic, write_text_atomic


def plot_losses(metrics_path: Path, png: Path) -> None:
    recs = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    fig = Figure(figsize=(6, 3.5))  # the object API: no pyplot state, no global backend switch
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    write_atomic(png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def rewrite_metrics(path: Path, upto_step: int) -> None:
    """On resume, drop records the interrupted run wrote after its last checkpoint (they will be redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= upto_step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))
