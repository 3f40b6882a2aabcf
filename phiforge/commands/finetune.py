"""`phiforge finetune`: the argparse layer over engine/train/loop.py, one flag per TrainConfig field.

Flags, types, choices, help and defaults are read off the dataclass (engine/train/config.py), so a new option is
one new field. A bool field that defaults to False is a `--name` switch; one that defaults to True is `--no-name`.
`targets` is comma-separated on the command line.

Ctrl-C (or SIGTERM) finishes the current step, writes a checkpoint and the adapter so far, and exits 130; the
same command with --resume continues. `--nproc N` (outside torchrun) re-runs this same command as N ranks through torch.distributed.run; each rank then
finds torchrun's environment and trains its share (engine/train/distributed.py). On several machines, start
`torchrun ... -m phiforge.cli finetune ...` on each yourself.

Q/A data (retrieval/qa.py rows: question, answer, sources) is turned into chat rows here, before the loop: the
closed-book rows (retrieval/raft.py closed_book_rows), or with `--raft --index DIR` the RAFT rows. They are written
into OUT as train_data.jsonl (and eval_data.jsonl for a Q/A --eval file): the data the run actually used, and what
training_args.json names. `--resume` reuses OUT/train_data.jsonl rather than building it again, so a resumed run
sees exactly the rows it started with (retrieval is not re-run against an index that may have changed since).
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import types
import typing
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing.api import SignalException

from phiforge.engine.atomic import write_jsonl_atomic
from phiforge.engine.formats.default_model import model_path
from phiforge.engine.model.tokenizer import load_tokenizer
from phiforge.engine.train.config import TrainConfig, TrainConfigError, flag
from phiforge.engine.train.distributed import launch, under_torchrun
from phiforge.engine.train.loop import finetune
from phiforge.engine.train.state import TrainingInterrupted, check_out, holds_run, latest_checkpoint
from phiforge.retrieval.manifest import IndexCorrupt, IndexMismatch
from phiforge.retrieval.qa import load_qa
from phiforge.retrieval.raft import closed_book_rows, is_qa_file, raft_examples
from phiforge.retrieval.store import EmptyIndexError, Index, NoIndexError

TRAIN_ROWS, EVAL_ROWS = "train_data.jsonl", "eval_data.jsonl"

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


def _qa_rows(config: TrainConfig, path: str, tokenizer) -> tuple[list[dict], str]:
    """Chat rows for a Q/A file and a line saying what they are."""
    qa = load_qa(path)
    if not config.raft:
        return closed_book_rows(qa), f"{len(qa)} closed-book rows"
    try:
        with Index.open(config.index, create=False) as ix:
            examples = raft_examples(qa, ix, tokenizer, config.seq_len, config.raft_k, config.raft_p, config.seed)
    except (NoIndexError, IndexCorrupt, IndexMismatch, EmptyIndexError) as e:
        raise TrainConfigError(f"--index: {e}", ("index",)) from None
    answerable = sum(r.answerable for r in qa)
    kept = sum(e.gold_number is not None for e in examples)
    return [e.row() for e in examples], (f"{len(qa)} RAFT rows (k={config.raft_k}, p={config.raft_p}: gold chunk in "
                                         f"{kept} of {answerable} answerable contexts, {len(qa) - answerable} "
                                         "unanswerable)")


def prepare_data(config: TrainConfig) -> TrainConfig:
    """The config the loop runs: Q/A --data / --eval files replaced by the chat rows built from them in OUT
    (a --data already naming OUT/train_data.jsonl is taken as built: a resumed or launched run)."""
    out = Path(config.out)
    built = str(out / TRAIN_ROWS)
    qa_train = config.data != built and is_qa_file(config.data)
    if config.raft and not qa_train and config.data != built:
        raise TrainConfigError(f"--raft: {config.data} holds chat or prompt/completion rows; RAFT builds its rows "
                               "from Q/A rows ({question, answer, sources})", ("raft",))
    qa_eval = config.eval_data is not None and is_qa_file(config.eval_data)
    if not (qa_train or qa_eval):
        return config
    check_out(config)  # before writing into OUT
    changes: dict[str, Any] = {}
    # RAFT prompts are sized in the model's tokens; closed-book rows need no tokenizer
    tokenizer = load_tokenizer(model_path(config.model)) if config.raft else None
    if qa_train:
        if config.resume:
            if not Path(built).is_file():
                raise TrainConfigError(f"--resume: {built} is missing (the rows the run trained on); start a new "
                                       "--out", ("resume",))
            print(f"finetune: resume reuses the training rows in {built}")
        else:
            rows, what = _qa_rows(config, config.data, tokenizer)
            write_jsonl_atomic(built, rows)
            print(f"finetune: {what} from {config.data} -> {built}")
        changes["data"] = built
    if qa_eval:
        rows, what = _qa_rows(config, config.eval_data, tokenizer)
        write_jsonl_atomic(out / EVAL_ROWS, rows)
        print(f"finetune: eval: {what} from {config.eval_data} -> {out / EVAL_ROWS}")
        changes["eval_data"] = str(out / EVAL_ROWS)
    return dataclasses.replace(config, **changes)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    out = Path(config.out)
    created = not out.exists()
    try:
        return _run(prepare_data(config))
    except BaseException as e:
        # a run that failed before its first checkpoint leaves no folder the data preparation created
        if created and out.is_dir() and not isinstance(e, TrainingInterrupted) and not holds_run(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run(config: TrainConfig) -> int:
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
