"""What a run records in W&B, read back from the offline run files (``tests/wandb_offline.py``).

The dashboards are part of the product: a ``tnkd fit`` run and every run of a ``tnkd compare``
must carry the keys that let the W&B UI group by divergence and filter by alpha and bond
dimension, the test metrics and confusion matrix, and summary values that equal the results
file to the last digit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from wandb_offline import read_offline_run

from tnkd.cli import run
from tnkd.teachers import MLP, save_teacher

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "digits"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _runs(save_dir: Path) -> list:
    return [read_offline_run(d) for d in sorted((save_dir / "wandb").glob("offline-run-*"))]


def _finish() -> None:
    import wandb

    wandb.finish()


def test_a_fit_run_records_the_structured_config(tmp_path, monkeypatch):
    import wandb

    _finish()  # a run left open by another test would be reused by Lightning's logger
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    said: list[str] = []
    monkeypatch.setattr(wandb, "termwarn", lambda text, *a, **k: said.append(str(text)))
    save_teacher(MLP(64, 10, hidden=(16,)), tmp_path / "teacher.pt")
    run(
        [
            "fit",
            "--config",
            str(CONFIGS / "mps_from_cnn.yaml"),
            "--model.init_args.teacher_checkpoint",
            "teacher.pt",
            "--model.init_args.teacher",
            "tnkd.teachers.MLP",
            "--model.init_args.teacher.num_inputs",
            "64",
            "--model.init_args.teacher.num_classes",
            "10",
            "--model.init_args.teacher.hidden",
            "[16]",
            "--divergence",
            "renyi",
            "--alpha",
            "0.5",
            "--temperature",
            "2",
            "--bond_dim",
            "4",
            "--seed",
            "3",
            "--epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"),  # absolute: the W&B service keeps the first test's cwd
            *QUIET,
        ]
    )
    _finish()
    assert not any("anonymous" in text for text in said)  # the CLI drops Lightning's None
    (record,) = _runs(tmp_path / "runs")
    config = record.config
    assert config["role"] == "student"
    assert config["divergence"] == "renyi" and config["alpha"] == 0.5
    assert config["temperature"] == 2.0 and config["beta"] == 0.9
    assert config["bond_dim"] == 4 and config["num_sites"] == 64
    assert config["student"]["class"] == "MPSClassifier" and config["student"]["bond_dim"] == 4
    assert config["engine"] == config["student"]["engine"] == "chain"  # the planner's choice
    assert config["seed"] == 3 and config["epochs"] == 1 and config["lr"] == 0.003
    assert config["data"]["class"] == "DigitsDataModule" and config["data"]["batch_size"] == 64
    assert config["teacher"]["class"] == "MLP" and config["teacher"]["file"] == "teacher.pt"
    assert config["tnkd_version"] and config["student_params"] == 64 * 4 * 2 * 4 + 4 * 10 * 4 + 9
    assert "student" in record.tags and "renyi" in record.tags
    assert record.summary["student_params"] == config["student_params"]
    assert record.summary["fit_seconds"] > 0
    # what a run logs per epoch (from the epoch sums) and per logged step
    logged = {"train/loss", "train/ce", "train/kd", "train/loss_step", "train/student_acc"}
    logged |= {"val/loss", "val/student_acc", "val/student_ece", "val/agreement", "val/teacher_acc"}
    assert logged <= set(record.summary), logged - set(record.summary)
    assert "train/loss_epoch" not in record.summary
    assert 0 <= record.summary["val/student_acc"] <= 1 and record.summary["train/loss"] > 0


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    _finish()
    root = tmp_path_factory.mktemp("compare-wandb")
    results = root / "results.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.chdir(root)
        run(
            [
                "compare",
                "--config",
                str(CONFIGS / "main.yaml"),
                "--teacher_epochs",
                "1",
                "--epochs",
                "1",
                "--seeds",
                "[0]",
                "--variants",
                "[{name: labels only, beta: 0.0}, {name: Renyi a=2, divergence: {name: renyi, "
                "alpha: 2.0}, temperature: 4.0, beta: 0.9}]",
                "--teacher_checkpoint",
                "t.pt",
                "--save_dir",
                "runs",
                "--group",
                "digits-test",
                "--results",
                str(results),
                "--student.init_args.bond_dim",
                "4",
            ]
        )
    return _runs(root / "runs"), json.loads(results.read_text()), root


def test_compare_runs_share_a_group_and_tell_teacher_from_students(compared):
    records, _, _ = compared
    assert {r.group for r in records} == {"digits-test"}
    assert sorted(r.job_type for r in records) == ["student", "student", "teacher"]
    (teacher,) = [r for r in records if r.job_type == "teacher"]
    assert teacher.config["role"] == "teacher" and "test/teacher_acc" in teacher.summary


def test_compare_student_runs_record_keys_test_metrics_and_the_confusion_matrix(compared):
    records, _, root = compared
    students = {r.name: r for r in records if r.job_type == "student"}
    labels, renyi = students["labels only seed 0"], students["Renyi a=2 seed 0"]
    assert labels.config["divergence"] == "none" and "alpha" not in labels.config
    assert renyi.config["divergence"] == "renyi" and renyi.config["alpha"] == 2.0
    assert "labels-only" in labels.tags and "renyi" in renyi.tags
    for record in (labels, renyi):
        assert record.config["bond_dim"] == 4 and record.config["seed"] == 0
        assert record.config["teacher"]["file"] == "t.pt"
        assert "test_acc" in record.config["teacher"]  # written by the first-use training
        for key in ("test/student_acc", "test/agreement", "test/student_ece", "test/teacher_acc"):
            assert 0.0 <= record.summary[key] <= 1.0, key
        assert any("confusion_matrix" in f for f in record.files), record.files
    images = list((root / "runs" / "wandb").rglob("media/images/test/confusion_matrix*.png"))
    assert len(images) == 2


def test_summary_and_results_file_agree_to_the_last_digit(compared):
    records, payload, _ = compared
    students = {r.name: r for r in records if r.job_type == "student"}
    for row in payload["runs"]:
        summary = students[f"{row['name']} seed {row['seed']}"].summary
        assert row["student_acc"] == summary["test/student_acc"]
        assert row["agreement"] == summary["test/agreement"]
        assert row["student_ece"] == summary["test/student_ece"]
        assert row["student_params"] == summary["student_params"]
        assert row["compression_ratio"] == summary["compression_ratio"]
        assert row["seconds"] == summary["fit_seconds"]
    assert payload["teacher"]["test_acc"] == records[0].summary.get(
        "test/teacher_acc", payload["teacher"]["test_acc"]
    )


def test_runs_start_without_wandbs_deprecation_notice(tmp_path, monkeypatch):
    """Lightning passes ``anonymous=None``; wandb warns about it into every run's console."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from tnkd.experiments.wandb_runs import make_logger

    _finish()
    monkeypatch.setenv("WANDB_MODE", "offline")
    said: list[str] = []
    monkeypatch.setattr(wandb, "termwarn", lambda text, *a, **k: said.append(str(text)))
    folder = tmp_path / "runs"
    folder.mkdir()
    WandbLogger(save_dir=str(folder), offline=True, project="p").experiment  # noqa: B018
    _finish()
    assert any("anonymous" in text for text in said)  # what Lightning's own logger causes
    said.clear()
    make_logger("wandb", str(folder), "p", "run", None).experiment  # noqa: B018
    _finish()
    assert not any("anonymous" in text for text in said)
