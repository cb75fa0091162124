"""Distillation divergences D(P || Q) between the teacher's and the student's softened outputs.

P = softmax(v / T) from the teacher's logits v, Q = softmax(z / T) from the student's logits z.
Every divergence here

* takes **logits** and a temperature and works in log-space (``log_softmax``, ``logsumexp``),
  so nothing underflows at low temperature or with many classes;
* sums over classes (the last dimension) and returns the **batch mean** (the mean over all
  leading dimensions), as Hinton et al.'s ``batchmean`` KL does;
* treats teacher zeros (logits of ``-inf``) by its convention (0 log 0 = 0), never NaN;
* has a gradient ``scale(T)`` so that the distillation term keeps its size as T changes: T^2
  for KL (Hinton et al. 2015), T^2 / alpha for Renyi, and for the others the factor that makes
  their gradient match KL's at high temperature;
* comes as a functional twin (``renyi_divergence(...)``) and a module (``RenyiDivergence``)
  registered by name (``DIVERGENCES``), buildable from YAML as ``divergence: renyi``,
  ``divergence: {name: renyi, alpha: 0.5}`` or a ``class_path``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tnkd.registry import Registry, build

DIVERGENCES: Registry[type[Divergence]] = Registry("divergence")

#: below this |alpha - 1| the Renyi divergence uses its second-order expansion around KL
RENYI_SERIES_RADIUS = 1e-4


# ---- input checks and log-probabilities ------------------------------------------------------


def check_temperature(temperature: float) -> float:
    """Raise unless the temperature is a finite number > 0."""
    if isinstance(temperature, Tensor):
        temperature = float(temperature)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not (math.isfinite(temperature) and temperature > 0)
    ):
        raise ValueError(f"temperature must be a finite number > 0, but got {temperature!r}")
    return float(temperature)


def check_alpha(alpha: float, name: str = "renyi alpha") -> float:
    """Raise unless alpha >= 0 (``inf`` allowed)."""
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float)
        or math.isnan(alpha)
        or alpha < 0
    ):
        raise ValueError(f"{name} must be >= 0 (or inf), but got {alpha!r}")
    return float(alpha)


def _check_logits(teacher_logits: Tensor, student_logits: Tensor) -> None:
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits and student_logits must have the same shape, but got "
            f"{tuple(teacher_logits.shape)} and {tuple(student_logits.shape)}"
        )
    if teacher_logits.ndim == 0 or teacher_logits.shape[-1] == 0:
        raise ValueError(
            f"logits need a class dimension, but got shape {tuple(teacher_logits.shape)}"
        )
    if not bool(torch.isfinite(student_logits).all()):
        raise ValueError("student_logits must be finite, but contain NaN or inf")
    # -inf teacher logits are zero probabilities (allowed); NaN, +inf and all -inf rows are not
    bad = torch.isnan(teacher_logits) | (teacher_logits == math.inf)
    if bool(bad.any()) or bool((teacher_logits == -math.inf).all(-1).any()):
        raise ValueError(
            "teacher_logits must be finite or -inf (zero probability), with at least one finite "
            "logit per row, but contain NaN, +inf or an all -inf row"
        )


def log_probs(
    teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0, validate: bool = True
) -> tuple[Tensor, Tensor]:
    """``(log P, log Q)`` at temperature T, in float32 or higher (half inputs are upcast)."""
    temperature = check_temperature(temperature)
    if validate:
        _check_logits(teacher_logits, student_logits)
    dtype = torch.promote_types(
        torch.promote_types(teacher_logits.dtype, student_logits.dtype), torch.float32
    )
    log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    return log_p, log_q


def _support(log_p: Tensor) -> Tensor:
    return log_p > -math.inf


def _where(mask: Tensor, value: Tensor) -> Tensor:
    """``value`` where ``mask``, else 0, with zero (not NaN) gradient outside the mask."""
    safe = torch.where(mask, value, torch.zeros_like(value))
    return torch.where(mask, safe, torch.zeros_like(value))


def _plogp_ratio(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-sample sum_i p_i (log p_i - log q_i), with 0 log 0 = 0."""
    mask = _support(log_p)
    safe_log_p = torch.where(mask, log_p, torch.zeros_like(log_p))
    return _where(mask, safe_log_p.exp() * (safe_log_p - log_q)).sum(-1)


def _batch_mean(per_sample: Tensor) -> Tensor:
    return per_sample.mean()


# ---- per-sample kernels ----------------------------------------------------------------------


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    return _plogp_ratio(log_p, log_q)


