"""Plain or stable? Training and inference speed of graph students under both contraction paths.

    python benchmarks/plain_vs_stable.py            # the reference engine against the stable one
    python benchmarks/plain_vs_stable.py --markdown

Students (batch 100, random inputs, 10 classes): binary trees over 64 pixels (8x8, D = 8) and
196 pixels (28x28 pooled 2x2, D = 8), a 4x4 PEPS on 2x2 patches of an 8x8 image (product map
d = 16, D = 3) and the MNIST PEPS of ``configs/mnist/grid_peps.yaml`` (4x4 grid of 7x7 patches,
learned map of size 4, D = 4). Each is timed with ``method="reference"`` (one ``opt_einsum``
expression along the same path, values renormalised once at the end) and ``"stable"`` (grouped
levels, tracked log-scale), interleaved, fastest of the repetitions; ``auto`` is the engine
the planner picks for that graph (``tree`` for trees, ``stable`` for PEPS).
"""

from __future__ import annotations

import argparse

import torch
from tree_vs_tensorkrowch import BATCH, CLASSES, interleaved, step_fns

from tnkd.students import PEPSClassifier, TreeClassifier

STUDENTS = {
    "tree, 8x8 pixels, D = 8": (TreeClassifier, {"input_shape": (1, 8, 8), "bond_dim": 8}),
    "tree, 14x14 pooled pixels, D = 8": (
        TreeClassifier,
        {"input_shape": (1, 28, 28), "pool": 2, "bond_dim": 8},
    ),
    "PEPS 4x4, 2x2 patches (d = 16), D = 3": (
        PEPSClassifier,
        {"input_shape": (1, 8, 8), "patch": 2, "bond_dim": 3},
    ),
    "PEPS 4x4, 7x7 patches (learned d = 4), D = 4": (
        PEPSClassifier,
        {
            "input_shape": (1, 28, 28),
            "patch": 7,
            "bond_dim": 4,
            "feature_map": {"name": "learnable", "in_features": 49, "dim": 4},
        },
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    sep = " | " if args.markdown else "  "
    head = (
        "student",
        "auto picks",
        "train plain",
        "train stable",
        "stable/plain",
        "infer plain",
        "infer stable",
        "stable/plain",
    )
    print(("| " if args.markdown else "") + sep.join(head) + (" |" if args.markdown else ""))
    if args.markdown:
        print("|" + "---|" * len(head))
    for name, (cls, kwargs) in STUDENTS.items():
        x = torch.rand(BATCH, *kwargs["input_shape"])
        y = torch.randint(0, CLASSES, (BATCH,))
        models = {
            mode: cls(num_classes=CLASSES, method={"plain": "reference"}.get(mode, mode), **kwargs)
            for mode in ("plain", "stable")
        }
        chosen = cls(num_classes=CLASSES, **kwargs).plan().engine
        steps = {mode: step_fns(m, m, x, y) for mode, m in models.items()}
        train = interleaved({k: v[0] for k, v in steps.items()}, args.reps)
        infer = interleaved({k: v[1] for k, v in steps.items()}, args.reps)
        cells = (
            name,
            chosen,
            f"{train['plain']:,.0f}",
            f"{train['stable']:,.0f}",
            f"{train['stable'] / train['plain']:.2f}x",
            f"{infer['plain']:,.0f}",
            f"{infer['stable']:,.0f}",
            f"{infer['stable'] / infer['plain']:.2f}x",
        )
        print(
            ("| " if args.markdown else "") + sep.join(cells) + (" |" if args.markdown else ""),
            flush=True,
        )
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s); batch {BATCH}; samples/s, fastest of {args.reps} interleaved repetitions"
    )


if __name__ == "__main__":
    main()
