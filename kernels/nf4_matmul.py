"""NF4 dequant-matmul: y = x·Wᵀ with W stored in bitsandbytes' NF4 format, never materialised in memory.

Three kernels read the same packed W (how a tile is read: kernels/nf4_tiles.py):

    forward  (decode, M <= 8)   y  = x · Wᵀ      _nf4_gemv_kernel (kernels/nf4_gemv.py)   CUDA cores, split-K
    forward  (prefill/train)    y  = x · Wᵀ      _nf4_gemm_kernel (here)   tiles dequantized in registers -> tl.dot
    backward (dX)               dX = dY · W      _nf4_gemm_kernel, TRANS_W: same packed bytes, no copy of Wᵀ

W is frozen, so the backward needs only dX: for y = x·Wᵀ, dL/dx_mk = Σ_n dL/dy_mn · W_nk, i.e. dX = dY·W. The
transposed GEMM reduces over W's rows instead of its columns; the tile loader is the same.

Each kernel optionally adds a LoRA epilogue  out += s · P · Qᵀ  before its single store, so the adapter costs no
extra pass over the output: forward P = x·Aᵀ (M, r), Q = B (N, r); backward P = dY·B (M, r), Q = Aᵀ (K, r).

Dispatch (`nf4_matmul`, `nf4_matmul_t`): CUDA tensors -> Triton (GEMV if M <= 8 else GEMM); CPU tensors -> torch
(kernels/cpu/nf4.py: a native fused GEMV for decode, dequantize + matmul otherwise); PHIFORGE_KERNELS=triton forces
Triton (the tests run it under TRITON_INTERPRET=1). `method="dequant"` instead dequantizes W into one reused buffer
and calls cuBLAS, so the bench can measure which wins per shape instead of assuming fusion does.

fp32 activations reach tl.dot as TF32 on GPU (Triton's default); the engine trains and decodes in bf16.

Shape legend: M = rows of x (batch·tokens), K = in_features, N = out_features, r = LoRA rank.
Blocks: [BLOCK_M, BLOCK_K] of x, [BLOCK_K, BLOCK_N] of Wᵀ (or of W when TRANS_W), [BLOCK_M, BLOCK_N] of out.
"""
from __future__ import annotations

import os
import threading

import torch
import triton
import triton.language as tl

from phiforge.kernels import nf4_gemv
from phiforge.kernels.aot import aligned, signature
from phiforge.kernels.cpu import nf4 as nf4_cpu
from phiforge.kernels.cpu.linear import matmul_nt
from phiforge.kernels.nf4 import NF4Weight, _nf4_dequantize_kernel, dequantize_nf4_ref
from phiforge.kernels.nf4_gemv import GEMV_CONFIGS, GEMV_MAX_M, gemv_config  # noqa: F401  (re-exported)
from phiforge.kernels.nf4_tiles import (
    AOT_WEIGHT_PTRS, LoRAEpilogue, _grouped_tile, _lora_args, _lora_epilogue, _nf4_load, _nf4_load_pairs,
    _row_aligned, _weight_args, use_triton,
)

# ---------------------------------------------------------------------------------------------------------------
# Shipped configurations: dispatch picks from these and `phiforge kernels report` compiles exactly these.
# ---------------------------------------------------------------------------------------------------------------
# GEMM, keyed by an M bucket: small M (short prompts, micro-batches) wastes less of a 16-row tile. BLOCK_N and
# BLOCK_K divide 64 = the NF4 blocksize, so both the forward and the transposed tiles are ROW_ALIGNED. Two stages:
# the pipeliner also stages the gathered code and scale loads, and three overran sm_86/89's 99 KB of shared memory
# in an earlier version. A 128-row, 8-warp tile was tried and dropped: ptxas capped it at 128 registers and spilled.
GEMM_CONFIGS = {
    "small": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=2, num_stages=2),
    "medium": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2),
}


def gemm_config(M: int) -> dict:
    return GEMM_CONFIGS["small" if M <= 32 else "medium"]


