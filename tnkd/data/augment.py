"""Training-time augmentation: random shifts and small rotations, seeded per sample and epoch.

A teacher trained on jittered images knows an invariance the labels do not show, and
distillation can pass it on (Hinton et al. 2015: a distilled MNIST MLP halved its errors with a
teacher trained on inputs shifted by up to 2 pixels). Beyer et al. 2022 ("Knowledge
distillation: a good teacher is patient and consistent") add that the student and the teacher
must see *the same* augmented view.

Every image gets an affine map: an integer shift ``(dx, dy)`` drawn uniformly from
``{-shift, ..., shift}`` and a rotation by an angle drawn uniformly from ``[-rotate, rotate]``
degrees about the image centre, applied with ``grid_sample`` (bilinear, zeros outside the
image) to the whole batch on its device. The draws are a function of ``(seed, epoch, sample
position in the epoch)`` only, never of a global random state, so a run stopped mid-epoch and
resumed sees the same views, whatever its batch size or the device.

Two modes (``views``):

* ``views: 0`` (default): a fresh view of every image in every epoch. A distilling student's
  teacher must then run on every batch (the views are never seen twice).
* ``views: K``: K fixed views per image (view 0 is the image itself), one of which is picked
  per image and epoch. The teacher's logits on the K views can be computed once and cached
  (``DistillationModule(teacher_cache=...)``); each epoch then costs no teacher time.

Example:
    >>> aug = Augment(shift=2, rotate=10)
    >>> x = torch.rand(4, 1, 28, 28)
    >>> affine_augment(x, aug.epoch_params(seed=0, epoch=0, n=4)).shape
    torch.Size([4, 1, 28, 28])
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

#: streams of the seeded generators (kept apart from the batch order's ``(seed, epoch)``)
_FRESH, _VIEWS, _CHOICE = 0xA0, 0xA1, 0xA2


def generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from integers through numpy's ``SeedSequence`` (no hash salt)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def affine_augment(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Shift and rotate each image of a batch: ``params[i] = (dx, dy, degrees)``.

    The content of image ``i`` moves ``dx`` pixels right and ``dy`` pixels down and turns by
    ``degrees`` about the image centre (clockwise on screen for positive angles: +90 is ``torch.rot90(x, -1, (2, 3))``);
    pixels that come from outside the image are 0. Integer shifts without rotation move pixels
    exactly (bilinear weights of 0 and 1, up to float rounding).

    Args:
        x: ``(batch, channels, H, W)`` images (flat ``(batch, C*H*W)`` is not accepted).
        params: ``(batch, 3)`` shifts in pixels and angles in degrees, on any device.

    Returns:
        The augmented batch, same shape, dtype and device as ``x``.
    """
    if x.ndim != 4:
        raise ValueError(
            f"augmentation expects (batch, channels, H, W) images, but got shape {tuple(x.shape)}"
        )
    if params.shape != (x.shape[0], 3):
        raise ValueError(
            f"expected augmentation params of shape ({x.shape[0]}, 3), but got {tuple(params.shape)}"
        )
    height, width = x.shape[-2:]
    p = params.to(device=x.device, dtype=torch.float32)
    angle = p[:, 2] * (math.pi / 180)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # theta maps output coordinates to input coordinates, both normalised to [-1, 1]; the
    # rotation is done in pixel units (the aspect factors), the shift pulls from -d
    theta = torch.stack(
        [
            torch.stack([cos, sin * (height / width), -2 * p[:, 0] / width], dim=-1),
            torch.stack([-sin * (width / height), cos, -2 * p[:, 1] / height], dim=-1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.to(x.dtype)


class Augment:
    """Random shifts and rotations of training images (see the module docs).

    Args:
        shift: largest shift in pixels along each axis (integer >= 0).
        rotate: largest rotation in degrees (>= 0).
        views: 0 for a fresh view per image and epoch; K >= 1 for K fixed views per image
            (view 0 is the image itself), one picked per image and epoch.

    In YAML, on a data module: ``augment: {shift: 2, rotate: 10}`` or
    ``augment: {shift: 2, rotate: 10, views: 8}``.
    """

    def __init__(self, shift: int = 0, rotate: float = 0.0, views: int = 0) -> None:
        if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
            raise ValueError(f"augment shift must be an integer >= 0 (pixels), but got {shift!r}")
        if (
            isinstance(rotate, bool)
            or not isinstance(rotate, int | float)
            or not (math.isfinite(rotate) and 0 <= rotate <= 180)
        ):
            raise ValueError(
                f"augment rotate must be a number of degrees in [0, 180], but got {rotate!r}"
            )
        if isinstance(views, bool) or not isinstance(views, int) or views < 0:
            raise ValueError(f"augment views must be an integer >= 0, but got {views!r}")
        self.shift, self.rotate, self.views = shift, float(rotate), views

    @classmethod
    def build(cls, spec: Any) -> Augment | None:
        """An :class:`Augment` from ``None``, a mapping (``{shift: 2, rotate: 10}``) or an instance."""
        if spec is None or isinstance(spec, Augment):
            return spec
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - {"shift", "rotate", "views"})
            if unknown:
                raise ValueError(
                    f"unknown augment key(s) {unknown}; expected shift, rotate and views, "
                    "e.g. {shift: 2, rotate: 10}"
                )
            return cls(**spec)
        raise ValueError(
            f"augment must be a mapping such as {{shift: 2, rotate: 10}} or null, but got {spec!r}"
        )

    def as_dict(self) -> dict[str, Any]:
        """The settings, as given in YAML."""
        return {"shift": self.shift, "rotate": self.rotate, "views": self.views}

    def __repr__(self) -> str:
        return f"Augment(shift={self.shift}, rotate={self.rotate:g}, views={self.views})"

    def _draw(self, gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
        shifts = torch.randint(-self.shift, self.shift + 1, (*shape, 2), generator=gen)
        angles = (torch.rand(shape, generator=gen) * 2 - 1) * self.rotate
        return torch.cat([shifts.float(), angles.unsqueeze(-1)], dim=-1)

    def epoch_params(self, seed: int, epoch: int, n: int) -> torch.Tensor:
        """``(n, 3)`` fresh views of epoch ``epoch`` for sample positions ``0..n-1``."""
        return self._draw(generator(seed, epoch, _FRESH), (n,))

    def view_params(self, seed: int, n: int) -> torch.Tensor:
        """``(views, n, 3)`` fixed views of images ``0..n-1``; view 0 is the identity."""
        params = self._draw(generator(seed, _VIEWS), (self.views, n))
        params[0] = 0.0
        return params

    def view_choice(self, seed: int, epoch: int, n: int) -> torch.Tensor:
        """``(n,)`` the view each sample position shows in epoch ``epoch`` (in ``0..views-1``)."""
        return torch.randint(self.views, (n,), generator=generator(seed, epoch, _CHOICE))
