"""Checkpoint I/O, the engine's leaf: safetensors in (sharded, memory-mapped, validated), a whole checkpoint
directory out (atomically), and the one table of dtype names.

Reading validates the header before any tensor is touched: every tensor's bytes must lie inside its file and match
its shape and dtype, so a truncated or corrupt shard fails here with the file and the tensor named, never later as
garbage weights. Writing builds the directory under a temp name and swaps it in whole (engine/atomic.py): a crash
leaves the old checkpoint or the new one, never half of one.

Where a checkpoint is: `resolve_model` takes a directory or a Hugging Face model id (`microsoft/Phi-3-mini-4k-instruct`)
and returns a directory; an id resolves through huggingface_hub's cache (the files already there when HF_HUB_OFFLINE
is set, a download otherwise; HF_HOME picks the cache), fetching only config, tokenizer and safetensors files.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Iterable

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError
from safetensors.torch import save_file

from phiforge.engine.atomic import atomic_dir

# The names config.json (torch_dtype), the CLIs and bitsandbytes' quant_state use for the compute dtypes.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

_ST_DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                  "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
ST_TORCH_DTYPE = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                  "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}

# Files of a Hugging Face model directory besides the weights, carried over when a checkpoint is rewritten.
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
             "chat_template.jinja", "tokenizer.model", "added_tokens.json")


# owner/name, as the Hub spells ids; a path that exists always wins over an id that looks the same
HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
HF_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


def resolve_model(spec: str | Path) -> Path:
    """A model directory for `spec`: the directory itself, or a Hugging Face id resolved through the hub cache.
    Raises FileNotFoundError naming the id (or path) and what to do."""
    path = Path(spec)
    if path.exists() or not HF_ID.fullmatch(str(spec)):
        return path
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(str(spec), allow_patterns=HF_FILES))
    except LocalEntryNotFoundError:
        how = ("HF_HUB_OFFLINE is set: unset it to download it" if offline
               else "it could not be downloaded (no network?)")
        raise FileNotFoundError(f"{spec}: no such directory, and not in the Hugging Face cache; {how}, or give a "
                                "model directory") from None
    except (HfHubHTTPError, HFValidationError, OSError) as e:
        raise FileNotFoundError(f"{spec}: no such directory, and the Hugging Face Hub could not provide it "
                                f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


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

    def dtype(self, key: str) -> torch.dtype | None:
        """The stored dtype (None for one torch has no name for)."""
        return ST_TORCH_DTYPE.get(self.info[key]["dtype"])

    def get(self, key: str, copy: bool = False) -> torch.Tensor:
        """The tensor as stored. By default a zero-copy view of a private (copy-on-write) file mapping, so a
        tensor kept in its stored dtype costs no extra memory; `copy=True` reads it into its own buffer instead,
        for tensors about to be cast or quantized (their file pages are then never mapped in)."""
        if key not in self.file_of:
            raise CheckpointError(f"{self.dir}: tensor {key!r} is missing")
        p, info = self.file_of[key], self.info[key]
        dtype = ST_TORCH_DTYPE.get(info["dtype"])
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


def write_checkpoint(out_dir: str | Path, state: dict[str, torch.Tensor], hf_config: dict,
                     copy_from: str | Path | None = None) -> Path:
    """model.safetensors + config.json (+ the tokenizer/generation files of `copy_from`), swapped in whole."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if copy_from is not None:
            copy_auxiliary_files(copy_from, tmp)
    return out_dir


def copy_auxiliary_files(src: str | Path, dst: str | Path, names: Iterable[str] = AUX_FILES) -> None:
    """Copy the tokenizer/generation files of model directory `src` that exist into `dst`."""
    for name in names:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, Path(dst) / name)
