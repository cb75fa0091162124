"""A Hugging Face dataset saved on disk (``Dataset.save_to_disk``), as arrays.

The dataset is read with ``datasets.load_from_disk`` (the optional extra ``pip install
"tnkd[hf]"``), its columns turned into NumPy arrays, and handed to
:class:`~tnkd.data.arrays.ArrayDataModule`: the same checks, scaling, validation split,
augmentation, transfer sets and teacher caches. Inputs are one column of images (an ``Image``
feature, greyscale or colour, all of one size) or of number lists (feature vectors), or several
numeric columns, one feature each (tabular data). Labels are a ``ClassLabel`` column (its names
become the class names) or an integer column.

Example (a dataset with ``train`` and ``test`` splits, an ``image`` and a ``label`` column)::

    HuggingFaceDataModule("data/my_images", input_columns="image", label_column="label")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tnkd.data.arrays import ArrayDataModule, ArraySource


class MissingDependencyError(ImportError, ValueError):
    """An optional dependency is not installed (a ``ValueError`` too: a one-line CLI error)."""


def load_dataset_from_disk(path: str | os.PathLike) -> Any:
    """``datasets.load_from_disk(path)``, with one-line errors for a missing package or folder.

    Raises:
        MissingDependencyError: if the ``datasets`` package is not installed.
        FileNotFoundError: if ``path`` is not a folder.
        ValueError: if the folder holds no saved dataset.
    """
    try:
        import datasets
    except ImportError as err:
        raise MissingDependencyError(
            "HuggingFaceDataModule needs the datasets package: pip install 'tnkd[hf]' "
            "(or pip install datasets)"
        ) from err
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"data path {folder} is not a folder; give the folder that Dataset.save_to_disk wrote"
        )
    try:
        return datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(
            f"{folder} holds no dataset saved with save_to_disk ({type(err).__name__}: {err})"
        ) from err


def dataset_arrays(
    dataset: Any, input_columns: str | Sequence[str], label_column: str, name: str
) -> tuple[np.ndarray, np.ndarray, Any]:
    """``(inputs, labels, label feature)`` of one split of a Hugging Face dataset.

    One input column gives its arrays as they are (images channel-first); several numeric
    columns are stacked into ``(n, columns)`` feature vectors.

    Raises:
        ValueError: if a column is missing, the labels are strings, or one of several input
            columns is not a number per sample.
    """
    columns = [input_columns] if isinstance(input_columns, str) else list(input_columns)
    if not columns:
        raise ValueError("data input_columns is empty; name the input column(s)")
    missing = [c for c in [*columns, label_column] if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"the {name} split has no column(s) {', '.join(missing)} (columns: "
            f"{', '.join(dataset.column_names)}); set data input_columns / label_column"
        )
    label_feature = dataset.features[label_column]
    if getattr(label_feature, "dtype", None) in ("string", "large_string"):
        raise ValueError(
            f"the {name} split's labels ({label_column}) are strings; encode them as classes "
            f"first: dataset.class_encode_column({label_column!r})"
        )
    table = dataset.select_columns([*columns, label_column]).with_format("numpy")[: len(dataset)]
    if len(columns) == 1:
        x = np.asarray(table[columns[0]])
        is_image = type(dataset.features[columns[0]]).__name__ == "Image"
        if is_image and x.ndim == 4:  # decoded colour images are (n, H, W, C)
            x = np.moveaxis(x, -1, 1)
        if x.dtype == object:
            raise ValueError(
                f"the {name} split's {columns[0]} column holds samples of different shapes "
                "(images of several sizes?); make them one size first"
            )
    else:
        parts = [np.asarray(table[c]) for c in columns]
        wide = [c for c, part in zip(columns, parts, strict=True) if part.ndim != 1]
        if wide:
            raise ValueError(
                f"input column(s) {', '.join(wide)} hold more than one number per sample; give "
                "such a column alone as input_columns"
            )
        x = np.stack(parts, axis=1)
    return x, np.asarray(table[label_column]), label_feature


class HuggingFaceDataModule(ArrayDataModule):
    """A Hugging Face dataset saved with ``save_to_disk``: images or tabular features.

    Needs the ``datasets`` package (``pip install "tnkd[hf]"``). The folder holds either a
    ``DatasetDict`` with a training and a test split, or one ``Dataset`` (then
    ``test_fraction`` of it is held out as the test set, as with ``test_split=None``).

    Args:
        path: the folder ``save_to_disk`` wrote.
        input_columns: the input column (an ``Image`` column, or one holding a list of numbers
            per sample), or a list of numeric columns, one feature each.
        label_column: the integer or ``ClassLabel`` label column.
        train_split: name of the training split.
        test_split: name of the test split; ``None``: hold out ``test_fraction`` of the
            training split.
        num_classes: number of classes; default: from a ``ClassLabel`` column, else the
            largest label + 1.
        class_names: one name per class; default: a ``ClassLabel`` column's names.
        scale, test_fraction, split_seed, batch_size, val_fraction, seed, num_workers,
            augment, labeled_per_class, extra_unlabeled: see
            :class:`~tnkd.data.arrays.ArrayDataModule`.

    Raises:
        MissingDependencyError: if ``datasets`` is not installed (a one-line error).
        FileNotFoundError: if ``path`` is not a folder.
        ValueError: for a missing split or column, string labels, or any check of
            :class:`~tnkd.data.arrays.ArrayDataModule`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        input_columns: str | list[str] = "image",
        label_column: str = "label",
        train_split: str = "train",
        test_split: str | None = "test",
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        scale: str | None = None,
        test_fraction: float | None = None,
        split_seed: int = 0,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        augment: dict | None = None,
        labeled_per_class: int | None = None,
        extra_unlabeled: ArraySource | None = None,
    ) -> None:
        loaded = load_dataset_from_disk(path)
        if hasattr(loaded, "keys"):  # a DatasetDict
            splits = dict(loaded)
            absent = [s for s in (train_split, test_split) if s is not None and s not in splits]
            if absent:
                raise ValueError(
                    f"{path} has no split {', '.join(absent)} (splits: {', '.join(splits)}); set "
                    "data train_split / test_split (test_split: null holds out test_fraction)"
                )
        else:  # one Dataset: the training set, a test split is held out
            splits, test_split = {train_split: loaded}, None
        x, y, label_feature = dataset_arrays(
            splits[train_split], input_columns, label_column, train_split
        )
        test: dict[str, Any] = {}
        if test_split is not None:
            x_test, y_test, _ = dataset_arrays(
                splits[test_split], input_columns, label_column, test_split
            )
            test = {"x_test": x_test, "y_test": y_test}
        names = getattr(label_feature, "names", None)
        super().__init__(
            x_train=x,
            y_train=y,
            **test,
            num_classes=num_classes if num_classes is not None or not names else len(names),
            class_names=class_names if class_names is not None else names,
            scale=scale,
            test_fraction=test_fraction,
            split_seed=split_seed,
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            num_workers=num_workers,
            augment=augment,
            labeled_per_class=labeled_per_class,
            extra_unlabeled=extra_unlabeled,
        )
        self.path = str(path)
        self.input_columns = input_columns
        self.label_column = label_column
        self.train_split, self.test_split = train_split, test_split
