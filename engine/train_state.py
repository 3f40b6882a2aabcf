"""Training checkpoints that resume bit-for-bit, in safetensors + JSON only (nothing is ever unpickled).

    OUT/checkpoint-<step>/
        adapter_model.safetensors, adapter_config.json    the adapter so far (a usable PEFT adapter on its own)
        trainer_state.safetensors                        AdamW moments + step per parameter, torch RNG states
        trainer_state.json                               step, data position, schedule, run config (for checks)

A resumed run must replay exactly what the uninterrupted run would have done, so everything that feeds the next
step is saved: the LoRA weights (fp32, exact), AdamW's exp_avg / exp_avg_sq / step, the learning-rate schedule
(a pure function of the step, so its state is the step), the torch CPU/CUDA RNG (dropout masks), and the data
position (the micro-batch index; the loader's order is a pure function of seed and epoch).

A checkpoint is written into a temp dir and renamed into place, so a crash never leaves half of one; resume takes
the newest complete `checkpoint-*`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .adapter import PREFIX, save_adapter
from .atomic import atomic_dir

STATE_JSON, STATE_ST = "trainer_state.json", "trainer_state.safetensors"


def save_checkpoint(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter],
                    step: int, micro: int, config: dict, keep: int = 2) -> Path:
    """Write OUT/checkpoint-<step> whole or not at all; keep the newest `keep` checkpoints. `config` is the run's
    TrainConfig as JSON (resume compares it with the resuming run's)."""
    final = out / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        save_adapter(model, tmp, config.get("model"))
        tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        index = {id(p): n for n, p in params.items()}
        for p, st in optimizer.state.items():
            name = index[id(p)]
            for k, v in st.items():
                tensors[f"optim.{name}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
        save_file(tensors, str(tmp / STATE_ST), metadata={"format": "pt"})
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        state = {"step": step, "micro": micro, "param_groups": groups, "config": config}
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
    """trainer_state.json of a checkpoint: step, micro, param_groups, config (the run's options as JSON)."""
    sj = ckpt / STATE_JSON
    try:
        return json.loads(sj.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{sj}: not valid JSON ({e})") from None


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    params: dict[str, nn.Parameter]) -> dict:
    """Restore LoRA weights, optimizer (param groups as saved) and RNG in place; returns the JSON state. Whether
    the resuming run's options may differ is the caller's check (engine/train_config.py: resume_changes)."""
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
        torch.set_rng_state(f.get_tensor("rng.cpu"))
        if torch.cuda.is_available():
            cuda = sorted(k for k in f.keys() if k.startswith("rng.cuda."))
            if cuda:
                torch.cuda.set_rng_state_all([f.get_tensor(k) for k in cuda])
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
