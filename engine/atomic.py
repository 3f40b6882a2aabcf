"""Crash-safe writes, the one home for them: a file or a whole folder is built under a temp name beside its target,
then renamed over it.

rename(2) within one filesystem is atomic, so a reader (or a process restarted after a crash) sees the old file or
the new one, never a torn mix; the fsyncs make the new bytes and the rename itself durable. Temp names start with
a dot and are removed on any failure, Ctrl-C included.

Results get the permissions of an ordinary file or folder (0666 / 0777 less the umask), not the 0600 / 0700 that
mkstemp and mkdtemp give their temp names.

hnswlib's `save_index` and safetensors' `save_file` write straight to a path, so `write_atomic` hands the writer a
temp path instead of a file object.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: str | Path) -> None:
    """Flush a file's bytes, or a folder's entries (a rename is durable once its folder is), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, writer: Callable[[str], None]) -> None:
    """Call writer(temp_path), then make it `path` durably. The temp file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        writer(str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> None:
    """One JSON object a line, non-ASCII kept as is."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """`with atomic_dir(out) as tmp:` fill `tmp`; on a clean exit it becomes `out` (replacing an existing folder),
    on an exception it is removed and `out` is untouched."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        files, dirs = 0o666 & ~_umask(), 0o777 & ~_umask()
        for root, subdirs, names in os.walk(tmp):
            for n in names:
                os.chmod(Path(root) / n, files)
                fsync_path(Path(root) / n)
            for n in subdirs:
                os.chmod(Path(root) / n, dirs)
        os.chmod(tmp, dirs)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        fsync_path(out_dir.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