@triton.jit
def _nf4_gemm_kernel(
    a_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, p_ptr, q_ptr, c_ptr,
    M, OUT, RED, K, stride_am, stride_cm, stride_pm, stride_qo, stride_qr, R, scaling, offset,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, TRANS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c (M, OUT) = a (M, RED) · Wᵀ  (OUT = N, RED = K)   or, TRANS_W,  a · W  (OUT = K, RED = N)."""
    pid_m, pid_n = _grouped_tile(M, OUT, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns
    dt = a_ptr.dtype.element_ty
    if ROW_ALIGNED and TRANS_W:
        # dX = dY·W, split by output column parity: dX[:, 0::2] = dY·W[:, 0::2], dX[:, 1::2] = dY·W[:, 1::2]
        rbo = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)  # [BLOCK_N/2] byte columns of W
        acc_even = tl.zeros([BLOCK_M, BLOCK_N // 2], dtype=tl.float32)
        acc_odd = tl.zeros([BLOCK_M, BLOCK_N // 2], dtype=tl.float32)
        for k0 in range(0, RED, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K] reduction index = rows of W
            a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :],
                        mask=(rm[:, None] < M) & (rk[None, :] < RED), other=0.0)  # [BLOCK_M, BLOCK_K]
            # w_hi, w_lo = W[rk, 2*rbo], W[rk, 2*rbo + 1]   [BLOCK_K, BLOCK_N/2] each
            w_hi, w_lo = _nf4_load_pairs(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                                         offset, rk[:, None], rbo[None, :], pid_n * BLOCK_N, rk[:, None] < RED,
                                         rbo[None, :] < OUT // 2, K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
            acc_even = tl.dot(a, w_hi.to(dt), acc_even)
            acc_odd = tl.dot(a, w_lo.to(dt), acc_odd)
        # acc[:, 2j + t] = (acc_even, acc_odd)[t][:, j]   [BLOCK_M, BLOCK_N/2, 2] -> [BLOCK_M, BLOCK_N]
        acc = tl.reshape(tl.join(acc_even, acc_odd), [BLOCK_M, BLOCK_N])
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, RED, BLOCK_K):
            if ROW_ALIGNED:
                # y = x[:, 0::2]·W[:, 0::2]ᵀ + x[:, 1::2]·W[:, 1::2]ᵀ: each packed byte is loaded once
                rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # [BLOCK_K/2] byte columns
                a_mask = (rm[:, None] < M) & (rb[None, :] < RED // 2)
                a_ptrs = a_ptr + rm[:, None] * stride_am + 2 * rb[None, :]
                a_even = tl.load(a_ptrs, mask=a_mask, other=0.0)  # [BLOCK_M, BLOCK_K/2]
                a_odd = tl.load(a_ptrs + 1, mask=a_mask, other=0.0)  # [BLOCK_M, BLOCK_K/2]
                # w_hi, w_lo = W[rn, 2*rb].T, W[rn, 2*rb + 1].T   [BLOCK_K/2, BLOCK_N] each
                w_hi, w_lo = _nf4_load_pairs(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                                             offset, rn[None, :], rb[:, None], k0, rn[None, :] < OUT,
                                             rb[:, None] < RED // 2, K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
                # acc += a_even @ w_hi + a_odd @ w_lo      fp32 products rounded to the activation dtype, as
                acc = tl.dot(a_even, w_hi.to(dt), acc)  # the reference x @ dequantize(W).to(x.dtype).T does
                acc = tl.dot(a_odd, w_lo.to(dt), acc)
            else:
                # any K (blocks may straddle rows): one element per nibble, flat index i = n·K + k
                rk = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K] reduction index
                a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :],
                            mask=(rm[:, None] < M) & (rk[None, :] < RED), other=0.0)  # [BLOCK_M, BLOCK_K]
                if TRANS_W:
                    # w = W[rk, rn]                    [BLOCK_K, BLOCK_N]  (dX = dY · W: reduce over W's rows)
                    w = _nf4_load(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                                  rk[:, None], rn[None, :], (rk[:, None] < RED) & (rn[None, :] < OUT), K,
                                  BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
                else:
                    # w = W[rn, rk].T                  [BLOCK_K, BLOCK_N]  (y = x · Wᵀ: reduce over W's columns)
                    w = _nf4_load(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                                  rn[None, :], rk[:, None], (rn[None, :] < OUT) & (rk[:, None] < RED), K,
                                  BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
                acc = tl.dot(a, w.to(dt), acc)
    if HAS_LORA:
        acc = _lora_epilogue(acc, a_ptr, p_ptr, q_ptr, rm, rn, M, OUT, R, stride_pm, stride_qo, stride_qr, scaling,
                             BLOCK_R)
    c_mask = (rm[:, None] < M) & (rn[None, :] < OUT)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers: check shapes, allocate, launch
# ---------------------------------------------------------------------------------------------------------------

def _gemm(a: torch.Tensor, w: NF4Weight, lora: LoRAEpilogue | None, trans_w: bool) -> torch.Tensor:
    """a (M, K) -> a·Wᵀ (M, N), or with trans_w a (M, N) -> a·W (M, K)."""
    M, red = a.shape
    N, K = w.shape
    out_features = K if trans_w else N
    cfg = dict(gemm_config(M))
    c = torch.empty(M, out_features, dtype=a.dtype, device=a.device)
    (p, q, spm, sqo, sqr, r, s), lcfg = _lora_args(lora, a, out_features, min_block=16)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(out_features, cfg["BLOCK_N"]),)
    _nf4_gemm_kernel[grid](
        a, *_weight_args(w), p, q, c, M, out_features, red, K, a.stride(0), c.stride(0), spm, sqo, sqr, r, s,
        float(w.offset), BLOCKSIZE=w.blocksize, NESTED_BLOCKSIZE=w.nested_blocksize, DOUBLE_QUANT=w.double_quant,
        ROW_ALIGNED=_row_aligned(w, cfg["BLOCK_N"] if trans_w else cfg["BLOCK_K"]), TRANS_W=trans_w, **lcfg, **cfg)
    return c


_BUFFERS: dict[tuple, torch.Tensor] = {}


def dequantize_into_buffer(w: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W (N, K) dequantized into one buffer per (device, dtype, thread), grown to the largest weight and reused, so
    dequant+matmul allocates nothing per call (unsloth's and bitsandbytes' fallback). Valid until the same thread's
    next call; per thread so that a multi-threaded service cannot overwrite a buffer another thread is reading."""
    key = (w.device, dtype, threading.get_ident())
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < w.numel:
        with torch.inference_mode(False):  # a normal tensor even when first needed under inference mode (a
            # generate call), so later in-place fills outside it (training) are allowed
            buf = _BUFFERS[key] = torch.empty(w.numel, dtype=dtype, device=w.device)
    out = buf[: w.numel].view(w.shape)  # (N, K)
    if w.device.type == "cpu" and not use_triton(w.packed):
        return nf4_cpu.dequantize_into(w, out)
    # kernels/nf4.py's kernel, launched into our buffer; no FMA so the scales round as bitsandbytes' do
    exact = {} if os.environ.get("TRITON_INTERPRET") == "1" else {"enable_fp_fusion": False}
    _nf4_dequantize_kernel[(triton.cdiv(w.numel, 1024),)](
        *_weight_args(w), out, w.numel, float(w.offset), BLOCKSIZE=w.blocksize,
        NESTED_BLOCKSIZE=w.nested_blocksize, DOUBLE_QUANT=w.double_quant, BLOCK=1024, **exact)
    return out


def _check(w: NF4Weight, t: torch.Tensor, dim: int, name: str) -> None:
    if not isinstance(w, NF4Weight):
        raise TypeError(f"{name}: expected an NF4Weight, got {type(w).__name__}")
    if t.shape[-1] != w.shape[dim]:
        raise ValueError(f"{name}: input has {t.shape[-1]} features but the NF4 weight {w.shape} expects "
                         f"{w.shape[dim]}")
    if w.numel >= 2**31:
        raise ValueError(f"{name}: NF4 weight {w.shape} has >= 2**31 elements; the kernels index in int32")
    if t.device != w.device:
        raise ValueError(f"{name}: input on {t.device} but the NF4 weight on {w.device}")


def _matmul(a: torch.Tensor, w: NF4Weight, lora: LoRAEpilogue | None, trans_w: bool, method: str) -> torch.Tensor:
    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1]).contiguous()  # (M, K) or (M, N)
    out_features = w.shape[1] if trans_w else w.shape[0]
    if a2.shape[0] == 0:  # an empty batch: no grid to launch
        return a.new_zeros(*lead, out_features)
    if lora is not None:
        lora = LoRAEpilogue(lora.p.reshape(a2.shape[0], -1), lora.q, lora.scaling)  # p (..., r) -> (M, r)
    if method == "dequant" or (method == "auto" and not use_triton(a2)):
        if a2.device.type == "cpu" and method == "auto":
            out = None if trans_w else nf4_cpu.gemv(a2, w)  # decode: the fused native GEMV, when it applies
            if out is None:
                wd = dequantize_into_buffer(w, a2.dtype)  # (N, K)
                out = matmul_nt(a2, wd.T if trans_w else wd)  # (M, K) or (M, N)
        else:
            wd = dequantize_into_buffer(w, a2.dtype)  # (N, K)
            out = a2 @ (wd if trans_w else wd.T)  # (M, K) or (M, N)
        if lora is not None:
            out = out.addmm_(lora.p.to(out.dtype), lora.q.T.to(out.dtype), alpha=lora.scaling)
    elif method in ("auto", "fused"):
        if not trans_w and a2.shape[0] <= GEMV_MAX_M:
            out = nf4_gemv.nf4_gemv(a2, w, lora)
        else:
            out = _gemm(a2, w, lora, trans_w)
    else:
        raise ValueError(f"nf4_matmul: method must be 'auto', 'fused' or 'dequant', got {method!r}")
    return out.view(*lead, out.shape[-1])  # (M, out) -> (..., out)


