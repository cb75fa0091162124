"""Accurate log-ratios r = log p - log q and the cancellation-free terms built on them.

The divergences of :mod:`tnkd.divergences` are sums over classes of terms in p, q and r; this
module computes them so that float32 stays accurate at any temperature (see the comment below).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tnkd.divergences.logits import (
    _check_logits,
    _working_dtype,
    check_temperature,
)

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
    """The mean over the batch; an empty batch is refused (its mean would be NaN)."""
    if per_sample.numel() == 0:
        raise ValueError(
            f"a divergence of an empty batch (per-sample values of shape "
            f"{tuple(per_sample.shape)}) is undefined: it is a mean over the samples; give at "
            "least one sample, or use the divergence's per_sample for per-sample values"
        )
    return per_sample.mean()