def _renyi(log_p: Tensor, log_q: Tensor, alpha: float) -> Tensor:
    mask = _support(log_p)
    if alpha == 0:
        return -torch.logsumexp(torch.where(mask, log_q, torch.full_like(log_q, -math.inf)), dim=-1)
    if math.isinf(alpha):
        ratio = torch.where(
            mask, log_p - torch.where(mask, log_q, torch.zeros_like(log_q)), -math.inf
        )
        return ratio.amax(-1)
    if abs(alpha - 1) < RENYI_SERIES_RADIUS:
        # log E_P[exp((a-1) r)] = (a-1) E_P[r] + (a-1)^2/2 Var_P[r] + O((a-1)^3), r = log p/q
        safe_log_p = torch.where(mask, log_p, torch.zeros_like(log_p))
        p = _where(mask, safe_log_p.exp())
        r = _where(mask, safe_log_p - log_q)
        mean = (p * r).sum(-1)
        var = (p * (r - mean.unsqueeze(-1)) ** 2).sum(-1)
        return mean + 0.5 * (alpha - 1) * var
    terms = torch.where(
        mask,
        alpha * torch.where(mask, log_p, torch.zeros_like(log_p)) + (1 - alpha) * log_q,
        -math.inf,
    )
    return torch.logsumexp(terms, dim=-1) / (alpha - 1)


def _reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    # Q's mass where P has none makes KL(Q||P) infinite; the floor keeps it large but finite.
    floor = math.log(torch.finfo(log_p.dtype).tiny)
    return (log_q.exp() * (log_q - log_p.clamp_min(floor))).sum(-1)


def _js(log_p: Tensor, log_q: Tensor) -> Tensor:
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    return 0.5 * _plogp_ratio(log_p, log_m) + 0.5 * _plogp_ratio(log_q, log_m)


def _hellinger(log_p: Tensor, log_q: Tensor) -> Tensor:
    # H^2 = 1 - sum sqrt(p q); expm1 keeps precision when P ~ Q
    return -torch.expm1(torch.logsumexp(0.5 * (log_p + log_q), dim=-1))


def _tv(log_p: Tensor, log_q: Tensor) -> Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def _skew_kl(log_p: Tensor, log_q: Tensor, skew: float) -> Tensor:
    if skew == 0:
        return _kl(log_p, log_q)
    log_mix = torch.logaddexp(log_p + math.log(skew), log_q + math.log1p(-skew))
    return _plogp_ratio(log_p, log_mix)


# ---- functional twins --------------------------------------------------------------------------


def entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Batch-mean Shannon entropy H(P) = -sum p log p of softmax(logits / T), in nats."""
    log_p = F.log_softmax(
        logits.to(torch.promote_types(logits.dtype, torch.float32))
        / check_temperature(temperature),
        dim=-1,
    )
    mask = _support(log_p)
    return _batch_mean(
        -_where(mask, log_p.exp() * torch.where(mask, log_p, torch.zeros_like(log_p))).sum(-1)
    )


def cross_entropy_between(p_logits: Tensor, q_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Batch-mean cross-entropy H(P, Q) = -sum p log q, for P, Q given by logits."""
    log_p, log_q = log_probs(p_logits, q_logits, temperature)
    mask = _support(log_p)
    return _batch_mean(-_where(mask, log_p.exp() * log_q).sum(-1))


def kl_divergence(
    teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0, validate: bool = True
) -> Tensor:
    """KL(P || Q) = sum_i p_i log(p_i / q_i) (Hinton, Vinyals & Dean 2015), batch mean."""
    return _batch_mean(_kl(*log_probs(teacher_logits, student_logits, temperature, validate)))


