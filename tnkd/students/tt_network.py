"""Tensor-train network (Khrulkov, Novikov & Oseledets 2018): an RNN-like chain over image patches.

The image is cut into d patches p_1..p_d (row-major). A feature map f_theta (by default the
learnable ``[1, relu(A p + b)]``, shared by all patches) turns each patch into a vector of size
n, and the score of class y is

    l_y(X) = sum_{i_1..i_d} W^y[i_1, ..., i_d] f(p_1)_{i_1} ... f(p_d)_{i_d},

with W in tensor-train format: cores G_1 (n, r), G_2..G_{d-1} (r, n, r) and G_d (r, n, C), the
label index on the last core. Diagram::

    G_1 - G_2 - ... - G_{d-1} - G_d -- label
     |     |             |       |
    f(p_1) f(p_2)     f(p_{d-1}) f(p_d)

With ``equal_cores=True`` the inner cores are one shared tensor G_2 = ... = G_{d-1}: the network
is then a recurrent cell applied d - 2 times (the "recurrent-style" TT network), whose odd/even
matricization of W can reach rank q^(d/2), q = min(n, r - 1) (:func:`iverson_equal_cores`);
random equal cores reach the rank of random different cores at every setting measured in
``notebooks/equal_core_expressivity.ipynb`` (d <= 8, n <= 4, r <= 6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tnkd.feature_maps import FeatureMap, LearnableFeatureMap, build_feature_map
from tnkd.students.base import check_pair, check_positive_int, image_patches, near_identity_cores
from tnkd.students.graph import GraphStudent, image_shape
from tnkd.students.mps import chain_graph
from tnkd.tn.decompositions import tt_to_full
from tnkd.tn.graph import TNGraph, make_node


def tt_graph(first: torch.Tensor, inner: torch.Tensor, last: torch.Tensor) -> TNGraph:
    """The TT network's diagram: ``core_0 (n, r) - core_1 .. core_{d-2} (r, n, r) - core_{d-1}``.

    Args:
        first: (n, r), the first core (an open end).
        inner: (d - 2, r, n, r), the inner cores.
        last: (r, n, C), the last core, which carries the label.

    Returns:
        The graph, with input nodes ``x_0 .. x_{d-1}`` (one per patch).
    """
    d = inner.shape[0] + 2
    nodes = [make_node(first, "core_0", ["phys", "right"])]
    for k in range(1, d - 1):
        nodes.append(make_node(inner[k - 1], f"core_{k}", ["left", "phys", "right"]))
    nodes.append(make_node(last, f"core_{d - 1}", ["left", "phys", "label"]))
    return chain_graph(nodes, nodes, nodes[-1])


class TTNetwork(GraphStudent):
    """Tensor-train network over image patches, with different or equal inner cores.

    Args:
        input_shape: (channels, height, width) of one input (or (height, width)).
        num_classes: size C of the label index.
        patch_size: patch height and width (an int for square patches); must divide the image.
        rank: TT-rank r of the bonds between cores.
        feature_dim: n, the size of each patch's feature vector (for the default learnable map:
            one constant channel plus n - 1 learned ReLU features).
        feature_map: None for the learnable patch map of the paper, or a map name / mapping /
            :class:`FeatureMap` (scalar maps such as ``"linear"`` need ``patch_size=1``).
        equal_cores: share one inner core G_2 = ... = G_{d-1} (recurrent-style network).
        output, logit_scale: as in :class:`~tnkd.students.graph.GraphStudent` (``"raw"``: the
            exact scores l_y(X)).
        init_std: relative noise of the near-identity initialisation.
        method: as in :class:`~tnkd.students.graph.GraphStudent` (``"auto"``: the chain engine).

    Example:
        >>> net = TTNetwork((1, 28, 28), 10, patch_size=4, rank=8, equal_cores=True)
        >>> net(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        patch_size: int | Sequence[int] = 4,
        rank: int = 8,
        feature_dim: int = 4,
        feature_map: str | dict | FeatureMap | None = None,
        equal_cores: bool = False,
        output: str = "normalized",
        logit_scale: float = 5.0,
        init_std: float = 1e-2,
        method: str = "auto",
    ) -> None:
        channels, height, width = image_shape(input_shape, "TTNetwork")
        ph, pw = check_pair("TTNetwork patch_size", patch_size)
        if height % ph or width % pw:
            raise ValueError(
                f"TTNetwork patch_size {ph}x{pw} must divide the image size {height}x{width}; "
                f"choose a patch size whose sides divide {height} and {width}"
            )
        num_patches = (height // ph) * (width // pw)
        if num_patches < 2:
            raise ValueError(
                f"TTNetwork needs at least 2 patches, but patch_size {ph}x{pw} covers the whole "
                f"{height}x{width} image; use smaller patches"
            )
        check_positive_int("TTNetwork num_classes", num_classes)
        check_positive_int("TTNetwork rank", rank)
        patch_numel = channels * ph * pw
        if feature_map is None:  # the paper's learnable patch map
            check_positive_int("TTNetwork feature_dim", feature_dim)
            feature_map = LearnableFeatureMap(dim=feature_dim, in_features=patch_numel)
        fmap = build_feature_map(feature_map)
        in_features = getattr(fmap, "in_features", 1)
        if in_features != patch_numel:
            raise ValueError(
                f"TTNetwork feature map {type(fmap).__name__} takes {in_features} "
                f"value(s) per patch but a {channels}x{ph}x{pw} patch has {patch_numel}; use "
                f"patch_size 1 for scalar maps or feature_map=None (learnable patch map)"
            )
        n, r, c, root = fmap.dim, rank, num_classes, math.sqrt(rank)
        neutral = fmap.neutral()
        first = neutral.view(n, 1) * torch.ones(1, r) / root + init_std * torch.randn(n, r) / root
        inner = near_identity_cores(1 if equal_cores else num_patches - 2, r, neutral, init_std)
        last = neutral.view(1, n, 1) * torch.randn(r, 1, c) / root
        last = last + init_std * torch.randn(r, n, c) / root
        names = {"core_0": "first", "sites": "inner_cores", f"core_{num_patches - 1}": "last"}
        graph = tt_graph(first, inner.expand(num_patches - 2, -1, -1, -1), last)
        self._init_family(locals(), graph, fmap, tie_sites=equal_cores, parameter_names=names)
        self.input_shape = (channels, height, width)
        self.patch_size = (ph, pw)
        self.num_patches = num_patches
        self.num_inputs = channels * height * width
        self.rank = rank
        self.feature_dim = n
        self.equal_cores = equal_cores

    # ---- evaluation ------------------------------------------------------------------------
    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, *input_shape) -> (batch, d, channels * ph * pw) patches in row-major order."""
        flat = self.flatten_input(x)
        return image_patches(flat.view(flat.shape[0], *self.input_shape), *self.patch_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, d, n) feature vectors f(p_k)."""
        p = self.patches(x)
        if p.shape[-1] == 1:
            p = p[..., 0]
        return self.feature_map(p).to(self.first.dtype)

    def cores(self) -> list[torch.Tensor]:
        """The TT cores as (r_{k-1}, n, r_k) tensors, r_0 = 1 and the label as the last rank.

        With equal cores the inner ones are views of the one shared core.
        """
        inner = self.inner_cores.expand(self.num_patches - 2, -1, -1, -1)
        return [self.first.unsqueeze(0), *inner.unbind(0), self.last]

    def full_tensor(self) -> torch.Tensor:
        """The weight tensor W, shape (n, ..., n, C) (d feature indices): only for small d."""
        if self.feature_dim**self.num_patches * self.num_classes > 2**26:
            raise ValueError(
                f"the full tensor would have {self.feature_dim}^{self.num_patches} x "
                f"{self.num_classes} entries; full_tensor is for small networks only"
            )
        return tt_to_full([*self.cores()[:-1], self.last.unsqueeze(-1)])  # label: a last rank


