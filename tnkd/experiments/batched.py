"""``tnkd compare --batched true``: a comparison's runs trained as one batched model.

Every (seed, variant) run of :func:`~tnkd.experiments.compare.compare` is built exactly as its
separate run builds it (``seed_everything(seed)``, then the student and its
:class:`~tnkd.training.modules.DistillationModule`); the runs are then trained together as one
:class:`~tnkd.training.batched.BatchedDistillation` in one Lightning loop, tested together, and
each gets its own results row and its own W&B run (the same config keys, group, job type, tags,
per-epoch history and summary as a separate run; written after training through Lightning's
``WandbLogger``, offline).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L

from tnkd.training.batched import BatchedDistillation
from tnkd.training.modules import DistillationModule, Diverged


def batched_runs(
    data: Any,
    runs: Sequence[tuple[int, Any]],
    make_module: Callable[[Any], DistillationModule],
    make_trainer: Callable[[str | None], L.Trainer],
    evaluate: str,
    logger: str,
    wandb_args: dict[str, Any],
    progress: bool = False,
) -> list[tuple[DistillationModule, dict[str, float], Diverged | None]]:
    """Train every (seed, variant) run as one batched model; each run's module and test metrics.

    Args:
        data: the data module.
        runs: ``(seed, variant)`` pairs; a variant has ``name``, ``divergence``,
            ``temperature`` and ``beta`` (:class:`~tnkd.experiments.compare.Variant`).
        make_module: a run's module from its variant (called after seeding with its seed), all
            sharing one frozen teacher object: the batched model runs it once per batch.
        make_trainer: a ``lightning.Trainer`` factory (no logger), given the progress label.
        evaluate: ``"test"`` or ``"val"``.
        logger: ``"wandb"`` (one offline run per member, written after testing) or ``"none"``.
        wandb_args: ``project``, ``group``, ``save_dir`` of the W&B runs.
        progress: print one line per epoch (of the batched loop).

    Returns:
        Per run, its :class:`~tnkd.training.modules.DistillationModule` (its student trained,
        ``fit_seconds`` its share of the batched fit time: the total over M runs, divided by M),
        its ``test/*`` metrics (validation figures with ``evaluate="val"``; NaN for a member
        that diverged) and, for a member that diverged and was frozen, its
        :class:`~tnkd.training.modules.Diverged` (else ``None``).
    """
    members = []
    for seed, variant in runs:
        L.seed_everything(seed, verbose=False)  # the separate run's initialisation
        members.append(make_module(variant))
    model = BatchedDistillation(members)
    kind = type(model.student).__name__
    print(f"tnkd compare: {len(runs)} runs as one batched model ({kind})", flush=True)
    trainer = make_trainer(f"batched x{len(runs)}" if progress else None)
    trainer.fit(model, datamodule=data)
    if evaluate == "val":
        trainer.validate(model, datamodule=data, verbose=False)
    else:
        trainer.test(model, datamodule=data, verbose=False)
    stage = "val" if evaluate == "val" else "test"
    metrics = [
        {"test/" + key.split("/", 1)[1]: value for key, value in row.items()}
        for row in model.member_metrics(stage)
    ]
    for k, member in enumerate(members):
        member.student = model.student.member(k)
        member.fit_seconds = float(model.fit_seconds or 0.0) / len(runs)
    failures = [model.failed.get(k) for k in range(len(runs))]
    if logger == "wandb":
        write_wandb_runs(model, members, runs, trainer, data, metrics, **wandb_args)
    return list(zip(members, metrics, failures, strict=True))


def write_wandb_runs(
    model: BatchedDistillation,
    members: Sequence[DistillationModule],
    runs: Sequence[tuple[int, Any]],
    trainer: L.Trainer,
    data: Any,
    metrics: Sequence[dict[str, float]],
    project: str,
    group: str | None,
    save_dir: str,
) -> None:
    """One offline W&B run per member, through Lightning's ``WandbLogger``, as its separate run.

    Config (:func:`~tnkd.training.run_config.run_config` of the member's module), tags (the
    variant's name, ``student`` and the divergence or ``labels-only``), the per-epoch history
    of training and validation means, the test metrics, the confusion matrix and diagram images,
    and the summary values of the results row (``fit_seconds`` is the member's share).
    """
    from tnkd.experiments.wandb_runs import finish_run, make_logger
    from tnkd.training.media import confusion_figure, diagram_figure, log_figure
    from tnkd.training.modules import SUMMARY_SIZES, add_tags, set_summary
    from tnkd.training.run_config import run_config

    names = getattr(data, "class_names", ())
    diagram = diagram_figure(members[0].student)
    saved_seed = os.environ.get("PL_GLOBAL_SEED")
    try:
        for k, ((seed, variant), member) in enumerate(zip(runs, members, strict=True)):
            os.environ["PL_GLOBAL_SEED"] = str(seed)
            config = run_config(member, data, trainer) | {"batched_members": len(runs)}
            name = f"{variant.name} seed {seed}"
            logger = make_logger("wandb", save_dir, project, name, group, tags=[variant.name])
            finish_run(logger)  # a run left open would be taken over by the logger
            try:
                logger.log_hyperparams(config)
                divergence = config.get("divergence")
                add_tags(logger, ["student", "labels-only" if divergence == "none" else divergence])
                if diagram is not None:
                    logger.log_image(key="student/diagram", images=[diagram])
                # the x axis of Lightning's W&B charts: the step at each epoch's end, as logged live
                steps, epochs = trainer.global_step, max(len(model.history["train"]), 1)
                for epoch, row in _history(model, k):
                    logger.log_metrics({**row, "epoch": epoch}, step=steps * (epoch + 1) // epochs)
                logger.log_metrics(dict(metrics[k]), step=steps)
                if model.test_confusion is not None:
                    figure = confusion_figure(model.test_confusion[k], names)
                    log_figure(logger, "test/confusion_matrix", figure)
                sizes = member.size_summary()
                summary = {key: sizes[key] for key in SUMMARY_SIZES if key in sizes}
                set_summary(logger, summary | metrics[k] | {"fit_seconds": member.fit_seconds})
            finally:
                finish_run(logger, failed=k in model.failed)
    finally:
        if saved_seed is None:
            os.environ.pop("PL_GLOBAL_SEED", None)
        else:
            os.environ["PL_GLOBAL_SEED"] = saved_seed
        if diagram is not None:
            import matplotlib.pyplot as plt

            plt.close(diagram)


def _history(model: BatchedDistillation, k: int) -> list[tuple[int, dict[str, float]]]:
    """Member k's per-epoch training and validation means, one row per epoch."""
    epochs: dict[int, dict[str, float]] = {}
    for stage in ("train", "val"):
        for epoch, values in model.history[stage]:
            epochs.setdefault(epoch, {}).update(values[k])
    return sorted(epochs.items())
