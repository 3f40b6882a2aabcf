"""load_generator: the one model + tokenizer + adapter set-up; compute_dtype: bf16 exactly where the CPU multiplies
bf16 natively."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from phiforge.engine.formats.loader import load_model
from phiforge.engine.formats.peft import AdapterError, save_adapter
from phiforge.engine.formats.peft import check_adapter_dir, resolve_quant
from phiforge.engine.model.lora import apply_lora, lora_modules
from phiforge.engine.pretrained import compute_dtype, load_generator
from tiny_phi3 import randomize_lora_B, save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(5))


def test_load_generator_applies_the_adapter(tmp_path):
    """`phiforge generate/ask --adapter DIR` go through load_generator: the adapter's LoRA modules are live and
    the model computes what the model it was saved from computes."""
    tiny, _ = save_tiny(tmp_path / "tiny", with_tokenizer=True)
    donor = load_model(tiny, dtype=torch.float32)
    apply_lora(donor, r=2, alpha=4, targets=["o_proj"])
    randomize_lora_B(donor)
    save_adapter(donor, tmp_path / "adapter")
    gen = load_generator(tiny, tmp_path / "adapter", dtype="float32")
    wrapped = dict(lora_modules(gen.model))
    assert wrapped and all(n.endswith("o_proj") for n in wrapped)
    assert next(gen.model.parameters()).dtype == torch.float32
    torch.testing.assert_close(gen.model(IDS), donor.eval()(IDS))
    assert not torch.allclose(gen.model(IDS), load_model(tiny, dtype=torch.float32)(IDS))


def test_load_generator_keeps_the_checkpoint_dtype(tmp_path):
    tiny, _ = save_tiny(tmp_path / "tiny", with_tokenizer=True)
    assert load_generator(tiny).model.dtype == load_model(tiny).dtype


def test_compute_dtype_follows_the_cpu_flags():
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    native = {"avx512_bf16", "amx_bf16"} & set(flags.split())
    assert compute_dtype("cpu") == (torch.bfloat16 if native else torch.float32)


def test_an_adapter_runs_on_the_base_it_was_trained_on(tmp_path):
    q, lora = tmp_path / "q", tmp_path / "l"
    for d, method in ((q, "qlora"), (lora, "lora")):
        d.mkdir()
        (d / "adapter_config.json").write_text("{}")
        (d / "training_args.json").write_text(json.dumps({"method": method}))
    assert resolve_quant(None, q) == "nf4"  # QLoRA learnt its update against the NF4 base
    assert resolve_quant("none", q) is None  # unless told otherwise
    assert resolve_quant(None, lora) is None and resolve_quant(None, None) is None
    assert resolve_quant("nf4", lora) == "nf4"
    with pytest.raises(FileNotFoundError, match="--adapter .*nope: no such directory"):
        check_adapter_dir(tmp_path / "nope")
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        check_adapter_dir(tmp_path)
