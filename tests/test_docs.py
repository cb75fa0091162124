"""The documentation cannot drift from the code.

* every ```python block of ``docs/`` runs (the blocks of one page in order, in one namespace,
  in a scratch folder);
* every public class and function of every ``tnkd`` module is in the API reference: a
  ``::: module`` directive renders it, and the served site has its anchor;
* module docstrings teach and stay short (at most 60 lines); history goes to the docs.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

import matplotlib
import pytest
from docs_site import DOCS, ROOT, ci_command, code_blocks, fetch

import tnkd

PAGES = sorted(p for p in DOCS.rglob("*.md") if code_blocks(p, "python"))
REFERENCE = DOCS / "reference"
MAX_MODULE_DOCSTRING_LINES = 60


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_python_blocks_run(page, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for number, block in enumerate(code_blocks(page, "python")):
        exec(
            compile(block, f"{page.relative_to(ROOT)}, python block {number + 1}", "exec"),
            namespace,
        )


def test_pages_have_python_examples():
    """The pages that teach an API show it in code that runs (the blocks above)."""
    names = {str(p.relative_to(DOCS)) for p in PAGES}
    assert {
        "getting-started.md",
        "concepts/distillation.md",
        "concepts/divergences.md",
        "guides/draw-your-own.md",
    } <= names


def test_the_test_command_of_the_docs_is_what_ci_runs():
    lines = [
        " ".join(block.split())
        for page in DOCS.rglob("*.md")
        for block in code_blocks(page, "bash")
        if "pytest" in block
    ]
    assert lines and set(lines) == {ci_command()}


def modules() -> list[str]:
    """Every public module of the package (no name part starting with ``_``)."""
    names = ["tnkd"] + [m.name for m in pkgutil.walk_packages(tnkd.__path__, "tnkd.")]
    return [n for n in names if not any(part.startswith("_") for part in n.split("."))]


def public_objects() -> dict[str, str]:
    """``qualified name -> home module`` of every public class and function of tnkd.

    A module's public names are its ``__all__``, or else its names without a leading ``_``;
    each class or function is counted once, in the module that defines it.
    """
    found: dict[str, str] = {}
    for name in modules():
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        names = (
            exported if exported is not None else [n for n in vars(module) if not n.startswith("_")]
        )
        for attr in names:
            obj = getattr(module, attr)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            home = getattr(obj, "__module__", "") or ""
            if home != "tnkd" and not home.startswith("tnkd."):
                continue  # re-exported from another package (torch, lightning, ...)
            if exported is None and home != name:
                continue  # imported for its own use, not exported
            found[f"{home}.{_name_in(home, obj, attr if home == name else None)}"] = home
    return found


def _name_in(home: str, obj: object, name: str | None) -> str:
    """The public name ``obj`` has in its home module (a wrapped function's may differ)."""
    if name is not None:
        return name
    public = [n for n, o in vars(sys.modules[home]).items() if o is obj and not n.startswith("_")]
    return public[0] if public else obj.__qualname__


def directives() -> dict[str, list[str]]:
    """``module -> [reference page, ...]`` of the ``::: module`` directives that render members."""
    found: dict[str, list[str]] = {}
    for page in sorted(REFERENCE.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        for match in re.finditer(r"^::: (\S+)\n((?:[ \t]+.*\n)*)", text, re.MULTILINE):
            if re.search(r"^\s+members:\s*(false|\[)", match.group(2), re.MULTILINE):
                continue  # the module's docstring only, or a chosen list of members
            found.setdefault(match.group(1), []).append(page.stem)
    return found


def test_every_public_module_has_a_reference_directive():
    documented = directives()
    objects = public_objects()
    assert len(objects) > 100  # the walk found the package
    missing = sorted({home for home in objects.values() if home not in documented})
    assert not missing, f"add a '::: MODULE' line to a docs/reference page for: {missing}"
    unknown = sorted(set(documented) - set(modules()))
    assert not unknown, f"docs/reference names modules that do not exist: {unknown}"


def test_every_public_class_and_function_is_rendered(served_docs):
    """The served reference pages have an anchor for every public class and function."""
    pages = {page for pages in directives().values() for page in pages}
    html = "".join(fetch(f"{served_docs}reference/{page}/") for page in sorted(pages))
    anchors = set(re.findall(r'id="(tnkd[\w.]*)"', html))
    missing = sorted(name for name in public_objects() if name not in anchors)
    assert not missing, f"public names without an entry in the API reference: {missing}"


@pytest.mark.parametrize(
    "path", sorted((ROOT / "tnkd").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_module_docstrings_are_at_most_60_lines(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    first = tree.body[0] if tree.body else None
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)):
        return  # no module docstring
    lines = first.end_lineno - first.lineno + 1
    assert lines <= MAX_MODULE_DOCSTRING_LINES, (
        f"{path.relative_to(ROOT)}: the module docstring has {lines} lines; keep the what, the "
        "formula and the paper, and move measurements and history to docs/benchmarks or docs/results"
    )
