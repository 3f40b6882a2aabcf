"""NF4 in the model: the NF4Linear plug-in, its bitsandbytes serialization, and quantize-while-loading.

- `NF4Linear` replaces a decoder projection's `nn.Linear`: it holds an `NF4Weight` (kernels/nf4.py) as buffers and
  computes y = x · dequantize(W)ᵀ with the NF4 kernels (phiforge.kernels.nf4_matmul). Its `state_dict()` uses
  bitsandbytes' keys, so a model's state is a bitsandbytes checkpoint as it stands:

      X.weight                                   uint8 (N*K/2, 1)  packed nibbles
      X.weight.absmax                            uint8 (nb,) codes when double-quantized, else float32 (nb,)
      X.weight.quant_map                         float32 (16,)     the NF4 table
      X.weight.nested_absmax                     float32 (nnb,)    double quantization only
      X.weight.nested_quant_map                  float32 (256,)    double quantization only
      X.weight.quant_state.bitsandbytes__nf4     uint8 JSON: quant_type, blocksize, dtype, shape, nested_* fields

- `quantize_model_` quantizes a dense model in place one projection at a time (peak: the NF4 model plus one
  dense projection); `load_model(path, quant="nf4")` does the same while reading.
- Whole bitsandbytes checkpoints, read and written, are engine/formats/bnb.py's.

Shape legend: N out_features, K in_features, nb = ceil(N*K / blocksize) blocks, nnb = ceil(nb / 256).
"""
from __future__ import annotations

import ctypes
import json
from typing import Callable, Iterator

import torch
from torch import nn

from phiforge.kernels.cpu.linear import Linear
from phiforge.kernels.nf4 import BLOCKSIZES, NF4Weight, nf4_dequantize, quantize_nf4
from phiforge.kernels.nf4_matmul import nf4_matmul

from .weights import DTYPE_NAMES, DTYPES, CheckpointError

QS_KEY = "weight.quant_state.bitsandbytes__nf4"
_libc: ctypes.CDLL | bool | None = None  # glibc, loaded on the first release_freed_memory()


class CheckpointFormatError(CheckpointError):
    """A bitsandbytes checkpoint phiforge cannot read; the message names the file and the tensor."""


