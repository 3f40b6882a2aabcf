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

# Prepended to the kernels that exponentiate (softmax, SiLU): exp(x) for 16 fp32 lanes, Cody-Waite reduction
# x = n·ln2 + r (ln2 in two parts, so n·hi is exact) and a degree-6 Taylor polynomial on |r| ≤ ln2/2, then 2^n
# by scalef: ≤ 2 ulp (tests/kernels/test_cpu_attention.py against torch.exp), 0 below -87, inf above ~88.7, NaN kept.
# round16(v, bf): 16 lanes rounded to bf16 precision (nearest even, NaN kept) when bf, as torch rounds.
VECMATH = r"""
#include <immintrin.h>
static inline __m512 exp512(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.0f);
    __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    __m512 xc = _mm512_max_ps(x, lo);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    __m512 e = _mm512_maskz_mov_ps(~under, _mm512_scalef_ps(p, n));
    return _mm512_mask_mov_ps(e, nan, x);
}
static inline __m512 round16(__m512 v, int bf) {           /* R(v): to bf16 and back, NaN kept */
    if (!bf) return v;
    __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                 _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u));
    return _mm512_mask_mov_ps(_mm512_castsi512_ps(r), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
}
"""

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
