"""tnkd.data.arrays and tnkd.data.huggingface: your own data from arrays, files or a saved dataset."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.preprocessing import MinMaxScaler

from tnkd.data import ArrayDataModule, HuggingFaceDataModule
from tnkd.data.huggingface import MissingDependencyError
from tnkd.experiments.compare import Variant, compare
from tnkd.students import MPSClassifier
from tnkd.teachers import MLP

REPO = Path(__file__).resolve().parents[1]
HAS_DATASETS = importlib.util.find_spec("datasets") is not None


def _tabular(n: int = 60, features: int = 5, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)) * 10 + 3, np.arange(n) % classes


def _splits(dm: ArrayDataModule) -> dict[str, tuple[torch.Tensor, ...]]:
    dm.setup()
    return {s: dm.dataset(s).tensors for s in ("train", "val", "test")}


def _load_example_script():
    spec = importlib.util.spec_from_file_location(
        "make_breast_cancer_npz", REPO / "examples" / "make_breast_cancer_npz.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- reading: files and arrays give the same data --------------------------------------------


def test_npz_npy_numpy_and_torch_sources_give_the_same_splits(tmp_path):
    x, y = _tabular()
    xt, yt = _tabular(20, seed=1)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    for name, array in {"x": x, "y": y, "xt": xt, "yt": yt}.items():
        np.save(tmp_path / f"{name}.npy", array)
    from_npz = ArrayDataModule(path=tmp_path / "d.npz", scale="minmax")
    from_npy = ArrayDataModule(
        x_train=str(tmp_path / "x.npy"),
        y_train=str(tmp_path / "y.npy"),
        x_test=str(tmp_path / "xt.npy"),
        y_test=str(tmp_path / "yt.npy"),
        scale="minmax",
    )
    from_numpy = ArrayDataModule(x_train=x, y_train=y, x_test=xt, y_test=yt, scale="minmax")
    from_torch = ArrayDataModule(
        x_train=torch.from_numpy(x),
        y_train=torch.from_numpy(y),
        x_test=torch.from_numpy(xt),
        y_test=torch.from_numpy(yt),
        scale="minmax",
    )
    reference = _splits(from_numpy)
    for dm in (from_npz, from_npy, from_torch):
        got = _splits(dm)
        for split in reference:
            for a, b in zip(got[split], reference[split], strict=True):
                assert torch.equal(a, b)
    assert from_npz.input_shape == (5,) and from_npz.num_classes == 3
    assert reference["train"][0].dtype == torch.float32
    assert reference["train"][1].dtype == torch.int64
    # 60 training rows: 10% to validation, the test arrays as given
    assert [len(reference[s][0]) for s in ("train", "val", "test")] == [54, 6, 20]
    # the run config records file names, never arrays
    assert from_npz.path == str(tmp_path / "d.npz") and from_numpy.x_train is None
    assert from_npy.x_train == str(tmp_path / "x.npy")


@pytest.mark.parametrize(
    ("shape", "channels_last", "expected"),
    [
        ((12, 7), False, (7,)),
        ((12, 4, 5), False, (1, 4, 5)),
        ((12, 3, 4, 5), False, (3, 4, 5)),
        ((12, 4, 5, 3), True, (3, 4, 5)),
    ],
)
def test_input_shapes(shape, channels_last, expected):
    rng = np.random.default_rng(0)
    x = rng.random(shape).astype(np.float32)
    dm = ArrayDataModule(
        x_train=x, y_train=np.arange(12) % 2, channels_last=channels_last, val_fraction=0.0
    )
    assert dm.input_shape == expected
    assert dm.num_features == int(np.prod(expected))
    # the samples themselves, moved to channel-first where given channels-last
    reference = np.moveaxis(x, -1, 1) if channels_last else x.reshape(12, *expected)
    train, test = dm.load_split(True), dm.load_split(False)
    everything = torch.cat([train[0], test[0]])
    assert len(everything) == 12
    rows = {tuple(r.flatten().tolist()) for r in everything}
    assert rows == {tuple(r.flatten().tolist()) for r in torch.from_numpy(reference)}


def test_uint8_images_are_divided_by_255():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(10, 6, 6), dtype=np.uint8)
    dm = ArrayDataModule(x_train=x, y_train=np.arange(10) % 2, x_test=x, y_test=np.arange(10) % 2)
    images, _ = dm.load_split(False)
    assert torch.allclose(images, torch.from_numpy(x[:, None].astype(np.float64) / 255).float())
    assert float(images.max()) <= 1.0


def test_no_test_arrays_hold_out_a_stratified_seeded_test_split():
    x, y = np.random.default_rng(0).random((100, 5)), np.arange(100) % 4
    dm = ArrayDataModule(x_train=x, y_train=y, test_fraction=0.2, split_seed=3)
    (x_train, y_train), (x_test, y_test) = dm.load_split(True), dm.load_split(False)
    assert (len(y_train), len(y_test)) == (80, 20)
    assert torch.bincount(y_test).tolist() == [5, 5, 5, 5]  # stratified
    # train and test are disjoint and together are all the rows
    rows = [tuple(r.tolist()) for r in torch.cat([x_train, x_test])]
    assert sorted(rows) == sorted(tuple(r) for r in torch.from_numpy(x).float().tolist())
    again = ArrayDataModule(x_train=x, y_train=y, test_fraction=0.2, split_seed=3)
    assert torch.equal(again.load_split(False)[0], x_test)


# ---- scaling ----------------------------------------------------------------------------------


def test_minmax_is_fitted_on_the_training_split_alone():
    x, y = _tabular(50)
    x_test, y_test = _tabular(20, seed=1)
    x_test[0, 0] = 1e3  # outside the training range: clipped to 1
    dm = ArrayDataModule(
        x_train=x, y_train=y, x_test=x_test, y_test=y_test, scale="minmax", val_fraction=0.2
    )
    train_idx, val_idx = dm.validation_split(len(x))
    got = _splits(dm)
    # reference: scikit-learn's scaler fitted on the training rows only, clipping the others
    scaler = MinMaxScaler(clip=True).fit(x[train_idx.numpy()])
    for split, rows in (("train", x[train_idx.numpy()]), ("val", x[val_idx.numpy()])):
        expected = torch.from_numpy(scaler.transform(rows)).float()
        assert torch.allclose(got[split][0], expected, atol=1e-6)
    assert torch.allclose(
        got["test"][0], torch.from_numpy(scaler.transform(x_test)).float(), atol=1e-6
    )
    assert got["test"][0][0, 0] == 1.0
    train = got["train"][0]
    assert torch.allclose(train.amin(0), torch.zeros(5)) and torch.allclose(
        train.amax(0), torch.ones(5)
    )
    # the validation rows did not inform the range: fitted on all rows it would differ here
    everything = MinMaxScaler().fit(x).transform(x[val_idx.numpy()])
    assert not np.allclose(everything, got["val"][0].numpy(), atol=1e-6)


def test_minmax_of_images_is_per_channel_and_constant_features_become_zero():
    rng = np.random.default_rng(0)
    x = rng.random((20, 2, 3, 3)) * np.array([10.0, 0.5])[None, :, None, None]
    x[:, :, 0, 0] = 7.0  # one pixel constant: range 0
    dm = ArrayDataModule(x_train=x, y_train=np.arange(20) % 2, scale="minmax", val_fraction=0.0)
    raw = dm.load_split(True)
    assert raw[0].shape[1:] == (2, 3, 3)
    channels = raw[0].transpose(0, 1).reshape(2, -1)
    assert channels.amin(1).tolist() == [0.0, 0.0]
    assert channels.amax(1).tolist() == [1.0, 1.0]
    x2 = np.zeros((10, 3))
    x2[:, 1] = np.arange(10)
    x2[:, 2] = 5.0
    flat = ArrayDataModule(
        x_train=x2, y_train=np.arange(10) % 2, scale="minmax", test_fraction=0.2
    ).load_split(True)[0]
    assert torch.all(flat[:, 0] == 0) and torch.all(flat[:, 2] == 0)  # constant: 0
    assert torch.all((flat[:, 1] >= 0) & (flat[:, 1] <= 1))


def test_unscaled_inputs_outside_the_unit_interval_warn():
    x, y = _tabular()
    with pytest.warns(UserWarning, match=r"expect \[0, 1\]; give data scale='minmax'"):
        ArrayDataModule(x_train=x, y_train=y)


# ---- one-line errors ---------------------------------------------------------------------------

X, Y = _tabular(20)


def _bad_npz(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return {"path": path}


BAD = [
    (
        "1-d inputs",
        {"x_train": np.zeros(20), "y_train": Y},
        r"x_train: expected feature vectors .* got shape \(20,\)",
    ),
    (
        "5-d inputs",
        {"x_train": np.zeros((20, 1, 2, 2, 2)), "y_train": Y},
        r"got shape \(20, 1, 2, 2, 2\)",
    ),
    ("no samples", {"x_train": np.zeros((0, 3)), "y_train": np.zeros(0, int)}, r"with n >= 1"),
    (
        "complex inputs",
        {"x_train": X.astype(complex), "y_train": Y},
        r"x_train: expected real numbers .* complex128",
    ),
    ("bool inputs", {"x_train": X > 0, "y_train": Y}, r"expected real numbers .* bool"),
    (
        "string inputs",
        {"x_train": np.full((20, 2), "a"), "y_train": Y},
        r"expected real numbers .* <U1",
    ),
    (
        "ragged inputs",
        {"x_train": np.array([[1.0], [2.0, 3.0]] * 10, dtype=object), "y_train": Y},
        r"dtype object; samples of different shapes",
    ),
    (
        "float labels",
        {"x_train": X, "y_train": Y.astype(float)},
        r"y_train: labels must be integer class indices 0..C-1, but got dtype float64 \(cast with y.astype\(int\)\)",
    ),
    (
        "2-d labels",
        {"x_train": X, "y_train": Y[:, None]},
        r"y_train: expected labels of shape \(n,\), but got shape \(20, 1\)",
    ),
    (
        "negative label",
        {"x_train": X, "y_train": np.where(np.arange(20) == 3, -1, Y)},
        r"y_train: labels must be class indices 0..C-1, but label 3 is -1",
    ),
    (
        "label too large",
        {"x_train": X, "y_train": Y, "num_classes": 2},
        r"labels must be in 0..1 \(num_classes 2\), but the largest is 2",
    ),
    (
        "one-based labels",
        {"x_train": X, "y_train": Y + 1},
        r"class\(es\) \[0\] have no training sample \(labels 1..C\? subtract 1\)",
    ),
    ("one class", {"x_train": X, "y_train": np.zeros(20, int)}, r"one class only"),
    (
        "NaN",
        {"x_train": np.where(np.arange(20)[:, None] == 7, np.nan, X), "y_train": Y},
        r"x_train: 1 sample\(s\) hold NaN or infinite values, the first is sample 7",
    ),
    (
        "inf in test",
        {"x_train": X, "y_train": Y, "x_test": np.full((4, 5), np.inf), "y_test": Y[:4]},
        r"x_test: 4 sample\(s\) hold NaN or infinite",
    ),
    (
        "lengths",
        {"x_train": X, "y_train": Y[:-1]},
        r"y_train holds 19 labels but its inputs hold 20 samples",
    ),
    (
        "test features",
        {"x_train": X, "y_train": Y, "x_test": X[:, :4], "y_test": Y},
        r"x_test samples have shape \(4,\) but x_train samples \(5,\)",
    ),
    (
        "test half",
        {"x_train": X, "y_train": Y, "x_test": X},
        r"give both x_test and y_test, or neither",
    ),
    ("no data", {}, r"data needs path \(a .npz file"),
    ("no labels", {"x_train": X}, r"data needs path .* or both x_train and y_train"),
    (
        "scale",
        {"x_train": X, "y_train": Y, "scale": "standard"},
        r"data scale must be null or 'minmax', but got 'standard'",
    ),
    (
        "augment tabular",
        {"x_train": X, "y_train": Y, "augment": {"shift": 1}},
        r"augment shifts and rotates images, but the inputs are feature vectors",
    ),
    (
        "channels_last flat",
        {"x_train": X, "y_train": Y, "channels_last": True},
        r"channels_last expects images",
    ),
    (
        "class names",
        {"x_train": X, "y_train": Y, "class_names": ["a", "b"]},
        r"class_names holds 2 names but there are 3 classes",
    ),
    (
        "num_classes",
        {"x_train": X, "y_train": Y, "num_classes": 1},
        r"num_classes must be an integer >= 2",
    ),
    (
        "test_fraction",
        {"x_train": X, "y_train": Y, "x_test": X, "y_test": Y, "test_fraction": 0.3},
        r"leave it out, since x_test and y_test are given",
    ),
    (
        "tiny class split",
        {"x_train": X[:4], "y_train": np.array([0, 0, 0, 1])},
        r"cannot hold out a stratified test split",
    ),
]


@pytest.mark.parametrize(("kwargs", "pattern"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_arrays_raise_one_line_value_errors(kwargs, pattern):
    with pytest.raises(ValueError) as info:
        ArrayDataModule(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert re.search(pattern, message), message


NPZ_BAD = [
    ("no y_train", {"x_train": X}, r"lacks the key\(s\) y_train \(found: x_train\)"),
    ("other names", {"X": X, "y": Y}, r"lacks the key\(s\) x_train, y_train \(found: X, y\)"),
    ("test half", {"x_train": X, "y_train": Y, "x_test": X}, r"lacks the key\(s\) y_test"),
    ("unknown", {"x_train": X, "y_train": Y, "weights": Y}, r"unknown key\(s\) weights"),
]


@pytest.mark.parametrize(
    ("arrays", "pattern"), [b[1:] for b in NPZ_BAD], ids=[b[0] for b in NPZ_BAD]
)
def test_bad_npz_files_raise_one_line_errors(tmp_path, arrays, pattern):
    with pytest.raises(ValueError, match=pattern):
        ArrayDataModule(**_bad_npz(tmp_path, **arrays))


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data path .*nope.npz does not exist"):
        ArrayDataModule(path=tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match=r"x_train: .*nope.npy does not exist"):
        ArrayDataModule(x_train=str(tmp_path / "nope.npy"), y_train=Y)
    (tmp_path / "junk.npz").write_text("not an archive")
    with pytest.raises(ValueError, match=r"junk.npz is not a .npz archive"):
        ArrayDataModule(path=tmp_path / "junk.npz")
    np.save(tmp_path / "one.npy", X)
    with pytest.raises(ValueError, match=r"is not a .npz archive"):
        ArrayDataModule(path=tmp_path / "one.npy")
    np.savez(tmp_path / "d.npz", x_train=X, y_train=Y)
    with pytest.raises(ValueError, match=r"is a .npz archive; give it as `path`"):
        ArrayDataModule(x_train=str(tmp_path / "d.npz"), y_train=Y)
    with pytest.raises(ValueError, match=r"give either data path .* not both: also got x_train"):
        ArrayDataModule(path=tmp_path / "d.npz", x_train=X)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"obj.npy is not a .npy array file"):
        ArrayDataModule(x_train=str(tmp_path / "obj.npy"), y_train=Y)


# ---- the built-in options: transfer sets, augmentation, teacher cache ---------------------------


def test_class_names_from_the_npz_and_transfer_set_options(tmp_path):
    x, y = _tabular(90)
    names = np.array(["setosa", "versicolor", "virginica"])
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, class_names=names)
    dm = ArrayDataModule(path=tmp_path / "d.npz", scale="minmax", labeled_per_class=4)
    assert dm.class_names == ("setosa", "versicolor", "virginica")
    labels = _splits(dm)["train"][1]
    assert torch.bincount(labels[labels >= 0]).tolist() == [4, 4, 4]
    assert int((labels == -1).sum()) == len(labels) - 12


def test_extra_unlabeled_rows_are_read_checked_and_scaled_as_the_training_set(tmp_path):
    x, y = _tabular(40)
    extra = np.random.default_rng(5).normal(size=(7, 5)) * 10 + 3
    np.save(tmp_path / "extra.npy", extra)
    torch.save(torch.from_numpy(extra), tmp_path / "extra.pt")
    dm = ArrayDataModule(
        x_train=x, y_train=y, scale="minmax", extra_unlabeled=str(tmp_path / "extra.npy")
    )
    train_idx, _ = dm.validation_split(32)  # 40 rows less the 20% test split
    x_train, y_train = _splits(dm)["train"]
    assert (y_train == -1).sum() == 7 and dm.is_transfer_set
    fitted = dm.load_split(True)[0][train_idx]
    assert torch.equal(fitted, x_train[:-7])
    reference = _splits(ArrayDataModule(x_train=x, y_train=y, scale="minmax"))["train"][0]
    assert torch.equal(reference, x_train[:-7])
    # the same scaling, fitted on the raw training rows
    with pytest.warns(UserWarning, match="scale='minmax'"):
        unscaled = ArrayDataModule(x_train=x, y_train=y).load_split(True)[0][train_idx]
    low, high = unscaled.amin(0), unscaled.amax(0)
    expected = ((torch.from_numpy(extra).float() - low) / (high - low)).clamp(0, 1)
    assert torch.allclose(x_train[-7:], expected, atol=1e-6)
    for source in (str(tmp_path / "extra.pt"), extra):
        again = ArrayDataModule(x_train=x, y_train=y, scale="minmax", extra_unlabeled=source)
        assert torch.equal(_splits(again)["train"][0], x_train)
    wrong = ArrayDataModule(x_train=x, y_train=y, scale="minmax", extra_unlabeled=extra[:, :3])
    with pytest.raises(ValueError, match=r"extra_unlabeled samples have shape \(3,\) but x_train"):
        wrong.setup()


def test_images_distil_with_augmentation_and_a_teacher_cache(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(80, 6, 6), dtype=np.uint8)
    y = np.arange(80) % 2
    x[y == 1, :3] = 255  # a learnable difference
    cache = tmp_path / "cache"
    results = compare(
        ArrayDataModule(x_train=x, y_train=y, batch_size=16, augment={"shift": 1, "views": 2}),
        student=partial(MPSClassifier, 36, 2, bond_dim=2),
        teacher=partial(MLP, 36, 2, hidden=[8]),
        teacher_checkpoint=str(tmp_path / "teacher.pt"),
        teacher_epochs=1,
        teacher_cache=str(cache),
        variants=[Variant("labels only", beta=0.0), Variant("KL", divergence="kl")],
        epochs=1,
        logger="none",
        results=str(tmp_path / "results.json"),
    )
    assert [r.name for r in results] == ["labels only", "KL"]
    # the cache holds the teacher's logits on the 2 fixed views of the training split, on the
    # validation split and on the test split
    assert len(list(cache.iterdir())) == 4
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert all(0.0 <= r["student_acc"] <= 1.0 for r in runs)


# ---- the tabular example ---------------------------------------------------------------------


def test_breast_cancer_example_writes_a_file_the_module_reads(tmp_path, capsys):
    script = _load_example_script()
    assert script.main([str(tmp_path / "bc.npz")]) == 0
    assert "455 training and 114 test samples, 30 features" in capsys.readouterr().out
    dm = ArrayDataModule(path=tmp_path / "bc.npz", scale="minmax", val_fraction=0.2)
    assert (dm.num_classes, dm.input_shape, dm.class_names) == (2, (30,), ("malignant", "benign"))
    from sklearn.datasets import load_breast_cancer

    assert len(dm.load_split(True)[1]) + len(dm.load_split(False)[1]) == len(
        load_breast_cancer().target
    )
    # never overwrites
    assert script.main([str(tmp_path / "bc.npz")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_tabular_compare_config_runs_end_to_end(tmp_path, tnkd_cli):
    _load_example_script().make_npz(tmp_path / "data" / "breast_cancer.npz")
    config = REPO / "configs" / "tabular" / "compare_mps.yaml"
    args = ["compare", "--config", config, "--epochs", "1", "--teacher_epochs", "1"]
    args += ["--seeds", "[0]", "--logger", "none"]
    result = tnkd_cli(args, cwd=tmp_path)
    assert result.rc == 0, result.stderr
    assert "## ArrayDataModule: teacher test accuracy" in result.stdout
    assert re.search(r"\| labels only \| - \| - \| 0 \| 0\.\d{4} \|", result.stdout)
    assert re.search(r"\| KL T=2 \| kl \| 2 \| 0.9 \| 0\.\d{4} \|", result.stdout)
    saved = json.loads((tmp_path / "runs" / "results" / "breast_cancer_mps.json").read_text())
    assert [r["name"] for r in saved["runs"]] == ["labels only", "KL T=2"]
    assert (tmp_path / "runs" / "teachers" / "breast_cancer_mlp.pt").is_file()


def test_a_bad_npz_through_the_cli_is_one_line(tmp_path, tnkd_cli):
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "breast_cancer.npz", x_train=X, y=Y)
    config = REPO / "configs" / "tabular" / "teacher_mlp.yaml"
    result = tnkd_cli(["fit", "--config", config, "--trainer.logger", "false"], cwd=tmp_path)
    assert result.rc == 2
    assert len(result.stderr_lines) <= 3, result.stderr  # Lightning's "Seed set to 0" first
    assert result.stderr_lines[-1] == (
        "tnkd fit: error: data/breast_cancer.npz lacks the key(s) y_train (found: x_train, y); "
        "expected x_train, y_train and optionally x_test, y_test, class_names"
    )
    assert not (tmp_path / "runs").exists()


# ---- a Hugging Face dataset saved on disk --------------------------------------------------------


def test_without_datasets_the_error_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails
    with pytest.raises(MissingDependencyError) as info:
        HuggingFaceDataModule(tmp_path)
    assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)
    assert str(info.value) == (
        "HuggingFaceDataModule needs the datasets package: pip install 'tnkd[hf]' "
        "(or pip install datasets)"
    )


@pytest.mark.skipif(not HAS_DATASETS, reason="the optional datasets package is not installed")
def test_a_saved_hugging_face_dataset_reads_as_the_same_arrays(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 6, 6, 3), dtype=np.uint8)
    labels = np.arange(30) % 3
    features = Features({"img": Image(), "label": ClassLabel(names=["a", "b", "c"])})
    rows = {"img": list(images), "label": labels.tolist()}
    whole = Dataset.from_dict(rows, features=features)
    DatasetDict(train=whole.select(range(24)), test=whole.select(range(24, 30))).save_to_disk(
        tmp_path / "images"
    )
    dm = HuggingFaceDataModule(tmp_path / "images", input_columns="img", scale=None)
    reference = ArrayDataModule(
        x_train=images[:24],
        y_train=labels[:24],
        x_test=images[24:],
        y_test=labels[24:],
        channels_last=True,
    )
    assert (dm.input_shape, dm.num_classes, dm.class_names) == ((3, 6, 6), 3, ("a", "b", "c"))
    for split, tensors in _splits(reference).items():
        for a, b in zip(_splits(dm)[split], tensors, strict=True):
            assert torch.equal(a, b)

    x, y = _tabular(40)
    table = Dataset.from_dict(
        {"f0": x[:, 0], "f1": x[:, 1], "f2": x[:, 2], "label": y, "note": ["x"] * 40},
        features=Features(
            {
                "f0": Value("float64"),
                "f1": Value("float64"),
                "f2": Value("float64"),
                "label": Value("int64"),
                "note": Value("string"),
            }
        ),
    )
    table.save_to_disk(tmp_path / "table")  # one Dataset: a test split is held out
    dm = HuggingFaceDataModule(tmp_path / "table", input_columns=["f0", "f1", "f2"], scale="minmax")
    reference = ArrayDataModule(x_train=x[:, :3], y_train=y, scale="minmax")
    for split, tensors in _splits(reference).items():
        for a, b in zip(_splits(dm)[split], tensors, strict=True):
            assert torch.allclose(a.float(), b.float(), atol=1e-6)
    with pytest.raises(
        ValueError, match=r"has no column\(s\) f9 \(columns: f0, f1, f2, label, note\)"
    ):
        HuggingFaceDataModule(tmp_path / "table", input_columns=["f0", "f9"])
    with pytest.raises(ValueError, match=r"labels \(note\) are strings; .*class_encode_column"):
        HuggingFaceDataModule(tmp_path / "table", input_columns=["f0"], label_column="note")
    with pytest.raises(ValueError, match=r"has no split valid \(splits: train, test\)"):
        HuggingFaceDataModule(tmp_path / "images", input_columns="img", test_split="valid")
    with pytest.raises(FileNotFoundError, match=r"is not a folder"):
        HuggingFaceDataModule(tmp_path / "nope")
