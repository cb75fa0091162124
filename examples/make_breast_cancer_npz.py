"""Save scikit-learn's bundled breast-cancer data as a ``.npz`` file that tnkd reads.

The Wisconsin diagnostic breast-cancer set (569 tumours, 30 real-valued features, malignant or
benign) ships with scikit-learn, so nothing is downloaded. A stratified, seeded 80/20 split
gives the test set; the features are stored unscaled (``ArrayDataModule(scale="minmax")``
scales them by the training split's range)::

    python examples/make_breast_cancer_npz.py                 # writes data/breast_cancer.npz
    python examples/make_breast_cancer_npz.py OUT.npz --test-fraction 0.25 --seed 1

Any data set works the same way: ``numpy.savez(path, x_train=..., y_train=..., x_test=...,
y_test=..., class_names=...)``, with integer labels ``0 .. C-1``. The script needs NumPy and
scikit-learn only, not tnkd, and never overwrites an existing file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split


def make_npz(path: str | Path, test_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write the breast-cancer arrays to ``path``; refuses to overwrite an existing file.

    Returns:
        ``path``.

    Raises:
        FileExistsError: if ``path`` exists.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; delete it or give another path")
    data = load_breast_cancer()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data,
        data.target,
        test_size=test_fraction,
        random_state=seed,
        stratify=data.target,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("xb") as f:  # "x": never replace a file that appeared meanwhile
        np.savez(
            f,
            x_train=x_train.astype(np.float32),
            y_train=y_train.astype(np.int64),
            x_test=x_test.astype(np.float32),
            y_test=y_test.astype(np.int64),
            class_names=np.array(data.target_names, dtype=str),
        )
    return path


def main(argv: list[str] | None = None) -> int:
    """Command line: ``make_breast_cancer_npz.py [OUT] [--test-fraction F] [--seed S]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "out", nargs="?", default="data/breast_cancer.npz", help="the .npz to write"
    )
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share held out for test")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    args = parser.parse_args(argv)
    try:
        path = make_npz(args.out, args.test_fraction, args.seed)
    except (OSError, ValueError) as err:
        print(f"make_breast_cancer_npz: error: {err}", file=sys.stderr)
        return 2
    with np.load(path) as saved:
        print(
            f"wrote {path}: {len(saved['y_train'])} training and {len(saved['y_test'])} test "
            f"samples, {saved['x_train'].shape[1]} features, classes {[str(c) for c in saved['class_names']]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
