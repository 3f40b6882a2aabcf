"""`phiforge quantize`: write an NF4 checkpoint that transformers + bitsandbytes load.

    phiforge quantize --model DIR --out DIR [--blocksize 64] [--no-double-quant]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from phiforge.engine.formats.bnb import save_nf4_checkpoint
from phiforge.engine.formats.loader import load_model
from phiforge.engine.model.quant import nf4_modules, quantize_model_
from phiforge.engine.model.weights import resolve_model
from phiforge.kernels.nf4 import BLOCKSIZES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, metavar="DIR",
                        help="a dense Hugging Face Phi-3 directory or id")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="where to write the NF4 checkpoint")
    parser.add_argument("--blocksize", type=int, default=64, choices=BLOCKSIZES, help="values per absmax (64)")
    parser.add_argument("--no-double-quant", action="store_true", help="keep absmax in fp32 (0.5 bit/param)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    args.model = resolve_model(args.model)
    if not args.model.is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such directory (a dense Hugging Face Phi-3 directory)")
    if args.out.resolve() == args.model.resolve():
        raise ValueError(f"--out {args.out}: the same folder as --model; write the NF4 checkpoint elsewhere")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: must be >= 1 when given, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.blocksize == 64 and not args.no_double_quant:
        model = load_model(args.model, quant="nf4")  # quantized while reading: peak is one dense layer
    else:
        model = quantize_model_(load_model(args.model), args.blocksize, not args.no_double_quant)
    save_nf4_checkpoint(model, args.out, copy_from=args.model)
    nf4 = list(nf4_modules(model))
    n = sum(m.qweight.nbytes for m in nf4)
    print(f"wrote {args.out}: {len(nf4)} NF4 projections, {n / 2**20:.1f} MiB")
    return 0
