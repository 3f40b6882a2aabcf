"""kernels/cpu/native.py: every C file compiles on its own with the real flags, and a library that cannot run says why:
a compile error warns once with the compiler's message (raises under PHIFORGE_CPU_NATIVE=require), a missing
instruction set is a quiet fallback even under require."""
from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from phiforge.kernels.cpu import (attention, decode, gemv, native, nf4, omp_pool,  # noqa: F401 (register)
                                  ops)

# the tiers each C file is built for, from the libraries that build it (peak.c: bench_generate's probe)
TIERS = {lib.source.name: lib.tiers for lib in native.LIBRARIES.values()} | {"peak.c": ("avx512bf16",)}
X86 = bool(native.cpu_flags())


def test_every_c_file_belongs_to_a_library():
    assert {p.name for p in native.CSRC.glob("*.c")} == set(TIERS)


@pytest.mark.parametrize("name,tier", [(name, tier) for name, tiers in sorted(TIERS.items()) for tier in tiers])
def test_each_c_file_compiles_alone(name, tier, tmp_path):
    if tier not in native.runnable_tiers():
        pytest.skip(f"this CPU does not run tier {tier}")
    src = native.CSRC / name
    proc = subprocess.run(native.compile_command("cc", src, tmp_path / "out.so", tier), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


def test_headers_are_shipped_and_included():
    included = {p.name for lib in native.LIBRARIES.values() for p in native.sources(lib.source)}
    assert {p.name for p in native.CSRC.glob("*.h")} <= included  # no header left unused
    assert "simd.h" in included


PROBES = Path(__file__).with_name("probes")  # small C files the build tests compile, copied in as probe.c


def _lib(tmp_path: Path, probe: str, needs: tuple[str, ...] = ()) -> native.NativeLib:
    src = tmp_path / "probe.c"
    shutil.copyfile(PROBES / probe, src)
    return native.NativeLib("probe", src, needs=needs, register=False)


def test_tiers_cap_and_fall_back(tmp_path):
    if not X86:
        pytest.skip("native kernels build on x86-64 only")
    lib = native.NativeLib("probe", _lib(tmp_path, "one.c").source, tiers=("avx2",), register=False)
    runnable = native.runnable_tiers()
    assert lib.tier() == ("avx2" if "avx2" in runnable else None)
    with native.forced_tier("x86-64"):                             # below the library's only tier
        assert lib.tier() is None and lib.get() is None
        assert lib.status().state == "unsupported"
    with pytest.raises(ValueError):
        with native.forced_tier("avx1024"):
            pass


BROKEN = "broken.c"  # a missing semicolon: the compiler stops at 1:23


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("PHIFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PHIFORGE_CPU_NATIVE", raising=False)


@pytest.mark.skipif(not X86, reason="native kernels build on x86-64 only")
def test_compile_error_raises_under_require(tmp_path, monkeypatch):
    monkeypatch.setenv("PHIFORGE_CPU_NATIVE", "require")
    lib = _lib(tmp_path, BROKEN)
    with pytest.raises(native.NativeBuildError, match=r"(?s)probe.*probe.c:1:23: error: expected"):
        lib.get()
    with pytest.raises(native.NativeBuildError):  # every later use too, not only the first
        lib.status()


@pytest.mark.skipif(not X86, reason="native kernels build on x86-64 only")
def test_compile_error_warns_once_and_falls_back(tmp_path):
    lib = _lib(tmp_path, BROKEN)
    with pytest.warns(native.NativeBuildWarning, match="error: expected"):
        assert lib.get() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lib.get() is None                    # no second warning
    status = lib.status()
    assert status.state == "compile error" and "probe.c:1:23: error: expected" in status.detail


@pytest.mark.skipif(not X86, reason="native kernels build on x86-64 only")
def test_builds_and_caches(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("PHIFORGE_CPU_NATIVE", "require")
    lib = _lib(tmp_path, "answer.c")
    assert lib.get().f() == 42 and str(lib.status()) == "active: x86-64"
    assert len(list((tmp_path / "home" / "build").glob("probe-*.so"))) == 1
    # one line says why the first use pauses; loading it from the cache says nothing
    assert capfd.readouterr().err.count("building the native CPU kernels 'probe'") == 1
    assert _lib(tmp_path, "answer.c").get().f() == 42
    assert "building" not in capfd.readouterr().err
    with lib.disabled():
        assert lib.get() is None
    assert lib.get() is not None


def test_missing_instruction_set_is_a_fallback_even_under_require(tmp_path, monkeypatch):
    monkeypatch.setenv("PHIFORGE_CPU_NATIVE", "require")
    lib = _lib(tmp_path, BROKEN, needs=("avx512f", "no_such_isa_flag"))
    assert lib.get() is None
    status = lib.status()
    assert status.state == "unsupported" and ("no_such_isa_flag" in status.detail or not X86)


@pytest.mark.skipif(not X86, reason="native kernels build on x86-64 only")
def test_no_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(native.NativeBuildWarning, match="not found"):
        assert _lib(tmp_path, "one.c").get() is None
    monkeypatch.setenv("PHIFORGE_CPU_NATIVE", "require")
    with pytest.raises(native.NativeBuildError, match="no compiler"):
        _lib(tmp_path, "one.c").get()


def test_disabled_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PHIFORGE_CPU_NATIVE", "0")
    lib = _lib(tmp_path, BROKEN)
    assert lib.get() is None and lib.status().state == "disabled"


def test_cache_key_covers_included_headers(tmp_path):
    shutil.copyfile(PROBES / "v1.h", tmp_path / "h.h")
    src = tmp_path / "probe.c"
    shutil.copyfile(PROBES / "with_header.c", src)
    assert native.NativeLib("probe", src, register=False).get().f() == 1
    shutil.copyfile(PROBES / "v2.h", tmp_path / "h.h")                # only the header changes
    assert native.NativeLib("probe", src, register=False).get().f() == 2
