"""`phiforge kernels report`: every shipped kernel configuration compiles for sm_80, sm_86, sm_89 and Hopper (sm_90
and sm_90a, the H100/H200) with zero spill bytes and shared memory within the arch's limit, and the tensor-core
GEMMs really emit mma (wgmma where Triton uses Hopper's warpgroup MMA, which only sm_90a can build).

The report runs in a subprocess: tests/conftest.py turned on TRITON_INTERPRET for this process, which makes every
@triton.jit function an interpreter object with nothing to compile. One run (all kernels x every arch, compiles in
parallel) serves every test here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from phiforge.kernels import lora, lora_gather, nf4_matmul
from phiforge.kernels.report import DEFAULT_ARCHS, SMEM_LIMIT

ARCHS = DEFAULT_ARCHS + ("90a",)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("ptx")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "phiforge.cli", "kernels", "report", "--json", "--out",
                           str(out), "--arch", ",".join(map(str, ARCHS))], capture_output=True, text=True, env=env, cwd=out, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout), out


def _shipped() -> set[tuple[str, str]]:
    specs = [s for s in nf4_matmul.aot_specs() + lora.aot_specs() + lora_gather.aot_specs()]
    return {(s["kernel"], s["config"]) for s in specs}


def test_every_shipped_config_compiles_for_every_arch(report):
    records, _ = report
    got = {(r["kernel"], r["config"], r["arch"]) for r in records}
    assert 90 in DEFAULT_ARCHS  # H100 and H200 are in the default report
    want = {(k, c, a) for k, c in _shipped() for a in ARCHS}
    assert got == want
    assert len(records) == len(want)


def test_no_spills_and_shared_memory_fits(report):
    records, _ = report
    for r in records:
        where = f"{r['kernel']} {r['config']} sm_{r['arch']}"
        assert r["spill_bytes"] == 0, f"{where} spills {r['spill_bytes']} bytes"
        assert 0 < r["registers"] <= 255, where
        assert r["shared_bytes"] <= SMEM_LIMIT[r["arch"]], f"{where} needs {r['shared_bytes']} B shared memory"


def test_tensor_cores_where_expected(report):
    """tl.dot tiles become mma.sync (Ampere/Ada have no wgmma); the split-K GEMV and the per-row gather GEMVs
    (BGMV) stay on CUDA cores; SGMV's expand has no reduction loop to pipeline."""
    records, _ = report
    gemv = ("nf4_gemv", "bgmv_shrink", "bgmv_expand")
    for r in records:
        assert r["mma"] == (r["kernel"] not in gemv), f"{r['kernel']} {r['config']} sm_{r['arch']}"
        if r["kernel"] not in gemv + ("sgmv_expand",):
            assert r["cp_async"], f"{r['kernel']} {r['config']}: no cp.async, so no software pipelining"


def test_hopper_targets(report):
    """Triton emits sm_90a PTX for cc 90; a `90` row builds for plain sm_90 unless the kernel uses wgmma (sm_90a
    only), and the wider tiles do use it there."""
    records, _ = report
    for r in records:
        where = f"{r['kernel']} {r['config']} sm_{r['arch']}"
        if r["arch"] == 90:
            assert r["target"] == ("sm_90a" if r["wgmma"] else "sm_90"), where
        elif r["arch"] == "90a":
            assert r["target"] == "sm_90a", where
        else:
            assert r["target"] == f"sm_{r['arch']}" and not r["wgmma"], where
    hopper_wgmma = {(r["kernel"], r["config"]) for r in records if r["arch"] == "90a" and r["wgmma"]}
    assert ("nf4_gemm", "medium") in hopper_wgmma and ("lora_gemm", "large+lora") in hopper_wgmma
    assert not any(k == "nf4_gemv" for k, _ in hopper_wgmma)


def test_out_keeps_the_ptx(report):
    records, out = report
    files = sorted(p.name for p in out.glob("*.ptx"))
    assert len(files) == len(records)
    text = (out / files[0]).read_text()
    assert ".target sm_" in text and ".entry" in text


def test_dispatch_picks_only_reported_configs():
    """Dispatch draws from the same tables the report compiles: no autotuner, so what ships is what is reported."""
    assert all(nf4_matmul.gemv_config(m) in nf4_matmul.GEMV_CONFIGS.values() for m in range(1, 9))
    assert all(nf4_matmul.gemm_config(m) in nf4_matmul.GEMM_CONFIGS.values() for m in (9, 32, 33, 256, 4096))
    assert all(lora.dense_config(m) in lora.DENSE_CONFIGS.values() for m in (1, 32, 33, 256, 257, 4096))
    shipped = _shipped()
    for key in nf4_matmul.GEMV_CONFIGS:
        assert ("nf4_gemv", f"M<={key}") in shipped and ("nf4_gemv", f"M<={key}+lora") in shipped
    for key in nf4_matmul.GEMM_CONFIGS:
        assert {("nf4_gemm", key), ("nf4_gemm_t", key + "+lora")} <= shipped
    for key in lora.DENSE_CONFIGS:
        assert {("lora_gemm", key + "+lora"), ("lora_gemm_t", key + "+lora"), ("lora_gemm_t", key)} <= shipped


def test_table_format_and_bad_arch(capsys):
    import argparse

    from phiforge.kernels.report import format_table, run

    rec = dict(kernel="nf4_gemv", config="M<=1", arch=86, target="sm_86", registers=40, spill_bytes=0,
               shared_bytes=2048, mma=False, wgmma=False, cp_async=False)
    line = format_table([rec]).splitlines()[-1].split()
    assert line == ["nf4_gemv", "M<=1", "sm_86", "sm_86", "40", "0", "2.0", "no", "no", "no"]
    assert run(argparse.Namespace(action="report", arch="8x", out=None, json=False)) == 2
    assert run(argparse.Namespace(action="report", arch="90b", out=None, json=False)) == 2
    assert "--arch" in capsys.readouterr().err
