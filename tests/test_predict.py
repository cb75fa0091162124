"""``tnkd predict`` writes its predictions to a CSV file and says where."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch
from cli_runner import digits_run

from tnkd.teachers import CNN, save_teacher


def _args(sub: str, *extra: str) -> list[str]:
    return digits_run(sub, "kd", "--trainer.limit_train_batches", "3", *extra, labels_only=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tnkd_cli):
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    save_teacher(CNN(input_shape=(1, 8, 8), num_classes=10), root / "runs/teachers/digits_cnn.pt")
    result = tnkd_cli(_args("fit"), cwd=root)
    assert result.rc == 0, result.stderr
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_predict_writes_student_and_teacher_probabilities(trained, tnkd_cli):
    result = tnkd_cli(
        _args("predict", "--ckpt_path", "last", "--predictions", "p.csv"), cwd=trained
    )
    assert result.rc == 0, result.stderr
    assert "tnkd predict: 360 predictions written to p.csv" in result.stdout
    rows = _rows(trained / "p.csv")
    assert len(rows) == 360  # the digits test split
    for row in rows[:20]:
        probs = [float(row[f"p_{c}"]) for c in range(10)]
        teacher = [float(row[f"teacher_p_{c}"]) for c in range(10)]
        assert sum(probs) == pytest.approx(1, abs=1e-4)
        assert sum(teacher) == pytest.approx(1, abs=1e-4)
        assert int(row["predicted"]) == max(range(10), key=probs.__getitem__)
        assert int(row["teacher_predicted"]) == max(range(10), key=teacher.__getitem__)
        assert 0 <= int(row["label"]) < 10
    # the same file is never overwritten
    again = tnkd_cli(_args("predict", "--ckpt_path", "last", "--predictions", "p.csv"), cwd=trained)
    assert again.rc != 0 and re.search(r"p\.csv already exists", again.stderr_lines[-1])


def test_predict_without_a_path_writes_under_runs_predictions(trained, tnkd_cli):
    result = tnkd_cli(_args("predict", "--ckpt_path", "last"), cwd=trained)
    assert result.rc == 0, result.stderr
    match = re.search(r"written to (\S+)", result.stdout)
    assert match and Path(trained, match.group(1)).is_file()
    assert Path(match.group(1)).parent == Path("runs/predictions")
