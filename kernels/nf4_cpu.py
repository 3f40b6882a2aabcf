"""NF4 matmul on CPU tensors: a tiny native kernel for decode, dequantize-into-a-buffer + oneDNN for the rest.

Why native code on the CPU path: at M = 1 the dense bf16 GEMV streams 2 bytes per weight at memory speed. Any
unfused torch NF4 path first writes the whole dequantized W (2 bytes per weight) and then reads it back, so it can
never come within 1.5x of dense; it needs the dequantize fused into the dot product. torch has no such op for a
non-uniform 4-bit code (its int4 kernels are affine), so ~100 lines of C do it, compiled once with the system C
compiler and called through ctypes; row ranges split over torch's OpenMP threads inside the C call (a Python
thread pool per call cost more than the GEMV itself at the default model's sizes: NF4 bf16 decode 36 tok/s with
it, 70 without).

The whole NF4 table is 16 fp32 values = one AVX-512 register, so the lookup is one `vpermps` per 16 weights:

    bytes  = 16 packed bytes -> 16 int32            (32 weights)
    hi, lo = bytes >> 4, bytes & 15                 (elements 2j and 2j+1)
    w_hi   = permutexvar(hi, table) * absmax        fp32, exactly as bitsandbytes dequantizes
    acc_m += w_hi * x_m[0::2] + w_lo * x_m[1::2]     x split into even/odd halves once per call

Without a C compiler (or for shapes outside the fast path) everything falls back to `dequantize_nf4_ref` + matmul.
Shape legend: M rows of x, N = out_features, K = in_features, n = N*K, nb = n / blocksize.
"""
from __future__ import annotations

import ctypes

import torch

from phiforge.kernels import native
from phiforge.kernels.cpu_linear import matmul_nt
from phiforge.kernels.nf4 import NF4Weight, dequantize_nf4_ref

