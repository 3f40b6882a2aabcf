"""`phiforge export`: a model (with its fine-tuned adapter merged in) as one GGUF for llama.cpp, Ollama, LM Studio.

    phiforge export --model DIR [--adapter DIR] --out FILE.gguf [--type f32|f16|bf16|q8_0|q4_0]

The adapter is merged first, as `phiforge merge` does: a QLoRA adapter (training_args.json says method qlora) onto
the NF4-dequantized base it was trained against, a LoRA adapter onto the dense base. The merge is summed in fp32
and kept in fp32 up to the file's own type, so an f32 export holds exactly what phiforge computes with.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from phiforge.engine.formats.gguf.writer import TYPES, ExportError, export_gguf
from phiforge.engine.formats.loader import load_model
from phiforge.engine.formats.peft import AdapterError
from phiforge.engine.formats.peft import resolve_quant
from phiforge.engine.model.config import ConfigError
from phiforge.engine.model.lora import merge_adapter
from phiforge.engine.model.phi3 import Phi3ForCausalLM
from phiforge.engine.model.weights import CheckpointError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model directory (Hugging Face Phi-3 layout)")
    parser.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory to merge in first")
    parser.add_argument("--out", required=True, help="output file (.gguf)")
    parser.add_argument("--type", default="f16", choices=list(TYPES), help="tensor type (default: f16)")
    parser.add_argument("--quant", choices=["none", "nf4"], default=None,
                        help="merge onto the NF4-dequantized base; default: nf4 when the adapter's "
                             "training_args.json says method qlora")
    parser.add_argument("--name", default=None, help="general.name in the file (default: the file's stem)")


def merged_model(model_dir: str | Path, adapter_dir: str | Path | None = None,
                 quant: str | None = None) -> Phi3ForCausalLM:
    """The dense fp32 model a GGUF export writes: base, or base with the adapter folded in."""
    if adapter_dir is None:
        return load_model(model_dir, dtype=torch.float32)
    model = load_model(model_dir, dtype=torch.float32, quant=resolve_quant(quant, adapter_dir), adapter=adapter_dir)
    return merge_adapter(model, dtype=torch.float32)


def export(model_dir: str | Path, out: str | Path, type: str = "f16", adapter_dir: str | Path | None = None,
           quant: str | None = None, name: str | None = None) -> Path:
    """Merge (if an adapter is given) and write the GGUF; the tokenizer comes from `model_dir`."""
    if not str(out).endswith(".gguf"):
        raise ExportError(f"--out {out}: the file name must end in .gguf")
    if type not in TYPES:
        raise ExportError(f"--type {type!r}: choose one of {', '.join(TYPES)}")
    if Path(model_dir).suffix == ".gguf":
        raise ExportError(f"--model {model_dir}: already a GGUF; export takes a model directory")
    model = merged_model(model_dir, adapter_dir, quant)
    return export_gguf(model, model_dir, out, type=type, name=name)


def run(args: argparse.Namespace) -> int:
    try:
        out = export(args.model, args.out, args.type, args.adapter, args.quant, args.name)
    except (ExportError, CheckpointError, ConfigError, AdapterError, FileNotFoundError, ValueError) as e:
        print(f"phiforge export: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0
