"""Where phiforge keeps what it builds: $PHIFORGE_HOME, else ~/.cache/phiforge (the default model, the compiled C
kernels, the demo's index and adapters, the benches' caches)."""
from __future__ import annotations

import os
from pathlib import Path


def phiforge_home() -> Path:
    return Path(os.environ.get("PHIFORGE_HOME") or Path.home() / ".cache" / "phiforge")
