"""Helpers of the documentation tests: code blocks of Markdown files, ``mkdocs serve``."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOCS_TOOLS = ("mkdocs", "material", "mkdocstrings_handlers.python", "mkdocs_jupyter")


def code_blocks(path: Path, language: str) -> list[str]:
    """The fenced ```LANGUAGE blocks of a Markdown file, in order."""
    pattern = re.compile(rf"^```{language}\n(.*?)^```", re.MULTILINE | re.DOTALL)
    return pattern.findall(path.read_text(encoding="utf-8"))


def ci_command() -> str:
    """The command line ``.ci/run`` runs (its last line that is not a comment)."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")][-1].strip()


def require_docs_tools() -> None:
    """Skip unless the ``docs`` extra is installed."""
    for name in DOCS_TOOLS:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            pytest.skip(f"{name} is not installed: pip install -e '.[docs]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url: str) -> str:
    """The body of ``url`` as text."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode("utf-8")


def serve(log: Path, timeout: float = 180.0) -> Iterator[str]:
    """Run ``mkdocs serve`` at the repository root on a free port; yield its URL, then stop it.

    Its output goes to ``log``.
    """
    require_docs_tools()
    address = f"127.0.0.1:{_free_port()}"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mkdocs", "serve", "--dev-addr", address, "--no-livereload"],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        )
    url = f"http://{address}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                output = log.read_text()
                pytest.fail(f"mkdocs serve exited with status {process.returncode}:\n{output}")
            try:
                fetch(url)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"mkdocs serve did not answer at {url} within {timeout} s")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
