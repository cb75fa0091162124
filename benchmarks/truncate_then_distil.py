"""Train wide, cut, let the teacher repair: truncate-then-distil against distilling the small MPS from scratch.

    python benchmarks/truncate_then_distil.py --root ../shared/datasets --seeds 0 1 2
    python benchmarks/truncate_then_distil.py --root ../shared/datasets --seeds 0 --markdown

For each seed, on MNIST (the 196-site MPS of ``configs/mnist/grid_mps.yaml``: images pooled 2x2,
[1, x] map, KL distillation from the CNN teacher at T = 4, beta = 0.9, AdamW with cosine decay,
batch 100, one recipe for every training):

1. **scratch**: an MPS with D = ``--dim`` (8) distilled for ``--scratch-epochs`` (15) epochs;
2. **wide**: an MPS with D = ``--wide-dim`` (32) distilled for ``--wide-epochs`` epochs;
3. **cut**: the wide MPS brought into canonical form about its label core and every bond truncated
   by SVD to D = ``--dim`` (:func:`tnkd.students.truncation.truncate_student`);
4. **fine-tune**: the cut MPS distilled for ``--finetune-epochs`` epochs.

It prints the test accuracy of each stage and the training time of each path (wide + cut +
fine-tune against scratch), measured in this one process with the same trainer settings (no
logger, no checkpoints), and writes every number to ``--results`` (JSON). The teacher's logits
are cached in ``runs/cache`` (computed once, shared by all runs, as ``tnkd compare`` does).
The CLI route to the same pipeline is ``configs/mnist/truncate_then_distil.yaml``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from tnkd.data import MNISTDataModule
from tnkd.experiments.compare import test_metrics
from tnkd.students import MPSClassifier
from tnkd.students.truncation import truncate_student
from tnkd.training import DistillationModule

RECIPE = {"divergence": "kl", "temperature": 4.0, "beta": 0.9}


def student(bond_dim: int) -> MPSClassifier:
    return MPSClassifier(
        num_sites=196, pool=2, num_classes=10, bond_dim=bond_dim, feature_map="linear"
    )


def fit(model, data, epochs: int, lr: float, teacher: str, cache: str) -> float:
    """Distil the teacher into ``model`` for ``epochs``; returns the seconds ``fit`` took."""
    module = DistillationModule(
        model, teacher_checkpoint=teacher, lr=lr, teacher_cache=cache, **RECIPE
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic="warn",
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return time.perf_counter() - start


def accuracy(model, data) -> float:
    """Test accuracy through Lightning's test loop (the one evaluation path of ``tnkd compare``)."""
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    return test_metrics(trainer, DistillationModule(model, beta=0.0), data)["test/student_acc"]