class NF4Linear(nn.Module):
    """y = x · Wᵀ with W (N, K) stored in bitsandbytes' NF4 layout; no bias (Phi-3 has none)."""

    def __init__(self, qweight: NF4Weight) -> None:
        super().__init__()
        self._set(qweight)

    def _set(self, qweight: NF4Weight) -> None:
        self._q: NF4Weight | None = qweight  # built once: forward is called per token, validation is not free
        self.out_features, self.in_features = qweight.shape
        self.blocksize, self.nested_blocksize = qweight.blocksize, qweight.nested_blocksize
        self.offset, self.dtype = qweight.offset, qweight.dtype
        # persistent=False: the state_dict entries are written under bitsandbytes' names by _save_to_state_dict
        for name in ("packed", "absmax", "code", "nested_absmax", "nested_code"):
            self.register_buffer(name, getattr(qweight, name), persistent=False)

    @property
    def qweight(self) -> NF4Weight:
        if self._q is not None and self._q.packed is self.packed and self._q.dtype == self.dtype:
            return self._q
        self._q = NF4Weight(packed=self.packed, absmax=self.absmax, shape=(self.out_features, self.in_features),
                            blocksize=self.blocksize, code=self.code, nested_absmax=self.nested_absmax,
                            nested_code=self.nested_code, nested_blocksize=self.nested_blocksize,
                            offset=self.offset, dtype=self.dtype)
        return self._q

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> "NF4Linear":
        if getattr(linear, "bias", None) is not None:
            raise ValueError("NF4Linear has no bias; Phi-3's projections have none")
        release_freed_memory()  # the previous projection's dense weight, freed by now, goes back to the OS
        return cls(quantize_nf4(linear.weight.detach(), blocksize, double_quant))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_matmul(x, self.qweight)  # (..., K) -> (..., N)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (N, K) weight, exactly as bitsandbytes' dequantize_4bit computes it."""
        return nf4_dequantize(self.qweight, dtype)

    def _apply(self, fn, recurse: bool = True):
        # `.to(device)` moves the buffers, but `.to(dtype)` / `.half()` must not touch the codes or the fp32 scales
        # (that would change the weight): a requested float dtype becomes the compute dtype instead. A float64
        # probe tells what `fn` does to floating-point tensors.
        probe = fn(torch.empty(0, dtype=torch.float64, device=self.packed.device))
        if probe.dtype in DTYPE_NAMES:
            self.dtype = probe.dtype
        for name, t in self._buffers.items():
            if t is not None:
                self._buffers[name] = t.to(probe.device)
        self._q = None  # rebuilt on next use, so the old device's tensors are not kept alive
        return self

    def extra_repr(self) -> str:
        dq = "double-quant" if self.nested_absmax is not None else "fp32 absmax"
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}, "
                f"{dq}, dtype={DTYPE_NAMES.get(self.dtype, self.dtype)}")

    # -- state_dict in bitsandbytes' names ------------------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination.update({prefix + k: v for k, v in nf4_tensors(self.qweight).items()})

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = [k for k in state_dict if k.startswith(prefix + "weight")]
        if prefix + QS_KEY not in state_dict:
            missing_keys.append(prefix + QS_KEY)
            return
        q = read_nf4({k[len(prefix):]: state_dict[k] for k in keys}.__getitem__, "", self.dtype, where=prefix)
        self._set(q.to(self.packed.device))


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Quantizing layer by layer frees one dense weight per projection, but glibc raises its mmap threshold after the
    first large free, so later weights of a few MB come from the heap and stay resident once freed: peak RSS would
    creep towards the dense model. Trimming after each projection keeps it at the NF4 total plus one layer.
    """
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def nf4_tensors(q: NF4Weight) -> dict[str, torch.Tensor]:
    """The bitsandbytes serialization of one weight, keys relative to the module (`weight`, `weight.absmax`...)."""
    state = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": DTYPE_NAMES[q.dtype], "shape": list(q.shape)}
    # The two tables are shared by every weight in memory; cloned, as bitsandbytes does, so safetensors can save them.
    # the packed bytes (n/2,) as bitsandbytes stores them, (n/2, 1)
    out = {"weight": q.packed.view(-1, 1), "weight.absmax": q.absmax, "weight.quant_map": q.code.clone()}
    if q.double_quant:
        out["weight.nested_absmax"] = q.nested_absmax
        out["weight.nested_quant_map"] = q.nested_code.clone()
        state.update(nested_blocksize=q.nested_blocksize, nested_dtype="float32", nested_offset=q.offset)
    out[QS_KEY] = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
    return out


def read_nf4(get: Callable[[str], torch.Tensor], prefix: str, dtype: torch.dtype | None = None,
             where: str = "") -> NF4Weight:
    """One NF4 weight from bitsandbytes' tensors `prefix + "weight..."`; `where` names the file in errors."""
    def fetch(suffix: str) -> torch.Tensor:
        try:
            return get(prefix + suffix)
        except (KeyError, ValueError):  # a dict raises KeyError, the safetensors reader a ValueError
            raise CheckpointFormatError(f"{where}: tensor {prefix + suffix!r} is missing") from None

    raw = fetch(QS_KEY)
    try:
        state = json.loads(bytes(raw.reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{where}: tensor {prefix + QS_KEY!r} is not UTF-8 JSON ({e})") from None
    key = prefix + QS_KEY
    if state.get("quant_type") != "nf4":
        raise CheckpointFormatError(f"{where}: tensor {key!r}: quant_type {state.get('quant_type')!r}; only nf4")
    try:
        shape = tuple(int(s) for s in state["shape"])
        blocksize = int(state["blocksize"])
        nested = "nested_offset" in state
        packed = fetch("weight")
        if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage other than uint8: the same bytes, another dtype
            packed = packed.contiguous().view(torch.uint8)
        q = NF4Weight(
            packed=packed.reshape(-1), absmax=fetch("weight.absmax").reshape(-1), shape=shape,
            blocksize=blocksize, code=fetch("weight.quant_map").float(),
            nested_absmax=fetch("weight.nested_absmax").float() if nested else None,
            nested_code=fetch("weight.nested_quant_map").float() if nested else None,
            nested_blocksize=int(state.get("nested_blocksize", 256)), offset=float(state.get("nested_offset", 0.0)),
            dtype=dtype or DTYPES.get(state.get("dtype"), torch.bfloat16))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointFormatError):
            raise
        raise CheckpointFormatError(f"{where}: NF4 weight {prefix + 'weight'!r}: {e}") from None
    return q


# ---------------------------------------------------------------------------------------------------------------
# Quantize a dense model in place
# ---------------------------------------------------------------------------------------------------------------

def quantize_model_(model: nn.Module, blocksize: int = 64, double_quant: bool = True) -> nn.Module:
    """Replace every dense decoder projection by an NF4Linear, one at a time (embeddings and lm_head stay dense).

    Names are collected first and each module is fetched on its turn, so once swapped the dense weight has no
    reference left and is freed before the next one is quantized.
    """
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    for name in [n for n, _ in model.linears()]:  # a list: modules are swapped while looping
        if type(model.get_submodule(name)) in (nn.Linear, Linear):
            model.set_submodule(name, NF4Linear.from_linear(model.get_submodule(name), blocksize, double_quant))
    release_freed_memory()
    return model


def nf4_modules(model: nn.Module) -> Iterator[NF4Linear]:
    return (m for m in model.modules() if isinstance(m, NF4Linear))
