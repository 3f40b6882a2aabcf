"""Reading a tile of an NF4 weight inside a Triton kernel: the part every NF4 kernel here shares.

W (N, K) is flattened row-major; element i = n·K + k lives in nibble i of `packed` (even i: HIGH nibble of byte
i // 2) and shares the scale of its block of `blocksize` consecutive elements:

    W[n, k] = code[nibble(i)] · absmax[i // blocksize]                 fp32 product, as bitsandbytes does
    absmax[b] = nested_code[a8[b]] · nested_absmax[b // 256] + offset    when double-quantized (a8: uint8 codes)

Two ways to read W. An aligned tile (K % blocksize == 0, every Phi-3 shape) loads each packed byte once and uses
both nibbles, by splitting the activations by column parity instead of interleaving the weights:

    x·Wᵀ = x[:, 0::2]·W[:, 0::2]ᵀ + x[:, 1::2]·W[:, 1::2]ᵀ          W[:, 0::2] = HIGH nibbles, W[:, 1::2] = low
    dY·W = (dY·W[:, 0::2], dY·W[:, 1::2]) interleaved column by column  (two accumulators, joined at the end)

and fetches one scale per tile row (`_nf4_load_pairs`). Any other K (blocks straddle rows) goes through the flat
index i, one element per nibble (`_nf4_load`). Either way the tile holds the reference's own fp32 products
code·absmax before it meets tl.dot (up to FMA contraction of the double-quant scale on GPU); the code table and
the scales are tiny, L1-resident gathers.

Host side: `LoRAEpilogue` (the optional out += s·P·Qᵀ every kernel can add before its store) and the helpers that
turn an NF4Weight and an epilogue into kernel arguments.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from phiforge.kernels.nf4 import NF4Weight


@triton.jit
def _nf4_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask,
               NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """absmax[block] in fp32, shaped like `block`: stored, or rebuilt from its uint8 code when double-quantized."""
    # one return after a constexpr if/else: only the taken branch is compiled (absmax is uint8 codes or fp32)
    if DOUBLE_QUANT:
        # scale = nested_code[a8[b]] * nested_absmax[b // 256] + offset
        a8 = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + a8, mask=mask, other=0.0)
        scale = scale * tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0) + offset
    else:
        # scale = absmax[b]
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


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
    scale = _nf4_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, i // BLOCKSIZE, mask,
                       NESTED_BLOCKSIZE, DOUBLE_QUANT)
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
    scale = _nf4_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, row_mask,
                       NESTED_BLOCKSIZE, DOUBLE_QUANT)
    return hi * scale, lo * scale


@triton.jit
def _grouped_tile(M, OUT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped launch order: GROUP_M row-tiles of `a` run over the same column
    strip of W together, so W comes from DRAM once per group and from L2 after (Triton's matmul tutorial)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(OUT, BLOCK_N)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size
    return pid_m, pid_n


@triton.jit
def _lora_epilogue(acc, a_ptr, p_ptr, q_ptr, rm, rn, M, OUT, R, stride_pm, stride_qo, stride_qr, scaling,
                   BLOCK_R: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += s · P[rm] @ Q[rn]ᵀ, in the activations' dtype (a_ptr's) for tl.dot."""
    rr = tl.arange(0, BLOCK_R)  # [BLOCK_R], >= 16 for tl.dot; the padding is masked to zero
    # P[rm]                                             [BLOCK_M, BLOCK_R]
    p = tl.load(p_ptr + rm[:, None] * stride_pm + rr[None, :],
                mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0).to(a_ptr.dtype.element_ty)
    # Q[rn].T                                           [BLOCK_R, BLOCK_N]
    qt = tl.load(q_ptr + rn[None, :] * stride_qo + rr[:, None] * stride_qr,
                 mask=(rn[None, :] < OUT) & (rr[:, None] < R), other=0.0).to(a_ptr.dtype.element_ty)
    return acc + scaling * tl.dot(p, qt)


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------

def use_triton(t: torch.Tensor) -> bool:
    """The dispatch rule: CUDA tensors -> Triton; CPU tensors -> torch unless PHIFORGE_KERNELS=triton, which needs
    the interpreter (a CPU tensor handed to a compiled kernel fails deep inside the launcher)."""
    if t.is_cuda:
        return True
    if os.environ.get("PHIFORGE_KERNELS") != "triton":
        return False
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("PHIFORGE_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1, set before triton "
                           "is first imported")
    return True


class LoRAEpilogue(NamedTuple):
    """Adds scaling · p · qᵀ to the output: p (M, r), q (out_features, r); any strides."""
    p: torch.Tensor
    q: torch.Tensor
    scaling: float


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


# Pointer types of an NF4Weight's tensors in `phiforge kernels report` signatures (double-quantized: uint8 absmax)
AOT_WEIGHT_PTRS = dict(packed_ptr="*u8", absmax_ptr="*u8", code_ptr="*fp32", nested_absmax_ptr="*fp32",
                       nested_code_ptr="*fp32")
