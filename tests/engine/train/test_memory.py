"""train_memory.estimate: the parts add up, the micro-batch it proposes fits the budget and one more does not, and
QLoRA's base linears cost what NF4 with double quantization stores per parameter."""
from __future__ import annotations

import pytest

from phiforge.engine.model.config import Phi3Config
from phiforge.engine.train.memory import GB, estimate


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_max_micro_batch_fits_and_one_more_does_not(method):
    budget = 24
    e = estimate("phi3-mini-4k", method, 2048, budget_gb=budget)
    b = e["max_micro_batch"]
    assert b >= 1
    assert estimate("phi3-mini-4k", method, 2048, batch=b)["total_gb"] <= budget + 0.01
    assert estimate("phi3-mini-4k", method, 2048, batch=b + 1)["total_gb"] > budget - 0.01


def test_parts_add_up_and_nf4_bytes_per_parameter():
    cfg = Phi3Config.from_name("phi3-mini-4k")
    lora, qlora = estimate(cfg, "lora", 512, batch=2), estimate(cfg, "qlora", 512, batch=2)
    for e in (lora, qlora):
        parts = sum(v for k, v in e.items() if k not in ("total_gb", "trainable_parameters"))
        assert abs(parts - e["total_gb"]) < 0.02
    per_param_ratio = qlora["base_linears"] / lora["base_linears"]
    assert abs(per_param_ratio - (0.5 + 1 / 64 + 4 / (64 * 256)) / 2) < 1e-3
    C, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    # rank 16 on the four fused projections: r * (in + out) per site
    assert lora["trainable_parameters"] == L * 16 * ((C + qkv) + (C + C) + (C + 2 * I) + (I + C))
    assert estimate(cfg, "lora", 512, batch=4)["layer_checkpoints"] == pytest.approx(
        2 * lora["layer_checkpoints"], abs=2e-3) == pytest.approx(L * 4 * 512 * C * 2 / GB, abs=2e-3)
