"""``tnkd predict`` writes what it predicts: one CSV row per sample.

Columns: ``index`` (position in the data module's prediction split, the test set), ``label``
(the true class, where the batch has one), ``predicted``, ``p_0 .. p_{C-1}`` (the model's
probabilities) and, for a distillation module with a teacher, ``teacher_predicted`` and
``teacher_p_0 ..``. The file is written atomically at the end of the run and never overwrites
an existing file.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class PredictionWriter(Callback):
    """Collect ``predict_step`` outputs (dicts of ``probs``, ``teacher_probs``, ``label``) into a CSV.

    Args:
        path: the CSV file to write; it must not exist yet.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.rows = 0
        self._batches: list[dict[str, torch.Tensor]] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.world_size > 1:
            raise ValueError(
                "tnkd predict writes its file from one process: run it on one device "
                "(--trainer.devices 1, no ddp strategy)"
            )
        if self.path.exists():
            raise FileExistsError(
                f"predictions file {self.path} already exists; choose another --predictions "
                "path (nothing was overwritten)"
            )
        self._batches = []

    def on_predict_batch_end(  # noqa: D102
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, dict) or "probs" not in outputs:
            raise ValueError(
                f"{type(pl_module).__name__}.predict_step must return a dict with 'probs' for "
                "tnkd predict, but returned {type(outputs).__name__}"
            )
        out = {k: v.detach().float().cpu() for k, v in outputs.items() if v is not None}
        if "label" not in out and isinstance(batch, list | tuple) and len(batch) > 1:
            out["label"] = batch[1].detach().cpu()
        self._batches.append(out)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if not trainer.is_global_zero or not self._batches:
            return
        keys = self._batches[0].keys()
        merged = {k: torch.cat([b[k] for b in self._batches]) for k in keys}
        self.rows = write_predictions(self.path, merged)


def write_predictions(path: str | os.PathLike, columns: dict[str, torch.Tensor]) -> int:
    """Write ``probs`` (N, C), optional ``teacher_probs`` and ``label`` as CSV; returns the row count."""
    probs = columns["probs"]
    teacher = columns.get("teacher_probs")
    labels = columns.get("label")
    header = ["index"] + (["label"] if labels is not None else []) + ["predicted"]
    header += [f"p_{c}" for c in range(probs.shape[1])]
    if teacher is not None:
        header += ["teacher_predicted", *[f"teacher_p_{c}" for c in range(teacher.shape[1])]]
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for i in range(len(probs)):
                row: list[Any] = [i]
                if labels is not None:
                    row.append(int(labels[i]))
                row += [int(probs[i].argmax()), *(f"{p:.6g}" for p in probs[i].tolist())]
                if teacher is not None:
                    row += [int(teacher[i].argmax()), *(f"{p:.6g}" for p in teacher[i].tolist())]
                writer.writerow(row)
        if target.exists():
            raise FileExistsError(
                f"predictions file {target} already exists (nothing was overwritten)"
            )
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(probs)
