"""A bench's result: printed as JSON on stdout and, with --out, written to a file atomically (the same text), so a
bench cut short never leaves half a JSON file behind."""
from __future__ import annotations

import json

from phiforge.engine.atomic import write_text_atomic


def emit(result: dict, out: str | None) -> None:
    """Print the bench's JSON, and write it to `out` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        write_text_atomic(out, text + "\n")
