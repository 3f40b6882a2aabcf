"""LoRA: a frozen linear plus a trainable low-rank update, and merging it into a dense model.

The picture (Hu et al. 2021). A frozen projection W (out, in) gets a parallel path through a rank-r bottleneck:

    x (..., in) ──────────── W ─────────────────────┐
         │                                          (+) ─> y (..., out)
         └─ dropout ─ A (r, in) ─ B (out, r) ─ ·s ──┘

    y = x·Wᵀ + s · (dropout(x)·Aᵀ)·Bᵀ,     s = alpha / r      (rsLoRA: s = alpha / sqrt(r))

A starts kaiming-uniform(a=sqrt(5)) and B at zero, so the update B·A is zero at step 0 and training starts from
exactly the base model; only A and B (r·(in + out) numbers per site) ever get gradients or optimizer state.
W may be a dense nn.Linear (LoRA) or an NF4Linear (QLoRA: the 4-bit base is dequantized on the fly, never stored
in 16 bits). Merging folds the update into a dense weight: W' = W + s·B·A (for QLoRA onto the dequantized W).

Names match PEFT's LoRA layer (`base_layer`, `lora_A`, `lora_B`, `lora_dropout`), so `model.state_dict()` keys
map one-to-one onto the adapter file (see engine/formats/peft.py for the file format and the split→fused import).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from phiforge.kernels.cpu.linear import Linear
from phiforge.kernels.lora import lora_linear
from phiforge.kernels.nf4 import NF4Weight

from .phi3 import FUSED_OF, LINEAR_NAMES
from .quant import NF4Linear


def base_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a dense or NF4 linear."""
    if isinstance(base, NF4Linear):
        n, k = base.qweight.shape
        return int(k), int(n)
    return int(base.in_features), int(base.out_features)


def base_weight(base: nn.Module) -> torch.Tensor | NF4Weight:
    """The frozen weight the fused kernel reads: a dense (out, in) tensor or an NF4Weight."""
    return base.qweight if isinstance(base, NF4Linear) else base.weight


def base_device(base: nn.Module) -> torch.device:
    return base.qweight.device if isinstance(base, NF4Linear) else base.weight.device


def base_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the base computes in (an NF4 weight's compute dtype)."""
    return base.qweight.dtype if isinstance(base, NF4Linear) else base.weight.dtype


def dense_weight(base: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The base weight (out, in) as a dense tensor: itself, or the NF4 weight dequantized."""
    w = base.dequantize() if isinstance(base, NF4Linear) else base.weight
    return w.detach().to(dtype)


class LoRALinear(nn.Module):
    """A frozen `base_layer` plus the trainable update s·B·A. LoRA weights stay fp32 whatever the base dtype
    (Adam on bf16 weights loses small updates); the forward casts them to the activation dtype."""

    use_fused = True  # class switch so the bench can compare the fused kernel with the plain-torch path

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 init: bool = True) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        in_f, out_f = base_features(base)
        dev = base_device(base)
        self.base_layer = base
        self.in_features, self.out_features = in_f, out_f
        self.r, self.lora_alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_f, r, bias=False, device=dev, dtype=torch.float32)  # weight (r, in)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=dev, dtype=torch.float32)  # weight (out, r)
        if init:
            self.reset_lora_parameters()
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    def reset_lora_parameters(self) -> None:
        # PEFT's (and loralib's) init: A like nn.Linear's default, B zero, so B·A = 0 at the start.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out)
        a, b = self.lora_A.weight, self.lora_B.weight
        if self.use_fused:
            return lora_linear(x, base_weight(self.base_layer), a, b, self.scaling,
                               dropout=self.dropout_p, training=self.training)
        # Plain torch: the same math, autograd builds the backward (one extra (..., r) activation kept).
        h = F.linear(self.lora_dropout(x), a.to(x.dtype))  # (..., r)
        return self.base_layer(x) + F.linear(h, b.to(x.dtype)) * self.scaling  # (..., out)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s·B·A (out, in) in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, r)@(r, in)

    @torch.no_grad()
    def merge(self, dtype: torch.dtype | None = None) -> Linear:
        """A dense nn.Linear holding W + s·B·A, summed in fp32 and cast once (onto the dequantized W for NF4)."""
        w = dense_weight(self.base_layer, torch.float32) + self.delta_weight()  # (out, in)
        dtype = dtype or base_dtype(self.base_layer)
        out = Linear(self.in_features, self.out_features, bias=False, device=w.device, dtype=dtype)
        out.weight.copy_(w)
        out.weight.requires_grad_(False)
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.lora_alpha}, " \
               f"scaling={self.scaling:.4g}, dropout={self.dropout_p}"


def lora_modules(model: nn.Module) -> Iterable[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def apply_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.05,
               targets: Iterable[str] = LINEAR_NAMES, use_rslora: bool = False) -> list[str]:
    """Wrap every decoder projection named in `targets` with a LoRALinear; freeze everything else.

    Returns the wrapped module names. A target list that matches nothing is an error (the classic silent failure:
    q_proj/k_proj/v_proj do not exist in Phi-3, whose projections are fused)."""
    targets = tuple(t.strip() for t in targets if t.strip())
    unknown = [t for t in targets if t not in LINEAR_NAMES]
    if unknown or not targets:
        hint = "".join(f"; {t} is part of Phi-3's fused {FUSED_OF[t]}" for t in unknown if t in FUSED_OF)
        raise ValueError(f"LoRA targets {list(targets)} match no module: Phi-3's projections are "
                         f"{', '.join(LINEAR_NAMES)}{hint}")
    for p in model.parameters():
        p.requires_grad_(False)
    sites = [(n, m) for n, m in model.linears(targets) if not isinstance(m, LoRALinear)]
    if not sites:
        raise ValueError(f"LoRA targets {list(targets)} matched no module in the model")
    for name, module in sites:
        model.set_submodule(name, LoRALinear(module, r, alpha, dropout, use_rslora))
    return [n for n, _ in sites]


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def merge_adapter(model: nn.Module, dtype: torch.dtype | None = None, dequantize_all: bool = True) -> nn.Module:
    """Replace every LoRALinear by its merged dense linear (in place) and, with `dequantize_all`, every remaining
    NF4Linear by its dequantized dense linear, so the model is an ordinary dense Phi-3 ready for save_model."""
    for name, m in list(lora_modules(model)):
        model.set_submodule(name, m.merge(dtype))
    if dequantize_all:
        for name, m in list(model.named_modules()):
            if isinstance(m, NF4Linear):
                w = dense_weight(m, dtype or m.qweight.dtype)
                lin = Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    lin.weight.copy_(w)
                lin.weight.requires_grad_(False)
                model.set_submodule(name, lin)
    return model
