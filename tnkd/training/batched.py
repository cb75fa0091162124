"""A grid of distillation runs trained as one model: one process, one loop, M members.

Runs of one student shape that differ only in seed, divergence, temperature and beta are M
independent optimisations. :class:`BatchedDistillation` takes the M
:class:`~tnkd.training.modules.DistillationModule` objects of those runs (each built as its
separate run builds it: ``seed_everything(seed)``, then the student) and trains them together:

* the students become one model with a leading member index on every parameter
  (:func:`~tnkd.students.batched.batch_students`): ``(M, B, C)`` logits per batch;
* the teacher runs once per batch (or its cached logits are read once) for all members;
* member k's loss is its run's loss, ``(1 - beta_k) CE + beta_k scale(T_k) D_k(P_T || Q_T)``
  (masked CE on transfer sets), computed by its module's
  :meth:`~tnkd.training.modules.DistillationModule.loss_terms` for all the members that share
  divergence, T and beta at once; the sum over members is backpropagated: member k's
  parameters get exactly member k's gradient;
* one AdamW over the stacked parameters is M separate AdamW's (its update is elementwise) and
  the cosine schedule is shared, so member k follows its separate run's trajectory: same
  initialisation, same batches (the batch order is the data module's, the same for every run),
  same updates, up to floating-point rounding.

What a separate run would have logged is recorded per member (:attr:`history`: per stage and
epoch, the epoch means of loss, CE, divergence, student and teacher accuracy and calibration,
agreement) with the separate run's metrics for M members at once
(:class:`~tnkd.training.metrics.ClassifierStats` and :class:`~tnkd.training.metrics.BatchMean`);
:mod:`tnkd.experiments` writes one W&B run and one results row per member from it.

A member whose logits or loss become NaN or infinite is frozen at that step (its parameters
kept as they were, its loss and gradients zero from then on) and recorded in :attr:`failed`
(a :class:`~tnkd.training.modules.Diverged` naming the epoch and step); the other members
train on, and :mod:`tnkd.experiments` reports the frozen one as a failed run.

Refused with a one-line ``ValueError``: members whose runs would differ in anything but seed,
divergence, temperature and beta (student arguments or shapes, lr, weight decay, scheduler,
teacher cache); a transfer set whose members mix labels-only and distilled runs (they go over
different training samples); several different teachers with a teacher cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from tnkd.students.batched import MemberList, batch_students
from tnkd.training.metrics import BatchMean, ClassifierStats
from tnkd.training.modules import (
    TERMS,
    DistillationModule,
    Diverged,
    _configure,
    _RunModule,
    diverged,
)
from tnkd.training.teacher_cache import module_digest

STAGES = ("train", "val", "test")
#: whose accuracy and calibration each member records
MODELS = ("student", "teacher")


def check_batchable(members: Sequence[DistillationModule]) -> None:
    """Raise a one-line ``ValueError`` unless the runs can share one optimiser and loop.

    They may differ in seed (the students' initialisation), divergence, temperature and beta;
    lr, weight decay, scheduler and teacher cache must be equal (the schedule and the data are
    shared). Student shapes are checked by :func:`~tnkd.students.batched.batch_students`.
    """
    if not members:
        raise ValueError("a batched grid needs at least one run, but got none")
    first = members[0]
    for k, other in enumerate(members[1:], start=1):
        for key in ("lr", "weight_decay", "scheduler", "teacher_cache"):
            a, b = first.hparams.get(key), other.hparams.get(key)
            if a != b:
                raise ValueError(
                    f"batched runs must share {key} (one optimiser and schedule), but run 0 has "
                    f"{a!r} and run {k} {b!r}; train them in separate batches"
                )


def _grouped(members: Sequence[DistillationModule], teacher_of: Sequence[int | None]) -> list:
    """Indices of the members whose loss terms are one call: one divergence, T, beta, teacher."""
    groups: dict[tuple, list[int]] = {}
    for k, m in enumerate(members):
        distilled = m.beta > 0 and teacher_of[k] is not None
        div = (type(m.divergence).__name__, repr(m.divergence), m.temperature, m.beta)
        groups.setdefault((*div, teacher_of[k]) if distilled else (), []).append(k)
    return list(groups.values())


class BatchedDistillation(_RunModule):
    """M distillation runs of one student shape as one LightningModule.

    Its step methods, epoch hooks and fit time are those of the other LightningModules of
    :mod:`tnkd.training.modules`; its loss terms are each member's own, its metrics per member.

    Args:
        members: the runs, as separate :class:`~tnkd.training.modules.DistillationModule`
            objects (they give the students, teachers, divergences, temperatures, betas and the
            optimiser settings; their students are copied into one batched model).
        kind: how the students are batched: ``"auto"``, ``"batched"`` or ``"list"`` (see
            :func:`~tnkd.students.batched.batch_students`).

    Attributes:
        history: ``history[stage]`` is a list of ``(epoch, values)`` with ``values[k]`` member
            k's epoch means (keys as a separate run logs them, e.g. ``val/student_acc``).
        test_confusion: ``(M, C, C)`` test confusion matrices (true x predicted).
        fit_seconds: wall time of ``fit``.
        failed: the frozen members: index -> :class:`~tnkd.training.modules.Diverged`.

    Example:
        >>> from tnkd.students import MPSClassifier
        >>> from tnkd.teachers import MLP
        >>> teacher = MLP(64, 10)
        >>> runs = [DistillationModule(MPSClassifier(64, 10, bond_dim=4), teacher=teacher,
        ...                            beta=b) for b in (0.0, 0.9)]
        >>> model = BatchedDistillation(runs)
        >>> model(torch.rand(3, 64)).shape
        torch.Size([2, 3, 10])
    """

    def __init__(self, members: Sequence[DistillationModule], kind: str = "auto") -> None:
        super().__init__()
        members = list(members)
        check_batchable(members)
        self.student = batch_students([m.student for m in members], kind)
        self.__dict__["members"] = members  # not submodules: their students are copied above
        self.num_members = len(members)
        self.num_classes = int(self.student.num_classes)
        self.lr = members[0].lr
        self.scheduler = members[0].scheduler
        self.weight_decay = float(members[0].hparams.get("weight_decay", 0.0))
        # distinct teachers (an ensemble is one per temperature); member k uses teacher_of[k]
        teachers: list[nn.Module] = []
        digests: list[str] = []
        self.teacher_of: list[int | None] = []
        for m in members:
            if m.teacher is None:
                self.teacher_of.append(None)
                continue
            digest = module_digest(m.teacher)  # copies of one teacher (or ensemble at one T): one
            if digest not in digests:
                teachers.append(m.teacher)
                digests.append(digest)
            self.teacher_of.append(digests.index(digest))
        if len(teachers) > 1 and members[0].hparams.get("teacher_cache"):
            raise ValueError(
                f"a batched grid with a teacher cache needs one teacher, but its runs have "
                f"{len(teachers)} (an ensemble at several temperatures, or copies): give the runs "
                "one teacher object, or use no teacher_cache"
            )
        self.teachers = nn.ModuleList(teachers)
        for t in teachers:
            t.eval()
            t.requires_grad_(False)
        self.groups = _grouped(members, self.teacher_of)
        self.history: dict[str, list[tuple[int, list[dict[str, float]]]]] = {s: [] for s in STAGES}
        # per stage: the epoch means of the loss terms, the students' and the teachers' stats
        m, c = self.num_members, self.num_classes
        self.stats = nn.ModuleDict(
            {f"{stage}_{term}": BatchMean(m) for stage in STAGES for term in TERMS}
            | {f"{stage}_{who}": ClassifierStats(c, m) for stage in STAGES for who in MODELS}
        )
        self.confusion = nn.ModuleList(MulticlassConfusionMatrix(c) for _ in range(m))
        self.test_confusion: torch.Tensor | None = None
        self._indices: dict[tuple, torch.Tensor] = {}
        self.failed: dict[int, Diverged] = {}
        self._frozen_values: dict[int, list[torch.Tensor]] = {}
        self.register_buffer(
            "frozen", torch.zeros(self.num_members, dtype=torch.bool), persistent=False
        )

    # ---- Lightning hooks ----------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The members' logits, (M, batch, C)."""
        return self.student(x)

    def train(self, mode: bool = True) -> BatchedDistillation:
        """Switch the students' mode; the teachers stay in eval mode."""
        super().train(mode)
        for t in self.teachers:
            t.eval()
        return self

    def setup(self, stage: str) -> None:  # noqa: D102
        dm = self.trainer.datamodule if self._trainer is not None else None
        for m in self.members:
            m.check_data(dm)
        distilled = [m.beta > 0 for m in self.members]
        if getattr(dm, "is_transfer_set", False) and len(set(distilled)) > 1:
            raise ValueError(
                "a batched grid on a transfer set cannot mix labels-only runs (trained on the "
                "labeled images alone) with distilled ones (on all images): batch them separately"
            )
        if hasattr(dm, "use_unlabeled"):
            dm.use_unlabeled(any(distilled))
        # the cached logits of the one teacher: a distilled member attaches them for all
        owner = next((m for m in self.members if m.beta > 0), self.members[0])
        owner.attach_cached_logits(dm, stage)

    def on_train_start(self) -> None:  # noqa: D102
        self.train()

    def configure_optimizers(self) -> Any:  # noqa: D102
        return _configure(
            self, self.student.parameters(), self.lr, self.weight_decay, self.scheduler
        )

    def on_train_epoch_end(self) -> None:  # noqa: D102
        self._close("train")

    def on_validation_epoch_end(self) -> None:  # noqa: D102
        if not self.trainer.sanity_checking:
            self._close("val")

    def on_test_epoch_end(self) -> None:  # noqa: D102
        self._close("test")

    # ---- the step -----------------------------------------------------------------------------

    def teacher_logits(
        self, x: torch.Tensor, cached: list, stage: str
    ) -> list[torch.Tensor | None]:
        """Each distinct teacher's float logits for the batch (cached ones when the batch has them).

        Labels-only members need no teacher on training batches: a teacher whose members all
        have beta = 0 is not run there (``None``).
        """
        out: list[torch.Tensor | None] = []
        for i, teacher in enumerate(self.teachers):
            users = [k for k, t in enumerate(self.teacher_of) if t == i]
            if stage == "train" and all(self.members[k].beta == 0 for k in users):
                out.append(None)
            elif cached and len(self.teachers) == 1:
                out.append(cached[0].float())
            else:
                with torch.no_grad():
                    out.append(teacher(x).float())
        return out

    def loss_terms(
        self, z: torch.Tensor, teachers: list[torch.Tensor | None], y: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-member ``ce``, ``kd`` (unscaled divergence, NaN for labels-only) and ``loss``, (M,).

        Each member's :meth:`DistillationModule.loss_terms`, called once for all the members
        with one divergence, temperature, beta and teacher.
        """
        m = z.shape[0]
        out = {"ce": z.new_zeros(m), "kd": z.new_full((m,), float("nan")), "loss": z.new_zeros(m)}
        for idx in self.groups:
            teacher = self.teacher_of[idx[0]]
            v = None if teacher is None else teachers[teacher]
            sel = self._index(idx, z.device)
            terms = self.members[idx[0]].loss_terms(z.index_select(0, sel), v, y)
            for name, value in terms.items():
                out[name] = out[name].index_put((sel,), value.to(out[name].dtype))
        return out

    def _index(self, idx: list[int], device: torch.device) -> torch.Tensor:
        """``idx`` as a long tensor on ``device``, made once (no host-to-device copy per step)."""
        key = (tuple(idx), str(device))
        if key not in self._indices:
            self._indices[key] = torch.tensor(idx, device=device)
        return self._indices[key]

    # ---- diverged members --------------------------------------------------------------------

    def _member_tensors(self, k: int, grads: bool = False) -> list[torch.Tensor]:
        """Member k's parameters (or their gradients) as views into the batched model's tensors."""
        if isinstance(self.student, MemberList):
            params = list(self.student.members[k].parameters())
            tensors = [p.grad if grads else p.data for p in params]
            return [t for t in tensors if t is not None]
        out = []
        for p in self.student.parameters():
            t = p.grad if grads else p.data
            if t is not None and t.shape[:1] == (self.num_members,):
                out.append(t[k])
        return out

    def _guard(self, values: torch.Tensor, what: str, stage: str) -> torch.Tensor:
        """Freeze the members whose ``values`` (leading member index) are not all finite.

        Returns ``values`` with every frozen member's entries replaced by zeros, so that a
        frozen member neither stops the step (the divergences refuse NaN logits) nor adds
        NaN to the others' metrics.
        """
        bad = ~torch.isfinite(values.detach()).reshape(self.num_members, -1).all(1)
        if bool(bad.any()):
            for k in bad.nonzero().flatten().tolist():
                if k not in self.failed:
                    self.failed[k] = diverged(self, what, stage)
                    self._frozen_values[k] = [t.clone() for t in self._member_tensors(k)]
                    self.frozen[k] = True
        if not self.failed:
            return values
        mask = self.frozen.view(-1, *([1] * (values.ndim - 1)))
        return torch.where(mask, torch.zeros_like(values), values)

    def on_before_optimizer_step(self, optimizer: Any) -> None:  # noqa: D102
        for k in self.failed:  # a frozen member's NaN gradients never reach the optimiser
            for g in self._member_tensors(k, grads=True):
                g.zero_()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:  # noqa: D102
        with torch.no_grad():  # Adam's momentum and weight decay would still move it
            for k, saved in self._frozen_values.items():
                for t, value in zip(self._member_tensors(k), saved, strict=True):
                    t.copy_(value)

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y, *cached = batch
        z = self._guard(self.student(x), "logits", stage)
        teachers = self.teacher_logits(x, cached, stage)
        terms = self.loss_terms(z, teachers, y)
        before = len(self.failed)
        loss = self._guard(terms["loss"], "loss", stage)
        if len(self.failed) > before:  # a member whose loss alone went non-finite
            z = self._guard(z, "loss", stage)
        terms = {**terms, "loss": loss}
        self._accumulate(stage, z.detach(), teachers, y, terms)
        if stage == "train":  # the members' mean, for progress lines (``tnkd compare --progress``)
            self.log("train/loss", terms["loss"].detach().mean(), on_step=False, on_epoch=True)
        return terms["loss"].sum()

    # ---- per-member metrics as sums -----------------------------------------------------------

    def _accumulate(
        self,
        stage: str,
        z: torch.Tensor,
        teachers: list[torch.Tensor | None],
        y: torch.Tensor,
        terms: dict[str, torch.Tensor],
    ) -> None:
        """Add the batch to the stage's epoch sums (no sync until the epoch's end)."""
        n, labeled = len(y), (y >= 0).sum()
        stats = self.stats
        stats[f"{stage}_loss"].add(terms["loss"].detach(), n)
        stats[f"{stage}_ce"].add(terms["ce"].detach(), labeled)  # a mean over the labeled
        stats[f"{stage}_kd"].add(torch.nan_to_num(terms["kd"].detach()), n)
        rows = [None if t is None else teachers[t] for t in self.teacher_of]
        reference = None
        if any(r is not None for r in rows):
            fill = next(r for r in rows if r is not None)  # members without one: dropped later
            rows = [fill if r is None else r for r in rows]
            stats[f"{stage}_teacher"].add(rows, y)
            classes = {id(r): r.argmax(-1) for r in rows}
            reference = torch.stack([classes[id(r)] for r in rows])
        stats[f"{stage}_student"].add(z, y, reference)
        if stage == "test":
            for k, confusion in enumerate(self.confusion):
                confusion.update(z[k], y)

    def _new_epoch(self, stage: str) -> None:
        """Start the stage's epoch sums afresh."""
        for name in (*TERMS, *MODELS):
            self.stats[f"{stage}_{name}"].reset()
        if stage == "test":
            self.test_confusion = None
            for confusion in self.confusion:
                confusion.reset()

    def _rates(self, stage: str, who: str) -> dict[str, list[float]]:
        """Per member the epoch's accuracy, calibration error and agreement ({} if no update)."""
        stats = self.stats[f"{stage}_{who}"]
        if not stats.update_called:
            return {}
        return {key: value.reshape(-1).tolist() for key, value in stats.compute().items()}

    def _close(self, stage: str) -> None:
        """Turn the stage's sums into per-member epoch means and append them to :attr:`history`."""
        if not self.stats[f"{stage}_loss"].update_called:
            return
        means = {t: self.stats[f"{stage}_{t}"].compute().reshape(-1).tolist() for t in TERMS}
        student, teacher = (self._rates(stage, who) for who in MODELS)
        if stage == "test":
            self.test_confusion = torch.stack([c.compute() for c in self.confusion])
        values: list[dict[str, float]] = []
        for k, member in enumerate(self.members):
            row = {f"{stage}/{t}": means[t][k] for t in ("loss", "ce")}
            row |= {f"{stage}/student_{key}": student[key][k] for key in ("acc", "ece")}
            if member.beta > 0 and teacher:
                row[f"{stage}/kd"] = means["kd"][k]
            if teacher and self.teacher_of[k] is not None and (stage != "train" or member.beta > 0):
                row |= {f"{stage}/teacher_{key}": teacher[key][k] for key in ("acc", "ece")}
                row[f"{stage}/agreement"] = student["agreement"][k]
            values.append(row)
        self.history[stage].append((int(self.current_epoch), values))
        for k in self.failed:  # a frozen member has no figures of its own
            values[k] = {key: float("nan") for key in values[k]}
        if stage == "val":  # the members' mean, for progress lines
            alive = [v["val/student_acc"] for k, v in enumerate(values) if k not in self.failed]
            if alive:
                self.log("val/student_acc", sum(alive) / len(alive))

    def member_metrics(self, stage: str = "test") -> list[dict[str, float]]:
        """Each member's last epoch means of ``stage`` (the test metrics after ``trainer.test``)."""
        if not self.history[stage]:
            raise ValueError(f"no {stage} epoch has run yet on this batched model")
        return self.history[stage][-1][1]

    def member_students(self) -> list[nn.Module]:
        """The trained members as ordinary students (parameters copied)."""
        return [self.student.member(k) for k in range(self.num_members)]