# ---------------------------------------------------------------------------------------------------------------
# Pure-torch reference (tests and bench import this one)
# ---------------------------------------------------------------------------------------------------------------

def nf4_matmul_ref(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """x (..., K) -> x · dequantize(W)ᵀ (..., N), in x.dtype."""
    return x @ dequantize_nf4_ref(w, x.dtype).T  # (..., K) @ (K, N)


def nf4_matmul_t_ref(dy: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """dy (..., N) -> dy · dequantize(W) (..., K), in dy.dtype."""
    return dy @ dequantize_nf4_ref(w, dy.dtype)  # (..., N) @ (N, K)


# ---------------------------------------------------------------------------------------------------------------
# Public API + autograd (W is frozen: only x gets a gradient)
# ---------------------------------------------------------------------------------------------------------------

class NF4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: NF4Weight, method: str) -> torch.Tensor:
        ctx.w, ctx.method = w, method
        return _matmul(x, w, None, False, method)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        # y = x · Wᵀ  =>  dX = dY · W, read from the same packed W by the transposed GEMM
        return _matmul(dy, ctx.w, None, True, ctx.method), None, None


def nf4_matmul(x: torch.Tensor, w: NF4Weight, lora: LoRAEpilogue | None = None,
               method: str = "auto") -> torch.Tensor:
    """y = x · Wᵀ (+ s · lora.p · lora.qᵀ): x (..., K) -> (..., N). Differentiable in x when lora is None."""
    _check(w, x, 1, "nf4_matmul")
    if x.requires_grad and torch.is_grad_enabled():
        if lora is not None:
            raise ValueError("nf4_matmul: the LoRA epilogue has no autograd; use kernels.lora.lora_linear")
        return NF4Matmul.apply(x, w, method)
    return _matmul(x, w, lora, False, method)


def nf4_matmul_t(dy: torch.Tensor, w: NF4Weight, lora: LoRAEpilogue | None = None,
                 method: str = "auto") -> torch.Tensor:
    """dX = dY · W (+ s · lora.p · lora.qᵀ): dy (..., N) -> (..., K), with no transposed copy of W."""
    _check(w, dy, 0, "nf4_matmul_t")
    return _matmul(dy, w, lora, True, method)


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time specs for `phiforge kernels report`: exactly the configs above, bf16 activations, double-quantized
# absmax (bitsandbytes' default), blocksize 64, with and without the LoRA epilogue at rank <= 16 (BLOCK_R = 16;
# a larger rank compiles BLOCK_R = next_pow2(r), which the report does not cover).
# ---------------------------------------------------------------------------------------------------------------

def aot_specs() -> list[dict]:
    fn = _nf4_gemm_kernel
    ptrs = dict(AOT_WEIGHT_PTRS, a_ptr="*bf16", p_ptr="*bf16", q_ptr="*bf16", c_ptr="*bf16")
    specs = nf4_gemv.aot_specs()
    for lora in (False, True):
        for trans in (False, True):
            for key, cfg in GEMM_CONFIGS.items():
                launch = {k: v for k, v in cfg.items() if not k.startswith("num_")}
                specs.append(dict(
                    kernel="nf4_gemm_t" if trans else "nf4_gemm", config=key + ("+lora" if lora else ""), fn=fn,
                    signature=signature(fn, ptrs, ("scaling", "offset")),
                    constexprs=dict(BLOCKSIZE=64, NESTED_BLOCKSIZE=256, DOUBLE_QUANT=True, ROW_ALIGNED=True,
                                    HAS_LORA=lora, TRANS_W=trans, BLOCK_R=16, **launch),
                    attrs=aligned(fn, list(ptrs) + ["OUT", "RED", "K", "stride_am", "stride_cm"]),
                    options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])))
    return specs
