"""Turn the results files of ``tnkd compare`` runs into Markdown tables and an accuracy plot.

``tnkd compare --config FILE`` writes one JSON file per grid (``results:`` in the config): the
teacher's test accuracy and parameter count, and one record per run (variant, seed, test
accuracy, agreement, calibration error, parameters, compression, wall time). The same values are
in each run's W&B summary; the JSON file is what this module reads, so reports need neither the
network nor W&B's binary run files.

    tnkd report runs/results/mnist_mps.json --plot docs/mnist.png --title MNIST
    tnkd report 'runs/results/mnist_ttn_equal_*.json'     # a quoted pattern: one merged table

A quoted glob pattern merges every file it matches into one family (one table, mean ± sd over
all their seeds): runs of one grid made by several ``tnkd compare`` calls (a seed or a variant
at a time) report as one grid. The files must share one teacher.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from tnkd.experiments.compare import RunResult, _from_record, format_table


def load_results(path: str | Path) -> tuple[dict[str, Any], list[RunResult]]:
    """Read one results file: ``(teacher, runs)``; a clear error if it is not one."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"results file {file} does not exist; `tnkd compare --config FILE` writes it "
            "(its `results:` setting)"
        )
    try:
        payload = json.loads(file.read_text())
        runs = [_from_record(r) for r in payload["runs"]]
        teacher = dict(payload["teacher"])
        if teacher.get("test_acc") is None:  # every run failed (or none ended yet)
            teacher["test_acc"] = math.nan
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"{file} is not a tnkd results file ({type(err).__name__}: {err}); it was left as it is"
        ) from err
    return teacher, runs


def family_name(pattern: str | Path) -> str:
    """The name of a results file or pattern: its stem without wildcards and trailing ``_``."""
    stem = Path(str(pattern)).name.removesuffix(".json")
    return stem.split("*")[0].split("?")[0].split("[")[0].rstrip("_.-") or stem


def load_family(pattern: str | Path) -> tuple[dict[str, Any], list[RunResult]]:
    """One results file, or every file a glob pattern matches merged (one shared teacher)."""
    text = str(pattern)
    if not any(c in text for c in "*?["):
        return load_results(text)
    files = sorted(Path(text).parent.glob(Path(text).name))
    if not files:
        raise FileNotFoundError(
            f"no results files match {text}; `tnkd compare --config FILE` writes them"
        )
    teacher, runs = load_results(files[0])
    for file in files[1:]:
        other, more = load_results(file)
        if (other.get("class_path"), other.get("params"), other.get("test_acc")) != (
            teacher.get("class_path"),
            teacher.get("params"),
            teacher.get("test_acc"),
        ):
            raise ValueError(
                f"{file} was made with another teacher than {files[0]}; merge only the "
                "results of one teacher (report the others as their own files)"
            )
        runs += more
    # labels alone first, then KL, then the others in the order they were found
    runs.sort(key=lambda r: 0 if r.beta == 0 else 1 if r.divergence == "kl" else 2)
    return teacher, runs


def markdown(path: str | Path, title: str | None = None) -> str:
    """The markdown table of one results file or pattern (mean ± sd over seeds per variant)."""
    teacher, runs = load_family(path)
    seconds = sum(r.seconds for r in runs)
    name = title or family_name(path)
    return format_table(
        runs,
        teacher["test_acc"],
        int(teacher["params"]),
        name,
        seconds,
        teacher_note=short_class_name(str(teacher.get("class_path", "teacher"))),
    )


