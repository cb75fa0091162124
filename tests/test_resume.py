"""Named runs keep their checkpoints in one folder, and a fresh run never overwrites them.

Stopping and resuming through the real command (SIGTERM, Ctrl-C, exit statuses, the same final
weights) is tested in tests/test_preemption.py.
"""

import os
import signal
from pathlib import Path

import lightning as L
import pytest

from tnkd.training.callbacks import RunCheckpoint

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits" / "mps_from_cnn.yaml"


class StopAt(L.Callback):
    """Stop the run after training step ``step``: by SIGTERM to itself or by Ctrl-C."""

    def __init__(self, step: int, how: str) -> None:
        self.step, self.how = step, how

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            sig = signal.SIGTERM if self.how == "sigterm" else signal.SIGINT
            os.kill(os.getpid(), sig)  # the run stops after this batch


def _args(root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(CONFIG),
        "--model.init_args.beta",
        "0",
        "--model.init_args.teacher_checkpoint",
        "null",
        "--model.init_args.student.init_args.bond_dim",
        "4",
        "--trainer.max_epochs",
        "3",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        *extra,
    ]


def _fit(args: list[str], callback: L.Callback | None = None):
    from tnkd.cli import TnkdCLI

    ckpt = None
    if "--ckpt_path" in args:
        i = args.index("--ckpt_path")
        ckpt, args = args[i + 1], args[:i] + args[i + 2 :]
    cli = TnkdCLI(args=args[1:], run=False)  # the parser without a subcommand: fit below
    if callback is not None:
        cli.trainer.callbacks.append(callback)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    return cli


def test_fresh_run_never_overwrites_an_earlier_runs_checkpoints(tmp_path):
    _fit(_args(tmp_path, "--trainer.max_epochs", "1"))
    folder = tmp_path / "checkpoints"
    before = {p.name: p.read_bytes() for p in folder.glob("*.ckpt")}
    assert "last.ckpt" in before
    with pytest.raises(FileExistsError, match="--ckpt_path last"):
        _fit(_args(tmp_path, "--trainer.max_epochs", "1"))
    assert {p.name: p.read_bytes() for p in folder.glob("*.ckpt")} == before


def test_named_run_checkpoints_live_in_a_stable_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = _args(tmp_path, "--trainer.max_epochs", "1")
    i = args.index("--trainer.logger")
    del args[i : i + 2]
    args += [
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.logger.init_args.name",
        "job",
    ]
    cli = _fit(args)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, RunCheckpoint)]
    assert Path(callback.dirpath) == tmp_path / "checkpoints" / "job"
    assert (tmp_path / "checkpoints" / "job" / "last.ckpt").exists()
