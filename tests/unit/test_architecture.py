"""The house's one-way data flow, checked from the source: floors, no import circle, module sizes.

Every module sits on a floor; a module may import (at module level or inside a function)
only from its own floor or below. The floors follow the data path: prompts → discovery →
circuit file → registry → engine → server → A/B report.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "cna_vllm"

FLOORS: list[tuple[str, ...]] = [
    ("errors",),
    ("identity", "spec_syntax", "embedded", "prompts"),
    ("fileformat", "steering"),
    ("circuit", "vectors", "rows", "catalogue"),
    ("sources", "plots"),
    ("discover", "export", "export_weights"),
    ("engine", "patches"),
    ("server",),
    ("evaluate",),
    ("cli",),
]
"""Bottom first. An entry names a top-level module or sub-package of ``cna_vllm``."""
MAX_LINES = 300
LONG_OK = "longer than"
"""A module over :data:`MAX_LINES` states why in its docstring with these words."""


def modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }


def imports(path: Path, name: str) -> set[str]:
    """The ``cna_vllm`` modules a module imports, anywhere in its body (lazy imports count)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cna_vllm")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith("cna_vllm"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
    known = modules()
    return {m for m in found if m in known and m != name}


def floor(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    for i, names in enumerate(FLOORS):
        if top in names:
            return i
    raise AssertionError(f"{module} is on no floor: add it to FLOORS")


GRAPH = {name: imports(path, name) for name, path in modules().items()}


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != "cna_vllm"))
def test_imports_go_down_only(module):
    up = sorted(m for m in GRAPH[module] if m != "cna_vllm" and floor(m) > floor(module))
    assert not up, f"{module} (floor {floor(module)}) imports from higher floors: {up}"


def test_no_import_circle():
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt == "cna_vllm" or nxt.startswith(node + "."):  # a package importing its own modules
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*stack[stack.index(nxt):], nxt]))
            if not state.get(nxt):
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if not state.get(name):
            visit(name, [name])


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_modules_are_small_or_say_why(module):
    path = modules()[module]
    lines = len(path.read_text().splitlines())
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert lines <= MAX_LINES or LONG_OK in doc, f"{module}: {lines} lines and no reason in its docstring"


def test_no_two_modules_share_a_name():
    names = [p.stem for p in PACKAGE.rglob("*.py") if p.stem != "__init__"]
    dups = sorted({n for n in names if names.count(n) > 1})
    assert not dups, f"modules sharing a name: {dups}"
