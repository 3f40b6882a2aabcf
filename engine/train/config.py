"""TrainConfig: every option of a LoRA / QLoRA training run, in one place.

The CLI flags (phiforge/commands/finetune.py), the Python API (`finetune(TrainConfig(...))`), `training_args.json`
and the resume check are all generated from the fields below, so an option exists once. Each field's help text
lives in its metadata; `flag` overrides the flag name derived from the field name, `choices` limits a string.

Resume rule, written once: a field in RESUMABLE may differ from the checkpoint's run and the new value is applied
from the resumed step on (the loop reads it every step, or it only shapes what is logged and saved); every other
field fixes the adapter's shape, the base it sits on or the order of the data, so a difference is refused, naming
the flag. `out`, `resume` and `overwrite` are the resume itself and are not compared; neither is `nproc`, a launcher option:
what must match is the world size (every rank's share of the data and its RNG stream depend on it), and that is
checked against the checkpoint's recorded world size, however the ranks were started (--nproc or torchrun).

JSON: `to_json()` writes every field; `from_json()` also reads the training_args.json that earlier versions wrote
(a subset of the fields, `warmup_steps` resolved to a number and a derived `total_steps`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from phiforge.engine.model.phi3 import LINEAR_NAMES

METHODS = ("lora", "qlora")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")

# Fields that may change on resume, and why that is safe: the schedule and the loop's limits are pure functions of
# the step; lr and max_grad_norm are read every step; weight_decay is written into the optimizer's param groups
# after they are restored; eval and output options only shape what is logged and saved; dtype/device/threads and
# checkpointing change how the same math runs; skip_bad either raises (bad rows present) or changes nothing.
RESUMABLE = frozenset({
    "eval_data", "skip_bad",
    "lr", "weight_decay", "max_grad_norm",
    "max_steps", "epochs", "schedule", "warmup_steps", "warmup_ratio",
    "save_every", "save_minutes", "eval_every", "dtype", "device", "threads", "gradient_checkpointing", "progress",
})
NOT_COMPARED = frozenset({"out", "resume", "overwrite", "nproc"})
# keys earlier versions wrote that are derived, not options
_LEGACY_DERIVED = frozenset({"total_steps"})


class TrainConfigError(ValueError):
    """A bad or conflicting training option; `fields` names the TrainConfig fields, the message their flags."""

    def __init__(self, message: str, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.fields = fields


def _opt(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    # ---- model and data (fixed on resume, except eval_data and skip_bad) ----
    data: str = field(metadata={"help": "training JSONL ({messages} or {prompt, completion} rows)"})
    out: str = field(metadata={"help": "output directory (adapter, metrics, checkpoints)"})
    model: str | None = _opt(None, "base model directory", shown="the bundled default model")
    method: str = _opt("lora", "lora: bf16/fp32 base; qlora: NF4 base", choices=METHODS)
    eval_data: str | None = _opt(None, "held-out JSONL for eval loss / perplexity", flag="--eval",
                                  shown="none")
    seq_len: int = _opt(512, "tokens per row; longer samples are truncated")
    pack: bool = _opt(False, "pack samples into seq-len rows (block-causal mask)")
    skip_bad: bool = _opt(False, "skip (and count) malformed JSONL lines")
    # ---- RAFT (fixed on resume): the CLI builds the rows (retrieval/raft.py); the loop only reads `data` ----
    raft: bool = _opt(False, "train on RAFT rows made from a Q/A --data file: each question asked with --raft-k "
                             "chunks retrieved from --index, its gold chunk among them with probability --raft-p, "
                             "the answer quoting and citing it")
    index: str | None = _opt(None, "with --raft: the document index the contexts are retrieved from",
                             shown="none")
    raft_p: float = _opt(0.8, "with --raft: probability that a question's gold chunk is in its context, in [0, 1]")
    raft_k: int = _opt(4, "with --raft: chunks in a question's context")
    # ---- LoRA (fixed on resume) ----
    rank: int = _opt(16, "LoRA rank r")
    alpha: float = _opt(32.0, "LoRA alpha; the update is scaled by alpha/r")
    dropout: float = _opt(0.05, "dropout on the LoRA input, in [0, 1)")
    targets: tuple[str, ...] = _opt(LINEAR_NAMES, "comma-separated projections to adapt, of " + ",".join(LINEAR_NAMES))
    use_rslora: bool = _opt(False, "scale by alpha/sqrt(r) instead of alpha/r", flag="--rslora")
    # ---- optimisation (batch_size, grad_accum, seed fixed on resume) ----
    lr: float = _opt(2e-4, "peak learning rate (AdamW)")
    weight_decay: float = _opt(0.0, "AdamW decoupled weight decay")
    max_grad_norm: float = _opt(1.0, "clip the global gradient norm to this")
    batch_size: int = _opt(4, "rows per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    seed: int = _opt(0, "seed of the data order, LoRA init and dropout")
    # ---- schedule (resumable) ----
    max_steps: int | None = _opt(None, "optimizer steps", shown="epochs x steps per epoch")
    epochs: int = _opt(1, "passes over the data when --max-steps is not given")
    schedule: str = _opt("cosine", "learning-rate decay after warmup", choices=SCHEDULES)
    warmup_steps: int | None = _opt(None, "linear warmup steps", shown="ceil(warmup-ratio x steps)")
    warmup_ratio: float = _opt(0.03, "warmup as a fraction of the steps when --warmup-steps is not given")
    # ---- runtime and output (resumable) ----
    save_every: int | None = _opt(None, "checkpoint every N optimizer steps", shown="never")
    save_minutes: float = _opt(10.0, "also checkpoint once this many minutes of training passed since the last "
                                     "checkpoint, so a killed run loses at most that much (0: off); Ctrl-C or "
                                     "SIGTERM always checkpoints before stopping")
    eval_every: int | None = _opt(None, "evaluate every N optimizer steps", shown="at the end only")
    resume: bool = _opt(False, "continue from the newest OUT/checkpoint-*")
    overwrite: bool = _opt(False, "start over in an --out that holds an earlier run (deletes its adapter, "
                                  "checkpoints and metrics)")
    dtype: str | None = _opt(None, "base weight / compute dtype (LoRA weights are always fp32)", choices=DTYPES,
                             shown="bfloat16")
    device: str | None = _opt(None, "torch device", shown="cuda if available, else cpu")
    threads: int | None = _opt(None, "torch CPU threads (1 is faster on an oversubscribed machine)",
                               shown="torch's choice")
    nproc: int = _opt(1, "data-parallel processes on this machine, launched through torch.distributed.run; each "
                         "takes batch-size rows of every nproc x batch-size micro-batch (threads is per process)")
    gradient_checkpointing: bool = _opt(True, "recompute each decoder layer in backward instead of keeping its "
                                              "activations")
    progress: bool = _opt(True, "show a progress bar")

    def __post_init__(self) -> None:
        for name in ("data", "out", "model", "eval_data", "index"):
            v = getattr(self, name)
            if isinstance(v, os.PathLike):
                setattr(self, name, str(v))
        if isinstance(self.dtype, torch.dtype):
            self.dtype = str(self.dtype).removeprefix("torch.")
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise TrainConfigError(f"{flag(name)}: {why}", (name,))

        if not self.out:
            bad("out", "an output directory is required")
        if not Path(self.data).is_file():
            bad("data", f"no such file: {self.data}")
        if self.eval_data is not None and not Path(self.eval_data).is_file():
            bad("eval_data", f"no such file: {self.eval_data}")
        for name in ("method", "schedule", "dtype"):
            choices = _FIELDS[name].metadata["choices"]
            v = getattr(self, name)
            if v is not None and v not in choices:
                bad(name, f"must be one of {', '.join(choices)}, got {v!r}")
        unknown = [t for t in self.targets if t not in LINEAR_NAMES]
        if unknown or not self.targets:
            bad("targets", f"must be a non-empty subset of {','.join(LINEAR_NAMES)}, got {','.join(self.targets)!r}")
        if self.raft and self.index is None:
            bad("raft", "needs --index DIR, the index the contexts are retrieved from")
        if self.index is not None and not Path(self.index).is_dir():
            bad("index", f"no such index directory: {self.index}")
        if not 0 <= self.raft_p <= 1:
            bad("raft_p", f"must be in [0, 1], got {self.raft_p}")
        for name in ("seq_len", "rank", "batch_size", "grad_accum", "epochs", "nproc", "raft_k"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "save_every", "eval_every", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, f"must be >= 1 when given, got {getattr(self, name)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            bad("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        for name in ("lr", "alpha", "max_grad_norm"):
            if not getattr(self, name) > 0:
                bad(name, f"must be > 0, got {getattr(self, name)}")
        if not self.weight_decay >= 0:
            bad("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not self.save_minutes >= 0:
            bad("save_minutes", f"must be >= 0 (0 turns it off), got {self.save_minutes}")
        if self.resume and self.overwrite:
            bad("overwrite", "--resume continues the run in --out, --overwrite deletes it: give one of them")
        if not 0 <= self.dropout < 1:
            bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if not 0 <= self.warmup_ratio <= 1:
            bad("warmup_ratio", f"must be in [0, 1], got {self.warmup_ratio}")

    # ---- derived ----
    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run: --max-steps, or epochs x ceil(batches per epoch / grad_accum)."""
        if self.max_steps is not None:
            return self.max_steps
        return self.epochs * -(-batches_per_epoch // self.grad_accum)

    def warmup(self, total: int) -> int:
        return self.warmup_steps if self.warmup_steps is not None else math.ceil(self.warmup_ratio * total)

    # ---- JSON ----
    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], **overrides: Any) -> TrainConfig:
        """Inverse of to_json. Earlier versions' training_args.json lack `out` (and newer options): pass
        `out=...`; missing options take their defaults."""
        return cls(**{**json_fields(d), **overrides})


