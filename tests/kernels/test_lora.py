"""Fused LoRA linear (kernels/lora.py): forward and backward against autograd of the pure-torch reference.

W dense and NF4, Triton path (interpreter, PHIFORGE_KERNELS=triton) and torch path, fp32 and fp16, with and
without dropout (the kernel's keep-mask is re-drawn for the reference from the same seed). Tolerances follow
tests/ref_error.py: within twice the reference's own error in the test dtype, measured against fp64.
gradcheck in fp64 covers the hand-written backward on the torch path.
"""
from __future__ import annotations

import pytest
import torch

from phiforge.kernels.lora import DENSE_CONFIGS, dense_config, dropout_mask, lora_linear, lora_linear_ref
from phiforge.kernels.nf4 import quantize_nf4

from ref_error import assert_within_ref_error


def _case(M, N, K, r, nf4, seed=0, blocksize=64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.05
    weight = quantize_nf4(W, blocksize) if nf4 else W
    x = torch.randn(M, K, generator=g)
    A = torch.randn(r, K, generator=g) * 0.1
    B = torch.randn(N, r, generator=g) * 0.1
    dy = torch.randn(M, N, generator=g)
    return weight, x, A, B, dy


def _run(fn, weight, x, A, B, dy, dtype, **kw):
    """Forward + backward of fn in dtype; returns (y, dx, dA, dB)."""
    x, A, B = (t.detach().to(dtype).requires_grad_() for t in (x, A, B))
    w = weight if not isinstance(weight, torch.Tensor) else weight.to(dtype)
    y = fn(x, w, A, B, **kw)
    return (y, *torch.autograd.grad(y, (x, A, B), dy.to(dtype)))


@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_backward_match_reference(kernel_path, M, nf4, dtype, dropout):
    N, K, r, s = 33, 96, 8, 2.0
    weight, x, A, B, dy = _case(M, N, K, r, nf4)

    def kernel(x, w, A, B):
        torch.manual_seed(123)
        return lora_linear(x, w, A, B, s, dropout=dropout, training=True)

    def reference(x, w, A, B):
        torch.manual_seed(123)  # the same keep-mask the kernel drew
        keep = dropout_mask(x.shape, dropout, x.device) if dropout else None
        return lora_linear_ref(x, w, A, B, s, dropout, keep)

    out = _run(kernel, weight, x, A, B, dy, dtype)
    ref = _run(reference, weight, x, A, B, dy, dtype)
    ref64 = _run(reference, weight, x, A, B, dy, torch.float64)
    for o, rd, r64 in zip(out, ref, ref64):  # y, dx, dA, dB
        assert_within_ref_error(o, rd, r64, rel_eps=1e-5)


@pytest.mark.parametrize("nf4", [False, True])
def test_gradcheck_fp64(nf4, monkeypatch, one_thread):
    monkeypatch.delenv("PHIFORGE_KERNELS", raising=False)
    weight, x, A, B, _ = _case(2, 5, 32, 2, nf4, blocksize=32)  # gradcheck: one forward per input element
    w = weight if nf4 else weight.double()
    args = [t.double().requires_grad_() for t in (x, A, B)]
    assert torch.autograd.gradcheck(lambda x, A, B: lora_linear(x, w, A, B, 0.5), args)


def test_eval_mode_ignores_dropout_and_leading_dims(kernel_path):
    weight, x, A, B, _ = _case(6, 17, 64, 4, nf4=False)
    x3 = x.view(2, 3, 64)
    y = lora_linear(x3, weight, A, B, 1.5, dropout=0.5, training=False)
    assert y.shape == (2, 3, 17)
    ref = lora_linear_ref(x3, weight, A, B, 1.5)
    ref64 = lora_linear_ref(x3.double(), weight.double(), A.double(), B.double(), 1.5)
    assert_within_ref_error(y, ref, ref64)


def test_weight_is_frozen_and_lora_grads_keep_their_dtype(kernel_path):
    """fp32 adapters on fp16 activations (the usual mixed set-up): grads come back in each parameter's dtype."""
    weight, x, A, B, dy = _case(3, 17, 64, 4, nf4=False)
    weight.requires_grad_()
    x, A, B = x.half().requires_grad_(), A.requires_grad_(), B.requires_grad_()
    lora_linear(x, weight.half(), A, B, 1.0).backward(dy.half())
    assert x.grad.dtype == torch.float16 and A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    assert weight.grad is None


@pytest.mark.parametrize("M", [1, 17, 40, 300])
def test_every_shipped_dense_config_runs(M, monkeypatch):
    monkeypatch.setenv("PHIFORGE_KERNELS", "triton")
    assert dense_config(M) in DENSE_CONFIGS.values()
    weight, x, A, B, dy = _case(M, 20, 64, 4, nf4=False)
    out = _run(lambda x, w, A, B: lora_linear(x, w, A, B, 1.0), weight, x, A, B, dy, torch.float32)
    ref = _run(lambda x, w, A, B: lora_linear_ref(x, w, A, B, 1.0), weight, x, A, B, dy, torch.float32)
    ref64 = _run(lambda x, w, A, B: lora_linear_ref(x, w, A, B, 1.0), weight, x, A, B, dy, torch.float64)
    for o, rd, r64 in zip(out, ref, ref64):
        assert_within_ref_error(o, rd, r64, rel_eps=1e-5)


def test_bad_shapes_are_named():
    weight, x, A, B, _ = _case(2, 17, 64, 4, nf4=False)
    with pytest.raises(ValueError, match=r"lora_B \(17, 4\)"):
        lora_linear(x, weight, A, B[:, :3], 1.0)
    with pytest.raises(ValueError, match="dropout"):
        lora_linear(x, weight, A, B, 1.0, dropout=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast on CUDA needs a GPU")
def test_autocast_feeds_bf16_to_the_kernels():
    weight, x, A, B, _ = (t.cuda() if isinstance(t, torch.Tensor) else t for t in _case(17, 64, 128, 8, False))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = lora_linear(x, weight, A, B, 1.0)
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_dropout_mask_keeps_one_minus_p_and_follows_the_seed(p):
    shape = (257, 1001)                                          # odd element count: not a multiple of 4
    torch.manual_seed(7)
    a = dropout_mask(shape, p, torch.device("cpu"))
    torch.manual_seed(7)
    b = dropout_mask(shape, p, torch.device("cpu"))
    assert a.shape == shape and a.dtype == torch.bool and torch.equal(a, b)
    n = a.numel()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs((1 - a.float().mean().item()) - p) < 5 * sd + 2 ** -16          # binomial: 5 sigma
    # rows and columns are not correlated (four elements share a 64-bit draw)
    assert abs(a[:, 0::4].float().mean().item() - a[:, 1::4].float().mean().item()) < 10 * sd
