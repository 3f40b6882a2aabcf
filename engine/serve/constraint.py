"""Constrained decoding: a request's output held to a JSON schema, any JSON object, a regular expression, a choice
among strings or a Lark grammar, by a token mask on that request's own row of logits at every step.

    grammars = Grammars(tokenizer, vocab_size)      # one per engine: the tokenizer is read once (~0.2 s)
    m = grammars.matcher(Constraint("json_schema", schema))   # checked and built on the caller's thread
    m.mask_(logits)                                  # (V,) in place, before sampling: what the grammar forbids -> -inf
    m.advance(token)                                 # after sampling

The grammar machinery is llguidance's (what llama.cpp integrates): it builds its token trie from the tokenizer.json
text the engine already has, with no transformers at run time, installs as one abi3 wheel with no dependencies, and
computes a mask lazily per step. xgrammar, vLLM's default, imports torch and transformers unconditionally and wants
a transformers tokenizer or a hand-built vocabulary. The end of a grammar is its stop tokens: once the output is
complete the mask allows only those, so a constrained request ends with finish_reason "stop" the usual way (the stop
token), and max_tokens cuts it first with "length".

A row's mask touches that row's logits only, so rows with and without constraints share a step and an
unconstrained row's output is what it is alone. A grammar llguidance cannot build (an invalid schema, an unsupported
keyword) is a `ConstraintError` naming the request field before any compute.

Legend: V vocab size (the model's lm_head rows; the tokenizer may have fewer, which the mask forbids).
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llguidance
import numpy as np
import torch

KINDS = ("json_schema", "json_object", "regex", "choice", "lark")


class ConstraintError(ValueError):
    """A constraint that cannot be compiled; `field` names the request field it came from."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Constraint:
    """What the output must match. value: the schema (a dict or its JSON text) for json_schema, None for
    json_object, the pattern for regex, the strings for choice, the grammar text for lark. field: the request field
    it came from, named in errors (the server passes "response_format")."""
    kind: str
    value: Any = None
    field: str = "constraint"

    def key(self) -> tuple[str, str]:
        """The cache key: equal specs (a schema's keys in any order, as a dict or as JSON text) compile once."""
        value = self.value
        if self.kind == "json_schema" and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass  # not JSON: grammar_text names the error
        return self.kind, json.dumps(value, sort_keys=True)


def read_schema(path: str | Path, flag: str = "--json-schema") -> dict:
    """A JSON schema file, or a one-line error naming the flag and the file (missing, not JSON, not an object)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag} {path}: not a JSON file ({e})") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{flag} {path}: a JSON schema is an object, got {type(schema).__name__}")
    return schema


def grammar_text(c: Constraint) -> str:
    """llguidance's grammar for a constraint. JSON is compact (no whitespace between tokens): a free-whitespace
    grammar lets a small model emit blanks until max_tokens, the commonest way constrained output never ends."""
    if c.kind not in KINDS:
        raise ConstraintError(f"{c.field}: unknown constraint kind {c.kind!r} (one of {', '.join(KINDS)})", c.field)
    compact = {"whitespace_flexible": False}
    if c.kind == "json_schema":
        try:
            schema = json.loads(c.value) if isinstance(c.value, str) else c.value
        except ValueError as e:
            raise ConstraintError(f"{c.field}: the JSON schema is not valid JSON ({e})", c.field) from None
        if not isinstance(schema, dict):
            raise ConstraintError(f"{c.field}: the JSON schema must be an object, got {type(schema).__name__}",
                                  c.field)
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=compact)
    if c.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=compact)
    if c.kind == "regex":
        if not isinstance(c.value, str):
            raise ConstraintError(f"{c.field}: a regex constraint needs a pattern string", c.field)
        return llguidance.LLMatcher.grammar_from_regex(c.value)
    if c.kind == "choice":
        if not (isinstance(c.value, (list, tuple)) and c.value and all(isinstance(s, str) and s for s in c.value)):
            raise ConstraintError(f"{c.field}: a choice constraint needs a non-empty list of non-empty strings",
                                  c.field)
        return llguidance.grammar_from("choice", json.dumps(list(c.value)))
    if not isinstance(c.value, str):
        raise ConstraintError(f"{c.field}: a lark constraint needs the grammar text", c.field)
    return llguidance.LLMatcher.grammar_from_lark(c.value)


class Matcher:
    """One request's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._m = matcher
        self._V = vocab_size

    def mask_(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) logits with every token the grammar forbids next set to -inf, in place."""
        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[:self._V].astype(bool)       # (V,)
        forbid = torch.from_numpy(~allowed)
        logits[:forbid.numel()].masked_fill_(forbid, float("-inf"))
        logits[forbid.numel():] = float("-inf")   # ids past the tokenizer's words: never in a grammar
        return logits

    def advance(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}, which its own mask allowed: "
                               f"{self._m.get_error() or 'no error given'}")

    @property
    def done(self) -> bool:
        return self._m.is_stopped()


class Grammars:
    """The engine's grammar machinery: the tokenizer read once, each distinct constraint's grammar text built once."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tok = llguidance.LLTokenizer(tokenizer.backend_json(), n_vocab=vocab_size,
                                           eos_token=sorted(tokenizer.stop_ids))
        self.vocab_size = vocab_size
        self._compiled: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()   # submit() runs on callers' threads

    def matcher(self, c: Constraint) -> Matcher:
        """A fresh matcher for `c`; its grammar text is built once per distinct spec. The matcher itself checks the
        grammar (a bad one leaves it in an error state), so a grammar is only cached once a matcher took it."""
        key = c.key()
        with self._lock:
            grammar = self._compiled.get(key)
        if grammar is None:
            grammar = grammar_text(c)
        m = llguidance.LLMatcher(self._tok, grammar, log_level=0)
        if m.is_error():
            raise ConstraintError(f"{c.field}: {m.get_error()}", c.field)
        with self._lock:
            self._compiled[key] = grammar
        return Matcher(m, self.vocab_size)
