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
  ``divergence: {name: renyi, alpha: 0.5}`` or a ``class_path``;
* takes ``standardize: true`` (every module): logit standardization (Sun et al. 2024), each
  sample's logits z-scored before the temperature (:func:`standardize_logits`).

Besides the divergences proper, the registry holds decoupled KD (``dkd``, Zhao et al. 2022),
which weighs the target-class and non-target-class parts of KL separately and so needs the
labels (:class:`DecoupledKD`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    dtype = _working_dtype(teacher_logits, student_logits)
    log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    return log_p, log_q


def _working_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def standardize_logits(logits: Tensor) -> Tensor:
    """Each sample's logits z-scored over the classes (logit standardization, Sun et al. 2024).

    Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024:
    ``Z(x) = (x - mean(x)) / std(x)``, with the standard deviation over the classes taken with
    Bessel's correction (``n - 1``), as in the paper's code; a row whose logits are all equal
    becomes zeros. Distilling ``softmax(Z(v) / T)`` into ``softmax(Z(z) / T)`` frees the student
    from matching the teacher's logit range (only its ordering and relative gaps), and makes the
    loss invariant to shifting and positively scaling either side's logits. Computed in float32
    or higher; a row whose spread is at the rounding level of its values counts as constant.

    Example:
        >>> standardize_logits(torch.tensor([[1.0, 2.0, 3.0]]))
        tensor([[-1.,  0.,  1.]])
    """
    x = logits.to(_working_dtype(logits))
    centered = x - x.mean(dim=-1, keepdim=True)
    n = x.shape[-1]
    std = (centered.square().sum(dim=-1, keepdim=True) / max(n - 1, 1)).sqrt()
    # a row whose spread is at rounding level is constant: zeros, not amplified rounding noise
    flat = std <= 16 * torch.finfo(x.dtype).eps * x.abs().amax(dim=-1, keepdim=True)
    return torch.where(flat, torch.zeros_like(x), centered / torch.where(flat, 1.0, std))


# ---- accurate log-ratios -----------------------------------------------------------------------
#
# Every divergence here is a sum over classes of terms in p, q and the log-ratio
# r = log p - log q. Written naively (sum p (log p - log q), log sum p^a q^(1-a) ...) the terms
# are first order in r while the result is second order: at high temperature (r ~ 1/T) float32
# then cancels to noise (KL at T = 1e6 came out at -7e4; its float64 value is 8.07). So
#
# * r is computed from the logit difference (v - z) / T, and its per-row constant is refined
#   once, so that sum_j q_j exp(r_j) = 1 holds to rounding;
# * each divergence is written with terms that are all of the result's order, using
#   g(x) = exp(x) - 1 - x evaluated by its series near 0 (for example KL = sum_j p_j g(-r_j),
#   since sum_j p_j (exp(-r_j) - 1) = sum_j (q_j - p_j) = 0).
#
# The result is accurate to a few units of the working precision relative to its own size, at
# any temperature (tests: float32 against a 60-digit reference at T = 0.05 ... 1e4).

#: |x| below which g(x) = exp(x) - 1 - x and its relatives are evaluated by their series
_SERIES_RADIUS = 0.5
#: terms of the series (x^2/2! ... x^19/19!): the remainder is below 1e-22 of g at |x| <= 0.5
_SERIES_TERMS = 18


@dataclass
class LogRatios:
    """Log-probabilities at temperature T and the accurate log-ratio of one (teacher, student) pair.

    Attributes:
        log_p: teacher log-probabilities (``-inf`` where the teacher gives zero probability).
        log_q: student log-probabilities (finite).
        r: ``log p - log q``, accurate where both are close; 0 outside the teacher's support.
        support: where ``p > 0``.
    """

    log_p: Tensor
    log_q: Tensor
    r: Tensor
    support: Tensor

    def swapped(self) -> LogRatios:
        """The same pair with the roles of P and Q exchanged (used for reverse divergences).

        Valid where the student's support (everything) is the new "P" support: the teacher's
        zeros become ``r = +inf`` points, which callers treat by their own convention.
        """
        return LogRatios(self.log_q, self.log_p, -self.r, self.support)


def _series_h(x: Tensor) -> Tensor:
    """1/2! + x/3! + x^2/4! + ...: h(x) = g(x) / x^2 for |x| <= the series radius."""
    out = torch.full_like(x, 1.0 / math.factorial(_SERIES_TERMS + 1))
    for n in range(_SERIES_TERMS, 1, -1):
        out = out * x + 1.0 / math.factorial(n)
    return out


def _series_g(x: Tensor) -> Tensor:
    """x^2/2! + x^3/3! + ...: g(x) = exp(x) - 1 - x for |x| <= the series radius."""
    return x * x * _series_h(x)


def _h(x: Tensor) -> Tensor:
    """g(x) / x^2 = 1/2 + x/6 + ..., finite at 0."""
    small = x.abs() <= _SERIES_RADIUS
    series = _series_h(torch.where(small, x, torch.zeros_like(x)))
    xl = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, series, (torch.expm1(xl) - xl) / (xl * xl))


