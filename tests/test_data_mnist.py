import os
from pathlib import Path

import numpy as np
import pytest
import torch

import tnkd.data.mnist as mnist
from tnkd.data.idx import write_idx
from tnkd.data.mnist import FashionMNISTDataModule, MNISTDataModule, download_file, file_md5

FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_FILES = [name for names in FILES.values() for name in names]


def make_raw(folder, n_train=12, n_test=6, compress=True, seed=0):
    """Tiny synthetic IDX files in the torchvision layout; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for train, n in ((True, n_train), (False, n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for name, array in zip(FILES[train], (images, labels), strict=True):
            write_idx(folder / (name + ".gz" if compress else name), array)
        arrays[train] = (images, labels)
    return arrays


@pytest.fixture
def root(tmp_path):
    make_raw(tmp_path / "MNIST" / "raw")
    return tmp_path


@pytest.mark.parametrize("compress", [True, False])
def test_load_scales_and_shapes(tmp_path, compress):
    arrays = make_raw(tmp_path / "MNIST" / "raw", compress=compress)
    dm = MNISTDataModule(root=tmp_path)
    assert dm.input_shape == (1, 28, 28) and dm.num_features == 784 and dm.num_classes == 10
    for train in (True, False):
        x, y = dm.load_split(train)
        images, labels = arrays[train]
        assert x.dtype == torch.float32 and x.shape == (len(images), 1, 28, 28)
        assert y.dtype == torch.int64
        torch.testing.assert_close(x[:, 0], torch.from_numpy(images / 255.0).float())
        assert y.tolist() == labels.tolist()
        assert 0.0 <= x.min() and x.max() <= 1.0
    assert dm.load_split(True)[0] is dm.load_split(True)[0]  # cached


def test_uncompressed_preferred_when_both_exist(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    make_raw(raw, compress=True, seed=0)
    arrays = make_raw(raw, compress=False, seed=1)
    x, _ = MNISTDataModule(root=tmp_path).load_split(False)
    torch.testing.assert_close(x[:, 0], torch.from_numpy(arrays[False][0] / 255.0).float())


def test_downsample_is_block_average(tmp_path):
    images = make_raw(tmp_path / "MNIST" / "raw")[True][0]
    dm = MNISTDataModule(root=tmp_path, downsample=2)
    assert dm.input_shape == (1, 14, 14) and dm.num_features == 196
    x, _ = dm.load_split(True)
    assert x.shape == (12, 1, 14, 14)
    # By hand: the top-left output pixel averages the 2x2 block at rows 0-1, columns 0-1.
    block = images[3, 0:2, 0:2].astype(np.float64)
    assert x[3, 0, 0, 0].item() == pytest.approx(block.mean() / 255, abs=1e-6)
    block = images[5, 26:28, 2:4].astype(np.float64)
    assert x[5, 0, 13, 1].item() == pytest.approx(block.mean() / 255, abs=1e-6)
    reference = images.reshape(12, 14, 2, 14, 2).mean(axis=(2, 4)) / 255
    np.testing.assert_allclose(x[:, 0].numpy(), reference, atol=1e-6)
    assert MNISTDataModule(root=tmp_path, downsample=4).load_split(False)[0].shape == (6, 1, 7, 7)


@pytest.mark.parametrize("factor", [0, 3, 5, -2, 2.0, True])
def test_downsample_must_divide_28(factor):
    with pytest.raises(ValueError, match="divisor of 28"):
        MNISTDataModule(downsample=factor)


def test_label_out_of_range(root):
    labels = np.zeros(12, np.uint8)
    labels[7] = 10
    write_idx(root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz", labels)
    with pytest.raises(
        ValueError, match=r"train-labels-idx1-ubyte\.gz: labels must be in 0\.\.9.*is 10"
    ):
        MNISTDataModule(root=root).load_split(True)


def test_count_mismatch(root):
    write_idx(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match=r"holds 6 images but .* holds 5 labels"):
        MNISTDataModule(root=root).load_split(False)


def test_wrong_image_shape(root):
    write_idx(root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz", np.zeros((6, 27, 27), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(n, 28, 28\).*\(6, 27, 27\)"):
        MNISTDataModule(root=root).load_split(False)


def test_wrong_label_dtype(root):
    write_idx(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz", np.zeros(6, np.int32))
    with pytest.raises(ValueError, match="expected uint8 labels"):
        MNISTDataModule(root=root).load_split(False)


def test_corrupt_file_named(root):
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz"):
        MNISTDataModule(root=root).load_split(True)


def test_missing_files_message(tmp_path):
    dm = MNISTDataModule(root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    message = str(info.value)
    for name in ALL_FILES:
        assert f"{(tmp_path / 'nowhere' / 'MNIST' / 'raw' / name).resolve()}.gz" in message
    for fix in ("download=True", "--data.download true", "--data.root", "MNIST/raw/*.gz"):
        assert fix in message


def test_missing_one_file_lists_only_it(root):
    (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    dm = MNISTDataModule(root=root)
    dm.load_split(True)  # the training files are all there
    with pytest.raises(FileNotFoundError, match="1 of the 4") as info:
        dm.load_split(False)
    assert "t10k-labels-idx1-ubyte.gz" in str(info.value)
    assert "train-images" not in str(info.value)


def test_missing_with_download_but_no_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prepare_data\(\) has not run"):
        MNISTDataModule(root=tmp_path, download=True).load_split(True)


def test_setup_and_loaders(root):
    dm = MNISTDataModule(root=root, batch_size=4, val_fraction=0.25, downsample=2)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 14, 14) and y.dtype == torch.int64
    assert len(dm.dataset("train")) == 9 and len(dm.dataset("val")) == 3
    assert len(dm.dataset("test")) == 6


def test_fashion_names_and_folder(tmp_path):
    make_raw(tmp_path / "FashionMNIST" / "raw")
    dm = FashionMNISTDataModule(root=tmp_path)
    assert dm.class_names[0] == "T-shirt/top" and dm.class_names[9] == "Ankle boot"
    assert len(dm.class_names) == 10 and dm.raw_folder == tmp_path / "FashionMNIST" / "raw"
    assert dm.load_split(True)[0].shape == (12, 1, 28, 28)
    with pytest.raises(FileNotFoundError, match=r"FashionMNIST/raw/\*\.gz"):
        FashionMNISTDataModule(root=tmp_path / "empty").load_split(True)


def test_md5_tables_are_complete():
    for table in (mnist.MNIST_MD5, mnist.FASHION_MNIST_MD5):
        assert set(table) == {f"{name}.gz" for name in ALL_FILES}
        assert all(len(md5) == 32 and int(md5, 16) >= 0 for md5 in table.values())
    # The Fashion-MNIST label files are published byte for byte: same MD5 as our copies'.
    assert (
        mnist.FASHION_MNIST_MD5["train-labels-idx1-ubyte.gz"] == "25c81989df183df01b3e8a0aad5dffbe"
    )


# Downloads: a local "server" folder reached through file:// URLs; no network is touched.


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serve synthetic .gz files under file://; the MD5 table is patched to theirs."""
    folder = tmp_path / "server"
    make_raw(folder)
    monkeypatch.setattr(MNISTDataModule, "url", folder.as_uri() + "/")
    table = {f"{name}.gz": file_md5(folder / f"{name}.gz") for name in ALL_FILES}
    monkeypatch.setattr(MNISTDataModule, "md5", table)
    return folder


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def test_download_fetches_and_verifies(tmp_path, server):
    dm = MNISTDataModule(root=tmp_path / "data", download=True, batch_size=4)
    dm.prepare_data()
    raw = tmp_path / "data" / "MNIST" / "raw"
    for name in ALL_FILES:
        assert (raw / f"{name}.gz").read_bytes() == (server / f"{name}.gz").read_bytes()
    assert _leftovers(raw) == []
    assert (raw / "train-images-idx3-ubyte.gz").stat().st_mode & 0o777 == 0o644
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 28, 28)


