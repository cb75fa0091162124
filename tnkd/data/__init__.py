"""Data modules: each yields ``(images in [0, 1], int64 labels)`` batches."""

from tnkd.data.base import ClassificationDataModule
from tnkd.data.cifar import CIFAR10DataModule
from tnkd.data.digits import DigitsDataModule
from tnkd.data.idx import read_idx, read_idx_tensor, write_idx
from tnkd.data.mnist import FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "ClassificationDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "MNISTDataModule",
    "read_idx",
    "read_idx_tensor",
    "write_idx",
]
