"""The Renyi study: a grid of orders alpha x temperatures T, over seeds, against KL at the same T.

One command runs a whole study and reports it::

    tnkd study --config configs/digits/renyi_study.yaml

It trains the configured student once per (alpha, T, seed) with the Renyi divergence of order
alpha (alpha = 1 is KL, run with the KL loss), plus a labels-only twin per seed, through
:func:`tnkd.experiments.compare.compare` (same teacher, data, schedule). Every finished run is
appended at once to a JSON-lines file (``results``), and runs already there are skipped, so a
stopped study continues where it was. Then it writes

* ``FIGURES.png``: heatmaps (alpha rows, T columns) of the mean test accuracy and the mean
  teacher-student agreement over seeds, each cell with its standard deviation;
* ``FIGURES.md``: the table of paired differences against KL at the same T: per seed, the run
  at (alpha, T) minus the KL run at T of the same seed (same initialisation, same batches), their
  mean and standard deviation, the paired t statistic, and whether the difference exceeds
  seed-to-seed noise: ``|t| > t_{0.975, n-1}`` (two-sided 5 %; 4.30 for 3 seeds).

The orders follow :class:`~tnkd.divergences.RenyiDivergence`: the loss is
``(T^2 / alpha) D_alpha(P || Q)``; at alpha = 0 its limit ``T^2 KL(Q || P)`` (reverse KL), at
alpha = inf ``T^2 D_inf(P || Q)``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from tnkd.data.base import ClassificationDataModule
from tnkd.experiments.compare import Variant, compare
from tnkd.experiments.report import t_critical


def variant_for(alpha: float, temperature: float, beta: float) -> Variant:
    """The variant of one cell: KL at alpha = 1, Renyi of order alpha otherwise."""
    divergence: str | dict = "kl" if alpha == 1 else {"name": "renyi", "alpha": float(alpha)}
    return Variant(_cell_name(alpha, temperature), beta, divergence, float(temperature))


def _cell_name(alpha: float, temperature: float) -> str:
    return f"alpha={alpha:g} T={temperature:g}"


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """The runs of a study's JSON-lines results file (none if it does not exist yet)."""
    file = Path(path)
    if not file.exists():
        return []
    records = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{file} line {number} is not JSON ({err}); fix or remove it"
                ) from err
    return records


