"""Shared test set-up and fixtures. Anything here runs before every test module is imported.

TRITON_INTERPRET must be set before the first `import triton` anywhere in the process, so it goes first: on this
CPU-only machine every Triton kernel runs in the interpreter on CPU tensors.

Test modules never import each other: checkpoint factories live in tests/tiny_phi3.py, the kernel tolerance rule
in tests/ref_error.py (pytest.ini puts tests/ on the path and imports test files by path, so
tests/engine/model/test_lora.py and tests/kernels/test_lora.py can share a name).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Every python a test starts inherits this: `python -c` / `python -m` run from the repo root then do not put the root
# on sys.path, where our kernels/ would stand in for the `kernels` package transformers imports (tests/test_sys_path.py).
os.environ["PYTHONSAFEPATH"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes run fastest on one thread: OpenMP's fork/join costs more than the work, and far more when the
    machine is oversubscribed (gradcheck's thousands of tiny ops). Restores the thread count after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["torch", "triton"])
def kernel_path(request, monkeypatch):
    """torch: the CPU path; triton: the Triton kernels in the interpreter (PHIFORGE_KERNELS=triton routes CPU
    tensors to them)."""
    if request.param == "triton":
        monkeypatch.setenv("PHIFORGE_KERNELS", "triton")
    else:
        monkeypatch.delenv("PHIFORGE_KERNELS", raising=False)
    return request.param
