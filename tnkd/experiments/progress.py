"""One printed line per training epoch: what ``tnkd compare --progress true`` shows.

``tnkd compare`` turns progress bars off so that its results table stays readable; with
``progress`` on, each run prints a line per epoch instead (train loss and accuracy, validation
accuracy, seconds), so a long grid can be watched, or cut short, from its log.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

#: metrics printed, in this order, when the run logged them
KEYS = (
    "train/loss",
    "train/student_acc",
    "train/teacher_acc",
    "val/student_acc",
    "val/agreement",
    "val/teacher_acc",
)


class EpochLines(Callback):
    """Print ``[label] epoch k/n: train/loss 0.41 ... (12.3 s)`` at the end of each epoch.

    With ``eta=True`` the line ends with an estimate of the time left (mean epoch time so far
    times the epochs still to run): ``(12.3 s, about 4 min left)``.
    """

    def __init__(self, label: str = "", eta: bool = False) -> None:
        self.label = label
        self.eta = eta
        self._start = 0.0
        self._epoch_seconds: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.is_global_zero:
            print(
                self.line(trainer.current_epoch, trainer.max_epochs, trainer.callback_metrics),
                flush=True,
            )

    def line(self, epoch: int, max_epochs: int | None, metrics: dict[str, Any]) -> str:
        """The line for (0-based) ``epoch``, from Lightning's ``callback_metrics``."""
        parts = [f"{k} {float(metrics[k]):.4f}" for k in KEYS if k in metrics]
        head = f"[{self.label}] " if self.label else ""
        total = f"/{max_epochs}" if max_epochs and max_epochs > 0 else ""
        seconds = time.perf_counter() - self._start
        self._epoch_seconds.append(seconds)
        timing = f"{seconds:.1f} s"
        if self.eta and max_epochs and max_epochs > 0:
            left = (max_epochs - epoch - 1) * sum(self._epoch_seconds) / len(self._epoch_seconds)
            timing += f", about {_duration(left)} left"
        return f"{head}epoch {epoch + 1}{total}: {', '.join(parts)} ({timing})"


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min``, ``1 h 5 min``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {seconds % 3600 / 60:.0f} min"