def reverse_kl_divergence(
    teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0, validate: bool = True
) -> Tensor:
    """KL(Q || P) = sum_i q_i log(q_i / p_i) (mode-seeking; e.g. Gu et al. 2024, MiniLLM), batch mean."""
    return _batch_mean(
        _reverse_kl(*log_probs(teacher_logits, student_logits, temperature, validate))
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
    -log sum_{p_i > 0} q_i; alpha = inf is log max_i p_i / q_i. Within 1e-4 of alpha = 1 a
    second-order expansion, KL + (alpha - 1) Var_P[log p/q] / 2, keeps values and gradients
    continuous across alpha = 1.
    """
    alpha = check_alpha(alpha)
    return _batch_mean(
        _renyi(*log_probs(teacher_logits, student_logits, temperature, validate), alpha)
    )


def jensen_shannon_divergence(
    teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0, validate: bool = True
) -> Tensor:
    """JS(P, Q) = KL(P || M)/2 + KL(Q || M)/2 with M = (P + Q)/2 (Lin 1991), batch mean, in nats."""
    return _batch_mean(_js(*log_probs(teacher_logits, student_logits, temperature, validate)))


def hellinger_distance(
    teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0, validate: bool = True
) -> Tensor:
    """Squared Hellinger distance H^2 = 1 - sum_i sqrt(p_i q_i), batch mean; D_1/2 = -2 log(1 - H^2)."""
    return _batch_mean(
        _hellinger(*log_probs(teacher_logits, student_logits, temperature, validate))
    )


def total_variation_distance(
    teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0, validate: bool = True
) -> Tensor:
    """Total variation TV(P, Q) = sum_i |p_i - q_i| / 2, batch mean (in [0, 1])."""
    return _batch_mean(_tv(*log_probs(teacher_logits, student_logits, temperature, validate)))


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
        _skew_kl(
            *log_probs(teacher_logits, student_logits, temperature, validate), _check_skew(skew)
        )
    )


def _check_skew(skew: float) -> float:
    if isinstance(skew, bool) or not isinstance(skew, int | float) or not 0 <= skew < 1:
        raise ValueError(f"skew_kl skew must be in [0, 1), but got {skew!r}")
    return float(skew)


# ---- modules -----------------------------------------------------------------------------------


class Divergence(nn.Module):
    """Base class: ``forward(teacher_logits, student_logits, temperature)`` -> batch-mean D(P || Q).

    Args:
        scale: a fixed gradient scale that replaces :meth:`default_scale` (``None``: the default).
        validate: check inputs (shapes, NaN/inf) on every call; ``False`` skips the checks.
    """

    name: str = ""

    def __init__(self, scale: float | None = None, validate: bool = True) -> None:
        super().__init__()
        if scale is not None and not (
            isinstance(scale, int | float) and math.isfinite(scale) and scale >= 0
        ):
            raise ValueError(
                f"{self.name} scale must be a finite number >= 0 or None, but got {scale!r}"
            )
        self.fixed_scale = None if scale is None else float(scale)
        self.validate = validate

    def per_sample(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        """The divergence of each sample from log-probabilities (summed over classes)."""
        raise NotImplementedError

    def forward(
        self, teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0
    ) -> Tensor:
        """Batch-mean D(P_T || Q_T), unscaled, float32 (or float64 for float64 inputs)."""
        return _batch_mean(
            self.per_sample(*log_probs(teacher_logits, student_logits, temperature, self.validate))
        )

    def default_scale(self, temperature: float) -> float:
        """T^2: the Hinton et al. factor that keeps KL's gradient size independent of T."""
        return temperature**2

    def scale(self, temperature: float) -> float:
        """The factor applied to the distillation term (the fixed ``scale`` if one was given)."""
        temperature = check_temperature(temperature)
        return self.fixed_scale if self.fixed_scale is not None else self.default_scale(temperature)

    def loss(
        self, teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0
    ) -> Tensor:
        """``scale(T) * forward(...)``: the distillation term as it enters the loss."""
        return self.scale(temperature) * self(teacher_logits, student_logits, temperature)

    def extra_repr(self) -> str:  # noqa: D102
        return "" if self.fixed_scale is None else f"scale={self.fixed_scale}"


@DIVERGENCES.register("kl", "forward_kl")
class KLDivergence(Divergence):
    """KL(P || Q), the Hinton et al. 2015 baseline; scale T^2. See :func:`kl_divergence`."""

    name = "kl"

    def per_sample(self, log_p: Tensor, log_q: Tensor) -> Tensor:  # noqa: D102
        return _kl(log_p, log_q)


@DIVERGENCES.register("reverse_kl")
class ReverseKLDivergence(Divergence):
    """KL(Q || P); scale T^2 (its high-T gradient equals KL's). See :func:`reverse_kl_divergence`.

    Where the teacher has zero probability and the student does not, the exact value is
    infinite; the teacher's log-probability is floored at log(smallest normal float) instead.
    """

    name = "reverse_kl"

    def per_sample(self, log_p: Tensor, log_q: Tensor) -> Tensor:  # noqa: D102
        return _reverse_kl(log_p, log_q)


@DIVERGENCES.register("renyi")
class RenyiDivergence(Divergence):
    """Renyi divergence of order alpha; see :func:`renyi_divergence` for formula and limits.

    Scale T^2 / alpha: at high temperature the gradient of D_alpha with respect to the student
    logits is (alpha / (n T^2)) (z_j - v_j) (zero-mean logits, n classes), so T^2 / alpha gives
    every order the gradient of T^2 KL. At the limits alpha = 0 and alpha = inf, where T^2 / alpha
    is not finite or vanishes, the scale is T^2.

    Args:
        alpha: the order, >= 0 (``float("inf")`` allowed).
        scale: fixed scale override.
        validate: input checks.
    """

    name = "renyi"

    def __init__(
        self, alpha: float = 2.0, scale: float | None = None, validate: bool = True
    ) -> None:
        super().__init__(scale=scale, validate=validate)
        self.alpha = check_alpha(alpha)

    def per_sample(self, log_p: Tensor, log_q: Tensor) -> Tensor:  # noqa: D102
        return _renyi(log_p, log_q, self.alpha)

    def default_scale(self, temperature: float) -> float:  # noqa: D102
        if self.alpha == 0 or math.isinf(self.alpha):
            return temperature**2
        return temperature**2 / self.alpha

    def extra_repr(self) -> str:  # noqa: D102
        return ", ".join(filter(None, [f"alpha={self.alpha}", super().extra_repr()]))


@DIVERGENCES.register("js", "jensen_shannon")
class JensenShannonDivergence(Divergence):
    """Jensen-Shannon divergence; see :func:`jensen_shannon_divergence`.

    Scale 4 T^2: at high temperature JS ~ KL / 4, so this matches KL's gradient.
    """

    name = "js"

    def per_sample(self, log_p: Tensor, log_q: Tensor) -> Tensor:  # noqa: D102
        return _js(log_p, log_q)

    def default_scale(self, temperature: float) -> float:  # noqa: D102
        return 4 * temperature**2


@DIVERGENCES.register("hellinger")
class HellingerDistance(Divergence):
    """Squared Hellinger distance; see :func:`hellinger_distance`.

    Scale 4 T^2: at high temperature H^2 ~ KL / 4, so this matches KL's gradient.
    """

    name = "hellinger"

    def per_sample(self, log_p: Tensor, log_q: Tensor) -> Tensor:  # noqa: D102
        return _hellinger(log_p, log_q)

    def default_scale(self, temperature: float) -> float:  # noqa: D102
        return 4 * temperature**2


@DIVERGENCES.register("tv", "total_variation")
class TotalVariationDistance(Divergence):
    """Total variation distance; see :func:`total_variation_distance`.

    Scale T: at high temperature p - q ~ (v - z) / (n T), so TV and its gradient shrink like
    1/T (not 1/T^2 as KL); multiplying by T keeps them independent of the temperature.
    """

    name = "tv"

    def per_sample(self, log_p: Tensor, log_q: Tensor) -> Tensor:  # noqa: D102
        return _tv(log_p, log_q)

    def default_scale(self, temperature: float) -> float:  # noqa: D102
        return temperature


@DIVERGENCES.register("skew_kl")
class SkewKLDivergence(Divergence):
    """Skew KL of DistiLLM (Ko et al. 2024); see :func:`skew_kl_divergence`.

    Scale T^2 / (1 - skew)^2: at high temperature SKL ~ (1 - skew)^2 KL.

    Args:
        skew: mixing weight of P in the second argument, in [0, 1) (DistiLLM uses 0.1).
        scale: fixed scale override.
        validate: input checks.
    """

    name = "skew_kl"

    def __init__(
        self, skew: float = 0.1, scale: float | None = None, validate: bool = True
    ) -> None:
        super().__init__(scale=scale, validate=validate)
        self.skew = _check_skew(skew)

    def per_sample(self, log_p: Tensor, log_q: Tensor) -> Tensor:  # noqa: D102
        return _skew_kl(log_p, log_q, self.skew)

    def default_scale(self, temperature: float) -> float:  # noqa: D102
        return temperature**2 / (1 - self.skew) ** 2

    def extra_repr(self) -> str:  # noqa: D102
        return ", ".join(filter(None, [f"skew={self.skew}", super().extra_repr()]))


def build_divergence(spec: str | dict | Divergence) -> Divergence:
    """A divergence from a name (``"kl"``), a mapping (``{"name": "renyi", "alpha": 0.5}``) or an instance."""
    return build(DIVERGENCES, spec, base=Divergence)
