"""The oneDNN fp32 linear equals the fp64 answer as closely as torch's own (MKL) linear, forward and backward,
on odd shapes and strided operands; everything it does not take falls back to F.linear bit for bit."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from phiforge.kernels.cpu import linear as cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear._HAS_OP, reason="this torch has no oneDNN linear op")


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item()


def _budget(torch_result: torch.Tensor, ref: torch.Tensor) -> float:
    # Summation order differs from MKL's: allow 4x MKL's own error (measured 1-2x), plus a floor for exact cases.
    return 4 * _err(torch_result, ref) + 1e-6 * ref.abs().max().item()


@pytest.mark.parametrize("M,N,K", [(1, 960, 576), (7, 77, 45), (130, 33, 1000), (300, 129, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_backward_match_fp64(M, N, K, bias):
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(2, M, K, generator=g, requires_grad=True)
    w = torch.randn(N, K, generator=g, requires_grad=True)
    b = torch.randn(N, generator=g, requires_grad=True) if bias else None
    dy = torch.randn(2, M, N, generator=g)

    def grads(fn, *args):
        args = [a.detach().clone().requires_grad_(True) if a is not None else None for a in args]
        y = fn(*args)
        y.backward(dy.to(y.dtype))
        return [y] + [a.grad for a in args if a is not None]

    ours = grads(cpu_linear.linear, x, w, b)
    mkl = grads(F.linear, x, w, b)
    ref = grads(F.linear, x.double(), w.double(), b.double() if bias else None)
    for name, o, t, r in zip(["y", "dx", "dw", "db"], ours, mkl, ref):
        assert o.dtype == torch.float32 and o.shape == r.shape, name
        assert _err(o, r) <= _budget(t, r), name


def test_strided_weight_view_is_read_in_place():
    w = torch.randn(50, 70)
    x = torch.randn(9, 50)
    ref = x.double() @ w.double()                                  # (9, 50)·(50, 70)
    got = cpu_linear.matmul_nt(x, w.t())                           # w.t(): a (70, 50) view
    assert _err(got, ref) <= _budget(x @ w, ref)


def test_falls_back_to_torch_exactly():
    w, x = torch.randn(8, 16, dtype=torch.bfloat16), torch.randn(3, 16, dtype=torch.bfloat16)
    assert torch.equal(cpu_linear.linear(x, w), F.linear(x, w))   # bf16 already goes to oneDNN in torch
    wd, xd = w.double(), x.double()
    assert torch.equal(cpu_linear.linear(xd, wd), F.linear(xd, wd))
    cpu_linear.enabled = False
    try:
        w32, x32 = w.float(), x.float()
        assert torch.equal(cpu_linear.linear(x32, w32), F.linear(x32, w32))
    finally:
        cpu_linear.enabled = True
    assert cpu_linear.linear(torch.randn(0, 16), w.float()).shape == (0, 8)


def test_linear_module_is_a_drop_in_for_nn_linear():
    torch.manual_seed(0)
    ref = nn.Linear(33, 17)
    ours = cpu_linear.Linear(33, 17)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(4, 5, 33)
    expect = ref(x.double().float())
    exact = F.linear(x.double(), ref.weight.double(), ref.bias.double())
    assert _err(ours(x), exact) <= _budget(expect, exact)
    with torch.inference_mode():                                  # no autograd: the plain op
        assert _err(ours(x), exact) <= _budget(expect, exact)


def test_strided_3d_input_folds_into_one_gemm():
    """(B, T, K) views (the last position of a prefill, or a strided slice) give F.linear's result."""
    w = torch.randn(300, 48, dtype=torch.bfloat16)
    h = torch.randn(2, 9, 48, dtype=torch.bfloat16)
    for x in (h[:1, -1:], h[:, -1:], h[:, ::2]):                  # (1, 1, 48) odd strides, (2, 1, 48), (2, 5, 48)
        got = cpu_linear.linear(x, w)
        assert got.shape == (*x.shape[:-1], 300)
        assert torch.equal(got, F.linear(x.clone(memory_format=torch.contiguous_format), w))