SRC = r"""
#include <stdint.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float scale_of(const void *absmax, const float *ncode, const float *nabs, float offset,
                             int dq, int nbs, int64_t b) {
    /* absmax[b], or nested_code[a8[b]] * nested_absmax[b / 256] + offset: two roundings, no FMA (-ffp-contract=off).
       A shift for the power-of-two group size: a 64-bit division per block would cost more than its 64 weights. */
    if (!dq) return ((const float *)absmax)[b];
    int64_t g = (nbs & (nbs - 1)) == 0 ? b >> __builtin_ctz(nbs) : b / nbs;
    return ncode[((const uint8_t *)absmax)[b]] * nabs[g] + offset;
}

static inline void store(void *out, int kind, int64_t i, float v) {
    if (kind == 0) { ((float *)out)[i] = v; return; }
    union { float f; uint32_t u; } c = {v};
    if (kind == 1) { ((uint16_t *)out)[i] = (uint16_t)((c.u + 0x7FFF + ((c.u >> 16) & 1)) >> 16); return; }
#ifdef __F16C__
    ((uint16_t *)out)[i] = _cvtss_sh(v, 0);
#endif
}

/* 1 if fp16 output is supported (F16C, or AVX-512 which implies it), else the caller falls back to torch */
int nf4_has_fp16(void) {
#ifdef __F16C__
    return 1;
#else
    return 0;
#endif
}

/* out[i] = code[q_i] * absmax[i / bs] for flat i in [i0, i1); i0 a multiple of bs. kind: 0 fp32, 1 bf16, 2 fp16. */
void nf4_dequant(const uint8_t *packed, const void *absmax, const float *code, const float *ncode,
                 const float *nabs, float offset, int dq, int bs, int nbs, int64_t i0, int64_t i1,
                 void *out, int kind) {
    for (int64_t b0 = i0, b = i0 / bs; b0 < i1; b0 += bs, b++) {
        float s = scale_of(absmax, ncode, nabs, offset, dq, nbs, b);
        int64_t e = b0 + bs < i1 ? b0 + bs : i1, i = b0;
#ifdef __AVX512F__
        __m512 lut = _mm512_loadu_ps(code), vs = _mm512_set1_ps(s);
        const __m512i even = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        const __m512i odd = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
        for (; i + 32 <= e; i += 32) {
            __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(packed + i / 2)));
            __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), lut), vs);
            __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(q, _mm512_set1_epi32(15)), lut), vs);
            __m512 v[2] = {_mm512_permutex2var_ps(hi, even, lo), _mm512_permutex2var_ps(hi, odd, lo)};
#ifdef __AVX512BF16__
            if (kind == 1) {  /* one instruction rounds both halves to bf16 (nearest even, as torch does) */
                _mm512_storeu_si512((uint16_t *)out + i, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
                continue;
            }
#endif
            for (int h = 0; h < 2; h++) {
                if (kind == 0) {
                    _mm512_storeu_ps((float *)out + i + 16 * h, v[h]);
                } else if (kind == 1) {  /* fp32 -> bf16, round to nearest even: u + 0x7FFF + lsb, keep the top half */
                    __m512i u = _mm512_castps_si512(v[h]);
                    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
                    u = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
                    _mm256_storeu_si256((__m256i *)((uint16_t *)out + i + 16 * h), _mm512_cvtepi32_epi16(u));
                } else {
                    _mm256_storeu_si256((__m256i *)((uint16_t *)out + i + 16 * h),
                                        _mm512_cvtps_ph(v[h], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                }
            }
        }
#endif
        for (; i < e; i++) {
            uint8_t byte = packed[i / 2];
            store(out, kind, i, code[(i & 1) ? (byte & 15) : (byte >> 4)] * s);
        }
    }
}

/* y[m, n] = sum_k x[m, k] W[n, k] for rows n in [n0, n1); needs K % bs == 0 (bs is a multiple of 32).
   xe, xo: (M, K/2) fp32 even and odd columns of x. y: (M, N) fp32. Inlined with M as a literal where it matters,
   so the accumulators live in registers. Each row of x keeps four FMA chains (hi/lo nibbles x two 16-byte halves):
   one chain would wait out the FMA latency (4 cycles) on every 32 weights and run at half the memory speed. */
static inline __attribute__((always_inline)) void gemv_rows(
        const float *xe, const float *xo, const int M, const uint8_t *packed, const void *absmax,
        const float *code, const float *ncode, const float *nabs, float offset, int dq, int bs, int nbs,
        int64_t N, int64_t K, int64_t n0, int64_t n1, float *y) {
    int64_t K2 = K / 2;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = packed + n * K2;
#ifdef __AVX512F__
        const __m512 lut = _mm512_loadu_ps(code);
        const __m512i low4 = _mm512_set1_epi32(15);
        __m512 acc[4][8];
        for (int c = 0; c < 4; c++)
            for (int m = 0; m < M; m++) acc[c][m] = _mm512_setzero_ps();
        for (int64_t k = 0, b = n * (K / bs); k < K; k += bs, b++) {
            __m512 vs = _mm512_set1_ps(scale_of(absmax, ncode, nabs, offset, dq, nbs, b));
            for (int64_t j = k / 2; j < (k + bs) / 2; j += 16) {
                int c = (int)(j >> 4) & 1;  /* alternate 16-byte halves between two pairs of chains */
                __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + j)));
                __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), lut), vs);
                __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(q, low4), lut), vs);
                for (int m = 0; m < M; m++) {
                    acc[2 * c][m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xe + m * K2 + j), acc[2 * c][m]);
                    acc[2 * c + 1][m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xo + m * K2 + j), acc[2 * c + 1][m]);
                }
            }
        }
        for (int m = 0; m < M; m++)
            y[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0][m], acc[1][m]),
                                                              _mm512_add_ps(acc[2][m], acc[3][m])));
#else
        float acc[8] = {0};
        for (int64_t k = 0, b = n * (K / bs); k < K; k += bs, b++) {
            float s = scale_of(absmax, ncode, nabs, offset, dq, nbs, b);
            for (int64_t j = k / 2; j < (k + bs) / 2; j++) {
                float hi = code[row[j] >> 4] * s, lo = code[row[j] & 15] * s;
                for (int m = 0; m < M; m++) acc[m] += hi * xe[m * K2 + j] + lo * xo[m * K2 + j];
            }
        }
        for (int m = 0; m < M; m++) y[m * N + n] = acc[m];
#endif
    }
}

void nf4_gemv(const float *xe, const float *xo, int M, const uint8_t *packed, const void *absmax,
              const float *code, const float *ncode, const float *nabs, float offset, int dq, int bs, int nbs,
              int64_t N, int64_t K, int64_t n0, int64_t n1, float *y) {
    if (M == 1)  /* decode: the case that matters, specialised */
        gemv_rows(xe, xo, 1, packed, absmax, code, ncode, nabs, offset, dq, bs, nbs, N, K, n0, n1, y);
    else
        gemv_rows(xe, xo, M, packed, absmax, code, ncode, nabs, offset, dq, bs, nbs, N, K, n0, n1, y);
}

/* The two entry points: [0, total) in one chunk per thread, chunk edges multiples of `align` (16 output rows for
   the GEMV, a block for the dequantize), one OpenMP region (torch's pool) instead of a fork/join in Python. */
#define SPLIT(total, align, threads, BODY)                                                                  \
    do {                                                                                                  \
        int64_t step_ = ((total) + (threads) - 1) / (threads);                                            \
        step_ = (step_ + (align) - 1) / (align) * (align);                                                \
        if (step_ < (align)) step_ = (align);                                                             \
        const int nchunks_ = (int)(((total) + step_ - 1) / step_);                                        \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                 \
        for (int c_ = 0; c_ < nchunks_; c_++) {                                                           \
            const int64_t lo_ = c_ * step_, hi_ = lo_ + step_ < (total) ? lo_ + step_ : (total);          \
            BODY;                                                                                         \
        }                                                                                                 \
    } while (0)

void nf4_gemv_all(const float *xe, const float *xo, int M, const uint8_t *packed, const void *absmax,
                  const float *code, const float *ncode, const float *nabs, float offset, int dq, int bs, int nbs,
                  int64_t N, int64_t K, float *y, int threads) {
    SPLIT(N, 16, threads, nf4_gemv(xe, xo, M, packed, absmax, code, ncode, nabs, offset, dq, bs, nbs, N, K,
                                   lo_, hi_, y));
}

void nf4_dequant_all(const uint8_t *packed, const void *absmax, const float *code, const float *ncode,
                     const float *nabs, float offset, int dq, int bs, int nbs, int64_t total, void *out, int kind,
                     int threads) {
    SPLIT(total, bs, threads, nf4_dequant(packed, absmax, code, ncode, nabs, offset, dq, bs, nbs, lo_, hi_, out,
                                          kind));
}
"""

