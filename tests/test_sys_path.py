"""No python that phiforge's tests, probes or Makefile start from the repo root sees our kernels/ as a top-level
`kernels`: transformers imports the Hugging Face package of that name whenever importlib finds one, and ours would
stand in for it (transformers 5.25 then dies on `from kernels import CUDAProperties`).

The children here are started the ways the suite starts its own (tests/kernels/cpu/test_omp_pool.py's probe script, the
`python -c` probes of test_store/test_quant, `python -m` as `make demo` does), from the repo root, with the
environment tests/conftest.py and the Makefile give every child (tests/child_env.py); and the folder itself refuses
a bare import with a line that says why."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from child_env import child_env

ROOT = Path(__file__).resolve().parents[1]
# where `kernels` resolves once transformers is imported ("" when nothing of that name is installed)
WHERE = ("import importlib.util, transformers\n"
         "spec = importlib.util.find_spec('kernels')\n"
         "print(spec.origin if spec and spec.origin else (list(spec.submodule_search_locations) if spec else ''))\n")


def _run(argv: list[str], env: dict, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.parametrize("how", ["-c", "-m", "script"])
def test_a_child_started_from_the_root_never_finds_our_kernels(tmp_path, how):
    (tmp_path / "where_kernels.py").write_text(WHERE)
    argv = {"-c": ["-c", WHERE], "-m": ["-m", "where_kernels"], "script": [str(tmp_path / "where_kernels.py")]}[how]
    out = _run(argv, child_env(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    where = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert str(ROOT / "kernels") not in where, f"`kernels` resolves to the repo's own folder: {where}"


def test_the_suite_and_the_makefile_start_children_with_a_safe_path():
    assert os.environ.get("PYTHONSAFEPATH") == "1"            # tests/conftest.py, inherited by every child
    assert "export PYTHONSAFEPATH := 1" in (ROOT / "Makefile").read_text().splitlines()
    # no empty PYTHONPATH entry (the working directory) in what the probes build
    assert "" not in child_env()["PYTHONPATH"].split(os.pathsep)


def test_our_kernels_imported_bare_says_why_in_one_line():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    out = _run(["-c", "import kernels"], env)                  # -c from the root: the root is sys.path[0]
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and "repository root is on sys.path" in last, out.stderr[-2000:]
    # phiforge.kernels itself imports as always
    assert _run(["-c", "import phiforge.kernels"], env).returncode == 0
