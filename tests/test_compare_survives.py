"""A comparison keeps what it finished: failed (diverged) runs, a batched member that diverges,
a SIGTERM and its resume, through the real ``tnkd compare`` command."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from tnkd.teachers import MLP, save_teacher

TESTS = Path(__file__).resolve().parent
MAIN = str(TESTS.parent / "configs" / "digits" / "main.yaml")
TEACHER = (
    "{class_path: tnkd.teachers.MLP, init_args: {num_inputs: 64, num_classes: 10, "
    "hidden: [16], dropout: 0.25}}"
)
VARIANTS = "[{name: labels only, beta: 0.0}, {name: KL, divergence: kl, temperature: 2.0}]"


@pytest.fixture
def workdir(tmp_path):
    torch.manual_seed(0)
    save_teacher(MLP(64, 10, hidden=(16,), dropout=0.25), tmp_path / "t.pt")
    return tmp_path


def _compare(student: str, seeds: str, *extra: str) -> list[str]:
    return [
        "compare",
        "--config",
        MAIN,
        "--teacher",
        TEACHER,
        "--teacher_checkpoint",
        "t.pt",
        "--student",
        student,
        "--student.init_args.num_sites",
        "64",
        "--student.init_args.num_classes",
        "10",
        "--student.init_args.bond_dim",
        "3",
        "--variants",
        VARIANTS,
        "--seeds",
        seeds,
        "--epochs",
        "1",
        "--logger",
        "none",
        "--trainer",
        "{limit_train_batches: 4, limit_val_batches: 1, limit_test_batches: 2}",
        "--results",
        "r.json",
        *extra,
    ]


def _runs(path: Path) -> list[dict]:
    return json.loads(path.read_text())["runs"]


@pytest.mark.parametrize("batched", ["false", "true"])
def test_a_diverging_run_is_recorded_as_failed_and_the_others_go_on(workdir, tnkd_cli, batched):
    nan = ["--student.init_args.nan_seed", "1", "--student.init_args.after", "2"]
    result = tnkd_cli(
        _compare("cli_plugins.NaNAfter", "[0, 1]", *nan, "--batched", batched),
        cwd=workdir,
        path=[str(TESTS)],
    )
    assert result.rc != 0
    (line,) = result.stderr_lines  # one line, naming both failed runs, their setting and epoch
    assert line.startswith("tnkd compare: error: 2 of 4 runs failed"), line
    assert "labels only seed 1 (beta 0)" in line
    assert "KL seed 1 (divergence kl, T 2, beta 0.9): student logits non-finite in epoch 1" in line
    assert "r.json" in line
    payload = json.loads((workdir / "r.json").read_text())
    assert payload["complete"] is True
    status = {(r["name"], r["seed"]): r["status"] for r in payload["runs"]}
    assert status == {
        ("labels only", 0): "finished",
        ("KL", 0): "finished",
        ("labels only", 1): "failed",
        ("KL", 1): "failed",
    }
    for r in payload["runs"]:
        if r["status"] == "finished":
            assert 0.0 <= r["student_acc"] <= 1.0
        else:  # no figures for a failed run, and where it failed
            assert r["student_acc"] is None and "non-finite" in r["extra"]["failure"]
    # the table says which runs failed, and so does `tnkd report`
    assert "(1 of 2 failed)" in result.stdout and "FAILED" in result.stdout
    report = tnkd_cli(["report", "r.json"], cwd=workdir)
    assert report.rc == 0, report.stderr
    assert re.search(r"\| KL \| kl \| 2 \| 0\.9 \| [0-9.]+ \(1 of 2 failed\)", report.stdout)
    assert "- KL seed 1 (divergence kl, T 2, beta 0.9): student logits non-finite" in report.stdout


def test_a_batched_member_that_diverges_is_frozen_the_others_train_on_unchanged(workdir, tnkd_cli):
    """The surviving members' results equal those of the same grid where nobody diverged."""
    results = {}
    for nan_seed in ("1", "99"):  # 99: no member diverges
        args = _compare(
            "cli_plugins.NaNAfter",
            "[0, 1]",
            "--student.init_args.nan_seed",
            nan_seed,
            "--batched",
            "true",
            "--results",
            f"r{nan_seed}.json",
        )
        tnkd_cli(args, cwd=workdir, path=[str(TESTS)])
        results[nan_seed] = {
            (r["name"], r["seed"]): r for r in _runs(workdir / f"r{nan_seed}.json")
        }
    for key in [("labels only", 0), ("KL", 0)]:
        for metric in ("student_acc", "agreement", "student_ece"):
            assert results["1"][key][metric] == pytest.approx(results["99"][key][metric], abs=1e-6)
    assert results["1"][("KL", 1)]["status"] == "failed"
    assert results["99"][("KL", 1)]["status"] == "finished"