# The fused GEMV wins while W's bytes dominate; its fp32 FMAs grow with M, and oneDNN's bf16 GEMM does not. Measured
# on a 2-core AVX-512 (bf16) EPYC, qkv 3072->9216, one thread: GEMV 1.7 / 3.0 / 7.1 / 12.0 ms at M = 1 / 2 / 4 / 8,
# dequantize + bf16 matmul ~9 ms at any small M, dense bf16 2.4-2.8 ms. So M <= 4 (the C code allows up to 8).
GEMV_MAX_M = 4
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: no compiler, use the torch fallback


def _load() -> ctypes.CDLL | None:
    """The compiled kernels (kernels/native.py builds and caches them), or None: use the torch fallback."""
    global _lib
    if _lib is not False:
        return _lib
    lib = native.build("nf4_cpu", SRC)
    if lib is not None:
        P, I, L, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
        lib.nf4_dequant_all.argtypes = [P, P, P, P, P, F, I, I, I, L, P, I, I]
        lib.nf4_gemv_all.argtypes = [P, P, I, P, P, P, P, P, F, I, I, I, L, L, P, I]
        if not lib.nf4_has_fp16():
            _KIND.pop(torch.float16, None)
    _lib = lib
    return lib


def _w_args(w: NF4Weight) -> tuple:
    dq = w.double_quant
    nested = (w.nested_code.data_ptr(), w.nested_absmax.data_ptr()) if dq else (None, None)
    return (w.packed.data_ptr(), w.absmax.data_ptr(), w.code.data_ptr(), *nested, float(w.offset), int(dq))


