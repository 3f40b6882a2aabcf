"""`phiforge serve`: the OpenAI-compatible HTTP server (engine/api/server.py) over the serving Engine.

    phiforge serve                                         # the default model on 127.0.0.1:8000
    phiforge serve --model DIR --quant nf4 --adapter sql=runs/sql-lora --adapter legal=runs/legal --port 8000
    phiforge serve --api-key KEY --max-batch 16 --max-queue 256 --threads 2
    phiforge serve --max-adapters 4                        # no adapter yet: up to 4 loaded at run time

Clients pick an adapter with the `model` field (its NAME; the base model answers to --served-model-name, by
default the model directory's name). Adapters given with --adapter are loaded at start; with adapter slots
(--max-adapters N, or 8 when --adapter is given) more are loaded and unloaded at run time through
POST /v1/load_lora_adapter and /v1/unload_lora_adapter. SIGTERM (or Ctrl-C) stops admitting, finishes the
running and queued requests, then exits 0. Bad flags (a missing directory, a malformed --adapter, more adapters
than --max-adapters) are one line on stderr and status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from phiforge.commands.generate import add_batch_invariant
from phiforge.engine.api.protocol import DEFAULT_MAX_N
from phiforge.engine.api.server import create_app, run_server
from phiforge.engine.pretrained import load_engine, model_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face model directory (default: the default model)")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients send as `model` for the base (default: the directory's name)")
    p.add_argument("--quant", choices=["nf4"], default=None, help="quantize the decoder projections while loading")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default: bfloat16 where the hardware has it, else float32)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT LoRA adapter served as model NAME (repeatable)")
    p.add_argument("--max-adapters", type=int, default=None, metavar="N",
                   help="adapter slots: up to N adapters resident, loadable at run time through "
                        "/v1/load_lora_adapter (default: 8 when --adapter is given, else none)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together per step")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="prompt tokens a request prefills per step beside the decodes: smaller keeps inter-token "
                        "gaps short while a long prompt arrives, larger gives a sooner first token "
                        "(default: the engine's, 256)")
    p.add_argument("--step-tokens", type=int, default=None, metavar="N",
                   help="prompt tokens per step in all, across the requests prefilling together; bounds the "
                        "stall a burst of arrivals puts on the running streams (default: the engine's, 4096)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond the batch; more get a 429")
    p.add_argument("--max-n", type=int, default=DEFAULT_MAX_N, metavar="N",
                   help=f"choices one request may ask for with 'n' (at most --max-batch; default {DEFAULT_MAX_N})")
    add_batch_invariant(p)
    p.add_argument("--ignore-unknown-fields", action="store_true",
                   help="log and ignore request fields OpenAI's API does not have (default: a 400 naming the field)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _adapters(specs: list[str]) -> list[tuple[str, Path]]:
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=DIR")
        if not Path(path).is_dir():
            raise ValueError(f"--adapter {spec!r}: {path} is not a directory")
        if name in {n for n, _ in out}:
            raise ValueError(f"--adapter {spec!r}: the name {name!r} is given twice")
        out.append((name, Path(path)))
    return out


def _check(args: argparse.Namespace) -> None:
    for flag, v, lo in (("--port", args.port, 0), ("--max-batch", args.max_batch, 1),
                        ("--max-queue", args.max_queue, 0), ("--threads", args.threads, 1),
                        ("--max-adapters", args.max_adapters, 0), ("--prefill-chunk", args.prefill_chunk, 1),
                        ("--step-tokens", args.step_tokens, 1), ("--max-n", args.max_n, 1)):
        if v is not None and v < lo:
            raise ValueError(f"{flag} must be >= {lo}, got {v}")
    if args.port > 65535:
        raise ValueError(f"--port must be <= 65535, got {args.port}")


def run(args: argparse.Namespace) -> int:
    try:
        _check(args)
        adapters = _adapters(args.adapter)
    except ValueError as e:
        print(f"phiforge serve: {e}", file=sys.stderr)
        return 2
    if args.max_adapters is not None and len(adapters) > args.max_adapters:
        print(f"phiforge serve: --max-adapters {args.max_adapters}: {len(adapters)} --adapter given", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        path = model_path(args.model)    # a directory, a Hugging Face id, or the default model
        name = args.served_model_name or path.name
        if name in {n for n, _ in adapters}:
            raise ValueError(f"--adapter {name}: the base model is served under that name")
        chunk = {k: v for k, v in (("prefill_chunk", args.prefill_chunk), ("step_tokens", args.step_tokens)) if v}
        engine, tokenizer = load_engine(path, dict(adapters), dtype=args.dtype, quant=args.quant,
                                        max_batch=args.max_batch, max_queue=args.max_queue,
                                        max_adapters=args.max_adapters,
                                        batch_invariant=args.batch_invariant == "on", **chunk)
    except (ValueError, OSError) as e:  # the loaders' errors name the file and the field
        print(f"phiforge serve: {e}", file=sys.stderr)
        return 2
    app = create_app(engine, tokenizer, model_name=name, api_key=args.api_key, max_n=min(args.max_n, args.max_batch),
                     ignore_unknown_fields=args.ignore_unknown_fields)
    print(f"phiforge serve: {name} ({', '.join([n for n, _ in adapters]) or 'no adapters'}) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    run_server(app, args.host, args.port, log_level=args.log_level)
    return 0
