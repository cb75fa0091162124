"""Every student family at MNIST size, exported, against its PyTorch self on the MNIST test split.

    python benchmarks/export_agreement.py --root ../shared/datasets
    python benchmarks/export_agreement.py --root ../shared/datasets --checkpoints runs/checkpoints/A/last.ckpt ...

For each student (the students of the MNIST configs; built fresh with seed 0 and their weights
moved off their initialisation by N(0, 0.05^2) noise, since agreement is a property of the
contraction, not of training; or the trained students of ``--checkpoints``): export it with
``tnkd.export.save`` to ``.pt2`` and ``.onnx``, run both on the 10,000 test images (ONNX
Runtime on the CPU) and print, per file, the images whose top-1 class equals the PyTorch
student's and the largest relative logit difference ``max |a - b| / max |a|`` of an image.
The 784-site chain with the [cos, sin] map is the floor's case for finite values.

``--float16``: instead of exporting, round each student's weights and the images to float16
(what a float16 file would hold) and compare that student with the float32 one, in PyTorch.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

from tnkd.data import MNISTDataModule
from tnkd.export import agreement, load_program, save
from tnkd.students import (
    TTMLP,
    MPSClassifier,
    PEPSClassifier,
    StackedMPS,
    TreeClassifier,
    TTNetwork,
)
from tnkd.teachers import MLP
from tnkd.training.checkpoints import load_student

IMAGE = (1, 28, 28)
STUDENTS = {
    "MPS, 4x4 patches, learned map, D = 8": lambda: MPSClassifier(
        49, 10, bond_dim=8, patch=4, feature_map={"name": "learnable", "dim": 8, "in_features": 16}
    ),
    "MPS, 196 pooled sites, D = 8": lambda: MPSClassifier(196, 10, bond_dim=8, pool=2),
    "MPS, 784 sites, [cos, sin], D = 10": lambda: MPSClassifier(784, 10, bond_dim=10, feature_map="trig"),
    "stacked MPS, 784 sites, hidden 8, D = 6": lambda: StackedMPS(784, 10, hidden=8, bond_dim=6),
    "TT network, different cores": lambda: TTNetwork(input_shape=IMAGE, patch_size=7, rank=16, feature_dim=4),
    "TT network, equal cores": lambda: TTNetwork(
        input_shape=IMAGE, patch_size=7, rank=16, feature_dim=4, equal_cores=True
    ),
    "tree, 196 pooled sites, D = 8": lambda: TreeClassifier(input_shape=IMAGE, pool=2, bond_dim=8),
    "TT-layer MLP, rank 8, from the 784-1200-1200-10 MLP": lambda: TTMLP.from_mlp(
        MLP(784, 10, hidden=(1200, 1200)), ranks=8
    ),
    "PEPS, 4x4 patches, D = 4": lambda: PEPSClassifier(
        input_shape=IMAGE, patch=7, bond_dim=4, feature_map={"name": "learnable", "in_features": 49, "dim": 4}
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="the folder holding MNIST/raw/*.gz")
    parser.add_argument("--checkpoints", nargs="*", default=[], help="trained runs to check instead")
    parser.add_argument("--only", help="the students whose name contains this text")
    parser.add_argument("--float16", action="store_true", help="weights and images rounded to float16")
    ns = parser.parse_args()
    data = MNISTDataModule(root=ns.root, batch_size=500)
    data.setup("test")
    if ns.checkpoints:
        students = {path: (lambda p=path: load_student(p)) for path in ns.checkpoints}
    else:
        students = {k: v for k, v in STUDENTS.items() if ns.only is None or ns.only in k}
    example = next(iter(data.test_dataloader()))[0][:2]
    print(f"torch {torch.__version__}, {sys.platform}; MNIST test split, "
          f"{len(data.dataset('test'))} images\n")
    print("| student | params | file | size | same top-1 | largest relative difference |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for k, (name, make) in enumerate(students.items()):
            torch.manual_seed(0)
            student = make().eval()
            if not ns.checkpoints:
                with torch.no_grad():
                    for p in student.parameters():
                        p.add_(0.05 * torch.randn_like(p))
            if ns.float16:
                rounded = copy.deepcopy(student)
                with torch.no_grad():
                    for p in rounded.parameters():
                        p.copy_(p.half().float())
                same, total, worst = agreement(
                    student, lambda x, r=rounded: r(x.half().float()), data.test_dataloader()
                )
                print(f"| {name} | {student.parameter_count():,} | float16 weights and images | "
                      f"{student.parameter_count() * 2 / 1024:.0f} KiB of weights | {same}/{total} | "
                      f"{worst:.1e} |", flush=True)
                continue
            for suffix in (".pt2", ".onnx"):
                path = save(student, Path(folder) / f"s{k}{suffix}", example)
                same, total, worst = agreement(student, load_program(path), data.test_dataloader())
                print(f"| {name} | {student.parameter_count():,} | {suffix} | "
                      f"{path.stat().st_size / 1024:.0f} KiB | {same}/{total} | {worst:.1e} |", flush=True)


if __name__ == "__main__":
    main()
