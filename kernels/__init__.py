"""phiforge.kernels: the NF4 and LoRA kernels, each file beside its pure-torch reference.

    nf4.py         NF4Weight, the bitsandbytes-exact codec (quantize / dequantize) and the Triton dequantize kernel
    nf4_tiles.py   what every NF4 kernel shares: reading a tile of packed W, the LoRA epilogue, the dispatch rule
    nf4_gemv.py    decode (M <= 8): split-K dequant-GEMV
    nf4_matmul.py  prefill / training: dequant-GEMM into tl.dot, its transposed form for dX, the public nf4_matmul
    lora.py        fused LoRA linear y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ, forward and backward, W dense or NF4
    nf4_cpu.py     the CPU path of nf4_matmul (a fused NF4 GEMV in C, else dequantize + matmul)
    cpu_gemv.py    the dense batch-1 GEMV used by the decode step on CPU
    cpu_linear.py  dense fp32 linear (forward and backward) through oneDNN on CPU: the model's projections
    cpu_decode.py  the whole decode step (all layers, lm_head, 1-16 rows; dense or NF4) in one native call
    cpu_attention.py  causal prefill attention in C (the causal triangle only; bf16 on dpbf16)
    cpu_ops.py     one-pass RMSNorm, SwiGLU and RoPE for CPU inference
    native.py      builds and caches the C kernels above (csrc/*.c) with the system compiler; says why one cannot run
    csrc/          the C of the CPU path: simd.h (shared vector math, bf16 rounding, masks), gemv.h, nf4.h, one .c
                   per library (ops, gemv, nf4, attention, decode) and peak.c (bench_generate's probe)
    aot.py         Triton signatures and alignment hints for ahead-of-time compiles
    report.py      `phiforge kernels report`: ahead-of-time compiles for sm_80/86/89, registers/spills/smem

Dispatch everywhere: CUDA tensors -> Triton; CPU tensors -> the torch (or native CPU) path;
PHIFORGE_KERNELS=triton with TRITON_INTERPRET=1 forces Triton on CPU tensors (the tests do).
"""

if __name__ != "phiforge.kernels":
    # This folder is phiforge.kernels only (setup.py's package_dir). Under another name the repository root is on
    # sys.path, where our kernels/ stands in for the Hugging Face `kernels` package that transformers imports.
    raise ImportError(f"{__file__} imported as {__name__!r}: the phiforge repository root is on sys.path (python -m "
                      "or -c run from the repo root, or an empty PYTHONPATH entry); run with python -P or "
                      "PYTHONSAFEPATH=1, or from another directory")