def test_download_keeps_existing_files(tmp_path, server, monkeypatch):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    existing = raw / "train-images-idx3-ubyte"  # uncompressed: counts as present
    existing.write_bytes(b"mine")
    fetched = []

    def recording_download(url, *args, **kwargs):
        fetched.append(url)
        return download_file(url, *args, **kwargs)

    monkeypatch.setattr(mnist, "download_file", recording_download)
    MNISTDataModule(root=tmp_path / "data", download=True).prepare_data()
    assert existing.read_bytes() == b"mine"
    assert not (raw / "train-images-idx3-ubyte.gz").exists()
    assert sorted(Path(url).name for url in fetched) == sorted(f"{n}.gz" for n in ALL_FILES[1:])


def test_download_md5_mismatch_leaves_nothing(tmp_path, server, monkeypatch):
    table = dict(MNISTDataModule.md5, **{"t10k-images-idx3-ubyte.gz": "0" * 32})
    monkeypatch.setattr(MNISTDataModule, "md5", table)
    dm = MNISTDataModule(root=tmp_path / "data", download=True)
    with pytest.raises(RuntimeError, match=r"MD5 mismatch.*t10k-images-idx3-ubyte\.gz"):
        dm.prepare_data()
    raw = tmp_path / "data" / "MNIST" / "raw"
    assert not (raw / "t10k-images-idx3-ubyte.gz").exists()
    assert _leftovers(raw) == []
    assert (raw / "train-images-idx3-ubyte.gz").exists()  # the ones before were kept


