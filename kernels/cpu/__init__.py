"""phiforge.kernels.cpu: the native CPU path, C compiled on first use and called through ctypes.

    nf4.py         the CPU path of nf4_matmul (a fused NF4 GEMV and a tile GEMM in C, else dequantize + matmul)
    gemv.py        the dense batch-1 GEMV used by the decode step on CPU
    linear.py      dense fp32 linear (forward and backward) through oneDNN on CPU: the model's projections
    decode.py      the whole decode step (all layers, lm_head, 1-16 rows; dense or NF4) in one native call
    attention.py   causal prefill attention in C (the causal triangle only; bf16 on dpbf16)
    ops.py         one-pass RMSNorm, SwiGLU and RoPE for CPU inference
    native.py      builds and caches the C libraries (csrc/*.c) with the system compiler; says why one cannot run
    omp_pool.py    gives a thread's OpenMP workers back (the serving engine's constructing thread)
    csrc/          the C: simd.h (shared vector math, bf16 rounding, masks), gemv.h, nf4.h, one .c per library
                   (ops, gemv, nf4, attention, decode, omp_pool) and peak.c (bench_generate's probe)
"""
