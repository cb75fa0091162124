"""Epoch metrics from a few fixed-size sums, cheap enough for every step of a small student.

``self.log`` of a tensor on every step walks Lightning's whole result collection, and
``torchmetrics``' calibration error keeps every batch's confidences in a growing list: for a
student whose step takes a few milliseconds that bookkeeping cost about as much as the step
(``benchmarks/end_to_end.py``). The metrics here keep sums of fixed size, updated with a few
kernels per batch, synced across processes by summing (``torchmetrics`` does it in
``compute``), and are logged once per epoch:

* :class:`BatchMean`: the batch-size-weighted mean of a value over an epoch, what
  ``self.log(name, value, on_epoch=True)`` reports;
* :class:`ClassifierStats`: accuracy and expected calibration error over the labeled samples
  (label ``>= 0``; a transfer set's unlabeled samples have ``-1``), for one model's ``(B, C)``
  logits or M models' ``(M, B, C)`` at once.

Expected calibration error (Naeini et al. 2015; Guo et al. 2017): with ``conf`` the top
probability and ``hit`` whether its class is the label, samples are binned by ``conf`` and
``ECE = sum_b (n_b / n) |mean(hit)_b - mean(conf)_b| = sum_b |sum(hit)_b - sum(conf)_b| / n``.
Updates are kept and folded into the sums a few thousand samples at a time (and before any
sync or compute), so that a step costs a list append. The bins are ``torchmetrics``' (``MulticlassCalibrationError(n_bins=15)``:
``bucketize(conf, linspace(0, 1, 16), right=True) - 1``), so the values equal its (tested).

Example:
    >>> stats = ClassifierStats(num_classes=3)
    >>> stats.update(torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0]]), torch.tensor([0, 2, -1]))
    >>> float(stats.compute()["acc"])
    0.5
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

#: calibration bins, as ``MulticlassCalibrationError``'s default
ECE_BINS = 15


def calibration_bins(
    conf: torch.Tensor, hit: torch.Tensor, weight: torch.Tensor, n_bins: int = ECE_BINS
) -> torch.Tensor:
    """Per-bin sums ``(..., n_bins + 1, 3)``: weight, confidence and hits of the samples.

    Args:
        conf: ``(..., B)`` top-class probabilities.
        hit: ``(..., B)`` 1 where the top class is the label.
        weight: ``(B,)`` or ``(..., B)`` sample weights (1 labeled, 0 unlabeled).
        n_bins: number of bins; a confidence of exactly 1 gets a slot of its own (adding 0).
    """
    edges = torch.linspace(0, 1, n_bins + 1, device=conf.device, dtype=conf.dtype)
    index = torch.bucketize(conf, edges, right=True) - 1
    w = weight.to(conf.dtype).expand_as(conf)
    src = torch.stack([w, conf * w, hit.to(conf.dtype) * w], dim=-1)  # (..., B, 3)
    out = conf.new_zeros(*conf.shape[:-1], n_bins + 1, 3)
    out.scatter_add_(-2, index.unsqueeze(-1).expand_as(src), src)
    return out


def top_class(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(confidence, class)``: the softmax's largest probability and its class, per row.

    The probability is ``1 / sum_c exp(z_c - z_max)``, the softmax's maximum without the softmax
    (on this CPU a softmax over 10 classes costs 20x these three kernels); the class is the
    logits' argmax (the first one on ties, as ``argmax``).
    """
    z = logits.float()
    z_max, top = z.max(-1)
    return (z - z_max.unsqueeze(-1)).exp().sum(-1).reciprocal(), top


def calibration_error(bins: torch.Tensor, total: torch.Tensor | float) -> torch.Tensor:
    """Expected calibration error from :func:`calibration_bins` sums of ``total`` samples."""
    total = torch.as_tensor(total, dtype=bins.dtype, device=bins.device)
    ece = (bins[..., 2] - bins[..., 1]).abs().sum(-1) / total.clamp_min(1)
    return torch.where(total > 0, ece, torch.zeros_like(ece))


