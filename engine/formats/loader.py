"""Load and save Hugging Face Phi-3 models: safetensors, single or sharded, bf16/fp16/fp32, dense or bitsandbytes
NF4, with a PEFT LoRA adapter applied on top (file reading and writing itself is engine/model/weights.py's).

The model is built on the meta device and each tensor is read from the memory-mapped file, cast and placed one at
a time, so peak memory is the model in its target dtype plus one tensor, never two copies of the model. With
`quant="nf4"` each decoder projection is quantized right after it is read (peak: the NF4 model plus one layer).

Every failure names the file and the tensor: a truncated shard, a missing, unexpected or mis-shaped tensor.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from phiforge.engine.formats.gguf.reader import GGUFTensors, open_phi3_gguf
from phiforge.engine.model.config import Phi3Config
from phiforge.engine.model.phi3 import LINEAR_NAMES, Phi3ForCausalLM
from phiforge.engine.model.quant import NF4Linear
from phiforge.engine.model.weights import DTYPE_NAMES, DTYPES, CheckpointError, SafetensorsReader, write_checkpoint

from .bnb import load_prequantized
from .peft import load_adapter


def expected_shapes(cfg: Phi3Config) -> dict[str, tuple[int, ...]]:
    """The dense checkpoint's keys and shapes, derived from the config alone."""
    C, I, hs = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, C), "model.norm.weight": (C,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, C)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
            p + "self_attn.qkv_proj.weight": ((nh + 2 * nkv) * hs, C), p + "self_attn.o_proj.weight": (C, nh * hs),
            p + "mlp.gate_up_proj.weight": (2 * I, C), p + "mlp.down_proj.weight": (C, I),
        })
    return shapes


def _resolve_dtype(dtype: torch.dtype | str | None, cfg: Phi3Config) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or cfg.torch_dtype or "float32"
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; use one of float32, float16, bfloat16")
    return DTYPES[name]


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
               quant: str | None = None, adapter: str | Path | None = None) -> Phi3ForCausalLM:
    """A Phi3ForCausalLM from a Hugging Face directory or a phi3 GGUF file; frozen (requires_grad False), in eval mode.

    dtype: None keeps the checkpoint's dtype (config.json torch_dtype). quant: None, or "nf4" to quantize the decoder
    projections while loading. A checkpoint with a bitsandbytes `quantization_config` loads its NF4 weights as they
    are. adapter: a PEFT LoRA directory applied unmerged.
    """
    path = Path(path)
    if path.suffix == ".gguf":  # a phi3 GGUF, dequantized tensor by tensor (engine/formats/gguf/reader.py)
        hf, reader = open_phi3_gguf(path)
        cfg = Phi3Config.from_hf(hf, source=str(path))
    else:
        cfg = Phi3Config.from_file(path)
        reader = SafetensorsReader(path)
    dtype = _resolve_dtype(dtype, cfg)
    if quant not in (None, "nf4"):
        raise ValueError(f"quant={quant!r}: only None and 'nf4' are supported")
    model = Phi3ForCausalLM(cfg, device="meta")
    model.rotary_emb.to(device)

    if cfg.quantization_config is not None:
        load_prequantized(model, reader, dtype=dtype, device=device)
    else:
        _load_dense(model, reader, dtype, device, quantize=quant == "nf4")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise CheckpointError(f"{path}: tensor {name!r} was never loaded")
    model.eval()
    if adapter is not None:
        load_adapter(model, adapter)
    return model


def _load_dense(model: Phi3ForCausalLM, reader: SafetensorsReader | GGUFTensors, dtype: torch.dtype, device: str | torch.device,
                quantize: bool) -> None:
    shapes = expected_shapes(model.config)
    present = set(reader.keys())
    # Some exports keep a copy of the tied lm_head; it is the embedding by definition, so ignore it.
    if model.config.tie_word_embeddings:
        present.discard("lm_head.weight")
    missing = sorted(set(shapes) - present)
    unexpected = sorted(k for k in present - set(shapes) if not k.endswith("rotary_emb.inv_freq"))
    if missing:
        files = ", ".join(sorted({p.name for p in reader.file_of.values()}))
        raise CheckpointError(f"{reader.dir} ({files}): missing tensor {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"{reader.file_of[unexpected[0]]}: unexpected tensor {unexpected[0]!r}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for key, shape in shapes.items():
        if reader.shape(key) != shape:
            raise CheckpointError(f"{reader.file_of[key]}: tensor {key!r} has shape {list(reader.shape(key))}, "
                                  f"the config implies {list(shape)}")
        module_name, attr = key.rsplit(".", 1)
        module = model.get_submodule(module_name)
        is_linear = module_name.rsplit(".", 1)[-1] in LINEAR_NAMES
        zero_copy = reader.dtype(key) == dtype and torch.device(device).type == "cpu" and not (quantize and is_linear)
        t = reader.get(key, copy=not zero_copy).to(device=device, dtype=dtype)
        if quantize and is_linear:
            module.weight = nn.Parameter(t, requires_grad=False)
            model.set_submodule(module_name, NF4Linear.from_linear(module))
            del module, t
        else:
            setattr(module, attr, nn.Parameter(t, requires_grad=False))


def save_model(model: Phi3ForCausalLM, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
               copy_from: str | Path | None = None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a dense HF checkpoint atomically. `tensors` overrides the model's own state (e.g. merged LoRA weights)."""
    state = tensors if tensors is not None else {
        k: v for k, v in model.state_dict().items()
        if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in state.items()}
    hf = model.config.to_hf()
    hf["torch_dtype"] = DTYPE_NAMES[dtype]
    hf.pop("quantization_config", None)
    return write_checkpoint(out_dir, state, hf, copy_from)
