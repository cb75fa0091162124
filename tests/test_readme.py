"""The README is a front door that does not lie: every command in it is checked.

Each ```bash block is split into commands (continued lines joined, ``&&`` chains split):

* the test command is exactly the one ``.ci/run`` runs, and CI runs it;
* ``pip install`` steps install the torch that CI pins, or this package with extras that exist;
* ``tnkd`` commands run through the real console script: the short ones as written, the long
  ones (trainings) with ``--print_config``, which parses and resolves their whole config;
* ``mkdocs serve`` serves the site (see ``served_docs``).

The YAML config is parsed by ``tnkd fit --print_config``, and the Python quickstart is the one
of ``docs/getting-started.md``, which ``tests/test_docs.py`` runs.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest
from docs_site import DOCS, ROOT, ci_command, code_blocks, fetch

README = ROOT / "README.md"
#: commands that finish in seconds and run as written; every other ``tnkd`` command trains
SHORT = ("--print_config", "report")


def commands() -> list[list[str]]:
    """Every command of the README's bash blocks, as argument lists."""
    found = []
    for block in code_blocks(README, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            while tokens:
                cut = tokens.index("&&") if "&&" in tokens else len(tokens)
                found.append(tokens[:cut])
                tokens = tokens[cut + 1 :]
    return found


def tnkd_commands() -> list[list[str]]:
    return [c[1:] for c in commands() if c[0] == "tnkd"]


def test_the_readme_is_a_guide_not_a_log():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; keep it at most 300"
    first_python = next(i for i, line in enumerate(lines) if line.startswith("```python"))
    assert first_python < 120, f"the first Python example starts at line {first_python + 1}"
    assert not re.search(r'issue "', text), "the README names an internal issue title"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_the_test_command_is_what_ci_runs():
    tests = [" ".join(block.split()) for block in code_blocks(README, "bash") if "pytest" in block]
    assert tests == [ci_command()], "README's test command and .ci/run differ"


def test_every_command_is_one_the_tests_know():
    known = {"pip", "tnkd", "ruff", "python", "mkdocs"}
    for command in commands():
        assert command[0] in known, f"README command {shlex.join(command)} is not checked"
    ci = shlex.split(ci_command())
    for command in commands():
        if command[0] in ("ruff", "python") or command[:2] == ["mkdocs", "build"]:
            assert shlex.join(command) in shlex.join(ci), f"{shlex.join(command)} is not in .ci/run"


def test_pip_installs_what_exists():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    torch_pin = re.search(r"torch==[\w.+]+", ci_command()).group(0)
    installs = [c for c in commands() if c[0] == "pip"]
    assert installs
    for command in installs:
        assert command[1] == "install", shlex.join(command)
        if command[2] == "-e":
            match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", command[3])
            assert match, f"{shlex.join(command)}: install this package with -e ."
            for extra in filter(None, (match.group(1) or "").split(",")):
                assert extra in extras, f"{shlex.join(command)}: no extra {extra!r} in pyproject"
        else:
            assert command[2:] == [torch_pin], f"{shlex.join(command)}: CI pins {torch_pin}"


@pytest.mark.parametrize("args", [c for c in tnkd_commands() if c[0] != "report"], ids=shlex.join)
def test_tnkd_command_parses_its_config(args, tnkd_cli):
    run = args if "--print_config" in args else [*args, "--print_config"]
    result = tnkd_cli(run, cwd=ROOT)
    assert result.rc == 0, result.stderr
    assert "class_path" in result.stdout  # the resolved config, with every class named


def test_tnkd_report_writes_the_tables_and_the_plot(tnkd_cli, tmp_path):
    (report,) = [c for c in tnkd_commands() if c[0] == "report"]
    results, plot = report[1], report[report.index("--plot") + 1]
    runs = [
        {
            "name": name,
            "seed": seed,
            "divergence": divergence,
            "temperature": 4.0,
            "beta": beta,
            "student_acc": acc,
            "agreement": acc,
            "student_ece": 0.01,
            "student_params": 13821,
            "compression_ratio": 7.2,
            "seconds": 1.0,
        }
        for (name, divergence, beta), seed, acc in [
            (("labels only", "-", 0.0), 0, 0.97),
            (("labels only", "-", 0.0), 1, 0.98),
            (("KL (Hinton)", "kl", 0.9), 0, 0.98),
            (("KL (Hinton)", "kl", 0.9), 1, 0.99),
        ]
    ]
    (tmp_path / results).parent.mkdir(parents=True)
    (tmp_path / results).write_text(
        json.dumps(
            {
                "teacher": {"class_path": "tnkd.teachers.CNN", "test_acc": 0.99, "params": 99562},
                "runs": runs,
            }
        )
    )
    result = tnkd_cli(report, cwd=tmp_path)
    assert result.rc == 0, result.stderr
    # mean ± sample standard deviation over the two seeds
    assert "| KL (Hinton) | kl | 4 | 0.9 | 0.9850 ± 0.0071 |" in result.stdout
    assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_yaml_config_resolves(tnkd_cli, tmp_path):
    (config,) = code_blocks(README, "yaml")
    path = tmp_path / "minimal.yaml"
    path.write_text(config)
    result = tnkd_cli(["fit", "--config", str(path), "--print_config"], cwd=ROOT)
    assert result.rc == 0, result.stderr
    assert "tnkd.students.MPSClassifier" in result.stdout
    assert "name: renyi" in result.stdout


def test_the_quickstart_is_the_one_the_docs_run():
    (quickstart,) = code_blocks(README, "python")
    assert quickstart in code_blocks(DOCS / "getting-started.md", "python")


def test_mkdocs_serve_serves_the_site(served_docs):
    (serve,) = [c for c in commands() if c[0] == "mkdocs" and c[1] == "serve"]
    assert serve == ["mkdocs", "serve"]  # the test adds only a free port
    home = fetch(served_docs)
    assert "knowledge distillation into tensor networks" in home
    assert "Getting started" in home
