"""Load (and save) Hugging Face Phi-3 checkpoints: safetensors, single or sharded, bf16/fp16/fp32.

The model is built on the meta device and each tensor is read from the memory-mapped file, cast and placed one at
a time, so peak memory is the model in its target dtype plus one tensor, never two copies of the model. With
`quant="nf4"` each decoder projection is quantized right after it is read (peak: the NF4 model plus one layer).

Every failure names the file and the tensor: a truncated shard, a missing, unexpected or mis-shaped tensor.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save_file
from torch import nn

from .config import Phi3Config
from .model import LINEAR_NAMES, Phi3ForCausalLM

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ST_DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                  "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_ST_TORCH_DTYPE = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                   "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                   "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class CheckpointError(ValueError):
    """A checkpoint phiforge cannot load; the message names the file and the tensor."""


def _read_header(path: Path) -> tuple[dict, int]:
    """Parse and validate a safetensors header (every tensor's bytes must lie inside the file); returns it and the
    file offset where the data section starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated (only {size} bytes, no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated header ({n} header bytes declared, file is {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    data = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        expect = _ST_DTYPE_SIZE.get(info["dtype"], 1)
        for d in info["shape"]:
            expect *= d
        if end > data:
            raise CheckpointError(f"{path}: truncated: tensor {key!r} needs bytes up to {end} of the data section, "
                                  f"which holds only {data}")
        if end - begin != expect:
            raise CheckpointError(f"{path}: tensor {key!r} has {end - begin} bytes for shape {info['shape']} "
                                  f"{info['dtype']} ({expect} expected)")
    return header, 8 + n


class SafetensorsReader:
    """All tensors of a checkpoint directory, across shards, read lazily from memory-mapped files."""

    def __init__(self, path: str | Path) -> None:
        self.dir = Path(path)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif (self.dir / "model.safetensors").exists():
            files, weight_map = ["model.safetensors"], None
        else:
            raise CheckpointError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        self.file_of: dict[str, Path] = {}
        self.info: dict[str, dict] = {}
        for name in files:
            p = self.dir / name
            if not p.exists():
                raise CheckpointError(f"{p}: shard listed in {index.name} is missing")
            header, data_start = _read_header(p)
            for key, info in header.items():
                if key != "__metadata__":
                    self.file_of[key], self.info[key] = p, {**info, "data_start": data_start}
        if weight_map is not None:
            for key, shard in weight_map.items():
                if key not in self.file_of:
                    raise CheckpointError(f"{self.dir / shard}: tensor {key!r} listed in the index is not in the file")
        self._maps: dict[Path, mmap.mmap] = {}

    def keys(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.info[key]["shape"])

    def get(self, key: str, copy: bool = False) -> torch.Tensor:
        """The tensor as stored. By default a zero-copy view of a private (copy-on-write) file mapping, so a
        tensor kept in its stored dtype costs no extra memory; `copy=True` reads it into its own buffer instead,
        for tensors about to be cast or quantized (their file pages are then never mapped in)."""
        if key not in self.file_of:
            raise CheckpointError(f"{self.dir}: tensor {key!r} is missing")
        p, info = self.file_of[key], self.info[key]
        dtype = _ST_TORCH_DTYPE.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{p}: tensor {key!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        offset = info["data_start"] + begin
        if end == begin:
            return torch.empty(info["shape"], dtype=dtype)
        if copy:
            buf = bytearray(end - begin)
            with open(p, "rb") as f:
                f.seek(offset)
                f.readinto(buf)
            flat = torch.frombuffer(buf, dtype=dtype)
        else:
            if p not in self._maps:
                with open(p, "rb") as f:
                    self._maps[p] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            flat = torch.frombuffer(self._maps[p], dtype=dtype, count=(end - begin) // dtype.itemsize, offset=offset)
        return flat.view(info["shape"])


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


def _resolve_dtype(dtype, cfg: Phi3Config) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or cfg.torch_dtype or "float32"
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; use one of float32, float16, bfloat16")
    return DTYPES[name]


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
               quant: str | None = None, adapter: str | Path | None = None) -> Phi3ForCausalLM:
    """A Phi3ForCausalLM from a Hugging Face directory; frozen (requires_grad False), in eval mode.

    dtype: None keeps the checkpoint's dtype (config.json torch_dtype). quant: None, or "nf4" to quantize the decoder
    projections while loading. A checkpoint with a bitsandbytes `quantization_config` loads its NF4 weights as they
    are. adapter: a PEFT LoRA directory applied unmerged.
    """
    path = Path(path)
    cfg = Phi3Config.from_file(path)
    dtype = _resolve_dtype(dtype, cfg)
    if quant not in (None, "nf4"):
        raise ValueError(f"quant={quant!r}: only None and 'nf4' are supported")
    reader = SafetensorsReader(path)
    model = Phi3ForCausalLM(cfg, device="meta")
    model.rotary_emb.to(device)

    if cfg.quantization_config is not None:
        from . import quant as q  # noqa: PLC0415  (NF4 lives in its own module)
        q.load_prequantized(model, reader, dtype=dtype, device=device)
    else:
        _load_dense(model, reader, dtype, device, quantize=quant == "nf4")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise CheckpointError(f"{path}: tensor {name!r} was never loaded")
    model.eval()
    if adapter is not None:
        from .lora import load_adapter  # noqa: PLC0415
        load_adapter(model, adapter)
    return model


def _load_dense(model: Phi3ForCausalLM, reader: SafetensorsReader, dtype: torch.dtype, device,
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
    nf4_from_linear = None
    if quantize:
        from .quant import NF4Linear  # noqa: PLC0415
        nf4_from_linear = NF4Linear.from_linear
    for key, shape in shapes.items():
        if reader.shape(key) != shape:
            raise CheckpointError(f"{reader.file_of[key]}: tensor {key!r} has shape {list(reader.shape(key))}, "
                                  f"the config implies {list(shape)}")
        module_name, attr = key.rsplit(".", 1)
        module = model.get_submodule(module_name)
        is_linear = module_name.rsplit(".", 1)[-1] in LINEAR_NAMES
        stored = _ST_TORCH_DTYPE.get(reader.info[key]["dtype"])
        zero_copy = stored == dtype and torch.device(device).type == "cpu" and not (quantize and is_linear)
        t = reader.get(key, copy=not zero_copy).to(device=device, dtype=dtype)
        if nf4_from_linear is not None and is_linear:
            module.weight = nn.Parameter(t, requires_grad=False)
            model.set_submodule(module_name, nf4_from_linear(module))
            del module, t
        else:
            setattr(module, attr, nn.Parameter(t, requires_grad=False))


def _atomic_dir(out_dir: Path):
    """A temp dir beside `out_dir`; call commit(tmp) to swap it in (an existing dir is replaced)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))

    def commit() -> None:
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    return tmp, commit


def write_checkpoint(out_dir: str | Path, state: dict[str, torch.Tensor], hf_config: dict,
                     copy_from: str | Path | None = None) -> Path:
    """model.safetensors + config.json (+ the tokenizer/generation files of `copy_from`), written into a temp dir
    beside `out_dir` and swapped in whole: a crash leaves the old checkpoint or the new one, never half of one."""
    out_dir = Path(out_dir)
    tmp, commit = _atomic_dir(out_dir)
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if copy_from is not None:
            copy_auxiliary_files(copy_from, tmp)
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_model(model: Phi3ForCausalLM, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
               copy_from: str | Path | None = None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a dense HF checkpoint atomically. `tensors` overrides the model's own state (e.g. merged LoRA weights)."""
    state = tensors if tensors is not None else {
        k: v for k, v in model.state_dict().items()
        if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in state.items()}
    hf = model.config.to_hf()
    hf["torch_dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    hf.pop("quantization_config", None)
    return write_checkpoint(out_dir, state, hf, copy_from)


AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
             "chat_template.jinja", "tokenizer.model", "added_tokens.json")


def copy_auxiliary_files(src: str | Path, dst: str | Path, names: Iterable[str] = AUX_FILES) -> None:
    for name in names:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, Path(dst) / name)
