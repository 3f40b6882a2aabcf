"""kernels/cpu/omp_pool.py: the calling thread's OpenMP workers end on release and come back with its next parallel
region; the serving engine's constructing thread gives its pool back when the scheduler thread starts. Each case
runs in a fresh process (tests/kernels/cpu/omp_pool_probe.py), which counts the OS threads that are not Python
threads."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from child_env import child_env
from tiny_phi3 import make_hf_checkpoint

from phiforge.kernels.cpu import omp_pool

LIB = omp_pool.LIB
PROBE = Path(__file__).with_name("omp_pool_probe.py")


def _probe(*args: str) -> dict:
    proc = subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True, env=child_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_release_ends_the_threads_workers_and_the_next_region_starts_them_again():
    got = _probe("release")
    assert got["pool"] == got["start"] + 1                   # two torch threads: the caller and one worker
    assert got["released"] is True
    assert got["after_release"] == got["start"]              # the worker ended
    assert got["pool_again"] == got["pool"]                  # and the next parallel region built a pool again


def test_engine_start_gives_back_the_constructing_threads_pool(tmp_path):
    make_hf_checkpoint(tmp_path, {})
    got = _probe("engine", str(tmp_path))
    assert got["pool_after_load"] == got["start"] + 1
    # the scheduler thread is a Python thread; the loader's worker is gone, so one native thread fewer
    assert got["engine_started"] == got["pool_after_load"] - 1
    assert got["tokens"] == 5
    assert got["engine_stopped"] == got["engine_started"]    # the scheduler thread's own pool ended with it


def test_release_without_a_pool_is_harmless():
    assert omp_pool.release() is True
    assert omp_pool.release() is True                        # nothing left to give back
    x = torch.arange(1 << 20, dtype=torch.float64)
    assert float(x.sum()) == (1 << 20) * ((1 << 20) - 1) / 2  # parallel torch work goes on
