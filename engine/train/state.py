"""Training checkpoints that resume bit-for-bit, in safetensors + JSON only (nothing is ever unpickled).

    OUT/checkpoint-<step>/
        adapter_model.safetensors, adapter_config.json    the adapter so far (a usable PEFT adapter on its own)
        trainer_state.safetensors                        AdamW moments + step per parameter, torch RNG states
                                                         (of every rank in a data-parallel run)
        trainer_state.json                               step, data position, schedule, world size, run config

A resumed run must replay exactly what the uninterrupted run would have done, so everything that feeds the next
step is saved: the LoRA weights (fp32, exact), AdamW's exp_avg / exp_avg_sq / step, the learning-rate schedule
(a pure function of the step, so its state is the step), the torch CPU/CUDA RNG (dropout masks), and the data
position (the micro-batch index; the loader's order is a pure function of seed and epoch). In a data-parallel run
(engine/train/distributed.py) the weights and AdamW state are the same on every rank, but each rank draws its own
dropout masks: rank r's RNG is stored as `rng.rank<r>.cpu` / `rng.rank<r>.cuda`, and the world size is recorded,
because the data split and those RNG streams only replay with the same number of ranks.

The --out folder's guards live here too: check_out refuses an --out holding an earlier run (unless --resume or
--overwrite) and --resume without a checkpoint; StopSignals turns SIGINT/SIGTERM into a request the loop honours
after its step (engine/train/loop.py checkpoints, then raises TrainingInterrupted).

A checkpoint is written into a temp dir and renamed into place, so a crash never leaves half of one; resume takes
the newest complete `checkpoint-*`.
"""
from __future__ import annotations

import json
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from phiforge.engine.atomic import atomic_dir
from phiforge.engine.formats.peft import PREFIX, save_adapter

from .config import TrainConfig, TrainConfigError

STATE_JSON, STATE_ST = "trainer_state.json", "trainer_state.safetensors"


