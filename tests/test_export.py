"""Export: every student family as a program of tensor operations (torch.export, ONNX Runtime)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from student_families import FAMILIES, build

from tnkd.export import export_program, portable, read_metadata, save
from tnkd.students import GraphStudent, MPSClassifier, PEPSClassifier, TreeClassifier, TTNetwork

ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed")


def _trained_like(name: str) -> torch.nn.Module:
    """A student whose weights are moved off their initialisation (cost does not depend on them)."""
    student = build(name)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student.eval()


def _digits_images() -> torch.Tensor:
    from tnkd.data import DigitsDataModule

    data = DigitsDataModule(batch_size=400)
    data.setup("test")
    return next(iter(data.test_dataloader()))[0]


@pytest.fixture(scope="module")
def images():
    return _digits_images()


def _agree(reference: torch.Tensor, other: torch.Tensor) -> None:
    rel = (reference - other).abs().amax(1) / reference.abs().amax(1)
    assert float(rel.max()) < 1e-4
    assert torch.equal(reference.argmax(1), other.argmax(1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_exports_with_the_same_logits(family, images, tmp_path):
    student = _trained_like(family)
    with torch.no_grad():
        reference = student(images)
    program = export_program(student, images[:3])
    _agree(reference, program.module()(images))
    path = save(program, tmp_path / "student.onnx", metadata={"classes": list(range(10))})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (images[:1], images):  # the batch dimension is dynamic
        out = torch.from_numpy(session.run(None, {name: batch.numpy()})[0])
        _agree(reference[: len(batch)], out)
    assert read_metadata(path) == {"classes": "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"}


def _raw(student: GraphStudent, x: torch.Tensor) -> torch.Tensor:
    values, log_scale = student._portable_log_forward(x)
    return values * torch.exp(log_scale).unsqueeze(-1)


@pytest.mark.parametrize(
    "make",
    [
        lambda: MPSClassifier(9, 3, bond_dim=3, label_position=4),
        lambda: MPSClassifier(9, 3, bond_dim=3, label_position=0),
        lambda: MPSClassifier(9, 3, bond_dim=3, label_position=9, uniform=True),
        lambda: TTNetwork(input_shape=(1, 4, 4), num_classes=3, patch_size=2, rank=2),
        lambda: TreeClassifier(input_shape=(16,), num_classes=3, bond_dim=3),
        lambda: PEPSClassifier(input_shape=(1, 4, 4), num_classes=3, bond_dim=2, patch=2),
    ],
)
def test_the_portable_engine_equals_the_dense_reference(make):
    torch.manual_seed(0)
    student = make().double()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.rand(5, 16 if student.num_inputs == 16 else student.num_inputs, dtype=torch.float64)
    x = x.view(5, *([1, 4, 4] if student.num_inputs == 16 else [-1]))
    want = student.generic_forward(x)
    got = _raw(student, x)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))
    assert portable(student).plan().engine == "portable"


def test_a_784_site_chain_exports_finite_values():
    torch.manual_seed(0)  # the [cos, sin] map: every site's transfer matrix shrinks the state
    student = MPSClassifier(784, 10, bond_dim=6, feature_map="trig").eval()
    x = torch.rand(4, 1, 28, 28)
    reference = student(x)
    out = export_program(student, x[:2]).module()(x)
    assert torch.isfinite(out).all()
    _agree(reference, out)


def test_the_onnx_file_runs_where_tnkd_cannot_be_imported(images, tmp_path):
    student = _trained_like("mps_patch_learned")
    path = save(student, tmp_path / "student.onnx", images[:2])
    expected = student(images[:5]).argmax(1).tolist()
    numpy_images = tmp_path / "images.npy"
    import numpy as np

    np.save(numpy_images, images[:5].numpy())
    deployer = f"""
import sys
sys.modules["tnkd"] = None  # tnkd is not importable in this process
try:
    import tnkd
    raise SystemExit("tnkd was importable")
except ImportError:
    pass
import numpy as np, onnxruntime as ort
session = ort.InferenceSession({str(path)!r})
images = np.load({str(numpy_images)!r})
logits = session.run(None, {{session.get_inputs()[0].name: images}})[0]
print(logits.argmax(1).tolist())
"""
    done = subprocess.run([sys.executable, "-c", deployer], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(expected)


def test_export_refuses_to_overwrite_and_names_the_format(tmp_path):
    student = build("mps")
    x = torch.rand(2, 1, 8, 8)
    path = save(student, tmp_path / "s.pt2", x, metadata={"classes": [0, 1]})
    assert read_metadata(path) == {"classes": "[0, 1]"}
    import zipfile

    with zipfile.ZipFile(path) as archive:  # the program's JSON is deflated, weights stored
        kinds = {i.filename.rsplit(".", 1)[-1]: i.compress_type for i in archive.infolist()}
    assert kinds["json"] == zipfile.ZIP_DEFLATED
    big = torch.rand(4000, 1, 8, 8)  # 1 MB: a slice of it must not bring the whole batch along
    sliced = save(student, tmp_path / "sliced.pt2", big[:2])
    assert sliced.stat().st_size < path.stat().st_size + 10_000
    with pytest.raises(FileExistsError, match="already exists"):
        save(student, path, x)
    with pytest.raises(ValueError, match=r"must end in one of \.pt2, \.onnx"):
        save(student, tmp_path / "s.tflite", x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt2", "sliced.pt2"]  # no partials
    assert torch.allclose(torch.export.load(path).module()(x), student.eval()(x), rtol=1e-4)


def test_tnkd_export_from_a_run(tnkd_cli, tmp_path):
    import shutil

    from tnkd.students import MPSClassifier as _  # noqa: F401  (the run's student)

    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree("configs", run / "configs")
    fit = tnkd_cli(
        ["fit", "--config", "configs/digits/mps_from_cnn.yaml", "--trainer.max_epochs", "1",
         "--trainer.logger", "false", "--model.init_args.beta", "0",
         "--model.init_args.teacher_checkpoint", "null"],
        cwd=run,
    )
    assert fit.rc == 0, fit.stderr
    ckpt = "runs/checkpoints/last.ckpt"
    done = tnkd_cli(["export", ckpt, "student.onnx"], cwd=run)
    assert done.rc == 0, done.stderr
    assert "test split: the same top-1 class on 360/360 images" in done.stdout
    assert "student.onnx:" in done.stdout and "KiB" in done.stdout
    meta = read_metadata(run / "student.onnx")
    assert meta["class_names"] == '["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]'
    again = tnkd_cli(["export", ckpt, "student.onnx"], cwd=run)
    assert again.rc != 0 and again.stderr_lines == [
        "tnkd export: error: student.onnx already exists; choose another name or delete it first"
    ]
    for args, says in (
        (["export", ckpt, "student.tflite"], "must end in one of .pt2, .onnx"),
        (["export", "none.ckpt", "s.pt2"], "checkpoint none.ckpt does not exist"),
    ):
        bad = tnkd_cli(args, cwd=run)
        assert bad.rc != 0 and len(bad.stderr_lines) == 1 and says in bad.stderr, bad.stderr
    plain = tnkd_cli(["export", ckpt, "student.pt2", "--check", "none"], cwd=run)
    assert plain.rc == 0 and "split" not in plain.stdout
