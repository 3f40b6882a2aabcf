"""`phiforge merge`: fold a LoRA adapter into its base model and write a dense checkpoint.

    phiforge merge --model DIR --adapter DIR --out DIR [--dtype bfloat16] [--quant nf4|none]

A QLoRA adapter was trained against the NF4-dequantized base, so it is merged onto that (the default when the
adapter directory's training_args.json says method qlora), not onto the original dense weights.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from phiforge.engine.formats.loader import load_model, save_model
from phiforge.engine.formats.peft import check_adapter_dir, resolve_quant
from phiforge.engine.model.lora import merge_adapter
from phiforge.engine.model.weights import DTYPES, resolve_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model directory (Hugging Face Phi-3 layout) or id")
    parser.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory")
    parser.add_argument("--out", required=True, help="output directory for the merged checkpoint")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quant", choices=["none", "nf4"], default=None,
                        help="merge onto the NF4-dequantized base (what a QLoRA adapter was trained against); "
                             "default: nf4 when the adapter dir's training_args.json says method qlora")


def merge(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
          quant: str | None = None) -> Path:
    """Load base + adapter, fold the adapter in and write a dense checkpoint (config, weights, tokenizer files)."""
    adapter_dir = check_adapter_dir(adapter_dir)
    model_dir = resolve_model(model_dir)
    model = load_model(model_dir, quant=resolve_quant(quant, adapter_dir), adapter=adapter_dir)
    merge_adapter(model, dtype=dtype)
    return save_model(model, out_dir, dtype=dtype, copy_from=model_dir)


def run(args: argparse.Namespace) -> int:
    args.model = str(resolve_model(args.model))
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such directory (the base model the adapter was trained on)")
    check_adapter_dir(args.adapter)  # before the base loads
    out = merge(args.model, args.adapter, args.out, dtype=DTYPES[args.dtype], quant=args.quant)
    print(f"merged {args.adapter} into {args.model} -> {out} ({args.dtype})")
    return 0
