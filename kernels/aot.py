"""What a kernel file needs to describe its ahead-of-time compiles for `phiforge kernels report` (kernels/report.py):
the Triton signature of a kernel and the alignment hints its launcher would infer. A leaf: kernel files import it,
and report.py imports the kernel files."""
from __future__ import annotations

import inspect


def signature(fn, pointers: dict[str, str], floats: tuple[str, ...] = ()) -> dict[str, str]:
    """Triton signature for `fn`: named pointer types, fp32 scalars, constexprs (tl.constexpr params), i32 rest."""
    # Read the annotations off the Python function, so this also works on interpreter objects (TRITON_INTERPRET=1)
    params = inspect.signature(fn.fn).parameters
    sig = {}
    for name in fn.arg_names:
        if "constexpr" in str(params[name].annotation):
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig


def aligned(fn, names) -> dict:
    """Divisibility-by-16 hints, as Triton's launcher infers them at run time for aligned pointers and for
    sizes/strides that are multiples of 16 (every Phi-3 dimension is)."""
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}
