"""The LightningModules: a teacher trained on labels, and distillation into a student.

Distillation loss (Hinton et al. 2015), with P = softmax(v / T) of the frozen teacher's logits v
and Q = softmax(z / T) of the student's logits z::

    loss = (1 - beta) * CE(z, labels) + beta * scale(T) * D(P || Q)

``D`` is any divergence of :mod:`tnkd.divergences`, chosen by name in YAML; its ``scale`` is
T^2 for KL and T^2 / alpha for Renyi, so that gradients keep their size as T changes.

On a transfer set (unlabeled samples have the label -1, see :mod:`tnkd.data.transfer`) a batch
B with labeled part L gives::

    loss = (1 - beta) * mean_{i in L} CE(z_i, y_i) + beta * mean_{i in B} scale(T) * D(P_i || Q_i)

so a labeled sample carries (1 - beta) CE + beta scale D and an unlabeled one beta scale D, the
CE term averaged over the labeled samples of the batch (0 when it has none) and the
distillation term over all of them; with every sample labeled this is the formula above.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.metric import CompositionalMetric

from tnkd.data.mixup import mixup as mix_batch
from tnkd.divergences import Divergence, build_divergence
from tnkd.students.base import count_parameters
from tnkd.teachers import save_teacher
from tnkd.training.media import confusion_figure, diagram_figure, log_figure
from tnkd.training.metrics import BatchMean, ClassifierStats
from tnkd.training.teacher_source import TeacherSource

STAGES = ("train", "val", "test")
SCHEDULERS = ("cosine", "none")
#: splits whose teacher logits ``teacher_cache`` precomputes, per Lightning stage
CACHED_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


def _check_positive(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (value > 0 and math.isfinite(value))
    ):
        raise ValueError(f"{name} must be a finite number > 0, but got {value!r}")
    return float(value)


def _check_scheduler(value: str) -> str:
    if value not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, but got {value!r}")
    return value


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the samples with a label (>= 0); 0 if there is none.

    Unlabeled samples (label -1, a transfer set's) are left out of the mean instead of counting
    as zeros, so the CE term has the same size whatever the share of labeled samples.
    ``(M, B, C)`` logits of M members give their M means.
    """
    labeled = labels >= 0
    if logits.ndim > 2:
        targets = labels.clamp_min(0).repeat(len(logits))
        each = F.cross_entropy(logits.flatten(0, -2), targets, reduction="none")
        return (each.view(logits.shape[:-1]) * labeled).sum(-1) / labeled.sum().clamp_min(1)
    if bool(labeled.all()):
        return F.cross_entropy(logits, labels)
    if not bool(labeled.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labeled], labels[labeled])


