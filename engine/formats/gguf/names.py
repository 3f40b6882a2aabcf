"""The names a phi3 GGUF and phiforge agree on: the architecture, phiforge's own metadata key, and which GGUF
tensor holds which Phi-3 weight. The writer (writer.py) and the reader (reader.py) both take them from here."""
from __future__ import annotations

from phiforge.engine.model.config import Phi3Config

ARCH = "phi3"
STOP_IDS_KEY = "phiforge.stop_token_ids"   # the whole stop set; llama.cpp ignores keys it does not know

# per-block Phi-3 module -> GGUF name
BLOCK_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_names(cfg: Phi3Config) -> dict[str, str]:
    """Phi-3 state-dict key -> GGUF tensor name, in the order the file lists them."""
    names = {"model.embed_tokens.weight": "token_embd.weight"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in BLOCK_NAMES.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    names["model.norm.weight"] = "output_norm.weight"
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    return names
