"""Mixed precision: bf16 autocast for students and divergences (CPU here; the same code on GPU)."""

from pathlib import Path

import torch

from tnkd.cli import run
from tnkd.students import MPSClassifier, TTNetwork
from tnkd.teachers import CNN, save_teacher

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits" / "mps_from_cnn.yaml"


def test_chain_students_contract_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 28, 28)
    for student in (
        MPSClassifier(784, 10, bond_dim=8, init_std=0.1),
        TTNetwork(input_shape=(1, 28, 28), patch_size=4, num_classes=10, rank=6),
    ):
        reference = student(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = student(x)
            out.float().sum().backward()
        # the chain is contracted in float32: equal to the float32 result up to bf16 features
        assert torch.allclose(out.float(), reference, atol=0.05, rtol=0.05)
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


def test_distillation_trains_with_bf16_mixed_through_the_cli(tmp_path):
    teacher = tmp_path / "teacher.pt"
    save_teacher(CNN(input_shape=(1, 8, 8), num_classes=10, channels=(4, 4), hidden=8), teacher)

    def fit(precision: str):
        return run(
            [
                "fit",
                "--config",
                str(CONFIG),
                "--trainer.precision",
                precision,
                "--trainer.max_epochs",
                "2",
                "--trainer.logger",
                "false",
                "--trainer.enable_progress_bar",
                "false",
                "--model.init_args.teacher_checkpoint",
                str(teacher),
                "--model.init_args.divergence",
                "{name: renyi, alpha: 0.5}",
                "--model.init_args.student.init_args.bond_dim",
                "4",
                "--trainer.default_root_dir",
                str(tmp_path / precision),
            ]
        )

    metrics = fit("bf16-mixed").trainer.callback_metrics
    reference = fit("32-true").trainer.callback_metrics
    for name in ("train/loss", "train/kd", "train/ce", "val/student_acc"):
        assert torch.isfinite(metrics[name]), name
    # the student learns as in float32 (its chain runs in float32; teacher and loss in bf16)
    assert abs(metrics["val/student_acc"] - reference["val/student_acc"]) <= 0.05
