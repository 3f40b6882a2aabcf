"""`phiforge finetune`: the argparse layer over engine/train.py, one flag per TrainConfig field.

Flags, types, choices, help and defaults are read off the dataclass (engine/train_config.py), so a new option is
one new field. A bool field that defaults to False is a `--name` switch; one that defaults to True is `--no-name`.
`targets` is comma-separated on the command line.

Ctrl-C (or SIGTERM) finishes the current step, writes a checkpoint and the adapter so far, and exits 130; the
same command with --resume continues. `--nproc N` (outside torchrun) re-runs this same command as N ranks through torch.distributed.run; each rank then
finds torchrun's environment and trains its share (engine/distributed.py). On several machines, start
`torchrun ... -m phiforge.cli finetune ...` on each yourself.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing.api import SignalException

from phiforge.engine.distributed import launch, under_torchrun
from phiforge.engine.train import finetune
from phiforge.engine.train_config import TrainConfig, flag
from phiforge.engine.train_state import check_out, latest_checkpoint

_HINTS = typing.get_type_hints(TrainConfig)


def _base_type(name: str) -> type:
    """int for `int | None`, str for `tuple[str, ...]` (parsed by TrainConfig), the type itself otherwise."""
    hint = _HINTS[name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return str if typing.get_origin(hint) is tuple else hint


def _shown(f: dataclasses.Field) -> str:
    if "shown" in f.metadata:
        return f.metadata["shown"]
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    if isinstance(f.default, tuple):
        return ",".join(f.default)
    return str(f.default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        required = f.default is dataclasses.MISSING
        help_text = f.metadata["help"] + (" (required)" if required else f" (default: {_shown(f)})")
        if f.default is True:
            help_text += "; this flag turns it off"
        kw: dict[str, Any] = dict(dest=f.name, help=help_text.replace("%", "%%"))
        if _base_type(f.name) is bool:
            kw.update(action="store_false" if f.default else "store_true")
        else:
            kw.update(type=_base_type(f.name), choices=f.metadata.get("choices"))
            kw.update(required=True) if required else kw.update(default=f.default)
        parser.add_argument(flag(f.name), **kw)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def argv_for(config: TrainConfig) -> list[str]:
    """The `phiforge finetune` arguments that give `config` (required fields and every non-default one)."""
    argv: list[str] = []
    for f in dataclasses.fields(TrainConfig):
        v = getattr(config, f.name)
        if f.default is not dataclasses.MISSING and v == f.default:
            continue
        if isinstance(v, bool):
            argv.append(flag(f.name))
        else:
            argv += [flag(f.name), ",".join(v) if isinstance(v, tuple) else repr(v) if isinstance(v, float) else str(v)]
    return argv


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if config.nproc > 1 and not under_torchrun():
        check_out(config)  # refuse here, once, rather than in every rank
        try:
            rc = launch(["phiforge.cli", "finetune", *argv_for(config)], config.nproc, config.threads)
        except SignalException as e:  # Ctrl-C / SIGTERM reached the launcher: the ranks checkpoint and stop
            ckpt = latest_checkpoint(Path(config.out))
            raise KeyboardInterrupt(f"finetune stopped by {e.sigval.name}; " + (
                f"the newest checkpoint is {ckpt}; the same command with --resume continues from it" if ckpt
                else "no checkpoint was written")) from None
        ckpt = latest_checkpoint(Path(config.out)) if rc else None
        if ckpt is not None:
            print(f"finetune: the newest checkpoint is {ckpt}; the same command with --resume continues from it",
                  file=sys.stderr)
        return rc
    finetune(config)
    return 0
