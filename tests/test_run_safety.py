"""Runs never collide, a full disk is named, untrained models and changed resumes are refused,
and every error is one line: through the real ``tnkd`` command (digits, 1 epoch, tiny MPS)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from cli_runner import digits_run

from tnkd.training.outputs import RunLock

TESTS = Path(__file__).resolve().parent
SHORT = ["--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1"]


def _fit(name: str, *extra: str) -> list[str]:
    return digits_run("fit", name, *SHORT, *extra)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tnkd_cli):
    """A finished short run named `done`."""
    root = tmp_path_factory.mktemp("run-safety")
    result = tnkd_cli(_fit("done"), cwd=root)
    assert result.rc == 0, result.stderr
    assert result.stderr_lines == []  # notices go to stdout: stderr is for errors
    return root


# ---- runs never collide --------------------------------------------------------------------


def test_a_second_run_of_a_held_name_is_refused_naming_the_holder(tmp_path, tnkd_cli):
    folder = tmp_path / "runs" / "checkpoints" / "busy"
    with RunLock(folder, "run folder", "rename it"):
        result = tnkd_cli(_fit("busy"), cwd=tmp_path)
        assert result.rc == 2
        (line,) = result.stderr_lines
        assert re.fullmatch(
            rf"tnkd fit: error: run folder runs/checkpoints/busy is in use by another tnkd "
            rf"process \(PID {os.getpid()}\); wait for it to end, or give this run another name "
            r"\(--trainer.logger.init_args.name NEW\)",
            line,
        ), line
        # a resume does not wait either
        resumed = tnkd_cli(_fit("busy", "--ckpt_path", "last"), cwd=tmp_path)
        assert resumed.rc == 2 and f"PID {os.getpid()}" in resumed.stderr_lines[-1]
        assert not list(folder.glob("*.ckpt"))
    # released: the folder the lock made and its lock file are gone, nothing else was written
    assert not (tmp_path / "runs").exists()


def test_two_simultaneous_runs_of_one_name_one_trains_the_other_is_refused(tmp_path, tnkd_cli):
    """The first run holds in its first training step while a second process starts the same."""
    import threading

    from cli_runner import TnkdRunner

    other_runner = TnkdRunner(tmp_path / "other-output")
    (tmp_path / "other-output").mkdir()
    outcome = {}
    first_args = _fit("same", "--trainer.callbacks+=cli_plugins.HoldWhileTraining")
    worker = threading.Thread(
        target=lambda: outcome.update(first=tnkd_cli(first_args, cwd=tmp_path, path=[str(TESTS)]))
    )
    worker.start()
    try:
        for _ in range(1200):
            if (tmp_path / "first.pid").exists():
                break
            worker.join(0.1)
        pid = (tmp_path / "first.pid").read_text()
        second = other_runner(_fit("same"), cwd=tmp_path)
    finally:
        (tmp_path / "second.done").touch()
        worker.join(300)
        other_runner.close()
    first = outcome["first"]
    assert first.rc == 0, first.stderr
    assert second.rc == 2
    (line,) = second.stderr_lines
    assert f"in use by another tnkd process (PID {pid})" in line, line
    # last.ckpt is the first run's: its 3 steps (the second never trained)
    last = torch.load(tmp_path / "runs" / "checkpoints" / "same" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3


def _lock_code(folder: Path, then: str) -> str:
    """Python code that takes RunLock on ``folder`` (outputs.py loaded alone: a fast start)."""
    module = TESTS.parent / "tnkd" / "training" / "outputs.py"
    return (
        "import importlib.util, os, sys; "
        f"spec = importlib.util.spec_from_file_location('outputs', {str(module)!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        f"m.RunLock({str(folder)!r}, 'run folder', 'x').acquire(); {then}"
    )


def test_a_crashed_holder_leaves_no_lock(tmp_path):
    """The kernel releases an flock when its holder dies; the stale file blocks nobody."""
    import subprocess
    import sys

    folder = tmp_path / "f"
    subprocess.run([sys.executable, "-c", _lock_code(folder, "os._exit(1)")], check=False)
    assert (folder / ".tnkd.lock").exists()  # left by the crash
    with RunLock(folder, "run folder", "x"):  # free: taken at once
        done = subprocess.run(
            [sys.executable, "-c", _lock_code(folder, "")], capture_output=True, text=True
        )
        assert done.returncode != 0
        assert f"is in use by another tnkd process (PID {os.getpid()})" in done.stderr


# ---- a full disk -----------------------------------------------------------------------------


def test_a_full_disk_is_one_line_and_leaves_no_partial_file_nor_wandb_run(tmp_path, tnkd_cli):
    args = digits_run(
        "fit",
        "full",
        *SHORT,
        "--trainer.logger",
        "lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.init_args.save_dir",
        "runs",
        "--trainer.logger.init_args.name",
        "full",
        "--trainer.logger.init_args.offline",
        "true",
        "--trainer.plugins",
        "cli_plugins.FullDiskIO",
    )
    result = tnkd_cli(args, cwd=tmp_path, env={"WANDB_MODE": "offline"}, path=[str(TESTS)])
    assert result.rc == 2
    (line,) = result.stderr_lines
    assert re.match(
        r"tnkd fit: error: no space left on device writing runs/checkpoints/full/\S+\.ckpt "
        r"\([0-9.]+ [KMGT]?B(ytes)? free in .*\); nothing partial was kept: free space there, or "
        r"point the output at another disk \(tnkd fit: --trainer.default_root_dir",
        line,
    ), line
    left = _files(tmp_path)
    assert not [p for p in left if p.endswith(".tmp") or p.endswith(".ckpt")], left
    assert not [p for p in left if "offline-run-" in p], left  # the W&B run was removed
    assert not [p for p in left if p.endswith(".lock")], left


def test_disk_full_message_names_the_fullest_output():
    """An error naming a file on another disk (W&B's temporary media) still names the full one."""
    import errno

    from tnkd.errors import _outputs, note_output, user_error_message

    saved = list(_outputs)
    try:
        note_output("/nonexistent-tnkd-output/run")
        error = OSError(errno.ENOSPC, "No space left on device", "/tmp/x.png")
        message = user_error_message(error)
    finally:
        _outputs[:] = saved
    assert message is not None and message.startswith("no space left on device writing ")
    assert "free in" in message and "--save_dir" in message


# ---- untrained models, changed resumes -------------------------------------------------------


@pytest.mark.parametrize("sub", ["test", "predict", "validate"])
def test_evaluating_without_a_checkpoint_is_refused(trained, tnkd_cli, sub):
    before = _files(trained)
    result = tnkd_cli(digits_run(sub, "done"), cwd=trained)
    assert result.rc == 2
    (line,) = result.stderr_lines
    assert (
        f"tnkd {sub}: error: tnkd {sub} without --ckpt_path would use an untrained student "
        "(random weights); pass --ckpt_path last"
    ) in line
    assert f"--allow_untrained true to {sub} it untrained on purpose" in line
    assert _files(trained) == before


def test_allow_untrained_evaluates_on_purpose(trained, tnkd_cli):
    result = tnkd_cli(
        digits_run("predict", "done", "--allow_untrained", "true", "--predictions", "u.csv"),
        cwd=trained,
    )
    assert result.rc == 0, result.stderr
    assert (trained / "u.csv").is_file()
    (trained / "u.csv").unlink()


@pytest.mark.parametrize(
    ("change", "listed"),
    [
        (["--lr", "0.05"], "lr 0.003 there, 0.05 here"),
        (["--divergence", "renyi", "--alpha", "2"], 'divergence "kl" there, {"alpha": 2.0'),
        (["--beta", "0.5"], "beta 0.0 there, 0.5 here"),
    ],
)
def test_resuming_with_other_settings_is_refused_listing_them(trained, tnkd_cli, change, listed):
    last = trained / "runs" / "checkpoints" / "done" / "last.ckpt"
    before = last.stat().st_mtime_ns
    result = tnkd_cli(_fit("done", "--ckpt_path", "last", *change), cwd=trained)
    assert result.rc == 2
    (line,) = result.stderr_lines
    assert "was trained with other settings (" in line and listed in line, line
    assert "Lightning would silently use the checkpoint's" in line
    assert last.stat().st_mtime_ns == before


# ---- every error is one line -------------------------------------------------------------------


def test_an_error_during_training_is_the_only_line_on_stderr(tmp_path, tnkd_cli):
    args = _fit(
        "nan",
        "--model.init_args.student",
        "cli_plugins.NaNAfter",
        "--model.init_args.student.init_args.num_sites",
        "64",
        "--model.init_args.student.init_args.num_classes",
        "10",
        "--model.init_args.student.init_args.nan_seed",
        "0",
        "--model.init_args.student.init_args.after",
        "1",
    )
    result = tnkd_cli(args, cwd=tmp_path, path=[str(TESTS)])
    assert result.rc == 2
    (line,) = result.stderr_lines
    assert line.startswith(
        "tnkd fit: error: the run diverged: the student's logits became NaN or infinite in "
        "epoch 1 (training, step 1)"
    ), line
    assert "Seed set to" not in result.stdout + result.stderr


def test_resuming_another_model_class_is_refused(trained, tnkd_cli):
    teacher_config = str(TESTS.parent / "configs" / "digits" / "teacher_cnn.yaml")
    args = ["fit", "--config", teacher_config]
    args += ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger"]
    args += ["--trainer.logger.init_args.save_dir", "runs", "--trainer.logger.init_args.name"]
    args += ["done", "--ckpt_path", "last"]  # the teacher's config, the student run's checkpoint
    result = tnkd_cli(args, cwd=trained)
    assert result.rc == 2
    (line,) = result.stderr_lines
    assert re.search(
        r"was trained with other settings \(model tnkd\.training\.DistillationModule there, "
        r"tnkd\.training\.\w*TeacherModule here",
        line,
    ), line
