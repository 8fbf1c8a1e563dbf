"""No import circle inside maskbit_runtime, maskbit_export or maskbit (read from the source with ast, not by importing).

Every import counts, including those inside functions (a lazy import that closes a circle still ties the two
modules together); only `if TYPE_CHECKING:` blocks are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"maskbit_runtime": ROOT / "runtime", "maskbit_export": ROOT / "export", "maskbit": ROOT / "maskbit"}


def modules(package: str) -> dict[str, Path]:
    """Module name -> file, for every .py file of the package."""
    root = PACKAGES[package]
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join((package, *parts))] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` (file `path`) imports."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()

    def resolve(module: str) -> str | None:       # the longest known prefix: `pkg.mod.func` -> `pkg.mod`
        parts = module.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in known:
                return candidate
        return None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(resolve(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1] if node.level > 1 else base
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:                  # `from . import x` may name a submodule
                found.add(resolve(f"{module}.{alias.name}") if f"{module}.{alias.name}" in known else resolve(module))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(None)
    found.discard(name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return result


def graph_of(package: str) -> dict[str, set[str]]:
    """Imports between the modules of one package. A package's `__init__` importing its own submodules is how
    a package exports its names, not a circle: edges from a package to modules inside it are left out."""
    found = modules(package)
    known = set(found)
    graph = {}
    for name, path in found.items():
        graph[name] = {m for m in imported(name, path, known) if not m.startswith(name + ".")}
    return graph


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_circle_inside_a_package(package):
    found = cycles(graph_of(package))
    assert found == [], f"import circles in {package}: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_sample_run_description_is_a_leaf():
    graph = graph_of("maskbit_runtime")
    users = sorted(n for n, deps in graph.items() if "maskbit_runtime.runs" in deps)
    assert users == ["maskbit_runtime.runs_cli"], users          # only its command line imports the run module
    leaf = graph["maskbit_runtime.run_spec"]
    assert leaf <= {"maskbit_runtime.errors", "maskbit_runtime.sampling"}, leaf
    for user in ("maskbit_runtime.chunks", "maskbit_runtime.runs_ray"):
        assert "maskbit_runtime.run_spec" in graph[user]
