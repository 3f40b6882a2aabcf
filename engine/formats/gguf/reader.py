"""Read a `phi3` GGUF (the form Phi-3 GGUFs are published in, and what `phiforge export` writes) as a Phi-3 model.

The inverse of engine/formats/gguf/writer.py's renaming: `blk.i.attn_qkv` -> `qkv_proj`, `blk.i.ffn_up` (gate | up) ->
`gate_up_proj`, and so on; no Q/K permutation (phi3 rotates head halves, as Hugging Face does). A file with separate
`attn_q/k/v` (or `ffn_gate` beside `ffn_up`) is fused on the way in. Tensors are dequantized with
`gguf.quants.dequantize` (f32, f16, bf16, q8_0, q4_0, q4_1 and the rest it knows) into float32 (out, in) arrays.

Two consumers: engine/formats/loader.py's `load_model(FILE.gguf)` reads the tensors lazily through `GGUFTensors`,
which answers like a SafetensorsReader keyed by Phi-3 names; engine/formats/default_model.py writes a whole Hugging
Face directory.

Legend: C = hidden size, I = intermediate size, nh / nkv = query / key-value heads, hs = head size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from phiforge.engine.model.weights import CheckpointError

from .names import BLOCK_NAMES, STOP_IDS_KEY

SUPPORTED = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1}
STORED_DTYPE = {Q.F32: "float32", Q.F16: "float16", Q.BF16: "bfloat16"}  # quantized files load as bfloat16


def fields(reader: Any) -> dict[str, Any]:
    """Every metadata key of a GGUF with its value (strings, numbers, lists)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _need(f: dict[str, Any], key: str, src: Path) -> Any:
    if key not in f:
        raise CheckpointError(f"{src}: GGUF metadata field {key!r} is missing")
    return f[key]


