"""engine/atomic.py: a write either lands whole or leaves the old target and no temp file; results get umask
permissions, not the temp names' 0600/0700."""
from __future__ import annotations

import os
import stat

import pytest

from phiforge.engine.atomic import atomic_dir, write_atomic, write_json_atomic


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_write_atomic_replaces_and_keeps_old_on_failure(tmp_path):
    target = tmp_path / "a.json"
    write_json_atomic(target, {"x": 1})
    assert target.read_text() == '{\n  "x": 1\n}\n'

    def broken(tmp: str) -> None:
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, broken)
    assert target.read_text() == '{\n  "x": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_dir_swaps_whole_folder_or_nothing(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        (tmp / "w.bin").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as tmp:
            (tmp / "w.bin").write_bytes(b"new, half written")
            raise KeyboardInterrupt
    assert (out / "w.bin").read_bytes() == b"old"
    with atomic_dir(out) as tmp:
        (tmp / "w.bin").write_bytes(b"new")
        (tmp / "sub").mkdir()
    assert (out / "w.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_results_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "f.json", {})
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "w.bin").write_bytes(b"x")
            (tmp / "sub").mkdir()
    finally:
        os.umask(old)
    assert _mode(tmp_path / "f.json") == 0o644
    assert _mode(tmp_path / "d") == 0o755 and _mode(tmp_path / "d" / "sub") == 0o755
    assert _mode(tmp_path / "d" / "w.bin") == 0o644
