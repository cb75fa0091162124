"""Trained and exported students as W&B model artifacts, read back from the offline run files.

``tnkd fit`` with ``--trainer.logger.init_args.log_model true`` (an offline run) holds its
checkpoints as artifacts, and ``tnkd export --wandb true`` logs the exported file as a model
artifact whose metadata carries the run's config, the test accuracy and the compression.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from wandb_offline import read_offline_run

from tnkd.cli import run
from tnkd.teachers import MLP, save_teacher

pytest.importorskip("onnxruntime", reason="the export extra is not installed")

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "digits"
NAME = "digits-log-model"


def _runs(folder: Path) -> list:
    return [read_offline_run(d) for d in sorted((folder / "wandb").glob("offline-run-*"))]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A short offline ``tnkd fit`` of a digits MPS from an MLP teacher, with ``log_model``."""
    import wandb

    wandb.finish()  # a run left open by another test would be reused by Lightning's logger
    root = tmp_path_factory.mktemp("log-model")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DATA_DIR", str(root / "wandb-data"))  # artifact files are staged there
        mp.chdir(root)
        save_teacher(MLP(64, 10, hidden=(16,)), root / "teacher.pt")
        run(
            [
                "fit", "--config", str(CONFIGS / "mps_from_cnn.yaml"),
                "--model.init_args.teacher_checkpoint", "teacher.pt",
                "--model.init_args.teacher", "tnkd.teachers.MLP",
                "--model.init_args.teacher.num_inputs", "64",
                "--model.init_args.teacher.num_classes", "10",
                "--model.init_args.teacher.hidden", "[16]",
                "--bond_dim", "4", "--epochs", "1",
                "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                "--trainer.logger.init_args.name", NAME,
                "--trainer.logger.init_args.log_model", "true",
                "--trainer.logger.init_args.save_dir", str(root / "runs"),
                "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false",
            ]
        )
        wandb.finish()
        yield root


def test_an_offline_fit_with_log_model_holds_its_checkpoint(fitted):
    (record,) = _runs(fitted / "runs")
    last = fitted / "runs" / "checkpoints" / NAME / "last.ckpt"
    logged = [a for a in record.artifacts if a.metadata.get("original_filename") == "last.ckpt"]
    assert logged, [a.metadata for a in record.artifacts]
    artifact = logged[-1]
    assert artifact.type == "model" and "latest" in artifact.aliases
    assert artifact.files["model.ckpt"].read_bytes() == last.read_bytes()


def test_tnkd_export_logs_the_file_as_a_model_artifact(fitted, monkeypatch, capsys):
    from tnkd.data import DigitsDataModule
    from tnkd.export import main
    from tnkd.training.checkpoints import load_student

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(fitted / "wandb-data"))
    monkeypatch.chdir(fitted)
    ckpt = fitted / "runs" / "checkpoints" / NAME / "last.ckpt"
    out = main([str(ckpt), "student.onnx", "--wandb", "true", "--save_dir", str(fitted / "exp")])
    assert "logged student.onnx as a W&B model artifact" in capsys.readouterr().out

    (record,) = _runs(fitted / "exp")
    (artifact,) = record.artifacts
    assert artifact.type == "model" and artifact.name == "student-onnx"
    assert artifact.files["student.onnx"].read_bytes() == out.read_bytes()
    meta = artifact.metadata
    # the truth: the PyTorch student of the checkpoint on the digits test split
    student = load_student(ckpt)
    data = DigitsDataModule(batch_size=64, val_fraction=0.1, test_fraction=0.2)
    data.setup("test")
    with torch.no_grad():
        pairs = [(student(x).argmax(1), y) for x, y, *_ in data.test_dataloader()]
    correct = sum(int((p == y).sum()) for p, y in pairs)
    total = sum(len(y) for _, y in pairs)
    assert meta["test_images"] == total == 360
    assert meta["test_accuracy"] == pytest.approx(correct / total)
    assert meta["test_agreement"] == 1.0 and meta["test_max_relative_logit_difference"] < 1e-4
    params = sum(p.numel() for p in student.parameters())
    teacher = 64 * 16 + 16 + 16 * 10 + 10  # the MLP teacher, 64 -> 16 -> 10
    assert (meta["student_params"], meta["teacher_params"]) == (params, teacher)
    assert meta["compression_ratio"] == pytest.approx(teacher / params)
    assert meta["config"]["divergence"] == "kl" and meta["config"]["temperature"] == 4.0
    assert meta["config"]["student"]["init_args"]["bond_dim"] == 4
    assert record.job_type == "export" and record.config["student"] == meta["config"]["student"]
    assert record.summary["test_accuracy"] == meta["test_accuracy"]


def test_tnkd_export_takes_a_run_name(fitted, monkeypatch, capsys):
    from tnkd.export import main
    from tnkd.training.checkpoints import load_student

    monkeypatch.chdir(fitted)
    out = main([NAME, "by-name.pt2", "--check", "none"])  # runs/checkpoints/NAME/last.ckpt
    assert "by-name.pt2: " in capsys.readouterr().out
    student = load_student(fitted / "runs" / "checkpoints" / NAME / "last.ckpt")
    x = torch.rand(5, 64)
    with torch.no_grad():
        got, want = torch.export.load(out).module()(x), student(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    with pytest.raises(FileNotFoundError, match="checkpoint no-such-run does not exist"):
        main(["no-such-run", "x.pt2"])
