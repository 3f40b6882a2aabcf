"""NF4 dequant-matmul: y = x·Wᵀ with W stored in bitsandbytes' NF4 format, never materialised in memory.

The math
--------
W (N, K) is flattened row-major; element i = n·K + k lives in nibble i of `packed` (even i: HIGH nibble of byte
i // 2) and shares the scale of its block of `blocksize` consecutive elements:

    W[n, k] = code[nibble(i)] · absmax[i // blocksize]                 fp32 product, as bitsandbytes does
    absmax[b] = nested_code[a8[b]] · nested_absmax[b // 256] + offset    when double-quantized (a8: uint8 codes)

Three kernels read that same packed W:

    forward  (decode, M <= 8)   y  = x · Wᵀ          _nf4_gemv_kernel    CUDA cores, split-K, fp32 atomics
    forward  (prefill/train)    y  = x · Wᵀ          _nf4_gemm_kernel    tiles dequantized in registers -> tl.dot
    backward (dX)               dX = dY · W          _nf4_gemm_kernel    TRANS_W: same packed bytes, no copy of Wᵀ

Each optionally adds a LoRA epilogue  out += s · P · Qᵀ  before the single store, so the adapter costs no extra pass
over the output: forward P = x·Aᵀ (M, r), Q = B (N, r); backward P = dY·B (M, r), Q = Aᵀ (K, r).

Why split-K with atomics in the GEMV: at M <= 8 the work is reading N·K/2 bytes of W, and N/BLOCK_N programs alone
cannot fill a GPU when N is small (down_proj: N = 3072). Splitting K multiplies the programs; their partial sums
are combined by fp32 atomic adds into an (M, N) buffer. The output is a few KB, so atomics cost nothing against W,
and no second launch is needed. The price: summation order varies run to run (fp32, ~1e-7 relative).

Two ways to read W. An aligned tile (K % blocksize == 0, every Phi-3 shape) loads each packed byte once and uses
both nibbles, by splitting the activations by column parity instead of interleaving the weights:

    x·Wᵀ = x[:, 0::2]·W[:, 0::2]ᵀ + x[:, 1::2]·W[:, 1::2]ᵀ          W[:, 0::2] = HIGH nibbles, W[:, 1::2] = low
    dY·W = (dY·W[:, 0::2], dY·W[:, 1::2]) interleaved column by column  (two accumulators, joined at the end)

and fetches one scale per tile row (`_nf4_load_pairs`). Any other K (blocks straddle rows) goes through the flat
index i, one element per nibble (`_nf4_load`). Either way the tile holds the reference's own fp32 products
code·absmax before it meets tl.dot (up to FMA contraction of the double-quant scale on GPU); the code table and
the scales are tiny, L1-resident gathers.

Dispatch (`nf4_matmul`, `nf4_matmul_t`): CUDA tensors -> Triton (GEMV if M <= 8 else GEMM); CPU tensors -> torch
(see kernels/nf4_cpu.py); PHIFORGE_KERNELS=triton forces Triton (the tests run it under TRITON_INTERPRET=1).
`method="dequant"` instead dequantizes W into one reused buffer and calls cuBLAS, so the bench can measure which
wins per shape instead of assuming fusion does.

Shape legend: M = rows of x (batch·tokens), K = in_features, N = out_features, r = LoRA rank.
Blocks: [BLOCK_M, BLOCK_K] of x, [BLOCK_K, BLOCK_N] of Wᵀ (or of W when TRANS_W), [BLOCK_M, BLOCK_N] of out.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from phiforge.kernels import nf4_cpu
from phiforge.kernels.nf4 import NF4Weight, _nf4_dequantize_kernel, dequantize_nf4_ref

# ---------------------------------------------------------------------------------------------------------------
# Shipped configurations: dispatch picks from these and `phiforge kernels report` compiles exactly these.
# ---------------------------------------------------------------------------------------------------------------
# GEMV, keyed by BLOCK_M = next_pow2(M): the [BLOCK_M, BLOCK_N, BLOCK_K] product lives in registers, so BLOCK_N
# shrinks as M grows. Small tiles keep registers low (<= 126 on sm_80, see the report): a memory-bound kernel wants
# many warps resident to keep loads in flight, and split-K restores the program count.
GEMV_CONFIGS = {
    1: dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=2),
    2: dict(BLOCK_M=2, BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=2),
    4: dict(BLOCK_M=4, BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=2),
    8: dict(BLOCK_M=8, BLOCK_N=8, BLOCK_K=64, num_warps=4, num_stages=2),
}
# GEMM, keyed by an M bucket: small M (short prompts, micro-batches) wastes less of a 16-row tile. BLOCK_N and
# BLOCK_K divide 64 = the NF4 blocksize, so both the forward and the transposed tiles are ROW_ALIGNED. Two stages:
# the pipeliner also stages the gathered code and scale loads, and three overran sm_86/89's 99 KB of shared memory
# in an earlier version. A 128-row, 8-warp tile was tried and dropped: ptxas capped it at 128 registers and spilled.
GEMM_CONFIGS = {
    "small": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=2, num_stages=2),
    "medium": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2),
}
GEMV_MAX_M = 8
_TARGET_PROGRAMS = 264  # split-K until ~2 waves on a 128-SM RTX 4090 (2.4 on an A100, 3.2 on an RTX 3090)


def gemv_config(M: int) -> dict:
    return GEMV_CONFIGS[triton.next_power_of_2(M)]


def gemm_config(M: int) -> dict:
    return GEMM_CONFIGS["small" if M <= 32 else "medium"]


class LoRAEpilogue(NamedTuple):
    """Adds scaling · p · qᵀ to the output: p (M, r), q (out_features, r); any strides."""
    p: torch.Tensor
    q: torch.Tensor
    scaling: float


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _nf4_load(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset, rows, cols, mask, K,
              BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """W[rows, cols] in fp32 for broadcastable index tensors rows (into N) and cols (into K). Any K: blocks may
    straddle rows, so everything is addressed through the flat index, one element per nibble."""
    # i = n * K + k                                   flat index (the launcher checks N*K < 2**31)
    i = rows * K + cols
    # byte = packed[i // 2]; q = byte >> 4 if i even else byte & 0xF
    byte = tl.load(packed_ptr + i // 2, mask=mask, other=0).to(tl.int32)
    q = tl.where(i % 2 == 0, byte >> 4, byte & 0xF)
    # value = code[q]                                  16 fp32 values: an L1-resident gather
    value = tl.load(code_ptr + q, mask=mask, other=0.0)
    block = i // BLOCKSIZE
    if DOUBLE_QUANT:
        # scale = nested_code[a8[b]] * nested_absmax[b // 256] + offset
        a8 = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + a8, mask=mask, other=0.0)
        scale = scale * tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0) + offset
    else:
        # scale = absmax[b]
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return value * scale


@triton.jit
def _nf4_load_pairs(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                    rows, byte_cols, col0, row_mask, col_mask, K,
                    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """(W[rows, 2·byte_cols], W[rows, 2·byte_cols + 1]) in fp32: one byte load yields both nibbles.

    Only for ROW_ALIGNED tiles (K % BLOCKSIZE == 0, so K is even and every row starts on a byte boundary).
    The caller splits its activations into even and odd columns to match, instead of interleaving the weights.
    """
    mask = row_mask & col_mask
    # byte = packed[n * K/2 + j]                       HIGH nibble: column 2j, low nibble: column 2j + 1
    byte = tl.load(packed_ptr + rows * (K // 2) + byte_cols, mask=mask, other=0).to(tl.int32)
    hi = tl.load(code_ptr + (byte >> 4), mask=mask, other=0.0)
    lo = tl.load(code_ptr + (byte & 0xF), mask=mask, other=0.0)
    block = (rows * K + col0) // BLOCKSIZE  # one scale per tile row, shaped like rows
    if DOUBLE_QUANT:
        a8 = tl.load(absmax_ptr + block, mask=row_mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + a8, mask=row_mask, other=0.0)
        scale = scale * tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=row_mask, other=0.0) + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=row_mask, other=0.0)
    return hi * scale, lo * scale


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
            # acc += x_even @ w_hi.T + x_odd @ w_lo.T   [BLOCK_M, BLOCK_N, BLOCK_K/2] summed: too few rows for
            acc += tl.sum(x_even[:, None, :] * w_hi[None, :, :] + x_odd[:, None, :] * w_lo[None, :, :], axis=2)
        else:  # tl.dot, so CUDA cores do it
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


@triton.jit
def _nf4_gemm_kernel(
    a_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, p_ptr, q_ptr, c_ptr,
    M, OUT, RED, K, stride_am, stride_cm, stride_pm, stride_qo, stride_qr, R, scaling, offset,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, TRANS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c (M, OUT) = a (M, RED) · Wᵀ  (OUT = N, RED = K)   or, TRANS_W,  a · W  (OUT = K, RED = N)."""
    # Grouped launch order: GROUP_M row-tiles of `a` run over the same column strip of W together, so W's packed
    # bytes come from DRAM once per group and from L2 after (Triton's matmul tutorial, "L2 cache optimizations").
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(OUT, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size

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
        rr = tl.arange(0, BLOCK_R)  # [BLOCK_R], >= 16 for tl.dot; padding is masked to zero
        # acc += s * P[rm] @ Q[rn].T                    [BLOCK_M, BLOCK_R] @ [BLOCK_R, BLOCK_N]
        p = tl.load(p_ptr + rm[:, None] * stride_pm + rr[None, :],
                    mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0).to(a_ptr.dtype.element_ty)
        qt = tl.load(q_ptr + rn[None, :] * stride_qo + rr[:, None] * stride_qr,
                     mask=(rn[None, :] < OUT) & (rr[:, None] < R), other=0.0).to(a_ptr.dtype.element_ty)
        acc += scaling * tl.dot(p, qt)
    c_mask = (rm[:, None] < M) & (rn[None, :] < OUT)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers: check shapes, allocate, launch
# ---------------------------------------------------------------------------------------------------------------

def _weight_args(w: NF4Weight) -> tuple:
    dummy = w.absmax  # pointer slots unused without double quantization
    dq = w.double_quant
    return (w.packed, w.absmax, w.code, w.nested_absmax if dq else dummy, w.nested_code if dq else dummy)


def _lora_args(lora: LoRAEpilogue | None, a: torch.Tensor, out_features: int, min_block: int) -> tuple:
    if lora is None:
        return (a, a, 0, 0, 0, 0, 0.0), dict(HAS_LORA=False, BLOCK_R=min_block)
    p, q, s = lora
    r = q.shape[1]
    if p.shape != (a.shape[0], r) or q.shape != (out_features, r):
        raise ValueError(f"LoRA epilogue expects p ({a.shape[0]}, {r}) and q ({out_features}, {r}), "
                         f"got p {tuple(p.shape)} and q {tuple(q.shape)}")
    p = p.contiguous()
    block_r = max(min_block, triton.next_power_of_2(r))
    return (p, q, p.stride(0), q.stride(0), q.stride(1), r, float(s)), dict(HAS_LORA=True, BLOCK_R=block_r)


def _row_aligned(w: NF4Weight, col_span: int) -> bool:
    """True when every tile row [col0, col0 + col_span) lies inside one absmax block."""
    return w.shape[1] % w.blocksize == 0 and w.blocksize % col_span == 0


def _gemv(x: torch.Tensor, w: NF4Weight, lora: LoRAEpilogue | None) -> torch.Tensor:
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
    """W (N, K) dequantized into one buffer per (device, dtype), grown to the largest weight and reused, so
    dequant+matmul allocates nothing per call (unsloth's and bitsandbytes' fallback). Valid until the next call."""
    key = (w.device, dtype)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < w.numel:
        buf = _BUFFERS[key] = torch.empty(w.numel, dtype=dtype, device=w.device)
    out = buf[: w.numel].view(w.shape)  # (N, K)
    if w.device.type == "cpu" and not _use_triton(w.packed):
        return nf4_cpu.dequantize_into(w, out)
    # kernels/nf4.py's kernel, launched into our buffer; no FMA so the scales round as bitsandbytes' do
    exact = {} if os.environ.get("TRITON_INTERPRET") == "1" else {"enable_fp_fusion": False}
    _nf4_dequantize_kernel[(triton.cdiv(w.numel, 1024),)](
        *_weight_args(w), out, w.numel, float(w.offset), BLOCKSIZE=w.blocksize,
        NESTED_BLOCKSIZE=w.nested_blocksize, DOUBLE_QUANT=w.double_quant, BLOCK=1024, **exact)
    return out


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("PHIFORGE_KERNELS") == "triton"


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
    if lora is not None:
        lora = LoRAEpilogue(lora.p.reshape(a2.shape[0], -1), lora.q, lora.scaling)
    if method == "dequant" or (method == "auto" and not _use_triton(a2)):
        if a2.device.type == "cpu" and method == "auto":
            out = nf4_cpu.matmul(a2, w, trans_w)
        else:
            wd = dequantize_into_buffer(w, a2.dtype)  # (N, K)
            out = a2 @ (wd if trans_w else wd.T)  # (M, K) or (M, N)
        if lora is not None:
            out = out.addmm_(lora.p.to(out.dtype), lora.q.T.to(out.dtype), alpha=lora.scaling)
    elif method in ("auto", "fused"):
        if not trans_w and a2.shape[0] <= GEMV_MAX_M:
            out = _gemv(a2, w, lora)
        else:
            out = _gemm(a2, w, lora, trans_w)
    else:
        raise ValueError(f"nf4_matmul: method must be 'auto', 'fused' or 'dequant', got {method!r}")
    return out.view(*lead, out.shape[-1])


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
    from phiforge.kernels.report import aligned, signature

    weight = dict(packed_ptr="*u8", absmax_ptr="*u8", code_ptr="*fp32", nested_absmax_ptr="*fp32",
                  nested_code_ptr="*fp32")
    specs = []
    for lora in (False, True):
        suffix = "+lora" if lora else ""
        for key, cfg in GEMV_CONFIGS.items():
            fn = _nf4_gemv_kernel
            ptrs = dict(weight, x_ptr="*bf16", p_ptr="*bf16", q_ptr="*bf16", out_ptr="*fp32")
            launch = {k: v for k, v in cfg.items() if not k.startswith("num_")}
            specs.append(dict(
                kernel="nf4_gemv", config=f"M<={key}{suffix}", fn=fn,
                signature=signature(fn, ptrs, ("scaling", "offset")),
                constexprs=dict(BLOCKSIZE=64, NESTED_BLOCKSIZE=256, DOUBLE_QUANT=True, ROW_ALIGNED=True, HAS_LORA=lora,
                                BLOCK_R=16, **launch),
                attrs=aligned(fn, list(ptrs) + ["K", "K_PER_SPLIT", "stride_xm"]),
                options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])))
        for trans in (False, True):
            for key, cfg in GEMM_CONFIGS.items():
                fn = _nf4_gemm_kernel
                ptrs = dict(weight, a_ptr="*bf16", p_ptr="*bf16", q_ptr="*bf16", c_ptr="*bf16")
                launch = {k: v for k, v in cfg.items() if not k.startswith("num_")}
                specs.append(dict(
                    kernel="nf4_gemm_t" if trans else "nf4_gemm", config=f"{key}{suffix}", fn=fn,
                    signature=signature(fn, ptrs, ("scaling", "offset")),
                    constexprs=dict(BLOCKSIZE=64, NESTED_BLOCKSIZE=256, DOUBLE_QUANT=True, ROW_ALIGNED=True, HAS_LORA=lora,
                                    TRANS_W=trans, BLOCK_R=16, **launch),
                    attrs=aligned(fn, list(ptrs) + ["OUT", "RED", "K", "stride_am", "stride_cm"]),
                    options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])))
    return specs
