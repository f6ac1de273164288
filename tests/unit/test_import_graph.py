"""The package's import graph has no cycle, and the pure core never reaches for DeepSpeed, Ray or torch.distributed.

Every import is counted, module-level or inside a function: a function-level import of a package module only
hides a cycle, it does not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "aletheia_ds"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / PACKAGE

# pure core: plans, costs, LoRA config and probe math are tested without spawning anything
PURE_CORE = ("plan", "cost", "adapters.peft_config", "probe.report", "io", "config")
NEVER_IN_PURE_CORE = ("deepspeed", "ray", "torch.distributed")
TORCH_FREE = ("io", "config")


def module_names() -> dict[str, Path]:
    """{dotted name inside the package ("plan", "probe.report", "adapters"): its file}."""
    names = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imported_names(name: str, path: Path) -> set[str]:
    """Every dotted name `path` imports, absolute, at any depth of the file (functions included)."""
    is_package = path.name == "__init__.py"
    here = f"{PACKAGE}.{name}".rstrip(".") if name else PACKAGE
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = here.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import data` imports a module
    return found


def package_edges() -> dict[str, set[str]]:
    """{module: the package modules it imports} ("" is the package itself)."""
    modules = module_names()
    edges = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_names(name, path):
            if imported == PACKAGE or imported.startswith(PACKAGE + "."):
                inner = imported.removeprefix(PACKAGE).removeprefix(".")
                if inner in modules and inner != name:
                    targets.add(inner)
        edges[name] = targets
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, modules in sorted order)."""
    state: dict[str, str] = {}  # "open" while on the stack, "done" once finished
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _show(name: str) -> str:
    return f"{PACKAGE}.{name}" if name else PACKAGE


def test_finds_relative_and_function_level_imports():
    edges = package_edges()
    assert "cost" in edges["plan"]  # plan -> cost, never the reverse
    assert "train" in edges["launchers.ray"]  # imported inside a function
    assert {"hooks", "report"} <= {e.rsplit(".", 1)[-1] for e in edges["probe.experts"]}


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(package_edges())
    assert cycle is None, "import cycle: " + " -> ".join(_show(name) for name in cycle)


@pytest.mark.parametrize("name", PURE_CORE)
def test_pure_core_imports_no_distributed_runtime(name):
    modules = module_names()
    imported = imported_names(name, modules[name])
    banned = NEVER_IN_PURE_CORE + (("torch",) if name in TORCH_FREE else ())
    hits = sorted(i for i in imported if any(i == b or i.startswith(b + ".") for b in banned))
    assert not hits, f"{_show(name)} imports {hits}: the pure core must not"
    # nor through another package module it imports
    seen, todo = set(), [name]
    edges = package_edges()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(edges[current])
    for reached in sorted(seen - {name}):
        hits = sorted(
            i for i in imported_names(reached, modules[reached]) if any(i == b or i.startswith(b + ".") for b in banned)
        )
        assert not hits, f"{_show(name)} reaches {_show(reached)}, which imports {hits}"