def iverson_equal_cores(n: int, r: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Equal-core TT cores whose tensor has odd/even matricization rank q^(d/2), q = min(n, r - 1).

    Bond state ``r - 1`` means "nothing carried"; states 0..q-1 carry a value. The first core
    starts carrying its index (G_1[i, a] = [i = a]); the shared inner core either starts carrying
    its index (from the empty state) or compares its index with the carried value and returns to
    the empty state; the last core compares (G_d[a, i] = [a = i]). With d even the tensor is
    W[i_1..i_d] = prod_k [i_(2k-1) = i_(2k) < q], whose odd/even matricization is the identity on
    q^(d/2) rows (up to zero rows): rank q^(d/2), with one shared inner core of rank r.

    Returns:
        ``first`` (n, r), ``inner`` (r, n, r) and ``last`` (r, n, 1).
    """
    for name, value in (("n", n), ("r", r), ("d", d)):
        check_positive_int(name, value)
    if r < 2 or d < 2 or d % 2:
        raise ValueError(f"need r >= 2 and an even d >= 2, but got r={r}, d={d}")
    q, empty = min(n, r - 1), r - 1
    first = torch.zeros(n, r)
    inner = torch.zeros(r, n, r)
    last = torch.zeros(r, n, 1)
    for i in range(q):
        first[i, i] = 1.0
        inner[empty, i, i] = 1.0
        inner[i, i, empty] = 1.0
        last[i, i, 0] = 1.0
    return first, inner, last


def odd_even_matricization(tensor: torch.Tensor) -> torch.Tensor:
    """Rows indexed by the odd modes (i_1, i_3, ...), columns by the even ones (i_2, i_4, ...).

    ``tensor`` has the d feature modes only: take one class of a network's coefficients first
    (``net.full_tensor()[..., c]``), or the class axis is counted as a mode.
    """
    d = tensor.ndim
    odd, even = list(range(0, d, 2)), list(range(1, d, 2))
    rows = math.prod(tensor.shape[k] for k in odd)
    return tensor.permute(*odd, *even).reshape(rows, -1)
