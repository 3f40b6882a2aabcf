"""What bench/gpu_check.py's parts share: the run context, the skip signal, timing, the tolerance rule, model
builders (a tiny random Phi-3, Phi-3-mini shapes with random weights) and where the default model lives."""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from phiforge.engine.model.config import Phi3Config
from phiforge.engine.model.phi3 import Phi3ForCausalLM

# A tiny Phi-3 with grouped-query heads and an intermediate size off the NF4 blocksize (blocks straddle rows).
TINY_CFG = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, original_max_position_embeddings=512,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
# the default model's directory under PHIFORGE_HOME (engine/formats/default_model.py builds it; that module imports
# gguf, which a GPU machine may lack, so the name is repeated here rather than imported)
DEFAULT_MODEL = "smollm2-135m-instruct-phi3"
DEFAULT_MARKER = ".phiforge-complete"


class Skip(Exception):
    """A part that cannot run here; the message is the reason recorded in the JSON."""


@dataclass
class Ctx:
    device: str                      # "cuda" or "cpu"
    tiny: bool                       # small shapes and few iterations
    log: Callable[[str], None]

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def iters(self, gpu: int, tiny: int = 2) -> int:
        return tiny if self.tiny else gpu


def require_cuda(ctx: Ctx) -> None:
    if not ctx.cuda:
        raise Skip("no CUDA: this part needs a CUDA device")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, iters: int, warmup: int = 2) -> float:
    """Median milliseconds of `fn` over `iters` calls after `warmup` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(1, iters)):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gbs(device: str, mb: int) -> float:
    """Device-to-device copy, bytes read + written per second: the bandwidth a memory-bound kernel can hope for."""
    src = torch.empty(mb * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, iters=10)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def ref_error(out: torch.Tensor, ref_dtype: torch.Tensor, ref64: torch.Tensor, rel_eps: float = 1e-6) -> dict:
    """tests/ref_error.py's rule: a kernel is at most twice as far from an fp64 reference as the reference computed
    in the kernel's dtype is, |out - ref64| <= 2 |ref_dtype - ref64| + eps. Returns the figures and the verdict."""
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref_dtype.double() - ref64).abs().max().item()
    eps = rel_eps * (ref64.abs().max().item() + 1e-30)
    return dict(error=err, ref_error=ref_err, ok=bool(out.shape == ref64.shape and err <= 2 * ref_err + eps))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: one number for "equal up to rounding" between two paths."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def tiny_model(device: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> Phi3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Phi3Config(**{**TINY_CFG, **overrides})
    model = Phi3ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() == 2 else p.fill_(1.0)
    return model.to(device=device, dtype=dtype).eval()


def default_model_dir() -> Path:
    home = Path(os.environ.get("PHIFORGE_HOME") or Path.home() / ".cache" / "phiforge")
    path = home / DEFAULT_MODEL
    if not (path / DEFAULT_MARKER).is_file():
        raise Skip(f"default model not available: {path} (run `phiforge fetch` where the gguf package is installed, "
                   f"or carry that directory)")
    return path
