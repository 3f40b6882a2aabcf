"""Dense fp32 linear on the CPU through oneDNN instead of MKL: y = x·Wᵀ (+ b), forward and backward.

torch sends an fp32 `F.linear` on the CPU to MKL's sgemm, and MKL on an AMD CPU runs its AVX2 code path, where
oneDNN runs its AVX-512 kernels (bench/bench_cpu_kernels.py measures both). bf16 already goes to oneDNN, so only
fp32 is routed here. The op is `torch.ops.mkldnn._linear_pointwise`, the one torch's own compiler emits for CPU linears;
it takes plain dense tensors, any strides, so a transposed weight view needs no copy.

The math, with x (M, K), W (N, K), dy (M, N):

    y  = x·Wᵀ + b          forward
    dx = dy·W              = linear(dy, Wᵀ): Wᵀ is a (K, N) strided view, read in place
    dW = dyᵀ·x             = linear(dyᵀ, xᵀ), only when W is trainable
    db = Σ_m dy[m]

Summation order differs from MKL's, so results agree to fp32 rounding, not bit for bit (tests/kernels/cpu/test_linear.py
holds both to the same error against an fp64 reference). Anything that is not an fp32 CPU tensor, or a torch
without the op, runs `F.linear`. `Linear` is an `nn.Linear` with this forward: same parameters, same state-dict
keys, so the model's projections use it with nothing else changed.

Legend: M rows, K in_features, N out_features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

enabled = True  # a switch for A/B measurements (bench/bench_train.py --ablations)


def _op():
    return getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


_HAS_OP = torch.backends.mkldnn.is_available() and _op() is not None


def supports(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (enabled and _HAS_OP and x.device.type == "cpu" and x.dtype == torch.float32
            and w.dtype == torch.float32 and x.numel() > 0 and w.dim() == 2)


def matmul_nt(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) · w (N, K)ᵀ (+ bias) → (..., N), no autograd. w may be any strided view (e.g. a transpose)."""
    if not supports(x, w):
        return F.linear(x, w, bias)
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias):
        ctx.save_for_backward(x, w)
        ctx.has_bias = bias is not None
        return matmul_nt(x, w, bias)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = dw = db = None
        dy2 = dy.reshape(-1, dy.shape[-1])                                  # (M, N)
        if ctx.needs_input_grad[0]:
            dx = matmul_nt(dy, w.t())                                       # (..., N)·(N, K) → (..., K)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])                                 # (M, K)
            dw = matmul_nt(dy2.t(), x2.t())                                 # (N, M)·(M, K) → (N, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)                                                 # (N,)
        return dx, dw, db


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through oneDNN for fp32 CPU tensors (with autograd)."""
    if not supports(x, w):
        if x.dim() > 2:
            # F.linear on a (B, T, K) view whose size-1 dims carry odd strides (the last position of a prefill,
            # h[:, -1:], counts as contiguous) runs a batched matmul that first copies the whole transposed
            # weight, many times the cost of the product itself for a large weight (the lm_head). Folding to 2-D
            # avoids it.
            return F.linear(x.reshape(-1, x.shape[-1]), w, bias).view(*x.shape[:-1], w.shape[0])  # (..., N)
        return F.linear(x, w, bias)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad)):
        return _LinearFn.apply(x, w, bias)
    return matmul_nt(x, w, bias)


def is_plain(module: nn.Module) -> bool:
    """An nn.Linear (or the Linear below) without bias or hooks: its forward is exactly x·Wᵀ, so a kernel may
    read its weight instead of calling it."""
    return (type(module) in (nn.Linear, Linear) and module.bias is None and not module._forward_hooks
            and not module._forward_pre_hooks)


class Linear(nn.Linear):
    """nn.Linear whose forward is `linear` above (a drop-in: same parameters and state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
