"""The shape of the code, checked by reading it with ``ast``: no import cycles, small modules, short functions.

An import counts wherever it is written: at module level or inside a function (a cycle hidden in a function
still ties the two modules together). Only imports under ``if TYPE_CHECKING:`` are exempt, since they never run.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "cadence"
MAX_MODULE_LINES = 400
# A function's length: its lines from the `def` to its last line, decorators and docstring left out (the code
# a reader goes through top to bottom; a long docstring is never a reason to split a function).
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in the tree, at any depth, except those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The cadence modules one statement names: ``from X import y`` names ``X.y`` when that is a module, else
    ``X``. The parent packages an import runs first (``cadence/__init__``) are not counted: every module
    would then be in a cycle with the package that re-exports it."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in MODULES}
    if node.level:
        base = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    found = set()
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        if sub in MODULES:
            found.add(sub)
        elif source in MODULES:
            found.add(source)
    return found - {module}


@functools.cache
def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first statement importing it}."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in MODULES.items():
        edges: dict[str, int] = {}
        for node in runtime_imports(ast.parse(path.read_text(), str(path))):
            for target in targets(name, node):
                edges[target] = min(edges.get(target, node.lineno), node.lineno)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan's algorithm, then a path back)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [cycle_within(graph, set(group), group[0]) for group in groups]


def cycle_within(graph: dict[str, dict[str, int]], group: set[str], start: str) -> list[str]:
    """A shortest path start -> ... -> start inside one strongly connected group."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return paths[v] + [start]
                if w in group and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is not in a cycle")


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_the_graph_sees_function_level_imports_and_skips_type_checking_ones() -> None:
    code = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nelse:\n    import b\n"
            "def f():\n    from . import c\n")
    assert sorted(alias.name for node in runtime_imports(ast.parse(code)) for alias in node.names) == [
        "TYPE_CHECKING", "b", "c"]
    graph = import_graph()
    assert "cadence.trainer" not in graph["cadence.callbacks"]  # only under TYPE_CHECKING
    assert {"cadence.build", "cadence.validation"} <= set(graph["cadence.trainer"])
    assert {"cadence.checkpoint.saver", "cadence.weights"} <= set(graph["cadence.build"]) | set(
        graph["cadence.distributed.strategy"])
    cycles = find_cycles({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}})
    assert cycles == [["a", "b", "c", "a"]]


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in src/cadence:\n" + "\n".join(describe(graph, c) for c in cycles)


def docstring_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.end_lineno - first.lineno + 1
    return 0


def function_lengths(path: Path) -> dict[str, int]:
    """``{qualified name: lines}`` of every function and method (a nested one counts apart, and inside its
    parent)."""
    out: dict[str, int] = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out[name] = child.end_lineno - child.lineno + 1 - docstring_lines(child)
                walk(child, f"{name}.")
            else:
                walk(child, prefix)

    walk(ast.parse(path.read_text(), str(path)), "")
    return out


@functools.cache
def oversized() -> dict[str, int]:
    """``{"module M" or "function M.f": lines}`` for each module over 400 lines and function over 60."""
    found = {}
    for name, path in MODULES.items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            found[f"module {name}"] = lines
        found.update({f"function {name}.{fn}": n for fn, n in function_lengths(path).items()
                      if n > MAX_FUNCTION_LINES})
    return found


def test_no_module_or_function_grows_past_the_limits() -> None:
    """STYLE.md: modules under 400 lines, functions read top to bottom in at most ~60 lines."""
    found = oversized()
    assert not found, "over the limits: " + "; ".join(f"{k}: {n} lines" for k, n in found.items())


# A test of which backend runs: each difference between a single process, DDP and FSDP is a method of its strategy
# class (distributed/strategy.py), so nothing outside distributed/ branches on the engine or the process count.
BACKEND_TESTS = {
    "env.distributed": re.compile(r"\benv\.distributed\b"),
    "a strategy's name compared": re.compile(r"strategy\.name\s*(==|!=|\bin\b)|(==|!=)\s*strategy\.name"),
    '"fsdp"/"ddp"/"single" compared': re.compile(r"(==|!=)\s*[\"'](fsdp|ddp|single)[\"']"
                                                 r"|[\"'](fsdp|ddp|single)[\"']\s*(==|!=)"),
    "the strategy's world size tested": re.compile(r"strategy\.world_size\s*(>|<|==|!=)"),
}


def backend_tests(text: str) -> list[str]:
    return [f"line {i}: {what}" for i, line in enumerate(text.splitlines(), 1)
            for what, pattern in BACKEND_TESTS.items() if pattern.search(line)]


def test_backend_differences_live_in_the_strategy_classes() -> None:
    assert backend_tests('if self.env.distributed:\n    x = strategy.name == "fsdp"\nif s == "ddp": pass') == [
        "line 1: env.distributed", "line 2: a strategy's name compared", 'line 2: "fsdp"/"ddp"/"single" compared',
        'line 3: "fsdp"/"ddp"/"single" compared']
    found = {str(path.relative_to(PACKAGE)): hits for path in MODULES.values()
             if path.parent.name != "distributed" and (hits := backend_tests(path.read_text()))}
    assert not found, "backend tests outside distributed/ (make them a Strategy method): " + "; ".join(
        f"{path} {', '.join(hits)}" for path, hits in found.items())
