"""The layer order of DESIGN.md, checked from the import statements of every source file.

Every import counts, lazy ones inside functions too (a lazy import is still a dependency). A
module may import from its own layer's package and from lower layers, never from a higher one;
packages that share a layer (e.g. ``patterns`` and ``kernels``) do not import each other; only
``integrations`` imports diffusers; no import cycle between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
SRC = ROOT / "src"

# Lowest first; names in one row are independent of each other.
LAYERS: list[tuple[str, ...]] = [
    ("sparse_vdit._version", "sparse_vdit.cache", "sparse_vdit.files", "sparse_vdit.timing", "sparse_vdit.metrics"),
    ("sparse_vdit.layout",),
    ("sparse_vdit.block_table",),  # the compiled table: what kernels see of patterns
    ("sparse_vdit.patterns", "sparse_vdit.kernels"),
    ("sparse_vdit.plan_schema",),  # reading and checking plan files
    ("sparse_vdit.plan",),
    ("sparse_vdit.plan_view",),  # pictures and summaries of plans
    ("sparse_vdit.methods",),
    ("sparse_vdit.integrations",),
    ("sparse_vdit.organism",),
    ("sparse_vdit.compare",),
    ("sparse_vdit.cli", "sparse_vdit"),  # the package root re-exports the public API: top
    ("bench",),
]
DIFFUSERS_HOME = "sparse_vdit.integrations"


def _module_name(path: Path) -> str:
    if path.is_relative_to(SRC):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
    else:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = sorted((SRC / "sparse_vdit").rglob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
    return {_module_name(f): f for f in files}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Absolute names of the modules ``name`` imports (a ``from m import x`` names m.x where that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known]
            found.update(targets or [module])
    return found


def _rank(module: str) -> tuple[int, str] | None:
    best = None
    for rank, names in enumerate(LAYERS):
        for prefix in names:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (rank, prefix)
    return best


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {name: _imports(name, path, known) for name, path in sources.items()}


def test_every_module_has_a_layer():
    assert [m for m in _graph() if _rank(m) is None] == []


def test_imports_point_down_only():
    wrong = []
    for module, targets in _graph().items():
        rank, home = _rank(module)
        for target in targets:
            where = _rank(target)
            if where is None or where[1] == home:
                continue
            if where[0] >= rank:
                wrong.append(f"{module} -> {target}")
    assert wrong == [], "imports from a higher layer or a sibling package:\n" + "\n".join(sorted(wrong))


def test_only_integrations_import_diffusers():
    wrong = [
        f"{module} -> {target}"
        for module, targets in _graph().items()
        if module.startswith("sparse_vdit") and not module.startswith(DIFFUSERS_HOME)
        for target in targets
        if target == "diffusers" or target.startswith("diffusers.")
    ]
    assert wrong == []


def test_no_import_cycle():
    graph = {m: {t for t in ts if t in _sources()} for m, ts in _graph().items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []


def test_the_checker_sees_relative_and_lazy_imports():
    known = {"sparse_vdit.kernels.api", "sparse_vdit.kernels.dense", "sparse_vdit.plan"}
    found = _imports("sparse_vdit.kernels.api", SRC / "sparse_vdit" / "kernels" / "api.py", known)
    assert "sparse_vdit.kernels.dense" in found  # from . import dense
    assert _rank("sparse_vdit.kernels.triton.launcher")[1] == "sparse_vdit.kernels"
    assert _rank("sparse_vdit")[0] > _rank("sparse_vdit.integrations.diffusers")[0]


def test_modules_added_since_the_layer_map_are_checked():
    """Modules DESIGN.md's map does not draw yet sit in their package's layer (a rename would show here)."""
    sources = _sources()
    expected = {
        "sparse_vdit.kernels.select": "sparse_vdit.kernels",
        "sparse_vdit.kernels.triton.backward": "sparse_vdit.kernels",
        "sparse_vdit.methods.oracle": "sparse_vdit.methods",
        "sparse_vdit.methods.svg_reference": "sparse_vdit.methods",
        "sparse_vdit.integrations.diffusers.parallel": "sparse_vdit.integrations",
    }
    for module, home in expected.items():
        assert module in sources and _rank(module)[1] == home, module
    graph = _graph()
    assert "sparse_vdit.kernels.api" in graph["sparse_vdit.kernels.select"]  # its imports are read
    assert "sparse_vdit.integrations.diffusers.families" in graph["sparse_vdit.integrations.diffusers.parallel"]
