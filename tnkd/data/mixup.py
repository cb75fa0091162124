"""Mixup (Zhang et al. 2018): train on convex combinations of pairs of images.

A batch ``x`` becomes ``lam * x + (1 - lam) * x[perm]`` with one weight ``lam ~ Beta(alpha,
alpha)`` per batch and a random pairing ``perm``; the labels are mixed in the loss,
``lam * CE(z, y) + (1 - lam) * CE(z, y[perm])``. For distillation the teacher labels the mixed
image itself, a target between the two classes that labels alone cannot give (Beyer et al.
2022, "Knowledge distillation: a good teacher is patient and consistent": "function matching"
on mixed images). The draws are a function of ``(seed, step)`` only, so a resumed run mixes the
same pairs with the same weights.

Example:
    >>> x = torch.arange(4.0).view(4, 1)
    >>> mixed, perm, lam = mixup(x, alpha=0.2, seed=0, step=0)
    >>> bool(torch.allclose(mixed, lam * x + (1 - lam) * x[perm]))
    True
"""

from __future__ import annotations

import numpy as np
import torch


def mixup_draw(batch: int, alpha: float, seed: int, step: int) -> tuple[torch.Tensor, float]:
    """The pairing (a permutation of ``batch``) and weight ``lam ~ Beta(alpha, alpha)`` of a step."""
    rng = np.random.default_rng([seed, step, 0x5EED])
    lam = float(rng.beta(alpha, alpha))
    return torch.from_numpy(rng.permutation(batch)), lam


def mixup(
    x: torch.Tensor, alpha: float, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(lam * x + (1 - lam) * x[perm], perm, lam)`` for this ``(seed, step)``."""
    perm, lam = mixup_draw(len(x), alpha, seed, step)
    perm = perm.to(x.device)
    return lam * x + (1 - lam) * x.index_select(0, perm), perm, lam
