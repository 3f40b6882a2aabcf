"""Build-and-load for the small C kernels of the CPU path: one `NativeLib` per library in kernels/csrc/.

Each library is one `.c` file in csrc/ that includes the shared headers it needs (simd.h, gemv.h, nf4.h, ...). It
is compiled once per machine and instruction-set tier (TIERS) with the system compiler (`$CC`, default `cc`) and
`-Wall -Wextra -Werror`, cached under `$PHIFORGE_HOME/build/` keyed by every file it includes, the flags and the
CPU's feature flags (so `-march=native` code never runs on another CPU), and dlopened. The compile runs in a
temporary directory beside the cache and is renamed into place: a concurrent process sees no file or the whole file.

What happens when a library cannot run is explicit (`NativeLib.status()`):

    active          compiled and loaded, for the widest instruction-set tier (TIERS) it has code for and the CPU runs
    disabled        PHIFORGE_CPU_NATIVE=0
    unsupported     not x86-64, or the library has no code for a tier the CPU runs: the torch path runs
    no compiler     `$CC` not found: the torch path runs, with one warning
    compile error   the compiler failed: the torch path runs, with one warning carrying the compiler's message

Under PHIFORGE_CPU_NATIVE=require (`make test` sets it) the last two raise `NativeBuildError` instead, so a broken
kernel fails the suite; an unsupported CPU stays a fallback. For A/B measurements, `with native.disabled(lib):`
switches libraries off for a block instead of flipping module globals.

The OpenMP runtime the kernels link is torch's own (libgomp.so.1 is already loaded when these are dlopened), so
torch and the kernels share one thread pool instead of fighting over two.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

CSRC = Path(__file__).resolve().parent / "csrc"
FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror"]
# The instruction sets every AVX-512 kernel uses (masked 16-bit loads need BW and VL); the bf16 dot product is extra.
AVX512 = ("avx512f", "avx512bw", "avx512vl")
AVX512_BF16 = AVX512 + ("avx512_bf16",)
AVX2 = ("avx2", "fma", "f16c")
# Instruction-set tiers, widest first: the /proc/cpuinfo flags each needs and the flags it compiles with. A library
# is built for the widest tier it has code for that the CPU runs (PHIFORGE_CPU_TIER or `forced_tier` caps it, so
# the tests run every tier this CPU can). avx2 is x86-64-v3, portable to any AVX2 machine; the AVX-512 tiers tune
# for this CPU, which the cache key records.
TIERS: dict[str, tuple[tuple[str, ...], list[str]]] = {
    "avx512bf16": (AVX512_BF16, ["-march=native"]),
    "avx512": (AVX512, ["-march=native", "-mno-avx512bf16"]),
    "avx2": (AVX2, ["-march=x86-64-v3", "-mtune=native"]),
    "x86-64": ((), ["-march=x86-64", "-mtune=native"]),
}
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


class NativeBuildError(RuntimeError):
    """A native library failed to build or load under PHIFORGE_CPU_NATIVE=require."""


class NativeBuildWarning(RuntimeWarning):
    """A native library failed to build or load; its torch fallback runs instead."""


@dataclass(frozen=True)
class Status:
    state: str        # "active", "disabled", "unsupported", "no compiler", "compile error"
    detail: str = ""  # which flag is missing, which compiler, the compiler's message

    def __str__(self) -> str:
        return self.state + (f": {self.detail}" if self.detail else "")


def mode() -> str:
    """PHIFORGE_CPU_NATIVE: "0" (off), "require" (build failures raise) or anything else (on, failures warn)."""
    value = os.environ.get("PHIFORGE_CPU_NATIVE", "1").strip().lower()
    return value if value in ("0", "require") else "1"


@functools.cache  # read on every native call otherwise (through cpu_tier), and the flags never change
def cpu_flags() -> str:
    try:
        return next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "")
    except OSError:
        return platform.processor()


_forced: list[str] = []


def cpu_tier() -> str:
    """The widest tier (TIERS) this CPU runs, capped by PHIFORGE_CPU_TIER or `forced_tier`; "none" off x86-64."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "none"
    flags = cpu_flags().split()
    names = list(TIERS)
    cap = _forced[-1] if _forced else os.environ.get("PHIFORGE_CPU_TIER", "").strip() or names[0]
    if cap not in TIERS:
        raise ValueError(f"PHIFORGE_CPU_TIER={cap!r}: expected one of {', '.join(names)}")
    return next((t for t in names[names.index(cap):] if all(f in flags for f in TIERS[t][0])), "none")


def runnable_tiers() -> list[str]:
    """Every tier this CPU runs, widest first."""
    flags = cpu_flags().split()
    x86 = platform.machine() in ("x86_64", "AMD64")
    return [t for t, (need, _) in TIERS.items() if x86 and all(f in flags for f in need)]