def test_download_file_never_overwrites(tmp_path, server):
    dest = tmp_path / "out" / "x.gz"
    dest.parent.mkdir()
    dest.write_bytes(b"old")
    source = server / "t10k-labels-idx1-ubyte.gz"
    download_file(source.as_uri(), dest, file_md5(source))
    assert dest.read_bytes() == b"old"
    assert os.listdir(dest.parent) == ["x.gz"]


def test_download_failure_leaves_nothing(tmp_path):
    dest = tmp_path / "out" / "x.gz"
    with pytest.raises(OSError):
        download_file((tmp_path / "absent.gz").as_uri(), dest, "0" * 32)
    assert os.listdir(dest.parent) == []


# The real data in the shared folder (skipped where it is absent).

DATA_ROOT = Path(
    os.environ.get(
        "TNKD_DATA_ROOT", Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
    )
)
# (module, folder, mean pixel of train and test, first 10 train and test labels)
REAL = [
    (
        MNISTDataModule,
        "MNIST",
        (0.1307, 0.1325),
        ([5, 0, 4, 1, 9, 2, 1, 3, 1, 4], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]),
    ),
    (
        FashionMNISTDataModule,
        "FashionMNIST",
        (0.2861, 0.2869),
        ([9, 0, 0, 3, 0, 2, 7, 2, 5, 5], [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]),
    ),
]


@pytest.fixture(scope="module", params=REAL, ids=[entry[1] for entry in REAL])
def real(request):
    cls, folder, means, first_labels = request.param
    if not (DATA_ROOT / folder / "raw").is_dir():
        pytest.skip(
            f"no {folder} data under {DATA_ROOT} (set TNKD_DATA_ROOT to a folder with {folder}/raw)"
        )
    dm = cls(root=DATA_ROOT, batch_size=32)
    for train in (True, False):
        dm.load_split(train)
    return dm, means, first_labels


def test_real_shapes_and_means(real):
    dm, (train_mean, test_mean), _ = real
    (x, y), (x_test, y_test) = dm.load_split(True), dm.load_split(False)
    assert x.shape == (60000, 1, 28, 28) and x_test.shape == (10000, 1, 28, 28)
    assert y.shape == (60000,) and y_test.shape == (10000,)
    assert x.mean().item() == pytest.approx(train_mean, abs=5e-4)
    assert x_test.mean().item() == pytest.approx(test_mean, abs=5e-4)
    assert torch.bincount(y, minlength=10).min() > 5000 and y_test.max() == 9


def test_real_first_labels(real):
    dm, _, (first_train, first_test) = real
    assert dm.load_split(True)[1][:10].tolist() == first_train
    assert dm.load_split(False)[1][:10].tolist() == first_test


def test_real_setup_and_batch(real):
    dm, _, _ = real
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(dm.dataset("train")) == 54000 and len(dm.dataset("val")) == 6000
