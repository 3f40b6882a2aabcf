"""Dense GEMV for decode on the CPU: y = x·Wᵀ for a few rows of x, streaming W once at memory speed.

At batch 1 a decode step is a chain of matrix-vector products: each weight is read once and used once, so the step
is bound by memory bandwidth, and the only question is how close a kernel gets to it. torch's CPU linear for
M = 1 (MKL sgemv for fp32, oneDNN for bf16) leaves a lot on the table here; this kernel is the obvious one:

    for each output row n (rows split across the OpenMP threads):
        acc = Σ_k W[n, k] · x[k]                 in 16 fp32 lanes, reduced at the end
    bf16:  _mm512_dpbf16_ps multiplies 32 bf16 pairs exactly and adds them into 16 fp32 lanes (AVX512-BF16)
    fp32:  _mm512_fmadd_ps, 16 lanes
    y[n] = reduce(acc), rounded to the output dtype (bf16: round-to-nearest-even, as torch rounds)

Four rows are done at once so one load of x feeds four independent accumulators (no FMA latency chain). Only
M = 1 (batch-1 decode) runs here; a variant looping over up to 8 rows of x was slower than oneDNN at M = 8.
Accumulation is in fp32 in both dtypes, like torch's kernels; only the summation order differs, so
results agree to rounding (tests/kernels/test_cpu_gemv.py).

It is C, compiled on first use and cached by kernels/native.py, and called through ctypes. No compiler, no AVX-512
(BF16), M > 1 or a non-contiguous weight: `linear` falls back to `torch.nn.functional.linear`.

Legend: M rows of x, N out_features, K in_features.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from phiforge.kernels import native

MAX_M = 1  # a per-row x-loop for M up to 8 measured slower than oneDNN at M = 8 here: torch does batches

_SRC = r"""
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>

static inline uint16_t f32_to_bf16(float f) {           /* round to nearest even, as torch does */
    uint32_t u; memcpy(&u, &f, 4);
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}


/* One macro body for both dtypes: LOAD gives 16 fp32 lanes (or 32 bf16), FMA accumulates in fp32. Four rows at
   once with four named accumulators: registers, not an array (which the compiler keeps on the stack), and no
   FMA latency chain; one load of x feeds all four. */
#ifdef __AVX512BF16__
#define BF16_STEP 32
#define BF16_FMA(acc, w, x) _mm512_dpbf16_ps(acc, (__m512bh)(w), (__m512bh)(x))
#define BF16_LOAD(p, k, K) _mm512_maskz_loadu_epi16(K - k >= 32 ? 0xffffffffu : ((1u << (K - k)) - 1), p)
#endif

#define GEMV_BODY(T, STEP, LOAD, FMA, STORE)                                                              \
    if (M == 1) {                                                                                         \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                 \
        for (int n0 = 0; n0 < N; n0 += 4) {                                                               \
            if (N - n0 < 4) {                                                                             \
                for (int n = n0; n < N; n++) {                                                            \
                    __m512 a = _mm512_setzero_ps();                                                       \
                    for (int k = 0; k < K; k += STEP) a = FMA(a, LOAD(W + (int64_t)n * K + k, k, K), LOAD(x + k, k, K)); \
                    y[n] = STORE(_mm512_reduce_add_ps(a));                                                \
                }                                                                                         \
                continue;                                                                                 \
            }                                                                                             \
            const T *w0 = W + (int64_t)n0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;                  \
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                   \
            for (int k = 0; k < K; k += STEP) {                                                           \
                __typeof__(LOAD(x, 0, K)) xv = LOAD(x + k, k, K);                                         \
                a0 = FMA(a0, LOAD(w0 + k, k, K), xv);                                                     \
                a1 = FMA(a1, LOAD(w1 + k, k, K), xv);                                                     \
                a2 = FMA(a2, LOAD(w2 + k, k, K), xv);                                                     \
                a3 = FMA(a3, LOAD(w3 + k, k, K), xv);                                                     \
            }                                                                                             \
            y[n0] = STORE(_mm512_reduce_add_ps(a0)); y[n0 + 1] = STORE(_mm512_reduce_add_ps(a1));         \
            y[n0 + 2] = STORE(_mm512_reduce_add_ps(a2)); y[n0 + 3] = STORE(_mm512_reduce_add_ps(a3));     \
        }                                                                                                 \
    }

#define F32_LOAD(p, k, K) _mm512_maskz_loadu_ps(K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1), p)
#define F32_FMA(acc, w, x) _mm512_fmadd_ps(w, x, acc)
#define F32_STORE(v) (v)

/* y (M, N) = x (M, K) . W (N, K)^T, fp32 */
void gemv_f32(const float *W, const float *x, float *y, int M, int N, int K, int threads) {
    GEMV_BODY(float, 16, F32_LOAD, F32_FMA, F32_STORE)
}

/* y (M, N) = x (M, K) . W (N, K)^T, bf16 in and out, fp32 accumulation */
void gemv_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, int M, int N, int K, int threads) {
#ifdef __AVX512BF16__
    GEMV_BODY(uint16_t, BF16_STEP, BF16_LOAD, BF16_FMA, f32_to_bf16)
#endif
}
#ifdef __AVX512BF16__
int has_kernels(void) { return 1; }
#else
int has_kernels(void) { return 0; }  /* bf16 needs AVX512-BF16; use torch */
#endif
#else
int has_kernels(void) { return 0; }
#endif
"""

_lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable (torch fallback)
enabled = True                           # a switch for A/B measurements (bench/bench_generate.py)
# Weights smaller than this run on one thread: below ~128K weights the OpenMP barrier costs more than the split
# saves. Measured on the 2-core box (default model, decode tok/s, best of 5): splitting only the lm_head (>= 4M)
# fp32 33 / bf16 47; every matrix >= 128K fp32 50 / bf16 62. (On a heavily oversubscribed machine every barrier
# can wait a scheduler slice; torch's own tiny ops are kept single-threaded during a step for that reason.)
parallel_min_elements = 1 << 17


def _load() -> ctypes.CDLL | None:
    """The compiled kernels (kernels/native.py builds and caches them), or None: use torch."""
    global _lib
    if _lib is not False:
        return _lib
    lib = native.build("cpu_gemv", _SRC, need=("avx512f",))
    if lib is not None and lib.has_kernels():
        for name in ("gemv_bf16", "gemv_f32"):
            fn = getattr(lib, name)
            fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4
            fn.restype = None
    _lib = lib if lib is not None and lib.has_kernels() else None
    return _lib


def available() -> bool:
    return _load() is not None


def supports(w: torch.Tensor) -> bool:
    """Whether `linear` runs this weight natively (else it falls back to torch)."""
    return (w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16) and w.dim() == 2
            and w.is_contiguous() and available())


def linear(x: torch.Tensor, w: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """x (..., K) · w (N, K)ᵀ → (..., N), in x's dtype. Native for one row of a same-dtype fp32/bf16 x.

    threads: for weights of at least `parallel_min_elements` (default: torch.get_num_threads())."""
    K, N = w.shape[1], w.shape[0]
    M = x.numel() // K
    if not (enabled and M <= MAX_M and x.dtype == w.dtype and supports(w)):
        return F.linear(x, w)
    x2 = x.reshape(M, K).contiguous()                                   # (M, K)
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype)                    # (..., N)
    fn = _lib.gemv_bf16 if x.dtype == torch.bfloat16 else _lib.gemv_f32
    threads = (threads or torch.get_num_threads()) if N * K >= parallel_min_elements else 1
    fn(w.data_ptr(), x2.data_ptr(), y.data_ptr(), M, N, K, threads)
    return y
