"""A 12-run digits grid as one batched model against one of its runs alone (and all 12 in turn).

    python benchmarks/batched_grid.py                      # one run alone, then the batched 12
    python benchmarks/batched_grid.py --sequential         # also the 12 runs one after another
    python benchmarks/batched_grid.py --epochs 5 --threads 2
    python benchmarks/batched_grid.py --only steps         # raw training steps, 1 vs 12 stacked
    python benchmarks/batched_grid.py --only rounding      # how far rounding alone moves a run
    python benchmarks/batched_grid.py --accelerator gpu    # every run on a GPU

The grid is ``configs/digits/main.yaml`` (64-site MPS, D = 10, batch 64, 50 epochs, AdamW lr
3e-3 with cosine decay, CNN teacher run on every batch) with one more variant, Renyi alpha = 0.5:
3 seeds x 4 variants = 12 runs. Everything is one ``tnkd compare`` call each, in this process,
without W&B (``--logger none``), so that the times are those of training and testing:

1. **alone**: one run of the grid (``--alone``, default the KL variant, seed 0) by itself;
2. **batched**: the 12 runs as one batched model (``--batched true``);
3. **sequential** (``--sequential``): the 12 runs one after another, as ``tnkd compare`` runs
   them without ``--batched``.

It prints the wall time of each call, the ratio batched / alone (the floor: <= 3) and each run's
test accuracy batched and, with ``--sequential``, alone. The teacher file must exist (default
``runs/teachers/digits_cnn.pt``, trained by ``tnkd compare --config configs/digits/main.yaml``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch

from tnkd.experiments.compare import main as compare

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits" / "main.yaml"
VARIANTS = [
    {"name": "labels only", "beta": 0.0},
    {"name": "KL (Hinton)", "divergence": "kl", "temperature": 4.0, "beta": 0.9},
    {
        "name": "Renyi alpha=2",
        "divergence": {"name": "renyi", "alpha": 2.0},
        "temperature": 4.0,
        "beta": 0.9,
    },
    {
        "name": "Renyi alpha=0.5",
        "divergence": {"name": "renyi", "alpha": 0.5},
        "temperature": 4.0,
        "beta": 0.9,
    },
]


def run(
    args: argparse.Namespace,
    seeds: list[int],
    variants: list[dict],
    batched: bool,
    extra: list[str] | None = None,
):
    """One ``tnkd compare`` call; returns its rows and wall seconds."""
    flags = [
        "--config",
        str(args.config),
        "--seeds",
        json.dumps(seeds),
        "--variants",
        json.dumps(variants),
        "--logger",
        "none",
        "--results",
        "null",
        "--teacher_checkpoint",
        args.teacher,
        "--trainer",
        json.dumps(
            {
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "accelerator": args.accelerator,
                "devices": 1,
            }
        ),
        "--batched",
        "true" if batched else "false",
    ]
    if args.epochs:
        flags += ["--epochs", str(args.epochs)]
    flags += extra or []
    started = time.perf_counter()
    rows = compare(flags)
    return rows, time.perf_counter() - started


def _peak_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def raw_steps(
    members: int, sites: int = 64, bond: int = 10, batch: int = 64, steps: int = 200
) -> tuple[float, float]:
    """Median ms of a raw training step of one MPS and of ``members`` stacked ones.

    A step is forward, cross-entropy (summed over members), backward and AdamW: no Lightning,
    no metrics, no teacher. The two are timed interleaved, after 20 warm-up steps.
    """
    import torch.nn.functional as F

    from tnkd.students import MPSClassifier
    from tnkd.students.batched import batch_students

    torch.manual_seed(0)
    students = [MPSClassifier(sites, 10, bond_dim=bond) for _ in range(members)]
    models = [students[0], batch_students(students)]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in models]
    x, y = torch.rand(batch, sites), torch.randint(0, 10, (batch,))
    times: list[list[float]] = [[], []]
    for i in range(steps):
        for j, (model, opt) in enumerate(zip(models, optimizers, strict=True)):
            started = time.perf_counter()
            z = model(x)
            z = z if z.dim() == 3 else z.unsqueeze(0)
            loss = F.cross_entropy(z.reshape(-1, 10), y.repeat(z.shape[0]), reduction="sum")
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 20:
                times[j].append(time.perf_counter() - started)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def rounding(args: argparse.Namespace) -> None:
    """Seed 0's 4 runs batched with the chain kernels ``auto`` and ``log_depth``: rounding noise."""
    flags = ["--student.init_args.method", "log_depth"]
    scan, _ = run(args, args.seeds[:1], VARIANTS, batched=True)
    products, _ = run(args, args.seeds[:1], VARIANTS, batched=True, extra=flags)
    print("\n| run | seed | test acc, method auto | test acc, method log_depth |")
    print("|---|---|---|---|")
    for a, b in zip(scan, products, strict=True):
        print(f"| {a.name} | {a.seed} | {a.student_acc:.4f} | {b.student_acc:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--teacher", default="runs/teachers/digits_cnn.pt")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=0, help="0: the config's (50)")
    parser.add_argument("--alone", default="KL (Hinton)", help="the variant run alone (seed 0)")
    parser.add_argument("--sequential", action="store_true", help="also run the 12 in turn")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: one core)")
    parser.add_argument("--out", help="write every number to this JSON file")
    parser.add_argument(
        "--accelerator", default="cpu", help="Lightning accelerator of every run (cpu, gpu)"
    )
    parser.add_argument(
        "--only",
        choices=["steps", "rounding"],
        help="steps: raw training steps of 1 and 12 stacked MPS only; rounding: seed 0's runs "
        "batched with the native scan and with the tree (same function, other rounding) only",
    )
    parser.add_argument("--sites", type=int, default=64, help="--only steps: chain length")
    parser.add_argument("--bond_dim", type=int, default=10, help="--only steps: D")
    parser.add_argument("--batch", type=int, default=64, help="--only steps: batch size")
    parser.add_argument("--steps", type=int, default=200, help="--only steps: timed steps + 20")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.only == "steps":
        n = len(args.seeds) * len(VARIANTS)
        one, stacked = raw_steps(n, args.sites, args.bond_dim, args.batch, args.steps)
        print(
            f"raw step, {args.sites} sites, D = {args.bond_dim}, batch {args.batch}: one MPS "
            f"{one:.2f} ms, {n} stacked {stacked:.2f} ms ({stacked / one:.2f}x)"
        )
        return
    if args.only == "rounding":
        rounding(args)
        return
    alone_variant = next(v for v in VARIANTS if v["name"] == args.alone)
    timings: dict[str, float] = {}
    rss: dict[str, float] = {"start": _peak_mib()}
    alone_rows, timings["alone"] = run(args, args.seeds[:1], [alone_variant], batched=False)
    rss["alone"] = _peak_mib()
    batched_rows, timings["batched"] = run(args, args.seeds, VARIANTS, batched=True)
    rss["batched"] = _peak_mib()
    sequential_rows = None
    if args.sequential:
        sequential_rows, timings["sequential"] = run(args, args.seeds, VARIANTS, batched=False)
    load = os.getloadavg()
    n = len(batched_rows)
    print(
        f"\n## batched grid: {n} runs ({len(args.seeds)} seeds x {len(VARIANTS)} variants), "
        f"{args.threads} thread(s), load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n"
    )
    print("| call | wall time | ratio to one run alone | fit time |")
    print("|---|---|---|---|")
    fit_alone = alone_rows[0].seconds
    fit_batched = batched_rows[0].extra["batched_fit_seconds"]
    print(
        f"| one run alone ({args.alone}, seed {args.seeds[0]}) | {timings['alone']:.1f} s | 1.00 "
        f"| {fit_alone:.1f} s |"
    )
    print(
        f"| {n} runs batched | {timings['batched']:.1f} s | "
        f"{timings['batched'] / timings['alone']:.2f} | {fit_batched:.1f} s |"
    )
    if sequential_rows is not None:
        fit_seq = sum(r.seconds for r in sequential_rows)
        print(
            f"| {n} runs one after another | {timings['sequential']:.1f} s | "
            f"{timings['sequential'] / timings['alone']:.2f} | {fit_seq:.1f} s |"
        )
    print(
        f"\npeak resident memory of this process (MiB): {rss['start']:.0f} at start, "
        f"{rss['alone']:.0f} after the run alone, {rss['batched']:.0f} after the batched runs"
    )
    print("\n| run | seed | test acc batched | test acc alone |")
    print("|---|---|---|---|")
    alone_acc = {(r.name, r.seed): r.student_acc for r in sequential_rows or alone_rows}
    for r in batched_rows:
        other = alone_acc.get((r.name, r.seed))
        print(
            f"| {r.name} | {r.seed} | {r.student_acc:.4f} | "
            f"{'-' if other is None else f'{other:.4f}'} |"
        )
    print("\n| variant | mean test acc batched | mean test acc alone |")
    print("|---|---|---|")
    for v in VARIANTS:
        ours = [r.student_acc for r in batched_rows if r.name == v["name"]]
        theirs = [acc for (name, _), acc in alone_acc.items() if name == v["name"]]
        fmt = lambda xs: (  # noqa: E731
            "-"
            if not xs
            else f"{statistics.mean(xs):.4f}"
            + (f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else "")
        )
        print(f"| {v['name']} | {fmt(ours)} | {fmt(theirs)} |")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "timings": timings,
                    "peak_rss_mib": rss,
                    "load_average": load,
                    "threads": args.threads,
                    "batched": [r.__dict__ for r in batched_rows],
                    "alone": [r.__dict__ for r in alone_rows],
                    "sequential": None
                    if sequential_rows is None
                    else [r.__dict__ for r in sequential_rows],
                },
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
