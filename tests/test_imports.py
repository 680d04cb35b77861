"""The package's import graph: no cycle among the modules of `ballad_cache` and `cli`, and importing the dataset
layer or the CLI loads none of the heavy optional libraries (`ballad --help` stays instant)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ballad_cache", "cli")
# libraries that take seconds to import or are optional: loaded on use, never by importing a module
HEAVY = ("torch", "torchvision", "open_clip", "PIL", "yaml", "h5py", "matplotlib", "faiss", "transformers")


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `packages` under `root` (a package is its __init__.py)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


class _ImportCollector(ast.NodeVisitor):
    """Every import statement of a module, at module level or inside functions and classes, except those under
    `if TYPE_CHECKING:` (annotations only: they never run)."""

    def __init__(self) -> None:
        self.imports: list[ast.Import | ast.ImportFrom] = []

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.imports.append(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.imports.append(node)


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is one of `modules` (`a.b.Thing` -> `a.b`), or None: not ours."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules of `packages` it imports.

    Relative imports are resolved; `from P import x` imports the submodule `P.x` where there is one, else `P`
    itself; importing `a.b.c` also runs the `__init__` of each of its packages that is not one of the importer's
    own (those are running already), so those count as imported too.
    """
    modules = module_files(root, packages)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        collector = _ImportCollector()
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        targets: list[str] = []
        for node in collector.imports:
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
                continue
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                targets.append(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        own_packages = {".".join(name.split(".")[:end]) for end in range(1, name.count(".") + 1)}
        for target in targets:
            found = _known(target, modules)
            if found is None:
                continue
            parts = found.split(".")
            for end in range(1, len(parts) + 1):  # the target and the packages its import initialises
                step = ".".join(parts[:end])
                if step != name and (step == found or step not in own_packages):
                    graph[name].add(step)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (`[a, b, ..., a]`) per strongly connected group of modules that import each other (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph[node]:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    cycles = []
    for group in groups:  # a shortest way round, from the group's first module back to it (breadth first)
        members, start = set(group), group[0]
        previous: dict[str, str] = {}
        frontier = [start]
        while start not in previous:
            reached = []
            for node in frontier:
                for succ in sorted(graph[node] & members):
                    if succ not in previous:
                        previous[succ] = node
                        reached.append(succ)
            frontier = reached
        way_back, node = [start], previous[start]
        while node != start:
            way_back.append(node)
            node = previous[node]
        cycles.append([start, *reversed(way_back)])
    return cycles


def test_the_cycle_finder_sees_function_level_relative_and_package_imports(tmp_path):
    """Catches a finder blind to imports inside functions, to `from . import x` of a submodule, to a package
    whose `__init__` imports its modules, or to `if TYPE_CHECKING:` wrongly counted as an import."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from . import b\n",  # function level, a submodule by `from . import`
        "b.py": "from .sub.c import x\n",
        "sub/__init__.py": "from .d import y\n",  # importing pkg.sub.c runs this first
        "sub/c.py": "x = 1\n",
        "sub/d.py": "import pkg.a\n",
        "e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .f import z\n",
        "f.py": "from . import e\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub", "pkg.sub.c"}
    assert graph["pkg.e"] == set() and graph["pkg.f"] == {"pkg.e"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub", "pkg.sub.d", "pkg.a"]]
    (pkg / "sub" / "__init__.py").write_text("")
    assert find_cycles(import_graph(tmp_path, ("pkg",))) == []


def test_no_import_cycle_in_the_package():
    """Catches two modules that import each other, directly or around a longer loop, at any level."""
    graph = import_graph(ROOT)
    assert "ballad_cache.inputs.datasets" in graph and "cli.main" in graph
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.slow
@pytest.mark.parametrize(
    "module", ["ballad_cache.inputs.datasets", "ballad_cache.inputs.splits", "ballad_cache.inputs.sources", "cli.main"]
)
def test_importing_the_dataset_layer_or_the_cli_loads_no_heavy_library(module):
    """Catches a module-level import of torch, PIL, yaml, h5py, ... in the dataset layer or on the CLI's import
    path (`ballad --help` would wait seconds for it)."""
    probe = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []
