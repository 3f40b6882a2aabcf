"""bench_invariance's diagnose: it finds a module whose prefill output a chunking changes (one-token chunks take
the one-row GEMV, longer ones the batched matmul) and finds none between identical chunkings."""
from __future__ import annotations

import torch
from tiny_phi3 import make_hf_checkpoint, random_prompt

from phiforge.bench.bench_invariance import diagnose
from phiforge.engine import load_model


def test_diagnose_names_the_first_module_a_chunking_changes(tmp_path):
    make_hf_checkpoint(tmp_path, dict(num_key_value_heads=2))
    model = load_model(tmp_path, dtype=torch.float32)
    prompt = random_prompt(24, 1)
    assert diagnose(model, prompt, [8, 8])["first"] is None
    found = diagnose(model, prompt, [1, 8])
    assert found["first"] is not None and found["first"].startswith("model.layers.0.")
    assert found["modules"] > 10
