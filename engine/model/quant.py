"""NF4 in the model: the NF4Linear plug-in, quantize-while-loading, and bitsandbytes checkpoints in and out.

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
- `load_prequantized` reads a transformers+bitsandbytes NF4 checkpoint, in the fused Phi-3 layout (qkv_proj,
  gate_up_proj) or the split one some uploads use (q/k/v_proj, gate/up_proj), fusing the parts on load.
- `save_nf4_checkpoint` writes a directory that `Phi3ForCausalLM.from_pretrained` (transformers + bitsandbytes)
  loads; `phiforge quantize --model DIR --out DIR` (phiforge/commands/quantize.py) is its CLI.

Shape legend: N out_features, K in_features, nb = ceil(N*K / blocksize) blocks, nnb = ceil(nb / 256).
"""
from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from phiforge.kernels.cpu.linear import Linear
from phiforge.kernels.nf4 import BLOCKSIZES, NF4Weight, nf4_dequantize, quantize_nf4
from phiforge.kernels.nf4_matmul import nf4_matmul

from .phi3 import FUSED_PARTS
from .weights import DTYPE_NAMES, DTYPES, CheckpointError, write_checkpoint

_QS_KEY = "weight.quant_state.bitsandbytes__nf4"


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
        if prefix + _QS_KEY not in state_dict:
            missing_keys.append(prefix + _QS_KEY)
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


_libc = None


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
    out[_QS_KEY] = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
    return out


