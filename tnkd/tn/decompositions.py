"""Tensor-train decompositions: TT-SVD (Oseledets 2011) for tensors and for dense weight matrices."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def check_ranks(ranks: int | Sequence[int] | None, count: int, what: str) -> list[int] | None:
    """``count`` inner TT ranks from one int or a sequence (None stays None); raises if not positive."""
    if ranks is None:
        return None
    values = [ranks] * count if isinstance(ranks, int) else list(ranks)
    if len(values) != count or any(
        isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in values
    ):
        raise ValueError(
            f"{what} ranks must be {count} positive integers (or one int), but got {ranks!r}"
        )
    return values


def svd_rank(
    s: torch.Tensor, rank: int | None = None, max_tail: float | None = None, size: int = 0
) -> int:
    """How many of the descending singular values ``s`` a truncated SVD keeps (at least 1).

    At most ``rank``, and the fewest whose discarded tail ``sum(s[r:]^2)`` is at most
    ``max_tail``; with neither, the numerical rank: the values above ``s[0] * size * eps``.
    """
    if rank is None and max_tail is None:
        cutoff = float(s[0]) * size * torch.finfo(s.dtype).eps if s.numel() else 0.0
        return max(int((s > cutoff).sum()), 1)
    keep = s.numel()
    if max_tail is not None:
        tail = torch.flip(torch.cumsum(torch.flip(s**2, [0]), 0), [0])  # tail[r] = sum s[r:]^2
        ok = (tail <= max_tail).nonzero()
        keep = int(ok[0]) if ok.numel() else s.numel()
    return max(keep if rank is None else min(keep, rank), 1)


def tt_svd(
    tensor: torch.Tensor, ranks: int | Sequence[int] | None = None, tolerance: float | None = None
) -> list[torch.Tensor]:
    """Split a d-way tensor into TT cores G_k of shape (r_{k-1}, n_k, r_k), r_0 = r_d = 1.

    Sequential truncated SVDs of the unfoldings (Oseledets 2011, "Tensor-train decomposition",
    Algorithm 1). Ranks are, in order of precedence: the given ``ranks`` (capped by the
    unfoldings' sizes); the smallest ranks whose discarded singular values keep the relative
    Frobenius error below ``tolerance`` (delta = tolerance * ||A|| / sqrt(d - 1) per step); or the
    numerical ranks of the unfoldings (exact reconstruction).

    Example:
        >>> a = torch.randn(3, 4, 5, 6, dtype=torch.float64)
        >>> [c.shape[-1] for c in tt_svd(a)[:-1]]
        [3, 12, 6]
    """
    shape = tuple(tensor.shape)
    d = len(shape)
    if d == 0:
        raise ValueError("tt_svd needs a tensor with at least one dimension")
    wanted = check_ranks(ranks, d - 1, "tt_svd")
    if tolerance is not None and not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"tt_svd tolerance must be a finite number >= 0, but got {tolerance!r}")
    max_tail = None  # the discarded weight allowed per step, delta^2
    if tolerance is not None and d > 1:
        max_tail = (tolerance * float(tensor.norm()) / math.sqrt(d - 1)) ** 2
    cores, rest, r_prev = [], tensor, 1  # the split-off cores, the rest (r_prev n_k, ...)
    for k in range(d - 1):
        mat = rest.reshape(r_prev * shape[k], -1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        r = svd_rank(s, wanted[k]) if wanted else svd_rank(s, None, max_tail, max(mat.shape))
        cores.append(u[:, :r].reshape(r_prev, shape[k], r))
        rest, r_prev = s[:r, None] * vh[:r], r
    cores.append(rest.reshape(r_prev, shape[-1], 1))
    return cores


def tt_to_full(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract TT cores (r_{k-1}, n_k, r_k) back into the full tensor (n_1, ..., n_d)."""
    out = cores[0]
    for core in cores[1:]:
        out = torch.tensordot(out, core, dims=([out.ndim - 1], [0]))
    return out.squeeze(0).squeeze(-1)


def tt_ranks(cores: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """The inner ranks (r_1, ..., r_{d-1})."""
    return tuple(int(c.shape[-1]) for c in cores[:-1])


def check_factors(factors: Sequence[int], size: int, what: str) -> tuple[int, ...]:
    """Raise unless ``factors`` are positive integers whose product is ``size``."""
    values = tuple(factors)
    if not values or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in values):
        raise ValueError(f"{what} must be positive integers, but got {factors!r}")
    if math.prod(values) != size:
        raise ValueError(
            f"{what} {values} multiply to {math.prod(values)} but the size is {size}; choose "
            f"factors whose product is {size} (or leave them out to factorise automatically)"
        )
    return values


def factorize(n: int, parts: int) -> tuple[int, ...]:
    """Split n into ``parts`` integer factors as equal as possible (largest prime factors first).

    Example:
        >>> factorize(4096, 4), factorize(784, 4), factorize(1200, 4)
        ((8, 8, 8, 8), (7, 7, 4, 4), (5, 5, 6, 8))
    """
    primes: list[int] = []
    m, p = n, 2
    while p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    if m > 1:
        primes.append(m)
    factors = [1] * parts
    for prime in sorted(primes, reverse=True):  # each onto the smallest factor so far
        factors[factors.index(min(factors))] *= prime
    return tuple(factors)


def tt_matrix_svd(
    weight: torch.Tensor,
    in_factors: Sequence[int],
    out_factors: Sequence[int],
    ranks: int | Sequence[int] | None = None,
    tolerance: float | None = None,
) -> list[torch.Tensor]:
    """TT-matrix cores (r_{k-1}, m_k, n_k, r_k) of a dense ``(out, in)`` weight (Novikov et al. 2015).

    W is reshaped to (n_1..n_d, m_1..m_d), its axes interleaved to (m_1 n_1, ..., m_d n_d) and
    split by :func:`tt_svd`.
    """
    out_features, in_features = weight.shape
    m = check_factors(in_factors, in_features, "in_factors")
    n = check_factors(out_factors, out_features, "out_factors")
    if len(m) != len(n):
        raise ValueError(f"in_factors and out_factors need the same length, but got {m} and {n}")
    d = len(m)
    w = weight.reshape(*n, *m).permute(*[x for k in range(d) for x in (d + k, k)])
    cores = tt_svd(w.reshape(*[m[k] * n[k] for k in range(d)]), ranks=ranks, tolerance=tolerance)
    return [c.reshape(c.shape[0], m[k], n[k], c.shape[-1]) for k, c in enumerate(cores)]