_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dequantize_into(w: NF4Weight, out: torch.Tensor) -> torch.Tensor:
    """Fill out (N, K), contiguous fp32/bf16/fp16, with dequantize(W); bit-identical to `dequantize_nf4_ref`."""
    lib = _load()
    if lib is None or out.dtype not in _KIND or not out.is_contiguous():
        return out.copy_(dequantize_nf4_ref(w, out.dtype))
    lib.nf4_dequant_all(*_w_args(w), w.blocksize, w.nested_blocksize, w.numel, out.data_ptr(), _KIND[out.dtype],
                        torch.get_num_threads())
    return out


def _gemv(x: torch.Tensor, w: NF4Weight, lib: ctypes.CDLL) -> torch.Tensor:
    """x (M <= 8, K) -> (M, N) via the fused C kernel."""
    N, K = w.shape
    xe = x[:, 0::2].float().contiguous()  # (M, K/2) the weights in HIGH nibbles multiply these
    xo = x[:, 1::2].float().contiguous()  # (M, K/2)
    y = torch.empty(x.shape[0], N, dtype=torch.float32)
    lib.nf4_gemv_all(xe.data_ptr(), xo.data_ptr(), x.shape[0], *_w_args(w), w.blocksize, w.nested_blocksize, N, K,
                     y.data_ptr(), torch.get_num_threads())
    return y.to(x.dtype)


def matmul(a: torch.Tensor, w: NF4Weight, trans_w: bool) -> torch.Tensor:
    """a (M, K) -> a·Wᵀ (M, N), or with trans_w a (M, N) -> a·W (M, K). CPU tensors."""
    from phiforge.kernels.nf4_matmul import dequantize_into_buffer  # the shared reused buffer

    lib = _load()
    if (lib is not None and not trans_w and a.shape[0] <= GEMV_MAX_M and a.dtype in _KIND
            and w.shape[1] % w.blocksize == 0):
        return _gemv(a, w, lib)
    wd = dequantize_into_buffer(w, a.dtype)  # (N, K)
    return matmul_nt(a, wd.T if trans_w else wd)


# ---- for kernels/cpu_decode.py's native step, which includes SRC and calls nf4_gemv per projection ----------------
class Desc(ctypes.Structure):
    """One NF4 weight as the C step reads it (the NF4Desc struct in kernels/cpu_decode.py)."""
    _fields_ = ([(n, ctypes.c_void_p) for n in ("packed", "absmax", "code", "ncode", "nabs")]
                + [("offset", ctypes.c_float)] + [(n, ctypes.c_int) for n in ("dq", "bs", "nbs")])

    @classmethod
    def of(cls, q: NF4Weight) -> "Desc":
        dq = q.double_quant
        return cls(packed=q.packed.data_ptr(), absmax=q.absmax.data_ptr(), code=q.code.data_ptr(),
                   ncode=q.nested_code.data_ptr() if dq else None, nabs=q.nested_absmax.data_ptr() if dq else None,
                   offset=float(q.offset), dq=int(dq), bs=q.blocksize, nbs=q.nested_blocksize)


def decode_weight(module: torch.nn.Module) -> NF4Weight | None:
    """The weight of an NF4Linear (engine/quant.py) whose one-row forward is `_gemv` above (K a whole number of
    blocks, CPU tensors), so a native step calling the same C GEMV computes the same sums; else None."""
    if type(module).__name__ != "NF4Linear" or module._forward_hooks or module._forward_pre_hooks:
        return None
    q = module.qweight
    parts = [t for t in (q.packed, q.absmax, q.code, q.nested_code, q.nested_absmax) if t is not None]
    ok = q.shape[1] % q.blocksize == 0 and all(t.device.type == "cpu" and t.is_contiguous() for t in parts)
    return q if ok else None