@contextlib.contextmanager
def forced_tier(tier: str) -> Iterator[None]:
    """Build and run every library at `tier` (or the widest below it each has code for) within the block."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}: expected one of {', '.join(TIERS)}")
    _forced.append(tier)
    try:
        yield
    finally:
        _forced.pop()


def sources(main: Path) -> list[Path]:
    """`main` and every local header it includes, transitively (headers resolve beside the including file)."""
    seen: list[Path] = []
    todo = [main]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.append(path)
        todo += [path.parent / name for name in _INCLUDE.findall(path.read_text())]
    return seen


def compile_command(cc: str, source: Path, out: Path, tier: str) -> list[str]:
    return [cc, *FLAGS, *TIERS[tier][1], "-I", str(source.parent), str(source), "-o", str(out), "-lm"]


def _build(name: str, source: Path, cc: str, tier: str) -> Path:
    """The cached shared object for `source` at `tier`, compiled if needed; raises CalledProcessError with the
    compiler's output on failure."""
    parts = [f"{p.name}\0{p.read_text()}" for p in sorted(sources(source))]
    command = compile_command(cc, source, Path("out.so"), tier)
    key = hashlib.sha256("\0".join([*parts, cpu_flags(), *command]).encode()).hexdigest()[:16]
    home = Path(os.environ.get("PHIFORGE_HOME") or Path.home() / ".cache" / "phiforge")
    so = home / "build" / f"{name}-{tier}-{key}.so"
    if not so.exists():
        # a first command after install otherwise pauses for seconds with no word of why
        print(f"phiforge: building the native CPU kernels {name!r} ({tier}) on first use; cached in {so.parent}",
              file=sys.stderr, flush=True)
        so.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
            out = Path(tmp) / f"{name}.so"
            subprocess.run(compile_command(cc, source, out, tier), check=True, capture_output=True, text=True)
            os.replace(out, so)
    return so


class NativeLib:
    """One C library: `name`, its `source` (a file in csrc/, or a path), the `tiers` (TIERS) it has code for, any
    further /proc/cpuinfo flags it `needs`, and its ctypes `functions` ({name: (restype, argtypes)}, declared once
    here; a third item True marks a function only some tiers define). `check(lib)` may verify more at load (a struct
    layout) and raise ValueError. `get()` is the library built for the current tier, or None: use the torch path."""

    def __init__(self, name: str, source: str | Path, tiers: tuple[str, ...] = ("x86-64",), needs: tuple[str, ...] = (),
                 functions: dict[str, tuple] | None = None, check: Callable[[ctypes.CDLL], None] | None = None,
                 register: bool = True) -> None:
        self.name, self.source = name, CSRC / source if isinstance(source, str) else source
        self.tiers, self.needs = tuple(t for t in TIERS if t in tiers), needs
        self.functions, self.check = functions or {}, check
        self._loaded: dict[str, tuple[Status, ctypes.CDLL | None]] = {}
        self._off = 0
        if register:
            LIBRARIES[name] = self

    def tier(self) -> str | None:
        """The tier this library builds for now: its widest tier at or below cpu_tier(); None if it has none."""
        cap = cpu_tier()
        if cap == "none":
            return None
        order = list(TIERS)
        return next((t for t in self.tiers if order.index(t) >= order.index(cap)), None)

    def _try_load(self, tier: str | None) -> tuple[Status, ctypes.CDLL | None]:
        if mode() == "0":
            return Status("disabled", "PHIFORGE_CPU_NATIVE=0"), None
        if platform.machine() not in ("x86_64", "AMD64"):
            return Status("unsupported", f"{platform.machine()} is not x86-64"), None
        if tier is None:
            return Status("unsupported", f"no build for tier {cpu_tier()} or below (has {', '.join(self.tiers)})"), None
        flags = cpu_flags().split()
        missing = [f for f in self.needs if f not in flags]
        if missing:
            return Status("unsupported", f"this CPU lacks {', '.join(missing)}"), None
        cc = os.environ.get("CC", "cc")
        if shutil.which(cc) is None:
            return Status("no compiler", f"{cc} not found (set $CC)"), None
        try:
            lib = ctypes.CDLL(str(_build(self.name, self.source, cc, tier)))
            for fn, (restype, argtypes, *optional) in self.functions.items():
                if optional and optional[0] and not hasattr(lib, fn):
                    continue
                getattr(lib, fn).restype, getattr(lib, fn).argtypes = restype, argtypes
            if self.check is not None:
                self.check(lib)
        except subprocess.CalledProcessError as e:
            return Status("compile error", f"{' '.join(e.cmd)}\n{(e.stderr or '').strip()}"), None
        except (OSError, AttributeError, ValueError) as e:
            return Status("compile error", f"{self.source.name} built but did not load: {e}"), None
        return Status("active", tier), lib

    def _state(self) -> tuple[Status, ctypes.CDLL | None]:
        tier = self.tier()
        key = f"{tier}:{mode()}"
        if key not in self._loaded:
            self._loaded[key] = self._try_load(tier)
            status = self._loaded[key][0]
            if status.state in ("no compiler", "compile error") and mode() != "require":
                warnings.warn(f"native kernel library {self.name!r} ({self.source}): {status}; using the torch path",
                              NativeBuildWarning, stacklevel=4)
        status, lib = self._loaded[key]
        if status.state in ("no compiler", "compile error") and mode() == "require":
            raise NativeBuildError(f"native kernel library {self.name!r} ({self.source}) under "
                                   f"PHIFORGE_CPU_NATIVE=require: {status}")
        return status, lib

    def status(self) -> Status:
        """Why this library runs or not (active: the detail is its tier); the first call at a tier builds it.
        Raises NativeBuildError under PHIFORGE_CPU_NATIVE=require when it has no compiler or fails to build;
        warns once otherwise."""
        return self._state()[0]

    def get(self) -> ctypes.CDLL | None:
        """The loaded library, or None when it cannot run or is switched off (`disabled`)."""
        return None if self._off else self._state()[1]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Switch this library off for a block (A/B measurements, fallback tests); nests."""
        self._off += 1
        try:
            yield
        finally:
            self._off -= 1


LIBRARIES: dict[str, NativeLib] = {}  # every library the kernel modules declared, by name (phiforge doctor)


@contextlib.contextmanager
def disabled(*libs: NativeLib) -> Iterator[None]:
    """Switch the given libraries off for a block."""
    with contextlib.ExitStack() as stack:
        for lib in libs:
            stack.enter_context(lib.disabled())
        yield
