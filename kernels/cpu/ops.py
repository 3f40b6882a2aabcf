"""RMSNorm, SwiGLU and RoPE for CPU inference, each one pass in C instead of four to seven torch ops.

The torch forms of these (upcast, pow, mean, rsqrt, mul, downcast, mul; chunk, silu, mul) are a sizeable share of
a bf16 prefill: every op streams the whole (T, C) or (T, I) activation through memory, and the bf16 ones convert
on each pass. Fused, each element is read once and written once (bench/bench_cpu_kernels.py measures them):

    RMSNorm   y = R(w · R(x · rsqrt(mean(x²) + eps)))      statistics in fp32, transformers' order and roundings
    SwiGLU    y = R(u · R(g · 1 / (1 + exp(−g))))          (g, u) = the two halves of gate_up; exp: csrc/simd.h
    RoPE      y = R(R(x·cos) + R(rot(x)·sin))              rot(x) = (−x₂, x₁) on the first rd dims, the rest
                                                           copied; written straight into a strided destination
                                                           (the KV cache)

R(v) rounds to the activation dtype (identity for fp32, round-to-nearest-even for bf16), at the places torch
rounds, so the results equal the torch forms up to summation order (the mean) and exp's last ulp
(tests/kernels/cpu/test_ops.py; RoPE has no sum or exp, so it is bit-equal). The C is csrc/ops.c; rows split
over the OpenMP threads. Training and anything else keep the torch forms: these functions fall back to them under
autograd, on other devices and dtypes, or where the library cannot run (kernels/cpu/native.py).

Legend: B batch, T rows (tokens), h heads, hs head dim, rd rotary dims, C hidden size, I intermediate size.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from phiforge.kernels.cpu import native

P, L, I, Fl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
LIB = native.NativeLib("cpu_ops", "ops.c", tiers=("avx512", "avx2"), functions={
    "rms_norm": (None, [P, P, P, L, I, Fl, I, I]),
    "swiglu": (None, [P, P, L, I, I, I]),
    "rotary": (None, [P, L, L, L, P, P, P, L, L, L] + [I] * 7),
})


def _native(*ts: torch.Tensor) -> ctypes.CDLL | None:
    """The library when these tensors can take the native form, else None."""
    x = ts[0]
    ok = (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
          and all(t.dtype == x.dtype and t.is_contiguous() for t in ts)
          and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)))
    return LIB.get() if ok else None


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Statistics in fp32, then back to the input dtype *before* the weight: transformers' order, bit for bit.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., C), weight (C,) → (..., C): native for fp32/bf16 CPU inference, else `rms_norm_ref`."""
    if tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} for x {tuple(x.shape)}: expected ({x.shape[-1]},)")
    lib = _native(x, weight)
    if lib is None:
        return rms_norm_ref(x, weight, eps)
    y = torch.empty_like(x)
    C = x.shape[-1]
    lib.rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // C, C, eps,
                  int(x.dtype == torch.bfloat16), torch.get_num_threads())
    return y


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)  # (..., I) each; the gate is the first half
    return up * F.silu(gate)             # Phi3MLP's formula


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2I) → up · silu(gate) (..., I): native for fp32/bf16 CPU inference, else `swiglu_ref`."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu: gate_up {tuple(gate_up.shape)}: the last dim must be even (gate | up)")
    lib = _native(gate_up)
    if lib is None:
        return swiglu_ref(gate_up)
    inter = gate_up.shape[-1] // 2
    y = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype)                 # (..., I)
    lib.swiglu(gate_up.data_ptr(), y.data_ptr(), gate_up.numel() // (2 * inter), inter,
                int(gate_up.dtype == torch.bfloat16), torch.get_num_threads())
    return y


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, h, T, hs); cos/sin (B, T, rd). Rotates the first rd dims by halves, passes the rest through."""
    rd = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, rd)
    xr, xp = x[..., :rd], x[..., rd:]
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((xr * cos + rotated * sin, xp), dim=-1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, h, T, hs), cos/sin (B, T, rd) → RoPE(x) (B, h, T, hs), written into `out` when given (any strides
    with dense head dims, e.g. a KV-cache slice). Native for fp32/bf16 CPU inference, else `rotary_ref`."""
    if not (x.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape and cos.shape[0] in (1, x.shape[0])
            and cos.shape[1] == x.shape[2] and cos.shape[2] % 2 == 0 and cos.shape[2] <= x.shape[3]
            and (out is None or out.shape == x.shape)):
        raise ValueError(f"rotary: x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
                         f"{'' if out is None else f', out {tuple(out.shape)}'}: expected x (B, h, T, hs), cos and "
                         "sin (B or 1, T, rd) with rd even and <= hs, out shaped like x")
    B, H, T, hs = x.shape
    # anything else (a cache of another dtype, broadcast cos/sin, autograd) takes the torch form, and copy_
    # converts into `out` as an assignment would
    fits = (x.stride(-1) == 1 and cos.shape[:2] == (B, T) and x.dtype == cos.dtype
            and (out is None or (out.stride(-1) == 1 and out.dtype == x.dtype)))
    lib = _native(cos, sin) if fits and not (torch.is_grad_enabled() and x.requires_grad) else None
    if lib is None:
        y = rotary_ref(x, cos, sin)
        return y if out is None else out.copy_(y)
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    lib.rotary(x.data_ptr(), *x.stride()[:3], cos.data_ptr(), sin.data_ptr(), y.data_ptr(), *y.stride()[:3],
                B, H, T, hs, cos.shape[-1], int(x.dtype == torch.bfloat16), torch.get_num_threads())
    return y
