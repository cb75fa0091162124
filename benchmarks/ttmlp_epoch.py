"""Seconds per MNIST training epoch of the TT-MLP student (``configs/mnist/ttmlp_from_mlp.yaml``).

    python benchmarks/ttmlp_epoch.py --root /work/shared/datasets            # rank 16, 1 epoch
    python benchmarks/ttmlp_epoch.py --root PATH --ranks 8 --epochs 2

The student is what ``TTMLPFromTeacher`` builds from the 784-1200-1200-10 MLP teacher (dropout
0.2): ``TTMLP.from_mlp(mlp, ranks)``, 784 = 7·7·4·4 -> 1200 = 5·5·6·8 and 1200 -> 1200 as
TT-layers, the class layer dense. The teacher here is a freshly initialised MLP (a trained one
is not needed to time the student: TT-SVD gives the same shapes and ranks). One epoch is the 54,000
training images of the config (``val_fraction`` 0.1) at batch 128: forward, cross-entropy on the
labels, backward, Adam step, in a plain loop (no Lightning, no teacher forward, no logging), so
the figure is the student's own training cost. It uses only APIs that exist on ``main`` as well,
so the same script times the code before and after a change (``PYTHONPATH=...``).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from tnkd.data import MNISTDataModule
from tnkd.students import TTMLP
from tnkd.teachers import MLP


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="data", help="folder holding MNIST/raw/*.gz")
    parser.add_argument("--ranks", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-size", type=int, default=54_000)
    args = parser.parse_args()

    torch.manual_seed(0)
    images, labels = MNISTDataModule(root=args.root).load_split(train=True)
    images, labels = images[: args.train_size], labels[: args.train_size]
    student = TTMLP.from_mlp(MLP(784, 10, hidden=(1200, 1200), dropout=0.2), ranks=args.ranks)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    student.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(images))
        t0 = time.perf_counter()
        total, steps = 0.0, 0
        for start in range(0, len(images), args.batch_size):
            idx = order[start : start + args.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(student(images[idx]), labels[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
        seconds = time.perf_counter() - t0
        print(
            f"epoch {epoch}: {seconds:.2f} s ({1e3 * seconds / steps:.1f} ms/step, {steps} steps), "
            f"mean loss {total / steps:.4f}; rank {args.ranks}, "
            f"{sum(p.numel() for p in student.parameters()):,} parameters, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads"
        )


if __name__ == "__main__":
    main()
