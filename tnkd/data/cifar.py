"""CIFAR-10 from the files you bring: 60,000 32x32 colour images, 10 classes.

Nothing is downloaded. The module reads the "python version" of the set
(https://www.cs.toronto.edu/~kriz/cifar.html, Krizhevsky 2009), either unpacked::

    ROOT/cifar-10-batches-py/data_batch_1 ... data_batch_5    10,000 training images each
    ROOT/cifar-10-batches-py/test_batch                       10,000 test images

or still packed as ``ROOT/cifar-10-python.tar.gz``. Each batch is a pickled dict with
``b"data"``, a ``(n, 3072)`` uint8 array (1024 red, then 1024 green, then 1024 blue values,
rows of 32 pixels) and ``b"labels"``, a list of ``n`` class indices.

Pickles can run code when loaded, so the batches are read with an unpickler that only
rebuilds numpy arrays, lists and bytes, and refuses anything else.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from tnkd.data.base import ClassificationDataModule, check_downsample

IMAGE_SIZE = 32
FOLDER = "cifar-10-batches-py"
TARBALL = "cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"

# ITU-R BT.601 luma weights, what PIL's ``convert("L")`` uses.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# The globals a CIFAR batch pickle needs (numpy arrays, and bytes pickled by Python 3 at
# protocol < 3), under the module names of numpy 1 and numpy 2.
_SAFE_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    *(
        (f"numpy.{core}.multiarray", name)
        for core in ("core", "_core")
        for name in ("_reconstruct", "scalar")
    ),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
}


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds what CIFAR batches hold (see ``_SAFE_GLOBALS``)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")
        return super().find_class(module, name)


def _load_batch(f: BinaryIO, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Unpickle and check one batch; ``where`` names it in error messages."""
    try:
        batch = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"{where}: not a CIFAR-10 batch ({err})") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f'{where}: expected a dict with keys b"data" and b"labels"')
    data = batch[b"data"]
    labels = np.asarray(batch[b"labels"])
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * IMAGE_SIZE**2
    ):
        shape = getattr(data, "shape", None)
        raise ValueError(
            f"{where}: expected data of uint8 with shape (n, 3072), "
            f"but got {type(data).__name__} of shape {shape}"
        )
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{where}: expected {len(data)} integer labels, "
            f"but got shape {labels.shape} of {labels.dtype}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= 10):
        raise ValueError(
            f"{where}: labels must be in 0..9, but got values from {labels.min()} to {labels.max()}"
        )
    return data, labels


class CIFAR10DataModule(ClassificationDataModule):
    """CIFAR-10 (Krizhevsky 2009): 50,000 train and 10,000 test 32x32 RGB images.

    For users who have the data; it is never downloaded. Pixels are scaled to ``[0, 1]``.

    Args:
        root: folder holding ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``.
        grayscale: convert to one channel with the ITU-R BT.601 luma weights
            (0.299 R + 0.587 G + 0.114 B); ``input_shape`` is then ``(1, 32, 32)``.
        downsample: integer factor, a divisor of 32: each ``downsample x downsample`` block
            of pixels is averaged (2 turns 32x32 into 16x16).
        batch_size: samples per batch.
        val_fraction: fraction of the 50,000 training images held out for validation.
        seed: seed of the validation split, batch order, augmentation and labeled subset.
        num_workers: ``DataLoader`` workers.
        augment, labeled_per_class, extra_unlabeled: augmentation and transfer sets, see
            :class:`~tnkd.data.base.ClassificationDataModule`.

    Raises:
        ValueError: if ``downsample`` is not a positive divisor of 32, or by the base class.
    """

    num_classes = 10
    class_names = (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    )

    def __init__(
        self,
        root: str | Path = "data",
        grayscale: bool = False,
        downsample: int = 1,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        seed: int = 0,
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
        check_downsample(downsample, IMAGE_SIZE)
        self.root = Path(root)
        self.grayscale = grayscale
        self.downsample = downsample
        side = IMAGE_SIZE // downsample
        self.input_shape = (1 if grayscale else 3, side, side)
        self._cache: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}

    def _read_batches(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """All six batches by name, from the unpacked folder or else from the tarball."""
        names = (*TRAIN_BATCHES, TEST_BATCH)
        folder, tarball = self.root / FOLDER, self.root / TARBALL
        if all((folder / name).is_file() for name in names):
            batches = {}
            for name in names:
                with (folder / name).open("rb") as f:
                    batches[name] = _load_batch(f, str(folder / name))
            return batches
        if tarball.is_file():
            return _read_tarball(tarball, names)
        missing = "\n".join(
            f"  {(folder / name).resolve()}" for name in names if not (folder / name).is_file()
        )
        raise FileNotFoundError(
            f"CIFAR10DataModule: CIFAR-10 not found under {self.root.resolve()}. Expected "
            f"either the unpacked batches, of which these are missing:\n{missing}\nor the archive "
            f"{tarball.resolve()}.\nGet cifar-10-python.tar.gz (the python version) from "
            "https://www.cs.toronto.edu/~kriz/cifar.html and put it, packed or unpacked, in root "
            "(--data.root)."
        )

    def _to_tensors(
        self, data: np.ndarray, labels: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = (
            torch.from_numpy(data)
            .reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
            .to(torch.float32)
            .div_(255.0)
        )
        if self.grayscale:
            x = torch.einsum("nchw,c->nhw", x, torch.tensor(LUMA_WEIGHTS)).unsqueeze(1)
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)
        return x, torch.from_numpy(labels.astype(np.int64))

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Read, check and scale one split (both are read and cached on the first call).

        Args:
            train: the 50,000 training images if true, else the 10,000 test images.

        Returns:
            ``(images, labels)``: float32 in ``[0, 1]`` of shape ``(n, *input_shape)``, int64.

        Raises:
            FileNotFoundError: if neither the batch folder nor the tarball is under ``root``.
            ValueError: if a batch is not a valid CIFAR-10 batch.
        """
        if not self._cache:
            batches = self._read_batches()
            train_parts = [batches[name] for name in TRAIN_BATCHES]
            self._cache[True] = self._to_tensors(
                np.concatenate([d for d, _ in train_parts]),
                np.concatenate([y for _, y in train_parts]),
            )
            self._cache[False] = self._to_tensors(*batches[TEST_BATCH])
        return self._cache[train]


def _read_tarball(
    tarball: Path, names: tuple[str, ...]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read the named batches from ``cifar-10-python.tar.gz`` in one pass, without unpacking it."""
    contents: dict[str, bytes] = {}
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                if member.isfile() and path.parent.name == FOLDER and path.name in names:
                    with tar.extractfile(member) as f:
                        contents[path.name] = f.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ValueError(f"{tarball}: not a readable tar archive ({err})") from err
    missing = [name for name in names if name not in contents]
    if missing:
        raise ValueError(
            f"{tarball}: the archive lacks {', '.join(f'{FOLDER}/{n}' for n in missing)}"
        )
    return {
        name: _load_batch(io.BytesIO(data), f"{tarball}:{FOLDER}/{name}")
        for name, data in contents.items()
    }
