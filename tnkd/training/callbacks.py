"""Checkpoints that resume: a stable folder per named run, ``last.ckpt`` on stop, atomic writes.

:class:`RunCheckpoint` is the checkpoint callback every ``tnkd fit`` gets unless its config names
one of its own. It differs from Lightning's :class:`~lightning.pytorch.callbacks.ModelCheckpoint`
in four ways:

* **A stable folder.** A run named ``NAME`` (``trainer.logger.init_args.name``) keeps its
  checkpoints in ``SAVE_DIR/checkpoints/NAME``, the same folder on every rerun, so that
  ``tnkd fit --config FILE --ckpt_path last`` finds them (Lightning's default folder is per logger
  version, a new one each run). An unnamed run uses Lightning's default folder.
* **Nothing is overwritten.** A fresh run (no ``--ckpt_path``) whose folder already holds
  checkpoints stops before training with an error that says how to resume or rename it.
* **A checkpoint on stop.** SIGTERM (a scheduler's preemption) and a first Ctrl-C end the run
  after the current batch; ``last.ckpt`` is then written, so the rerun continues from that very
  step, with the same data order (:mod:`tnkd.data.loader`). A second Ctrl-C stops at once. The
  ``tnkd`` command then exits with status 143 (130 after Ctrl-C) and prints the resume command
  (:mod:`tnkd.training.preemption`).
* **``last.ckpt`` is always the newest.** After any sequence of stops and resumes it holds the
  latest weights (Lightning would write ``last-v1.ckpt`` beside a resumed run's ``last.ckpt``).
* **Atomic files.** Every checkpoint is written to a temporary file and renamed, so a run killed
  while saving never leaves a truncated ``.ckpt`` behind; the torch random state is saved too.
  Loggers hear of a checkpoint once it has its name (``WandbLogger(log_model=...)`` logs it).
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import tnkd.training.preemption as preemption
from tnkd.errors import writing


def run_name(trainer: L.Trainer) -> str | None:
    """The name given to the run's logger, or ``None`` (no logger, or an unnamed run)."""
    logger = trainer.logger
    if logger is None:
        return None
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict):
        return init.get("name")
    name = getattr(logger, "name", None)
    return name if name and name not in ("lightning_logs", "") else None


def checkpoint_folder(
    name: str | None, save_dir: str | os.PathLike | None, default_root_dir: str | os.PathLike
) -> Path | None:
    """Where :class:`RunCheckpoint` keeps a run's checkpoints.

    ``SAVE_DIR/checkpoints/NAME`` for a run named ``NAME`` by its logger, and
    ``DEFAULT_ROOT_DIR/checkpoints`` for a run without a logger; ``None`` for an unnamed run with
    a logger (Lightning's per-version folder, which a rerun cannot find).
    """
    if name:
        return Path(save_dir or default_root_dir, "checkpoints", name)
    if save_dir is None:
        return Path(default_root_dir, "checkpoints")
    return None


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with a stable folder, a checkpoint on stop, atomic files.

    See the module docstring. ``save_last`` defaults to ``True``.

    Args:
        dirpath: the folder; default ``SAVE_DIR/checkpoints/NAME`` for a named run.
        **kwargs: any other :class:`~lightning.pytorch.callbacks.ModelCheckpoint` argument.
    """

    def __init__(self, dirpath: str | None = None, save_last: bool = True, **kwargs: Any) -> None:
        super().__init__(dirpath=dirpath, save_last=save_last, **kwargs)
        self._explicit_dir = dirpath is not None

    def _stable_dir(self, trainer: L.Trainer) -> None:
        if self._explicit_dir or self.dirpath is not None:
            return
        name = run_name(trainer)
        if name:
            save_dir = getattr(trainer.logger, "save_dir", None) or trainer.default_root_dir
            self.dirpath = str(checkpoint_folder(name, save_dir, trainer.default_root_dir))

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        self._stable_dir(trainer)
        return super()._find_last_checkpoints(trainer)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        self._stable_dir(trainer)
        with warnings.catch_warnings():
            # resuming a named run reuses its folder on purpose
            warnings.filterwarnings("ignore", ".*exists and is not empty.*")
            super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        # after the checkpoint to resume from is known (Lightning restores it after setup)
        self._refuse_to_overwrite(trainer)

    def _refuse_to_overwrite(self, trainer: L.Trainer) -> None:
        """A fresh run (no ``ckpt_path``) stops before training if its folder holds checkpoints."""
        if trainer.ckpt_path is not None or self.dirpath is None:
            return
        folder = Path(self.dirpath)
        existing = len(list(folder.glob("*.ckpt"))) if folder.is_dir() else 0
        existing = trainer.strategy.broadcast(existing)  # rank 0 decides, every rank stops
        if existing:
            raise FileExistsError(
                f"checkpoint folder {folder} already holds {existing} checkpoint(s) of an earlier "
                "run; resume it with --ckpt_path last, or start a new run under another name "
                "(--trainer.logger.init_args.name NEW), or move those files away"
            )

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        # last.ckpt is overwritten (atomically), never versioned: after a resume Lightning would
        # write last-v1.ckpt and leave a stale last.ckpt for `tnkd test` to pick up
        if self.dirpath is not None:
            self.last_model_path = os.path.join(
                self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION
            )
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def _graceful_ctrl_c(self, trainer: L.Trainer) -> None:
        """First Ctrl-C: stop after the current batch (like SIGTERM); a second: stop at once."""
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            print("\nCtrl-C: stopping after this batch and saving last.ckpt (Ctrl-C again: now)")
            preemption.record_stop(signal.SIGINT)
            trainer._signal_connector.received_sigterm = True
            signal.signal(signal.SIGINT, previous)

        self._previous_sigint = previous
        signal.signal(signal.SIGINT, handler)

    def _restore_ctrl_c(self) -> None:
        previous = getattr(self, "_previous_sigint", None)
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
        self._previous_sigint = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        self._restore_ctrl_c()
        preemption.training_started(False)
        super().teardown(trainer, pl_module, stage)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        super().on_train_start(trainer, pl_module)
        self._graceful_ctrl_c(trainer)
        preemption.training_started()

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # ModelCheckpoint._save_checkpoint, with the file written beside its name and renamed
        tmp = f"{filepath}.tmp"
        try:
            with writing(filepath):
                trainer.save_checkpoint(tmp, self.save_weights_only)
                if trainer.is_global_zero:
                    os.replace(tmp, filepath)
        except BaseException:
            if trainer.is_global_zero:  # a full disk or a stop leaves no partial file
                Path(tmp).unlink(missing_ok=True)
            raise
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:  # after the rename: WandbLogger(log_model="all") reads the file
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def on_exception(  # noqa: D102
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        stopped = isinstance(exception, KeyboardInterrupt | SystemExit)  # Ctrl-C, SIGTERM
        if not stopped or trainer.state.fn != "fit" or self.dirpath is None:
            return
        if not self.save_last or trainer.global_step == 0:
            return
        path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        self._save_checkpoint(trainer, path)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        state = super().state_dict()
        state["torch_rng_state"] = torch.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        state = dict(state_dict)
        rng = state.pop("torch_rng_state", None)
        super().load_state_dict(state)
        if rng is not None:
            torch.set_rng_state(rng)
