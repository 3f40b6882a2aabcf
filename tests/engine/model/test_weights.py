"""engine/model/weights.py: write_checkpoint + SafetensorsReader round-trip every dtype bit for bit (safetensors' own
loader is the reference), a failed write leaves the previous checkpoint whole, and the dtype-name table is one
consistent map."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from phiforge.engine.model.weights import (DTYPE_NAMES, DTYPES, SafetensorsReader, copy_auxiliary_files,
                                        write_checkpoint)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 5, generator=g).bfloat16(), "b.weight": torch.randn(7, generator=g),
            "c.codes": torch.randint(0, 255, (4, 1), dtype=torch.uint8, generator=g),
            "d.half": torch.randn(2, 2, generator=g).half(), "e.empty": torch.zeros(0, 4)}


def test_write_then_read_round_trips(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    out = write_checkpoint(tmp_path / "ck", _state(), {"model_type": "phi3"}, copy_from=src)
    reader = SafetensorsReader(out)
    ref = load_file(str(out / "model.safetensors"))
    assert sorted(reader.keys()) == sorted(ref) == sorted(_state())
    for key, want in ref.items():
        for copy in (False, True):
            got = reader.get(key, copy=copy)
            assert got.dtype == want.dtype == reader.dtype(key) and torch.equal(got, want)
    assert json.loads((out / "config.json").read_text()) == {"model_type": "phi3"}
    assert (out / "tokenizer.json").read_text() == "{}"


def test_a_failed_write_keeps_the_old_checkpoint(tmp_path):
    out = write_checkpoint(tmp_path / "ck", {"w": torch.ones(2)}, {"v": 1})
    with pytest.raises(Exception):
        write_checkpoint(out, {"w": torch.ones(4, 4).T}, {"v": 2})  # safetensors refuses non-contiguous tensors
    assert json.loads((out / "config.json").read_text()) == {"v": 1}
    assert torch.equal(load_file(str(out / "model.safetensors"))["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp directory left behind


def test_copy_auxiliary_files_copies_only_what_exists(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "generation_config.json").write_text("{}")
    copy_auxiliary_files(tmp_path / "a", tmp_path / "b")
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["generation_config.json"]


def test_dtype_names_are_one_map():
    assert all(DTYPES[name] == dtype for dtype, name in DTYPE_NAMES.items())
    assert {DTYPE_NAMES[d] for d in DTYPES.values()} == set(DTYPE_NAMES.values())
