"""The interface every tnkd data module follows.

A data module yields ``(image, label)`` batches: images are float tensors in ``[0, 1]``
of shape ``(batch, *input_shape)`` (``input_shape = (channels, height, width)``), labels
are ``int64`` class indices. Tensor-network students flatten the image into a chain of
``num_features`` sites; convolutional teachers see the image as it is.

Subclasses implement :meth:`load_split` and set ``num_classes``, ``input_shape`` and
``class_names``; the base class does the seeded validation split, the loaders, the training-time
augmentation (:mod:`tnkd.data.augment`) and transfer sets (:mod:`tnkd.data.transfer`).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from tnkd.data.augment import Augment, affine_augment
from tnkd.data.loader import ResumableLoader, TensorBatches, collate_batch
from tnkd.data.transfer import UNLABELED, load_unlabeled, stratified_subset
from tnkd.registry import RecordsInitArgs


def check_fraction(name: str, value: float, *, upper_open: bool = True) -> float:
    """Raise a clear error unless ``0 <= value < 1`` (or ``<= 1`` when not ``upper_open``)."""
    ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    if not ok or math.isnan(value):
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name} must be in {bound}, but got {value}")
    return float(value)


#: share of an accelerator's free memory the data sets may take to stay on it
RESIDENT_FRACTION = 0.5


def check_downsample(value: Any, size: int) -> int:
    """Raise a one-line error unless ``value`` is an integer divisor of the image side ``size``."""
    divisors = [d for d in range(1, size + 1) if size % d == 0]
    if not isinstance(value, int) or isinstance(value, bool) or value not in divisors:
        raise ValueError(
            f"data downsample must be an integer divisor of {size} ({divisors}), but got {value!r}"
        )
    return value


def _free_memory(device: torch.device) -> int | None:
    """Free bytes on an accelerator, or ``None`` where torch cannot tell."""
    info = getattr(getattr(torch, device.type, None), "mem_get_info", None)
    if info is None:
        return None
    try:
        return int(info(device)[0])
    except (RuntimeError, AssertionError, TypeError):
        return None


class ClassificationDataModule(RecordsInitArgs, L.LightningDataModule):
    """Base class: a seeded train/val/test split of an image classification set.

    Args:
        batch_size: samples per batch (train, val and test).
        val_fraction: fraction of the training set held out for validation, in ``[0, 1)``.
        seed: seed of the validation split, the batch order, the augmentation draws and the
            labeled subset (the same on every run and rank).
        num_workers: ``DataLoader`` workers.
        augment: training-time augmentation, e.g. ``{shift: 2, rotate: 10}`` (see
            :class:`~tnkd.data.augment.Augment`); training batches only, applied on the
            batch's device after transfer (:meth:`on_after_batch_transfer`).
        labeled_per_class: make the training split a transfer set: this many images per class
            (seeded, stratified) keep their labels, the others get the label ``-1`` (used by
            the distillation term only). ``None``: every image is labeled.
        extra_unlabeled: a torch file with more unlabeled images (``(n, *input_shape)``),
            appended to the training split with the label ``-1``.

    Transfer sets: a labels-only run (``DistillationModule`` with ``beta = 0``, or a
    ``TeacherModule``) calls :meth:`use_unlabeled` with ``False`` and trains on the labeled
    images alone, repeated so that an epoch has as many samples as the whole transfer set (the
    same number of steps as its distilled twin).
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
        augment: dict[str, Any] | None = None,
        labeled_per_class: int | None = None,
        extra_unlabeled: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"data batch_size must be a positive integer, but got {batch_size!r}")
        self.batch_size = batch_size
        self.val_fraction = check_fraction("data val_fraction", val_fraction)
        self.seed = seed
        self.num_workers = num_workers
        self.augmentation = Augment.build(augment)
        self.augment = None if self.augmentation is None else self.augmentation.as_dict()
        if labeled_per_class is not None and (
            isinstance(labeled_per_class, bool)
            or not isinstance(labeled_per_class, int)
            or labeled_per_class < 1
        ):
            raise ValueError(
                f"data labeled_per_class must be a positive integer or null, but got {labeled_per_class!r}"
            )
        self.labeled_per_class = labeled_per_class
        self.extra_unlabeled = None if extra_unlabeled is None else str(extra_unlabeled)
        self._unlabeled_used = True
        self._labeled_order: torch.Tensor | None = None
        self._splits: dict[str, TensorDataset] = {}
        self._resident: dict[str, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {}
        self._logits_keys: dict[str, str | None] = {}
        self._draws: dict[tuple[str, int, int], torch.Tensor] = {}

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
        train_idx, val_idx = self.validation_split(len(x))
        x_train, y_train = self._transfer_set(x[train_idx], y[train_idx])
        self._splits = {
            "train": TensorDataset(x_train, y_train),
            "val": TensorDataset(x[val_idx], y[val_idx])
            if len(val_idx)
            else TensorDataset(x_test, y_test),
            "test": TensorDataset(x_test, y_test),
        }

    def validation_split(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``(train, val)`` of the seeded validation split of ``n`` training samples.

        ``round(val_fraction * n)`` samples, drawn by a permutation seeded with ``seed``, are
        held out for validation; with none held out, validation uses the test set.
        """
        n_val = round(self.val_fraction * n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return perm[n_val:], perm[:n_val]

    # ---- transfer sets ----------------------------------------------------------------------

    @property
    def is_transfer_set(self) -> bool:
        """Whether the training split holds unlabeled images (label ``-1``)."""
        return self.labeled_per_class is not None or self.extra_unlabeled is not None

    def _transfer_set(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training split with only ``labeled_per_class`` labels kept, extra images appended."""
        if self.labeled_per_class is not None:
            keep = stratified_subset(y, self.labeled_per_class, self.seed)
            labels = torch.full_like(y, UNLABELED)
            labels[keep] = y[keep]
            y = labels
        if self.extra_unlabeled is not None:
            extra = self.load_extra_unlabeled(tuple(x.shape[1:]))
            x = torch.cat([x, extra])
            y = torch.cat([y, torch.full((len(extra),), UNLABELED, dtype=y.dtype)])
        return x, y

    def load_extra_unlabeled(self, input_shape: tuple[int, ...]) -> torch.Tensor:
        """The images of ``extra_unlabeled``, as :func:`~tnkd.data.transfer.load_unlabeled` reads them.

        Subclasses that read other formats (or scale their inputs) override it.
        """
        assert self.extra_unlabeled is not None
        return load_unlabeled(self.extra_unlabeled, input_shape)

    def use_unlabeled(self, flag: bool) -> None:
        """Train on the whole transfer set (``True``) or on its labeled images alone.

        Labels-only runs call it with ``False``: the labeled images are then repeated so that an
        epoch has as many samples as the whole transfer set. No effect without a transfer set.
        """
        self._unlabeled_used = bool(flag)

    def train_order(self) -> torch.Tensor | None:
        """Positions in the training split that an epoch goes over (``None``: all of them)."""
        if not self.is_transfer_set or self._unlabeled_used:
            return None
        if self._labeled_order is None:
            labels = self.dataset("train").tensors[1]
            labeled = torch.nonzero(labels != UNLABELED).squeeze(1)
            if len(labeled) == 0:
                raise ValueError("the transfer set has no labeled images to train on labels alone")
            self._labeled_order = labeled.repeat(max(1, round(len(labels) / len(labeled))))
        return self._labeled_order

    # ---- teacher logits ---------------------------------------------------------------------

    def cacheable_train_views(self) -> int:
        """How many views of each training image a teacher cache may hold.

        1 without augmentation (the images themselves), ``views`` with fixed views, 0 with a
        fresh view per epoch (the teacher must then run on every training batch).
        """
        if self.augmentation is None:
            return 1
        return self.augmentation.views

    def train_view(self, view: int) -> torch.Tensor:
        """All training images as view ``view`` shows them (view 0: the images themselves)."""
        x = self.dataset("train").tensors[0]
        if view == 0:
            return x
        params = self._view_params()[view]
        return torch.cat(
            [affine_augment(x[i : i + 4096], params[i : i + 4096]) for i in range(0, len(x), 4096)]
        )

    def attach_teacher_logits(
        self, split: str, logits: torch.Tensor, key: str | None = None
    ) -> None:
        """Add precomputed teacher logits to a split: its batches become ``(x, y, logits)``.

        For the training split with fixed views the logits are ``(n, views, classes)``, one row
        per view; the view each sample shows is picked per batch (:meth:`augment_batch`).
        ``key`` names the teacher they belong to (:meth:`teacher_logits_key`), so that a run
        with another teacher replaces them instead of reusing them.
        """
        x, y = self.dataset(split).tensors[:2]
        if len(logits) != len(x):
            raise ValueError(
                f"expected teacher logits for {len(x)} {split} samples, but got {len(logits)}"
            )
        self._splits[split] = TensorDataset(x, y, logits)
        self._logits_keys[split] = key

    def teacher_logits_key(self, split: str) -> str | None:
        """The ``key`` the split's attached teacher logits were given (``None``: none given)."""
        return self._logits_keys.get(split)

    # ---- augmentation -----------------------------------------------------------------------

    def _drawn(self, kind: str, epoch: int, n: int) -> torch.Tensor:
        """The augmentation draws of one kind, made once per epoch (the last epoch's kept)."""
        key = (kind, epoch, n)
        if key not in self._draws:
            aug = self.augmentation
            assert aug is not None
            if kind == "fresh":
                value = aug.epoch_params(self.seed, epoch, n)
            elif kind == "choice":
                value = aug.view_choice(self.seed, epoch, n)
            else:
                value = aug.view_params(self.seed, n)
            self._draws = {k: v for k, v in self._draws.items() if k[0] != kind or kind == "views"}
            self._draws[key] = value
        return self._draws[key]

    def _view_params(self) -> torch.Tensor:
        return self._drawn("views", 0, len(self.dataset("train")))

    def augment_batch(self, batch: Any, epoch: int) -> Any:
        """Augment a training batch ``(x, y[, logits], position)``; returns ``(x, y[, logits])``.

        ``position`` is each sample's place in the epoch's list of samples (what the training
        loader adds when augmenting): the view is a function of ``(seed, epoch, position)``, so
        a resumed run, a GPU run and a CPU run see the same views.
        """
        *tensors, position = batch
        x = tensors[0]
        aug = self.augmentation
        assert aug is not None
        pos = position.cpu()
        order = self.train_order()
        n = len(self.dataset("train")) if order is None else len(order)
        if aug.views == 0:
            params = self._drawn("fresh", epoch, n)[pos]
        else:
            choice = self._drawn("choice", epoch, n)[pos]
            image = pos if order is None else order[pos]
            params = self._view_params()[choice, image]
            if len(tensors) > 2 and tensors[2].ndim == 3:  # cached logits of every view
                rows = torch.arange(len(choice), device=tensors[2].device)
                tensors[2] = tensors[2][rows, choice.to(tensors[2].device)]
        tensors[0] = affine_augment(x, params)
        return tensors if isinstance(batch, list) else tuple(tensors)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment training batches (on their device); other batches pass unchanged."""
        trainer = self.trainer
        if self.augmentation is None or trainer is None or not trainer.training:
            return batch
        return self.augment_batch(batch, trainer.current_epoch)

    # ---- loaders ----------------------------------------------------------------------------

    def dataset(self, split: str) -> TensorDataset:
        """The ``train``, ``val`` or ``test`` dataset (calls :meth:`setup` if needed)."""
        self.setup()
        return self._splits[split]

    def resident_device(self) -> torch.device | None:
        """The accelerator the loaders keep the data on, or ``None`` (the data stays in RAM).

        In-memory splits are copied once to the trainer's device and batches are cut there, so
        that no step waits for a host-to-device copy: on an accelerator, in one process, without
        loader workers (they cannot share device tensors), when the splits take at most half of
        the device's free memory.
        """
        trainer = self.trainer
        if trainer is None or trainer.world_size > 1 or self.num_workers > 0:
            return None
        device = trainer.strategy.root_device
        if device.type == "cpu":
            return None
        size = sum(t.numel() * t.element_size() for d in self._splits.values() for t in d.tensors)
        free = _free_memory(device)
        return device if free is None or size <= RESIDENT_FRACTION * free else None

    def _tensors(self, split: str) -> tuple[torch.Tensor, ...]:
        """The split's tensors, on :meth:`resident_device` when there is one (copied once)."""
        tensors = self.dataset(split).tensors
        device = self.resident_device()
        if device is None:
            return tensors
        kept = self._resident.get(split)
        if (
            kept is None
            or len(kept[0]) != len(tensors)
            or any(a is not b for a, b in zip(kept[0], tensors, strict=True))
            or kept[1][0].device != device
        ):
            kept = (tensors, tuple(t.to(device) for t in tensors))
            self._resident[split] = kept
        return kept[1]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            TensorBatches(self._tensors(split)),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_batch,
        )

    def _train_set(self) -> TensorBatches:
        """What the training loader goes over (the split, or the positions of :meth:`train_order`).

        Each sample is followed by its position in the epoch's list when augmenting.
        """
        return TensorBatches(
            self._tensors("train"), self.train_order(), with_position=self.augmentation is not None
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch from ``seed``; resumes mid-epoch exactly (:mod:`tnkd.data.loader`).

        Under a distributed strategy Lightning's ``DistributedSampler`` shuffles instead
        (seeded per epoch too); a run stopped mid-epoch then resumes at the epoch's start.
        With augmentation the batches carry each sample's position as a last tensor, which
        :meth:`on_after_batch_transfer` uses and removes.
        """
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            return DataLoader(
                self._train_set(),
                batch_size=self.batch_size,
                shuffle=True,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                collate_fn=collate_batch,
            )
        loader = ResumableLoader(
            self._train_set(),
            batch_size=self.batch_size,
            seed=self.seed,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_batch,
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
