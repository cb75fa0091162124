"""``tnkd compare --batched true``: one batched model, one results row and one W&B run per run."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
from wandb_offline import read_offline_run

from tnkd.cli import run
from tnkd.experiments.compare import RunResult
from tnkd.experiments.report import markdown
from tnkd.teachers import MLP, save_teacher

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "digits"
VARIANTS = (
    "[{name: labels only, beta: 0.0}, {name: Renyi a=0.5, divergence: {name: renyi, alpha: 0.5}, "
    "temperature: 2.0, beta: 0.9}]"
)


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    import wandb

    wandb.finish()  # a run left open by another test would be reused
    root = tmp_path_factory.mktemp("compare-batched")
    results = root / "results.json"
    save_teacher(MLP(64, 10, hidden=(16,), dropout=0.25), root / "t.pt")  # a small trained-teacher stand-in
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.chdir(root)
        run(
            [
                "compare",
                "--config",
                str(CONFIGS / "main.yaml"),
                "--teacher",
                "{class_path: tnkd.teachers.MLP, init_args: {num_inputs: 64, num_classes: 10, "
                "hidden: [16], dropout: 0.25}}",
                "--epochs",
                "1",
                "--seeds",
                "[0, 1]",
                "--variants",
                VARIANTS,
                "--teacher_checkpoint",
                "t.pt",
                "--save_dir",
                "runs",
                "--group",
                "digits-batched",
                "--results",
                str(results),
                "--student.init_args.bond_dim",
                "4",
                "--batched",
                "true",
            ]
        )
    runs = [read_offline_run(d) for d in sorted((root / "runs" / "wandb").glob("offline-run-*"))]
    return runs, json.loads(results.read_text()), root


def test_one_results_row_per_run_in_the_separate_runs_shape(batched):
    _, payload, root = batched
    rows = payload["runs"]
    assert [(r["name"], r["seed"]) for r in rows] == [
        ("labels only", 0),
        ("Renyi a=0.5", 0),
        ("labels only", 1),
        ("Renyi a=0.5", 1),
    ]
    assert {tuple(r) for r in rows} == {tuple(f.name for f in fields(RunResult))}
    for r in rows:
        assert (
            0.0 <= r["student_acc"] <= 1.0
            and r["student_params"] == 64 * 4 * 2 * 4 + 4 * 10 * 4 + 9
        )
        assert r["extra"]["batched_members"] == 4
        assert r["seconds"] == pytest.approx(r["extra"]["batched_fit_seconds"] / 4)
    table = markdown(root / "results.json")  # what `tnkd report` prints
    assert "| Renyi a=0.5 | renyi(alpha=0.5) | 2 | 0.9 |" in table


def test_one_wandb_run_per_member_with_a_separate_runs_keys(batched):
    records, payload, root = batched
    students = {r.name: r for r in records if r.job_type == "student"}
    assert sorted(students) == [
        "Renyi a=0.5 seed 0",
        "Renyi a=0.5 seed 1",
        "labels only seed 0",
        "labels only seed 1",
    ]
    assert {r.group for r in records} == {"digits-batched"}
    assert [r.job_type for r in records] == ["student"] * 4  # the teacher file existed
    for row in payload["runs"]:
        record = students[f"{row['name']} seed {row['seed']}"]
        config = record.config
        assert config["role"] == "student" and config["seed"] == row["seed"]
        assert config["bond_dim"] == 4 and config["epochs"] == 1 and config["lr"] == 0.003
        assert config["teacher"]["file"] == "t.pt" and config["batched_members"] == 4
        if row["beta"] == 0:
            assert config["divergence"] == "none" and "labels-only" in record.tags
        else:
            assert config["divergence"] == "renyi" and config["alpha"] == 0.5
            assert config["temperature"] == 2.0 and "renyi" in record.tags
        summary = record.summary
        assert row["student_acc"] == summary["test/student_acc"]
        assert row["agreement"] == summary["test/agreement"]
        assert row["student_ece"] == summary["test/student_ece"]
        assert row["student_params"] == summary["student_params"]
        assert row["seconds"] == summary["fit_seconds"]
        assert any("confusion_matrix" in f for f in record.files), record.files
    images = list((root / "runs" / "wandb").rglob("media/images/test/confusion_matrix*.png"))
    assert len(images) == 4


def test_progress_lines_show_the_members_means(tmp_path, capsys):
    from functools import partial

    from tnkd.data import DigitsDataModule
    from tnkd.experiments.compare import Variant, compare
    from tnkd.students import MPSClassifier
    from tnkd.teachers import MLP

    rows = compare(
        DigitsDataModule(batch_size=64),
        student=partial(MPSClassifier, 64, 10, bond_dim=3),
        teacher=partial(MLP, 64, 10, hidden=[16]),
        teacher_checkpoint=str(tmp_path / "teacher.pt"),
        teacher_epochs=1,
        variants=[Variant("labels only", beta=0.0), Variant("KL", divergence="kl")],
        epochs=2,
        logger="none",
        trainer={
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_train_batches": 3,
            "limit_val_batches": 2,
        },
        progress=True,
        evaluate="val",
        batched=True,
    )
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[batched x2]")]
    assert [ln.split(":")[0] for ln in lines] == [
        "[batched x2] epoch 1/2",
        "[batched x2] epoch 2/2",
    ]
    assert all("train/loss" in ln and "val/student_acc" in ln for ln in lines), lines
    assert [r.extra["split"] for r in rows] == ["val", "val"]