class _Buffered(Metric):
    """A metric whose updates are kept as they come and folded into its sums in bulk.

    A fold does the same arithmetic for many batches at once: a few kernels per
    ``fold_every`` samples instead of per batch. Pending updates are folded before every sync
    and compute (``sync`` is where torchmetrics' compute and Lightning's epoch end start), so
    the values are those of folding each batch as it came; ``reset`` drops them.
    """

    full_state_update = False
    #: samples (rows) kept before a fold
    fold_every = 8192

    def __init__(self) -> None:
        super().__init__()
        self._pending: list[tuple] = []
        self._pending_rows = 0

    def add(self, *args: Any, **kwargs: Any) -> None:
        """``update`` with the bookkeeping of torchmetrics' wrapper done directly.

        The same effect (the cached compute dropped, the update counted); for every training
        step, where the wrapper's attribute writes through ``nn.Module.__setattr__`` cost more
        than the update itself (a list append).
        """
        state = self.__dict__
        state["_computed"] = None
        state["_update_count"] = state["_update_count"] + 1
        type(self).update(self, *args, **kwargs)

    def _keep(self, item: tuple, rows: int) -> None:
        self._pending.append(item)
        state = self.__dict__  # a plain counter: not through nn.Module.__setattr__
        state["_pending_rows"] = state["_pending_rows"] + rows
        if state["_pending_rows"] >= self.fold_every:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            items, self._pending, self._pending_rows = self._pending, [], 0
            self._fold(items)

    def _fold(self, items: list[tuple]) -> None:
        raise NotImplementedError

    def sync(self, *args: Any, **kwargs: Any) -> None:
        self._flush()
        super().sync(*args, **kwargs)

    def reset(self) -> None:
        super().reset()
        self._pending, self._pending_rows = [], 0


class BatchMean(_Buffered):
    """The means of per-batch values over an epoch, each batch weighted by its sample count.

    Args:
        size: how many values each update brings (``None``: one scalar).

    ``update(value, weight)``: ``value`` a tensor of that shape, or a sequence of scalar
    tensors (stacked when folded); ``weight`` the batch's samples, one number or one per value.

    Example:
        >>> mean = BatchMean()
        >>> mean.update(torch.tensor(1.0), 3)
        >>> mean.update(torch.tensor(3.0), 1)
        >>> float(mean.compute())
        1.5
    """

    fold_every = 256  # updates

    def __init__(self, size: int | None = None) -> None:
        super().__init__()
        shape = () if size is None else (size,)
        self.add_state("total", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor | Sequence[torch.Tensor], weight: Any) -> None:
        """Add a batch's value(s) with ``weight`` samples (a number, or one per value)."""
        self._keep((value, weight), 1)


    def _fold(self, items: list[tuple]) -> None:
        device, f64 = self.total.device, torch.float64
        values = torch.stack(
            [v.detach() if isinstance(v, torch.Tensor) else torch.stack(list(v)) for v, _ in items]
        ).to(device=device, dtype=f64)
        shape = values.shape[1:]
        width = shape.numel()
        rows = [
            list(w) if isinstance(w, list | tuple) else [w] * width for _, w in items
        ]  # one weight per value
        columns = [_column([row[j] for row in rows], device) for j in range(width)]
        weights = torch.stack(columns, dim=1).view(len(items), *shape)
        self.total.add_((values * weights).sum(0))
        self.weight.add_(weights.sum(0))

    def compute(self) -> torch.Tensor:
        """The weighted mean(s) (float32; 0 where nothing had weight)."""
        return (self.total / self.weight.clamp_min(1e-300)).float()


def _column(weights: list[Any], device: torch.device) -> torch.Tensor:
    """Weights (numbers and/or scalar tensors) as one float64 tensor on ``device``."""
    if all(isinstance(w, int | float) for w in weights):
        return torch.tensor(weights, dtype=torch.float64, device=device)
    if all(isinstance(w, torch.Tensor) for w in weights):
        return torch.stack(weights).to(device=device, dtype=torch.float64)
    parts = [torch.as_tensor(w, dtype=torch.float64).to(device) for w in weights]
    return torch.stack(parts)