def _log1p_over(y: Tensor) -> Tensor:
    """log(1 + y) / y, 1 at y = 0 (y > -1)."""
    small = y.abs() <= 1e-3
    ys = torch.where(small, y, torch.zeros_like(y))
    series = 1 - ys / 2 + ys * ys / 3 - ys * ys * ys / 4 + ys**4 / 5
    yl = torch.where(small, torch.ones_like(y), y)
    return torch.where(small, series, torch.log1p(yl) / yl)


def _masked(mask: Tensor, value: Tensor, fill: float = 0.0) -> Tensor:
    """``value`` where ``mask``, else ``fill``, with a zero (never NaN) gradient outside."""
    safe = torch.where(mask, value, torch.zeros_like(value))
    return torch.where(mask, safe, torch.full_like(value, fill))


def log_ratios(
    teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0, validate: bool = True
) -> LogRatios:
    """Log-probabilities and the accurate log-ratio ``r = log p - log q`` at temperature T.

    ``r`` is the logit difference ``(v - z) / T`` less a per-row constant, first
    ``logsumexp(v/T) - logsumexp(z/T)``, then refined by ``log sum_j q_j exp(r_j)`` (computed
    with ``log1p``/``expm1`` when r is small), so that ``sum_j q_j exp(r_j) = 1`` holds to
    rounding even where the two distributions are close.
    """
    temperature = check_temperature(temperature)
    if validate:
        _check_logits(teacher_logits, student_logits)
    dtype = _working_dtype(teacher_logits, student_logits)
    v, z = teacher_logits.to(dtype), student_logits.to(dtype)
    a, b = v / temperature, z / temperature
    log_p = F.log_softmax(a, dim=-1)
    log_q = F.log_softmax(b, dim=-1)
    support = log_p > -math.inf
    first = torch.logsumexp(a, dim=-1, keepdim=True) - torch.logsumexp(b, dim=-1, keepdim=True)
    d = _masked(support, (torch.where(support, v, z) - z) / temperature - first)
    # refine the constant: c = log sum_{p > 0} q_j exp(d_j)
    small = (d.abs() <= _SERIES_RADIUS).all(dim=-1, keepdim=True)
    q = log_q.exp()
    outside = _masked(~support, q).sum(-1, keepdim=True)
    near = torch.log1p(
        _masked(support, q * torch.expm1(torch.where(small, d, torch.zeros_like(d)))).sum(
            -1, keepdim=True
        )
        - outside
    )
    far = torch.logsumexp(_masked(support, log_q + d, -math.inf), dim=-1, keepdim=True)
    c = torch.where(small, near, far)
    return LogRatios(log_p, log_q, _masked(support, d - c), support)


