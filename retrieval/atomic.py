"""Crash-safe files: write to a temp file in the same folder, fsync it, rename over the target, fsync the folder.

rename(2) within one filesystem is atomic, so a reader (or a process restarted after a crash) sees either
the old file or the new one, never a torn mix. The folder fsync makes the rename itself durable.
hnswlib's `save_index` writes straight to its path, so `write_atomic` hands the writer a temp path instead.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable


def fsync_dir(folder: str | Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, writer: Callable[[str], None]) -> None:
    """Call writer(temp_path), then make it `path` durably. The temp file is removed on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        writer(str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def write_json_atomic(path: str | Path, obj: dict) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
