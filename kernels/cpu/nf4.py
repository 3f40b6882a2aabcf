"""NF4 matmul on CPU tensors: small native kernels for decode and batched decode, dequantize + oneDNN for the rest.

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

A few more rows of x (a batched decode step, a short prefill chunk) are different: each decoded weight now meets
M rows, and the dense GEMM's blocked micro-kernel does those products better than the GEMV's per-row chains (with
AVX512-BF16, on bf16 dot products at twice the rate). The tile GEMM decodes 16 weight rows into a tile in x's dtype
that stays in cache (bit-identical to the whole-weight dequantize) and runs the dense GEMM's micro-kernel
(csrc/gemv.h) over it: W read once as nibbles, never written out whole at 2 or 4 bytes a weight:

    tile   = code[q] * absmax           (16, K)    weight rows n0..n0+16 in x's dtype, one tile a thread
    y[:, n0:n0+16] = x · tileᵀ          (M, 16)    x (M, K) fp32 or bf16, fp32 sums

The C is csrc/nf4.c around csrc/nf4.h, the kernels the whole decode step (csrc/decode.c) calls too. Where the
library cannot run (kernels/cpu/native.py says why), or for shapes outside the fast path, kernels/nf4_matmul.py
dequantizes (`dequantize_nf4_ref` here without the library) and runs a dense matmul.
Shape legend: M rows of x, N = out_features, K = in_features, n = N*K, nb = n / blocksize.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from phiforge.kernels.cpu import native
from phiforge.kernels.nf4 import NF4Weight, dequantize_nf4_ref

# Which kernel takes M rows (csrc/nf4.h's NF4_* limits; the fixed ones checked against the library at load). The
# fused GEMV wins while W's bytes dominate; its fp32 FMAs grow with M. fp32 and bf16 x from tile_min_m() (bf16 on
# AVX512-BF16: 3, else 5; csrc/nf4.h says why) up to TILE_MAX_M rows go to the tile GEMM (16 weight rows dequantized
# into a cache-resident tile in x's dtype, then the dense GEMM's micro-kernel: the dequantize paid once for all
# rows); fp16 x takes the GEMV up to GEMV_MAX_M rows. More rows dequantize the whole weight and run torch's GEMM.
# bench/bench_nf4.py times them.
GEMV_MAX_M = 4
TILE_MAX_M = 16
TILE_ROWS = 16  # weight rows a tile
P, I, L, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float


@functools.lru_cache(maxsize=None)  # one per loaded library (a tier), read on every call of gemv
def _config(lib: ctypes.CDLL) -> tuple[int, ...]:
    """csrc/nf4.h's (NF4_HAS_TILE, NF4_GEMV_MAX_M, NF4_TILE_MIN_M_BF16, NF4_TILE_MIN_M_F32, NF4_TILE_MAX_M,
    NF4_TILE) at the library's tier."""
    got = (ctypes.c_int * 6)()
    lib.nf4_config(got)
    return tuple(got)


def _check(lib: ctypes.CDLL) -> None:
    _, gemv_max, *tile_min, tile_max, tile_rows = _config(lib)
    if (gemv_max, tile_max, tile_rows) != (GEMV_MAX_M, TILE_MAX_M, TILE_ROWS) \
            or not all(1 < t <= gemv_max + 1 for t in tile_min):
        raise ValueError(f"csrc/nf4.h's row limits {_config(lib)[1:]} do not fit nf4_cpu.py's GEMV_MAX_M {GEMV_MAX_M}, "
                         f"TILE_MAX_M {TILE_MAX_M}, TILE_ROWS {TILE_ROWS}")


LIB = native.NativeLib("nf4_cpu", "nf4.c", tiers=tuple(native.TIERS), check=_check, functions={
    "nf4_dequant_all": (None, [P, P, P, P, P, F, I, I, I, L, P, I, I]),
    "nf4_gemv_all": (None, [P, P, I, P, P, P, P, P, F, I, I, I, L, L, P, I]),
    "nf4_gemm_all": (None, [P, I, I, P, P, P, P, P, F, I, I, I, L, L, P, P, I]),
    "nf4_has_fp16": (I, []),
    "nf4_config": (None, [P]),
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


_TILE_KIND = {torch.float32: 0, torch.bfloat16: 1}


def tile_min_m(dtype: torch.dtype) -> int | None:
    """The fewest rows of `dtype` x the tile GEMM takes here, up to TILE_MAX_M; None where it takes none (fp16, or a
    tier without it: the scalar one)."""
    return _tile_min(LIB.get(), dtype)


def _tile_min(lib: ctypes.CDLL | None, dtype: torch.dtype) -> int | None:
    if dtype not in _TILE_KIND or lib is None or not _config(lib)[0]:
        return None
    return _config(lib)[3 - _TILE_KIND[dtype]]


def gemv(x: torch.Tensor, w: NF4Weight) -> torch.Tensor | None:
    """x (M, K) -> x·Wᵀ (M, N) in x's dtype via a C kernel: the tile GEMM for tile_min_m()..TILE_MAX_M rows of
    fp32 or bf16 x, else the fused GEMV up to GEMV_MAX_M rows; None when neither applies (more rows, K not a whole
    number of blocks, or the library cannot run): the caller dequantizes instead."""
    lib = LIB.get()
    if lib is None or x.dtype not in _KIND or w.shape[1] % w.blocksize:
        return None
    tile_min = _tile_min(lib, x.dtype)
    if tile_min is not None and tile_min <= x.shape[0] <= TILE_MAX_M:
        return tile_gemm(x, w).to(x.dtype)
    if x.shape[0] > GEMV_MAX_M:
        return None
    N, K = w.shape
    xe = x[:, 0::2].float().contiguous()  # (M, K/2) the weights in HIGH nibbles multiply these
    xo = x[:, 1::2].float().contiguous()  # (M, K/2)
    y = torch.empty(x.shape[0], N, dtype=torch.float32)                                     # (M, N)
    lib.nf4_gemv_all(xe.data_ptr(), xo.data_ptr(), x.shape[0], *_w_args(w), w.blocksize, w.nested_blocksize, N, K,
                     y.data_ptr(), torch.get_num_threads())
    return y.to(x.dtype)


def tile_gemm(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """x (M, K) fp32 or bf16 -> x·dequantize(W)ᵀ (M, N) as fp32 sums, W dequantized in x's dtype, through the tile
    GEMM; needs a tier with it (tile_min_m), M <= TILE_MAX_M and K a whole number of blocks (gemv checks these)."""
    N, K = w.shape
    threads = torch.get_num_threads()
    tiles = torch.empty(threads, TILE_ROWS, K, dtype=x.dtype)                            # one tile a thread
    y = torch.empty(x.shape[0], N, dtype=torch.float32)                                  # (M, N)
    LIB.get().nf4_gemm_all(x.contiguous().data_ptr(), _TILE_KIND[x.dtype], x.shape[0], *_w_args(w), w.blocksize,
                           w.nested_blocksize, N, K, tiles.data_ptr(), y.data_ptr(), threads)
    return y
