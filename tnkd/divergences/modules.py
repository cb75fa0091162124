"""Divergence modules, registered by name in ``DIVERGENCES`` and built from YAML by :func:`build_divergence`."""

from __future__ import annotations

import math

from torch import Tensor, nn

from tnkd.divergences.functional import (
    _check_skew,
    _check_target,
    _dkd_weighted,
)
from tnkd.divergences.log_ratios import (
    LogRatios,
    _batch_mean,
    _hellinger_from,
    _js_from,
    _kl_from,
    _renyi,
    _reverse_kl_from,
    _reverse_order,
    _skew_kl_from,
    _tv_from,
    log_ratios,
)
from tnkd.divergences.logits import (
    _check_logits,
    check_alpha,
    check_temperature,
    standardize_logits,
)
from tnkd.registry import Registry, build

DIVERGENCES: Registry[type[Divergence]] = Registry("divergence")


# ---- modules -----------------------------------------------------------------------------------


class Divergence(nn.Module):
    """Base class: ``forward(teacher_logits, student_logits, temperature)`` -> batch-mean D(P || Q).

    Args:
        scale: a fixed gradient scale that replaces :meth:`default_scale` (``None``: the default).
        validate: check inputs (shapes, NaN/inf) on every call; ``False`` skips the checks.
        standardize: z-score each sample's teacher and student logits before the temperature
            (logit standardization, Sun et al. 2024; see :func:`standardize_logits`). The loss
            is then invariant to shifting and positively scaling either side's logits; teacher
            logits of ``-inf`` (zero probabilities) are refused.

    ``forward`` and :meth:`loss` also take ``target`` (the labels), used by divergences that
    need the target class (:class:`DecoupledKD`) and ignored by the others.
    """

    name: str = ""

    def __init__(
        self, scale: float | None = None, validate: bool = True, standardize: bool = False
    ) -> None:
        super().__init__()
        if scale is not None and not (
            isinstance(scale, int | float) and math.isfinite(scale) and scale >= 0
        ):
            raise ValueError(
                f"{self.name} scale must be a finite number >= 0 or None, but got {scale!r}"
            )
        if not isinstance(standardize, bool):
            raise ValueError(
                f"{self.name} standardize must be true or false, but got {standardize!r}"
            )
        self.fixed_scale = None if scale is None else float(scale)
        self.validate = validate
        self.standardize = standardize

    def ratios(
        self, teacher_logits: Tensor, student_logits: Tensor, temperature: float
    ) -> LogRatios:
        """:func:`log_ratios` of the (standardized, when ``standardize``) logits."""
        if self.validate:
            _check_logits(teacher_logits, student_logits)
        if self.standardize:
            if self.validate and bool((teacher_logits == -math.inf).any()):
                raise ValueError(
                    "standardize needs finite teacher logits, but got -inf (a zero probability); "
                    "use standardize: false for such teachers"
                )
            teacher_logits = standardize_logits(teacher_logits)
            student_logits = standardize_logits(student_logits)
        return log_ratios(teacher_logits, student_logits, temperature, validate=False)

    def per_sample(self, ratios: LogRatios) -> Tensor:
        """The divergence of each sample, from :func:`log_ratios` (summed over classes)."""
        raise NotImplementedError

    def scaled_per_sample(self, ratios: LogRatios, temperature: float) -> Tensor:
        """``scale(T) * per_sample``; divergences whose product needs care (Renyi) override it."""
        return self.scale(temperature) * self.per_sample(ratios)

    def forward(
        self,
        teacher_logits: Tensor,
        student_logits: Tensor,
        temperature: float = 1.0,
        target: Tensor | None = None,
    ) -> Tensor:
        """Batch-mean D(P_T || Q_T), unscaled, float32 (or float64 for float64 inputs)."""
        ratios = self.ratios(teacher_logits, student_logits, temperature)
        return _batch_mean(self.per_sample(ratios))

    def default_scale(self, temperature: float) -> float:
        """T^2: the Hinton et al. factor that keeps KL's gradient size independent of T."""
        return temperature**2

    def scale(self, temperature: float) -> float:
        """The factor applied to the distillation term (the fixed ``scale`` if one was given)."""
        temperature = check_temperature(temperature)
        return self.fixed_scale if self.fixed_scale is not None else self.default_scale(temperature)

    def loss(
        self,
        teacher_logits: Tensor,
        student_logits: Tensor,
        temperature: float = 1.0,
        target: Tensor | None = None,
    ) -> Tensor:
        """The distillation term as it enters the loss: batch mean of ``scale(T) * D``.

        Equal to ``scale(T) * forward(...)`` except where that product is a limit (Renyi near
        alpha = 0, see :class:`RenyiDivergence`).
        """
        ratios = self.ratios(teacher_logits, student_logits, temperature)
        return _batch_mean(self.scaled_per_sample(ratios, check_temperature(temperature)))

    def extra_repr(self) -> str:  # noqa: D102
        parts = [] if self.fixed_scale is None else [f"scale={self.fixed_scale}"]
        return ", ".join(parts + (["standardize=True"] if self.standardize else []))


