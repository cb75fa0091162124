"""The W&B runs of a comparison: one offline ``WandbLogger`` per run, ended when the run ends.

Shared by :mod:`tnkd.experiments.compare` (a run at a time) and :mod:`tnkd.experiments.batched`
(one W&B run per batched member, written after the batched fit), and by the ``tnkd`` command's
own logger (:func:`without_unset_settings`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def make_logger(
    kind: str,
    save_dir: str,
    project: str,
    name: str,
    group: str | None,
    job_type: str = "student",
    tags: Sequence[str] = (),
) -> Any:
    """A W&B logger that never touches the network (offline), or none.

    Runs of one comparison share ``group``; ``job_type`` tells teacher and student runs apart.
    """
    if kind == "none":
        return False
    if kind != "wandb":
        raise ValueError(f"logger must be 'wandb' or 'none', but got {kind!r}")
    from lightning.pytorch.loggers import WandbLogger

    folder = Path(save_dir).resolve()  # the W&B service process may have another cwd
    folder.mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        project=project,
        name=name,
        group=group,
        save_dir=str(folder),
        offline=True,
        job_type=job_type,
        tags=list(tags),
    )
    return without_unset_settings(logger)


def without_unset_settings(logger: Any) -> Any:
    """Drop the ``wandb.init`` settings that Lightning passes as None (before the run starts).

    Lightning's ``WandbLogger`` always passes ``anonymous=None``, and wandb >= 0.19 prints "The
    anonymous setting has no effect and will be removed" for any value it is given, once per
    run, into every console. A setting left out is wandb's default, as None meant.
    """
    settings = getattr(logger, "_wandb_init", None)
    if isinstance(settings, dict) and settings.get("anonymous", False) is None:
        del settings["anonymous"]
    return logger


def finish_run(logger: Any, failed: bool = False) -> None:
    """End the run's W&B run (marked failed, exit code 1, for a run that diverged)."""
    if logger:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else None)
