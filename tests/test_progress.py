from __future__ import annotations

import torch

from tnkd.experiments.progress import EpochLines


def test_line_shows_the_logged_metrics_in_a_fixed_order():
    metrics = {"val/student_acc": torch.tensor(0.875), "train/loss": torch.tensor(0.25), "other": 1}
    line = EpochLines("KL seed 0").line(2, 10, metrics)
    assert line.startswith("[KL seed 0] epoch 3/10: train/loss 0.2500, val/student_acc 0.8750 (")
    assert "other" not in line


def test_line_without_label_or_epoch_limit():
    line = EpochLines().line(0, -1, {})
    assert line.startswith("epoch 1: ")
