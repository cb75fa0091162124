"""The bad-input matrix (README, "Bad input"): one row per mistake a user can make.

Each row must fail with the stated exception and a one-line message naming the setting and what
is accepted; rows that involve files also check that the files were left as they were.
"""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from tnkd.cli import check_checkpoint_file
from tnkd.data import DigitsDataModule, MNISTDataModule
from tnkd.data.idx import write_idx
from tnkd.divergences import build_divergence, kl_divergence
from tnkd.students import MPSClassifier, TTLinear, TTNetwork
from tnkd.teachers import MLP
from tnkd.training.modules import DistillationModule
from tnkd.training.teacher_cache import cached_teacher_logits

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _student(**kw):
    return MPSClassifier(64, 10, bond_dim=2, **kw)


def _module(**kw):
    return DistillationModule(_student(), teacher=MLP(64, 10, hidden=[8]), **kw)


def _mnist_root(tmp_path: Path) -> Path:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in MNIST_FILES:
        n = 6
        array = (
            rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
            if "images" in name
            else (np.arange(n) % 10).astype(np.uint8)
        )
        write_idx(raw / f"{name}.gz", array)
    return tmp_path


def _fit_setup(model, data):
    """Run Lightning's setup (where data and model are checked against each other)."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    model.trainer = trainer
    trainer.datamodule = data
    data.trainer = trainer
    data.setup("fit")
    model.setup("fit")


SNAPSHOT: dict[Path, bytes] = {}  # files a row must leave as they were, read before it fails


def _keep(*paths: Path) -> None:
    SNAPSHOT.update({p: p.read_bytes() for p in paths})


# (id, action(tmp_path) -> files to check unchanged, exception, regex naming setting + remedy)
ROWS = [
    (
        "divergence-name",
        lambda t: build_divergence("kullback"),
        ValueError,
        r"unknown divergence 'kullback'; expected one of",
    ),
    (
        "renyi-alpha-negative",
        lambda t: build_divergence({"name": "renyi", "alpha": -0.5}),
        ValueError,
        r"alpha must be >= 0",
    ),
    (
        "renyi-alpha-nan",
        lambda t: build_divergence({"name": "renyi", "alpha": float("nan")}),
        ValueError,
        r"alpha",
    ),
    (
        "temperature-zero",
        lambda t: _module(temperature=0.0),
        ValueError,
        r"temperature must be a finite number > 0",
    ),
    (
        "temperature-negative",
        lambda t: _module(temperature=-2.0),
        ValueError,
        r"temperature must be a finite number > 0",
    ),
    (
        "temperature-functional",
        lambda t: kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0),
        ValueError,
        r"temperature",
    ),
    ("beta-above-1", lambda t: _module(beta=1.5), ValueError, r"beta must be in \[0, 1\]"),
    ("beta-negative", lambda t: _module(beta=-0.1), ValueError, r"beta must be in \[0, 1\]"),
    (
        "bond-dim-zero",
        lambda t: MPSClassifier(64, 10, bond_dim=0),
        ValueError,
        r"bond_dim must be a positive integer",
    ),
    (
        "bond-dim-negative",
        lambda t: MPSClassifier(64, 10, bond_dim=-3),
        ValueError,
        r"bond_dim must be a positive integer",
    ),
    (
        "bond-dim-non-integer",
        lambda t: MPSClassifier(64, 10, bond_dim=2.5),
        ValueError,
        r"bond_dim must be a positive integer",
    ),
    (
        "tt-network-rank-zero",
        lambda t: TTNetwork(input_shape=(1, 8, 8), patch_size=4, num_classes=10, rank=0),
        ValueError,
        r"rank",
    ),
    (
        "tt-factors-product",
        lambda t: TTLinear(4096, 16, in_factors=(8, 8, 8, 4), out_factors=(2, 2, 2, 2)),
        ValueError,
        r"in_factors \(8, 8, 8, 4\) multiply to 2048 but the size is 4096; choose",
    ),
    (
        "tt-factors-length",
        lambda t: TTLinear(4096, 16, in_factors=(64, 64), out_factors=(2, 2, 2, 2)),
        ValueError,
        r"factors",
    ),
    (
        "class-count-mismatch",
        lambda t: DistillationModule(_student(), teacher=MLP(64, 5)),
        ValueError,
        r"teacher has 5 classes but the student has 10",
    ),
    (
        "student-vs-data-classes",
        lambda t: _fit_setup(
            DistillationModule(MPSClassifier(64, 7, bond_dim=2), beta=0.0), DigitsDataModule()
        ),
        ValueError,
        r"student has 7 classes but the data .* has 10; set the student's num_classes to 10",
    ),
    (
        "input-length-mismatch",
        lambda t: _fit_setup(
            DistillationModule(MPSClassifier(81, 10, bond_dim=2), beta=0.0), DigitsDataModule()
        ),
        ValueError,
        r"student expects 81 inputs per sample but the data .* has 64",
    ),
    (
        "nan-logits",
        lambda t: kl_divergence(torch.full((2, 3), float("nan")), torch.zeros(2, 3)),
        ValueError,
        r"finite",
    ),
    ("nan-in-data", lambda t: _nan_data(), ValueError, r"1 NaN or infinite pixel values"),
    ("empty-data", lambda t: _empty_data(), ValueError, r"the train set is empty"),
    (
        "missing-data-files",
        lambda t: MNISTDataModule(root=t / "nowhere").setup(),
        FileNotFoundError,
        r"train-images-idx3-ubyte",
    ),
    ("corrupt-data-file", lambda t: _corrupt_data(t), ValueError, r"train-images-idx3-ubyte\.gz"),
    (
        "corrupt-checkpoint",
        lambda t: _corrupt_checkpoint(t),
        ValueError,
        r"is corrupt or not a checkpoint .* left as it is",
    ),
    (
        "missing-checkpoint",
        lambda t: check_checkpoint_file(t / "nope.ckpt"),
        FileNotFoundError,
        r"does not exist; pass an existing \.ckpt",
    ),
    (
        "checkpoint-of-another-shape",
        lambda t: _other_shape(t),
        ValueError,
        r"another model shape: student\.cores is \(64, 4, 2, 4\) there but \(64, 2, 2, 2\) here",
    ),
    ("corrupt-teacher-cache", lambda t: _corrupt_cache(t), ValueError, r"cache"),
]


def _nan_data():
    class NaNDigits(DigitsDataModule):
        def load_split(self, train):
            x, y = super().load_split(train)
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
            return x, y

    NaNDigits().setup()


def _empty_data():
    class EmptyDigits(DigitsDataModule):
        def load_split(self, train):
            x, y = super().load_split(train)
            return x[:0], y[:0]

    EmptyDigits().setup()


def _corrupt_data(t):
    root = _mnist_root(t)
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    _keep(*path.parent.iterdir())
    MNISTDataModule(root=root).setup()


def _corrupt_checkpoint(t):
    path = t / "run.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(100)}}, path)
    path.write_bytes(path.read_bytes()[:300])  # truncated, as by a kill during a plain write
    _keep(path)
    check_checkpoint_file(path)


def _other_shape(t):
    saved = DistillationModule(MPSClassifier(64, 10, bond_dim=4), beta=0.0)
    path = t / "other.ckpt"
    torch.save({"state_dict": saved.state_dict()}, path)
    _keep(path)
    module = DistillationModule(_student(), beta=0.0)
    module.on_load_checkpoint(torch.load(path, weights_only=False))


def _corrupt_cache(t):
    teacher = MLP(64, 10, hidden=[8])
    inputs = torch.rand(5, 64)
    cached_teacher_logits(teacher, inputs, t)
    (path,) = [p for p in Path(t).rglob("*") if p.is_file()]
    path.write_bytes(b"not a tensor file")
    _keep(path)
    cached_teacher_logits(teacher, inputs, t)


@pytest.mark.parametrize(
    ("action", "error", "pattern"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_bad_input_row(tmp_path, action, error, pattern):
    SNAPSHOT.clear()
    with pytest.raises(error, match=pattern) as info:
        action(tmp_path)
    message = str(info.value)
    assert "\n" not in message.strip(), message  # one line
    for path, data in SNAPSHOT.items():  # nothing on disk lost or rewritten
        assert path.exists() and path.read_bytes() == data, path