@DIVERGENCES.register("kl", "forward_kl")
class KLDivergence(Divergence):
    """KL(P || Q), the Hinton et al. 2015 baseline; scale T^2. See :func:`kl_divergence`."""

    name = "kl"

    def per_sample(self, ratios: LogRatios) -> Tensor:  # noqa: D102
        return _kl_from(ratios)


@DIVERGENCES.register("reverse_kl")
class ReverseKLDivergence(Divergence):
    """KL(Q || P); scale T^2 (its high-T gradient equals KL's). See :func:`reverse_kl_divergence`.

    Where the teacher has zero probability and the student does not, the exact value is
    infinite; the teacher's log-probability is floored at log(smallest normal float) instead.
    """

    name = "reverse_kl"

    def per_sample(self, ratios: LogRatios) -> Tensor:  # noqa: D102
        return _reverse_kl_from(ratios)


@DIVERGENCES.register("renyi")
class RenyiDivergence(Divergence):
    """Renyi divergence of order alpha; see :func:`renyi_divergence` for formula and limits.

    Scale T^2 / alpha: at high temperature the gradient of D_alpha with respect to the student
    logits is (alpha / (n T^2)) (z_j - v_j) (zero-mean logits, n classes), so T^2 / alpha gives
    every order the gradient of T^2 KL. At the limits alpha = 0 and alpha = inf, where T^2 / alpha
    is not finite or vanishes, :meth:`scale` reports T^2.

    The loss term ``(T^2 / alpha) D_alpha(P || Q)`` (:meth:`loss`) is continuous in alpha down to
    0: by the skew symmetry D_alpha(P || Q) = alpha / (1 - alpha) D_(1-alpha)(Q || P) it equals
    ``T^2 / (1 - alpha) D_(1-alpha)(Q || P)``, which tends to ``T^2 KL(Q || P)``, the reverse KL,
    as alpha -> 0 when the teacher gives every class some probability (it grows without bound
    where it does not). At alpha = 0 the loss is that limit, ``T^2 KL(Q || P)``, not
    ``T^2 D_0(P || Q)`` (which is 0 for such teachers, so the loss would jump there). At
    alpha = inf the loss is ``T^2 D_inf(P || Q)``.

    Args:
        alpha: the order, >= 0 (``float("inf")`` allowed).
        scale: fixed scale override.
        validate: input checks.
        standardize: logit standardization (see :class:`Divergence`).
    """

    name = "renyi"

    def __init__(
        self,
        alpha: float = 2.0,
        scale: float | None = None,
        validate: bool = True,
        standardize: bool = False,
    ) -> None:
        super().__init__(scale=scale, validate=validate, standardize=standardize)
        self.alpha = check_alpha(alpha)

    def per_sample(self, ratios: LogRatios) -> Tensor:  # noqa: D102
        return _renyi(ratios, self.alpha)

    def scaled_per_sample(self, ratios: LogRatios, temperature: float) -> Tensor:
        """``(T^2 / alpha) D_alpha(P || Q)``, continuous down to its limit at alpha = 0.

        For alpha < 1/2 it is computed as ``T^2 / (1 - alpha) D_(1-alpha)(Q || P)`` (the skew
        symmetry D_a(P || Q) = a / (1 - a) D_(1-a)(Q || P)), which never divides by a small
        alpha; at alpha = 0 that is ``T^2 KL(Q || P)``, the reverse KL. (Where the teacher gives a
        class zero probability the limit is infinite; at alpha = 0 the reverse KL's floor on
        log p keeps it finite.) With a fixed ``scale``, or at alpha = 0 exactly only for the
        limit, see the class docs.
        """
        if self.fixed_scale is not None or self.alpha >= 0.5 or math.isinf(self.alpha):
            return super().scaled_per_sample(ratios, temperature)
        if self.alpha == 0:
            return temperature**2 * _reverse_kl_from(ratios)
        return temperature**2 / (1 - self.alpha) * _reverse_order(ratios, self.alpha)

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

    def per_sample(self, ratios: LogRatios) -> Tensor:  # noqa: D102
        return _js_from(ratios)

    def default_scale(self, temperature: float) -> float:  # noqa: D102
        return 4 * temperature**2


