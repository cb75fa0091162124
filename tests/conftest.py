import os

# Tests never reach the network: W&B is disabled unless a test is about logging (it then
# sets WANDB_MODE=offline itself).
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")

import pytest


@pytest.fixture(scope="session")
def tnkd_cli(tmp_path_factory):
    """Run the real ``tnkd`` command in subprocesses (see tests/cli_runner.py)."""
    from cli_runner import TnkdRunner

    runner = TnkdRunner(tmp_path_factory.mktemp("cli-output"))
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def served_docs(tmp_path_factory):
    """The documentation site as ``mkdocs serve`` serves it (the README's command); its URL.

    Skipped where the docs tools are not installed (``pip install -e ".[docs]"``).
    """
    from docs_site import serve

    yield from serve(tmp_path_factory.mktemp("mkdocs") / "serve.log")


@pytest.fixture(scope="session")
def tree_kernels():
    """The tree engine's compiled native kernels (about 30 s to build the first time on a
    machine); tests that need them are skipped where they cannot be compiled."""
    import warnings

    from tnkd.tn import native

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        kernels = native.kernels("tree_levels")
    if kernels is None:
        pytest.skip("the native tree levels cannot be compiled here (no C++ compiler or ninja)")
    return kernels
