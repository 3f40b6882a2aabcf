"""The environment a test gives the python it starts: this process's (tests/conftest.py sets PYTHONSAFEPATH, so
`python -c` / `-m` from the repo root do not put the root first on sys.path), with extra folders and tests/ on
PYTHONPATH. No entry is empty: an empty entry means the working directory, the repo root under pytest."""
from __future__ import annotations

import os
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def child_env(*first: Path | str, **extra: str) -> dict[str, str]:
    paths = [*map(str, first), str(TESTS), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), **extra)
