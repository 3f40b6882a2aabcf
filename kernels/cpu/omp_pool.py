"""One OpenMP thread pool per process: the serving engine's thread gives the CPU cores their only team.

libgomp (the OpenMP runtime of torch and of the kernels in csrc/) keeps a separate pool of worker threads for
every thread that starts a parallel region, and keeps it for that thread's lifetime. It also checks, at every
barrier, whether the threads of all pools together outnumber the CPUs; if they do, it stops spinning at barriers
and sleeps in the kernel at each one, so every barrier costs a wake-up. The native decode step has hundreds of
barriers a token (csrc/decode.c), torch's parallel ops one or more each.

The serving engine (engine/serve/engine.py) runs on its own thread, and the thread that built it has, as a rule, loaded
the model with parallel torch ops: its pool is already there, idle, and the engine's own pool makes two. With
torch's default of one thread a core that is more threads than cores, and every engine step would run with
sleeping barriers. `release()` gives back the calling thread's pool (OpenMP 5's `omp_pause_resource_all`, which
in libgomp ends the calling thread's pool only), so the engine thread's pool is the process's only one; a later
parallel region on the releasing thread builds a new pool and the check counts it again.
What it changes was measured with bench/bench_serve.py against the commit before it (the README's serving rows);
tests/kernels/cpu/test_omp_pool.py checks that the pool's threads end.

Where the library cannot run (kernels/cpu/native.py), `release()` does nothing and returns False.
"""
from __future__ import annotations

import ctypes

from phiforge.kernels.cpu import native

LIB = native.NativeLib("omp_pool", "omp_pool.c", functions={"omp_pool_release": (ctypes.c_int, [])})


def release() -> bool:
    """End the calling thread's OpenMP worker threads (none are started until its next parallel region).
    True when released (or there was no pool), False without the library or inside a parallel region."""
    lib = LIB.get()
    return lib is not None and lib.omp_pool_release() == 0
