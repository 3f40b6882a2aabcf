"""Dense GEMV for decode on the CPU: y = x·Wᵀ for a few rows of x, streaming W once at memory speed.

At batch 1 a decode step is a chain of matrix-vector products: each weight is read once and used once, so the step
is bound by memory bandwidth, and the only question is how close a kernel gets to it. torch's CPU linear for
M = 1 (MKL sgemv for fp32, oneDNN for bf16) leaves a lot on the table here; this kernel is the obvious one:

    for each output row n (contiguous blocks of rows per OpenMP thread):
        acc = Σ_k W[n, k] · x[k]                 in 16 fp32 lanes, reduced at the end
    bf16:  _mm512_dpbf16_ps multiplies 32 bf16 pairs exactly and adds them into 16 fp32 lanes (AVX512-BF16);
           without it, bf16 widened exactly to fp32 lanes and FMAs (AVX-512, or 8 lanes on AVX2)
    fp32:  _mm512_fmadd_ps, 16 lanes (8 on AVX2)
    y[n] = reduce(acc), rounded to the output dtype (bf16: round-to-nearest-even, as torch rounds)

Each thread takes a contiguous block of rows and reads them one after another: one sequential stream of W per
thread, which the hardware prefetcher keeps ahead of (csrc/gemv.h); two accumulators per row hide the FMA latency.
Only M = 1 (batch-1 decode) runs here: for batches oneDNN's GEMM is the better kernel. Accumulation is in fp32 in
both dtypes, like torch's kernels; only the summation order differs, so results agree to rounding
(tests/kernels/cpu/test_gemv.py).

The C is csrc/gemv.c around csrc/gemv.h, the GEMV body the whole decode step (csrc/decode.c) uses too; compiled on
first use and cached by kernels/cpu/native.py, called through ctypes. Where the library cannot run
(kernels/cpu/native.py says why), for M > 1 or a non-contiguous weight, `linear` falls back to
`torch.nn.functional.linear`.

Legend: M rows of x, N out_features, K in_features.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from phiforge.kernels.cpu import native

P, I = ctypes.c_void_p, ctypes.c_int
LIB = native.NativeLib("cpu_gemv", "gemv.c", tiers=("avx512bf16", "avx512", "avx2"), functions={
    "gemv_f32": (None, [P, P, P, I, I, I]),
    "gemv_bf16": (None, [P, P, P, I, I, I]),
})
# Weights smaller than this run on one thread: for small matrices the OpenMP barrier costs more than the split
# saves (bench/bench_generate.py shows the effect on decode tok/s). On a heavily oversubscribed machine every
# barrier can wait a scheduler slice; torch's own tiny ops are kept single-threaded during a step for that reason.
parallel_min_elements = 1 << 17


def available() -> bool:
    return LIB.get() is not None


def supports(w: torch.Tensor) -> bool:
    """Whether `linear` runs this weight natively (else it falls back to torch)."""
    return (w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16) and w.dim() == 2
            and w.is_contiguous() and available())


def linear(x: torch.Tensor, w: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """x (..., K) · w (N, K)ᵀ → (..., N), in x's dtype. Native for one row of a same-dtype fp32/bf16 x.

    threads: for weights of at least `parallel_min_elements` (default: torch.get_num_threads())."""
    K, N = w.shape[1], w.shape[0]
    M = x.numel() // K
    if not (M == 1 and x.dtype == w.dtype and supports(w)):
        return F.linear(x, w)
    lib = LIB.get()
    x2 = x.reshape(K).contiguous()                                      # (K,)
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype)                    # (..., N)
    fn = lib.gemv_bf16 if x.dtype == torch.bfloat16 else lib.gemv_f32
    threads = (threads or torch.get_num_threads()) if N * K >= parallel_min_elements else 1
    fn(w.data_ptr(), x2.data_ptr(), y.data_ptr(), N, K, threads)
    return y
