"""Teacher networks and the teacher file format.

Teachers are ordinary ``nn.Module`` classifiers. The ones here record their constructor
arguments (``init_args``) so that a trained teacher can be saved as a small, self-describing
file (:func:`save_teacher`) and rebuilt later without its config (:func:`load_teacher`). The
file holds only tensors and plain values, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnkd.registry import class_path, import_path

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


class TeacherEnsemble(nn.Module):
    """Several trained teachers as one: the target is their averaged probabilities at temperature T.

    With member logits v_1..v_K the ensemble's distillation target at temperature T is
    ``P_T = (1/K) sum_k softmax(v_k / T)`` (the averaged *softened* outputs; averaging at T = 1
    and softening the average afterwards would give another target, ``(mean_k p_k)^(1/T)``
    renormalised). To fit the divergences, which soften logits by T themselves, the ensemble
    returns the logits ``T log P_T`` (in log-space: ``T (logsumexp_k log_softmax(v_k / T) -
    log K)``), whose ``softmax(. / T)`` is exactly P_T. At ``temperature = 1`` these are the log
    of the averaged probabilities. The temperature is a buffer, so a teacher cache keys the
    logits by it.

    Args:
        members: the trained teachers (same class count); frozen and put in eval mode.
        temperature: T, the distillation temperature the average is taken at.

    Example:
        >>> a, b = MLP(4, 3, hidden=(5,)), MLP(4, 3, hidden=(5,))
        >>> ens = TeacherEnsemble([a, b], temperature=2.0)
        >>> x = torch.rand(6, 4)
        >>> avg = (torch.softmax(a(x) / 2, -1) + torch.softmax(b(x) / 2, -1)) / 2
        >>> bool(torch.allclose(torch.softmax(ens(x) / 2, -1), avg, atol=1e-6))
        True
    """

    def __init__(self, members: Sequence[nn.Module], temperature: float = 1.0) -> None:
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("a teacher ensemble needs at least one teacher, but got none")
        classes = {getattr(m, "num_classes", None) for m in members}
        if len(classes) != 1:
            raise ValueError(
                f"the ensemble's teachers must have the same number of classes, but have {sorted(map(str, classes))}"
            )
        if not (
            isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0
        ):
            raise ValueError(
                f"ensemble temperature must be a finite number > 0, but got {temperature!r}"
            )
        self.members = nn.ModuleList(members)
        self.members.eval().requires_grad_(False)
        self.num_classes = classes.pop()
        inputs = {getattr(m, "num_inputs", None) for m in members}
        if len(inputs) == 1:
            self.num_inputs = inputs.pop()
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``T log((1/K) sum_k softmax(v_k / T))``, float32 or higher."""
        t = self.temperature
        logs = torch.stack(
            [torch.log_softmax(m(x).float() / t, dim=-1) for m in self.members], dim=0
        )
        return t * (torch.logsumexp(logs, dim=0) - math.log(len(self.members)))


# ---- teacher files ----------------------------------------------------------------------------


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
        "class_path": class_path(net),
        "init_args": init_args,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "metrics": dict(metrics or {}),
    }
    return atomic_save(payload, path, overwrite=overwrite)


def read_teacher_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a tnkd teacher file; clear errors for a missing, corrupt or foreign file."""
    payload = _load_weights_only(Path(path))
    if not _is_teacher_file(payload):
        raise ValueError(f"{path} is not a tnkd teacher file (expected format {TEACHER_FORMAT!r})")
    return payload


def _missing_teacher(path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"teacher file {path} does not exist; train it first (e.g. `tnkd fit --config "
        "configs/digits/teacher_cnn.yaml`) or run `tnkd compare`, which trains it on first use"
    )


def _load_weights_only(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with one-line errors; a pickled module is reported as such."""
    if not path.is_file():
        raise _missing_teacher(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure
        if _is_pickled_object(path):
            raise _PickledModule(path) from err
        raise ValueError(
            f"teacher file {path} is corrupt or not a torch file ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})"
        ) from err


class _PickledModule(ValueError):
    def __init__(self, path: Path) -> None:
        super().__init__(
            f"teacher file {path} is a pickled Python object (torch.save(model)); loading it runs "
            "code from the file: if you trust it, allow it with trust_teacher_file "
            "(--model.init_args.trust_teacher_file true), or save the model's state_dict instead"
        )


def _is_pickled_object(path: Path) -> bool:
    """Whether a file that ``weights_only`` refused still loads as a full pickle (not read)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("data.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _is_teacher_file(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == TEACHER_FORMAT


def _is_state_dict(payload: Any) -> bool:
    return (
        isinstance(payload, dict)
        and bool(payload)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items())
    )


def _strip_prefix(state: dict[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """Drop the prefix a LightningModule adds (``net.``, ``model.`` ...) when that makes the keys fit."""
    own = set(net.state_dict())
    if set(state) == own:
        return state
    prefixes = {k.split(".", 1)[0] + "." for k in state if "." in k}
    for prefix in sorted(prefixes):
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if set(stripped) == own:
            return stripped
    return state


def load_teacher(
    path: str | os.PathLike, net: nn.Module | None = None, trust_file: bool = False
) -> nn.Module:
    """Load a trained teacher, in eval mode, from whatever file a user has.

    Accepted files:

    * a **tnkd teacher file** (:func:`save_teacher`, or ``TeacherModule(export_path=...)``): the
      architecture is read from it, so ``net`` is optional;
    * a **state_dict** (``torch.save(model.state_dict(), path)``) or a **Lightning checkpoint**
      of a module holding the network (its ``net.``/``model.`` prefix is dropped): ``net``, the
      architecture, is required (in YAML: ``teacher: {class_path: ..., init_args: ...}``);
    * a **pickled module** (``torch.save(model, path)``): loading it runs code from the file, so
      only with ``trust_file=True``.

    Raises:
        FileNotFoundError: the file does not exist (the message says how to make it).
        ValueError: the file is corrupt, holds weights without an architecture, is a pickle that
            was not trusted, or its weights do not fit ``net``.
    """
    path = Path(path)
    try:
        payload = _load_weights_only(path)
    except _PickledModule:
        if not trust_file:
            raise
        module = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(module, nn.Module):
            raise ValueError(
                f"teacher file {path} holds a pickled {type(module).__name__}, not a torch module"
            ) from None
        if net is not None:
            return _load_state(path, net, module.state_dict(), type(module).__name__)
        return module.eval()
    if _is_teacher_file(payload):
        if net is None:
            net = import_path(payload["class_path"], "teacher class")(**payload["init_args"])
        return _load_state(path, net, payload["state_dict"], payload["class_path"])
    if isinstance(payload, dict) and _is_state_dict(payload.get("state_dict")):
        payload = payload["state_dict"]  # a Lightning checkpoint
    if not _is_state_dict(payload):
        raise ValueError(
            f"{path} is not a tnkd teacher file (expected format {TEACHER_FORMAT!r}), nor a "
            "state_dict, a Lightning checkpoint or a pickled module"
        )
    if net is None:
        raise ValueError(
            f"teacher file {path} holds only weights (a state_dict); give the architecture too "
            "(--model.init_args.teacher {class_path: ..., init_args: ...}, or the `teacher` "
            "argument in Python)"
        )
    return _load_state(path, net, _strip_prefix(payload, net), "state_dict")


def _load_state(
    path: Path, net: nn.Module, state: dict[str, torch.Tensor], source: str
) -> nn.Module:
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ValueError(
            f"teacher file {path} ({source}) does not fit the given teacher network "
            f"{type(net).__name__}: {' '.join(line.strip() for line in first[:3])}"
        ) from err
    return net.eval()
