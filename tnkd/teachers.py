"""Teacher networks and the teacher file format.

Teachers are ordinary ``nn.Module`` classifiers. The ones here record their constructor
arguments (``init_args``) so that a trained teacher can be saved as a small, self-describing
file (:func:`save_teacher`) and rebuilt later without its config (:func:`load_teacher`). The
file holds only tensors and plain values, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

TEACHER_FORMAT = "tnkd-teacher"
TEACHER_FORMAT_VERSION = 1


class MLP(nn.Sequential):
    """A fully connected classifier: Flatten, then (Linear, ReLU, Dropout) blocks, then Linear.

    Hinton et al. 2015 distil from the 784-1200-1200-10 MLP: ``MLP(784, 10, hidden=(1200, 1200))``.
    Being an ``nn.Sequential`` of ``nn.Linear`` layers, it can be compressed layer by layer into
    TT-layers by TT-SVD.

    Args:
        num_inputs: input features (pixels).
        num_classes: output classes.
        hidden: hidden layer widths.
        dropout: dropout probability after each hidden layer.
    """

    def __init__(
        self,
        num_inputs: int,
        num_classes: int,
        hidden: Sequence[int] = (256, 256),
        dropout: float = 0.0,
    ) -> None:
        if not 0 <= dropout < 1:
            raise ValueError(f"teacher dropout must be in [0, 1), but got {dropout}")
        widths = [num_inputs, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(widths[-1], num_classes))
        super().__init__(*layers)
        self.num_inputs, self.num_classes = num_inputs, num_classes
        self.init_args = {
            "num_inputs": num_inputs,
            "num_classes": num_classes,
            "hidden": list(hidden),
            "dropout": dropout,
        }


class CNN(nn.Module):
    """A small VGG-style convolutional classifier.

    ``num_blocks`` blocks of (conv3x3, BN, ReLU, conv3x3, BN, ReLU, max-pool 2), then a hidden
    fully connected layer with dropout. Two blocks of 32/64 channels reach about 99.4% on MNIST.

    Args:
        input_shape: (channels, height, width) of the images.
        num_classes: output classes.
        channels: output channels of each block.
        hidden: width of the fully connected layer.
        dropout: dropout before the last layer.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"CNN input_shape must be (channels, height, width), but got {tuple(input_shape)}"
            )
        c, h, w = input_shape
        blocks: list[nn.Module] = []
        for out in channels:
            blocks += [
                nn.Conv2d(c, out, 3, padding=1),
                nn.BatchNorm2d(out),
                nn.ReLU(),
                nn.Conv2d(out, out, 3, padding=1),
                nn.BatchNorm2d(out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c, h, w = out, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(
                f"CNN: {len(channels)} pooling blocks are too many for {tuple(input_shape)} images"
            )
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.num_inputs = math.prod(input_shape)
        self.init_args = {
            "input_shape": list(input_shape),
            "num_classes": num_classes,
            "channels": list(channels),
            "hidden": hidden,
            "dropout": dropout,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for ``(batch, *input_shape)`` images (flat ``(batch, C*H*W)`` inputs are reshaped)."""
        if x.ndim == 2:
            x = x.view(x.shape[0], *self.input_shape)
        return self.classifier(self.features(x))


# ---- teacher files ----------------------------------------------------------------------------


def _class_path(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import teacher class {class_path!r}: {err}") from err


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file (hex), used to key caches by the exact teacher weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_save(obj: Any, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file.

    Raises:
        FileExistsError: if ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists; remove it or choose another path (nothing was written)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_teacher(
    net: nn.Module,
    path: str | os.PathLike,
    metrics: dict[str, float] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a trained teacher (architecture, weights, metrics) atomically.

    The network must record its constructor arguments in ``init_args`` (all tnkd teachers do).
    """
    init_args = getattr(net, "init_args", None)
    if init_args is None:
        raise ValueError(
            f"{type(net).__name__} has no `init_args`; record the constructor arguments in "
            "`self.init_args` so the teacher can be rebuilt, or save its state_dict yourself"
        )
    payload = {
        "format": TEACHER_FORMAT,
        "version": TEACHER_FORMAT_VERSION,
        "class_path": _class_path(net),
        "init_args": init_args,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "metrics": dict(metrics or {}),
    }
    return atomic_save(payload, path, overwrite=overwrite)


def read_teacher_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a teacher file; clear errors for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher file {path} does not exist; train it first (e.g. `tnkd fit --config "
            "configs/digits/teacher_cnn.yaml`) or run `tnkd compare`, which trains it on first use"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means a corrupt file
        raise ValueError(
            f"teacher file {path} is corrupt or not a torch file ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != TEACHER_FORMAT:
        raise ValueError(f"{path} is not a tnkd teacher file (expected format {TEACHER_FORMAT!r})")
    return payload


def load_teacher(path: str | os.PathLike, net: nn.Module | None = None) -> nn.Module:
    """Rebuild a teacher from :func:`save_teacher`'s file (into ``net`` if given), in eval mode.

    Raises:
        FileNotFoundError: the file does not exist (the message says how to make it).
        ValueError: the file is corrupt, or its weights do not fit ``net``.
    """
    payload = read_teacher_file(path)
    if net is None:
        net = _import(payload["class_path"])(**payload["init_args"])
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ValueError(
            f"teacher file {path} ({payload['class_path']}, {payload['init_args']}) does not fit the "
            f"given teacher network {type(net).__name__}: {' '.join(first[:3])}"
        ) from err
    return net.eval()
