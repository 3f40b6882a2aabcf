"""Checkpoint loading: sharded files, dtypes, and clear errors that name the file and the tensor."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Phi3ForCausalLM

from phiforge.engine import load_model
from phiforge.engine.formats.loader import CheckpointError, save_model
from phiforge.engine.model.config import ConfigError
from tiny_phi3 import TINY, make_hf_checkpoint


@pytest.fixture
def ckpt(tmp_path):
    hf = make_hf_checkpoint(tmp_path, dict(num_key_value_heads=2))
    return tmp_path, hf


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out if torch.is_tensor(out) else out.logits


def test_sharded_checkpoint_equals_single(tmp_path):
    hf = make_hf_checkpoint(tmp_path / "one", {})
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = torch.arange(20)[None] % TINY["vocab_size"]
    a = _logits(load_model(tmp_path / "one", dtype=torch.float32), ids)
    b = _logits(load_model(tmp_path / "sharded", dtype=torch.float32), ids)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_checkpoints_load_in_their_dtype(tmp_path, dtype):
    hf = make_hf_checkpoint(tmp_path, {}, dtype=dtype)
    model = load_model(tmp_path)  # dtype=None keeps the checkpoint's
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == dtype
    ids = torch.arange(12)[None]
    ref = _logits(hf.float(), ids)
    got = _logits(load_model(tmp_path, dtype=torch.float32), ids)
    assert (got - ref).abs().max() <= 1e-4  # same half weights, upcast on load


def test_truncated_file_names_file_and_tensor(ckpt):
    d, _ = ckpt
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor '.*'"):
        load_model(d)


def test_missing_tensor_named(ckpt):
    d, _ = ckpt
    state = load_file(d / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing tensor 'model\.layers\.1\.mlp\.down_proj"):
        load_model(d)


def test_unexpected_tensor_named(ckpt):
    d, _ = ckpt
    state = load_file(d / "model.safetensors")
    state["model.layers.0.self_attn.q_bias"] = torch.zeros(3)
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_bias'"):
        load_model(d)


def test_wrong_shape_named(ckpt):
    d, _ = ckpt
    state = load_file(d / "model.safetensors")
    state["model.layers.0.mlp.gate_up_proj.weight"] = torch.zeros(10, TINY["hidden_size"])
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.gate_up_proj\.weight' has shape \[10, 64\]"):
        load_model(d)


def test_unsupported_architecture_named(ckpt):
    d, _ = ckpt
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["Phi3SmallForCausalLM"], model_type="phi3small")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: architecture Phi3SmallForCausalLM"):
        load_model(d)


def test_missing_shard_named(tmp_path):
    hf = make_hf_checkpoint(tmp_path, {})
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    shard = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    victim = sorted(set(shard.values()))[-1]
    (tmp_path / victim).unlink()
    with pytest.raises(CheckpointError, match=victim):
        load_model(tmp_path)


def test_save_model_round_trip(ckpt, tmp_path):
    d, hf = ckpt
    model = load_model(d, dtype=torch.float32)
    out = save_model(model, tmp_path / "saved", dtype=torch.float32, copy_from=d)
    again = load_model(out, dtype=torch.float32)
    ids = torch.arange(9)[None]
    assert torch.equal(_logits(model, ids), _logits(again, ids))
    ref = Phi3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (_logits(ref, ids) - _logits(model, ids)).abs().max() <= 1e-4
