"""Two processes (DDP over gloo, CPU) through the real ``tnkd`` command: teacher, then distillation."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tnkd.data import DigitsDataModule
from tnkd.students import MPSClassifier

ROOT = Path(__file__).resolve().parents[1]
DDP = [
    "--trainer.strategy=ddp",
    "--trainer.devices=2",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def _tnkd(tmp_path: Path, *args: str) -> None:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "tnkd.cli", "fit", *args, *DDP],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)
def test_ddp_two_processes_teacher_and_distillation(tmp_path):
    teacher = tmp_path / "teacher.pt"
    logs = ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    _tnkd(
        tmp_path,
        "--config=configs/digits/teacher_cnn.yaml",
        "--trainer.max_epochs=1",
        f"--model.init_args.export_path={teacher}",
        *logs,
        "--trainer.logger.init_args.name=ddp-teacher",
    )
    assert teacher.exists()  # written once, by rank 0 (a second write would have failed)
    _tnkd(
        tmp_path,
        "--config=configs/digits/mps_from_cnn.yaml",
        "--trainer.max_epochs=1",
        f"--model.init_args.teacher_checkpoint={teacher}",
        "--model.init_args.student.init_args.bond_dim=4",
        *logs,
        "--trainer.logger.init_args.name=ddp-student",
        "--trainer.callbacks=tnkd.training.callbacks.RunCheckpoint",
        "--trainer.callbacks.monitor=val/student_acc",
        "--trainer.callbacks.mode=max",
    )
    # one W&B run per job, not one per rank
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    ckpt = torch.load(
        tmp_path / "checkpoints" / "ddp-student" / "last.ckpt",
        map_location="cpu",
        weights_only=False,
    )
    data = DigitsDataModule(batch_size=64, val_fraction=0.1, test_fraction=0.2)
    data.setup()
    n_train = len(data.dataset("train"))
    # each rank trained on half of the data: ceil(ceil(n/2) / batch) steps in the epoch
    assert ckpt["global_step"] == math.ceil(math.ceil(n_train / 2) / 64)
    # the logged validation accuracy is over the whole validation set (synced across ranks)
    student = MPSClassifier(num_sites=64, num_classes=10, bond_dim=4)
    prefix = "student."
    student.load_state_dict(
        {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    )
    student.eval()
    x, y = data.dataset("val").tensors[:2]
    with torch.no_grad():
        correct = student(x).argmax(1) == y
    (state,) = [v for k, v in ckpt["callbacks"].items() if "RunCheckpoint" in k]
    logged = float(state["best_model_score"])
    assert len(y) % 2 == 0  # no padding by the distributed sampler: the halves are exact
    assert logged == pytest.approx(correct.float().mean().item(), abs=1e-6)
