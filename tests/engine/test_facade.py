"""engine/__init__.py: the public names resolve lazily from the subpackages (the README's imports keep working after
the move), and importing one module does not load the whole engine."""
from __future__ import annotations

import subprocess
import sys

import pytest
from child_env import child_env

import phiforge.engine as engine

PUBLIC = ["Phi3Config", "Phi3ForCausalLM", "KVCache", "load_model", "load_tokenizer", "Tokenizer",
          "default_model_path", "model_path", "Engine", "Request", "Generator", "load_generator", "load_engine", "compute_dtype",
          "finetune", "TrainConfig"]


@pytest.mark.parametrize("name", PUBLIC)
def test_each_public_name_resolves_to_its_module(name):
    obj = getattr(engine, name)
    assert obj.__name__ == name and obj.__module__ == f"phiforge.engine.{engine._EXPORTS[name]}"


def test_the_facade_lists_exactly_the_public_names_and_refuses_others():
    assert sorted(engine.__all__) == sorted(PUBLIC)
    with pytest.raises(AttributeError, match="no attribute 'load_modle'"):
        engine.load_modle  # noqa: B018


def test_importing_one_module_loads_no_other_subpackage():
    code = ("import sys, phiforge.engine.model.config\n"
            "print(sorted(m for m in sys.modules if m.startswith('phiforge.engine.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['phiforge.engine.model', 'phiforge.engine.model.config']"
