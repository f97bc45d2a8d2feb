"""The layering DESIGN.md section 2 promises, read from the source with `ast` (every import, including the ones
inside functions, under TYPE_CHECKING and relative ones): imports go down only, `bench/ -> trainer/ ->
parallel/ -> model/` and `trainer/ -> data_prep/`; `model/` stays usable as a library (no
torch.distributed, no deepspeed); bench/ never reaches into tests/; and no import cycles among the project's
modules. Checked statically so a violation fails here instead of as an import error in some later refactor.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "parallel", "trainer", "data_prep", "bench")
# package -> import prefixes its files may not use
FORBIDDEN = {
    "model": ("parallel", "trainer", "bench", "data_prep", "torch.distributed", "deepspeed"),
    "parallel": ("trainer", "bench", "data_prep"),
    "trainer": ("bench",),
    "data_prep": ("model", "parallel", "trainer", "bench"),
    "bench": ("tests",),
}


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the checked packages (a package is its __init__)."""
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def imports_of(path: Path, mod: str) -> list[tuple[int, str]]:
    """(line, absolute dotted name) for every import in the file; `from a import b` gives a.b, which is a
    module or an attribute of module a (the graph below resolves which)."""
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            # `.` is this package, each further dot one package up
            base = parts[: len(parts) - node.level + 1] if node.level else []
            base += [node.module] if node.module else []
            out += [(node.lineno, ".".join([*base, a.name])) for a in node.names]
    return out


def layering_errors(root: Path) -> list[str]:
    errors = []
    for mod, path in project_modules(root).items():
        top = mod.split(".")[0]
        for line, name in imports_of(path, mod):
            # prefix match on the full name: `from torch import distributed` is torch.distributed, while
            # `from torch import nn` is torch.nn and passes
            for banned in FORBIDDEN.get(top, ()):
                if name == banned or name.startswith(banned + "."):
                    errors.append(f"{path.relative_to(root)}:{line} imports {name} ({top}/ may not import {banned})")
    return errors


def import_graph(root: Path) -> dict[str, dict[str, str]]:
    """module -> {project module it imports: 'file:line' of the first such import}. A name resolves to the
    longest project module it starts with, so `from pkg import name` is pkg.name when that is a module."""
    mods = project_modules(root)
    graph: dict[str, dict[str, str]] = {}
    for mod, path in mods.items():
        edges = graph.setdefault(mod, {})
        for line, name in imports_of(path, mod):
            parts = name.split(".")
            prefixes = (".".join(parts[:k]) for k in range(len(parts), 0, -1))
            target = next((p for p in prefixes if p in mods), None)
            if target and target != mod:
                edges.setdefault(target, f"{path.relative_to(root)}:{line}")
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan): each is at least one import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:  # still open: a back edge into the current component
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:  # v is the root of a component: everything above it on the stack
            comp = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def cycle_errors(root: Path) -> list[str]:
    graph = import_graph(root)
    errors = []
    for comp in cycles(graph):
        edges = [f"  {graph[a][b]} imports {b}" for a in comp for b in graph[a] if b in comp]
        errors.append("import cycle among " + ", ".join(comp) + ":\n" + "\n".join(edges))
    return errors


def test_layering() -> None:
    errors = layering_errors(ROOT)
    assert not errors, "imports against the layering (DESIGN.md section 2):\n" + "\n".join(errors)


def test_no_import_cycles() -> None:
    errors = cycle_errors(ROOT)
    assert not errors, "\n".join(errors)


def test_checker_catches_planted_violations(tmp_path: Path) -> None:
    """A checker that never fails proves nothing: plant one of each violation and see it reported."""
    files = {
        "model/__init__.py": "",
        "model/net.py": "def f():\n    import torch.distributed as dist\n",  # inside a function
        "model/fp8/__init__.py": "from ...parallel import topology\n",  # relative, two packages up
        "parallel/__init__.py": "",
        "parallel/topology.py": "",
        "parallel/a.py": "from parallel import b\n",  # resolves to the module parallel.b
        "parallel/b.py": "from .c import thing\n",
        "parallel/c.py": "from . import a\n",
        "data_prep/reader.py": "import json\nfrom torch import distributed\n",  # allowed: not a rule there
        "bench/x.py": "from tests.helpers import run\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    layering = layering_errors(tmp_path)
    assert sorted(e.split(" (")[0] for e in layering) == [
        "bench/x.py:1 imports tests.helpers.run",
        "model/fp8/__init__.py:1 imports parallel.topology",
        "model/net.py:2 imports torch.distributed",
    ], layering
    assert cycles(import_graph(tmp_path)) == [["parallel.a", "parallel.b", "parallel.c"]]
    assert "parallel/c.py:1 imports parallel.a" in cycle_errors(tmp_path)[0]


@pytest.mark.parametrize("text, name", [("from . import spawn", "parallel.spawn"),
                                        ("from .spawn import free_port", "parallel.spawn.free_port"),
                                        ("from ..model import config", "model.config")])
def test_relative_imports_resolve(text: str, name: str, tmp_path: Path) -> None:
    (tmp_path / "x.py").write_text(text)
    assert imports_of(tmp_path / "x.py", "parallel.x") == [(1, name)]
