"""Images for the run's dashboard: the student's diagram and the test confusion matrix."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch


def confusion_figure(matrix: torch.Tensor, class_names: Sequence[str] = ()) -> Any:
    """A matplotlib figure of a (true x predicted) count matrix, counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    counts = matrix.detach().cpu().long()
    n = counts.shape[0]
    names = list(class_names) if len(class_names) == n else [str(i) for i in range(n)]
    fig, ax = plt.subplots(figsize=(0.55 * n + 2, 0.55 * n + 1.5))
    ax.imshow(counts.numpy(), cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true")
    ax.set_xticklabels(names, rotation=90)
    ax.set_yticklabels(names)
    peak = max(int(counts.max()), 1)
    for i in range(n):
        for j in range(n):
            color = "white" if counts[i, j] > peak / 2 else "black"
            ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7, color=color)
    fig.tight_layout()
    return fig


def log_figure(logger: Any, key: str, figure: Any) -> bool:
    """Log a matplotlib figure with a logger that takes images (W&B); close it. Returns if logged."""
    import matplotlib.pyplot as plt

    try:
        if logger is None or not hasattr(logger, "log_image"):
            return False
        logger.log_image(key=key, images=[figure])
        return True
    finally:
        plt.close(figure)


def diagram_figure(student: Any) -> Any | None:
    """The student's tensor-network diagram, or ``None`` (with a warning) if it cannot draw."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    draw = getattr(student, "draw", None)
    if draw is None:
        return None
    try:
        ax = draw()
    except Exception as err:  # a diagram is a nicety: never stop a run for it
        warnings.warn(f"could not draw the student's diagram: {err}", stacklevel=2)
        return None
    return ax.figure if hasattr(ax, "figure") else ax