def study(
    data: ClassificationDataModule,
    student: Callable[[], nn.Module],
    teacher: Callable[[], nn.Module],
    alphas: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, math.inf),
    temperatures: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
    beta: float = 0.9,
    seeds: Sequence[int] = (0, 1, 2),
    results: str = "runs/results/renyi_study.jsonl",
    figures: str | None = "docs/renyi_study",
    title: str = "Renyi study",
    teacher_checkpoint: str = "runs/teachers/teacher.pt",
    teacher_epochs: int = 30,
    teacher_lr: float = 2e-3,
    epochs: int = 30,
    lr: float = 2e-3,
    scheduler: str = "cosine",
    weight_decay: float = 0.0,
    teacher_cache: str | None = None,
    trainer: dict[str, Any] | None = None,
    logger: str = "none",
    project: str = "tnkd",
    group: str | None = None,
    save_dir: str = "runs",
) -> list[dict[str, Any]]:
    """Run the missing runs of an alpha x T x seed study, then write its figure and table.

    Args:
        data: the data module.
        student: a factory of fresh students (in YAML: ``class_path`` + ``init_args``).
        teacher: a factory of the teacher architecture.
        alphas: Renyi orders (``.inf`` in YAML for infinity); 1 is KL and must be included.
        temperatures: distillation temperatures.
        beta: weight of the distillation term of every distilled run.
        seeds: seeds (each also trains a labels-only twin).
        results: JSON-lines file of the runs (appended to; finished runs are skipped).
        figures: path prefix of the heatmap (``.png``) and table (``.md``); ``None``: none.
        title: title of the figure and the table.
        teacher_checkpoint: the teacher file (trained on first use, reused after).
        teacher_epochs: epochs of the teacher's training (first use only).
        teacher_lr: learning rate of the teacher's training.
        epochs: student epochs per run.
        lr: student learning rate.
        scheduler: ``"cosine"`` or ``"none"``.
        weight_decay: AdamW weight decay of the student.
        teacher_cache: folder of cached teacher logits (see
            :class:`~tnkd.training.modules.DistillationModule`).
        trainer: extra ``lightning.Trainer`` arguments.
        logger: ``"wandb"`` (offline) or ``"none"``.
        project: W&B project.
        group: W&B group.
        save_dir: where W&B runs go.

    Returns:
        The records of every run of the study.
    """
    if 1.0 not in [float(a) for a in alphas]:
        raise ValueError(
            f"alphas must include 1 (KL, the reference of the paired table), but got {list(alphas)}"
        )
    done = {(r["name"], r["seed"]) for r in load_records(results)}
    Path(results).parent.mkdir(parents=True, exist_ok=True)
    cells = [Variant("labels only", beta=0.0)] + [
        variant_for(a, t, beta) for t in temperatures for a in alphas
    ]
    for seed in seeds:
        for variant in cells:
            if (variant.name, seed) in done:
                continue
            (run,) = compare(
                data,
                student,
                teacher,
                teacher_checkpoint=teacher_checkpoint,
                teacher_epochs=teacher_epochs,
                teacher_lr=teacher_lr,
                variants=[variant],
                epochs=epochs,
                lr=lr,
                seeds=[seed],
                scheduler=scheduler,
                weight_decay=weight_decay,
                teacher_cache=teacher_cache,
                trainer=trainer,
                logger=logger,
                project=project,
                group=group,
                save_dir=save_dir,
            )
            record = asdict(run)
            cell = next(v for v in cells if v.name == variant.name)
            alpha = (
                None
                if cell.beta == 0
                else (1.0 if cell.divergence == "kl" else cell.divergence["alpha"])
            )
            record |= {"alpha": _plain(alpha), "teacher_acc": run.extra.get("teacher_acc")}
            with open(results, "a") as f:
                f.write(json.dumps(record) + "\n")
    records = [
        r
        for r in load_records(results)
        if r["seed"] in seeds
        and r["name"] in {v.name for v in cells}
        and r.get("status", "finished") == "finished"  # a diverged run has no figures
    ]
    if figures:
        table = paired_table(records, alphas, temperatures, title)
        Path(figures).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{figures}.md").write_text(table + "\n")
        heatmaps(records, alphas, temperatures, title, f"{figures}.png")
        print(table, flush=True)
    return records


def _plain(alpha: float | None) -> float | str | None:
    return "inf" if alpha is not None and math.isinf(alpha) else alpha


def _alpha(record: dict[str, Any]) -> float:
    return math.inf if record["alpha"] == "inf" else float(record["alpha"])


def _cell(
    records: list[dict[str, Any]], alpha: float, temperature: float
) -> dict[int, dict[str, Any]]:
    """The runs of one (alpha, T) cell, by seed."""
    return {
        r["seed"]: r
        for r in records
        if r["beta"] > 0 and _alpha(r) == alpha and r["temperature"] == temperature
    }


def paired_differences(
    records: list[dict[str, Any]], alpha: float, temperature: float, key: str = "student_acc"
) -> list[float]:
    """Per seed: the (alpha, T) run's ``key`` minus the KL run's at the same T (seeds in both)."""
    runs, kl = _cell(records, alpha, temperature), _cell(records, 1.0, temperature)
    return [runs[s][key] - kl[s][key] for s in sorted(set(runs) & set(kl))]


