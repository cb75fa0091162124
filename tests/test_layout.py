"""The package's layout: imports point down the layers and form no cycle; no stray files."""

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tnkd"

#: layers from the bottom up: a module may import its own layer and the ones below
LAYERS = [
    {
        "tnkd.registry",
        "tnkd.errors",
        "tnkd.feature_maps",
        "tnkd.divergences",
        "tnkd.tn",
        "tnkd.data",
    },
    {"tnkd.students", "tnkd.teachers"},
    {"tnkd.training"},
    {"tnkd.experiments", "tnkd.export"},
    {"tnkd.cli"},
]


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    """Every tnkd module and the tnkd modules it imports (at the top or inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tnkd"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("tnkd")}
        graph[_module_name(path)] = deps
    return graph


def _layer(module: str) -> int:
    for level, roots in enumerate(LAYERS):
        if any(module == r or module.startswith(r + ".") for r in roots):
            return level
    return -1  # tnkd itself (__init__): imports nothing below


def test_every_module_has_a_layer():
    unplaced = [m for m in _imports() if m != "tnkd" and _layer(m) < 0]
    assert not unplaced, f"modules outside the layers of this test: {unplaced}"


def test_imports_point_down_the_layers():
    upward = [
        f"{module} imports {dep}"
        for module, deps in _imports().items()
        for dep in deps
        if _layer(dep) > _layer(module)
    ]
    assert not upward, upward


def test_no_import_cycle():
    imports = _imports()
    graph = {m: {d for d in deps if d in imports} for m, deps in imports.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep] if dep in stack else [node, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_no_generated_file_is_committed_at_the_root():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    root_files = [f for f in tracked.stdout.splitlines() if "/" not in f]
    stray = [f for f in root_files if f.startswith("config") and f.endswith(".yaml")]
    assert not stray, f"files Lightning writes are committed at the root: {stray}"


def test_no_merge_conflict_marker_is_committed():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    suffixes = (".py", ".cpp", ".h", ".md", ".yaml", ".toml", ".ipynb", ".cfg", ".txt")
    marked = []
    for name in tracked.stdout.splitlines():
        path = ROOT / name
        if name.endswith(suffixes) and path.is_file():
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            if any(line.startswith(("<<<<<<< ", ">>>>>>> ")) for line in lines):
                marked.append(name)
    assert not marked, f"merge conflict markers committed in {marked}"
