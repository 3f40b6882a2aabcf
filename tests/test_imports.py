"""The import graph of engine/, kernels/, retrieval/, evaluation/ and phiforge/, read with `ast` (nothing is
imported): no cycles, no upward imports (kernels -> engine -> retrieval -> evaluation -> the CLI and demos, and
inside engine/ atomic/paths -> model -> formats -> train | serve -> api/pretrained: RANKS), no imports inside
functions.

Every import counts: module level and inside functions, relative ones resolved, and
`importlib.import_module("phiforge....")` with a constant string. The one import allowed inside a function is the
CLI's dispatch to the chosen command (phiforge/cli.py), which keeps `phiforge --help` from loading the engine.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> import prefix (setup.py's package_dir)
FOLDERS = {"kernels": "phiforge.kernels", "engine": "phiforge.engine", "retrieval": "phiforge.retrieval",
           "evaluation": "phiforge.evaluation", "phiforge": "phiforge"}
# The layers, by the longest prefix a module has: a module imports its own group or a lower rank, never a group of
# its own rank or higher (so engine/train and engine/serve never import each other). engine/__init__.py (the
# facade) loads its names lazily from strings, which no edge counts.
RANKS = {
    "phiforge.kernels": 0,
    "phiforge.engine.atomic": 1, "phiforge.engine.paths": 1,
    "phiforge.engine.model": 2,
    "phiforge.engine.formats": 3,
    "phiforge.engine.train": 4, "phiforge.engine.serve": 4,
    "phiforge.engine.api": 5, "phiforge.engine.pretrained": 5, "phiforge.engine": 5,
    "phiforge.retrieval": 6,
    "phiforge.evaluation": 7,
    "phiforge": 8,
}
LAZY_DISPATCH = {"phiforge.cli"}


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    in_function: bool


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    prefix = FOLDERS[rel.parts[0]]
    parts = [p for p in rel.with_suffix("").parts[1:] if p != "__init__"]
    return ".".join([prefix, *parts])


def _files() -> dict[str, Path]:
    out = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                out[_module_name(path)] = path
    return out


FILES = _files()


def _package(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rsplit(".", 1)[0]


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    base = node.module or ""
    if node.level:
        pkg = _package(module, path).split(".")
        pkg = pkg[:len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    return base


def _targets(module: str, path: Path, node: ast.AST) -> list[str]:
    """The project modules an import node (or an import_module call) loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = _resolve(module, path, node)
        # `from pkg import sub` loads the submodule pkg.sub; `from mod import name` loads mod
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in FILES else base for a in node.names]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module" \
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        return [node.args[0].value]
    return []


