"""Training speed of tree and PEPS students against a baseline commit, in the same process.

    python benchmarks/graph_speed.py --baseline REV          # today against commit REV
    python benchmarks/graph_speed.py --baseline REV --reps 30 --threads 1

Models (10 classes, batch 100, random inputs in [0, 1]):

* **tree 196**: ``TreeClassifier`` over the 196 pixels of a 2x2-pooled 28x28 image, D = 8, the
  [1, x] map (odd sites passed up: not a balanced tree);
* **tree 64**, **tree 1024**: ``TreeClassifier`` over 64 / 1024 flat sites, D = 8 (balanced,
  the [1, x] map fused with the leaves);
* **peps 4x4**: ``PEPSClassifier`` of ``configs/mnist/grid_peps.yaml`` (a 4x4 grid of 7x7
  patches, a learnable map of size 4, D = 4).

Each is built twice, from today's ``tnkd`` and from ``tnkd_base`` (commit REV, written by
:mod:`baseline`), with the same seed, and their training steps (forward, cross-entropy,
backward, Adam) are timed interleaved (:func:`chain_speed.interleaved`), so that load from
other processes falls on both alike. Prints samples/s of each and the ratio new / base, and the
largest difference of their logits (the same initial values: they must agree).
"""

from __future__ import annotations

import argparse
import sys

import torch
from chain_speed import interleaved
from contraction import BATCH, CLASSES, train_step

import tnkd.students as students

PEPS = dict(
    input_shape=[1, 28, 28],
    patch=7,
    bond_dim=4,
    feature_map={"name": "learnable", "in_features": 49, "dim": 4},
)
MODELS = {
    "tree 196": ("TreeClassifier", dict(input_shape=(1, 28, 28), pool=2, bond_dim=8)),
    "tree 64": ("TreeClassifier", dict(input_shape=(64,), bond_dim=8)),
    "tree 1024": ("TreeClassifier", dict(input_shape=(1024,), bond_dim=8)),
    "peps 4x4": ("PEPSClassifier", PEPS),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the commit to compare with")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default=None, help="one model name (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from baseline import OUT, materialise

    materialise(args.baseline)
    sys.path.insert(0, str(OUT))
    import tnkd_base.students as base

    y = torch.randint(0, CLASSES, (BATCH,))
    for name, (cls, kwargs) in MODELS.items():
        if args.only and name != args.only:
            continue
        x = torch.rand(BATCH, *kwargs["input_shape"])
        models = {}
        for label, package in (("new", students), ("base", base)):
            torch.manual_seed(0)
            models[label] = getattr(package, cls)(num_classes=CLASSES, **kwargs)
        with torch.no_grad():
            diff = (models["new"](x) - models["base"](x)).abs().max().item()
        steps = {k: train_step(m, m, x, y) for k, m in models.items()}
        speed = interleaved(steps, args.reps, torch.device("cpu"))
        print(
            f"{name}: new {speed['new']:.0f} samples/s, base {speed['base']:.0f}, "
            f"new/base {speed['new'] / speed['base']:.2f}x (plan: {models['new'].plan().engine}, "
            f"logits differ by {diff:.1e})"
        )


if __name__ == "__main__":
    main()
