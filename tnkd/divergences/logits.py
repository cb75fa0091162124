"""Input checks, log-probabilities and logit standardization shared by every divergence."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


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