def t_critical(n: int) -> float:
    """The two-sided 5 % critical value of Student's t with ``n - 1`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def paired_differences(runs: list[RunResult], reference: str) -> str:
    """Markdown: each variant's test accuracy minus the ``reference`` variant's, seed by seed.

    For every variant, the differences over the seeds both ran (failed runs left out), their mean
    and standard deviation, and the 95 % interval of the mean difference from Student's t
    distribution (``mean ± t(0.975, n - 1) sd / sqrt(n)``). An interval that holds 0 reads "no
    measurable difference": the difference is inside the seed-to-seed noise.
    """
    names = list(dict.fromkeys(r.name for r in runs))
    if reference not in names:
        raise ValueError(f"--paired {reference!r} is not a variant of these runs; they are {names}")
    by_seed = {r.seed: r.student_acc for r in runs if r.name == reference and not r.failed}
    lines = [
        f"Paired against {reference!r} (test accuracy points, seed by seed):",
        "",
        "| variant | seeds | mean difference | sd | 95 % interval | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        if name == reference:
            continue
        diffs = [
            100 * (r.student_acc - by_seed[r.seed])
            for r in sorted(runs, key=lambda r: r.seed)
            if r.name == name and not r.failed and r.seed in by_seed
        ]
        if len(diffs) < 2:
            lines.append(f"| {name} | {len(diffs)} | - | - | - | too few paired seeds |")
            continue
        mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
        half = t_critical(len(diffs)) * sd / math.sqrt(len(diffs))
        low, high = mean - half, mean + half
        if low > 0:
            verdict = "higher"
        elif high < 0:
            verdict = "lower"
        else:
            verdict = "no measurable difference"
        lines.append(
            f"| {name} | {len(diffs)} | {mean:+.2f} | {sd:.2f} | [{low:+.2f}, {high:+.2f}] | {verdict} |"
        )
    return "\n".join(lines)


def short_class_name(class_path: str) -> str:
    """A class path with every dotted name cut to its last part, ensembles' members too.

    ``tnkd.teachers.CNN`` -> ``CNN``; ``pkg.TeacherEnsemble[pkg.CNN, pkg.MLP]`` ->
    ``TeacherEnsemble[CNN, MLP]`` (the title line of a report table).

    Example:
        >>> short_class_name("tnkd.teachers.TeacherEnsemble[tnkd.teachers.CNN, tnkd.teachers.CNN]")
        'TeacherEnsemble[CNN, CNN]'
    """
    return re.sub(r"[\w.]+\.(\w+)", r"\1", class_path)


def _summary(runs: list[RunResult]) -> list[tuple[str, int, float, float]]:
    """Per variant: (name, params, mean test accuracy, sd)."""
    out = []
    for name in dict.fromkeys(r.name for r in runs):
        rows = [r for r in runs if r.name == name and not r.failed]
        if not rows:  # every run of the variant failed: nothing to plot
            continue
        accs = [r.student_acc for r in rows]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        out.append((name, rows[0].student_params, statistics.mean(accs), sd))
    return out


def plot(paths: list[str | Path], out: str | Path, title: str = "") -> Path:
    """Test accuracy against student parameters (log scale), a marker per results file.

    Teachers are drawn as stars at their own parameter counts.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    # colour = results file (family), marker = variant: two short legends instead of one entry
    # per (family, variant) pair, which overflowed the axes with a data set's whole grid
    fig, ax = plt.subplots(figsize=(8.5, 4.6))
    markers = "osD^vP*Xph"
    variant_marker: dict[str, str] = {}
    family_handles = []
    for k, path in enumerate(paths):
        teacher, runs = load_family(path)
        color = f"C{k % 10}"
        family_handles.append(Line2D([], [], color=color, lw=6, label=family_name(path)))
        for name, params, acc, sd in _summary(runs):
            marker = variant_marker.setdefault(name, markers[len(variant_marker) % len(markers)])
            ax.errorbar(
                params, acc, yerr=sd or None, fmt=marker, color=color, capsize=3, alpha=0.85
            )
        if teacher.get("params") and not math.isnan(float(teacher.get("test_acc", math.nan))):
            ax.plot(teacher["params"], teacher["test_acc"], "k*", markersize=11)
            ax.annotate(
                f"teacher ({str(teacher.get('class_path', '')).rsplit('.', 1)[-1]})",
                (teacher["params"], teacher["test_acc"]),
                textcoords="offset points",
                xytext=(6, -4),
            )
    variant_handles = [
        Line2D([], [], color="0.3", marker=m, linestyle="none", label=name)
        for name, m in variant_marker.items()
    ]
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    first = ax.legend(
        handles=family_handles,
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        title="runs",
    )
    ax.add_artist(first)
    ax.legend(
        handles=variant_handles,
        fontsize=7,
        loc="lower left",
        bbox_to_anchor=(1.01, 0.0),
        title="variant",
    )
    fig.tight_layout()
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return target


def main(args: list[str] | None = None) -> None:
    """``tnkd report FILE... [--plot PNG] [--title T]``: print the tables, write the plot."""
    import argparse

    parser = argparse.ArgumentParser(prog="tnkd report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "results",
        nargs="+",
        help="results JSON files written by tnkd compare; a quoted glob pattern merges its files",
    )
    parser.add_argument("--plot", help="write an accuracy-vs-parameters PNG here")
    parser.add_argument("--title", default="", help="title of the tables and the plot")
    parser.add_argument(
        "--paired",
        metavar="VARIANT",
        help="also each variant minus this one, seed by seed, with a 95 %% interval",
    )
    ns = parser.parse_args(args)
    for path in ns.results:
        print(markdown(path, f"{ns.title} {family_name(path)}".strip()))
        print()
        if ns.paired:
            print(paired_differences(load_family(path)[1], ns.paired))
            print()
    if ns.plot:
        print(f"plot: {plot(ns.results, ns.plot, ns.title)}")
