"""bench/gpu_check.py's speed parts: each times phiforge beside its reference in the same run and reports ratios
(speed targets live here as ratios, never in tests). `--tiny` runs the same code at small shapes, to keep it
working, not to measure anything."""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import tempfile
import time
from pathlib import Path

import torch

from phiforge.bench.bench_train import phi3_mini_random, run_hf, run_phiforge
from phiforge.bench.gpu_check_common import Ctx, copy_bandwidth_gbs, sync, time_ms, tiny_model
from phiforge.bench.gpu_check_correct import torch_path
from phiforge.engine.formats.loader import save_model
from phiforge.engine.model.quant import quantize_model_
from phiforge.engine.serve.decode import DecodeStep
from phiforge.engine.serve.decode_graph import CUDAGraphDecode
from phiforge.kernels.lora import lora_linear, lora_linear_ref
from phiforge.kernels.nf4 import quantize_nf4
from phiforge.kernels.nf4_matmul import nf4_matmul

LAYERS = {"qkv_proj": (9216, 3072), "gate_up_proj": (16384, 3072), "down_proj": (3072, 8192)}  # (N, K)


def _nf4_bytes(w) -> int:
    return sum(t.numel() * t.element_size() for t in (w.packed, w.absmax) if t is not None)


def nf4_speed(ctx: Ctx) -> dict:
    """NF4 GEMV/GEMM (fused Triton, and dequantize-into-buffer + cuBLAS) vs dense bf16 cuBLAS per Phi-3-mini layer;
    GB/s = bytes of the weight read (+ x, y) per second, against the copy bandwidth measured here."""
    dev = ctx.device
    dtype = torch.bfloat16 if ctx.cuda else torch.float16
    layers = {"tiny": (96, 128)} if ctx.tiny else LAYERS
    bnb = importlib.util.find_spec("bitsandbytes") is not None and ctx.cuda
    out = dict(copy_gbs=copy_bandwidth_gbs(dev, 2 if ctx.tiny else 1024), bitsandbytes=bnb or "not installed")
    for name, (N, K) in layers.items():
        dense = (torch.randn(N, K, device=dev) * 0.05).to(dtype)
        w = quantize_nf4(dense.float().cpu()).to(dev)
        for M in ([1, 16] if ctx.tiny else [1, 8, 512, 2048]):
            x = torch.randn(M, K, device=dev).to(dtype)
            fns = {"dense": lambda: x @ dense.T, "nf4": lambda: nf4_matmul(x, w),
                   "nf4_dequant": lambda: nf4_matmul(x, w, method="dequant")}
            if bnb:
                fns.update(_bnb_fns(dense, x))
            ms = {k: time_ms(f, dev, ctx.iters(20, 1)) for k, f in fns.items()}
            io = (M * K + M * N) * x.element_size()
            rec = {f"{k}_ms": v for k, v in ms.items()}
            rec["nf4_gbs"] = (_nf4_bytes(w) + io) / (ms["nf4"] * 1e-3) / 1e9
            rec["dense_gbs"] = (dense.numel() * dense.element_size() + io) / (ms["dense"] * 1e-3) / 1e9
            rec["nf4_over_dense"] = ms["nf4"] / ms["dense"]
            rec["nf4_gbs_over_copy"] = rec["nf4_gbs"] / out["copy_gbs"]
            out[f"{name}_M{M}"] = rec
    return out


def _bnb_fns(dense, x) -> dict:
    bitsandbytes = importlib.import_module("bitsandbytes")  # optional: only where installed
    qw, state = bitsandbytes.functional.quantize_4bit(dense, quant_type="nf4", compress_statistics=True)
    return {"bnb": lambda: bitsandbytes.matmul_4bit(x, qw.t(), quant_state=state)}