def paired_table(
    records: list[dict[str, Any]],
    alphas: Sequence[float],
    temperatures: Sequence[float],
    title: str,
) -> str:
    """Markdown: mean accuracy per cell and paired differences against KL at the same T."""
    labels = [r["student_acc"] for r in records if r["beta"] == 0]
    lines = [f"## {title}: test accuracy, paired differences against KL at the same T", ""]
    if labels:
        lines.append(f"Labels only: {_mean_sd(labels)} (seeds: {len(labels)}).")
        lines.append("")
    lines += [
        "| alpha | T | test acc | agreement | diff vs KL (per seed, points) | mean ± sd (points) | t | exceeds noise |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in temperatures:
        for a in alphas:
            cell = _cell(records, float(a), float(t))
            if not cell:
                continue
            accs = [r["student_acc"] for r in cell.values()]
            agree = [r["agreement"] for r in cell.values()]
            row = f"| {'KL (1)' if a == 1 else f'{a:g}'} | {t:g} | {_mean_sd(accs)} | {_mean_sd(agree)} |"
            if a == 1:
                lines.append(row + " - | - | - | (reference) |")
                continue
            diffs = [100 * d for d in paired_differences(records, float(a), float(t))]
            if len(diffs) < 2:
                lines.append(row + f" {' / '.join(f'{d:+.2f}' for d in diffs)} | - | - | - |")
                continue
            mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
            stat = (
                mean / (sd / math.sqrt(len(diffs)))
                if sd > 0
                else math.copysign(math.inf, mean)
                if mean
                else 0.0
            )
            exceeds = abs(stat) > t_critical(len(diffs))
            verdict = ("yes, higher" if mean > 0 else "yes, lower") if exceeds else "no"
            lines.append(
                row + f" {' / '.join(f'{d:+.2f}' for d in diffs)} | {mean:+.2f} ± {sd:.2f} | "
                f"{stat:+.1f} | {verdict} |"
            )
    n = len({r["seed"] for r in records})
    lines += [
        "",
        f"Differences are in accuracy points, seed by seed (seeds {sorted({r['seed'] for r in records})}); "
        f"a difference exceeds seed-to-seed noise when the paired t statistic exceeds "
        f"{t_critical(n) if n > 1 else float('nan'):.2f} in size (two-sided 5 %, {n - 1} degrees of freedom).",
    ]
    return "\n".join(lines)


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def heatmaps(
    records: list[dict[str, Any]],
    alphas: Sequence[float],
    temperatures: Sequence[float],
    title: str,
    path: str,
) -> Path:
    """Two heatmaps (alpha x T): mean test accuracy and mean agreement, each cell with its sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(
        1, 2, figsize=(4.2 + 2.2 * len(temperatures), 1.2 + 0.62 * len(alphas))
    )
    labels = [r["student_acc"] for r in records if r["beta"] == 0]
    for ax, key, name in zip(
        axes, ("student_acc", "agreement"), ("test accuracy", "teacher agreement"), strict=True
    ):
        mean = np.full((len(alphas), len(temperatures)), np.nan)
        text = [["" for _ in temperatures] for _ in alphas]
        for i, a in enumerate(alphas):
            for j, t in enumerate(temperatures):
                values = [r[key] for r in _cell(records, float(a), float(t)).values()]
                if values:
                    mean[i, j] = 100 * statistics.mean(values)
                    sd = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
                    text[i][j] = f"{mean[i, j]:.2f}\n±{sd:.2f}"
        image = ax.imshow(mean, cmap="viridis", aspect="auto")
        for i in range(len(alphas)):
            for j in range(len(temperatures)):
                if text[i][j]:
                    bright = mean[i, j] > np.nanmean(mean)
                    ax.text(
                        j,
                        i,
                        text[i][j],
                        ha="center",
                        va="center",
                        fontsize=7.5,
                        color="black" if bright else "white",
                    )
        ax.set_xticks(range(len(temperatures)), [f"{t:g}" for t in temperatures])
        ax.set_yticks(range(len(alphas)), ["KL (1)" if a == 1 else f"{a:g}" for a in alphas])
        ax.set_xlabel("temperature T")
        ax.set_ylabel("Renyi order alpha")
        ax.set_title(f"{name} (%), mean ± sd over seeds", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    suffix = f"; labels only {100 * statistics.mean(labels):.2f} %" if labels else ""
    fig.suptitle(f"{title}{suffix}", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(args: list[str] | None = None) -> list[dict[str, Any]]:
    """``tnkd study --config FILE``: :func:`study` from YAML and flags."""
    from tnkd.experiments.command import function_command

    return function_command(study, args, "tnkd study", "A Renyi alpha x T study.")


if __name__ == "__main__":
    main()