def _kl_terms(log_w: Tensor, log_u: Tensor, rho: Tensor, support: Tensor) -> Tensor:
    """Per-class terms of KL(W || U) that add up without cancellation.

    KL(W || U) = sum_j w_j g(-rho_j) + U(outside W's support), with rho = log w - log u, since
    sum_j w_j (exp(-rho_j) - 1) = U(supp W) - 1. Near rho = 0 the series of g is used; elsewhere
    w g(-rho) = u - w + w rho, which never overflows.
    """
    w, u = log_w.exp(), log_u.exp()
    small = support & (rho.abs() <= _SERIES_RADIUS)
    near = w * _series_g(-torch.where(small, rho, torch.zeros_like(rho)))
    far = u - w + w * _masked(support, rho)
    return torch.where(small, near, torch.where(support, far, u))


def _kl_from(lr: LogRatios) -> Tensor:
    """Per-sample KL(P || Q)."""
    return _kl_terms(lr.log_p, lr.log_q, lr.r, lr.support).sum(-1)


def _renyi_from(lr: LogRatios, alpha: float) -> Tensor:
    """Per-sample D_alpha(P || Q) for ``alpha >= 1/2`` (see :func:`_renyi_core`)."""
    return _renyi_core(lr.log_p, lr.log_q, lr.r, lr.support, alpha)


def _renyi_core(log_w: Tensor, log_u: Tensor, rho: Tensor, support: Tensor, order: float) -> Tensor:
    """Per-sample Renyi divergence D_order(W || U), accurate for ``order >= 1/2``.

    With beta = order - 1 and S = sum_{w > 0} w exp(beta rho), D = log(S) / beta. Near
    ``beta rho = 0``, S - 1 = beta Y with Y = KL(W || U) + beta sum w rho^2 h(beta rho),
    h(x) = g(x) / x^2, so D = Y log1p(beta Y) / (beta Y): smooth through order = 1 (KL) and
    free of the first-order cancellation of S - 1. Far from it (some |beta rho| > 1), D is
    ``logsumexp(log w + beta rho) / beta``, accurate because D is then not small.
    """
    beta = order - 1.0
    finite = support & torch.isfinite(rho)
    x = beta * _masked(finite, rho)
    near_row = (~support | (finite & (x.abs() <= 1.0))).all(dim=-1, keepdim=True)
    # the near branch sees only rows where it is used (others: rho = 0), so that neither
    # branch can feed inf or NaN into the other's gradient
    rho_n = _masked(finite & near_row, rho)
    x_n = beta * rho_n
    kl = _kl_terms(log_w, torch.where(near_row, log_u, log_w), rho_n, support).sum(-1)
    curvature = _masked(support, log_w.exp() * rho_n * rho_n * _h(x_n)).sum(-1)
    y = kl + beta * curvature
    near_row = near_row.squeeze(-1)
    near = y * _log1p_over(torch.where(near_row, beta * y, torch.zeros_like(y)))
    if beta == 0:
        return near
    log_w_far = torch.where(support, log_w, torch.zeros_like(log_w))
    rho_far = torch.where(support, rho, torch.zeros_like(rho))
    terms = torch.where(support, log_w_far + beta * rho_far, torch.full_like(rho, -math.inf))
    far = torch.logsumexp(terms, dim=-1) / beta
    return torch.where(near_row, near, far)


def _renyi(lr: LogRatios, alpha: float) -> Tensor:
    """Per-sample D_alpha(P || Q) for any alpha >= 0 (inf included)."""
    if alpha == 0:
        q_out = _masked(~lr.support, lr.log_q.exp()).sum(-1)
        return -torch.log1p(-q_out)
    if math.isinf(alpha):
        return _masked(lr.support, lr.r, -math.inf).amax(-1)
    if alpha >= 0.5:
        return _renyi_from(lr, alpha)
    # skew symmetry: D_a(P || Q) = a / (1 - a) D_(1-a)(Q || P), with 1 - a > 1/2
    return alpha / (1 - alpha) * _reverse_order(lr, alpha)


