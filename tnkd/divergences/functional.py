"""Functional twins of the divergence modules: ``kl_divergence(teacher_logits, student_logits, T)``, ...

Each returns the batch mean of D(P || Q) (see :mod:`tnkd.divergences`), unscaled.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tnkd.divergences.log_ratios import (
    LogRatios,
    _batch_mean,
    _dkd_parts,
    _hellinger_from,
    _js_from,
    _kl_from,
    _masked,
    _renyi,
    _reverse_kl_from,
    _skew_kl_from,
    _tv_from,
    log_ratios,
)
from tnkd.divergences.logits import (
    check_alpha,
    check_temperature,
    log_probs,
)


def entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Batch-mean Shannon entropy H(P) = -sum p log p of softmax(logits / T), in nats."""
    log_p = F.log_softmax(
        logits.to(torch.promote_types(logits.dtype, torch.float32))
        / check_temperature(temperature),
        dim=-1,
    )
    mask = log_p > -math.inf
    return _batch_mean(-_masked(mask, log_p.exp() * log_p).sum(-1))


def cross_entropy_between(p_logits: Tensor, q_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Batch-mean cross-entropy H(P, Q) = -sum p log q, for P, Q given by logits."""
    log_p, log_q = log_probs(p_logits, q_logits, temperature)
    return _batch_mean(-_masked(log_p > -math.inf, log_p.exp() * log_q).sum(-1))


def kl_divergence(
    teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0, validate: bool = True
) -> Tensor:
    """KL(P || Q) = sum_i p_i log(p_i / q_i) (Hinton, Vinyals & Dean 2015), batch mean."""
    return _batch_mean(_kl_from(log_ratios(teacher_logits, student_logits, temperature, validate)))


def reverse_kl_divergence(
    teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0, validate: bool = True
) -> Tensor:
    """KL(Q || P) = sum_i q_i log(q_i / p_i) (mode-seeking; e.g. Gu et al. 2024, MiniLLM), batch mean."""
    return _batch_mean(
        _reverse_kl_from(log_ratios(teacher_logits, student_logits, temperature, validate))
    )


def renyi_divergence(
    teacher_logits: Tensor,
    student_logits: Tensor,
    alpha: float,
    temperature: float = 1.0,
    validate: bool = True,
) -> Tensor:
    """Renyi divergence D_alpha(P || Q) = log(sum_i p_i^alpha q_i^(1-alpha)) / (alpha - 1), batch mean.

    Limits (Renyi 1961; van Erven & Harremoes 2014): alpha = 1 is KL(P || Q); alpha = 0 is
    -log sum_{p_i > 0} q_i; alpha = inf is log max_i p_i / q_i. The evaluation is smooth through
    alpha = 1 (no special case) and accurate relative to the value at any temperature; below
    alpha = 1/2 it uses the skew symmetry D_alpha(P || Q) = alpha / (1 - alpha) D_(1-alpha)(Q || P).
    """
    alpha = check_alpha(alpha)
    return _batch_mean(
        _renyi(log_ratios(teacher_logits, student_logits, temperature, validate), alpha)
    )


def jensen_shannon_divergence(
    teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0, validate: bool = True
) -> Tensor:
    """JS(P, Q) = KL(P || M)/2 + KL(Q || M)/2 with M = (P + Q)/2 (Lin 1991), batch mean, in nats."""
    return _batch_mean(_js_from(log_ratios(teacher_logits, student_logits, temperature, validate)))


def hellinger_distance(
    teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0, validate: bool = True
) -> Tensor:
    """Squared Hellinger distance H^2 = 1 - sum_i sqrt(p_i q_i), batch mean; D_1/2 = -2 log(1 - H^2)."""
    return _batch_mean(
        _hellinger_from(log_ratios(teacher_logits, student_logits, temperature, validate))
    )


def total_variation_distance(
    teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0, validate: bool = True
) -> Tensor:
    """Total variation TV(P, Q) = sum_i |p_i - q_i| / 2, batch mean (in [0, 1])."""
    return _batch_mean(_tv_from(log_ratios(teacher_logits, student_logits, temperature, validate)))


def skew_kl_divergence(
    teacher_logits: Tensor,
    student_logits: Tensor,
    skew: float = 0.1,
    temperature: float = 1.0,
    validate: bool = True,
) -> Tensor:
    """Skew KL, KL(P || skew P + (1 - skew) Q) (Ko et al. 2024, "DistiLLM", ICML), batch mean.

    ``skew = 0`` is KL; mixing a little of P into Q bounds the log-ratio by -log(skew), which
    keeps gradients stable where the student puts almost no mass on a teacher class.
    """
    return _batch_mean(
        _skew_kl_from(
            log_ratios(teacher_logits, student_logits, temperature, validate), _check_skew(skew)
        )
    )


def _check_skew(skew: float) -> float:
    if isinstance(skew, bool) or not isinstance(skew, int | float) or not 0 <= skew < 1:
        raise ValueError(f"skew_kl skew must be in [0, 1), but got {skew!r}")
    return float(skew)


def _check_target(target: Tensor | None, teacher_logits: Tensor) -> Tensor:
    """Class indices for DKD: the labels, with the teacher's top class where a label is < 0."""
    top = teacher_logits.argmax(dim=-1)
    if target is None:
        return top
    if target.shape != teacher_logits.shape[:-1]:
        raise ValueError(
            f"expected one target per sample, of shape {tuple(teacher_logits.shape[:-1])}, "
            f"but got {tuple(target.shape)}"
        )
    classes = teacher_logits.shape[-1]
    if bool((target >= classes).any()):
        raise ValueError(f"targets must be class indices below {classes} (or -1 for unlabeled)")
    return torch.where(target >= 0, target, top.to(target.device)).long()


def decoupled_kd_parts(
    teacher_logits: Tensor,
    student_logits: Tensor,
    target: Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DKD's parts per sample, ``(TCKD, NCKD, 1 - p_t)`` (Zhao et al. 2022); see :func:`decoupled_kd`.

    The identity that holds exactly, per sample: ``KL(P || Q) = TCKD + (1 - p_t) NCKD``.
    """
    lr = log_ratios(teacher_logits, student_logits, temperature)
    return _dkd_parts(lr, _check_target(target, teacher_logits))


def decoupled_kd(
    teacher_logits: Tensor,
    student_logits: Tensor,
    target: Tensor | None = None,
    temperature: float = 1.0,
    target_weight: float = 1.0,
    nontarget_weight: float = 8.0,
) -> Tensor:
    """Decoupled KD (Zhao, Cui, Song, Qiu & Liang 2022, "Decoupled Knowledge Distillation", CVPR).

    With t the target class, b = (p_t, 1 - p_t) the binary split of P and P^ = p_j / (1 - p_t)
    (j != t) its non-target distribution (likewise b', Q^ for the student), KL splits exactly::

        KL(P || Q) = KL(b || b') + (1 - p_t) KL(P^ || Q^) = TCKD + (1 - p_t) NCKD.

    DKD drops the (1 - p_t) factor, which mutes NCKD where the teacher is confident, and weighs
    the parts freely::

        DKD = target_weight * TCKD + nontarget_weight * NCKD

    (the paper's alpha and beta: 1 and 8 on CIFAR-100; its loss is T^2 DKD, with the weight
    warmed up over the first 20 epochs, which tnkd does not do). With both weights 1, DKD is
    KL + p_t NCKD, not KL. Batch mean. ``target`` holds the labels; a sample labeled -1 (no
    label, a transfer set) or ``target=None`` uses the teacher's top class instead.

    Example:
        >>> v, z = torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([[1.0, 2.0, 0.0]])
        >>> tckd, nckd, rest = decoupled_kd_parts(v, z, torch.tensor([0]))
        >>> bool(torch.isclose(tckd + rest * nckd, kl_divergence(v, z)))
        True
    """
    tckd, nckd = _dkd_weighted(
        log_ratios(teacher_logits, student_logits, temperature),
        _check_target(target, teacher_logits),
    )
    return _batch_mean(target_weight * tckd + nontarget_weight * nckd)


def _dkd_weighted(lr: LogRatios, target: Tensor) -> tuple[Tensor, Tensor]:
    tckd, nckd, _ = _dkd_parts(lr, target)
    return tckd, nckd
