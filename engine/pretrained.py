"""From a model spec (a directory, a Hugging Face id, or None for the default model) to a ready Generator or
Engine, and the dtype to run it in.

The one set-up shared by every command and client: `model_path` (engine/formats/default_model.py) turns the spec
into a directory the same way for all (so `serve --model <id>` works where `generate --model <id>` does);
`load_generator` (`generate` / `chat`, `ask`, the RAG pipeline, the demo) loads the model, optionally NF4-quantized
and with a PEFT LoRA adapter applied unmerged, and its tokenizer, in a Generator; `load_engine` (`serve`,
`evaluate`) does the same into a serving Engine with many adapters.

An adapter runs on the base it was trained on: a QLoRA adapter (its training_args.json says method qlora) learnt
its update against the NF4-dequantized weights, so every consumer (generate, chat, ask, merge) quantizes the base
to NF4 for it unless told otherwise (quant="none").
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from phiforge.engine.formats.default_model import model_path
from phiforge.engine.formats.loader import load_model
from phiforge.engine.formats.peft import check_adapter_dir, resolve_quant
from phiforge.engine.model.tokenizer import Tokenizer, load_tokenizer
from phiforge.engine.serve.engine import Engine
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


def load_engine(model: str | Path | None = None, adapters: dict[str, str | Path] | None = None,
                dtype: torch.dtype | str | None = None, quant: str | None = None,
                device: str | torch.device = "cpu", **engine_kw: Any) -> tuple[Engine, Tokenizer]:
    """A serving Engine (and its tokenizer) for a model spec, with `adapters` (name -> PEFT directory) resident.

    dtype None: this machine's fastest (`compute_dtype`); quant as in load_generator (the engine itself quantizes
    the base at start when its adapters are QLoRA ones); engine_kw: Engine's options (max_batch, kv_tokens, ...)."""
    path = model_path(model)
    net = load_model(path, dtype=dtype or compute_dtype(device), device=device, quant=quant)
    tokenizer = load_tokenizer(path)
    named = None if adapters is None else {name: str(d) for name, d in adapters.items()}
    return Engine(net, tokenizer, adapters=named, **engine_kw), tokenizer


def load_generator(model_dir: str | Path | None = None, adapter_dir: str | Path | None = None,
                   dtype: torch.dtype | str | None = None, quant: str | None = None,
                   device: str | torch.device = "cpu", prefix_cache: bool = False,
                   batch_invariant: bool = True) -> Generator:
    """A Generator for `model_dir`, a directory or a Hugging Face id (default: the default model, built on first use).

    dtype None keeps the checkpoint's (config.json torch_dtype); pass `compute_dtype()` for this machine's fastest.
    quant "nf4" quantizes the decoder projections while loading, "none" keeps them dense, None follows the adapter's
    training (NF4 for a QLoRA adapter). prefix_cache, batch_invariant: see engine/serve/generate.py and
    engine/serve/engine.py.
    """
    if adapter_dir is not None:
        check_adapter_dir(adapter_dir)
    quant = resolve_quant(quant, adapter_dir)
    path = model_path(model_dir)
    model = load_model(path, dtype=dtype, device=device, quant=quant, adapter=adapter_dir)
    return Generator(model, load_tokenizer(path), prefix_cache=prefix_cache, batch_invariant=batch_invariant)
