"""Data modules: each yields ``(inputs, int64 labels)`` batches, inputs in ``[0, 1]``."""

from tnkd.data.arrays import ArrayDataModule
from tnkd.data.base import ClassificationDataModule
from tnkd.data.cifar import CIFAR10DataModule
from tnkd.data.digits import DigitsDataModule
from tnkd.data.huggingface import HuggingFaceDataModule
from tnkd.data.idx import read_idx, read_idx_tensor, write_idx
from tnkd.data.mnist import FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "ArrayDataModule",
    "CIFAR10DataModule",
    "ClassificationDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "HuggingFaceDataModule",
    "MNISTDataModule",
    "read_idx",
    "read_idx_tensor",
    "write_idx",
]
