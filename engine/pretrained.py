"""From a model directory (or the default model) to a ready Generator, and the dtype to run it in.

The one set-up shared by `phiforge generate` / `chat`, `phiforge ask`, the RAG pipeline and the demo: load the model
(optionally NF4-quantized, optionally with a PEFT LoRA adapter applied unmerged), load its tokenizer, wrap both in
a Generator.

An adapter runs on the base it was trained on: a QLoRA adapter (its training_args.json says method qlora) learnt
its update against the NF4-dequantized weights, so every consumer (generate, chat, ask, merge) quantizes the base
to NF4 for it unless told otherwise (quant="none").
"""
from __future__ import annotations

from pathlib import Path

import torch

from phiforge.engine.formats.default_model import default_model_path
from phiforge.engine.formats.loader import load_model
from phiforge.engine.formats.peft import AdapterError, trained_base
from phiforge.engine.model.tokenizer import load_tokenizer
from phiforge.engine.model.weights import resolve_model
from phiforge.engine.serve.generate import Generator


def compute_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bfloat16 where the hardware multiplies bf16 natively, float32 elsewhere.

    bf16 halves the bytes every matmul and decode step moves, but without native bf16 dot products (CUDA with
    bf16 support; a CPU with AVX512-BF16 or AMX, which oneDNN and the native kernels use) each product is widened
    in software and fp32 is the faster dtype.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    # torch's own cpuid probe: the check its oneDNN bf16 kernels dispatch on (and /proc/cpuinfo is Linux-only)
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return torch.bfloat16
    return torch.float32


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """The adapter directory, checked before any model is loaded: it exists and holds adapter_config.json."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"--adapter {d}: no such directory (a PEFT LoRA adapter directory, e.g. a finetune "
                                "--out)")
    if not (d / "adapter_config.json").is_file():
        raise AdapterError(f"--adapter {d}: no adapter_config.json there, so it is not a PEFT LoRA adapter directory")
    return d


def trained_quant(adapter_dir: str | Path) -> str | None:
    """"nf4" when the adapter was trained with QLoRA (its training_args.json says so), else None."""
    return "nf4" if trained_base(adapter_dir) == "nf4" else None


def resolve_quant(quant: str | None, adapter_dir: str | Path | None) -> str | None:
    """The quantization to load with: "none" means dense, None the adapter's trained base (dense without one)."""
    if quant == "none":
        return None
    if quant is None and adapter_dir is not None:
        return trained_quant(adapter_dir)
    return quant


def load_generator(model_dir: str | Path | None = None, adapter_dir: str | Path | None = None,
                   dtype: torch.dtype | str | None = None, quant: str | None = None,
                   device: str | torch.device = "cpu", prefix_cache: bool = False) -> Generator:
    """A Generator for `model_dir`, a directory or a Hugging Face id (default: the default model, built on first use).

    dtype None keeps the checkpoint's (config.json torch_dtype); pass `compute_dtype()` for this machine's fastest.
    quant "nf4" quantizes the decoder projections while loading, "none" keeps them dense, None follows the adapter's
    training (NF4 for a QLoRA adapter). prefix_cache: see engine/serve/generate.py.
    """
    if adapter_dir is not None:
        check_adapter_dir(adapter_dir)
    quant = resolve_quant(quant, adapter_dir)
    path = resolve_model(model_dir) if model_dir else default_model_path()
    model = load_model(path, dtype=dtype, device=device, quant=quant, adapter=adapter_dir)
    return Generator(model, load_tokenizer(path), prefix_cache=prefix_cache)