def _reverse_order(lr: LogRatios, alpha: float) -> Tensor:
    """Per-sample D_(1-alpha)(Q || P) for 0 < alpha < 1/2 (the student's mass is everywhere)."""
    everywhere = torch.ones_like(lr.support)
    rho = torch.where(lr.support, -lr.r, torch.full_like(lr.r, math.inf))
    return _renyi_core(lr.log_q, lr.log_p, rho, everywhere, 1 - alpha)


def _reverse_kl_from(lr: LogRatios) -> Tensor:
    """Per-sample KL(Q || P); where P is zero, log p is floored at log(smallest normal float)."""
    floor = math.log(torch.finfo(lr.log_p.dtype).tiny)
    log_p = lr.log_p.clamp_min(floor)
    rho = torch.where(lr.support, -lr.r, lr.log_q - log_p)
    everywhere = torch.ones_like(lr.support)
    return _kl_terms(lr.log_q, log_p, rho, everywhere).sum(-1)


def _mixture_ratio(
    r: Tensor, log_a: Tensor, log_b: Tensor, weight: float, support: Tensor
) -> Tensor:
    """The log-ratio log a - log m for m = weight a + (1 - weight) b, accurate where a ~ b.

    m / a = 1 + (1 - weight) expm1(-(log a - log b)); ``r`` is log a - log b where both are
    positive.
    """
    small = support & (r.abs() <= _SERIES_RADIUS)
    rs = torch.where(small, r, torch.zeros_like(r))
    near = -torch.log1p((1 - weight) * torch.expm1(-rs))
    log_m = torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))
    far = log_a - log_m
    return torch.where(small, near, _masked(support, far))


def _js_from(lr: LogRatios) -> Tensor:
    """Per-sample JS(P, Q) = KL(P || M) / 2 + KL(Q || M) / 2, M = (P + Q) / 2."""
    log_m = torch.logaddexp(lr.log_p, lr.log_q) - math.log(2.0)
    everywhere = torch.ones_like(lr.support)
    s_p = _mixture_ratio(lr.r, lr.log_p, lr.log_q, 0.5, lr.support)
    s_q = _mixture_ratio(
        torch.where(lr.support, -lr.r, torch.zeros_like(lr.r)),
        lr.log_q,
        lr.log_p,
        0.5,
        everywhere,
    )
    s_q = torch.where(lr.support, s_q, torch.full_like(s_q, math.log(2.0)))
    kl_p = _kl_terms(lr.log_p, log_m, s_p, lr.support).sum(-1)
    kl_q = _kl_terms(lr.log_q, log_m, s_q, everywhere).sum(-1)
    return 0.5 * kl_p + 0.5 * kl_q


def _hellinger_from(lr: LogRatios) -> Tensor:
    """Per-sample H^2 = sum (sqrt p - sqrt q)^2 / 2 (= 1 - sum sqrt(p q))."""
    small = lr.support & (lr.r.abs() <= _SERIES_RADIUS)
    rs = torch.where(small, lr.r, torch.zeros_like(lr.r))
    near = lr.log_p.exp() * torch.expm1(-rs / 2) ** 2
    far = (_masked(lr.support, (lr.log_p / 2).exp()) - (lr.log_q / 2).exp()) ** 2
    return 0.5 * torch.where(small, near, far).sum(-1)


def _tv_from(lr: LogRatios) -> Tensor:
    """Per-sample TV = sum |p - q| / 2."""
    small = lr.support & (lr.r.abs() <= _SERIES_RADIUS)
    rs = torch.where(small, lr.r, torch.zeros_like(lr.r))
    near = lr.log_p.exp() * torch.expm1(-rs).abs()
    far = (lr.log_p.exp() - lr.log_q.exp()).abs()
    return 0.5 * torch.where(small, near, far).sum(-1)


