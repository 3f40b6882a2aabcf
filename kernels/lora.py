"""Fused LoRA linear: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ, with W frozen (dense or NF4) and only A, B trained.

         x (M, K)
            │
     ┌──────┴───────┐
     │              │ dropout (LoRA branch only)
  ┌──┴──┐        ┌──┴──┐
  │  W  │ frozen │  A  │ (r, K)   Kaiming init
  │(N,K)│        └──┬──┘
  │     │           │ P = x_d·Aᵀ   (M, r)      r << K: a thin matmul, done by torch
  │     │        ┌──┴──┐
  │     │        │  B  │ (N, r)   zero init: training starts at y = x·Wᵀ
  └──┬──┘        └──┬──┘
     │   x·Wᵀ       │ · s = alpha / r
     └──────( + )───┘        the big GEMM adds s·P·Bᵀ in its epilogue: no second pass over y (M, N)
              │
           y (M, N)

Forward, with x_d = x ⊙ m / (1 - p) (m a Bernoulli(1 - p) keep-mask; x_d = x without dropout):

    P = x_d · Aᵀ                    (M, r)
    y = x · Wᵀ + s · P · Bᵀ          (M, N)      one fused kernel: GEMM with a LoRA epilogue

Backward. With G = dY · B (M, r), differentiate each term of y_ij = Σ_k x_ik W_jk + s Σ_a P_ia B_ja:

    dB = s · dYᵀ · P                (N, r)      ∂y_ij/∂B_ja = s·P_ia
    dP = s · dY · B = s · G         (M, r)
    dA = dPᵀ · x_d = s · Gᵀ · x_d    (r, K)      P_ia = Σ_k x_d,ik A_ak
    dX = dY · W + (s · G · A) ⊙ m / (1 - p)      (M, K)   the mask scales only the LoRA path

dX is again one fused kernel: the transposed GEMM dY·W with the epilogue s·G·A (P = G, Q = Aᵀ). It is the forward
kernel itself, reading W through swapped strides (dense) or with TRANS_W (NF4): no transposed copy of W exists.
With dropout the epilogue would need the mask too, so the LoRA part of dX is added afterwards (an (M, K) pass).
W gets no gradient. Saved for backward: x, the keep-mask (bool), P, A, B — not x_d and not y.

Dispatch: CUDA tensors -> Triton; CPU tensors -> torch; PHIFORGE_KERNELS=triton forces Triton (tests, with
TRITON_INTERPRET=1). NF4 weights go through kernels/nf4_matmul.py's kernels, which carry the same epilogue.
Under torch.autocast on CUDA, inputs are cast to the autocast dtype (bf16) before the kernels see them.

Shape legend: M = rows of x (batch·tokens), K = in_features, N = out_features, r = rank, s = scaling = alpha / r.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.amp import custom_bwd, custom_fwd

from phiforge.kernels.aot import aligned, signature
from phiforge.kernels.cpu.linear import matmul_nt
from phiforge.kernels.nf4 import NF4Weight, dequantize_nf4_ref
from phiforge.kernels.nf4_matmul import nf4_matmul, nf4_matmul_t
from phiforge.kernels.nf4_tiles import LoRAEpilogue, _grouped_tile, _lora_args, _lora_epilogue, use_triton

# Shipped configurations (dispatch picks from these; `phiforge kernels report` compiles exactly these).
DENSE_CONFIGS = {
    "small": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
    "medium": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
    "large": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
}


def dense_config(M: int) -> dict:
    return DENSE_CONFIGS["small" if M <= 32 else "medium" if M <= 256 else "large"]


@triton.jit
def _lora_gemm_kernel(
    a_ptr, w_ptr, p_ptr, q_ptr, c_ptr,
    M, OUT, RED, stride_am, stride_wo, stride_wr, stride_cm, stride_pm, stride_qo, stride_qr, R, scaling,
    HAS_LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c (M, OUT) = a (M, RED) · Wᵀ + s · P · Qᵀ, W[o, k] at w_ptr + o·stride_wo + k·stride_wr.

    Forward: W = weight (N, K), strides (K, 1), Q = B.   Backward dX: W = weightᵀ, strides (1, K), Q = Aᵀ.
    """
    pid_m, pid_n = _grouped_tile(M, OUT, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, RED, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        # a_tile = a[rm, rk]                           [BLOCK_M, BLOCK_K]
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < RED), other=0.0)
        # w_tile = W[rn, rk].T                         [BLOCK_K, BLOCK_N]
        w = tl.load(w_ptr + rn[None, :] * stride_wo + rk[:, None] * stride_wr,
                    mask=(rn[None, :] < OUT) & (rk[:, None] < RED), other=0.0)
        # acc += a_tile @ w_tile
        acc = tl.dot(a, w.to(a.dtype), acc)
    if HAS_LORA:
        acc = _lora_epilogue(acc, a_ptr, p_ptr, q_ptr, rm, rn, M, OUT, R, stride_pm, stride_qo, stride_qr, scaling,
                             BLOCK_R)
    c_mask = (rm[:, None] < M) & (rn[None, :] < OUT)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------

