"""Stops and resumes through the real ``tnkd`` command: exit statuses, hints, ``last.ckpt``.

A named run stopped by SIGTERM twice (mid-epoch, then at another point) and resumed to the end
must test exactly as the same run done without interruption, through ``--ckpt_path last`` and
through the file the README names (``runs/checkpoints/NAME/last.ckpt``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from cli_runner import digits_run

TESTS = Path(__file__).resolve().parent


def _args(name: str, *extra: str, sub: str = "fit") -> list[str]:
    return digits_run(sub, name, "--data.init_args.batch_size", "256", *extra, epochs=3)


def _stop_at(step: int, signal_name: str = "SIGTERM") -> list[str]:
    return [
        "--trainer.callbacks+=cli_plugins.StopAt",
        f"--trainer.callbacks.step={step}",
        f"--trainer.callbacks.signal_name={signal_name}",
    ]


def _test_accuracy(result) -> float:
    assert result.rc == 0, result.stderr
    match = re.search(r"test/student_acc\W+([0-9.]+)", result.stdout)
    assert match, result.stdout
    return float(match.group(1))


def _step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def cwd(tmp_path_factory):
    return tmp_path_factory.mktemp("preemption")


def test_two_stops_then_the_end_test_like_the_uninterrupted_run(cwd, tnkd_cli):
    whole = tnkd_cli(_args("whole"), cwd=cwd)
    assert whole.rc == 0, whole.stderr
    reference = _test_accuracy(tnkd_cli(_args("whole", "--ckpt_path", "last", sub="test"), cwd=cwd))

    folder = cwd / "runs" / "checkpoints" / "job"
    # 6 batches per epoch: step 8 is mid-epoch 2, step 12 the end of epoch 2
    first = tnkd_cli(_args("job", *_stop_at(8)), cwd=cwd, path=[str(TESTS)])
    assert first.rc == 143
    hint = first.stderr_lines[-1]
    assert "stopped by SIGTERM; resume with: tnkd fit" in hint and hint.endswith("--ckpt_path last")
    assert _step(folder / "last.ckpt") == 8

    second = tnkd_cli(
        _args("job", "--ckpt_path", "last", *_stop_at(12)), cwd=cwd, path=[str(TESTS)]
    )
    assert second.rc == 143, second.stderr
    assert _step(folder / "last.ckpt") == 12

    end = tnkd_cli(_args("job", "--ckpt_path", "last"), cwd=cwd)
    assert end.rc == 0, end.stderr
    assert _step(folder / "last.ckpt") == 18
    assert sorted(p.name for p in folder.glob("last*")) == ["last.ckpt"]  # no last-v1.ckpt
    # the same weights as the uninterrupted run (same data order and random state)
    resumed = _weights(folder / "last.ckpt")
    for key, value in _weights(cwd / "runs" / "checkpoints" / "whole" / "last.ckpt").items():
        assert torch.allclose(resumed[key], value, atol=1e-6), key

    by_name = _test_accuracy(tnkd_cli(_args("job", "--ckpt_path", "last", sub="test"), cwd=cwd))
    by_file = _test_accuracy(
        tnkd_cli(_args("job", "--ckpt_path", str(folder / "last.ckpt"), sub="test"), cwd=cwd)
    )
    assert by_name == by_file == reference


def test_ctrl_c_exits_130_with_the_resume_hint(cwd, tnkd_cli):
    result = tnkd_cli(_args("ctrlc", *_stop_at(5, "SIGINT")), cwd=cwd, path=[str(TESTS)])
    assert result.rc == 130
    assert "stopped by SIGINT; resume with:" in result.stderr_lines[-1]
    assert _step(cwd / "runs" / "checkpoints" / "ctrlc" / "last.ckpt") == 5


def test_sigterm_during_start_up_then_resume_from_the_beginning(cwd, tnkd_cli):
    stopped = tnkd_cli(
        _args("early", "--data", "cli_plugins.PreemptedWhileLoading"), cwd=cwd, path=[str(TESTS)]
    )
    assert stopped.rc == 143
    assert len(stopped.stderr_lines) <= 3 and "Traceback" not in stopped.stderr, stopped.stderr
    assert "stopped by SIGTERM; resume with:" in stopped.stderr_lines[-1]
    assert not (cwd / "runs" / "checkpoints" / "early").exists()
    resumed = tnkd_cli(_args("early", "--ckpt_path", "last", "--trainer.max_epochs", "1"), cwd=cwd)
    assert resumed.rc == 0, resumed.stderr
    assert "no checkpoint in" in resumed.stdout and "starting from the beginning" in resumed.stdout
    assert _step(cwd / "runs" / "checkpoints" / "early" / "last.ckpt") == 6


def test_test_with_last_and_no_checkpoint_is_an_error(cwd, tnkd_cli):
    result = tnkd_cli(_args("never", "--ckpt_path", "last", sub="test"), cwd=cwd)
    assert result.rc != 0 and len(result.stderr_lines) <= 3
    assert re.search(r"--ckpt_path last: .*never/last.ckpt does not exist", result.stderr_lines[-1])
