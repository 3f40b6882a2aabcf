"""The tokenizer inside a GGUF, both ways: a Hugging Face `tokenizer.json` to GGUF vocabulary metadata, and back.

GGUF names two tokenizer families (`tokenizer.ggml.model`):
- `gpt2`: byte-level BPE. Tokens in id order, merges as "left right" strings in rank order, a token type each, and
  `tokenizer.ggml.pre` naming the regex that splits text before BPE (llama.cpp hard-codes the regex per name:
  `gpt-2` is ByteLevel's own, `smollm` first splits every digit apart).
- `llama`: SentencePiece BPE with byte fallback (Phi-3-mini/medium). No merges: llama.cpp merges the adjacent pair
  whose concatenation has the highest *score*. Hugging Face's `tokenizer.json` form of such a model is a BPE with
  `byte_fallback` and ranked merges, so a piece's score is minus the rank of the merge that makes it; pieces no
  merge makes score below every merge, so they never win a pair. Back from GGUF, the merges are rebuilt from the
  scores: every split of a piece into two vocabulary pieces, ordered by the piece's score.

Control tokens (type 3) must be matched whole before BPE runs, or `<|im_start|>` comes out as `<`, `|`, `im`, ...
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import TokenType
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from phiforge.engine.model.tokenizer import END_OF_TURN_TOKENS, load_tokenizer


class VocabError(ValueError):
    """A tokenizer that cannot be carried into or out of a GGUF; the message names the file and the field."""


@dataclass
class Vocab:
    """Everything the GGUF `tokenizer.*` keys hold."""
    model: str                              # "gpt2" | "llama"
    tokens: list[str]
    types: list[int]
    pre: str = "default"
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    add_space_prefix: bool = False
    special: dict[str, int] = field(default_factory=dict)   # bos, eos, unk, pad, eot -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    stop_ids: list[int] = field(default_factory=list)


def _merge_pairs(raw: list[Any]) -> list[tuple[str, str]]:
    # tokenizers writes merges as "a b" (old) or ["a", "b"] (new)
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in raw]
    if any(len(p) != 2 for p in pairs):
        raise VocabError("tokenizer.json: model.merges has an entry that is not two pieces")
    return pairs  # type: ignore[return-value]


def _pre_name(pre: dict | None, src: Path) -> str:
    """llama.cpp's name for a byte-level BPE's pre-tokenizer; only the ones whose regex we know to be identical."""
    parts = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    kinds = [(p or {}).get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    raise VocabError(f"{src}: pre_tokenizer {' + '.join(map(str, kinds))} has no llama.cpp equivalent phiforge "
                     "knows (supported: ByteLevel, Digits(individual) + ByteLevel, SentencePiece byte-fallback BPE)")


def vocab_from_dir(model_dir: str | Path, n_vocab: int) -> Vocab:
    """The GGUF vocabulary of a model directory's tokenizer.json, padded to the model's `n_vocab` rows."""
    model_dir = Path(model_dir)
    src = model_dir / "tokenizer.json"
    if not src.is_file():
        raise VocabError(f"{src}: no such file (the export embeds the tokenizer; copy the base model's tokenizer "
                         "files into the model directory)")
    tj = json.loads(src.read_text(encoding="utf-8"))
    m = tj.get("model", {})
    if m.get("type") != "BPE":
        raise VocabError(f"{src}: model.type {m.get('type')!r}; GGUF export supports BPE tokenizers")
    by_id: dict[int, str] = {i: t for t, i in m["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    n_tok = max(by_id) + 1
    if n_tok > n_vocab:
        raise VocabError(f"{src}: the tokenizer has {n_tok} tokens, the model's embedding only {n_vocab} rows")
    spm = bool(m.get("byte_fallback"))
    normal, unused = int(TokenType.NORMAL), int(TokenType.UNUSED)
    # ids the tokenizer never produces (Phi-3 pads its vocab to 32064) are written as unused placeholders
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [normal if i in by_id else unused for i in range(n_vocab)]
    for i, a in added.items():
        types[i] = int(TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED)
    pairs = _merge_pairs(m.get("merges", []))
    v = Vocab(model="llama" if spm else "gpt2", tokens=tokens, types=types)
    if spm:
        rank = {a + b: r for r, (a, b) in reversed(list(enumerate(pairs)))}
        v.scores = [-float(rank[t]) if t in rank else -float(len(pairs) + i) for i, t in enumerate(tokens)]
        for i, t in enumerate(tokens):
            # byte pieces may sit in the vocab or among the added (non-special) tokens
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">") and types[i] in (normal, int(TokenType.USER_DEFINED)):
                types[i] = int(TokenType.BYTE)
        if m.get("unk_token") in m["vocab"]:
            types[m["vocab"][m["unk_token"]]] = int(TokenType.UNKNOWN)
        norm = json.dumps(tj.get("normalizer")) + json.dumps(tj.get("pre_tokenizer"))
        v.add_space_prefix = '"Prepend"' in norm or '"prepend_scheme": "always"' in norm
    else:
        v.pre = _pre_name(tj.get("pre_tokenizer"), src)
        v.merges = [f"{a} {b}" for a, b in pairs]
    tok = load_tokenizer(model_dir)
    for name in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{name}_token_id", None) if name != "unk" else (
            tok.token_to_id(tok.special_tokens["unk_token"]) if "unk_token" in tok.special_tokens else None)
        if tid is not None:
            v.special[name] = tid
    # the end-of-turn token the template uses: llama.cpp stops on it (eot) as well as on eos
    eot = [tok.token_to_id(t) for t in END_OF_TURN_TOKENS if t in tok.chat_template and tok.token_to_id(t) is not None]
    if eot:
        v.special["eot"] = eot[0]
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text()) if (model_dir / "tokenizer_config.json").is_file() else {}
    v.add_bos, v.add_eos = bool(cfg.get("add_bos_token", False)), bool(cfg.get("add_eos_token", False))
    v.chat_template = tok.chat_template
    v.stop_ids = sorted(tok.stop_ids)
    return v


# ---- GGUF -> tokenizers ------------------------------------------------------------------------------------------

def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece keeps scores, not merges: every split of a piece into two pieces, best-scoring piece first."""
    ids = {t: i for i, t in enumerate(tokens)}
    normal = int(TokenType.NORMAL)
    found = []
    for t, i in ids.items():
        if types[i] != normal or len(t) < 2:
            continue
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in ids and b in ids:
                found.append((-scores[i], ids[a], ids[b], a, b))
    found.sort()
    return [(a, b) for *_, a, b in found]


