"""From a model directory (or the default model) to a ready Generator, and the dtype to run it in.

The one set-up shared by `phiforge generate` / `chat`, `phiforge ask`, the RAG pipeline and the demo: load the model
(optionally NF4-quantized, optionally with a PEFT LoRA adapter applied unmerged), load its tokenizer, wrap both in
a Generator.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .fetch import default_model_path
from .generate import Generator
from .loader import load_model
from .tokenizer import load_tokenizer


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


def load_generator(model_dir: str | Path | None = None, adapter_dir: str | Path | None = None,
                   dtype: torch.dtype | str | None = None, quant: str | None = None,
                   device: str | torch.device = "cpu", prefix_cache: bool = False) -> Generator:
    """A Generator for `model_dir` (default: the default model, built on first use).

    dtype None keeps the checkpoint's (config.json torch_dtype); pass `compute_dtype()` for this machine's fastest.
    quant "nf4" quantizes the decoder projections while loading. prefix_cache: see engine/generate.py.
    """
    path = Path(model_dir) if model_dir else default_model_path()
    model = load_model(path, dtype=dtype, device=device, quant=quant, adapter=adapter_dir)
    return Generator(model, load_tokenizer(path), prefix_cache=prefix_cache)
