"""The five ways of answering a question that `phiforge evaluate` puts side by side, and which ones can run.

    base      closed-book prompt (retrieval/qa.py closed_book_messages), the base model
    rag       the top-k retrieved chunks as numbered sources (retrieval/rag.py build_prompt), the base model
    ft        closed-book prompt, adapter `ft` (fine-tuned without context)
    rag+ft    retrieved sources, adapter `ft`
    raft+rag  retrieved sources, adapter `raft` (fine-tuned on retrieved context, RAFT)

rag+ft and raft+rag differ on purpose: a model tuned without context can answer worse once context is added
(RAFT, Table 1), which a comparison without the RAFT arm would blame on fine-tuning itself.

With no --modes, every mode whose inputs were given runs (retrieval modes need --index, the adapter modes their
adapter); a mode asked for by name whose input is missing is an error naming the flag that would supply it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ADAPTER_NAMES = ("ft", "raft")


@dataclass(frozen=True)
class Mode:
    name: str
    retrieval: bool          # numbered sources from the index in the prompt (scored with retrieved and gold context)
    adapter: str | None      # the adapter's name in --adapter NAME=DIR; None: the base model


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("base", False, None),
    Mode("rag", True, None),
    Mode("ft", False, "ft"),
    Mode("rag+ft", True, "ft"),
    Mode("raft+rag", True, "raft"),
)}


class ModeError(ValueError):
    """An unknown mode, a mode without its inputs, or a malformed --adapter."""


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """`--adapter NAME=DIR` values -> {name: dir}; names are ft or raft, each once, and the directory exists."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ModeError(f"--adapter {spec!r}: expected NAME=DIR")
        if name not in ADAPTER_NAMES:
            raise ModeError(f"--adapter {spec!r}: the name must be one of {', '.join(ADAPTER_NAMES)} "
                            "(ft: tuned without context, raft: tuned on retrieved context)")
        if name in out:
            raise ModeError(f"--adapter {spec!r}: the name {name!r} is given twice")
        if not Path(path).is_dir():
            raise ModeError(f"--adapter {spec!r}: {path} is not a directory")
        out[name] = Path(path)
    return out


def parse_modes(text: str | list[str] | None) -> list[str] | None:
    """`base,rag` -> ["base", "rag"] in the canonical order; None stays None (every mode that can run)."""
    if text is None:
        return None
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise ModeError("--modes: give at least one of " + ", ".join(MODES))
    for n in names:
        if n not in MODES:
            raise ModeError(f"--modes: unknown mode {n!r} (known: {', '.join(MODES)})")
    return [m for m in MODES if m in names]


def select_modes(requested: list[str] | None, have_index: bool, adapters: dict[str, object]) -> list[Mode]:
    """The modes to run: the requested ones (each must have its inputs), or all whose inputs are there."""
    def missing(m: Mode) -> str | None:
        if m.retrieval and not have_index:
            return "--index DIR"
        if m.adapter and m.adapter not in adapters:
            return f"--adapter {m.adapter}=DIR"
        return None

    if requested is None:
        return [m for m in MODES.values() if missing(m) is None]
    for name in requested:
        need = missing(MODES[name])
        if need:
            raise ModeError(f"--modes {name}: needs {need}")
    return [MODES[n] for n in requested]
