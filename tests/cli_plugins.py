"""Classes the CLI tests name by ``class_path``: a stop at a given step, and broken data modules."""

from __future__ import annotations

import os
import signal

import lightning as L

from tnkd.data import DigitsDataModule


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
