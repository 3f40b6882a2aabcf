"""phiforge.engine: config, loader, model, tokenizer, generation, LoRA and training.

Public names are imported on first use (PEP 562), so importing one module (`phiforge.engine.model.config`) does not
load the whole engine.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Phi3Config": "model.config",
    "Phi3ForCausalLM": "model.phi3",
    "KVCache": "model.phi3",
    "load_model": "formats.loader",
    "load_tokenizer": "model.tokenizer",
    "Tokenizer": "model.tokenizer",
    "default_model_path": "formats.default_model",
    "model_path": "formats.default_model",
    "Engine": "serve.engine",
    "Request": "serve.request",
    "Generator": "serve.generate",
    "load_generator": "pretrained",
    "load_engine": "pretrained",
    "compute_dtype": "pretrained",
    "finetune": "train.loop",
    "TrainConfig": "train.config",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'phiforge.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"phiforge.engine.{_EXPORTS[name]}"), name)
