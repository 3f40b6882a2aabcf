"""Logit parity with transformers' Phi3ForCausalLM on tiny random configs of every variant (fp32, ≤ 1e-4)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import Phi3ForCausalLM as HFModel

from phiforge.engine import load_model
from phiforge.engine.model.config import ConfigError, Phi3Config
from tiny_phi3 import TINY, VARIANTS, make_hf_checkpoint

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    overrides, T = VARIANTS[variant]
    hf = make_hf_checkpoint(tmp_path, overrides)
    if variant == "longrope-legacy-su":
        cfg = json.loads((tmp_path / "config.json").read_text())
        rope = cfg.pop("rope_parameters", None) or cfg.pop("rope_scaling")
        cfg["rope_scaling"] = {"type": "su", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]}
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, TINY["vocab_size"], (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


def test_kv_cache_equals_full_forward(tmp_path):
    make_hf_checkpoint(tmp_path, dict(sliding_window=9, num_key_value_heads=2))
    model = load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, TINY["vocab_size"], (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 32)
        parts = [model(ids[:, :11], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(11, 30)]
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("window", [None, 9])
def test_num_logits_rows_and_cache_equal_full_forward(tmp_path, window):
    """num_logits=n: the last layer attends and projects only the last n rows, yet every token's K/V reaches the
    cache. Logits equal the full forward's last rows, and the steps after (a chunk after cached tokens, a decode
    row) equal a cache filled by full forwards; with and without a window (the masked path), left padding too."""
    make_hf_checkpoint(tmp_path, dict(sliding_window=window, num_key_value_heads=2))
    model = load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(20).repeat(2, 1)
    pos[1, :3] = -1                                                    # row 1 left-padded by 3
    with torch.inference_mode():
        full_cache, cache = model.new_cache(2, 24), model.new_cache(2, 24)
        full = model(ids[:, :20], position_ids=pos, cache=full_cache)
        got = model(ids[:, :20], position_ids=pos, cache=cache, num_logits=3)
        assert got.shape == (2, 3, TINY["vocab_size"])
        assert (got - full[:, -3:]).abs().max().item() <= 1e-5
        assert torch.equal(cache.pos, full_cache.pos) and (cache.k - full_cache.k).abs().max().item() <= 1e-5
        for t, c in ((20, 3), (23, 1)):                                # a 3-token chunk, then one decode row
            p = pos[:, -1:] + torch.arange(1, c + 1) + (t - 20)
            nxt, ref = (model(ids[:, t:t + c], position_ids=p, cache=k, num_logits=1) for k in (cache, full_cache))
            assert (nxt - ref).abs().max().item() <= 1e-5


def test_num_logits_below_one_is_an_error(tmp_path):
    make_hf_checkpoint(tmp_path, {})
    model = load_model(tmp_path, dtype=torch.float32)
    for n in (0, -2):  # x[:, -0:] would have meant every row
        with pytest.raises(ValueError, match="num_logits"):
            model(torch.tensor([[3, 4, 5]]), num_logits=n)


def test_hf_config_forms_and_errors():
    base = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", **TINY, "partial_rotary_factor": 0.5}
    new_form = {**base, "rope_parameters": {"rope_type": "longrope", "rope_theta": 5000.0, "short_factor": [1.0] * 4,
                                            "long_factor": [2.0] * 4, "partial_rotary_factor": 0.5}}
    c = Phi3Config.from_hf(new_form)
    assert (c.rope_type, c.rope_theta, c.rotary_dim) == ("longrope", 5000.0, 8)
    assert c.attention_factor == 1.0  # max_pos == original max: no stretch, no scaling
    c = Phi3Config.from_hf({**base, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                            "rope_scaling": {"type": "yarn", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}})
    assert c.rope_type == "longrope" and abs(c.attention_factor - 1.1902380714) < 1e-8
    with pytest.raises(ConfigError, match="Phi3SmallForCausalLM"):
        Phi3Config.from_hf({"architectures": ["Phi3SmallForCausalLM"], "model_type": "phi3small"})
    with pytest.raises(ConfigError, match="Phi3VForCausalLM"):
        Phi3Config.from_hf({"architectures": ["Phi3VForCausalLM"], "model_type": "phi3_v"})
    with pytest.raises(ConfigError, match="short_factor"):
        Phi3Config.from_hf({**base, "rope_scaling": {"type": "longrope", "short_factor": [1.0],
                                                     "long_factor": [1.0] * 4}})


def test_default_model_greedy_32_equals_transformers():
    """The real default model, fp32: logits close and 32 greedy tokens (KV-cached loop) identical."""
    from transformers import AutoTokenizer

    from phiforge.engine.formats.default_model import default_model_path
    path = default_model_path()
    hf = HFModel.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    chat = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, ids.shape[1]:]
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-3
        cache = ours.new_cache(1, ids.shape[1] + 32)
        logits, got = ours(ids, cache=cache, num_logits=1), []
        eos = hf.generation_config.eos_token_id
        for _ in range(32):
            logits[..., eos] = float("-inf")  # what min_new_tokens=32 does on transformers' side
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            got.append(int(nxt))
            logits = ours(nxt, cache=cache)
    assert got == ref.tolist()
    assert "Paris" in tok.decode(got)
