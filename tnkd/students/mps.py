"""Matrix-product-state (MPS) classifier: a chain of cores with the label index on one core.

Diagram (sites 0..N-1, output core ``O`` after ``p = label_position`` sites)::

    left - A_0 - ... - A_{p-1} - O - A_p - ... - A_{N-1} - right
            |            |       |    |            |
          phi(x_0)  phi(x_{p-1}) c  phi(x_p)   phi(x_{N-1})

Each ``A_i`` is a (D, d, D) core, ``O`` is (D, C, D), ``left``/``right`` are (D,) boundary
vectors. The exact value f_c(x) is a multilinear function of the feature vectors (with the
``[1, x]`` map: of the inputs themselves; Stoudenmire & Schwab 2016, Novikov et al. 2016).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch

from tnkd.feature_maps import FeatureMap, build_feature_map
from tnkd.students.base import check_positive_int, near_identity_cores, site_values
from tnkd.students.graph import GraphStudent
from tnkd.tn.decompositions import tt_svd
from tnkd.tn.graph import TNGraph, connect, make_node

PARAMETER_NAMES = {"sites": "cores", "left": "left", "right": "right", "output": "output_core"}
RENAMED_METHODS = {"tree": "log_depth", "sweep": "scan"}  # the chain kernels' older names


def chain_graph(chain: list[Any], sites: list[Any], label_node: Any) -> TNGraph:
    """Nodes joined in a row (``right`` to ``left``, bonds ``bond_k``), input ``x_i`` on site i.

    Args:
        chain: the nodes in order, each with axes ``left`` and/or ``right``.
        sites: the nodes with an input axis ``phys``, in site order.
        label_node: the node whose ``label`` axis is the graph's output.

    Returns:
        The graph (drawn left to right) with input nodes ``x_0 ..`` on edges ``phys_0 ..``.
    """
    for k, (a, b) in enumerate(itertools.pairwise(chain)):
        connect(a, "right", b, "left", name=f"bond_{k}")
    inputs = []
    for i, site in enumerate(sites):
        inputs.append(make_node((site["phys"].dimension,), f"x_{i}", ["phys"]))
        connect(site, "phys", inputs[-1], "phys", name=f"phys_{i}")
    label_node["label"].set_name("label")
    return TNGraph(
        nodes=[*chain, *inputs],
        input_nodes=[n.name for n in inputs],
        output_edges=[label_node["label"]],
        positions={n.name: (float(k), 0.0) for k, n in enumerate(chain)},
    )


def mps_graph(
    left: torch.Tensor,
    cores: torch.Tensor,
    right: torch.Tensor,
    output_core: torch.Tensor,
    label_position: int,
) -> TNGraph:
    """The diagram of an MPS classifier: ``left - A_0 .. A_{p-1} - output - A_p .. - right``.

    Args:
        left: (D,) left boundary vector.
        cores: (N, D, d, D) site cores (bond, physical, bond).
        right: (D,) right boundary vector.
        output_core: (D, C, D), the label core.
        label_position: p, the number of sites left of the label core.

    Returns:
        The graph: nodes ``left``, ``site_i``, ``output``, ``right`` and the input nodes ``x_i``.
    """
    sites = [make_node(c, f"site_{i}", ["left", "phys", "right"]) for i, c in enumerate(cores)]
    output = make_node(output_core, "output", ["left", "label", "right"])
    ends = make_node(left, "left", ["right"]), make_node(right, "right", ["left"])
    p = label_position
    return chain_graph([ends[0], *sites[:p], output, *sites[p:], ends[1]], sites, output)


class MPSClassifier(GraphStudent):
    """An MPS with an output (label) core: the graph of :func:`mps_graph`, on the chain engine.

    Args:
        num_sites: chain length N: the number of scalar inputs per sample (64 for 8x8 images).
        num_classes: size C of the label index.
        bond_dim: bond dimension D.
        feature_map: local map of each input (name, mapping or :class:`FeatureMap`):
            ``"linear"`` ([1, x]), ``"trig"`` ([cos, sin]), ``"poly"``, ``"learnable"``.
        label_position: number of sites left of the output core, in ``[0, N]``; default N // 2.
        uniform: share one core between all sites (translation-invariant MPS).
        output, logit_scale: as in :class:`~tnkd.students.graph.GraphStudent` (``"raw"``: the
            exact multilinear value f(x), for regression and exact function evaluation).
        init_std: relative noise of the near-identity initialisation.
        method: as in :class:`~tnkd.students.graph.GraphStudent`: ``"auto"`` (the chain engine,
            its kernel chosen by :func:`tnkd.tn.planner.chain_kernel`), a kernel of the chain
            engine (``"native"``, ``"scan"``, ``"log_depth"``: :func:`tnkd.tn.chain.contract_chain`),
            or another engine that reads the chain's tensors (``"stable"``, ``"reference"``,
            ``"compiled"``); the parameters are the same whichever runs.
        pool: average-pool ``(batch, channels, H, W)`` images by this factor before the feature
            map (2: a 28x28 image becomes 196 sites); ``num_sites`` is the pooled pixel count.
        patch: give each site a ``patch x patch`` block of one-channel images instead of one
            pixel (every pixel kept: 28x28 becomes 196 sites of 4 pixels at ``patch=2``); the
            map must take that many values, e.g. ``{name: learnable, dim: 4, in_features: 4}``.

    Learning rate: Adam moves every core entry by about ``lr`` per step, and all N cores move
    at once, so longer chains and larger D want a smaller ``lr`` (the rates measured:
    ``docs/benchmarks/chain.md``).

    Example:
        >>> mps = MPSClassifier(num_sites=64, num_classes=10, bond_dim=8)
        >>> mps(torch.rand(5, 1, 8, 8)).shape
        torch.Size([5, 10])
    """

    def __init__(
        self,
        num_sites: int,
        num_classes: int,
        bond_dim: int = 10,
        feature_map: str | dict | FeatureMap = "linear",
        label_position: int | None = None,
        uniform: bool = False,
        output: str = "normalized",
        logit_scale: float = 5.0,
        init_std: float = 1e-2,
        method: str = "auto",
        pool: int = 1,
        patch: int = 1,
    ) -> None:
        new = RENAMED_METHODS.get(method)
        if new:
            raise ValueError(f"MPSClassifier method {method!r} is now named {new!r}: use that")
        check_positive_int("student num_sites", num_sites)
        check_positive_int("student pool", pool)
        check_positive_int("student patch", patch)
        if pool > 1 and patch > 1:
            raise ValueError(
                f"student pool={pool} and patch={patch} cannot be combined: pool averages each "
                "block to one pixel, patch gives a site the whole block; choose one"
            )
        check_positive_int("student num_classes", num_classes)
        check_positive_int("student bond_dim", bond_dim)
        p = num_sites // 2 if label_position is None else label_position
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= num_sites:
            raise ValueError(
                f"student label_position must be an integer in [0, {num_sites}], but got {p!r}"
            )
        fmap = build_feature_map(feature_map)
        in_features = getattr(fmap, "in_features", 1)
        if in_features != patch * patch:
            raise ValueError(
                f"student feature map {type(fmap).__name__} takes {in_features} value(s) per site "
                f"but patch={patch} gives each site {patch * patch}; use a map that takes "
                f"{patch * patch}: a scalar map (linear, trig, poly) for one pixel, else e.g. "
                f"{{name: learnable, dim: 4, in_features: {patch * patch}}}"
            )
        bond = bond_dim
        cores = near_identity_cores(1 if uniform else num_sites, bond, fmap.neutral(), init_std)
        left = torch.ones(bond) / math.sqrt(bond) + init_std * torch.randn(bond) / math.sqrt(bond)
        right = torch.ones(bond) / math.sqrt(bond) + init_std * torch.randn(bond) / math.sqrt(bond)
        eye = torch.eye(bond).unsqueeze(1).expand(bond, num_classes, bond)
        output_core = eye + init_std * torch.randn(bond, num_classes, bond) / math.sqrt(bond)
        graph = mps_graph(left, cores.expand(num_sites, -1, -1, -1), right, output_core, p)
        self._init_family(locals(), graph, fmap, tie_sites=uniform, parameter_names=PARAMETER_NAMES)
        self.pool, self.patch = pool, patch
        self.num_inputs = num_sites * pool * pool * patch * patch
        self.bond_dim = bond_dim
        self.label_position = p
        self.uniform = uniform

    @classmethod
    def from_tensor(
        cls,
        coefficients: torch.Tensor,
        feature_map: str | dict | FeatureMap = "linear",
        ranks: int | Sequence[int] | None = None,
        tolerance: float | None = None,
    ) -> MPSClassifier:
        """An MPS (label on the last core, raw output) whose value is a given coefficient tensor.

        ``coefficients`` has shape (d, ..., d, C): f_c(x) = sum_i W[i_1..i_N, c] phi(x_1)_{i_1}
        ... phi(x_N)_{i_N}. Its TT-SVD (:func:`~tnkd.tn.decompositions.tt_svd`, exact unless
        ``ranks`` or ``tolerance`` truncate it) gives the cores; D is the largest TT-rank. With
        the ``[1, x]`` map the coefficients are those of a multilinear polynomial.
        """
        fmap = build_feature_map(feature_map)
        if coefficients.ndim < 2 or any(s != fmap.dim for s in coefficients.shape[:-1]):
            raise ValueError(
                f"coefficients must have shape (d, ..., d, C) with d = {fmap.dim} (the feature "
                f"map's size), but got {tuple(coefficients.shape)}"
            )
        cores = tt_svd(coefficients, ranks=ranks, tolerance=tolerance)
        n = coefficients.ndim - 1
        bond = max(max(c.shape[0], c.shape[-1]) for c in cores)
        mps = cls(n, coefficients.shape[-1], bond, fmap, label_position=n, output="raw")
        mps = mps.to(coefficients.dtype)
        with torch.no_grad():
            for p in (mps.cores, mps.left, mps.right, mps.output_core):
                p.zero_()
            for i, core in enumerate(cores[:-1]):
                mps.cores[i, : core.shape[0], :, : core.shape[2]] = core
            mps.left[0] = mps.right[0] = 1.0
            mps.output_core[: cores[-1].shape[0], :, 0] = cores[-1][:, :, 0]
        return mps

    # ---- evaluation ------------------------------------------------------------------------
    def site_cores(self) -> torch.Tensor:
        """(N, D, d, D) cores (a broadcast view of the shared core when ``uniform``)."""
        return self.cores.expand(self.num_sites, -1, -1, -1) if self.uniform else self.cores

    def flatten_input(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, num_sites)`` site inputs (``(batch, num_sites, patch^2)`` with patches).

        Pools when ``pool > 1``, cuts patches when ``patch > 1``; checks the size.
        """
        block = max(self.pool, self.patch)
        if block == 1:
            return super().flatten_input(x)
        option = f"pool={self.pool}" if self.pool > 1 else f"patch={self.patch}"
        if x.dim() != 4 or x.shape[2] % block or x.shape[3] % block:
            raise ValueError(
                f"MPSClassifier with {option} expects (batch, channels, H, W) images with H "
                f"and W divisible by {block}, but got shape {tuple(x.shape)}"
            )
        super().flatten_input(x)  # checks num_inputs = num_sites * block^2
        return site_values(x, self.pool, self.patch)
