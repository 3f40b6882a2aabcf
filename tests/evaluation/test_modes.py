"""Which modes run: the default follows the inputs given, a named mode without its input names the flag."""
from __future__ import annotations

import re

import pytest

from phiforge.evaluation.modes import ModeError, parse_adapters, parse_modes, select_modes


def _names(modes):
    return [m.name for m in modes]


def test_default_modes_follow_the_inputs():
    assert _names(select_modes(None, False, {})) == ["base"]
    assert _names(select_modes(None, True, {})) == ["base", "rag"]
    assert _names(select_modes(None, False, {"ft": 1})) == ["base", "ft"]
    assert _names(select_modes(None, True, {"ft": 1})) == ["base", "rag", "ft", "rag+ft"]
    assert _names(select_modes(None, True, {"ft": 1, "raft": 1})) == ["base", "rag", "ft", "rag+ft", "raft+rag"]
    assert _names(select_modes(None, True, {"raft": 1})) == ["base", "rag", "raft+rag"]


def test_named_modes_in_canonical_order_and_checked():
    assert parse_modes(" raft+rag, base ") == ["base", "raft+rag"]
    assert parse_modes(None) is None
    assert _names(select_modes(["rag"], True, {})) == ["rag"]
    for modes, index, adapters, flag in ((["rag"], False, {}, "--index DIR"), (["ft"], True, {}, "--adapter ft=DIR"),
                                         (["raft+rag"], True, {"ft": 1}, "--adapter raft=DIR"),
                                         (["rag+ft"], False, {"ft": 1}, "--index DIR")):
        with pytest.raises(ModeError, match=re.escape(f"--modes {modes[0]}: needs {flag}")):
            select_modes(modes, index, adapters)
    with pytest.raises(ModeError, match="unknown mode 'rft'"):
        parse_modes("base,rft")
    with pytest.raises(ModeError, match="at least one"):
        parse_modes(" , ")


def test_adapter_specs(tmp_path):
    assert parse_adapters([f"ft={tmp_path}", f"raft={tmp_path}"]) == {"ft": tmp_path, "raft": tmp_path}
    for spec, why in (("ft", "expected NAME=DIR"), (f"lora={tmp_path}", "one of ft, raft"),
                      (f"ft={tmp_path / 'x'}", "is not a directory")):
        with pytest.raises(ModeError, match=why):
            parse_adapters([spec])
    with pytest.raises(ModeError, match="given twice"):
        parse_adapters([f"ft={tmp_path}", f"ft={tmp_path}"])