def run(args: argparse.Namespace) -> list[dict]:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    for pattern in (
        ".*does not have many workers.*",
        ".*LeafSpec.*",
        r".*module\(s\) in eval mode.*",
    ):
        warnings.filterwarnings("ignore", pattern)
    data = MNISTDataModule(root=args.root, batch_size=100, val_fraction=0.1)
    data.setup("fit")
    data.setup("test")
    rows = []
    for seed in args.seeds:
        L.seed_everything(seed, verbose=False)
        small = student(args.dim)
        seconds = fit(small, data, args.scratch_epochs, args.lr, args.teacher, args.cache)
        rows.append(
            dict(
                seed=seed,
                path="scratch",
                stage="scratch",
                bond_dim=args.dim,
                epochs=args.scratch_epochs,
                test_acc=accuracy(small, data),
                seconds=seconds,
                params=small.parameter_count(),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
        L.seed_everything(seed, verbose=False)
        wide = student(args.wide_dim)
        seconds = fit(wide, data, args.wide_epochs, args.lr, args.teacher, args.cache)
        rows.append(
            dict(
                seed=seed,
                path="truncate",
                stage="wide",
                bond_dim=args.wide_dim,
                epochs=args.wide_epochs,
                test_acc=accuracy(wide, data),
                seconds=seconds,
                params=wide.parameter_count(),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
        start = time.perf_counter()
        cut, report = truncate_student(wide, bond_dim=args.dim)
        seconds = time.perf_counter() - start
        rows.append(
            dict(
                seed=seed,
                path="truncate",
                stage="cut",
                bond_dim=args.dim,
                epochs=0,
                test_acc=accuracy(cut, data),
                seconds=seconds,
                params=cut.parameter_count(),
                discarded=report.total_discarded,
                error_bound=report.error_bound,
            )
        )
        print(json.dumps(rows[-1]), flush=True)
        seconds = fit(cut, data, args.finetune_epochs, args.lr, args.teacher, args.cache)
        rows.append(
            dict(
                seed=seed,
                path="truncate",
                stage="fine-tune",
                bond_dim=args.dim,
                epochs=args.finetune_epochs,
                test_acc=accuracy(cut, data),
                seconds=seconds,
                params=cut.parameter_count(),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _mean_sd(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows: list[dict], args: argparse.Namespace) -> str:
    seeds = sorted({r["seed"] for r in rows})

    def pick(stage: str, key: str) -> list[float]:
        return [r[key] for r in rows if r["stage"] == stage]

    total = [
        sum(r["seconds"] for r in rows if r["seed"] == s and r["path"] == "truncate") for s in seeds
    ]
    lines = [
        "| run | D | epochs | params | test acc | training time |",
        "|---|---|---|---|---|---|",
        f"| scratch (distilled) | {args.dim} | {args.scratch_epochs} | {pick('scratch', 'params')[0]:,} | "
        f"{_mean_sd(pick('scratch', 'test_acc'))} | {_mean_sd(pick('scratch', 'seconds'), 1)} s |",
        f"| wide (distilled) | {args.wide_dim} | {args.wide_epochs} | {pick('wide', 'params')[0]:,} | "
        f"{_mean_sd(pick('wide', 'test_acc'))} | {_mean_sd(pick('wide', 'seconds'), 1)} s |",
        f"| cut to D = {args.dim} | {args.dim} | - | {pick('cut', 'params')[0]:,} | "
        f"{_mean_sd(pick('cut', 'test_acc'))} | {_mean_sd(pick('cut', 'seconds'), 2)} s |",
        f"| cut + fine-tune (distilled) | {args.dim} | {args.finetune_epochs} | {pick('fine-tune', 'params')[0]:,} | "
        f"{_mean_sd(pick('fine-tune', 'test_acc'))} | {_mean_sd(pick('fine-tune', 'seconds'), 1)} s |",
        f"| **truncate-then-distil, total** | {args.dim} | {args.wide_epochs} + {args.finetune_epochs} | "
        f"{pick('fine-tune', 'params')[0]:,} | {_mean_sd(pick('fine-tune', 'test_acc'))} | "
        f"{_mean_sd(total, 1)} s |",
        "",
        f"seeds {seeds}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); time: Trainer.fit "
        "(training and validation epochs) and the cut, per run",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="data", help="folder holding MNIST/raw/*.gz")
    parser.add_argument("--teacher", default="runs/teachers/mnist_cnn.pt")
    parser.add_argument("--cache", default="runs/cache")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--wide-dim", type=int, default=32)
    parser.add_argument("--wide-epochs", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--scratch-epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--results", default="runs/results/mnist_truncate_then_distil.json")
    parser.add_argument("--markdown", action="store_true", help="(the table is always markdown)")
    args = parser.parse_args()
    if not Path(args.teacher).exists():
        raise SystemExit(
            f"teacher file {args.teacher} does not exist; train it first: tnkd fit --config "
            "configs/mnist/teacher_cnn.yaml --data.init_args.root ROOT"
        )
    rows = run(args)
    print(table(rows, args))
    out = Path(args.results)
    if out.exists():
        out = out.with_name(f"{out.stem}-{time.strftime('%Y%m%d-%H%M%S')}{out.suffix}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "runs": rows}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
