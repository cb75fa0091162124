"""The interface every tnkd data module follows.

A data module yields ``(image, label)`` batches: images are float tensors in ``[0, 1]``
of shape ``(batch, *input_shape)`` (``input_shape = (channels, height, width)``), labels
are ``int64`` class indices. Tensor-network students flatten the image into a chain of
``num_features`` sites; convolutional teachers see the image as it is.

Subclasses implement :meth:`load_split` and set ``num_classes``, ``input_shape`` and
``class_names``; the base class does the seeded validation split and the loaders.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from tnkd.data.loader import ResumableLoader


def check_fraction(name: str, value: float, *, upper_open: bool = True) -> float:
    """Raise a clear error unless ``0 <= value < 1`` (or ``<= 1`` when not ``upper_open``)."""
    ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    if not ok or math.isnan(value):
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name} must be in {bound}, but got {value}")
    return float(value)


class ClassificationDataModule(L.LightningDataModule):
    """Base class: a seeded train/val/test split of an image classification set.

    Args:
        batch_size: samples per batch (train, val and test).
        val_fraction: fraction of the training set held out for validation, in ``[0, 1)``.
        seed: seed of the validation split (the split is the same on every run and rank).
        num_workers: ``DataLoader`` workers.
    """

    num_classes: int = 0
    input_shape: tuple[int, ...] = ()
    class_names: tuple[str, ...] = ()

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"data batch_size must be a positive integer, but got {batch_size!r}")
        self.batch_size = batch_size
        self.val_fraction = check_fraction("data val_fraction", val_fraction)
        self.seed = seed
        self.num_workers = num_workers
        self._splits: dict[str, TensorDataset] = {}

    @property
    def num_features(self) -> int:
        """Number of scalar inputs per sample (the number of sites of a chain student)."""
        return math.prod(self.input_shape)

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(images, labels)`` of the training or test set.

        Images are float32 in ``[0, 1]`` with shape ``(n, *input_shape)``; labels int64.
        """
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load the data once and make the seeded validation split."""
        if self._splits:
            return
        x, y = self.load_split(train=True)
        x_test, y_test = self.load_split(train=False)
        for name, images in {"train": x, "test": x_test}.items():
            if len(images) == 0:
                raise ValueError(
                    f"{type(self).__name__}: the {name} set is empty; check the data files"
                )
            bad = int((~torch.isfinite(images)).sum())
            if bad:
                raise ValueError(
                    f"{type(self).__name__}: the {name} set has {bad} NaN or infinite pixel "
                    "values; clean the data (e.g. torch.nan_to_num) before training"
                )
        n_val = round(self.val_fraction * len(x))
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        self._splits = {
            "train": TensorDataset(x[train_idx], y[train_idx]),
            "val": TensorDataset(x[val_idx], y[val_idx])
            if n_val
            else TensorDataset(x_test, y_test),
            "test": TensorDataset(x_test, y_test),
        }

    def attach_teacher_logits(self, split: str, logits: torch.Tensor) -> None:
        """Add precomputed teacher logits to a split: its batches become ``(x, y, logits)``."""
        x, y = self.dataset(split).tensors[:2]
        if len(logits) != len(x):
            raise ValueError(
                f"expected teacher logits for {len(x)} {split} samples, but got {len(logits)}"
            )
        self._splits[split] = TensorDataset(x, y, logits)

    def dataset(self, split: str) -> TensorDataset:
        """The ``train``, ``val`` or ``test`` dataset (calls :meth:`setup` if needed)."""
        self.setup()
        return self._splits[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch from ``seed``; resumes mid-epoch exactly (:mod:`tnkd.data.loader`).

        Under a distributed strategy Lightning's ``DistributedSampler`` shuffles instead
        (seeded per epoch too); a run stopped mid-epoch then resumes at the epoch's start.
        """
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            return self._loader("train", shuffle=True)
        loader = ResumableLoader(
            self.dataset("train"),
            batch_size=self.batch_size,
            seed=self.seed,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
        if trainer is not None:
            loader.progress = lambda: trainer.fit_loop.epoch_loop.batch_progress.current.completed
        return loader

    def val_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("test", shuffle=False)
