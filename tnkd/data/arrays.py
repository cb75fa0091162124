"""Your own data: arrays in ``.npz`` / ``.npy`` files, or tensors and NumPy arrays in Python.

Inputs are images, ``(n, channels, height, width)`` or ``(n, height, width)`` for one channel
(``channels_last=True`` reads ``(n, height, width, channels)``), or flat feature vectors
``(n, features)``: tabular data, where a chain student has one site per feature. Labels are
integer class indices ``0 .. num_classes - 1`` of shape ``(n,)``.

A ``.npz`` file holds the arrays ``x_train`` and ``y_train``, optionally ``x_test`` and
``y_test`` (without them a stratified, seeded test split is held out) and ``class_names``::

    np.savez("my_data.npz", x_train=x, y_train=y, x_test=x_test, y_test=y_test)

Scaling: the tensor-network feature maps expect inputs in ``[0, 1]`` (the ``[1, x]`` map of
Novikov et al. 2016 and the ``[cos(pi x / 2), sin(pi x / 2)]`` map of Stoudenmire & Schwab
2016). 8-bit (``uint8``) inputs are divided by 255; ``scale="minmax"`` maps each feature (each
channel of images) to ``(x - min) / (max - min)`` with the minimum and maximum of the training
split alone (the validation and test splits never inform it), clipping the validation and test
values to ``[0, 1]``.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.normal(size=(100, 5)), np.arange(100) % 3
    >>> dm = ArrayDataModule(x_train=x, y_train=y, scale="minmax")
    >>> dm.num_classes, dm.input_shape, dm.num_features
    (3, (5,), 5)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tnkd.data.base import ClassificationDataModule, check_fraction

#: an array given in Python, or the ``.npy`` file that holds it
ArraySource = str | os.PathLike | np.ndarray | torch.Tensor
#: the keys a ``.npz`` file may hold
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test", "class_names")
SCALES = ("minmax",)


def read_array(source: Any, name: str) -> np.ndarray:
    """An array from a ``.npy`` file, a NumPy array, a tensor or a nested list.

    Raises:
        FileNotFoundError: if a file is named that does not exist.
        ValueError: if the file is not a ``.npy`` array file, or the object is not array-like.
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.suffix == ".npz":
            raise ValueError(
                f"{name}: {path} is a .npz archive; give it as `path` (with the keys "
                f"{', '.join(NPZ_KEYS[:4])}), or give {name} a .npy file"
            )
        if not path.is_file():
            raise FileNotFoundError(f"{name}: {path} does not exist; give a .npy file or an array")
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(
                f"{name}: {path} is not a .npy array file ({type(err).__name__}: {err}); "
                "write it with numpy.save"
            ) from err
    if isinstance(source, torch.Tensor):
        return source.detach().cpu().numpy()
    try:
        return np.asarray(source)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{name}: expected an array, a tensor or a .npy file, but got {type(source).__name__}"
        ) from err


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` file: ``x_train``, ``y_train`` and the optional keys.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it is no ``.npz`` archive, lacks ``x_train`` / ``y_train``, or has only
            one of ``x_test`` / ``y_test``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"data path {path} does not exist; write it with numpy.savez(path, x_train=..., "
            "y_train=..., x_test=..., y_test=...)"
        )
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("it holds one array")
        with archive:
            arrays = {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(
            f"{path} is not a .npz archive ({err}); write it with numpy.savez(path, "
            "x_train=..., y_train=..., x_test=..., y_test=...)"
        ) from err
    found = ", ".join(sorted(arrays)) or "none"
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if ("x_test" in arrays) != ("y_test" in arrays):
        missing.append("y_test" if "x_test" in arrays else "x_test")
    if missing:
        raise ValueError(
            f"{path} lacks the key(s) {', '.join(missing)} (found: {found}); expected x_train, "
            "y_train and optionally x_test, y_test, class_names"
        )
    unknown = sorted(set(arrays) - set(NPZ_KEYS))
    if unknown:
        raise ValueError(
            f"{path} holds unknown key(s) {', '.join(unknown)}; expected x_train, y_train and "
            "optionally x_test, y_test, class_names"
        )
    return arrays


def check_inputs(x: np.ndarray, name: str, channels_last: bool = False) -> torch.Tensor:
    """Inputs as float32 ``(n, features)`` or ``(n, channels, height, width)``; ``uint8 / 255``.

    Raises:
        ValueError: for a dtype that is not a real number, a shape that is neither images nor
            feature vectors, or NaN / infinite values (the message names the first bad sample).
    """
    if x.dtype == np.bool_ or not (
        np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    ):
        hint = "; samples of different shapes, or strings?" if x.dtype == object else ""
        raise ValueError(
            f"{name}: expected real numbers (float or integer), but got dtype {x.dtype}{hint}"
        )
    if x.ndim not in (2, 3, 4) or x.shape[0] == 0 or 0 in x.shape[1:]:
        raise ValueError(
            f"{name}: expected feature vectors (n, features) or images (n, channels, height, "
            f"width) / (n, height, width) with n >= 1, but got shape {x.shape}"
        )
    if channels_last:
        if x.ndim != 4:
            raise ValueError(
                f"{name}: channels_last expects images (n, height, width, channels), but got "
                f"shape {x.shape}"
            )
        x = np.moveaxis(x, -1, 1)
    elif x.ndim == 3:
        x = x[:, None]
    if np.issubdtype(x.dtype, np.floating):
        finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if not finite.all():
            bad = int(np.argmin(finite))
            raise ValueError(
                f"{name}: {int((~finite).sum())} sample(s) hold NaN or infinite values, the first "
                f"is sample {bad}; drop or fill them (e.g. numpy.nan_to_num) first"
            )
    scale = 1 / 255 if x.dtype == np.uint8 else 1.0
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32) * np.float32(scale))


def check_labels(y: np.ndarray, name: str, n: int) -> torch.Tensor:
    """Labels as int64 ``(n,)``; non-negative integers of the right length.

    Raises:
        ValueError: for a non-integer dtype, another shape, or a negative label.
    """
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        hint = " (cast with y.astype(int))" if np.issubdtype(y.dtype, np.floating) else ""
        raise ValueError(
            f"{name}: labels must be integer class indices 0..C-1, but got dtype {y.dtype}{hint}"
        )
    if y.ndim != 1:
        raise ValueError(f"{name}: expected labels of shape (n,), but got shape {y.shape}")
    if len(y) != n:
        raise ValueError(
            f"{name} holds {len(y)} labels but its inputs hold {n} samples; they must match"
        )
    if len(y) and y.min() < 0:
        bad = int(np.argmin(y))
        raise ValueError(
            f"{name}: labels must be class indices 0..C-1, but label {bad} is {y[bad]}"
        )
    return torch.from_numpy(y.astype(np.int64))


class ArrayDataModule(ClassificationDataModule):
    """A classification set from arrays: ``.npz`` / ``.npy`` files, tensors or NumPy arrays.

    Give either ``path`` (a ``.npz`` file with ``x_train``, ``y_train`` and optionally
    ``x_test``, ``y_test``, ``class_names``) or the arrays ``x_train``, ``y_train`` (and
    optionally ``x_test``, ``y_test``), each a ``.npy`` file or, from Python, an array or tensor.
    The arrays are read and checked when the module is made; see the module docs for shapes and
    scaling. The validation split, batch order, augmentation (images only), transfer sets
    and teacher caches work as in the built-in sets.

    Args:
        path: a ``.npz`` file with the arrays (instead of ``x_train`` ...).
        x_train: training inputs ``(n, features)``, ``(n, C, H, W)`` or ``(n, H, W)``.
        y_train: training labels ``(n,)``, integers ``0 .. num_classes - 1``.
        x_test: test inputs (same shape per sample); without them ``test_fraction`` of the
            training arrays is held out as the test set.
        y_test: test labels.
        num_classes: number of classes; default: the largest label + 1 (every class must then
            have training samples).
        class_names: one name per class (for confusion matrices); default ``"0", "1", ...``.
        scale: ``None`` (inputs as given; ``uint8`` divided by 255) or ``"minmax"`` (each
            feature, or each image channel, to ``[0, 1]`` by the training split's range).
        channels_last: read 4-dimensional inputs as ``(n, H, W, C)``.
        test_fraction: share of the training arrays held out (stratified) as the test set when
            no test arrays are given; default 0.2.
        split_seed: seed of that test split.
        batch_size, val_fraction, seed, num_workers, augment, labeled_per_class: see
            :class:`~tnkd.data.base.ClassificationDataModule` (``augment`` needs images).
        extra_unlabeled: more unlabeled inputs for the transfer set: a ``.npy`` file, a torch
            file (``torch.save``), or an array; read, checked and scaled as ``x_train``.

    Raises:
        FileNotFoundError: if a file is missing.
        ValueError: for wrong shapes, dtypes, label ranges, NaN or infinite values, mismatched
            lengths or missing ``.npz`` keys (one line saying what to fix).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        x_train: ArraySource | None = None,
        y_train: ArraySource | None = None,
        x_test: ArraySource | None = None,
        y_test: ArraySource | None = None,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        scale: str | None = None,
        channels_last: bool = False,
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
        super().__init__(
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            num_workers=num_workers,
            augment=augment,
            labeled_per_class=labeled_per_class,
        )
        if scale is not None and scale not in SCALES:
            raise ValueError(f"data scale must be null or 'minmax', but got {scale!r}")
        self.scale, self.channels_last, self.split_seed = scale, bool(channels_last), split_seed
        arrays = self._gather(path, x_train, y_train, x_test, y_test)
        self.path = None if path is None else str(path)
        # the file names, which the run's config records (arrays given in Python are not)
        self.x_train, self.y_train, self.x_test, self.y_test = (
            str(s) if isinstance(s, str | os.PathLike) else None
            for s in (x_train, y_train, x_test, y_test)
        )

        x, y, test_x, test_y = self._checked_splits(arrays, test_fraction)
        self.input_shape = tuple(x.shape[1:])
        self.num_classes = self._count_classes(num_classes, y, test_y)
        self.class_names = self._names(class_names, arrays.get("class_names"))
        if self.augmentation is not None and len(self.input_shape) != 3:
            raise ValueError(
                f"data augment shifts and rotates images, but the inputs are feature vectors of "
                f"shape {self.input_shape}; leave augment out"
            )
        self._extra_source = extra_unlabeled
        if extra_unlabeled is not None:
            self.extra_unlabeled = (
                str(extra_unlabeled) if isinstance(extra_unlabeled, str | os.PathLike) else "array"
            )
        self._range = self._fit_scale(x) if scale == "minmax" else None
        self._arrays = {True: (self._scaled(x), y), False: (self._scaled(test_x), test_y)}
        if scale is None:
            _warn_outside_unit(self._arrays[True][0])

    # ---- reading ------------------------------------------------------------------------------

    @staticmethod
    def _gather(
        path: Any, x_train: Any, y_train: Any, x_test: Any, y_test: Any
    ) -> dict[str, np.ndarray]:
        """The raw arrays, from the ``.npz`` file or from the separate sources."""
        given = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
        if path is not None:
            extra = [k for k, v in given.items() if v is not None]
            if extra:
                raise ValueError(
                    f"give either data path (a .npz file) or the arrays, not both: also got {', '.join(extra)}"
                )
            return read_npz(path)
        if x_train is None or y_train is None:
            raise ValueError(
                "data needs path (a .npz file with x_train, y_train, ...) or both x_train and "
                "y_train (.npy files or arrays)"
            )
        if (x_test is None) != (y_test is None):
            raise ValueError(
                "give both x_test and y_test, or neither (a test split is then held out)"
            )
        return {k: read_array(v, k) for k, v in given.items() if v is not None}

    def _checked_splits(
        self, arrays: dict[str, np.ndarray], test_fraction: float | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, y, x_test, y_test)``, checked; the test split held out when not given."""
        x = check_inputs(arrays["x_train"], "x_train", self.channels_last)
        y = check_labels(arrays["y_train"], "y_train", len(x))
        if "x_test" not in arrays:
            fraction = check_fraction(
                "data test_fraction", 0.2 if test_fraction is None else test_fraction
            )
            if fraction == 0:
                raise ValueError(
                    "data test_fraction must be > 0 without test arrays (x_test, y_test)"
                )
            self.test_fraction = fraction
            return _test_split(x, y, fraction, self.split_seed)
        if test_fraction is not None:
            raise ValueError(
                "data test_fraction holds out a test split when no test arrays are given; "
                "leave it out, since x_test and y_test are given"
            )
        x_test = check_inputs(arrays["x_test"], "x_test", self.channels_last)
        y_test = check_labels(arrays["y_test"], "y_test", len(x_test))
        if x_test.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"x_test samples have shape {tuple(x_test.shape[1:])} but x_train samples "
                f"{tuple(x.shape[1:])}; they must match"
            )
        return x, y, x_test, y_test

    def _count_classes(self, num_classes: int | None, y: torch.Tensor, y_test: torch.Tensor) -> int:
        """The class count given (checked against the labels) or read from the labels."""
        top = int(max(y.max(), y_test.max())) + 1
        if num_classes is None:
            present = torch.bincount(y, minlength=top)
            empty = torch.nonzero(present == 0).squeeze(1).tolist()
            if empty:
                hint = " (labels 1..C? subtract 1)" if empty == [0] else ""
                raise ValueError(
                    f"labels must be 0..C-1 with every class in the training set, but class(es) "
                    f"{empty[:5]} have no training sample{hint}; or give data num_classes"
                )
            if top < 2:
                raise ValueError(
                    "the training labels hold one class only; a classifier needs two or more"
                )
            return top
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"data num_classes must be an integer >= 2, but got {num_classes!r}")
        if top > num_classes:
            raise ValueError(
                f"labels must be in 0..{num_classes - 1} (num_classes {num_classes}), but the "
                f"largest is {top - 1}"
            )
        return num_classes

    def _names(self, given: Sequence[str] | None, stored: np.ndarray | None) -> tuple[str, ...]:
        names = given if given is not None else stored
        if names is None:
            return tuple(str(i) for i in range(self.num_classes))
        names = tuple(str(n) for n in np.asarray(names).reshape(-1).tolist())
        if len(names) != self.num_classes:
            raise ValueError(
                f"class_names holds {len(names)} names but there are {self.num_classes} classes"
            )
        return names

    # ---- scaling ------------------------------------------------------------------------------

    def _fit_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Minimum and range of each feature (image channel) over the training split alone."""
        train_idx, _ = self.validation_split(len(x))
        fit = x[train_idx]
        dims = [0] if fit.ndim == 2 else [0, 2, 3]
        low = fit.amin(dim=dims, keepdim=True)
        span = fit.amax(dim=dims, keepdim=True) - low
        return low[0], torch.where(span > 0, span, torch.ones_like(span))[0]

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` mapped by the fitted min-max scaling (clipped to ``[0, 1]``), or as it is."""
        if self._range is None:
            return x
        low, span = self._range
        return ((x - low) / span).clamp_(0.0, 1.0)

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)`` of the training (with validation) or the test set, scaled."""
        return self._arrays[train]

    def load_extra_unlabeled(self, input_shape: tuple[int, ...]) -> torch.Tensor:
        """The ``extra_unlabeled`` inputs: read, checked and scaled as ``x_train``."""
        source = self._extra_source
        if isinstance(source, str | os.PathLike) and Path(source).suffix in (".pt", ".pth"):
            if not Path(source).is_file():
                raise FileNotFoundError(f"extra_unlabeled file {source} does not exist")
            source = torch.load(source, map_location="cpu", weights_only=True)
        x = check_inputs(
            read_array(source, "extra_unlabeled"), "extra_unlabeled", self.channels_last
        )
        if tuple(x.shape[1:]) != tuple(input_shape):
            raise ValueError(
                f"extra_unlabeled samples have shape {tuple(x.shape[1:])} but x_train samples "
                f"{tuple(input_shape)}; they must match"
            )
        return self._scaled(x)


def _test_split(
    x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stratified, seeded train/test split of the training arrays."""
    from sklearn.model_selection import train_test_split

    try:
        idx_train, idx_test = train_test_split(
            np.arange(len(y)), test_size=fraction, random_state=seed, stratify=y.numpy()
        )
    except ValueError as err:
        raise ValueError(
            f"cannot hold out a stratified test split of {fraction:g} of {len(y)} samples "
            f"({err}); give x_test and y_test, or change test_fraction"
        ) from err
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def _warn_outside_unit(x: torch.Tensor) -> None:
    """Warn once when unscaled inputs leave ``[0, 1]``, the range the feature maps expect."""
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 1:
        warnings.warn(
            f"the inputs span [{low:.3g}, {high:.3g}], but tensor-network feature maps expect "
            "[0, 1]; give data scale='minmax' (or scale them yourself)",
            stacklevel=3,
        )
