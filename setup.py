"""phiforge: Phi-3 experts on one consumer GPU (RAG and LoRA/QLoRA fine-tuning)."""
from setuptools import setup

PACKAGES = ["engine", "kernels", "retrieval", "evaluation", "bench"]

setup(
    name="phiforge",
    version="0.1.0",
    description="A lean engine that makes Phi-3 models industry experts on one consumer GPU",
    python_requires=">=3.10",
    # The folders install under the `phiforge.` prefix: bitsandbytes and transformers import a bare
    # top-level `kernels` module if one exists, so ours must never be importable under that name.
    packages=["phiforge", "phiforge.commands"] + [f"phiforge.{p}" for p in PACKAGES],
    package_dir={"phiforge": "phiforge", **{f"phiforge.{p}": p for p in PACKAGES}},
    # the C kernels of the CPU path, compiled on first use (kernels/native.py)
    package_data={"phiforge.kernels": ["csrc/*.c", "csrc/*.h"]},
    install_requires=[
        "torch", "triton", "safetensors", "tokenizers", "hnswlib", "numpy", "jinja2", "gguf", "tqdm",
        "matplotlib", "huggingface_hub", "fastapi", "uvicorn",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "transformers", "peft", "bitsandbytes", "openai"]},
    entry_points={"console_scripts": ["phiforge = phiforge.cli:main"]},
)