def _edges(module: str, path: Path) -> list[Edge]:
    tree = ast.parse(path.read_text(), str(path))
    edges: list[Edge] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for dst in _targets(module, path, node):
            edges.append(Edge(module, dst, node.lineno, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return edges


EDGES = {m: _edges(m, p) for m, p in FILES.items()}


def _group(module: str) -> str:
    return max((p for p in RANKS if module == p or module.startswith(p + ".")), key=len)


def _layer(module: str) -> str:
    """The top folder a module lives in (kernels, engine, retrieval, evaluation, phiforge)."""
    for folder, prefix in FOLDERS.items():
        if folder != "phiforge" and (module == prefix or module.startswith(prefix + ".")):
            return folder
    return "phiforge"


def _where(e: Edge) -> str:
    return f"{FILES[e.src].relative_to(ROOT)}:{e.line} imports {e.dst}"


def _cycles(modules: set[str]) -> list[tuple[list[str], list[str]]]:
    """For each strongly connected component of the graph restricted to `modules` (Tarjan): its members, and one
    cycle through them."""
    graph = {m: sorted({e.dst for e in EDGES[m] if e.dst in modules and e.dst != m}) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(modules):
        if v not in index:
            strong(v)
    out = []
    for comp in comps:  # the shortest way from the component's first module back to it (breadth-first)
        members, start = set(comp), sorted(comp)[0]
        came_from: dict[str, str] = {}
        frontier = [start]
        while start not in came_from:
            step = []
            for v in frontier:
                for w in graph[v]:
                    if w in members and w not in came_from:
                        came_from[w] = v
                        step.append(w)
            frontier = step
        path = [start]
        while path[-1] != start or len(path) == 1:
            path.append(came_from[path[-1]])
        out.append((sorted(comp), path[::-1]))
    return out


GRAPH_MODULES = {m for m in FILES if _layer(m) != "phiforge"}


def test_the_parser_sees_the_known_edges():
    """The graph is read correctly: a relative import, an absolute one and the CLI's constant-less dispatch."""
    loader = {e.dst for e in EDGES["phiforge.engine.formats.loader"]}
    assert {"phiforge.engine.model.weights", "phiforge.engine.model.quant", "phiforge.engine.model.phi3"} <= loader
    assert "phiforge.kernels.nf4_matmul" in {e.dst for e in EDGES["phiforge.engine.model.quant"]}
    assert len(FILES) > 40 and all(m.startswith("phiforge") for m in FILES)


@pytest.mark.parametrize("layer", ["kernels", "engine", "retrieval", "evaluation"])
def test_no_import_cycles(layer):
    cycles = [(comp, c) for comp, c in _cycles(GRAPH_MODULES) if any(_layer(m) == layer for m in comp)]
    assert not cycles, f"import cycles touching {layer}/:\n" + "\n".join(
        f"  {' -> '.join(c)}   (modules that import each other: {', '.join(comp)})" for comp, c in cycles)


@pytest.mark.parametrize("module", sorted(FILES))
def test_no_upward_imports(module):
    group = _group(module)
    up = [e for e in EDGES[module] if e.dst in FILES and _group(e.dst) != group
          and RANKS[_group(e.dst)] >= RANKS[group]]
    assert not up, f"{module} ({group}, layer {RANKS[group]}) imports its own layer or a higher one:\n" + "\n".join(
        f"  {_where(e)} ({_group(e.dst)}, layer {RANKS[_group(e.dst)]})" for e in up)


def test_the_layer_rule_can_fail():
    """The rule sees the edges it forbids: serve and train are one layer, formats is below both."""
    def allowed(src: str, dst: str) -> bool:
        return _group(dst) == _group(src) or RANKS[_group(dst)] < RANKS[_group(src)]
    assert not allowed("phiforge.engine.serve.engine", "phiforge.engine.train.loop")
    assert not allowed("phiforge.engine.train.loop", "phiforge.engine.serve.decode")
    assert not allowed("phiforge.engine.model.phi3", "phiforge.engine.formats.loader")
    assert not allowed("phiforge.kernels.lora", "phiforge.engine.model.lora")
    assert allowed("phiforge.engine.serve.decode", "phiforge.engine.model.quant")
    assert allowed("phiforge.kernels.cpu.decode", "phiforge.kernels.nf4")


@pytest.mark.parametrize("module", sorted(FILES))
def test_no_imports_inside_functions(module):
    tree = ast.parse(FILES[module].read_text())
    inside = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) or _targets(module, FILES[module], node):
                    inside.append(node.lineno)
    if module in LAZY_DISPATCH:
        return
    assert not inside, (f"{FILES[module].relative_to(ROOT)}: imports inside functions at lines "
                        f"{sorted(set(inside))}; import at the top of the module")


# a path under one of the code folders, as docstrings and comments name files: engine/serve/engine.py, csrc/gemv.h
PATH_MENTION = re.compile(r"(?<![\w/.-])((?:tests/|bench/)?(?:engine|kernels|retrieval|evaluation|phiforge|bench|tests)"
                          r"/[\w/]*\w\.(?:py|c|h))\b")


def _mentions(text: str) -> list[str]:
    return PATH_MENTION.findall(text)


def test_the_path_finder_sees_paths():
    assert _mentions("(engine/serve/engine.py's rule; kernels/cpu/csrc/gemv.h; tests/engine/test_atomic.py)") == \
        ["engine/serve/engine.py", "kernels/cpu/csrc/gemv.h", "tests/engine/test_atomic.py"]
    assert _mentions("phiforge.engine.serve and ../engine/x.py and engine/") == []


@pytest.mark.parametrize("folder", ["engine", "kernels", "retrieval", "evaluation", "phiforge", "bench", "tests"])
def test_every_file_a_docstring_or_comment_names_exists(folder):
    """After a move, a file path named in a docstring or comment still names a real file (paths count from the
    repo root)."""
    exts = ("*.py", "*.c", "*.h")
    missing = []
    for ext in exts:
        for path in sorted((ROOT / folder).rglob(ext)):
            if "__pycache__" in path.parts:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                missing += [f"{path.relative_to(ROOT)}:{n}: {m}" for m in _mentions(line) if not (ROOT / m).exists()]
    assert not missing, "paths that name no file:\n  " + "\n  ".join(missing)


def test_every_file_the_readme_and_makefile_name_exists():
    docs = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
    missing = [f"{name}:{n}: {m}" for name in ("README.md", "Makefile", "pytest.ini", *docs)
               for n, line in enumerate((ROOT / name).read_text().splitlines(), 1)
               for m in _mentions(line) if not (ROOT / m).exists()]
    assert not missing, "paths that name no file:\n  " + "\n  ".join(missing)