def lora_speed(ctx: Ctx) -> dict:
    """Fused LoRA forward + backward (GEMM with the LoRA epilogue) vs the unfused torch form, r = 16."""
    dev = ctx.device
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    (N, K), M = ((96, 128), 32) if ctx.tiny else ((9216, 3072), 4096)
    out = {}
    for base in ("dense", "nf4"):
        dense = (torch.randn(N, K, device=dev) * 0.05).to(dtype)
        weight = quantize_nf4(dense.float().cpu()).to(dev) if base == "nf4" else dense
        A = (torch.randn(16, K, device=dev) * 0.05).to(dtype).requires_grad_()
        B = (torch.randn(N, 16, device=dev) * 0.05).to(dtype).requires_grad_()
        x = torch.randn(M, K, device=dev).to(dtype).requires_grad_()
        dy = torch.randn(M, N, device=dev).to(dtype)

        def step(fn):
            return lambda: fn(x, weight, A, B, 2.0).backward(dy)
        ms = {k: time_ms(step(f), dev, ctx.iters(20, 1)) for k, f in
              (("fused", lora_linear), ("unfused_torch", lora_linear_ref))}
        out[base] = dict(**{f"{k}_ms": v for k, v in ms.items()}, fused_over_unfused=ms["fused"] / ms["unfused_torch"],
                         M=M, N=N, K=K)
    return out


def _decode(model, B: int, prompt: int, n: int, how: str) -> dict:
    dev = model.device
    ids = torch.randint(3, model.config.vocab_size, (B, prompt), device=dev)
    cache = model.new_cache(B, prompt + n + 1)
    with torch.inference_mode():
        sync(dev.type)
        t0 = time.perf_counter()
        logits = model(ids, cache=cache, num_logits=1)[:, -1]                   # (B, V)
        tok = logits.argmax(-1)
        sync(dev.type)
        ttft = time.perf_counter() - t0
        step = {"eager": None, "decode_step": DecodeStep, "cuda_graph": CUDAGraphDecode}[how]
        step = step and step(model, cache)
        pos = torch.full((B,), prompt, device=dev)
        t1 = time.perf_counter()
        for _ in range(n):
            logits = step(tok, pos) if step else model(tok[:, None], position_ids=pos[:, None], cache=cache)[:, -1]
            tok = logits.argmax(-1)
            pos += 1
        sync(dev.type)
    return dict(ttft_ms=ttft * 1e3, tokens_per_s=B * n / (time.perf_counter() - t1))


def _hf_decode(model, B: int, prompt: int, n: int) -> dict:
    ids = torch.randint(3, model.config.vocab_size, (B, prompt), device=model.device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        sync(model.device.type)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        sync(model.device.type)
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=n + 1, min_new_tokens=n + 1, **kw)
        sync(model.device.type)
    return dict(ttft_ms=ttft * 1e3, tokens_per_s=B * n / max(time.perf_counter() - t1 - ttft, 1e-9))


def decode_speed(ctx: Ctx) -> dict:
    """Batch 1 and 8 decode tokens/s and TTFT (prompt 512) on Phi-3-mini shapes with random weights, bf16 and NF4:
    model.forward per token, DecodeStep, CUDAGraphDecode, and transformers' generate (bf16). `--tiny`: the tiny
    random Phi-3, batch 2, two tokens."""
    prompt, n = (16, 2) if ctx.tiny else (512, 64)
    hows = ["eager", "decode_step"] + (["cuda_graph"] if ctx.cuda else [])
    out = {}
    # on CPU the torch path: under the interpreter nothing would be timed (the kernels part checks the kernels there)
    with torch_path() if not ctx.cuda else contextlib.nullcontext():
        for quant in (False, True):
            _decode_ours(ctx, quant, prompt, n, hows, out)
    if importlib.util.find_spec("transformers") is None:
        out["transformers"] = "not installed"
        return out
    transformers = importlib.import_module("transformers")
    cfg = transformers.Phi3Config(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, pad_token_id=0) if ctx.tiny else transformers.Phi3Config(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32)
    with torch.device(ctx.device):
        hf = transformers.Phi3ForCausalLM(cfg).to(torch.bfloat16 if ctx.cuda else torch.float32).eval()
    for B in (2,) if ctx.tiny else (1, 8):
        _hf_decode(hf, B, prompt, 2)
        out[f"transformers_bf16_b{B}"] = r = _hf_decode(hf, B, prompt, n)
        for how in hows:
            out[f"bf16_b{B}_{how}"]["over_transformers"] = out[f"bf16_b{B}_{how}"]["tokens_per_s"] / r["tokens_per_s"]
    return out