def _skew_kl_from(lr: LogRatios, skew: float) -> Tensor:
    """Per-sample KL(P || skew P + (1 - skew) Q)."""
    if skew == 0:
        return _kl_from(lr)
    log_m = torch.logaddexp(lr.log_p + math.log(skew), lr.log_q + math.log1p(-skew))
    s = _mixture_ratio(lr.r, lr.log_p, lr.log_q, skew, lr.support)
    return _kl_terms(lr.log_p, log_m, s, lr.support).sum(-1)


def _dkd_parts(lr: LogRatios, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample ``(TCKD, NCKD, 1 - p_t)`` of decoupled KD (see :func:`decoupled_kd`).

    TCKD is the binary KL between ``(p_t, 1 - p_t)`` and ``(q_t, 1 - q_t)``; NCKD the KL between
    the non-target distributions ``p_j / (1 - p_t)`` and ``q_j / (1 - q_t)``, j != t. Both are
    built from the accurate log-ratios: the binary log-ratio of the non-target mass is
    ``log sum_{j != t} w_j exp(r_j)`` with ``w_j = q_j / (1 - q_t)``, taken as ``log1p`` of a sum
    of ``expm1`` where the ratios are small, so neither part cancels at high temperature.
    """
    t = target.unsqueeze(-1)
    is_t = torch.zeros_like(lr.support).scatter(-1, t, True)
    rest = ~is_t
    log_p_rest = torch.logsumexp(torch.where(rest, lr.log_p, -math.inf), dim=-1, keepdim=True)
    log_q_rest = torch.logsumexp(torch.where(rest, lr.log_q, -math.inf), dim=-1, keepdim=True)
    # rho_rest = log(P_rest / Q_rest) = log sum_{j != t} w_j exp(r_j), p_j = 0 terms giving 0
    in_rest = rest & lr.support
    w = torch.where(rest, (lr.log_q - log_q_rest).exp(), torch.zeros_like(lr.log_q))
    small = (~in_rest | (lr.r.abs() <= _SERIES_RADIUS)).all(dim=-1, keepdim=True)
    r_small = torch.where(small & in_rest, lr.r, torch.zeros_like(lr.r))
    near_sum = (w * torch.where(in_rest, torch.expm1(r_small), -torch.ones_like(r_small))).sum(
        -1, keepdim=True
    )
    has_rest = log_p_rest > -math.inf
    near = torch.log1p(torch.where(has_rest, near_sum, torch.zeros_like(near_sum)))
    far = torch.where(has_rest, log_p_rest, torch.zeros_like(log_p_rest)) - log_q_rest
    rho_rest = torch.where(small, near, far)
    # TCKD: binary KL
    log_w = torch.cat([lr.log_p.gather(-1, t), log_p_rest], dim=-1)
    log_u = torch.cat([lr.log_q.gather(-1, t), log_q_rest], dim=-1)
    rho = torch.cat([lr.r.gather(-1, t), rho_rest], dim=-1)
    support = torch.cat([lr.support.gather(-1, t), has_rest], dim=-1)
    tckd = _kl_terms(log_w, log_u, _masked(support, rho), support).sum(-1)
    # NCKD: KL of the renormalised non-target distributions (0 where the teacher has no rest)
    safe_rest = torch.where(has_rest, log_p_rest, torch.zeros_like(log_p_rest))
    log_w_hat = torch.where(in_rest & has_rest, lr.log_p - safe_rest, -math.inf)
    log_u_hat = torch.where(rest & has_rest, lr.log_q - log_q_rest, -math.inf)
    rho_hat = _masked(in_rest & has_rest, lr.r - rho_rest)
    nckd = _kl_terms(log_w_hat, log_u_hat, rho_hat, in_rest & has_rest).sum(-1)
    return tckd, nckd, safe_rest.exp().squeeze(-1) * has_rest.squeeze(-1)


def _batch_mean(per_sample: Tensor) -> Tensor:
    return per_sample.mean()


# ---- functional twins --------------------------------------------------------------------------


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