@DIVERGENCES.register("hellinger")
class HellingerDistance(Divergence):
    """Squared Hellinger distance; see :func:`hellinger_distance`.

    Scale 4 T^2: at high temperature H^2 ~ KL / 4, so this matches KL's gradient.
    """

    name = "hellinger"

    def per_sample(self, ratios: LogRatios) -> Tensor:  # noqa: D102
        return _hellinger_from(ratios)

    def default_scale(self, temperature: float) -> float:  # noqa: D102
        return 4 * temperature**2


@DIVERGENCES.register("tv", "total_variation")
class TotalVariationDistance(Divergence):
    """Total variation distance; see :func:`total_variation_distance`.

    Scale T: at high temperature p - q ~ (v - z) / (n T), so TV and its gradient shrink like
    1/T (not 1/T^2 as KL); multiplying by T keeps them independent of the temperature.
    """

    name = "tv"

    def per_sample(self, ratios: LogRatios) -> Tensor:  # noqa: D102
        return _tv_from(ratios)

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
        standardize: logit standardization (see :class:`Divergence`).
    """

    name = "skew_kl"

    def __init__(
        self,
        skew: float = 0.1,
        scale: float | None = None,
        validate: bool = True,
        standardize: bool = False,
    ) -> None:
        super().__init__(scale=scale, validate=validate, standardize=standardize)
        self.skew = _check_skew(skew)

    def per_sample(self, ratios: LogRatios) -> Tensor:  # noqa: D102
        return _skew_kl_from(ratios, self.skew)

    def default_scale(self, temperature: float) -> float:  # noqa: D102
        return temperature**2 / (1 - self.skew) ** 2

    def extra_repr(self) -> str:  # noqa: D102
        return ", ".join(filter(None, [f"skew={self.skew}", super().extra_repr()]))


@DIVERGENCES.register("dkd", "decoupled_kd")
class DecoupledKD(Divergence):
    """Decoupled KD (Zhao et al. 2022): ``target_weight * TCKD + nontarget_weight * NCKD``.

    See :func:`decoupled_kd` for the formula and the exact decomposition
    ``KL = TCKD + (1 - p_t) NCKD``. Scale T^2, as in the paper's code. The target class is the
    label given to :meth:`loss` (``target``), the teacher's top class for unlabeled samples
    (label -1) or when no labels are given. In YAML:
    ``divergence: {name: dkd, target_weight: 1.0, nontarget_weight: 8.0}``.

    Args:
        target_weight: weight of TCKD (the paper's alpha), >= 0.
        nontarget_weight: weight of NCKD (the paper's beta; not the distillation weight beta of
            :class:`~tnkd.training.modules.DistillationModule`), >= 0.
        scale: fixed scale override.
        validate: input checks.
        standardize: logit standardization (see :class:`Divergence`).
    """

    name = "dkd"

    def __init__(
        self,
        target_weight: float = 1.0,
        nontarget_weight: float = 8.0,
        scale: float | None = None,
        validate: bool = True,
        standardize: bool = False,
    ) -> None:
        super().__init__(scale=scale, validate=validate, standardize=standardize)
        for label, value in (
            ("target_weight", target_weight),
            ("nontarget_weight", nontarget_weight),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value >= 0)
            ):
                raise ValueError(f"dkd {label} must be a finite number >= 0, but got {value!r}")
        self.target_weight = float(target_weight)
        self.nontarget_weight = float(nontarget_weight)

    def _weighted(self, ratios: LogRatios, target: Tensor) -> Tensor:
        tckd, nckd = _dkd_weighted(ratios, target)
        return self.target_weight * tckd + self.nontarget_weight * nckd

    def per_sample(self, ratios: LogRatios) -> Tensor:
        """DKD with the teacher's top class as the target (no labels at hand)."""
        return self._weighted(ratios, ratios.log_p.argmax(dim=-1))

    def forward(  # noqa: D102
        self,
        teacher_logits: Tensor,
        student_logits: Tensor,
        temperature: float = 1.0,
        target: Tensor | None = None,
    ) -> Tensor:
        ratios = self.ratios(teacher_logits, student_logits, temperature)
        return _batch_mean(self._weighted(ratios, _check_target(target, teacher_logits)))

    def loss(  # noqa: D102
        self,
        teacher_logits: Tensor,
        student_logits: Tensor,
        temperature: float = 1.0,
        target: Tensor | None = None,
    ) -> Tensor:
        scale = self.scale(temperature)
        return scale * self.forward(teacher_logits, student_logits, temperature, target)

    def extra_repr(self) -> str:  # noqa: D102
        own = f"target_weight={self.target_weight}, nontarget_weight={self.nontarget_weight}"
        return ", ".join(filter(None, [own, super().extra_repr()]))


def build_divergence(spec: str | dict | Divergence) -> Divergence:
    """A divergence from a name (``"kl"``), a mapping (``{"name": "renyi", "alpha": 0.5}``) or an instance."""
    return build(DIVERGENCES, spec, base=Divergence)
