"""End to end: the real ``tnkd`` command on the bundled digits."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tnkd.cli import run

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "digits"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_fit_teacher_then_distil_then_test_beats_chance(tmp_path):
    teacher = tmp_path / "teacher.pt"
    run(
        [
            "fit",
            "--config",
            str(CONFIGS / "teacher_cnn.yaml"),
            "--trainer.max_epochs",
            "6",
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path / "t"),
            "--model.init_args.export_path",
            str(teacher),
            *QUIET,
        ]
    )
    assert teacher.exists()
    root = tmp_path / "s"
    cli = run(
        [
            "fit",
            "--config",
            str(CONFIGS / "mps_from_cnn.yaml"),
            "--trainer.max_epochs",
            "12",
            "--model.init_args.lr",
            "0.005",
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(root),
            "--model.init_args.teacher_checkpoint",
            str(teacher),
            "--model.init_args.student.init_args.bond_dim",
            "6",
            *QUIET,
        ]
    )
    assert cli.trainer.callback_metrics["val/student_acc"] > 0.5
    ckpt = next((root / "checkpoints").glob("*.ckpt"))
    tested = run(
        [
            "test",
            "--config",
            str(CONFIGS / "mps_from_cnn.yaml"),
            "--ckpt_path",
            str(ckpt),
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(root),
            "--model.init_args.teacher_checkpoint",
            str(teacher),
            "--model.init_args.student.init_args.bond_dim",
            "6",
            *QUIET,
        ]
    )
    metrics = tested.trainer.callback_metrics
    # chance is 0.1 on ten classes: a wide margin above it
    assert metrics["test/student_acc"] > 0.6
    assert metrics["test/agreement"] > 0.6
    # each run's config is kept under the root's configs/ folder, never loose in the root
    assert len(list((root / "configs").glob("config*.yaml"))) == 2
    assert not list(root.glob("config*.yaml"))


def test_wandb_offline_run_holds_config_and_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    teacher = tmp_path / "teacher.pt"
    from tnkd.teachers import MLP, save_teacher

    save_teacher(MLP(64, 10, hidden=(16,)), teacher)
    run(
        [
            "fit",
            "--config",
            str(CONFIGS / "mps_from_cnn.yaml"),
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_checkpointing",
            "false",
            "--model.init_args.teacher_checkpoint",
            str(teacher),
            "--model.init_args.teacher",
            "tnkd.teachers.MLP",
            "--model.init_args.teacher.num_inputs",
            "64",
            "--model.init_args.teacher.num_classes",
            "10",
            "--model.init_args.teacher.hidden",
            "[16]",
            *QUIET,
        ]
    )
    import wandb

    wandb.finish()
    run_dirs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    files = run_dirs[0] / "files"
    assert "DistillationModule" in (files / "tnkd-config.yaml").read_text()
    cfg = (files / "tnkd-config.yaml").read_text()
    assert "bond_dim: 10" in cfg
    summary = run_dirs[0] / f"run-{run_dirs[0].name.rsplit('-', 1)[1]}.wandb"
    assert summary.exists() and summary.stat().st_size > 0


@pytest.mark.parametrize(
    ("key", "said"),
    [
        ("bond_dimension", "bond_dimension' is not accepted"),
        # a student argument since renamed: the line says what to write instead
        ("student.init_args.compile", "`compile: true` is now `method: compiled`"),
    ],
)
def test_unknown_config_key_is_rejected(key, said, capsys):
    from tnkd.cli import main

    with pytest.raises(SystemExit) as exc:
        main(
            ["fit", "--config", str(CONFIGS / "mps_from_cnn.yaml"), f"--model.init_args.{key}", "1"]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0]


def test_print_config_resolves_everything(capsys):
    with pytest.raises(SystemExit) as exc:
        run(
            [
                "fit",
                "--config",
                str(CONFIGS / "mps_from_cnn.yaml"),
                "--model.init_args.temperature",
                "2",
                "--print_config",
            ]
        )
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "tnkd.students.MPSClassifier" in out and "temperature: 2.0" in out


def test_compare_prints_the_table_and_writes_results(tmp_path, capsys):
    results = tmp_path / "results.json"
    run(
        [
            "compare",
            "--config",
            str(CONFIGS / "main.yaml"),
            "--teacher_epochs",
            "2",
            "--epochs",
            "3",
            "--seeds",
            "[0]",
            "--logger",
            "none",
            "--teacher_checkpoint",
            str(tmp_path / "t.pt"),
            "--results",
            str(results),
            "--student.init_args.bond_dim",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert "| labels only |" in out and "| KL (Hinton) |" in out and "teacher test accuracy" in out
    payload = json.loads(results.read_text())
    assert [r["name"] for r in payload["runs"]] == ["labels only", "KL (Hinton)", "Renyi alpha=2"]
    assert all(0.0 <= r["student_acc"] <= 1.0 for r in payload["runs"])
    assert payload["runs"][0]["student_params"] == 64 * 4 * 2 * 4 + 4 * 10 * 4 + 2 * 4 + 1


@pytest.mark.skipif(shutil.which("tnkd") is None, reason="the tnkd console script is not installed")
def test_console_script_help():
    out = subprocess.run(["tnkd", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "tnkd compare --config" in out.stdout
    assert sys.executable  # the script runs in this environment


def test_wandb_run_shows_diagram_and_confusion_matrix(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli = run(
        [
            "fit",
            "--config",
            str(CONFIGS / "mps_from_cnn.yaml"),
            "--trainer.max_epochs",
            "1",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"),
            "--trainer.logger.init_args.name",
            "media",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--model.init_args.beta",
            "0",
            "--model.init_args.teacher_checkpoint",
            "null",
            "--model.init_args.student.init_args.bond_dim",
            "4",
            *QUIET,
        ]
    )
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    import wandb

    wandb.finish()
    confusion = cli.model.test_confusion
    n_test = len(cli.datamodule.dataset("test"))
    assert confusion.shape == (10, 10) and int(confusion.sum()) == n_test
    accuracy = cli.trainer.callback_metrics["test/student_acc"]
    assert abs(confusion.diag().sum().item() / n_test - accuracy.item()) < 1e-6
    (run_dir,) = (tmp_path / "runs" / "wandb").glob("offline-run-*")
    images = sorted(p.name for p in (run_dir / "files" / "media" / "images").rglob("*.png"))
    assert any(name.startswith("student") or "diagram" in name for name in images), images
    assert any("confusion" in name for name in images), images


ALL_CONFIGS = sorted(
    p
    for p in (CONFIGS.parent).glob("*/*.yaml")
    if p.parent.name != "sweeps" and p.name != "ddp.yaml"
)


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_parses(config, capsys):
    text = config.read_text()
    command = "study" if "alphas:" in text else "compare" if "variants:" in text else "fit"
    with pytest.raises(SystemExit) as exc:
        run([command, "--config", str(config), "--print_config"])
    assert exc.value.code == 0, capsys.readouterr().err
    assert "class_path" in capsys.readouterr().out


def test_ddp_override_composes_with_a_config(capsys):
    with pytest.raises(SystemExit) as exc:
        run(
            [
                "fit",
                "--config",
                str(CONFIGS.parent / "mnist" / "mps14_from_cnn.yaml"),
                "--config",
                str(CONFIGS.parent / "mnist" / "ddp.yaml"),
                "--print_config",
            ]
        )
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "strategy: ddp" in out and "pool: 2" in out