def rank_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's generators in a data-parallel run: the CPU one and its own device's."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def save_checkpoint(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter],
                    step: int, micro: int, config: dict, keep: int = 2,
                    ranks_rng: list[dict[str, torch.Tensor]] | None = None) -> Path:
    """Write OUT/checkpoint-<step> whole or not at all; keep the newest `keep` checkpoints. `config` is the run's
    TrainConfig as JSON (resume compares it with the resuming run's). `ranks_rng`: every rank's rank_rng_state()
    in a data-parallel run (rank 0 writes them all); None saves this process's generators."""
    final = out / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        save_adapter(model, tmp, config.get("model"))
        tensors: dict[str, torch.Tensor] = {}
        if ranks_rng is None:
            tensors["rng.cpu"] = torch.get_rng_state()
            if torch.cuda.is_available():
                for i, s in enumerate(torch.cuda.get_rng_state_all()):
                    tensors[f"rng.cuda.{i}"] = s
        else:
            for r, states in enumerate(ranks_rng):
                tensors.update({f"rng.rank{r}.{k}": v for k, v in states.items()})
        index = {id(p): n for n, p in params.items()}
        for p, st in optimizer.state.items():
            name = index[id(p)]
            for k, v in st.items():
                tensors[f"optim.{name}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
        save_file(tensors, str(tmp / STATE_ST), metadata={"format": "pt"})
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        state = {"step": step, "micro": micro, "world_size": 1 if ranks_rng is None else len(ranks_rng),
                 "param_groups": groups, "config": config}
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=2) + "\n")
    for old in sorted(checkpoints(out), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(out: Path) -> list[Path]:
    return [p for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit() and (p / STATE_JSON).exists()]


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints(out)
    return max(found, key=lambda p: int(p.name.split("-")[1])) if found else None


def read_state(ckpt: Path) -> dict:
    """trainer_state.json of a checkpoint: step, micro, world_size (absent before data-parallel runs: 1),
    param_groups, config (the run's options as JSON)."""
    sj = ckpt / STATE_JSON
    try:
        return json.loads(sj.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{sj}: not valid JSON ({e})") from None


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    params: dict[str, nn.Parameter], rank: int | None = None,
                    device: torch.device | None = None) -> dict:
    """Restore LoRA weights, optimizer (param groups as saved) and RNG in place; returns the JSON state. In a
    data-parallel run pass this process's `rank` and `device`: it takes that rank's generators. Whether the
    resuming run's options (and world size) may differ is the caller's check (engine/train/loop.py)."""
    state = read_state(ckpt)
    # LoRA weights: parameter "model.layers.0.self_attn.qkv_proj.lora_A.weight" <- key PREFIX + the same name
    with safe_open(str(ckpt / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        with torch.no_grad():
            for name, p in params.items():
                key = PREFIX + name
                if key not in keys:
                    raise ValueError(f"{ckpt / 'adapter_model.safetensors'}: tensor {key!r} is missing")
                p.copy_(f.get_tensor(key))
    opt_state: dict[int, dict] = {}
    order = list(params)
    with safe_open(str(ckpt / STATE_ST), framework="pt") as f:
        if rank is None:
            torch.set_rng_state(f.get_tensor("rng.cpu"))
            cuda = sorted(k for k in f.keys() if k.startswith("rng.cuda."))
            if cuda and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([f.get_tensor(k) for k in cuda])
        else:
            torch.set_rng_state(f.get_tensor(f"rng.rank{rank}.cpu"))
            if device is not None and device.type == "cuda":
                torch.cuda.set_rng_state(f.get_tensor(f"rng.rank{rank}.cuda"), device)
        for key in f.keys():
            if key.startswith("optim."):
                name, field = key[len("optim."):].rsplit(".", 1)
                if name not in params:
                    raise ValueError(f"{ckpt / STATE_ST}: optimizer state for unknown parameter {name!r}")
                opt_state.setdefault(order.index(name), {})[field] = f.get_tensor(key).to(params[name].device)
    groups = [dict(g, params=[order.index(n) for n in params]) for g in state["param_groups"]]
    for g in groups:
        g["betas"] = tuple(g["betas"])
    for st in opt_state.values():  # AdamW keeps `step` as a CPU float tensor unless fused/capturable
        st["step"] = st["step"].cpu()
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    return state


# ---- the --out folder's guards and the stop request ----------------------------------------------------------------

# what a run writes into --out besides checkpoint-*/ (what --overwrite deletes, and a failed run's cleanup)
RUN_FILES = ("adapter_model.safetensors", "adapter_config.json", "training_args.json", "metrics.jsonl",
             "loss_curve.png")


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the run after a checkpoint; the message says where it is and how to resume."""


class StopSignals:
    """While active, SIGINT/SIGTERM set `requested` (the loop stops after its step); a second signal raises
    KeyboardInterrupt at once, unless `second_stops` is False (under torchrun the terminal's Ctrl-C and the agent's
    forward of it arrive as two signals; the agent's SIGKILL after its grace period is the hard stop there). Only
    the main thread can install handlers: elsewhere this does nothing."""

    def __init__(self, second_stops: bool = True) -> None:
        self.requested: str | None = None
        self.second_stops = second_stops
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            if not self.second_stops:
                return
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped without a checkpoint")
        self.requested = signal.Signals(signum).name
        print(f"\nfinetune: {self.requested}: finishing this step, then writing a checkpoint"
              + (" (again to stop now)" if self.second_stops else ""),
              flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def check_out(config: TrainConfig) -> None:
    """Refuse, before any work, an --out that holds an earlier run (unless --resume / --overwrite) and --resume
    without a checkpoint. Read-only: every rank (and the --nproc launcher) may call it."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise TrainConfigError(f"--out {out}: exists and is not a directory", ("out",))
    if config.resume:
        if latest_checkpoint(out) is None:
            raise TrainConfigError(
                f"--resume: {out} has no checkpoint-* to resume from. Checkpoints are written every --save-every "
                "steps, every --save-minutes, and when a run is stopped with Ctrl-C or SIGTERM; without one, drop "
                "--resume" + (" and add --overwrite to start over" if holds_run(out) else " to start a new run"),
                ("resume",))
        return
    if holds_run(out) and not config.overwrite:
        raise TrainConfigError(f"--out {out}: holds an earlier run (adapter or checkpoints); --resume continues it, "
                               "--overwrite deletes it and starts over, or choose another --out", ("out",))


def holds_run(out: Path) -> bool:
    """An adapter or a checkpoint: what a new run must not silently replace."""
    return (out / "adapter_model.safetensors").exists() or bool(checkpoints(out))


def clear_run(out: Path) -> None:
    """--overwrite: delete what an earlier run wrote (only phiforge's own files, never the user's)."""
    for ckpt in out.glob("checkpoint-*"):
        if ckpt.is_dir() and ckpt.name.split("-")[1].isdigit():
            shutil.rmtree(ckpt)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
