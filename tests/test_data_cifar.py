import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from tnkd.data.cifar import CIFAR10DataModule

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
PER_BATCH = 4


def make_batches(folder, protocol=2, seed=0):
    """Six tiny batches in the CIFAR-10 python format; returns {name: (data, labels)}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for k, name in enumerate(BATCHES):
        data = rng.integers(0, 256, size=(PER_BATCH, 3072), dtype=np.uint8)
        labels = [(k + i) % 10 for i in range(PER_BATCH)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(PER_BATCH)],
        }
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        batches[name] = (data, labels)
    return batches


def expected_rgb(batches, train):
    names = BATCHES[:5] if train else BATCHES[5:]
    data = np.concatenate([batches[name][0] for name in names])
    labels = [label for name in names for label in batches[name][1]]
    # Independent of the module: channel c, row r, column w sits at c * 1024 + r * 32 + w.
    images = np.empty((len(data), 3, 32, 32))
    for c in range(3):
        for r in range(32):
            images[:, c, r, :] = data[:, c * 1024 + r * 32 : c * 1024 + r * 32 + 32]
    return images / 255.0, labels


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_unpacked_folder(tmp_path, protocol):
    batches = make_batches(tmp_path / "cifar-10-batches-py", protocol=protocol)
    dm = CIFAR10DataModule(root=tmp_path)
    assert dm.input_shape == (3, 32, 32) and dm.num_features == 3072
    assert dm.class_names[0] == "airplane" and len(dm.class_names) == dm.num_classes == 10
    for train in (True, False):
        x, y = dm.load_split(train)
        images, labels = expected_rgb(batches, train)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (len(labels), 3, 32, 32)
        np.testing.assert_allclose(x.numpy(), images, atol=1e-6)
        assert y.tolist() == labels


def test_tarball(tmp_path):
    batches = make_batches(tmp_path / "staging" / "cifar-10-batches-py")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "staging" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    x, y = CIFAR10DataModule(root=tmp_path).load_split(False)
    images, labels = expected_rgb(batches, train=False)
    np.testing.assert_allclose(x.numpy(), images, atol=1e-6)
    assert y.tolist() == labels
    assert not (tmp_path / "cifar-10-batches-py").exists()  # read in place, not unpacked


def test_grayscale_and_downsample(tmp_path):
    batches = make_batches(tmp_path / "cifar-10-batches-py")
    dm = CIFAR10DataModule(root=tmp_path, grayscale=True, downsample=2)
    assert dm.input_shape == (1, 16, 16)
    x, _ = dm.load_split(True)
    assert x.shape == (20, 1, 16, 16)
    rgb, _ = expected_rgb(batches, train=True)
    gray = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    reference = gray.reshape(20, 16, 2, 16, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(x[:, 0].numpy(), reference, atol=1e-5)
    assert CIFAR10DataModule(root=tmp_path, downsample=4).load_split(False)[0].shape == (4, 3, 8, 8)


@pytest.mark.parametrize("factor", [0, 3, 1.0])
def test_downsample_must_divide_32(factor):
    with pytest.raises(ValueError, match="divisor of 32"):
        CIFAR10DataModule(downsample=factor)


def test_setup_and_loader(tmp_path):
    make_batches(tmp_path / "cifar-10-batches-py")
    dm = CIFAR10DataModule(root=tmp_path, batch_size=8, val_fraction=0.2)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.int64
    assert len(dm.dataset("train")) == 16 and len(dm.dataset("val")) == 4


def test_missing_data_message(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        CIFAR10DataModule(root=tmp_path).load_split(True)
    message = str(info.value)
    for name in BATCHES:
        assert str((tmp_path / "cifar-10-batches-py" / name).resolve()) in message
    assert str((tmp_path / "cifar-10-python.tar.gz").resolve()) in message
    assert "--data.root" in message and "cs.toronto.edu" in message


def test_refuses_unsafe_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_batches(folder)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    with (folder / "data_batch_3").open("wb") as f:
        pickle.dump({b"data": Payload(), b"labels": []}, f)
    with pytest.raises(ValueError, match=r"data_batch_3: not a CIFAR-10 batch.*refusing.*system"):
        CIFAR10DataModule(root=tmp_path).load_split(True)


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"labels must be in 0\.\.9"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "expected 2 integer labels"),
        ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, r"shape \(n, 3072\)"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
        ({b"labels": [0, 1]}, "keys"),
    ],
)
def test_bad_batch(tmp_path, batch, match):
    folder = tmp_path / "cifar-10-batches-py"
    make_batches(folder)
    with (folder / "test_batch").open("wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(ValueError, match=match) as info:
        CIFAR10DataModule(root=tmp_path).load_split(False)
    assert "test_batch" in str(info.value)


def test_truncated_tarball(tmp_path):
    make_batches(tmp_path / "staging" / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "staging" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    archive.write_bytes(archive.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"cifar-10-python\.tar\.gz: not a readable tar archive"):
        CIFAR10DataModule(root=tmp_path).load_split(True)
