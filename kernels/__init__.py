"""phiforge.kernels: the NF4 and LoRA kernels, each file beside its pure-torch reference.

    nf4.py         NF4Weight, the bitsandbytes-exact codec (quantize / dequantize) and the Triton dequantize kernel
    nf4_tiles.py   what every NF4 kernel shares: reading a tile of packed W, the LoRA epilogue, the dispatch rule
    nf4_gemv.py    decode (M <= 8): split-K dequant-GEMV
    nf4_matmul.py  prefill / training: dequant-GEMM into tl.dot, its transposed form for dX, the public nf4_matmul
    lora.py        fused LoRA linear y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ, forward and backward, W dense or NF4
    nf4_cpu.py     the CPU path of nf4_matmul (a fused NF4 GEMV in C, else dequantize + matmul)
    cpu_gemv.py    the dense batch-1 GEMV used by the decode step on CPU
    cpu_linear.py  dense fp32 linear (forward and backward) through oneDNN on CPU: the model's projections
    cpu_decode.py  the whole dense decode step (all layers, lm_head, 1-16 rows) in one native call
    cpu_decode_attention.py  its attention: one query per (row, head) over the cache, fp32 and bf16 (dpbf16)
    cpu_attention.py  causal prefill attention in C (the causal triangle only; bf16 on dpbf16)
    cpu_ops.py     one-pass RMSNorm, SwiGLU and RoPE for CPU inference
    native.py      builds and caches the C kernels above with the system compiler (torch fallback)
    report.py      `phiforge kernels report`: ahead-of-time compiles for sm_80/86/89, registers/spills/smem

Dispatch everywhere: CUDA tensors -> Triton; CPU tensors -> the torch (or native CPU) path;
PHIFORGE_KERNELS=triton with TRITON_INTERPRET=1 forces Triton on CPU tensors (the tests do).
"""
