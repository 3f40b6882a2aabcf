"""`phiforge doctor` reports what this machine runs, and the native libraries' states agree with the kernels'."""
from __future__ import annotations

import argparse
import json

from phiforge.commands import doctor
from phiforge.kernels.cpu import native


def _run(capsys, *argv: str) -> str:
    parser = argparse.ArgumentParser()
    doctor.add_arguments(parser)
    assert doctor.run(parser.parse_args(list(argv))) == 0
    return capsys.readouterr().out


def test_json_report(capsys):
    d = json.loads(_run(capsys, "--json"))
    assert d["torch"] and d["triton"] and d["torch_threads"] >= 1 and isinstance(d["cuda"], bool)
    names = {lib["name"] for lib in d["native_libraries"]}
    assert names == {"cpu_ops", "cpu_gemv", "nf4_cpu", "cpu_attention", "cpu_decode"}
    for lib in d["native_libraries"]:
        assert lib["state"] == native.LIBRARIES[lib["name"]].status().state
    flags = native.cpu_flags().split()
    assert d["cpu_isa"]["avx512f"] == ("avx512f" in flags)
    assert d["cpu_tier"] == native.cpu_tier()


def test_text_report_names_every_library(capsys):
    out = _run(capsys)
    assert "torch" in out and "PHIFORGE_CPU_NATIVE" in out
    assert all(name in out for name in ("cpu_ops", "cpu_gemv", "nf4_cpu", "cpu_attention", "cpu_decode"))


def test_a_disabled_machine_says_so(capsys, monkeypatch):
    monkeypatch.setenv("PHIFORGE_CPU_NATIVE", "0")
    lib = native.NativeLib("probe", native.CSRC / "ops.c", register=False)
    monkeypatch.setattr(doctor, "LIBRARIES", (lib,))
    d = json.loads(_run(capsys, "--json"))
    assert d["native_libraries"][0]["state"] == "disabled" and d["cpu_native_mode"] == "0"
