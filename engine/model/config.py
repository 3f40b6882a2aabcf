"""Phi-3 model configuration: one dataclass, read from and written to Hugging Face's `config.json`.

Every `Phi3ForCausalLM` on the hub is described by the same handful of numbers; the variants differ in
  - mini-4k:     sliding_window 2047, plain RoPE
  - mini-128k / 3.5-mini: `rope_scaling` longrope (legacy spellings "su" and "yarn"), short/long factors,
                 original_max_position_embeddings 4096, and an attention factor sqrt(1 + ln(s)/ln(L0))
  - medium:      grouped-query attention (fewer KV heads than query heads)
  - 4-mini:      partial_rotary_factor 0.75, tied embeddings, vocab 200064
Newer transformers writes RoPE settings as one `rope_parameters` dict; older files use top-level `rope_theta`,
`partial_rotary_factor` and `rope_scaling`. Both forms are read here; `to_hf()` writes the hub's form.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that phiforge cannot run, with the file and the field named."""


@dataclass
class Phi3Config:
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None      # None: multi-head attention (= num_attention_heads)
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_type: str = "default"                   # "default" | "longrope"
    short_factor: list[float] | None = None      # longrope: per-frequency stretch when seq_len <= original max
    long_factor: list[float] | None = None       # longrope: ... when seq_len > original max
    attention_factor: float | None = None        # longrope: cos/sin scale; derived when absent
    partial_rotary_factor: float = 1.0           # fraction of each head that is rotated (Phi-4-mini: 0.75)
    sliding_window: int | None = None            # a query sees keys with q - k < sliding_window (mini-4k: 2047)
    tie_word_embeddings: bool = False            # lm_head shares model.embed_tokens.weight (Phi-4-mini)
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 32000
    pad_token_id: int | None = 32000
    torch_dtype: str | None = None
    quantization_config: dict | None = None      # bitsandbytes' block when the checkpoint is pre-quantized
    # derived in __post_init__
    head_dim: int = field(init=False)
    rotary_dim: int = field(init=False)
    n_rep: int = field(init=False)               # query heads per KV head

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.rotary_dim = int(self.head_dim * self.partial_rotary_factor)
        self.n_rep = self.num_attention_heads // self.num_key_value_heads
        if self.rope_type in ("su", "yarn"):      # transformers maps Phi-3's legacy names the same way
            self.rope_type = "longrope"
        if self.rope_type not in ("default", "longrope"):
            raise ConfigError(f"rope type {self.rope_type!r} is not one Phi-3 uses (default, longrope)")
        if self.rope_type == "longrope":
            for name in ("short_factor", "long_factor"):
                factors = getattr(self, name)
                if factors is None or len(factors) != self.rotary_dim // 2:
                    got = "missing" if factors is None else f"{len(factors)} entries"
                    raise ConfigError(f"rope_scaling.{name}: expected {self.rotary_dim // 2} entries "
                                      f"(rotary_dim/2), got {got}")
            if self.attention_factor is None:
                scale = self.max_position_embeddings / self.original_max_position_embeddings
                self.attention_factor = (1.0 if scale <= 1.0 else
                                         math.sqrt(1 + math.log(scale) / math.log(self.original_max_position_embeddings)))

    @property
    def eos_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    # ---- Hugging Face config.json --------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> "Phi3Config":
        archs = d.get("architectures") or []
        model_type = d.get("model_type", "phi3")
        if model_type != "phi3" or (archs and "Phi3ForCausalLM" not in archs):
            name = ", ".join(archs) or model_type
            raise ConfigError(f"{source}: architecture {name} (model_type {model_type!r}) is not supported; "
                              "phiforge runs Phi3ForCausalLM (Phi-3/3.5 mini and medium, Phi-4-mini)")
        kw: dict[str, Any] = {}
        names = {f.name for f in fields(cls) if f.init}
        for k in names & d.keys():
            kw[k] = d[k]
        if kw.get("torch_dtype") is None and isinstance(d.get("dtype"), str):  # transformers 5 writes "dtype"
            kw["torch_dtype"] = d["dtype"]
        # RoPE: rope_parameters (new transformers) wins over rope_scaling (hub files); top-level keys fill gaps.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        kw["rope_type"] = rope_type
        for k in ("rope_theta", "partial_rotary_factor"):
            if k in rope:
                kw[k] = rope[k]
        for k in ("short_factor", "long_factor", "attention_factor"):
            if rope.get(k) is not None:
                kw[k] = rope[k]
        # transformers' Phi3Config defaults this to 4096 when the file is silent (and prefers the top-level key)
        if "original_max_position_embeddings" not in d and "original_max_position_embeddings" in rope:
            kw["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Phi3Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file (a Hugging Face model directory has a config.json)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(d, source=str(path))

    def to_hf(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("head_dim", "rotary_dim", "n_rep", "rope_type",
                                                               "short_factor", "long_factor", "attention_factor")}
        d.update(architectures=["Phi3ForCausalLM"], model_type="phi3", attention_bias=False)
        d["rope_scaling"] = None if self.rope_type == "default" else {
            "type": "longrope", "short_factor": self.short_factor, "long_factor": self.long_factor,
            **({"attention_factor": self.attention_factor} if self.attention_factor is not None else {}),
        }
        if d["quantization_config"] is None:
            del d["quantization_config"]
        return d

    def replace(self, **changes: Any) -> "Phi3Config":
        base = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        if "rope_type" in changes and changes["rope_type"] == "default":
            base["attention_factor"] = None
        return type(self)(**{**base, **changes})

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Phi3Config":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Shapes of the published models (LongRoPE factor lists are per checkpoint: they come from its config.json).
PRESETS: dict[str, dict[str, Any]] = {
    "phi3-mini-4k": dict(sliding_window=2047),
    "phi3-mini-128k": dict(max_position_embeddings=131072, sliding_window=262144),
    "phi3-medium": dict(hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=10),
    "phi4-mini": dict(vocab_size=200064, num_attention_heads=24, num_key_value_heads=8,
                      partial_rotary_factor=0.75, tie_word_embeddings=True, max_position_embeddings=131072,
                      bos_token_id=199999, eos_token_id=199999, pad_token_id=199999),
    # SmolLM2-135M-Instruct converted to Phi-3 layout: the default model (see engine/formats/default_model.py)
    "default": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    original_max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2, pad_token_id=2),
}
