"""What every tensor-network student offers, whatever its family."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tnkd.registry import RecordsInitArgs
from tnkd.tn.graph import TNGraph


def scaled_values(values: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """The exact values ``values * exp(log_scale)`` of a contraction kept as values and log-scale.

    ``log_scale`` has one entry per row of ``values`` (shape ``values.shape[:-1]``).
    """
    return values * torch.exp(log_scale).unsqueeze(-1)


def count_parameters(module: nn.Module) -> int:
    """Number of distinct trainable scalars (shared tensors counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def check_positive_int(name: str, value: Any) -> int:
    """Raise a clear error unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, but got {value!r}")
    return value


def check_pair(name: str, value: Any) -> tuple[int, int]:
    """``(value, value)`` for an int, else the pair ``value``; raises unless two integers >= 1."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair, but got {value!r}")
    return check_positive_int(f"{name}[0]", pair[0]), check_positive_int(f"{name}[1]", pair[1])


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """Raise a clear error unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, but got {value!r}")
    return value


def check_init_std(name: str, value: Any) -> float:
    """Raise a clear error unless ``value`` is a finite number >= 0 (an initial noise level)."""
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, but got {value!r}")
    return value


def image_patches(images: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """(batch, C, H, W) -> (batch, (H/ph)(W/pw), C*ph*pw): non-overlapping patches, row-major."""
    b, c, h, w = images.shape
    img = images.reshape(b, c, h // ph, ph, w // pw, pw)
    return img.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // ph) * (w // pw), c * ph * pw)


def site_values(images: torch.Tensor, pool: int, patch: int) -> torch.Tensor:
    """(batch, C, H, W) -> (batch, sites) pixels pooled by ``pool``, or patches if ``patch > 1``."""
    if patch > 1:
        return image_patches(images, patch, patch)
    if pool > 1:
        images = torch.nn.functional.avg_pool2d(images, pool)
    return images.reshape(images.shape[0], -1)


class Student(RecordsInitArgs, nn.Module):
    """Base class of tensor-network students.

    Subclasses set ``num_inputs`` (scalar inputs per sample: the chain length for pixel-level
    chains) and ``num_classes`` (output size), and implement :meth:`to_graph`. Every student
    records the arguments it was built with (:attr:`init_args`), so that a run's configuration
    (W&B, results files) names its bond dimension, chain length, feature map... whichever entry
    point built it.
    """

    num_inputs: int
    num_classes: int

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """``forward``, except that an empty batch gives empty logits ``(0, num_classes)``.

        The contractions reshape by the batch size and would fail on a batch of 0 samples.
        """
        if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == 0:
            param = next(self.parameters(), None)
            floating = param is not None and param.is_floating_point()
            dtype = param.dtype if floating else torch.get_default_dtype()  # type: ignore[union-attr]
            return x.new_zeros((0, self.num_classes), dtype=dtype)
        return super().__call__(x, *args, **kwargs)

    def parameter_count(self) -> int:
        """Number of trainable scalars (shared cores counted once)."""
        return count_parameters(self)

    def compression_ratio(self, teacher: nn.Module | int) -> float:
        """Teacher parameters / student parameters (teacher given as a module or a count).

        The teacher's parameters are all counted, trainable or frozen (distillation freezes it).
        """
        if not isinstance(teacher, int):
            teacher = sum(p.numel() for p in teacher.parameters())
        return teacher / self.parameter_count()

    def to_graph(self) -> TNGraph:
        """The student as ``tensornetwork`` nodes and edges (one sample; inputs as nodes)."""
        raise NotImplementedError

    def draw(self, ax: Any = None, **kwargs: Any) -> Any:
        """Draw the student's diagram with matplotlib (see :meth:`TNGraph.draw`)."""
        return self.to_graph().draw(ax=ax, **kwargs)

    def flatten_input(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten ``(batch, *input_shape)`` to ``(batch, num_inputs)``, checking the size."""
        flat = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # -1 fails on an empty batch
        if flat.shape[1] != self.num_inputs:
            raise ValueError(
                f"{type(self).__name__} expects {self.num_inputs} inputs per sample, but got "
                f"{flat.shape[1]} (input shape {tuple(x.shape[1:])}); set the student's input size "
                f"to {flat.shape[1]} (= {' x '.join(map(str, x.shape[1:]))})"
            )
        return flat

    def extra_repr(self) -> str:  # noqa: D102
        return f"num_inputs={self.num_inputs}, num_classes={self.num_classes}, params={self.parameter_count()}"


def near_identity_cores(
    num: int, bond_dim: int, neutral: torch.Tensor, init_std: float
) -> torch.Tensor:
    """(num, D, d, D) cores with ``A[:, s, :] = neutral[s] I + noise``.

    With ``sum_s phi_s neutral_s ~= 1`` every transfer matrix starts near the identity, so a chain
    of any length starts near a product of identities: it neither overflows nor vanishes. The
    noise has standard deviation ``init_std / sqrt(D)`` so that a random vector's norm grows by
    only about ``(1 + init_std^2)`` per site.
    """
    d = neutral.numel()
    eye = torch.eye(bond_dim)
    cores = neutral.view(1, 1, d, 1) * eye.view(1, bond_dim, 1, bond_dim)
    noise = torch.randn(num, bond_dim, d, bond_dim) * (init_std / math.sqrt(bond_dim))
    return cores.expand(num, -1, -1, -1) + noise
