"""NF4 matmul on CPU tensors: a tiny native kernel for decode, dequantize-into-a-buffer + oneDNN for the rest.

Why native code on the CPU path: at M = 1 the dense bf16 GEMV streams 2 bytes per weight at memory speed. Any
unfused torch NF4 path first writes the whole dequantized W (2 bytes per weight) and then reads it back, so it can
never come close to dense; it needs the dequantize fused into the dot product. torch has no such op for a
non-uniform 4-bit code (its int4 kernels are affine), so ~100 lines of C do it, compiled once with the system C
compiler and called through ctypes; row ranges split over torch's OpenMP threads inside the C call (a Python
thread pool per call costs more than the GEMV itself at the default model's sizes).

The whole NF4 table is 16 fp32 values = one AVX-512 register, so the lookup is one `vpermps` per 16 weights:

    bytes  = 16 packed bytes -> 16 int32            (32 weights)
    hi, lo = bytes >> 4, bytes & 15                 (elements 2j and 2j+1)
    w_hi   = permutexvar(hi, table) * absmax        fp32, exactly as bitsandbytes dequantizes
    acc_m += w_hi * x_m[0::2] + w_lo * x_m[1::2]     x split into even/odd halves once per call

The C is csrc/nf4.c around csrc/nf4.h, the GEMV the whole decode step (csrc/decode.c) calls too. Where the
library cannot run (kernels/native.py says why), or for shapes outside the fast path, kernels/nf4_matmul.py
dequantizes (`dequantize_nf4_ref` here without the library) and runs a dense matmul.
Shape legend: M rows of x, N = out_features, K = in_features, n = N*K, nb = n / blocksize.
"""
from __future__ import annotations

import ctypes

import torch

from phiforge.kernels import native
from phiforge.kernels.nf4 import NF4Weight, dequantize_nf4_ref

# The fused GEMV wins while W's bytes dominate; its fp32 FMAs grow with M, and oneDNN's bf16 GEMM after a dequantize
# does not (bench/bench_nf4.py measures both), so it serves a few rows only (the C code allows up to 8).
GEMV_MAX_M = 4
P, I, L, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
LIB = native.NativeLib("nf4_cpu", "nf4.c", tiers=tuple(native.TIERS), functions={
    "nf4_dequant_all": (None, [P, P, P, P, P, F, I, I, I, L, P, I, I]),
    "nf4_gemv_all": (None, [P, P, I, P, P, P, P, P, F, I, I, I, L, L, P, I]),
    "nf4_has_fp16": (I, []),
})
_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _w_args(w: NF4Weight) -> tuple:
    dq = w.double_quant
    nested = (w.nested_code.data_ptr(), w.nested_absmax.data_ptr()) if dq else (None, None)
    return (w.packed.data_ptr(), w.absmax.data_ptr(), w.code.data_ptr(), *nested, float(w.offset), int(dq))


def dequantize_into(w: NF4Weight, out: torch.Tensor) -> torch.Tensor:
    """Fill out (N, K), contiguous fp32/bf16/fp16, with dequantize(W); bit-identical to `dequantize_nf4_ref`."""
    lib = LIB.get()
    if (lib is None or out.dtype not in _KIND or not out.is_contiguous()
            or (out.dtype == torch.float16 and not lib.nf4_has_fp16())):
        return out.copy_(dequantize_nf4_ref(w, out.dtype))
    lib.nf4_dequant_all(*_w_args(w), w.blocksize, w.nested_blocksize, w.numel, out.data_ptr(), _KIND[out.dtype],
                        torch.get_num_threads())
    return out


def gemv_ready(w: NF4Weight) -> bool:
    """Whether the fused GEMV takes this weight: K a whole number of blocks, CPU tensors, contiguous."""
    parts = [t for t in (w.packed, w.absmax, w.code, w.nested_code, w.nested_absmax) if t is not None]
    return w.shape[1] % w.blocksize == 0 and all(t.device.type == "cpu" and t.is_contiguous() for t in parts)


def gemv(x: torch.Tensor, w: NF4Weight) -> torch.Tensor | None:
    """x (M, K) -> x·Wᵀ (M, N) in x's dtype via the fused C kernel; None when it does not apply (M > GEMV_MAX_M,
    another dtype, K not a whole number of blocks, or the library cannot run): the caller dequantizes instead."""
    lib = LIB.get()
    if lib is None or x.shape[0] > GEMV_MAX_M or x.dtype not in _KIND or w.shape[1] % w.blocksize:
        return None
    N, K = w.shape
    xe = x[:, 0::2].float().contiguous()  # (M, K/2) the weights in HIGH nibbles multiply these
    xo = x[:, 1::2].float().contiguous()  # (M, K/2)
    y = torch.empty(x.shape[0], N, dtype=torch.float32)                                     # (M, N)
    lib.nf4_gemv_all(xe.data_ptr(), xo.data_ptr(), x.shape[0], *_w_args(w), w.blocksize, w.nested_blocksize, N, K,
                     y.data_ptr(), torch.get_num_threads())
    return y.to(x.dtype)
