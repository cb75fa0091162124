"""MNIST and Fashion-MNIST: 70,000 28x28 grey-scale images each, 10 classes.

Both sets ship as four IDX files (see :mod:`tnkd.data.idx`) in the folder layout that
``torchvision.datasets.MNIST(root=...)`` uses, so a folder torchvision has filled works as is::

    ROOT/MNIST/raw/train-images-idx3-ubyte[.gz]         60000 x 28 x 28 uint8
    ROOT/MNIST/raw/train-labels-idx1-ubyte[.gz]         60000 uint8 in 0..9
    ROOT/MNIST/raw/t10k-images-idx3-ubyte[.gz]          10000 x 28 x 28 uint8
    ROOT/MNIST/raw/t10k-labels-idx1-ubyte[.gz]          10000 uint8 in 0..9

(``FashionMNIST/raw/`` for Fashion-MNIST). With ``download=True``, :meth:`prepare_data`
fetches the missing ``.gz`` files and checks each against its published MD5.

Example:
    >>> dm = MNISTDataModule(root="data", download=True, downsample=2)  # doctest: +SKIP
    >>> dm.input_shape  # doctest: +SKIP
    (1, 14, 14)
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from tnkd.data.base import ClassificationDataModule, check_downsample
from tnkd.data.idx import read_idx

log = logging.getLogger(__name__)

IMAGE_SIZE = 28
SPLIT_FILES: dict[bool, tuple[str, str]] = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# MD5 of each published .gz file, as listed in torchvision/datasets/mnist.py
# (``MNIST.resources`` and ``FashionMNIST.resources``, pytorch/vision).
MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
FASHION_MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


def file_md5(path: str | os.PathLike[str]) -> str:
    """Hex MD5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: str | os.PathLike[str], md5: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` if the content has MD5 ``md5``; never overwrite ``dest``.

    The bytes go to a temporary file beside ``dest``, which is checked and then linked into
    place in one atomic step; on any failure it is removed, so ``dest`` is either absent or
    complete. If ``dest`` appears meanwhile (another process), that file is kept.

    Args:
        url: what to fetch (any scheme ``urllib`` opens, ``file://`` included).
        dest: the final path; its folder is created if needed.
        md5: expected hex MD5 of the downloaded bytes.
        timeout: seconds to wait on the connection.

    Returns:
        ``dest``.

    Raises:
        RuntimeError: if the MD5 of the downloaded bytes differs from ``md5``.
        urllib.error.URLError: if the URL cannot be fetched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, 1 << 20)
        got = file_md5(tmp)
        if got != md5:
            raise RuntimeError(
                f"MD5 mismatch for {url}: expected {md5}, but got {got}; the download was "
                f"discarded and {dest} not written. Retry, or fetch the file by other means."
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the data is for everyone
        _place(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _place(tmp: Path, dest: Path) -> None:
    """Give the finished file ``tmp`` the name ``dest``, keeping ``dest`` if it exists."""
    try:
        os.link(tmp, dest)  # atomic, and refuses to replace an existing file
    except FileExistsError:
        log.info("%s appeared during the download; keeping it", dest)
    except OSError:  # a file system without hard links
        if not dest.exists():
            os.rename(tmp, dest)


class _MNISTFormatDataModule(ClassificationDataModule):
    """The shared implementation of the MNIST-format sets; subclasses set the class data.

    Args:
        root: folder that holds ``<folder>/raw/`` with the four IDX files.
        download: fetch missing files in :meth:`prepare_data` (needs a network).
        downsample: integer factor, a divisor of 28: each ``downsample x downsample`` block
            of pixels is averaged (2 turns 28x28 into 14x14, 4 into 7x7).
        batch_size: samples per batch.
        val_fraction: fraction of the 60,000 training images held out for validation.
        seed: seed of the validation split, batch order, augmentation and labeled subset.
        num_workers: ``DataLoader`` workers.
        augment: training-time shifts and rotations, e.g. ``{shift: 2, rotate: 10}`` (see
            :mod:`tnkd.data.augment`).
        labeled_per_class: keep this many labels per class (a transfer set; see
            :class:`~tnkd.data.base.ClassificationDataModule`).
        extra_unlabeled: a torch file of more unlabeled images for the transfer set.

    Raises:
        ValueError: if ``downsample`` is not a positive divisor of 28, or by the base class.
    """

    num_classes = 10
    folder: str = ""
    url: str = ""
    md5: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        root: str | Path = "data",
        download: bool = False,
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
        self.download = download
        self.downsample = downsample
        side = IMAGE_SIZE // downsample
        self.input_shape = (1, side, side)
        self._cache: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def raw_folder(self) -> Path:
        """``root/<folder>/raw``, where the IDX files live."""
        return self.root / self.folder / "raw"

    def _find(self, name: str) -> Path | None:
        """The uncompressed file if present, else the ``.gz`` one, else ``None``."""
        for path in (self.raw_folder / name, self.raw_folder / f"{name}.gz"):
            if path.is_file():
                return path
        return None

    def prepare_data(self) -> None:
        """Download the missing files when ``download=True``; otherwise do nothing."""
        if not self.download:
            return
        for names in SPLIT_FILES.values():
            for name in names:
                if self._find(name) is None:
                    url = self.url + f"{name}.gz"
                    log.info("Downloading %s to %s", url, self.raw_folder)
                    download_file(url, self.raw_folder / f"{name}.gz", self.md5[f"{name}.gz"])

    def _missing_files_error(self) -> FileNotFoundError:
        missing = [
            name for names in SPLIT_FILES.values() for name in names if self._find(name) is None
        ]
        expected = ", ".join(f"{(self.raw_folder / name).resolve()}.gz" for name in missing)
        hint = (
            "download=True was given, but prepare_data() has not run yet (the Trainer runs it; "
            "call dm.prepare_data() before dm.setup() when using the module by hand)"
            if self.download
            else "pass download=True (--data.download true) on a machine with internet access, "
            f"or point root (--data.root) at a folder that holds {self.folder}/raw/*.gz"
        )
        return FileNotFoundError(
            f"{type(self).__name__}: {len(missing)} of the 4 {self.folder} files not found "
            f"(.gz or uncompressed): expected {expected}; {hint}"
        )

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Read, check and scale one split; cached on the instance.

        Args:
            train: the 60,000 training images if true, else the 10,000 test images.

        Returns:
            ``(images, labels)``: float32 in ``[0, 1]`` of shape ``(n, *input_shape)``, int64.

        Raises:
            FileNotFoundError: if any of the four files is missing (lists them and the fixes).
            ValueError: if a file is corrupt or holds the wrong shape, dtype or labels.
        """
        if train not in self._cache:
            paths = [self._find(name) for name in SPLIT_FILES[train]]
            if None in paths:
                raise self._missing_files_error()
            images_path, labels_path = paths
            images, labels = read_idx(images_path), read_idx(labels_path)
            _check_split(images_path, images, labels_path, labels, self.num_classes)
            x = torch.from_numpy(images).unsqueeze(1).to(torch.float32).div_(255.0)
            if self.downsample > 1:
                x = F.avg_pool2d(x, self.downsample)
            self._cache[train] = (x, torch.from_numpy(labels.astype(np.int64)))
        return self._cache[train]


def _check_split(
    images_path: Path, images: np.ndarray, labels_path: Path, labels: np.ndarray, num_classes: int
) -> None:
    """Raise a ValueError naming the file unless images and labels look like an MNIST split."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"{images_path}: expected uint8 images of shape (n, {IMAGE_SIZE}, {IMAGE_SIZE}), "
            f"but got {images.dtype} of shape {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(
            f"{labels_path}: expected uint8 labels of shape (n,), "
            f"but got {labels.dtype} of shape {labels.shape}"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if len(labels) and labels.max() >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise ValueError(
            f"{labels_path}: labels must be in 0..{num_classes - 1}, "
            f"but label number {bad} is {labels[bad]}"
        )


class MNISTDataModule(_MNISTFormatDataModule):
    """MNIST handwritten digits (LeCun, Cortes & Burges): 60,000 train, 10,000 test images.

    Pixels are scaled to ``[0, 1]``; the mean pixel is 0.1307 (train). Downloads come from
    the ``ossci-datasets`` S3 mirror that torchvision uses.

    Args:
        root: folder that holds ``MNIST/raw/`` with the four IDX files.
        download: fetch missing files in :meth:`prepare_data` (needs a network).
        downsample: integer factor, a divisor of 28: each ``downsample x downsample`` block
            of pixels is averaged (2 turns 28x28 into 14x14, 4 into 7x7).
        batch_size: samples per batch.
        val_fraction: fraction of the 60,000 training images held out for validation.
        seed: seed of the validation split, batch order, augmentation and labeled subset.
        num_workers: ``DataLoader`` workers.
        augment: training-time shifts and rotations, e.g. ``{shift: 2, rotate: 10}`` (see
            :mod:`tnkd.data.augment`).
        labeled_per_class: keep this many labels per class (a transfer set; see
            :class:`~tnkd.data.base.ClassificationDataModule`).
        extra_unlabeled: a torch file of more unlabeled images for the transfer set.
    """

    class_names = tuple(str(i) for i in range(10))
    folder = "MNIST"
    url = "https://ossci-datasets.s3.amazonaws.com/mnist/"
    md5 = MNIST_MD5


class FashionMNISTDataModule(_MNISTFormatDataModule):
    """Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): Zalando product images, MNIST's format.

    Pixels are scaled to ``[0, 1]``; the mean pixel is 0.2861 (train). Downloads come from
    Zalando Research's S3 bucket (the address torchvision uses; plain HTTP, checked by MD5).

    Its arguments are :class:`MNISTDataModule`'s (the same sizes and splits); ``root`` holds
    ``FashionMNIST/raw/`` with the four IDX files.
    """

    class_names = (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    )
    folder = "FashionMNIST"
    url = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    md5 = FASHION_MNIST_MD5