class ClassifierStats(_Buffered):
    """Accuracy, calibration error and agreement of one or M models, from fixed-size sums.

    Args:
        num_classes: number of classes (checked against the logits).
        members: M, the leading index of ``(M, B, C)`` logits; 1 for ``(B, C)`` logits.
        n_bins: calibration bins.

    ``update(logits, labels, reference=None)``: accuracy and calibration over the labeled
    samples; with ``(B,)`` reference classes (the teacher's argmax; ``(M, B)``: one row per
    member) also the agreement, the share of all samples whose predicted class is the
    reference's. ``compute()`` returns ``{"acc", "ece", "agreement"}``: scalars for one model, ``(M,)`` tensors for M.
    """

    def __init__(self, num_classes: int, members: int = 1, n_bins: int = ECE_BINS) -> None:
        super().__init__()
        self.num_classes, self.members, self.n_bins = num_classes, members, n_bins
        f64 = torch.float64
        self.add_state("correct", torch.zeros(members, dtype=f64), dist_reduce_fx="sum")
        self.add_state("labeled", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("agreed", torch.zeros(members, dtype=f64), dist_reduce_fx="sum")
        self.add_state("compared", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("bins", torch.zeros(members, n_bins + 1, 3, dtype=f64), dist_reduce_fx="sum")

    def update(
        self,
        logits: torch.Tensor | Sequence[torch.Tensor],
        labels: torch.Tensor,
        reference: torch.Tensor | int | None = None,
    ) -> None:
        """Add a batch: ``(B, C)`` or ``(M, B, C)`` logits (or M ``(B, C)`` tensors), ``(B,)`` labels.

        ``reference``: ``(B,)`` or ``(M, B)`` classes to agree with, or an int ``m``: the argmax
        of member m's logits (computed when the batch is folded). Labels -1 mark unlabeled samples.
        """
        members = (
            [z.detach() for z in logits]
            if isinstance(logits, list | tuple)
            else list(logits.detach().view(-1, *logits.shape[-2:]).unbind(0))
        )
        if len(members) != self.members or any(z.shape[-1] != self.num_classes for z in members):
            shape = (
                tuple(logits.shape)
                if isinstance(logits, torch.Tensor)
                else "M = " + str(len(members))
            )
            raise ValueError(
                f"expected logits of shape ({self.members}, batch, {self.num_classes}) or "
                f"(batch, {self.num_classes}), but got {shape}"
            )
        self._keep((members, labels, reference), len(labels))

    def _fold(self, items: list[tuple]) -> None:
        groups: dict[Any, list[tuple]] = {}  # by reference: None, a member index, or "tensor"
        for item in items:
            key = "tensor" if isinstance(item[2], torch.Tensor) else item[2]
            groups.setdefault(key, []).append(item)
        for key, part in groups.items():
            z = torch.stack(
                [torch.cat([it[0][m] for it in part]).float() for m in range(self.members)]
            )
            labels = torch.cat([it[1] for it in part])
            if key is None:
                reference = None
            elif key == "tensor":
                reference = torch.cat([it[2] for it in part], dim=-1)
            else:
                reference = z[key].argmax(-1)
            self._add(z, labels, reference)

    def _add(self, z: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None) -> None:
        weight = labels >= 0
        conf, top = top_class(z)
        hit = (top == labels) & weight
        self.correct.add_(hit.sum(-1))
        self.labeled.add_(weight.sum())
        if reference is not None:
            self.agreed.add_((top == reference).sum(-1))
            self.compared.add_(reference.shape[-1])
        self.bins.add_(calibration_bins(conf, hit, weight, self.n_bins))

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"acc", "ece", "agreement"}`` (float32): scalars, or ``(M,)`` for M members."""
        out = {
            "acc": (self.correct / self.labeled.clamp_min(1)).float(),
            "ece": calibration_error(self.bins, self.labeled).float(),
            "agreement": (self.agreed / self.compared.clamp_min(1)).float(),
        }
        return {k: v[0] for k, v in out.items()} if self.members == 1 else out
