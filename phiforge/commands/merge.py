"""`phiforge merge`: fold a LoRA adapter into its base model and write a dense checkpoint.

    phiforge merge --model DIR --adapter DIR --out DIR [--dtype bfloat16] [--quant nf4|none]

A QLoRA adapter was trained against the NF4-dequantized base, so it is merged onto that (the default when the
adapter directory's training_args.json says method qlora), not onto the original dense weights.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from phiforge.engine.checkpoint import DTYPES
from phiforge.engine.loader import load_model, save_model
from phiforge.engine.lora import merge_adapter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model directory (Hugging Face Phi-3 layout)")
    parser.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory")
    parser.add_argument("--out", required=True, help="output directory for the merged checkpoint")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quant", choices=["none", "nf4"], default=None,
                        help="merge onto the NF4-dequantized base (what a QLoRA adapter was trained against); "
                             "default: nf4 when the adapter dir's training_args.json says method qlora")


def _trained_method(adapter_dir: Path) -> str | None:
    p = adapter_dir / "training_args.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text()).get("method")
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None


def merge(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
          quant: str | None = None) -> Path:
    """Load base + adapter, fold the adapter in and write a dense checkpoint (config, weights, tokenizer files)."""
    adapter_dir = Path(adapter_dir)
    if quant is None:
        quant = "nf4" if _trained_method(adapter_dir) == "qlora" else "none"
    model = load_model(model_dir, quant=None if quant == "none" else quant, adapter=adapter_dir)
    merge_adapter(model, dtype=dtype)
    return save_model(model, out_dir, dtype=dtype, copy_from=model_dir)


def run(args: argparse.Namespace) -> int:
    out = merge(args.model, args.adapter, args.out, dtype=DTYPES[args.dtype], quant=args.quant)
    print(f"merged {args.adapter} into {args.model} -> {out} ({args.dtype})")
    return 0
