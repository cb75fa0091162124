"""Every benchmark script imports against the current package (they are not run in the suite)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(script.parent))  # scripts import their siblings
    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as error:
        if error.name == "tensorkrowch":
            pytest.skip("TensorKrowch (a benchmark-only peer) is not installed")
        raise
    assert callable(getattr(module, "main", None)) or hasattr(module, "run")