def tokenizer_from_fields(f: dict[str, Any], src: Path) -> tuple[Tokenizer, list[str]]:
    """A `tokenizers` Tokenizer from GGUF tokenizer fields (key -> value), and its control tokens."""
    kind = f.get("tokenizer.ggml.model")
    tokens: list[str] = f["tokenizer.ggml.tokens"]
    types = [int(t) for t in f.get("tokenizer.ggml.token_type", [1] * len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ")) for m in f.get("tokenizer.ggml.merges", [])]
        if any(len(m) != 2 for m in merges):
            raise VocabError(f"{src}: tokenizer.ggml.merges has an entry that is not two space-separated pieces")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        pre = f.get("tokenizer.ggml.pre", "gpt-2")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre == "smollm":
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in ("gpt-2", "gpt2", "default"):
            tok.pre_tokenizer = byte_level
        else:
            raise VocabError(f"{src}: tokenizer.ggml.pre {pre!r} is not one phiforge rebuilds (gpt-2, smollm)")
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    elif kind == "llama":
        scores = [float(s) for s in f.get("tokenizer.ggml.scores", [0.0] * len(tokens))]
        unk_id = f.get("tokenizer.ggml.unknown_token_id")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges_from_scores(tokens, scores, types), fuse_unk=True,
                                   byte_fallback=True, unk_token=tokens[int(unk_id)] if unk_id is not None else None))
        steps = [normalizers.Replace(" ", "\u2581")]
        if f.get("tokenizer.ggml.add_space_prefix", True):
            steps.insert(0, normalizers.Prepend("\u2581"))
        tok.normalizer = normalizers.Sequence(steps)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        raise VocabError(f"{src}: tokenizer.ggml.model is {kind!r}; phiforge reads gpt2 (byte-level BPE) and "
                         "llama (SentencePiece BPE)")
    special = [t for t, ty in zip(tokens, types) if ty == int(TokenType.CONTROL)]
    user = [t for t, ty in zip(tokens, types) if ty == int(TokenType.USER_DEFINED)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tok, special
