"""scikit-learn's bundled handwritten digits: 1,797 8x8 images, no download."""

from __future__ import annotations

import torch

from tnkd.data.base import ClassificationDataModule, check_fraction


class DigitsDataModule(ClassificationDataModule):
    """The UCI optical digits shipped with scikit-learn (8x8 pixels, 10 classes).

    The set has no official test split, so a stratified, seeded one is made: ``test_fraction``
    of the images (default 20%, 360 images) are held out, the rest is split into train and
    validation by ``val_fraction``. Pixels (0..16) are scaled to ``[0, 1]``.

    Args:
        test_fraction: fraction of all images held out as the test set, in ``(0, 1)``.
        split_seed: seed of the train/test split (fixed by default so that results compare).
        batch_size, val_fraction, seed, num_workers, augment, labeled_per_class,
            extra_unlabeled: see :class:`~tnkd.data.base.ClassificationDataModule`.
    """

    num_classes = 10
    input_shape = (1, 8, 8)
    class_names = tuple(str(i) for i in range(10))

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        split_seed: int = 0,
        num_workers: int = 0,
        augment: dict | None = None,
        labeled_per_class: int | None = None,
        extra_unlabeled: str | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            num_workers=num_workers,
            augment=augment,
            labeled_per_class=labeled_per_class,
            extra_unlabeled=extra_unlabeled,
        )
        self.test_fraction = check_fraction("data test_fraction", test_fraction)
        if self.test_fraction == 0:
            raise ValueError("data test_fraction must be > 0 for the digits set, but got 0")
        self.split_seed = split_seed
        self._cache: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        if not self._cache:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split

            digits = load_digits()
            x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
            y = torch.tensor(digits.target, dtype=torch.int64)
            idx_train, idx_test = train_test_split(
                range(len(y)),
                test_size=self.test_fraction,
                random_state=self.split_seed,
                stratify=y,
            )
            self._cache[True] = (x[idx_train], y[idx_train])
            self._cache[False] = (x[idx_test], y[idx_test])
        return self._cache[train]
