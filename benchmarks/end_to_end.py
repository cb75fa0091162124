"""A Lightning training epoch against the raw training step of the same student and batch.

    python benchmarks/end_to_end.py                              # MNIST from ../shared/datasets
    python benchmarks/end_to_end.py --threads 1 --clock cpu      # one thread, CPU time
    python benchmarks/end_to_end.py --root PATH --device cuda    # another data folder, a GPU

The student is the MNIST D = 8 MPS (196 sites after 2 x 2 pooling, [1, x] map), batch 100,
distilled with KL at T = 4 from cached teacher logits (a fixed random MLP's: the speed does not
depend on what the teacher knows), AdamW. Samples per second of

* **raw step**: the student's forward pass, ``DistillationModule.loss_terms``, backward and the
  AdamW step on one batch already in memory, in a plain loop: what the arithmetic allows;
* **Lightning epoch**: ``DistillationModule`` trained by ``lightning.Trainer`` on the MNIST data
  module (no logger, no validation, ``--batches`` batches an epoch): data loading, the cached
  teacher logits, the loss terms, metrics and ``self.log`` included;
* **before**: the same epoch with the module and loader as they were before this benchmark
  (samples indexed one by one and stacked by ``default_collate``; ``torchmetrics`` accuracy and
  calibration objects and every loss term handed to ``self.log`` on every step), kept here as
  the baseline so the gain stays visible.

The floor (issue 19): Lightning epoch >= raw step / 1.3. The three are interleaved (a block of
raw steps after every epoch, the epoch kinds alternating) so that load from other processes
falls on all of them alike; each figure is the median over ``--rounds`` rounds. Without the
MNIST files random images of MNIST's shape are used.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import default_collate
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from tnkd.data import MNISTDataModule
from tnkd.data.loader import ResumableLoader
from tnkd.students import MPSClassifier
from tnkd.teachers import MLP
from tnkd.training.modules import STAGES, DistillationModule

BATCH = 100


class RandomMNIST(MNISTDataModule):
    """MNIST's shapes with random pixels and labels (when the IDX files are not at hand)."""

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = 60_000 if train else 10_000
        gen = torch.Generator().manual_seed(int(train))
        return torch.rand(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


class Before(DistillationModule):
    """``DistillationModule`` as it logged before: metric objects and terms to ``self.log`` per step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        metrics = {}
        for stage in STAGES:
            per_stage = {}
            for name in ("student", "teacher"):
                per_stage[f"{name}_acc"] = MulticlassAccuracy(10, average="micro")
                per_stage[f"{name}_ece"] = MulticlassCalibrationError(10, n_bins=15)
            per_stage["agreement"] = MulticlassAccuracy(10, average="micro")
            metrics[f"{stage}_metrics"] = MetricCollection(per_stage)
        self.old_metrics = torch.nn.ModuleDict(metrics)

    def _shared_step(self, batch, stage):
        x, y, teacher_logits = batch
        student_logits = self.student(x)
        teacher_logits = teacher_logits.float()
        terms = self.loss_terms(student_logits, teacher_logits, y)
        for name, value in terms.items():
            self.log(
                f"{stage}/{name}",
                value,
                on_epoch=True,
                on_step=name == "loss",
                prog_bar=name == "loss",
                sync_dist=True,
            )
        m = self.old_metrics[f"{stage}_metrics"]
        z = student_logits.detach()
        m["student_acc"].update(z, y)
        m["student_ece"].update(z.softmax(-1), y)
        m["teacher_acc"].update(teacher_logits, y)
        m["teacher_ece"].update(teacher_logits.softmax(-1), y)
        m["agreement"].update(z, teacher_logits.argmax(-1))
        for name, metric in m.items():
            self.log(f"{stage}/{name}", metric, on_epoch=True, on_step=False)
        return terms["loss"]


def mnist(root: str | None, per_sample: bool) -> tuple[MNISTDataModule, str]:
    """The MNIST data module with teacher logits attached (random images without the files).

    With ``per_sample`` the training loader indexes and stacks samples one by one, as before.
    """
    if root and (Path(root) / "MNIST" / "raw").exists():
        dm, name = MNISTDataModule(root=root, batch_size=BATCH), "MNIST"
    else:
        dm, name = RandomMNIST(batch_size=BATCH), "random images of MNIST's shape"
    dm.setup("fit")
    torch.manual_seed(0)
    teacher = MLP(784, 10, hidden=(64,))
    x = dm.dataset("train").tensors[0]
    with torch.no_grad():
        dm.attach_teacher_logits("train", teacher(x.reshape(len(x), -1)))
    if per_sample:
        dm.train_dataloader = lambda: ResumableLoader(
            dm.dataset("train"), batch_size=BATCH, seed=dm.seed, collate_fn=default_collate
        )
    return dm, name


def student_module(kind: type[DistillationModule] = DistillationModule) -> DistillationModule:
    """The benchmark's student, initialised from seed 0 (the same for every kind)."""
    torch.manual_seed(0)
    student = MPSClassifier(196, 10, bond_dim=8, pool=2)
    return kind(student, teacher=MLP(784, 10, hidden=(64,)), divergence="kl", lr=1e-3)


class EpochClock(L.Callback):
    """Times each training epoch, then runs a block of raw steps (interleaving the two)."""

    def __init__(self, clock, sync, raw_block=None) -> None:
        self.clock, self.sync, self.raw_block = clock, sync, raw_block
        self.epochs: list[float] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self.sync()
        self.start = self.clock()

    def on_train_epoch_end(self, trainer, module) -> None:
        self.sync()
        self.epochs.append(self.clock() - self.start)
        if self.raw_block is not None:
            self.raw_block()


def run(args: argparse.Namespace) -> dict[str, float | str]:
    """Samples per second of the raw step, the Lightning epoch and the epoch as it was before."""
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dm, data_name = mnist(args.root, per_sample=False)
    old_dm, _ = mnist(args.root, per_sample=True)
    raw_module = student_module().to(device)
    optimizer = torch.optim.AdamW(raw_module.student.parameters(), lr=1e-3)
    x, y, logits = (t[:BATCH].to(device) for t in dm.dataset("train").tensors)
    raw_times: list[float] = []

    def raw_step() -> None:
        loss = raw_module.loss_terms(raw_module.student(x), logits, y)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def raw_block() -> None:
        for _ in range(args.batches):
            sync()
            start = clock()
            raw_step()
            sync()
            raw_times.append(clock() - start)

    for _ in range(3):
        raw_step()
    new, old = EpochClock(clock, sync, raw_block), EpochClock(clock, sync)
    runs = [(student_module(), dm, new), (student_module(Before), old_dm, old)]
    for _ in range(args.rounds + 1):  # one epoch of each in turn; the first is a warm-up
        for module, data, callback in runs:
            trainer = L.Trainer(
                accelerator=device.type,
                devices=1,
                max_epochs=1,
                limit_train_batches=args.batches,
                limit_val_batches=0,
                num_sanity_val_steps=0,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[callback],
            )
            trainer.fit(module, datamodule=data)
    per_step = statistics.median(raw_times[args.batches :])
    return {
        "data": data_name,
        "raw": BATCH / per_step,
        "epoch": BATCH * args.batches / statistics.median(new.epochs[1:]),
        "before": BATCH * args.batches / statistics.median(old.epochs[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="../shared/datasets", help="folder with MNIST/raw")
    parser.add_argument("--batches", type=int, default=100, help="batches per timed epoch")
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs of each kind")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    r = run(args)
    unit = "per CPU-second" if args.clock == "cpu" else "per second"
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"Epoch vs raw step: MNIST D = 8 MPS student, batch {BATCH}, {r['data']}, {name}, "
        f"{torch.get_num_threads()} thread(s); samples {unit}, medians of {args.rounds} rounds"
    )
    print(f"  raw step        {r['raw']:9,.0f}")
    print(
        f"  Lightning epoch {r['epoch']:9,.0f}   raw / epoch  = {r['raw'] / r['epoch']:.2f}  (floor <= 1.3)"
    )
    print(f"  before          {r['before']:9,.0f}   raw / before = {r['raw'] / r['before']:.2f}")


if __name__ == "__main__":
    main()
