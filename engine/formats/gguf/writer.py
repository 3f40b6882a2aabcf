"""Export a dense Phi-3 (a merged fine-tune) to one GGUF file that llama.cpp, Ollama and LM Studio load.

llama.cpp's `phi3` architecture is Phi-3's own layout, so the export is a renaming, no weight surgery:

    model.embed_tokens          -> token_embd            (V, C)
    layers.i.input_layernorm    -> blk.i.attn_norm       (C,)
    layers.i.self_attn.qkv_proj -> blk.i.attn_qkv        ((nh + 2·nkv)·hs, C)   rows Q | K | V
    layers.i.self_attn.o_proj   -> blk.i.attn_output     (C, nh·hs)
    layers.i.post_attention_ln  -> blk.i.ffn_norm        (C,)
    layers.i.mlp.gate_up_proj   -> blk.i.ffn_up          (2·I, C)               rows gate | up
    layers.i.mlp.down_proj      -> blk.i.ffn_down        (C, I)
    model.norm / lm_head        -> output_norm / output  (absent when tied: llama.cpp reuses token_embd)
    LongRoPE short/long factors -> rope_factors_short / rope_factors_long  (rotary_dim/2,)

No Q/K row permutation either: that is the `llama` architecture's quirk (it rotates adjacent pairs), while `phi3`
rotates the two halves of each head (NEOX style), as Hugging Face does; with partial rotary only the first
`rope.dimension_count` dimensions of a head rotate, also as in Hugging Face.

Where llama.cpp differs from phiforge (the file still carries the model faithfully):
- sliding window: llama.cpp's phi3 currently ignores it (attends to the whole context), so answers match only while
  a sequence fits in the window.
- LongRoPE: llama.cpp picks the long factors once, when the context size (n_ctx) exceeds the original context;
  phiforge (like transformers) picks them per sequence length.

Types: f32, f16 and bf16 store every tensor so (norms and rope factors stay f32, as llama.cpp's converter does);
q8_0 and q4_0 quantize each 2-D weight in blocks of 32 along its rows with the `gguf` package's numpy quantizers,
keep 1-D tensors f32, and for q4_0 keep the embedding/output in q8_0 (the one matrix every token reads twice when
tied; llama-quantize likewise keeps the output layer above q4). A row whose length is not a multiple of 32 falls
back to f16, as llama.cpp's converter does.

Legend: V = vocab, C = hidden size, nh / nkv = query / key-value heads, hs = head size, I = intermediate size.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType

from phiforge.engine.atomic import write_atomic
from phiforge.engine.model.config import Phi3Config
from phiforge.engine.model.lora import LoRALinear, lora_modules
from phiforge.engine.model.phi3 import Phi3ForCausalLM
from phiforge.engine.model.quant import NF4Linear

from .names import ARCH, STOP_IDS_KEY, gguf_names
from .vocab import Vocab, VocabError, vocab_from_dir

TYPES: dict[str, tuple[Q, LlamaFileType]] = {
    "f32": (Q.F32, LlamaFileType.ALL_F32), "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16), "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}


class ExportError(ValueError):
    """A model or option the GGUF export cannot carry; the message names what and why."""


def tensor_type(name: str, shape: tuple[int, ...], qtype: Q) -> Q:
    """The type one tensor is stored in under the file type `qtype`."""
    if len(shape) == 1:
        return Q.F32
    if qtype in (Q.Q8_0, Q.Q4_0):
        if shape[-1] % 32:
            return Q.F16
        if qtype == Q.Q4_0 and name in ("token_embd.weight", "output.weight"):
            return Q.Q8_0
    return qtype


def encode(w: np.ndarray, qtype: Q) -> np.ndarray:
    """A float32 (out, in) array as stored bytes (or as the float array itself for f32/f16)."""
    if qtype == Q.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(w, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)  # (out, in·bytes/elem) uint8


def check_exportable(model: Phi3ForCausalLM) -> Phi3Config:
    """The model must be a plain dense Phi-3 that llama.cpp's phi3 graph can run."""
    if any(True for _ in lora_modules(model)) or any(isinstance(m, (LoRALinear, NF4Linear)) for m in model.modules()):
        raise ExportError("the model still holds LoRA or NF4 layers: merge the adapter (and dequantize) first")
    cfg = model.config
    if cfg.num_attention_heads * cfg.head_dim != cfg.hidden_size:  # llama.cpp sizes attn_output (C, C)
        raise ExportError(f"heads × head size {cfg.num_attention_heads}×{cfg.head_dim} != hidden size "
                          f"{cfg.hidden_size}: llama.cpp's phi3 graph cannot run it")
    if cfg.rotary_dim % 2:
        raise ExportError(f"rotary dimension {cfg.rotary_dim} is odd: llama.cpp rotates pairs")
    return cfg


