"""Imports flow one way: no import inside a function hides a cycle between opo's modules.

The graph is read from the source with `ast`, not by importing. Importing ``a.b.c``
runs ``a/__init__`` and ``a/b/__init__`` first, so an import of a module is also an
edge to each package above it, except the packages above the importing module itself
(they are already loaded, or loading, whenever it runs). An import inside a function ("deferred") is allowed
only where it does not close a loop: from there, following every import (deferred or
not), one must not get back to the module that made it. The exceptions are the lazy
public API in ``opo/__init__.py`` and the optional extras named below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import opo

PACKAGE = Path(opo.__file__).parent

# Deferred imports that may close a loop, and why. (Optional extras such as vLLM and
# peft are deferred too, but none of those imports closes a loop, so none is listed.)
EXEMPT = {
    # The lazy public API: `import opo` stays cheap, and every module is under it.
    ("opo", "*"): "lazy public API",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, deferred edges) between opo's modules, parents included."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    top: dict[str, set[str]] = {m: set() for m in files}
    deferred: dict[str, set[str]] = {m: set() for m in files}

    def targets(module: str, node: ast.AST) -> set[str]:
        is_package = files[module].name == "__init__.py"
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import name` imports pkg.name when that is a module.
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in files else prefix for a in node.names]
        out = set()
        for name in names:
            if not name.startswith("opo"):
                continue
            while name not in files and "." in name:
                name = name.rsplit(".", 1)[0]
            parts = name.split(".")
            out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))  # the parents run too
        parts = module.split(".")
        own_packages = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        return out - own_packages

    def visit(module: str, node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # never executed
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (deferred if inside else top)[module].update(targets(module, child))
            visit(module, child, inside)

    for module, path in files.items():
        visit(module, ast.parse(path.read_text()), False)
    return top, deferred


def _exempt(source: str, target: str) -> bool:
    return (source, "*") in EXEMPT or (source, target) in EXEMPT


def reachable(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def loops_closed_by_deferred_imports(top, deferred) -> list[str]:
    allowed_deferred = {m: {t for t in ts if not _exempt(m, t)} for m, ts in deferred.items()}
    # Every import that runs at some point, bar the exempt ones and the root package's
    # (its module level imports nothing; its lazy API is exempt).
    edges = {m: (top[m] | allowed_deferred[m]) - {"opo"} for m in top}
    found = []
    for module, targets in allowed_deferred.items():
        for target in sorted(targets - {"opo"}):
            if module in reachable(target, edges) or target == module:
                found.append(f"{module} imports {target} inside a function, and {target} leads back "
                             f"to {module}")
    return found


def test_the_graph_reader_sees_imports_and_their_packages():
    top, deferred = import_graph()
    assert "opo.schema" in top["opo.data.base"]
    assert {"opo.rewards", "opo.rewards.check"} <= deferred["opo.config"]
    assert "opo.rollout.vllm" in deferred["opo.rollout"]
    assert "opo.rollout" not in top["opo.rollout.vllm"]  # its own package: loaded before it runs


def test_the_check_finds_a_loop_hidden_in_a_function():
    top = {"a": {"b"}, "b": set(), "c": set()}
    assert loops_closed_by_deferred_imports(top, {"a": set(), "b": {"a"}, "c": set()}) == [
        "b imports a inside a function, and a leads back to b"]
    assert loops_closed_by_deferred_imports(top, {"a": set(), "b": set(), "c": {"a"}}) == []


def test_no_deferred_import_closes_a_loop():
    top, deferred = import_graph()
    assert loops_closed_by_deferred_imports(top, deferred) == []


def test_no_cycle_at_module_level():
    top, _ = import_graph()
    edges = {m: t - {"opo"} for m, t in top.items()}
    cycles = [m for m in edges if m in reachable(m, edges)]
    assert cycles == []


def test_the_schema_and_the_tasks_are_leaves():
    top, deferred = import_graph()
    for module in ("opo.schema", "opo.tasks.addition", "opo.tasks.scratchpad"):
        imported = (top[module] | deferred[module]) - {"opo", "opo.tasks"}
        assert imported <= {"opo.tasks.addition"}, (module, imported)