def _dense_lora_gemm(a: torch.Tensor, w: torch.Tensor, lora: LoRAEpilogue | None) -> torch.Tensor:
    """a (M, RED) · wᵀ (+ s·p·qᵀ) with w (OUT, RED) any strides (a transposed view is fine) -> (M, OUT)."""
    M, red = a.shape
    out_features = w.shape[0]
    if w.shape[1] != red:
        raise ValueError(f"lora_linear: input has {red} features, weight {tuple(w.shape)} expects {w.shape[1]}")
    if not use_triton(a) or M == 0:
        c = matmul_nt(a, w)  # (M, OUT)
        return c if lora is None else c.addmm_(lora.p.to(c.dtype), lora.q.T.to(c.dtype), alpha=lora.scaling)
    a = a.contiguous()
    cfg = dict(dense_config(M))
    c = torch.empty(M, out_features, dtype=a.dtype, device=a.device)
    (p, q, spm, sqo, sqr, r, s), lcfg = _lora_args(lora, a, out_features, min_block=16)  # BLOCK_R >= 16: tl.dot
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(out_features, cfg["BLOCK_N"]),)
    _lora_gemm_kernel[grid](a, w, p, q, c, M, out_features, red, a.stride(0), w.stride(0), w.stride(1), c.stride(0),
                            spm, sqo, sqr, r, s, **lcfg, **cfg)
    return c


def _base_forward(x: torch.Tensor, weight, lora: LoRAEpilogue) -> torch.Tensor:
    """x (M, K) -> x·Wᵀ + s·P·Bᵀ (M, N)."""
    if isinstance(weight, NF4Weight):
        return nf4_matmul(x, weight, lora)
    return _dense_lora_gemm(x, weight, lora)


def _base_backward(dy: torch.Tensor, weight, lora: LoRAEpilogue | None) -> torch.Tensor:
    """dy (M, N) -> dY·W + s·G·A (M, K)."""
    if isinstance(weight, NF4Weight):
        return nf4_matmul_t(dy, weight, lora)
    return _dense_lora_gemm(dy, weight.T, lora)  # weight.T: a strided view (K, N), no copy