def test_sigterm_keeps_the_finished_runs_and_the_resume_reruns_only_the_missing(workdir, tnkd_cli):
    args = _compare("cli_plugins.SigtermOnce", "[0, 1, 2]", "--student.init_args.at", "4")
    stopped = tnkd_cli(args, cwd=workdir, path=[str(TESTS)])
    assert stopped.rc == 143, stopped.stderr
    (hint,) = stopped.stderr_lines
    assert "stopped by SIGTERM; the runs that ended are kept; resume with: tnkd compare" in hint
    kept = _runs(workdir / "r.json")
    assert [(r["name"], r["seed"]) for r in kept] == [
        ("labels only", 0),
        ("KL", 0),
        ("labels only", 1),
    ]
    assert json.loads((workdir / "r.json").read_text())["complete"] is False
    assert not list(workdir.glob("**/*.tmp")) and not list(workdir.glob("**/.*.lock"))

    command = shlex.split(hint.split("resume with: ", 1)[1])
    assert command[0] == "tnkd" and "--results" in command and "--group" in command
    resumed = tnkd_cli(command[1:], cwd=workdir, path=[str(TESTS)])
    assert resumed.rc == 0, resumed.stderr
    assert "3 of 6 runs kept, 3 to run" in resumed.stdout
    started = re.findall(r"run (\d)/6: ", resumed.stdout)
    assert started == ["4", "5", "6"]  # runs 1-3 were not trained again
    payload = json.loads((workdir / "r.json").read_text())
    assert payload["complete"] is True
    assert [(r["name"], r["seed"]) for r in payload["runs"]] == [
        (name, seed) for seed in (0, 1, 2) for name in ("labels only", "KL")
    ]
    assert payload["runs"][:3] == kept  # the kept runs as they were written


def test_a_stopped_results_file_is_not_resumed_with_other_settings(workdir, tnkd_cli):
    args = _compare("cli_plugins.SigtermOnce", "[0, 1]", "--student.init_args.at", "2")
    assert tnkd_cli(args, cwd=workdir, path=[str(TESTS)]).rc == 143
    before = (workdir / "r.json").read_text()
    other = tnkd_cli([*args, "--lr", "0.01"], cwd=workdir, path=[str(TESTS)])
    assert other.rc == 2
    (line,) = other.stderr_lines
    assert re.search(r"r\.json holds a stopped comparison made with other settings \(lr: ", line)
    assert (workdir / "r.json").read_text() == before


def test_a_full_disk_while_writing_the_results_is_one_line_and_leaves_no_partial_file(
    workdir, monkeypatch, capsys
):
    import errno

    from tnkd.cli import main

    real = Path.write_text

    def full_disk(self, data, *args, **kwargs):
        if self.name.endswith(".tmp"):
            real(self, data[:10], *args, **kwargs)  # part of it, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data, *args, **kwargs)

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(SystemExit) as stop:
        main(_compare("tnkd.students.MPSClassifier", "[0]"))
    assert stop.value.code == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert re.match(r"tnkd compare: error: no space left on device writing r\.json \(", line), line
    assert "--save_dir and --results" in line
    assert not [p for p in workdir.rglob("*") if p.name.endswith((".tmp", ".lock"))]
    assert not (workdir / "r.json").exists()
