"""phiforge.engine: config, loader, model, tokenizer, generation, LoRA and training.

Public names are imported lazily so `import phiforge.engine` stays cheap and modules that need each other
do not import in a circle.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Phi3Config": "config",
    "Phi3ForCausalLM": "model",
    "KVCache": "model",
    "load_model": "loader",
    "load_tokenizer": "tokenizer",
    "Tokenizer": "tokenizer",
    "default_model_path": "fetch",
    "Generator": "generate",
    "finetune": "train",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'phiforge.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"phiforge.engine.{_EXPORTS[name]}"), name)
