"""A test module of a native CPU library names it as `LIB` (e.g. `LIB = cpu_ops.LIB`); then every test in it:
- runs once per instruction-set tier this CPU runs and the library has code for (the `tier` fixture, forced
  through native.forced_tier), so each tier is checked against the same references;
- is skipped only where the CPU cannot run the library or PHIFORGE_CPU_NATIVE=0 turned it off: a compile error
  is not a skip (under PHIFORGE_CPU_NATIVE=require it raises, and `test_library_builds` fails without it)."""
from __future__ import annotations

import pytest

from phiforge.kernels.cpu import native


def _lib(module):
    return getattr(module, "LIB", None)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    lib = _lib(metafunc.module)
    if lib is not None and "tier" in metafunc.fixturenames:
        metafunc.parametrize("tier", [t for t in native.runnable_tiers() if t in lib.tiers] or [None], indirect=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        lib = _lib(item.module) if item.module is not None else None
        if lib is None:
            continue
        status = lib.status()
        if status.state in ("unsupported", "disabled"):
            item.add_marker(pytest.mark.skip(reason=f"{lib.name}: {status}"))


@pytest.fixture(autouse=True)
def tier(request: pytest.FixtureRequest):
    """The tier this test runs at (None outside a native library's module, or where it has no tier here)."""
    param = getattr(request, "param", None)
    if param is None:
        yield None
        return
    with native.forced_tier(param):
        yield param
