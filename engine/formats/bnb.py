"""bitsandbytes NF4 checkpoints in and out: a directory that transformers + bitsandbytes writes or loads.

- `load_prequantized` (the loader's hook) / `load_nf4_state` read a transformers+bitsandbytes NF4 checkpoint, in
  the fused Phi-3 layout (qkv_proj, gate_up_proj) or the split one some uploads use (q/k/v_proj, gate/up_proj),
  fusing the parts on load; the projections become NF4Linear (engine/model/quant.py, which reads and writes one
  weight's tensors), everything else is read dense.
- `save_nf4_checkpoint` writes a directory that `Phi3ForCausalLM.from_pretrained` (transformers + bitsandbytes)
  loads; `phiforge quantize --model DIR --out DIR` (phiforge/commands/quantize.py) is its CLI.

Shape legend: N out_features, K in_features, nb = ceil(N*K / blocksize) blocks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from phiforge.engine.model.phi3 import FUSED_PARTS
from phiforge.engine.model.quant import QS_KEY, CheckpointFormatError, NF4Linear, nf4_modules, read_nf4
from phiforge.engine.model.weights import DTYPE_NAMES, write_checkpoint
from phiforge.kernels.nf4 import NF4Weight, nf4_dequantize, quantize_nf4


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
        if prefix + QS_KEY in keys:
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
