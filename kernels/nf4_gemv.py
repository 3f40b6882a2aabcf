"""NF4 dequant-GEMV for decode (M <= 8): y = x·Wᵀ on CUDA cores, split-K, straight from the packed bytes.

At M <= 8 a tensor-core tile (16 rows at least) would be mostly padding, and the work is reading N·K/2 bytes of W
once: each program dequantizes a [BLOCK_N, BLOCK_K] tile in registers and reduces the [BLOCK_M, BLOCK_N, BLOCK_K]
product with tl.sum.

Why split-K, and why atomics: N/BLOCK_N programs alone cannot fill a GPU when N is small (down_proj: N = 3072,
96 programs for 82-128 SMs). Splitting K multiplies the programs; their partial sums are combined by fp32 atomic
adds into a zeroed (M, N) buffer. The output is a few KB, so the atomics cost nothing next to W's megabytes. The
alternative, a (SPLIT_K, M, N) workspace summed by a second launch, is deterministic but adds a launch (a few µs,
the order of a whole decode GEMV on a small layer). The price of atomics: the fp32 summation order varies from run
to run (~1e-7 relative), and the (M, N) fp32 result is cast to x's dtype afterwards (M·N elements, negligible).

Shape legend: M = rows of x (<= 8), K = in_features, N = out_features, r = LoRA rank.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from phiforge.kernels.aot import aligned, signature
from phiforge.kernels.nf4 import NF4Weight
from phiforge.kernels.nf4_tiles import (
    AOT_WEIGHT_PTRS, LoRAEpilogue, _lora_args, _nf4_load, _nf4_load_pairs, _row_aligned, _weight_args,
)

# GEMV, keyed by BLOCK_M = next_pow2(M): the [BLOCK_M, BLOCK_N, BLOCK_K] product lives in registers, so BLOCK_N
# shrinks as M grows. Small tiles keep registers low (<= 126 on sm_80, see the report): a memory-bound kernel wants
# many warps resident to keep loads in flight, and split-K restores the program count.
GEMV_CONFIGS = {
    1: dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=2),
    2: dict(BLOCK_M=2, BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=2),
    4: dict(BLOCK_M=4, BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=2),
    8: dict(BLOCK_M=8, BLOCK_N=8, BLOCK_K=64, num_warps=4, num_stages=2),
}
GEMV_MAX_M = 8
_TARGET_PROGRAMS = 264  # split-K until ~2 waves on a 128-SM RTX 4090 (2.4 on an A100, 3.2 on an RTX 3090)


def gemv_config(M: int) -> dict:
    return GEMV_CONFIGS[triton.next_power_of_2(M)]


@triton.jit
def _nf4_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, p_ptr, q_ptr, out_ptr,
    M, N, K, K_PER_SPLIT, stride_xm, stride_pm, stride_qn, stride_qr, R, scaling, offset,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out[M, N] (fp32, zeroed) += x[:, kslice] · W[nslice, kslice]ᵀ; grid (cdiv(N, BLOCK_N), SPLIT_K)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)  # [BLOCK_M]: all of x's rows (M <= 8)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        col0 = pid_k * K_PER_SPLIT + k0
        if ROW_ALIGNED:
            # x·Wᵀ = x[:, 0::2]·W[:, 0::2]ᵀ + x[:, 1::2]·W[:, 1::2]ᵀ: each packed byte is loaded once
            rb = col0 // 2 + tl.arange(0, BLOCK_K // 2)  # [BLOCK_K/2] byte columns
            w_hi, w_lo = _nf4_load_pairs(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                                         offset, rn[:, None], rb[None, :], col0, rn[:, None] < N,
                                         rb[None, :] < K // 2, K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
            # x_even, x_odd = x[:, 2*rb], x[:, 2*rb + 1]  [BLOCK_M, BLOCK_K/2]
            x_mask = (rm[:, None] < M) & (rb[None, :] < K // 2)
            x_ptrs = x_ptr + rm[:, None] * stride_xm + 2 * rb[None, :]
            x_even = tl.load(x_ptrs, mask=x_mask, other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptrs + 1, mask=x_mask, other=0.0).to(tl.float32)
            # acc += x_even @ w_hi.T + x_odd @ w_lo.T   [BLOCK_M, BLOCK_N, BLOCK_K/2] summed on CUDA cores
            acc += tl.sum(x_even[:, None, :] * w_hi[None, :, :] + x_odd[:, None, :] * w_lo[None, :, :], axis=2)
        else:  # any K (blocks may straddle rows): one element per nibble through the flat index
            rk = col0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            # w = W[rn, rk]                            [BLOCK_N, BLOCK_K]
            w = _nf4_load(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                          rn[:, None], rk[None, :], (rn[:, None] < N) & (rk[None, :] < K), K,
                          BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
            # x_tile = x[:, rk]                        [BLOCK_M, BLOCK_K]
            x_mask = (rm[:, None] < M) & (rk[None, :] < K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=x_mask, other=0.0).to(tl.float32)
            # acc += x_tile @ w.T                      [BLOCK_M, BLOCK_N, BLOCK_K] summed over K
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if HAS_LORA:
        if pid_k == 0:  # exactly one split adds the adapter term
            rr = tl.arange(0, BLOCK_R)  # [BLOCK_R]
            # acc += s * P[rm] @ Q[rn].T                [BLOCK_M, BLOCK_R] x [BLOCK_N, BLOCK_R]
            p = tl.load(p_ptr + rm[:, None] * stride_pm + rr[None, :],
                        mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0).to(tl.float32)
            q = tl.load(q_ptr + rn[:, None] * stride_qn + rr[None, :] * stride_qr,
                        mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0).to(tl.float32)
            acc += scaling * tl.sum(p[:, None, :] * q[None, :, :], axis=2)
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.atomic_add(out_ptr + rm[:, None] * N + rn[None, :], acc, mask=out_mask)


def nf4_gemv(x: torch.Tensor, w: NF4Weight, lora: LoRAEpilogue | None) -> torch.Tensor:
    """x (M <= 8, K) contiguous -> (M, N) in x.dtype."""
    M, K = x.shape
    N = w.shape[0]
    cfg = dict(gemv_config(M))
    out = torch.zeros(M, N, dtype=torch.float32, device=x.device)  # fp32 atomics target
    n_tiles = triton.cdiv(N, cfg["BLOCK_N"])
    k_blocks = triton.cdiv(K, cfg["BLOCK_K"])
    split_k = max(1, min(k_blocks, triton.cdiv(_TARGET_PROGRAMS, n_tiles)))
    k_per_split = triton.cdiv(k_blocks, split_k) * cfg["BLOCK_K"]
    split_k = triton.cdiv(K, k_per_split)  # no empty splits
    (p, q, spm, sqn, sqr, r, s), lcfg = _lora_args(lora, x, N, min_block=16)  # 16: what the report compiles
    _nf4_gemv_kernel[(n_tiles, split_k)](
        x, *_weight_args(w), p, q, out, M, N, K, k_per_split, x.stride(0), spm, sqn, sqr, r, s, float(w.offset),
        BLOCKSIZE=w.blocksize, NESTED_BLOCKSIZE=w.nested_blocksize, DOUBLE_QUANT=w.double_quant,
        ROW_ALIGNED=_row_aligned(w, cfg["BLOCK_K"]), **lcfg, **cfg)
    return out.to(x.dtype)


def aot_specs() -> list[dict]:
    """For `phiforge kernels report`: every config above, bf16 x, double-quantized blocksize-64 W (bitsandbytes'
    default, aligned), with and without the LoRA epilogue at rank <= 16 (BLOCK_R = 16)."""
    fn = _nf4_gemv_kernel
    ptrs = dict(AOT_WEIGHT_PTRS, x_ptr="*bf16", p_ptr="*bf16", q_ptr="*bf16", out_ptr="*fp32")
    specs = []
    for lora in (False, True):
        for key, cfg in GEMV_CONFIGS.items():
            launch = {k: v for k, v in cfg.items() if not k.startswith("num_")}
            specs.append(dict(
                kernel="nf4_gemv", config=f"M<={key}" + ("+lora" if lora else ""), fn=fn,
                signature=signature(fn, ptrs, ("scaling", "offset")),
                constexprs=dict(BLOCKSIZE=64, NESTED_BLOCKSIZE=256, DOUBLE_QUANT=True, ROW_ALIGNED=True,
                                HAS_LORA=lora, BLOCK_R=16, **launch),
                attrs=aligned(fn, list(ptrs) + ["K", "K_PER_SPLIT", "stride_xm"]),
                options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])))
    return specs