def json_fields(d: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig fields a training_args.json / checkpoint config holds, in today's form. Earlier versions
    stored warmup_steps resolved (not the option given) and no warmup_ratio: that value is dropped, not guessed."""
    d = {k: v for k, v in d.items() if k not in _LEGACY_DERIVED}
    if "warmup_ratio" not in d:
        d.pop("warmup_steps", None)
    unknown = sorted(set(d) - set(_FIELDS))
    if unknown:
        raise TrainConfigError(f"unknown training option(s) {', '.join(unknown)}")
    if "targets" in d:
        d["targets"] = tuple(d["targets"])
    return d


def flag(name: str) -> str:
    """The CLI flag of field `name` (what error messages name)."""
    f = _FIELDS[name]
    if "flag" in f.metadata:
        return f.metadata["flag"]
    dashed = name.replace("_", "-")
    return f"--no-{dashed}" if f.default is True else f"--{dashed}"


def resume_changes(saved: dict[str, Any], config: TrainConfig, where: str) -> list[str]:
    """Compare a checkpoint's config (JSON) with this run's. Returns one line per changed resumable field (to be
    applied); raises TrainConfigError naming every changed field that must match. Fields the checkpoint does not
    record (earlier versions) are not compared."""
    old = json_fields(saved)
    changed = [f.name for f in fields(config)
               if f.name in old and f.name not in NOT_COMPARED and old[f.name] != getattr(config, f.name)]
    refused = [n for n in changed if n not in RESUMABLE]
    if refused:
        what = "; ".join(f"{flag(n)} was {old[n]!r}, now {getattr(config, n)!r}" for n in refused)
        raise TrainConfigError(f"{where}: cannot resume: {what} (these must match the checkpoint's run; start a new "
                               "--out to change them)", tuple(refused))
    return [f"{flag(n)} {old[n]!r} -> {getattr(config, n)!r}" for n in changed]


_FIELDS = {f.name: f for f in fields(TrainConfig)}