def _add_config(w: gguf.GGUFWriter, cfg: Phi3Config, file_type: LlamaFileType, name: str) -> None:
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    w.add_sliding_window(cfg.sliding_window or 0)  # 0 = none, as llama.cpp's converter writes it
    if cfg.rope_type == "longrope":
        w.add_rope_scaling_attn_factors(float(cfg.attention_factor))
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocab(w: gguf.GGUFWriter, v: Vocab) -> None:
    w.add_tokenizer_model(v.model)
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
        w.add_add_space_prefix(v.add_space_prefix)
    if v.merges:
        w.add_token_merges(v.merges)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
              "pad": w.add_pad_token_id, "eot": w.add_eot_token_id}
    for key, tid in v.special.items():
        adders[key](tid)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(v.add_eos)
    if v.chat_template:
        w.add_chat_template(v.chat_template)
    w.add_array(STOP_IDS_KEY, [int(i) for i in v.stop_ids])


def _tensors(model: Phi3ForCausalLM, cfg: Phi3Config, qtype: Q):
    """(GGUF name, stored array, its type) for every tensor, one at a time (only one float32 copy alive)."""
    state = model.state_dict()
    for key, name in gguf_names(cfg).items():
        t = state[key].detach().to("cpu", torch.float32).numpy()  # (out, in) or (C,)
        ty = tensor_type(name, t.shape, qtype)
        yield name, encode(t, ty), ty
    if cfg.rope_type == "longrope":  # one copy for the model; llama.cpp shares it across blocks
        yield "rope_factors_long.weight", np.asarray(cfg.long_factor, dtype=np.float32), Q.F32
        yield "rope_factors_short.weight", np.asarray(cfg.short_factor, dtype=np.float32), Q.F32


def export_gguf(model: Phi3ForCausalLM, tokenizer_dir: str | Path, out: str | Path, type: str = "f16",
                name: str | None = None) -> Path:
    """Write `model` (dense, adapter already merged) and the tokenizer of `tokenizer_dir` to the GGUF `out`.

    Atomic: the file appears whole or not at all. Returns its path."""
    if type not in TYPES:
        raise ExportError(f"--type {type!r}: choose one of {', '.join(TYPES)}")
    cfg = check_exportable(model)
    qtype, file_type = TYPES[type]
    try:
        vocab = vocab_from_dir(tokenizer_dir, cfg.vocab_size)
    except VocabError as e:
        raise ExportError(str(e)) from None
    out = Path(out)

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, ARCH)
        _add_config(w, cfg, file_type, name or out.stem)
        _add_vocab(w, vocab)
        for tname, data, ty in _tensors(model, cfg, qtype):
            w.add_tensor(tname, data, raw_dtype=None if ty in (Q.F32, Q.F16) else ty)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write_atomic(out, write)
    print(f"phiforge: wrote {out} ({type}, {os.path.getsize(out) / 2**20:.1f} MiB)", file=sys.stderr, flush=True)
    return out
