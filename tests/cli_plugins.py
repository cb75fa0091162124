"""Classes the CLI tests name by ``class_path``: a stop at a given step, and broken data modules."""

from __future__ import annotations

import errno
import os
import signal

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from tnkd.data import DigitsDataModule
from tnkd.students import MPSClassifier


class StopAt(L.Callback):
    """Send this process SIGTERM (a scheduler's preemption) or SIGINT after step ``step``."""

    def __init__(self, step: int, signal_name: str = "SIGTERM") -> None:
        self.step = step
        self.signum = getattr(signal, signal_name)

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class NaNDigits(DigitsDataModule):
    """Digits with one NaN pixel in the training set."""

    def load_split(self, train: bool):
        x, y = super().load_split(train)
        if train:
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        return x, y


class EmptyDigits(DigitsDataModule):
    """Digits without any training image."""

    def load_split(self, train: bool):
        x, y = super().load_split(train)
        return (x[:0], y[:0]) if train else (x, y)


class PreemptedWhileLoading(DigitsDataModule):
    """SIGTERM arrives while the data is loaded (before any training)."""

    def load_split(self, train: bool):
        os.kill(os.getpid(), signal.SIGTERM)
        return super().load_split(train)


class NaNAfter(MPSClassifier):
    """An MPS student whose logits turn NaN after ``after`` training steps, built under ``nan_seed``.

    A run that diverges, for one seed only (the seed is the one ``seed_everything`` set before
    the student was built: ``torch.initial_seed()``).
    """

    def __init__(self, *args, nan_seed: int = 1, after: int = 2, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.poisoned = torch.initial_seed() == nan_seed
        self.after = after
        self.steps = 0

    def forward(self, x):
        z = super().forward(x)
        if self.training and self.poisoned:
            self.steps += 1
            if self.steps > self.after:
                return z * float("nan")
        return z


class SigtermOnce(MPSClassifier):
    """An MPS student that sends this process SIGTERM when the ``at``-th student starts training.

    Once only: the marker file ``marker`` records that it did (a resumed run goes on).
    """

    started = 0

    def __init__(self, *args, at: int = 4, marker: str = "sigterm.done", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.at, self.marker, self.training_started = at, marker, False

    def forward(self, x):
        if self.training and not self.training_started:
            self.training_started = True
            SigtermOnce.started += 1
            if SigtermOnce.started == self.at and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(x)


class HoldWhileTraining(L.Callback):
    """At the start of training write ``first.pid`` (this run's PID), then wait for the file
    ``second.done`` (a second run started meanwhile), at most two minutes."""

    def on_train_start(self, trainer, pl_module) -> None:
        import time

        with open("first.pid", "w") as f:
            f.write(str(os.getpid()))
        deadline = time.monotonic() + 120
        while not os.path.exists("second.done") and time.monotonic() < deadline:
            time.sleep(0.05)


class FullDiskIO(TorchCheckpointIO):
    """Checkpoint writes that hit a full disk: part of the file is written, then ENOSPC."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        with open(path, "wb") as f:
            f.write(b"PK partial checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