def phi3_config(f: dict[str, Any], tensor_names: set[str], src: Path, torch_dtype: str) -> dict[str, Any]:
    """config.json (Hugging Face Phi-3 form) from a phi3 GGUF's metadata."""
    arch = f.get("general.architecture")
    if arch != "phi3":
        raise CheckpointError(f"{src}: general.architecture is {arch!r}; this reader takes phi3 GGUFs")
    m = lambda key: _need(f, f"phi3.{key}", src)  # noqa: E731
    hidden, heads = int(m("embedding_length")), int(m("attention.head_count"))
    ctx = int(m("context_length"))
    rot = int(f.get("phi3.rope.dimension_count", hidden // heads))
    window = int(f.get("phi3.attention.sliding_window", 0))
    cfg: dict[str, Any] = {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
        "hidden_size": hidden, "intermediate_size": int(m("feed_forward_length")),
        "num_hidden_layers": int(m("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(f.get("phi3.attention.head_count_kv", heads)),
        # stored as float32: its shortest repr gives back the configured value (1e-05, not 9.9999997e-06)
        "rms_norm_eps": float(str(np.float32(m("attention.layer_norm_rms_epsilon")))),
        "rope_theta": float(f.get("phi3.rope.freq_base", 10000.0)),
        "partial_rotary_factor": rot / (hidden // heads),
        "max_position_embeddings": ctx,
        "original_max_position_embeddings": int(f.get("phi3.rope.scaling.original_context_length", ctx)),
        "sliding_window": window or None, "rope_scaling": None,
        "vocab_size": int(f.get("phi3.vocab_size", len(_need(f, "tokenizer.ggml.tokens", src)))),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu", "attention_bias": False, "torch_dtype": torch_dtype,
    }
    for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in f:
            cfg[name] = int(f[f"tokenizer.ggml.{key}"])
    if STOP_IDS_KEY in f:  # the whole stop set phiforge wrote; the GGUF's own eos stays first
        eos = cfg.get("eos_token_id")
        cfg["eos_token_id"] = ([eos] if eos is not None else []) + [int(i) for i in f[STOP_IDS_KEY] if int(i) != eos]
    return cfg


class GGUFTensors:
    """A phi3 GGUF's tensors under their Phi-3 names, dequantized to float32 on demand (SafetensorsReader's API)."""

    def __init__(self, path: str | Path) -> None:
        self.path = self.dir = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such GGUF file")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader's own errors name neither the file nor the fix
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({e})") from None
        self.fields = fields(self.reader)
        self.by_name = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:
            if t.tensor_type not in SUPPORTED:
                raise CheckpointError(f"{self.path}: tensor {t.name!r} is {t.tensor_type.name}; phiforge reads "
                                      f"{', '.join(q.name for q in sorted(SUPPORTED))}")
        kinds = {t.tensor_type for t in self.reader.tensors if len(t.shape) > 1}
        self.torch_dtype = STORED_DTYPE[kinds.pop()] if len(kinds) == 1 and next(iter(kinds)) in STORED_DTYPE \
            else "bfloat16"
        self.config = phi3_config(self.fields, set(self.by_name), self.path, self.torch_dtype)
        self.sources = self._sources()
        self.file_of = {k: self.path for k in self.sources}

    def _sources(self) -> dict[str, list[str]]:
        """Phi-3 key -> the GGUF tensors concatenated (rows) to make it."""
        c = self.config
        out = {"model.embed_tokens.weight": ["token_embd.weight"], "model.norm.weight": ["output_norm.weight"]}
        if not c["tie_word_embeddings"]:
            out["lm_head.weight"] = ["output.weight"]
        for i in range(c["num_hidden_layers"]):
            for hf, gg in BLOCK_NAMES.items():
                out[f"model.layers.{i}.{hf}.weight"] = [f"blk.{i}.{gg}.weight"]
            b = f"blk.{i}."
            if b + "attn_qkv.weight" not in self.by_name:
                out[f"model.layers.{i}.self_attn.qkv_proj.weight"] = [b + p + ".weight" for p in ("attn_q", "attn_k", "attn_v")]
            if b + "ffn_gate.weight" in self.by_name:
                out[f"model.layers.{i}.mlp.gate_up_proj.weight"] = [b + "ffn_gate.weight", b + "ffn_up.weight"]
        return out

    def keys(self) -> list[str]:
        return list(self.sources)

    def __contains__(self, key: str) -> bool:
        return key in self.sources

    def _array(self, name: str) -> np.ndarray:
        if name not in self.by_name:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        t = self.by_name[name]
        return dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)  # (out, in) or (C,)

    def shape(self, key: str) -> tuple[int, ...]:
        parts = [self.by_name[n] for n in self.sources[key] if n in self.by_name]
        if len(parts) != len(self.sources[key]):
            missing = next(n for n in self.sources[key] if n not in self.by_name)
            raise CheckpointError(f"{self.path}: tensor {missing!r} is missing")
        dims = [tuple(int(d) for d in reversed(p.shape)) for p in parts]  # GGUF lists ggml order (in, out)
        return (sum(d[0] for d in dims), *dims[0][1:]) if len(dims) > 1 else dims[0]

    def dtype(self, key: str) -> torch.dtype | None:
        return None  # always a fresh float32 copy: never a zero-copy view

    def get(self, key: str, copy: bool = True) -> torch.Tensor:
        if key not in self.sources:
            raise CheckpointError(f"{self.path}: tensor {key!r} is missing")
        parts = [self._array(n) for n in self.sources[key]]
        w = np.concatenate(parts) if len(parts) > 1 else np.array(parts[0], copy=True)  # rows Q|K|V or gate|up
        return torch.from_numpy(np.ascontiguousarray(w))

    def rope_config(self) -> dict[str, Any]:
        """rope_scaling for a LongRoPE file (rope_factors_* tensors), else nothing."""
        if "rope_factors_long.weight" not in self.by_name:
            return {}
        scaling = {"type": "longrope", "long_factor": self._array("rope_factors_long.weight").tolist(),
                   "short_factor": self._array("rope_factors_short.weight").tolist()}
        if "phi3.rope.scaling.attn_factor" in self.fields:
            scaling["attention_factor"] = float(self.fields["phi3.rope.scaling.attn_factor"])
        return {"rope_scaling": scaling}


def open_phi3_gguf(path: str | Path) -> tuple[dict[str, Any], GGUFTensors]:
    """config.json dict and the tensor reader of a phi3 GGUF."""
    t = GGUFTensors(path)
    t.config.update(t.rope_config())
    return t.config, t