def distillation_terms(
    divergence: Divergence,
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    temperature: float,
    extra: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``divergence.loss`` (``scale(T) D``) and ``D`` (no gradient, for the logs): batch means.

    ``(M, B, C)`` student logits of M members give ``(M,)`` means. Both terms come from one
    :meth:`~tnkd.divergences.Divergence.ratios` unless the divergence defines its own loss (DKD).
    """
    cls = type(divergence)
    if cls.loss is Divergence.loss and cls.forward is Divergence.forward:
        teacher_logits = teacher_logits.expand_as(student_logits)
        ratios = divergence.ratios(teacher_logits, student_logits, temperature)
        distill = divergence.scaled_per_sample(ratios, temperature).mean(-1)
        with torch.no_grad():
            return distill, divergence.per_sample(ratios).mean(-1)
    if student_logits.ndim > 2:
        pairs = [
            distillation_terms(divergence, teacher_logits, z, temperature, extra)
            for z in student_logits
        ]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    distill = divergence.loss(teacher_logits, student_logits, temperature, **extra)
    with torch.no_grad():
        return distill, divergence(teacher_logits, student_logits.detach(), temperature, **extra)


#: how a message names each stage
STAGE_NAMES = {"train": "training", "val": "validation", "test": "testing"}


class Diverged(ValueError):
    """The student's logits or loss became NaN or infinite: the run cannot go on.

    Raised by :class:`DistillationModule` at the step where it happens, with the epoch (counted
    from 1) and the optimizer step; ``tnkd compare`` records the run as failed and goes on with
    the others, ``tnkd fit`` ends with this one line.
    """

    def __init__(self, what: str, stage: str, epoch: int, step: int) -> None:
        self.what, self.stage, self.epoch, self.step = what, stage, epoch, step
        where = STAGE_NAMES.get(stage, stage)
        super().__init__(
            f"the run diverged: the student's {what} became NaN or infinite in epoch {epoch} "
            f"({where}, step {step}); lower the learning rate (--lr) or the temperature, or "
            "try another seed"
        )

    @property
    def short(self) -> str:
        """``student logits non-finite in epoch 2 (training, step 130)``, for a table's note."""
        where = STAGE_NAMES.get(self.stage, self.stage)
        return f"student {self.what} non-finite in epoch {self.epoch} ({where}, step {self.step})"


def diverged(module: L.LightningModule, what: str, stage: str) -> Diverged:
    """A :class:`Diverged` for ``module``'s current epoch and step."""
    trainer = module._trainer
    epoch = int(trainer.current_epoch) + 1 if trainer is not None else 0
    step = int(trainer.global_step) if trainer is not None else 0
    return Diverged(what, stage, epoch, step)


class _Pick:
    """``values[key][index]`` of a metric's compute (named for ``CompositionalMetric``)."""

    def __init__(self, key: str | None, index: int | None) -> None:
        self.key, self.index = key, index
        self.__name__ = f"{key}[{index}]"

    def __call__(self, values: Any, _: Any = None) -> torch.Tensor:
        value = values if self.key is None else values[self.key]
        return value if self.index is None else value[self.index]


class StatValue(CompositionalMetric):
    """One number of a metric's compute (``values[key][index]``) as a metric for ``self.log``.

    ``self.log`` takes one scalar metric per name. The view keeps no state: its compute is the
    metric's compute (cached until its next update, synced across processes), and resetting it
    resets the metric, as torchmetrics' arithmetic of metrics does.
    """

    def __init__(self, metric: Any, key: str | None = None, index: int | None = None) -> None:
        super().__init__(_Pick(key, index), metric, None)


#: the loss terms a run logs, in the order of its :class:`BatchMean` of terms
TERMS = ("loss", "ce", "kd")


def _stage_stats(num_classes: int, models: tuple[str, ...]) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    """Per stage the epoch sums and the views that ``self.log`` takes (:meth:`_RunModule._record`).

    Sums: ``{stage}_terms`` (the :data:`TERMS` means) and ``{stage}_models{k}`` (accuracy,
    calibration and agreement of the first k ``models``; a labels-only run's training batches
    have the student alone). Views: ``{stage}_{term}`` and ``{stage}_{k}_{model}_{key}``.
    """
    stats: dict[str, Any] = {}
    views: dict[str, Any] = {}
    for stage in STAGES:
        terms = stats[f"{stage}_terms"] = BatchMean(len(TERMS))
        for i, term in enumerate(TERMS):
            views[f"{stage}_{term}"] = StatValue(terms, index=i)
        for k in range(1, len(models) + 1):
            sums = stats[f"{stage}_models{k}"] = ClassifierStats(num_classes, members=k)
            for i, model in enumerate(models[:k]):
                for key in ("acc", "ece", "agreement"):
                    views[f"{stage}_{k}_{model}_{key}"] = StatValue(sums, key, i if k > 1 else None)
    return nn.ModuleDict(stats), nn.ModuleDict(views)


def _configure(
    module: L.LightningModule, params: Any, lr: float, weight_decay: float, scheduler: str
) -> Any:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if (
        scheduler == "none"
        or module.trainer is None
        or not module.trainer.max_epochs
        or module.trainer.max_epochs < 1
    ):
        return optimizer
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=module.trainer.max_epochs)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "epoch"}}


def log_run_config(module: L.LightningModule) -> None:
    """Log :func:`~tnkd.training.run_config.run_config` as the run's config, tag W&B runs.

    The tags say the role and, for students, the divergence (``labels-only`` for beta = 0),
    so that W&B can filter runs by them as well as by the config keys.
    """
    logger = module.logger
    if logger is None or not module.trainer.is_global_zero:
        return
    from tnkd.training.run_config import run_config

    trainer = module.trainer
    config = run_config(module, getattr(trainer, "datamodule", None), trainer)
    logger.log_hyperparams(config)
    tags = [config.get("role", "")]
    if config.get("role") == "student":
        tags.append("labels-only" if config.get("divergence") == "none" else config["divergence"])
    add_tags(logger, [t for t in tags if t])
    set_summary(logger, {k: config[k] for k in SUMMARY_SIZES if k in config})


