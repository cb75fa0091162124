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


def test_inference_benchmark_counts_multiply_adds_in_closed_form():
    """``benchmarks/inference.py`` counts a convolution and a dense layer as their formulas say."""
    torch = pytest.importorskip("torch")
    script = SCRIPTS[0].parent / "inference.py"
    spec = importlib.util.spec_from_file_location("benchmark_inference_macs", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 6, 3, groups=2), torch.nn.Flatten(), torch.nn.Linear(6 * 5 * 5, 10),
    )
    conv1 = (4 * 14 * 14) * (1 * 3 * 3)  # output elements x (input channels per group x kernel)
    conv2 = (6 * 5 * 5) * (2 * 3 * 3)
    dense = 6 * 5 * 5 * 10
    assert module.count_macs(net, torch.rand(1, 1, 14, 14)) == conv1 + conv2 + dense
