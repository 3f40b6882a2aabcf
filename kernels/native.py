"""Build-and-load for the small C kernels of the CPU path (cpu_gemv.py, cpu_decode.py, nf4_cpu.py).

Each kernel file holds its C source as a string. `build` compiles it once per machine with the system compiler
(`$CC`, default `cc`), caches the shared object under `$PHIFORGE_HOME/build/` keyed by source, flags and the CPU's
feature flags (so `-march=native` code never runs on another CPU), and dlopens it. The compile runs in a temporary
directory beside the cache and is renamed into place: a concurrent process sees no file or the whole file.

Anything that goes wrong (no compiler, a compile error, not x86-64, PHIFORGE_CPU_NATIVE=0) returns None, and the
caller uses torch instead. The OpenMP runtime the kernels link is torch's own (libgomp.so.1 is already loaded when
these are dlopened), so torch and the kernels share one thread pool instead of fighting over two.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]


def cpu_flags() -> str:
    try:
        return next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "")
    except OSError:
        return platform.processor()


def build(name: str, source: str, need: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """Compile `source` (cached) and dlopen it; None when native code is off or unavailable, or when the CPU
    lacks one of the /proc/cpuinfo flags in `need` (e.g. "avx512f")."""
    if os.environ.get("PHIFORGE_CPU_NATIVE", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    flags = cpu_flags()
    if any(f not in flags.split() for f in need):
        return None
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([source, flags, cc, *FLAGS]).encode()).hexdigest()[:16]
    home = Path(os.environ.get("PHIFORGE_HOME") or Path.home() / ".cache" / "phiforge")
    so = home / "build" / f"{name}-{key}.so"
    try:
        if not so.exists():
            so.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
                src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
                src.write_text(source)
                subprocess.run([cc, *FLAGS, str(src), "-o", str(out), "-lm"], check=True, capture_output=True)
                os.replace(out, so)
        return ctypes.CDLL(str(so))
    except (OSError, subprocess.CalledProcessError):
        return None