def read_nf4(get: Callable[[str], torch.Tensor], prefix: str, dtype: torch.dtype | None = None,
             where: str = "") -> NF4Weight:
    """One NF4 weight from bitsandbytes' tensors `prefix + "weight..."`; `where` names the file in errors."""
    def fetch(suffix: str) -> torch.Tensor:
        try:
            return get(prefix + suffix)
        except (KeyError, ValueError):  # a dict raises KeyError, the safetensors reader a ValueError
            raise CheckpointFormatError(f"{where}: tensor {prefix + suffix!r} is missing") from None

    raw = fetch(_QS_KEY)
    try:
        state = json.loads(bytes(raw.reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{where}: tensor {prefix + _QS_KEY!r} is not UTF-8 JSON ({e})") from None
    key = prefix + _QS_KEY
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


class CheckpointFormatError(CheckpointError):
    """A bitsandbytes checkpoint phiforge cannot read; the message names the file and the tensor."""


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


# ---------------------------------------------------------------------------------------------------------------
# Read a bitsandbytes checkpoint
# ---------------------------------------------------------------------------------------------------------------

def check_quantization_config(qc: dict | None, source: str = "config.json") -> None:
    if not isinstance(qc, dict):
        raise CheckpointFormatError(f"{source}: quantization_config is missing or not an object")
    if qc.get("quant_method") != "bitsandbytes":
        raise CheckpointFormatError(f"{source}: quantization_config.quant_method {qc.get('quant_method')!r}: "
                                    f"only 'bitsandbytes' NF4 checkpoints are supported")
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise CheckpointFormatError(f"{source}: quantization_config: 8-bit (LLM.int8) checkpoints are not supported")
    if qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise CheckpointFormatError(f"{source}: quantization_config.bnb_4bit_quant_type "
                                    f"{qc.get('bnb_4bit_quant_type', 'fp4')!r}: only 'nf4' is supported")


def _fuse(parts: list[NF4Weight], dtype: torch.dtype) -> NF4Weight:
    """Stack NF4 weights row-wise into one (sum N_i, K) weight, preserving every dequantized value."""
    bs = parts[0].blocksize
    K = parts[0].shape[1]
    N = sum(p.shape[0] for p in parts)
    aligned = all(p.blocksize == bs and p.shape[1] == K and p.numel % bs == 0 for p in parts)
    if not aligned:
        # A block would straddle two parts, so the parts' bytes cannot simply be stacked: dequantize, concatenate
        # and re-quantize. This changes values (the straddling blocks get a new absmax); bitsandbytes itself never
        # writes such a split for Phi-3 shapes, whose N*K are multiples of every blocksize.
        dense = torch.cat([nf4_dequantize(p, torch.float32) for p in parts])  # (N, K)
        return quantize_nf4(dense.to(dtype), bs, any(p.double_quant for p in parts))
    packed = torch.cat([p.packed for p in parts])  # (N*K/2,): each part ends on a block, hence on a byte
    if not any(p.double_quant for p in parts):
        return NF4Weight(packed=packed, absmax=torch.cat([p.absmax for p in parts]), shape=(N, K), blocksize=bs,
                         code=parts[0].code, dtype=dtype)
    # Each part has its own offset and nested scales, which one NF4Weight cannot hold; the parts' exact fp32
    # scales (bitsandbytes' own dequantization of them) keep every value bit-identical at 4 more bytes per block.
    absmax = torch.cat([p.absmax_fp32() for p in parts])  # (nb,)
    return NF4Weight(packed=packed, absmax=absmax, shape=(N, K), blocksize=bs, code=parts[0].code, dtype=dtype)


def load_nf4_state(model: nn.Module, tensors: Any, config: Any, dtype: torch.dtype | None = None,
                   device: str | torch.device = "cpu", source: str = "checkpoint") -> nn.Module:
    """Fill `model` (built on the meta device) from a bitsandbytes checkpoint's tensors (`.keys()`, `[key]` or
    `.get(key)`): NF4 projections become NF4Linear, everything else is read dense in `dtype`."""
    check_quantization_config(getattr(config, "quantization_config", config), source)
    get = tensors.get if hasattr(tensors, "get") and not isinstance(tensors, dict) else tensors.__getitem__
    keys = set(tensors.keys())
    file_of = getattr(tensors, "file_of", {})

    def where(key: str) -> str:
        return str(file_of.get(key, source))

    dtype = dtype or getattr(model, "dtype", None) or torch.bfloat16
    used: set[str] = set()

    def take(prefix: str) -> NF4Weight | torch.Tensor | None:
        if prefix + _QS_KEY in keys:
            mine = {k for k in keys if k.startswith(prefix + "weight")}
            used.update(mine)
            return read_nf4(get, prefix, dtype, where(prefix + "weight")).to(device)
        if prefix + "weight" in keys:
            used.add(prefix + "weight")
            return get(prefix + "weight").to(device=device, dtype=dtype)
        return None

    for name in [n for n, _ in model.linears()]:  # a list: modules are swapped while looping
        module = model.get_submodule(name)
        N, K = module.out_features, module.in_features
        parent, leaf = name.rsplit(".", 1)
        w = take(name + ".")
        if w is None and leaf in FUSED_PARTS:
            parts = [take(f"{parent}.{p}.") for p in FUSED_PARTS[leaf]]
            if all(p is not None for p in parts):
                if all(isinstance(p, NF4Weight) for p in parts):
                    w = _fuse(parts, dtype)
                else:  # a mix of NF4 and dense parts (e.g. llm_int8_skip_modules): fuse densely
                    w = torch.cat([p if isinstance(p, torch.Tensor) else nf4_dequantize(p, dtype) for p in parts])
        if w is None:
            raise CheckpointFormatError(f"{source}: no weight for {name!r} (looked for {name}.weight"
                                        + (f" and {', '.join(f'{parent}.{p}.weight' for p in FUSED_PARTS[leaf])}"
                                           if leaf in FUSED_PARTS else "") + ")")
        shape = tuple(w.shape)
        if shape != (N, K):
            raise CheckpointFormatError(f"{where(name + '.weight')}: tensor {name + '.weight'!r} has shape "
                                        f"{list(shape)}, the config implies {[N, K]}")
        if isinstance(w, NF4Weight):
            model.set_submodule(name, NF4Linear(w))
        else:
            module.weight = nn.Parameter(w, requires_grad=False)

    for key, param in list(model.named_parameters()):
        if not param.is_meta:
            continue
        if key not in keys:
            if key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
                continue
            raise CheckpointFormatError(f"{source}: tensor {key!r} is missing")
        t = get(key)
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointFormatError(f"{where(key)}: tensor {key!r} has shape {list(t.shape)}, "
                                        f"the config implies {list(param.shape)}")
        module_name, attr = key.rsplit(".", 1)
        setattr(model.get_submodule(module_name), attr, nn.Parameter(t.to(device=device, dtype=dtype),
                                                                     requires_grad=False))
        used.add(key)
    unexpected = sorted(k for k in keys - used if not k.endswith("rotary_emb.inv_freq")
                        and not (k == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)))
    if unexpected:
        raise CheckpointFormatError(f"{where(unexpected[0])}: unexpected tensor {unexpected[0]!r}"
                                    + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    return model


def load_prequantized(model: nn.Module, reader: Any, dtype: torch.dtype | None = None,
                      device: str | torch.device = "cpu") -> nn.Module:
    """The loader's hook: `reader` has `.keys()` and `.get(key)` over the (sharded, memory-mapped) safetensors."""
    source = str(getattr(reader, "dir", "checkpoint"))
    return load_nf4_state(model, reader, model.config, dtype=dtype, device=device, source=source)


# ---------------------------------------------------------------------------------------------------------------
# Write a bitsandbytes checkpoint
# ---------------------------------------------------------------------------------------------------------------

def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The config.json block transformers 5 writes for a bitsandbytes NF4 model (and reads back)."""
    nf4 = list(nf4_modules(model))
    if not nf4:
        raise ValueError("the model has no NF4Linear layers; quantize it first (quantize_model_)")
    dq = all(m.nested_absmax is not None for m in nf4)
    return {
        "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": DTYPE_NAMES[nf4[0].dtype],
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": dq,
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def save_nf4_checkpoint(model: nn.Module, out_dir: str | Path, config_dict: dict[str, Any] | None = None,
                        copy_from: str | Path | None = None) -> Path:
    """Write `model` (NF4 projections, dense rest) as a transformers+bitsandbytes checkpoint, atomically.

    config_dict: the Hugging Face config (defaults to model.config.to_hf()); its quantization_config is replaced by
    the one describing these weights. copy_from: a model directory whose tokenizer/generation files are copied.
    """
    hf = dict(config_dict if config_dict is not None else model.config.to_hf())
    hf["quantization_config"] = quantization_config(model)
    dense_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.bfloat16)
    hf["torch_dtype"] = hf["dtype"] = DTYPE_NAMES[dense_dtype]
    tied = bool(hf.get("tie_word_embeddings", False))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight") and not k.endswith("rotary_emb.inv_freq")}
    return write_checkpoint(out_dir, state, hf, copy_from)


def nf4_modules(model: nn.Module) -> Iterator[NF4Linear]:
    return (m for m in model.modules() if isinstance(m, NF4Linear))
