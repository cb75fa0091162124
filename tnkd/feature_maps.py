"""Local feature maps: each scalar input x_i becomes a vector phi(x_i) of size ``dim``.

A chain student contracts phi(x_i) into the physical leg of site i, so the map decides which
functions the network can express. Functional twins (``linear_features`` ...) work on plain
tensors; the ``nn.Module`` wrappers are what students hold and what YAML names.

Every map also exposes ``neutral``: a weight vector w with ``w . phi(x) ~= 1`` for typical
inputs, used for near-identity initialisation of the cores (so that long chains start as
products of near-identity matrices and neither overflow nor vanish).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tnkd.registry import Registry, build

FEATURE_MAPS: Registry[type[FeatureMap]] = Registry("feature map")


def linear_features(x: torch.Tensor) -> torch.Tensor:
    """The multilinear map phi(x) = [1, x] (Novikov et al. 2016, "Exponential machines").

    With it an MPS spans exactly the multilinear polynomials of its inputs.
    """
    return torch.stack([torch.ones_like(x), x], dim=-1)


def trig_features(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = [cos(pi x / 2), sin(pi x / 2)] (Stoudenmire & Schwab 2016); unit norm for all x."""
    angle = x * (math.pi / 2)
    return torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)


def polynomial_features(x: torch.Tensor, degree: int) -> torch.Tensor:
    """phi(x) = [1, x, x^2, ..., x^degree]."""
    return torch.stack([x**k for k in range(degree + 1)], dim=-1)


class FeatureMap(nn.Module):
    """Base class: maps ``(..., num_sites)`` scalars to ``(..., num_sites, dim)`` features."""

    dim: int

    def neutral(self) -> torch.Tensor:
        """Weights w (shape ``(dim,)``) with ``w . phi(x) ~= 1``; used to initialise cores."""
        w = torch.zeros(self.dim)
        w[0] = 1.0
        return w


@FEATURE_MAPS.register("linear", "multilinear")
class LinearFeatureMap(FeatureMap):
    """[1, x]: see :func:`linear_features`."""

    dim = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return linear_features(x)


@FEATURE_MAPS.register("trig", "cos_sin")
class TrigFeatureMap(FeatureMap):
    """[cos(pi x/2), sin(pi x/2)]: see :func:`trig_features`.

    ``neutral`` is (1, 1): exact (=1) at x = 0 and x = 1, at most sqrt(2) in between.
    """

    dim = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return trig_features(x)

    def neutral(self) -> torch.Tensor:  # noqa: D102
        return torch.ones(2)


@FEATURE_MAPS.register("poly", "polynomial")
class PolynomialFeatureMap(FeatureMap):
    """[1, x, ..., x^degree]: see :func:`polynomial_features`.

    Args:
        degree: highest power, >= 1.
    """

    def __init__(self, degree: int = 2) -> None:
        super().__init__()
        if not isinstance(degree, int) or degree < 1:
            raise ValueError(f"feature map degree must be an integer >= 1, but got {degree!r}")
        self.degree = degree
        self.dim = degree + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return polynomial_features(x, self.degree)


@FEATURE_MAPS.register("learnable", "learned")
class LearnableFeatureMap(FeatureMap):
    """phi(x) = [1, relu(A u + b)]: a small learned map of a site's input u.

    ``u`` is a scalar per site (``in_features=1``) or a patch of ``in_features`` values (the
    tensor-train network of Khrulkov et al. 2018 uses such a map f_theta on image patches).
    The constant first channel keeps near-identity initialisation exact.

    Args:
        dim: output size (>= 2: one constant channel plus ``dim - 1`` learned ones).
        in_features: inputs per site (1 for pixels, patch size for patches).
        num_sites: if given, every site gets its own ``A, b`` (a linear layer per site);
            otherwise one map is shared by all sites.
    """

    def __init__(self, dim: int = 4, in_features: int = 1, num_sites: int | None = None) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 2:
            raise ValueError(f"learnable feature map dim must be an integer >= 2, but got {dim!r}")
        self.dim = dim
        self.in_features = in_features
        sites = 1 if num_sites is None else num_sites
        self.weight = nn.Parameter(
            torch.randn(sites, in_features, dim - 1) / math.sqrt(in_features)
        )
        self.bias = nn.Parameter(torch.zeros(sites, dim - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(..., num_sites)`` pixels (or ``(..., num_sites, in_features)`` patches)."""
        u = x.unsqueeze(-1) if self.in_features == 1 else x
        sites = u.shape[-2]
        weight = self.weight.expand(sites, -1, -1) if self.weight.shape[0] == 1 else self.weight
        bias = self.bias.expand(sites, -1) if self.bias.shape[0] == 1 else self.bias
        h = torch.relu(torch.einsum("...ni,nio->...no", u, weight) + bias)
        return torch.cat([torch.ones_like(h[..., :1]), h], dim=-1)


def build_feature_map(spec: str | dict | FeatureMap) -> FeatureMap:
    """Build a feature map from a name (``"trig"``), a mapping (``{name: poly, degree: 3}``) or an instance."""
    return build(FEATURE_MAPS, spec, base=FeatureMap)
