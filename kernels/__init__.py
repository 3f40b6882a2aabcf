"""phiforge.kernels: the NF4 and LoRA kernels, each file beside its pure-torch reference; the GPU (Triton) kernels
here, the native CPU path in cpu/, one operation's two paths side by side.

    nf4.py         NF4Weight, the bitsandbytes-exact codec (quantize / dequantize) and the Triton dequantize kernel
    nf4_tiles.py   what every NF4 kernel shares: reading a tile of packed W, the LoRA epilogue, the dispatch rule
    nf4_gemv.py    decode (M <= 8): split-K dequant-GEMV
    nf4_matmul.py  prefill / training: dequant-GEMM into tl.dot, its transposed form for dX, the public nf4_matmul
                   (CUDA -> these kernels, CPU -> cpu/nf4.py)
    lora.py        fused LoRA linear y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ, forward and backward, W dense or NF4
    lora_gather.py many adapters in one batch: each row's own adapter, gathered (serving)
    aot.py         Triton signatures and alignment hints for ahead-of-time compiles
    report.py      `phiforge kernels report`: ahead-of-time compiles for sm_80/86/89, registers/spills/smem
    cpu/           the native CPU path (C through ctypes): NF4 GEMV and tile GEMM, dense GEMV and linear, the whole
                   decode step, prefill attention, RMSNorm/SwiGLU/RoPE, the compiler driver, the OpenMP pool

Dispatch everywhere: CUDA tensors -> Triton; CPU tensors -> the torch (or native CPU) path;
PHIFORGE_KERNELS=triton with TRITON_INTERPRET=1 forces Triton on CPU tensors (the tests do).
"""
if __name__ != "phiforge.kernels":
    # This folder is phiforge.kernels only (setup.py's package_dir). Under another name the repository root is on
    # sys.path, where our kernels/ stands in for the Hugging Face `kernels` package that transformers imports.
    raise ImportError(f"{__file__} imported as {__name__!r}: the phiforge repository root is on sys.path (python -m "
                      "or -c run from the repo root, or an empty PYTHONPATH entry); run with python -P or "
                      "PYTHONSAFEPATH=1, or from another directory")
