"""The native decode GEMV equals torch's linear to rounding, on odd shapes, and falls back where it should."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phiforge.kernels.cpu import gemv as cpu_gemv

LIB = cpu_gemv.LIB  # tests/kernels/conftest.py: every test runs at each tier; skipped only where the CPU cannot


def test_library_builds(tier):
    status = LIB.status()
    assert status.state == "active" and status.detail == tier, str(status)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K", [(960, 576), (77, 45), (5, 33), (3, 16), (130, 1000)])
def test_equals_torch_linear(dtype, N, K):
    g = torch.Generator().manual_seed(N * K)
    w = torch.randn(N, K, generator=g).to(dtype)
    x = torch.randn(1, 1, K, generator=g).to(dtype)
    ref = F.linear(x.double(), w.double())                 # the exact answer
    got = cpu_gemv.linear(x, w)
    assert got.shape == (1, 1, N) and got.dtype == dtype
    # the same error budget as torch's own kernel in this dtype (bf16: output rounding dominates)
    budget = (F.linear(x, w).double() - ref).abs().max().item() * 1.01 + (1e-5 if dtype == torch.float32 else 0)
    assert (got.double() - ref).abs().max().item() <= budget


def test_falls_back_to_torch():
    w = torch.randn(8, 16)
    x = torch.randn(3, 16)                                  # M > 1: torch
    assert torch.equal(cpu_gemv.linear(x, w), F.linear(x, w))
    wt = torch.randn(16, 8).t()                             # non-contiguous weight: torch
    assert not cpu_gemv.supports(wt)
    assert torch.equal(cpu_gemv.linear(x[:1], wt), F.linear(x[:1], wt))
    assert torch.equal(cpu_gemv.linear(x[:1].double(), w.double()), F.linear(x[:1].double(), w.double()))


def test_switched_off_runs_torch():
    w, x = torch.randn(64, 48), torch.randn(1, 48)
    with cpu_gemv.LIB.disabled():
        assert not cpu_gemv.available()
        assert torch.equal(cpu_gemv.linear(x, w), F.linear(x, w))
    assert cpu_gemv.available()
