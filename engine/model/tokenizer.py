"""Tokenizer, chat template and stop set of a Hugging Face model directory, without transformers.

- `tokenizer.json` runs through the `tokenizers` library (the same Rust code transformers uses).
- The chat template (`chat_template.jinja` or `tokenizer_config.json`'s `chat_template`, else Phi-3's own) is
  rendered the way transformers renders it: a sandboxed jinja2 environment with trim_blocks/lstrip_blocks and
  loopcontrols, a `tojson` that does not HTML-escape, `raise_exception` and `strftime_now`, and the special tokens
  passed as variables; the text is then encoded without adding special tokens. That is what makes the ids equal to
  `apply_chat_template`'s, token for token.
- `token_bytes(id)` is the raw bytes a token stands for (logprobs' `bytes`): a byte-level BPE's characters map back
  through GPT-2's byte alphabet, a SentencePiece piece's `<0xNN>` is byte NN and its `▁` a space, an added token
  is its text. Decoding one id instead gives U+FFFD for half a character.
- The stop set is every EOS id of `generation_config.json` and `config.json` plus the template's end-of-turn token
  (Phi-3 stops on 32000, 32001 and 32007; a ChatML model on `<|im_end|>`): stopping on one id is the commonest
  Phi bug.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _RustTokenizer

# Phi-3-mini-4k-instruct's template, used when a directory ships none.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
END_OF_TURN_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>")
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _token_text(v: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as AddedToken dicts.
    return v.get("content") if isinstance(v, dict) else v


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte (the characters of a byte-level BPE's vocabulary) -> the byte.
    Printable Latin-1 bytes stand for themselves; the other 68 take the code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(rest)}}


def _compile(template: str) -> jinja2.Template:
    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.exists():
            raise FileNotFoundError(f"{tj}: no such file (phiforge reads the fast tokenizer's tokenizer.json)")
        try:
            self._tok = _RustTokenizer.from_file(str(tj))
        except Exception as e:  # the Rust error says what is wrong, not which file
            raise ValueError(f"{tj}: cannot be read as a tokenizers file ({e})") from None
        self._tok.no_padding()
        self._tok.no_truncation()
        cfg = self._read_json(path / "tokenizer_config.json")
        special_map = self._read_json(path / "special_tokens_map.json")
        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_NAMES:
            text = _token_text(cfg.get(name)) or _token_text(special_map.get(name))
            if text is not None:
                self.special_tokens[name] = text
        template = cfg.get("chat_template")
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        if isinstance(template, list):  # several named templates: transformers picks "default"
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template: str = template or PHI3_CHAT_TEMPLATE
        self._template = _compile(self.chat_template)
        self.stop_ids: set[int] = self._stop_set(path)
        self._bytes: list[bytes] | None = None   # token_bytes' table, built on first use

    @staticmethod
    def _read_json(p: Path) -> dict:
        if not p.exists():
            return {}
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from None

    def _stop_set(self, path: Path) -> set[int]:
        ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            eos = self._read_json(path / name).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else eos or [])
        for text in (*END_OF_TURN_TOKENS, self.special_tokens.get("eos_token")):
            tid = self._tok.token_to_id(text) if text else None
            if tid is not None and (text in self.chat_template or text == self.special_tokens.get("eos_token")):
                ids.add(tid)
        return ids

    # ---- ids <-> text ----------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def backend_json(self) -> str:
        """The tokenizer.json text of the Rust tokenizer (what grammar libraries build their token tries from)."""
        return self._tok.to_str()

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for in generated text (module docstring); b"" outside the vocabulary."""
        if self._bytes is None:
            spec = json.loads(self._tok.to_str())
            byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
            alphabet = _byte_alphabet()
            added = {t["id"] for t in spec.get("added_tokens", [])}
            table = []
            for i in range(self.vocab_size):
                piece = self._tok.id_to_token(i) or ""
                if i in added:
                    table.append(piece.encode())
                elif byte_level:
                    table.append(bytes(alphabet[c] for c in piece if c in alphabet))
                elif m := BYTE_PIECE.fullmatch(piece):
                    table.append(bytes([int(m.group(1), 16)]))
                else:
                    table.append(piece.replace("\u2581", " ").encode())
            self._bytes = table
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("bos_token", "")) if "bos_token" in self.special_tokens else None

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("eos_token", "")) if "eos_token" in self.special_tokens else None

    @property
    def pad_token_id(self) -> int | None:
        for name in ("pad_token", "eos_token"):
            if name in self.special_tokens:
                return self.token_to_id(self.special_tokens[name])
        return None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """ids and each token's (start, end) character span in `text` (for labelling tokens by text spans)."""
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids, enc.offsets

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat ------------------------------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {m!r}")
        tools, documents = kwargs.pop("tools", None), kwargs.pop("documents", None)
        variables = {**self.special_tokens, **kwargs}  # caller's kwargs override special tokens, as in transformers
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     tools=tools, documents=documents, **variables)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = True, **kwargs: Any) -> list[int] | str:
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer, chat template and stop set of a Hugging Face model directory."""
    return Tokenizer(path)