#: size keys copied into the run's summary (W&B table columns)
SUMMARY_SIZES = ("student_params", "teacher_params", "compression_ratio")


def add_tags(logger: Any, tags: list[str]) -> None:
    """Add tags to a W&B run (no-op for other loggers)."""
    run = _wandb_run(logger)
    if run is not None:
        run.tags = tuple(dict.fromkeys([*(run.tags or ()), *tags]))


def set_summary(logger: Any, values: dict[str, Any]) -> None:
    """Put values in a W&B run's summary (no-op for other loggers)."""
    run = _wandb_run(logger)
    if run is not None:
        run.summary.update(values)


def _wandb_run(logger: Any) -> Any:
    """The W&B run behind a logger (on the rank that logs; ``None`` elsewhere)."""
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.loggers.logger import DummyExperiment

    if isinstance(logger, WandbLogger):
        run = logger.experiment
        return None if isinstance(run, DummyExperiment) else run
    return None


def check_checkpoint_shapes(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Compare a checkpoint's tensors with ``module``'s; a clear one-line error on a mismatch."""
    saved = checkpoint.get("state_dict", {})
    own = module.state_dict()
    for name, value in saved.items():
        if name in own and tuple(own[name].shape) != tuple(value.shape):
            raise ValueError(
                f"the checkpoint was saved from another model shape: {name} is "
                f"{tuple(value.shape)} there but {tuple(own[name].shape)} here; configure the "
                "model as the run that saved it (its config.yaml, or the checkpoint's "
                "hyper_parameters)"
            )


def _check_data(module: L.LightningModule, model: nn.Module, role: str) -> None:
    """Compare a model with the data module the trainer holds (see :func:`check_model_data`)."""
    dm = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    check_model_data(model, dm, role)


def check_model_data(model: nn.Module, dm: Any, role: str) -> None:
    """Compare a model's class count and input size with the data module's; clear errors."""
    if dm is None or not getattr(dm, "num_classes", 0):
        return
    classes = getattr(model, "num_classes", None)
    if classes is not None and classes != dm.num_classes:
        raise ValueError(
            f"the {role} has {classes} classes but the data ({type(dm).__name__}) has {dm.num_classes}; "
            f"set the {role}'s num_classes to {dm.num_classes}"
        )
    inputs = getattr(model, "num_inputs", None)
    if inputs is not None and inputs != dm.num_features:
        raise ValueError(
            f"the {role} expects {inputs} inputs per sample but the data ({type(dm).__name__}) has "
            f"{dm.num_features} (= {' x '.join(map(str, dm.input_shape))}); set the {role}'s input size "
            f"to {dm.num_features}"
        )


class _RunModule(L.LightningModule):
    """What both LightningModules share: the step methods, the run's config and its fit time.

    Subclasses implement ``_shared_step(batch, stage)``. At the start of fitting (or of testing
    a module that was not fitted in this process) the run's structured config is logged
    (:func:`log_run_config`); at the end of fitting ``fit_seconds`` is kept and put in the
    run's summary.
    """

    fit_seconds: float | None = None
    #: plain attributes Lightning sets around every hook call (about 40 times a training step)
    _PLAIN = frozenset({"_current_fx_name"})
    #: per stage the sums of the epoch's metrics and their views (:func:`_stage_stats`)
    stats: nn.ModuleDict
    stat_views: nn.ModuleDict

    def __setattr__(self, name: str, value: Any) -> None:
        # a str attribute never goes into nn.Module's parameter, buffer or module tables: skip
        # their lookups (nn.Module.__setattr__ costs ~100 us a step at these call counts)
        if name in self._PLAIN:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Describe the module's networks in the checkpoint (:mod:`tnkd.training.checkpoints`)."""
        from tnkd.training.checkpoints import KEY, describe_module

        checkpoint[KEY] = describe_module(self)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """The trained module of a checkpoint; its networks rebuilt from the checkpoint itself.

        Lightning's signature: ``kwargs`` replace saved hyperparameters (``student=...`` for a
        checkpoint written before tnkd described its networks). No teacher file is read: the
        teacher's architecture is rebuilt and its weights come with the checkpoint.
        """
        from tnkd.training.checkpoints import module_arguments, read_checkpoint

        if hparams_file is not None:
            return super().load_from_checkpoint(
                checkpoint_path, map_location, hparams_file, strict, **kwargs
            )
        checkpoint = read_checkpoint(checkpoint_path, map_location or "cpu")
        module = cls(**module_arguments(cls, checkpoint, checkpoint_path, kwargs))
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"], strict=True if strict is None else strict)
        return module.eval()


    def _record(
        self,
        stage: str,
        terms: dict[str, tuple[torch.Tensor, Any]],
        models: dict[str, torch.Tensor],
        labels: torch.Tensor,
        agreement: bool = False,
    ) -> None:
        """Add a batch to the stage's epoch sums; hand them to ``self.log`` once per epoch.

        ``terms`` maps some of :data:`TERMS` to the batch's value and weight (samples);
        ``models`` model names (``student``, ``teacher``) to their logits, whose accuracy and
        calibration error over the labeled samples are logged as ``{stage}/{model}_acc`` and
        ``{stage}/{model}_ece``; with ``agreement`` the first model's agreement with the
        second's predictions is ``{stage}/agreement``.

        Lightning keeps a reference to a logged metric object, computes it over all of the
        epoch's updates at the epoch's end (synced across processes), logs it and resets it: one
        ``self.log`` per epoch logs what one per step did, without the per-step bookkeeping that
        cost about as much as a small student's step (``benchmarks/end_to_end.py``). Training
        also logs ``train/loss_step`` on the steps whose values go to the logger
        (``log_every_n_steps``), and to the progress bar.
        """
        loss = terms["loss"][0].detach()
        # a term the run does not have (kd without a teacher) is a 0 of weight 0
        values = tuple(terms[t][0].detach() if t in terms else loss * 0 for t in TERMS)
        self.stats[f"{stage}_terms"].add(
            values, tuple(terms[t][1] if t in terms else 0 for t in TERMS)
        )
        names = list(models)
        k = len(names)
        # the agreement: the first model's predictions against the second's (at the fold)
        self.stats[f"{stage}_models{k}"].add(
            [z.detach() for z in models.values()], labels, 1 if agreement else None
        )
        logged = self.__dict__.setdefault("_epoch_logged", set())
        if stage not in logged:
            logged.add(stage)
            for name in terms:
                self.log(
                    f"{stage}/{name}",
                    self.stat_views[f"{stage}_{name}"],
                    on_step=False,
                    on_epoch=True,
                    prog_bar=name == "loss" and stage != "test",
                )
            for name in names:
                for key in ("acc", "ece"):
                    self.log(
                        f"{stage}/{name}_{key}",
                        self.stat_views[f"{stage}_{k}_{name}_{key}"],
                        on_step=False,
                        on_epoch=True,
                        prog_bar=stage == "val" and key == "acc",
                    )
            if agreement:
                self.log(
                    f"{stage}/agreement",
                    self.stat_views[f"{stage}_{k}_{names[0]}_agreement"],
                    on_step=False,
                    on_epoch=True,
                )
        if stage == "train" and self._logs_this_step():
            self.log(
                "train/loss_step", terms["loss"][0], on_step=True, on_epoch=False, prog_bar=True
            )

    def _logs_this_step(self) -> bool:
        """Whether Lightning sends this training step's values to the logger."""
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def _new_epoch(self, stage: str) -> None:
        self.__dict__.setdefault("_epoch_logged", set()).discard(stage)

    def on_train_epoch_start(self) -> None:
        self._new_epoch("train")

    def on_validation_epoch_start(self) -> None:
        self._new_epoch("val")

    def on_test_epoch_start(self) -> None:
        self._new_epoch("test")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter()
        log_run_config(self)

    def on_fit_end(self) -> None:
        self.fit_seconds = time.perf_counter() - getattr(self, "_fit_started", time.perf_counter())
        set_summary(self.logger, {"fit_seconds": self.fit_seconds})

    def on_test_start(self) -> None:
        if getattr(self, "_fit_started", None) is None:
            log_run_config(self)


class TeacherModule(_RunModule):
    """Train a teacher network on labels with cross-entropy.

    Args:
        net: the classifier (e.g. :class:`tnkd.teachers.CNN` or :class:`tnkd.teachers.MLP`).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        scheduler: ``"cosine"`` (over ``trainer.max_epochs``) or ``"none"``.
        label_smoothing: cross-entropy label smoothing.
        export_path: where to save the trained teacher file at the end of ``fit`` (the file a
            distillation config names as ``teacher_checkpoint``). An existing file is never
            overwritten: the run stops before training instead.
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: str = "cosine",
        label_smoothing: float = 0.0,
        export_path: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.lr = _check_positive("teacher lr", lr)
        self.scheduler = _check_scheduler(scheduler)
        num_classes = getattr(net, "num_classes", None)
        if num_classes is None:
            raise ValueError(
                f"teacher net {type(net).__name__} must have a `num_classes` attribute"
            )
        self.stats, self.stat_views = _stage_stats(num_classes, ("teacher",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.net(x)

    def setup(self, stage: str) -> None:  # noqa: D102
        _check_data(self, self.net, "teacher")
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if hasattr(dm, "use_unlabeled"):
            dm.use_unlabeled(False)  # a teacher learns from labels: the labeled images alone

    def on_fit_start(self) -> None:  # noqa: D102
        path = self.hparams.export_path
        if path and os.path.exists(path):
            raise FileExistsError(
                f"teacher export_path {path} already exists; delete it or choose another path "
                "(the run stopped before training, nothing was overwritten)"
            )
        super().on_fit_start()

    def on_train_start(self) -> None:  # noqa: D102
        # Lightning keeps each module's mode: a net built or loaded in eval mode would train
        # without dropout and with frozen batch norm
        self.net.train()

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y, *_ = batch
        logits = self.net(x)
        loss = F.cross_entropy(
            logits, y, label_smoothing=self.hparams.label_smoothing, ignore_index=-1
        )
        # the loss is a mean over the labeled samples (ignore_index): weigh it by their number
        self._record(stage, {"loss": (loss, (y >= 0).sum())}, {"teacher": logits}, y)
        return loss

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Class probabilities (``probs``) of a batch; ``tnkd predict`` writes them to a CSV."""
        return {"probs": self.net(batch[0]).float().softmax(-1)}

    def check_data(self, dm: Any) -> None:
        """Check the network's class count and input size against the data module ``dm``."""
        check_model_data(self.net, dm, "teacher")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # noqa: D102
        check_checkpoint_shapes(self, checkpoint)

    def on_fit_end(self) -> None:  # noqa: D102
        super().on_fit_end()
        path = self.hparams.export_path
        if path and self.trainer.is_global_zero:
            self._exported = {k: float(v) for k, v in self.trainer.callback_metrics.items()}
            save_teacher(self.net, path, metrics=self._exported)

    def on_test_end(self) -> None:
        """Add the test metrics to the teacher file this module exported in the same run."""
        path = self.hparams.export_path
        exported = getattr(self, "_exported", None)
        if path and exported is not None and self.trainer.is_global_zero:
            tested = {
                k: float(v)
                for k, v in self.trainer.callback_metrics.items()
                if k.startswith("test/")
            }
            save_teacher(self.net, path, metrics={**exported, **tested}, overwrite=True)

    def configure_optimizers(self) -> Any:  # noqa: D102
        return _configure(
            self, self.parameters(), self.lr, self.hparams.weight_decay, self.scheduler
        )


class DistillationModule(_RunModule):
    """Distil a frozen teacher into a student.

    Args:
        student: the student network (e.g. :class:`tnkd.students.MPSClassifier`).
        teacher: the teacher network. With ``teacher_checkpoint`` it is the architecture the
            weights are loaded into; without, it is used as given (already trained).
        teacher_checkpoint: a teacher file (see :func:`tnkd.teachers.save_teacher`); when
            ``teacher`` is not given the architecture is read from the file.
        divergence: name (``"kl"``, ``"renyi"``...), mapping (``{name: renyi, alpha: 0.5}``) or
            :class:`~tnkd.divergences.Divergence` instance.
        temperature: T > 0, applied to both teacher and student logits.
        beta: weight of the distillation term, in [0, 1]; 0 trains on labels alone.
        lr: AdamW learning rate of the student.
        weight_decay: AdamW weight decay.
        scheduler: ``"cosine"`` or ``"none"``.
        teacher_cache: a folder for the teacher's logits on the training, validation and test
            sets: computed once, reused by every later run with the same teacher and data (see
            :mod:`tnkd.training.teacher_cache`). ``None`` runs the teacher on every batch. With
            augmentation the training logits are cached for fixed views only (``augment:
            {views: K}``); with a fresh view per epoch the teacher runs on every training batch,
            on the augmented view the student sees.
        trust_teacher_file: allow ``teacher_checkpoint`` to be a pickled module
            (``torch.save(model)``), whose loading runs code from the file.
        untrained_teacher: declare that a teacher given as an architecture without
            ``teacher_checkpoint`` is meant to be used untrained; the ``tnkd`` command refuses
            such a teacher otherwise (distilling from a random network is almost always a
            forgotten teacher file).
        mixup: alpha of mixup's ``Beta(alpha, alpha)`` weight (:mod:`tnkd.data.mixup`; e.g.
            0.2 or 1.0); 0 (default) is off. Training batches become mixed images, the CE term
            mixes the two labels, and the teacher runs on every mixed batch (cached training
            logits are those of unmixed images and are not used).
        mixup_seed: seed of the mixup draws (default: the run's seed, ``torch.initial_seed()``).

    Teachers: ``teacher_checkpoint`` may be a tnkd teacher file (architecture included), a
    ``state_dict`` or a Lightning checkpoint (with ``teacher`` as the architecture), or a trusted
    pickled module; see :func:`tnkd.teachers.load_teacher`. A list of files (or ``teacher`` given
    as a list of trained networks) makes a :class:`~tnkd.teachers.TeacherEnsemble`: the target is
    the members' probabilities at temperature T, averaged.

    Transfer sets: with a data module whose training split has unlabeled samples (label -1), the
    loss is the one in the module docs; a labels-only run (``beta = 0``) trains on the labeled
    images alone (:meth:`~tnkd.data.base.ClassificationDataModule.use_unlabeled`).

    Example:
        >>> from tnkd.students import MPSClassifier
        >>> from tnkd.teachers import MLP
        >>> module = DistillationModule(MPSClassifier(64, 10, bond_dim=8), teacher=MLP(64, 10),
        ...                             divergence={"name": "renyi", "alpha": 2.0}, temperature=4.0)
        >>> module.divergence.scale(4.0)
        8.0
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | list[nn.Module] | None = None,
        teacher_checkpoint: str | list[str] | None = None,
        divergence: str | dict | Divergence = "kl",
        temperature: float = 4.0,
        beta: float = 0.9,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        scheduler: str = "cosine",
        teacher_cache: str | None = None,
        trust_teacher_file: bool = False,
        untrained_teacher: bool = False,
        mixup: float = 0.0,
        mixup_seed: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(mixup, bool) or not isinstance(mixup, int | float) or not mixup >= 0:
            raise ValueError(f"mixup must be a number >= 0 (0: off), but got {mixup!r}")
        if mixup_seed is None:
            mixup_seed = torch.initial_seed() & 0xFFFFFFFF  # the run's seed (seed_everything)
        self.save_hyperparameters(ignore=["student", "teacher", "divergence"])
        self.mixup, self.mixup_seed = float(mixup), int(mixup_seed)
        self.temperature = _check_positive("temperature", temperature)
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], but got {beta!r}")
        self.beta = float(beta)
        self.lr = _check_positive("lr", lr)
        self.scheduler = _check_scheduler(scheduler)
        self.divergence = build_divergence(divergence)
        self._divergence_takes_target = all(
            "target" in inspect.signature(f).parameters
            for f in (self.divergence.loss, self.divergence.forward)
        )
        self.hparams["divergence"] = (
            divergence if isinstance(divergence, str | dict) else repr(self.divergence)
        )
        if teacher is None and teacher_checkpoint is None and self.beta > 0:
            raise ValueError(
                "distillation with beta > 0 needs a teacher: give `teacher` (a trained network) or "
                "`teacher_checkpoint` (a teacher file), or set beta: 0 to train on labels alone"
            )
        source = TeacherSource(teacher_checkpoint, teacher, trust_teacher_file)
        teacher = source.load(self.temperature)
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        num_classes = getattr(student, "num_classes", None)
        if num_classes is None:
            raise ValueError(
                f"student {type(student).__name__} must have a `num_classes` attribute"
            )
        teacher_classes = getattr(teacher, "num_classes", num_classes)
        if teacher_classes != num_classes:
            raise ValueError(
                f"the teacher has {teacher_classes} classes but the student has {num_classes}; they must match"
            )
        models = ("student", "teacher") if teacher is not None else ("student",)
        self.stats, self.stat_views = _stage_stats(num_classes, models)
        self.confusion = MulticlassConfusionMatrix(num_classes)
        self.test_confusion: torch.Tensor | None = None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # noqa: D102
        check_checkpoint_shapes(self, checkpoint)

    def train(self, mode: bool = True) -> DistillationModule:
        """Switch the student's mode; the teacher always stays in eval mode (frozen BN/dropout)."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Student logits."""
        return self.student(x)

    def setup(self, stage: str) -> None:  # noqa: D102
        dm = self.trainer.datamodule if self._trainer is not None else None
        self.check_data(dm)
        if hasattr(dm, "use_unlabeled"):
            # a labels-only twin of a transfer-set run trains on the labeled images alone
            dm.use_unlabeled(self.beta > 0)
        self.attach_cached_logits(dm, stage)

    def check_data(self, dm: Any) -> None:
        """Check the student's (and teacher's) class count and input size against ``dm``."""
        check_model_data(self.student, dm, "student")
        if self.teacher is not None:
            check_model_data(self.teacher, dm, "teacher")

    def attach_cached_logits(self, dm: Any, stage: str) -> None:
        """With ``teacher_cache``: load (or compute once) the teacher's logits for the stage's splits.

        Validation too: the live CNN teacher over the validation set made a distilled
        Fashion-MNIST MPS epoch 17.1 s instead of 13.1 s (1 CPU thread). Splits that already
        carry logits are left as they are.
        """
        cache = self.hparams.teacher_cache
        if not cache or self.teacher is None or not hasattr(dm, "attach_teacher_logits"):
            return
        from tnkd.training.teacher_cache import cached_teacher_logits, module_digest

        key = module_digest(self.teacher)
        for split in CACHED_SPLITS.get(stage, ()):
            if split == "train" and (self.beta == 0 or self.mixup > 0):
                continue  # labels only: the teacher is for metrics; mixup: it sees mixed images
            tensors = dm.dataset(split).tensors
            owner = dm.teacher_logits_key(split) if hasattr(dm, "teacher_logits_key") else None
            if not len(tensors[0]) or (len(tensors) >= 3 and owner in (key, None)):
                continue  # empty, or already carries this teacher's logits
            views = (
                dm.cacheable_train_views()
                if split == "train" and hasattr(dm, "cacheable_train_views")
                else 1
            )
            if views == 0:
                continue  # a fresh view per epoch: the teacher runs on every training batch
            if split == "train" and getattr(dm, "augmentation", None) is not None:
                logits = torch.stack(
                    [
                        cached_teacher_logits(self.teacher, dm.train_view(k), cache)
                        for k in range(views)
                    ],
                    dim=1,
                )
            else:
                logits = cached_teacher_logits(self.teacher, tensors[0], cache)
            if hasattr(dm, "teacher_logits_key"):
                dm.attach_teacher_logits(split, logits, key=key)
            else:
                dm.attach_teacher_logits(split, logits)

    def on_train_start(self) -> None:  # noqa: D102
        # Lightning keeps each module's mode: a student copied from an eval-mode teacher (TT-SVD
        # of its layers) would otherwise train without dropout; the teacher stays in eval mode
        self.train()

    def on_fit_start(self) -> None:  # noqa: D102
        super().on_fit_start()
        if (
            self.logger is not None
            and hasattr(self.logger, "log_image")
            and self.trainer.is_global_zero
        ):
            figure = diagram_figure(self.student)
            if figure is not None:
                log_figure(self.logger, "student/diagram", figure)

    def size_summary(self) -> dict[str, float]:
        """Parameter counts and compression ratio (teacher / student parameters)."""
        student = count_parameters(self.student)
        out: dict[str, float] = {"student_params": student}
        if self.teacher is not None:
            teacher = sum(p.numel() for p in self.teacher.parameters())
            out |= {"teacher_params": teacher, "compression_ratio": teacher / student}
        return out

    def loss_terms(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor,
        mix: tuple[torch.Tensor, float] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss and its parts: ``ce``, ``kd`` (the unscaled divergence, for logging) and ``loss``.

        With ``mix = (perm, lam)`` (a mixup batch) the CE term is
        ``lam * CE(z, labels) + (1 - lam) * CE(z, labels[perm])``.

        The distillation term is ``divergence.loss``: ``scale(T) * D`` computed as one quantity,
        which stays accurate where the product is a limit (Renyi near alpha = 0). Samples
        labeled -1 (a transfer set's unlabeled images) get the distillation term only: CE is
        the mean over the labeled samples, 0 when the batch has none (see the module docs).
        ``(M, B, C)`` student logits (M students trained alike) give ``(M,)`` terms.
        """
        ce = masked_cross_entropy(student_logits, labels)
        if mix is not None:
            perm, lam = mix
            ce = lam * ce + (1 - lam) * masked_cross_entropy(student_logits, labels[perm])
        if teacher_logits is None or self.beta == 0:
            return {"ce": ce, "loss": ce}
        # the labels go to divergences that take them (DKD; every built-in accepts and ignores)
        extra = {"target": labels} if self._divergence_takes_target else {}
        distill, kd = distillation_terms(
            self.divergence, teacher_logits, student_logits, self.temperature, extra
        )
        loss = (1 - self.beta) * ce + self.beta * distill
        return {"ce": ce, "kd": kd, "loss": loss}

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y, *cached = batch
        if len(y) == 0:
            raise ValueError(
                f"an empty batch (0 samples) reached the {stage} step: the losses and metrics are "
                "means over samples; make the data module's loaders yield no empty batches"
            )
        mix = None
        if stage == "train" and self.mixup > 0:
            x, perm, lam = mix_batch(x, self.mixup, self.mixup_seed, int(self.global_step))
            mix, cached = (perm, lam), []  # cached logits are of the unmixed images
        student_logits = self.student(x)
        if not bool(torch.isfinite(student_logits).all()):
            raise diverged(self, "logits", stage)
        teacher_logits = (
            cached[0].float()
            if cached and self.teacher is not None and (self.beta > 0 or stage != "train")
            else None
        )
        # a labels-only run (beta = 0) keeps its teacher for the validation and test metrics
        # (agreement, the teacher's accuracy) but never runs it on training batches
        wanted = self.teacher is not None and (self.beta > 0 or stage != "train")
        if wanted and teacher_logits is None:
            with torch.no_grad():
                teacher_logits = self.teacher(x).float()
        terms = self.loss_terms(student_logits, teacher_logits, y, mix)
        if not bool(torch.isfinite(terms["loss"])):
            raise diverged(self, "loss", stage)
        if stage == "test":
            self.confusion.update(student_logits.detach(), y)
        n = len(y)
        # CE is a mean over the labeled samples only: weigh the epoch mean by their number
        weights = {"ce": (y >= 0).sum(), "kd": n, "loss": n}
        logged = {name: (value, weights[name]) for name, value in terms.items()}
        models = {"student": student_logits}
        if teacher_logits is not None:
            models["teacher"] = teacher_logits
        self._record(stage, logged, models, y, agreement=teacher_logits is not None)
        return terms["loss"]

    def on_test_epoch_end(self) -> None:
        """Keep the test confusion matrix (``test_confusion``) and log it as an image."""
        self.test_confusion = self.confusion.compute()  # synced across processes
        self.confusion.reset()
        if self.logger is not None and self.trainer.is_global_zero:
            names = getattr(self.trainer.datamodule, "class_names", ())
            log_figure(
                self.logger, "test/confusion_matrix", confusion_figure(self.test_confusion, names)
            )

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Student probabilities (``probs``) and, with a teacher, the teacher's (``teacher_probs``)."""
        out = {"probs": self.student(batch[0]).float().softmax(-1)}
        if self.teacher is not None:
            out["teacher_probs"] = self.teacher(batch[0]).float().softmax(-1)
        return out

    def configure_optimizers(self) -> Any:  # noqa: D102
        return _configure(
            self, self.student.parameters(), self.lr, self.hparams.weight_decay, self.scheduler
        )
