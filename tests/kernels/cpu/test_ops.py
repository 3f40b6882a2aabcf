"""The native RMSNorm, SwiGLU and RoPE equal their torch forms: fp32 to fp32 rounding (RoPE bit for bit), bf16 no
further from an fp32 reference than torch's own bf16 form; odd widths (tails of a 16-lane vector); extreme SiLU
inputs; autograd and other dtypes take the torch forms."""
from __future__ import annotations

import pytest
import torch

from phiforge.kernels.cpu import native, ops as cpu_ops
from phiforge.kernels.cpu.ops import rms_norm, rms_norm_ref, rotary, rotary_ref, swiglu, swiglu_ref

LIB = cpu_ops.LIB  # tests/kernels/conftest.py: every test runs at each tier; skipped only where the CPU cannot


def test_library_builds(tier):
    status = LIB.status()
    assert status.state == "active" and status.detail == tier, str(status)


def _check(got: torch.Tensor, torch_form: torch.Tensor, exact: torch.Tensor) -> None:
    assert got.shape == torch_form.shape and got.dtype == torch_form.dtype
    err, budget = (got.double() - exact).abs().max().item(), (torch_form.double() - exact).abs().max().item()
    if got.dtype == torch.float32:
        assert err <= 2 * budget + 1e-6 * exact.abs().max().item()
    else:  # bf16: the same roundings in the same places; an ulp of difference may flip one rounding
        assert err <= budget + 2 ** -8 * exact.abs().max().item()
        assert (got != torch_form).float().mean().item() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 576), (5, 40), (1, 1, 17), (2, 3072)])
def test_rms_norm(dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    with torch.inference_mode():
        got, ref = rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5)
    _check(got, ref, rms_norm_ref(x.double(), w.double(), 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 2 * 1536), (5, 2 * 20), (1, 2 * 9)])
def test_swiglu(dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    gu = (torch.randn(*shape, generator=g) * 4).to(dtype)
    gu.view(-1)[:4] = torch.tensor([-100.0, 100.0, -1e-3, 0.0]).to(dtype)      # saturated and tiny gates
    with torch.inference_mode():
        got, ref = swiglu(gu), swiglu_ref(gu)
    _check(got, ref, swiglu_ref(gu.double()))


def test_torch_forms_under_autograd_and_for_other_dtypes():
    x = torch.randn(4, 24, requires_grad=True)
    w = torch.rand(24)
    y = rms_norm(x, w, 1e-6)
    y.sum().backward()                                            # the torch form ran: autograd works
    assert x.grad is not None and torch.equal(y, rms_norm_ref(x, w, 1e-6))
    assert torch.equal(swiglu(x.detach().double()), swiglu_ref(x.detach().double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,h,T,hs,rd", [(1, 9, 37, 64, 64), (2, 3, 5, 96, 64), (1, 2, 3, 40, 24), (2, 1, 1, 8, 8)])
def test_rotary_bit_equal_into_strided_out(dtype, B, h, T, hs, rd):
    """No sum and no exp: the native RoPE equals transformers' op order bit for bit, including the pass-through
    dims past rd (partial rotary), from a strided (B, T, h, hs)-transposed input into a KV-cache slice."""
    g = torch.Generator().manual_seed(T * hs + rd)
    x = (torch.randn(B, T, h, hs, generator=g) * 3).to(dtype).transpose(1, 2)       # (B, h, T, hs), strided
    ang = torch.rand(B, T, rd // 2, generator=g) * 50
    cos, sin = (torch.cat((f(ang), f(ang)), -1).to(dtype) for f in (torch.cos, torch.sin))  # (B, T, rd)
    ref = rotary_ref(x, cos, sin)
    cache = torch.full((B, h, T + 4, hs), float("nan"), dtype=dtype)
    with torch.inference_mode():
        got = rotary(x, cos, sin)
        into = rotary(x, cos, sin, out=cache[:, :, 2:2 + T])
    assert got.dtype == dtype and torch.equal(got, ref) and torch.equal(into, ref)
    assert torch.equal(cache[:, :, 2:2 + T], ref) and cache[:, :, :2].isnan().all() and cache[:, :, 2 + T:].isnan().all()


def test_rotary_other_cases_take_torch_form():
    """Autograd, cos/sin broadcast over the batch, and a destination of another dtype (a fp32 cache for a bf16
    model) take the torch form, converting into `out` as an assignment does."""
    x = torch.randn(1, 2, 3, 8, requires_grad=True)
    cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    rotary(x, cos, sin).sum().backward()
    assert x.grad is not None
    xb = torch.randn(4, 2, 3, 8)
    with torch.inference_mode():
        assert torch.equal(rotary(xb, cos, sin), rotary_ref(xb, cos, sin))       # cos/sin (1, T, rd) broadcast
        x16, c16, s16 = (t.to(torch.bfloat16) for t in (xb, cos.expand(4, 3, 8), sin.expand(4, 3, 8)))
        out = torch.zeros(4, 2, 3, 8)
        rotary(x16, c16.contiguous(), s16.contiguous(), out=out)
        assert torch.equal(out, rotary_ref(x16, c16, s16).float())


def test_bad_shapes_are_errors_not_memory_reads():
    with torch.inference_mode():
        with pytest.raises(ValueError, match="rms_norm"):
            rms_norm(torch.randn(3, 16), torch.ones(8), 1e-5)
        with pytest.raises(ValueError, match="swiglu"):
            swiglu(torch.randn(3, 15))
        x, cos = torch.randn(1, 2, 5, 8), torch.randn(1, 5, 16)              # rd 16 > hs 8
        with pytest.raises(ValueError, match="rotary"):
            rotary(x, cos, cos)
        with pytest.raises(ValueError, match="rotary"):
            rotary(x, cos[..., :8], cos[..., :6])                            # sin unlike cos
        with pytest.raises(ValueError, match="rotary"):
            rotary(x, cos[..., :8], cos[..., :8], out=torch.empty(1, 2, 4, 8))  # out unlike x