def _decode_ours(ctx: Ctx, quant: bool, prompt: int, n: int, hows: list[str], out: dict) -> None:
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    model = tiny_model(ctx.device, dtype) if ctx.tiny else phi3_mini_random(dtype, quant, ctx.device)
    if ctx.tiny and quant:
        model = quantize_model_(model.cpu()).to(ctx.device)
    for B in (2,) if ctx.tiny else (1, 8):
        for how in hows:
            _decode(model, B, prompt, 2, how)  # warm-up: Triton compiles, graph capture
            out[f"{'nf4' if quant else 'bf16'}_b{B}_{how}"] = _decode(model, B, prompt, n, how)
    del model
    gc.collect()


def train_speed(ctx: Ctx) -> dict:
    """QLoRA vs LoRA training tokens/s and peak memory (seq 2048, r = 16, bf16 autocast, checkpointing) on
    Phi-3-mini shapes with random weights, beside transformers+PEFT. `--tiny`: a tiny random Phi-3 written to a
    temporary directory, seq 32, one step, both frameworks loading that directory."""
    hf = importlib.util.find_spec("peft") is not None and importlib.util.find_spec("transformers") is not None
    bnb = importlib.util.find_spec("bitsandbytes") is not None and ctx.cuda
    base = dict(dtype="bf16" if ctx.cuda else "fp32", device=ctx.device, rank=16, unfused=False, batch=1,
                no_checkpointing=False, full_logits=False, threads=0, shape="default" if ctx.tiny else "phi3-mini",
                seq=32 if ctx.tiny else 2048, steps=1 if ctx.tiny else 3)
    out = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-train-") as tmp:
        if ctx.tiny:
            save_model(tiny_model("cpu"), tmp, dtype=torch.float32)
            ours, theirs = (lambda a: run_phiforge(a, Path(tmp))), (lambda a: run_hf(a, Path(tmp)))
        else:
            ours, theirs = run_phiforge, run_hf
        runs = [("phiforge", "lora", ours), ("phiforge", "qlora", ours)]
        if hf:
            runs.append(("hf", "lora", theirs))
            if bnb and ctx.tiny:
                runs.append(("hf", "qlora", theirs))
        if not hf:
            out["hf"] = "transformers or peft not installed"
        elif not ctx.tiny:
            # bench_train builds Phi-3-mini for transformers in bf16 without a checkpoint; bitsandbytes quantizes only
            # while loading one, so at these shapes the reference has no QLoRA (its LoRA is the comparison)
            out["hf_qlora"] = "not run: transformers quantizes to NF4 only while loading a checkpoint"
        elif not bnb:
            out["hf_qlora"] = ("not run: bitsandbytes not installed" if ctx.cuda
                               else "not run: bitsandbytes' NF4 training needs CUDA")
        for framework, method, fn in runs:
            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats()
            with torch_path():  # on CPU: the torch path, not the interpreter (on CUDA tensors Triton either way)
                res = fn(argparse.Namespace(**base, method=method, framework=framework))
            out[f"{framework}_{method}"] = {k: res[k] for k in ("tokens_per_s", "peak_memory_bytes", "losses")}
            gc.collect()
            if ctx.cuda:
                torch.cuda.empty_cache()
    for method in ("lora", "qlora"):
        if f"hf_{method}" in out and isinstance(out[f"hf_{method}"], dict):
            out[f"{method}_speed_over_hf"] = out[f"phiforge_{method}"]["tokens_per_s"] / out[f"hf_{method}"]["tokens_per_s"]
    out["qlora_memory_over_lora"] = out["phiforge_qlora"]["peak_memory_bytes"] / out["phiforge_lora"]["peak_memory_bytes"]
    return out


PARTS = dict(nf4_speed=nf4_speed, lora_speed=lora_speed, decode_speed=decode_speed, train_speed=train_speed)
