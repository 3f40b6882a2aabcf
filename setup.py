"""phiforge: Phi-3 experts on one consumer GPU (RAG and LoRA/QLoRA fine-tuning)."""
from pathlib import Path

from setuptools import setup

PACKAGES = ["engine", "kernels", "retrieval", "evaluation", "bench"]

# Compatible ranges for installing phiforge into an environment of your own: each floor is the oldest release with
# the APIs phiforge calls (triton 3.0: ASTSource/GPUTarget), not a tested version. The versions tested are the ones
# in requirements/lock.txt, which the repo's own commands install; `python requirements/lock.py check` (run by `make
# setup`) keeps every name here pinned there, inside its range.
RUNTIME = [
    "torch>=2.4", "triton>=3.0", "safetensors>=0.4", "tokenizers>=0.19", "hnswlib>=0.8", "numpy>=1.24",
    "jinja2>=3.1", "gguf>=0.10", "tqdm>=4.60", "matplotlib>=3.7", "huggingface_hub>=0.23", "fastapi>=0.110",
    "uvicorn>=0.29", "llguidance>=1.9",
]
# The references the tests compare against; never imported at run time.
TEST = ["pytest>=8", "pytest-benchmark>=4", "transformers>=4.45", "peft>=0.13", "bitsandbytes>=0.43", "openai>=1.0",
        "jsonschema>=4"]

setup(
    name="phiforge",
    version="0.1.0",
    description="A lean engine that makes Phi-3 models industry experts on one consumer GPU",
    python_requires=">=3.10",
    # The folders install under the `phiforge.` prefix: bitsandbytes and transformers import a bare
    # top-level `kernels` module if one exists, so ours must never be importable under that name.
    # each folder's subpackages (engine/serve -> phiforge.engine.serve) map below it
    packages=["phiforge", "phiforge.commands"] + [
        "phiforge." + ".".join(init.parent.parts) for p in PACKAGES for init in sorted(Path(p).rglob("__init__.py"))],
    package_dir={"phiforge": "phiforge", **{f"phiforge.{p}": p for p in PACKAGES}},
    # the C kernels of the CPU path, compiled on first use (kernels/cpu/native.py)
    package_data={"phiforge.kernels.cpu": ["csrc/*.c", "csrc/*.h"]},
    install_requires=RUNTIME,
    extras_require={"test": TEST},
    entry_points={"console_scripts": ["phiforge = phiforge.cli:main"]},
)