def dropout_mask(shape: tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """Keep-mask (bool): each element kept with probability 1 - p. The reference draws it the same way.

    Sixteen random bits an element, four elements from one 64-bit draw: torch.rand draws one number an element,
    and on the CPU the generator, not the comparison, is the cost (the masks were a sizeable share of a LoRA
    training step). p is thereby rounded to a multiple of 2^-16 (|error| ≤ 7.6e-6).
    """
    n = math.prod(shape)
    bits = torch.randint(-2**63, 2**63 - 1, (-(-n // 4),), dtype=torch.int64, device=device)
    u = bits.view(torch.int16)[:n].view(shape)       # uniform on [-32768, 32767]
    return u >= round(p * 65536) - 32768


# ---------------------------------------------------------------------------------------------------------------
# Pure-torch reference (tests and bench import this one)
# ---------------------------------------------------------------------------------------------------------------

def lora_linear_ref(x: torch.Tensor, weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    dropout: float = 0.0, keep: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ + s·(x_d·Aᵀ)·Bᵀ in x.dtype, x_d = x ⊙ keep / (1 - dropout) when a keep-mask is given."""
    w = dequantize_nf4_ref(weight, x.dtype) if isinstance(weight, NF4Weight) else weight.to(x.dtype)
    x_d = x if keep is None else x * keep / (1 - dropout)
    return x @ w.T + scaling * ((x_d @ lora_A.to(x.dtype).T) @ lora_B.to(x.dtype).T)  # (..., N)


# ---------------------------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------------------------

class LoRALinear(torch.autograd.Function):
    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, lora_A, lora_B, scaling, dropout, training):
        dtype = x.dtype
        if x.is_cuda and torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")  # the kernels take the autocast dtype (bf16), not fp32
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K).to(dtype)  # (M, K)
        w = weight if isinstance(weight, NF4Weight) else weight.to(dtype)
        A, B = lora_A.to(dtype), lora_B.to(dtype)  # (r, K), (N, r)
        keep = dropout_mask(x2.shape, dropout, x2.device) if training and dropout > 0 else None
        x_d = x2 if keep is None else x2 * keep / (1 - dropout)
        P = x_d @ A.T  # (M, r)
        y = _base_forward(x2, w, LoRAEpilogue(P, B, scaling))  # (M, N)
        ctx.save_for_backward(x2, keep, P, A, B)
        ctx.weight, ctx.scaling, ctx.dropout = w, scaling, dropout
        ctx.dtypes = (x.dtype, lora_A.dtype, lora_B.dtype)
        return y.view(*lead, y.shape[-1])  # (M, N) -> (..., N)

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x2, keep, P, A, B = ctx.saved_tensors
        s, p = ctx.scaling, ctx.dropout
        lead = dy.shape[:-1]
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)  # (M, N)
        G = dy2 @ B  # (M, r)
        dB = s * (dy2.T @ P)  # (N, r)
        x_d = x2 if keep is None else x2 * keep / (1 - p)
        dA = s * (G.T @ x_d)  # (r, K)
        if keep is None:
            dx = _base_backward(dy2, ctx.weight, LoRAEpilogue(G, A.T, s))  # (M, K), LoRA fused in the epilogue
        else:
            dx = _base_backward(dy2, ctx.weight, None)
            dx += (s * (G @ A)) * keep / (1 - p)  # the mask stops the epilogue: one extra (M, K) pass
        x_dt, a_dt, b_dt = ctx.dtypes
        dx = dx.view(*lead, dx.shape[-1]).to(x_dt)  # (M, K) -> (..., K)
        return dx, None, dA.to(a_dt), dB.to(b_dt), None, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor | NF4Weight, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ: x (..., K), W (N, K) dense or NF4, A (r, K), B (N, r) -> (..., N).

    Differentiable in x, lora_A and lora_B; W is frozen."""
    N, K = weight.shape
    r = lora_A.shape[0]
    if x.shape[-1] != K or lora_A.shape != (r, K) or lora_B.shape != (N, r):
        raise ValueError(f"lora_linear: x (..., {K}), lora_A ({r}, {K}), lora_B ({N}, {r}) expected for weight "
                         f"({N}, {K}); got x {tuple(x.shape)}, lora_A {tuple(lora_A.shape)}, "
                         f"lora_B {tuple(lora_B.shape)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_linear: dropout must be in [0, 1), got {dropout}")
    return LoRALinear.apply(x, weight, lora_A, lora_B, float(scaling), float(dropout), bool(training))


def aot_specs() -> list[dict]:
    """The dense fused-LoRA GEMM for `phiforge kernels report`: every config, bf16, forward (W's unit stride along
    the reduction) and backward dX (W read through swapped strides: unit stride along the output). At run time
    Triton specializes a stride of 1 into the code, so each direction is its own compiled kernel; so here."""
    fn = _lora_gemm_kernel
    ptrs = dict(a_ptr="*bf16", w_ptr="*bf16", p_ptr="*bf16", q_ptr="*bf16", c_ptr="*bf16")
    specs = []
    # the forward always carries the adapter; backward dX runs without the epilogue when dropout is on
    variants = (("lora_gemm", "stride_wr", "stride_wo", True), ("lora_gemm_t", "stride_wo", "stride_wr", True),
                ("lora_gemm_t", "stride_wo", "stride_wr", False))
    for name, unit, other, has_lora in variants:
        for key, cfg in DENSE_CONFIGS.items():
            sig = signature(fn, ptrs, ("scaling",))
            sig[unit] = "constexpr"
            launch = {k: v for k, v in cfg.items() if not k.startswith("num_")}
            specs.append(dict(
                kernel=name, config=key + ("+lora" if has_lora else ""), fn=fn, signature=sig,
                constexprs={unit: 1, "HAS_LORA": has_lora, "BLOCK_R": 16, **launch},
                attrs=aligned(fn, list(ptrs) + ["OUT", "RED", "stride_am", "stride_cm", other]),
                options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])))
    return specs
