r"""Tree tensor network classifier: a binary tree over the pixels (or patches) of an image.

Stoudenmire 2018 ("Learning relevant features of data with multi-scale tensor networks") and
Cheng, Wang, Xiang & Zhang 2019 ("Tree tensor networks for generative modeling", and its
classifier) join neighbouring sites pairwise, layer by layer, up to a root that carries the
label. Diagram for 8 sites (in 2D the pairs alternate between rows and columns, so each node
sees a 2x1, 2x2, 4x2, ... block of the image)::

                         root -- label
                       /      \\
                  t2_0          t2_1
                 /    \\        /    \\
             t1_0    t1_1   t1_2    t1_3
             /  \\    /  \\   /  \\    /  \\
            x0  x1  x2  x3 x4  x5  x6  x7      (phi(pixel) on each input node)

A node T[a, b, p] maps its two children's vectors to its parent's: the network is a
hierarchy of learned multilinear poolings. Each bond's dimension is ``min(bond_dim, dims of the
two children multiplied)``: a bond cannot carry more states than exist below it, so the cap
loses nothing (bonds just above 2 pixels with d = 2 have size 4 at most). An odd site out at a
level is passed up unchanged.

**Cost.** Contracting one sample costs about sum over nodes of D^3 (the leaves d^2 D): linear in
the number of sites, so any size is affordable, and the log-scale kept per level makes depth
harmless. Every step joins a node with its two children, so the planner gives the tree to the
tree engine (:mod:`tnkd.tn.fused`; its speed against TensorKrowch's ``Tree``:
``docs/benchmarks/graphs.md``). The parameter count is what limits D:
over the 196 pixels of a 2x2-pooled MNIST image a tree has 32,545 parameters at D = 8 and
209,185 at D = 16 (98 leaves, ~97 D^3 inner nodes).

Example:
    >>> import torch
    >>> tree = TreeClassifier(input_shape=(1, 8, 8), num_classes=10, bond_dim=6)
    >>> tree(torch.rand(3, 1, 8, 8)).shape
    torch.Size([3, 10])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

from tnkd.feature_maps import FeatureMap
from tnkd.students.base import check_positive_int
from tnkd.students.graph import GraphStudent
from tnkd.tn.graph import TNGraph, connect, make_node


def tree_graph(grid: Sequence[int], phys_dim: int, bond_dim: int, num_classes: int) -> TNGraph:
    """A binary tree tensor network over a grid of sites, the label on the root.

    Args:
        grid: the sites' grid, e.g. ``(8, 8)`` for an 8x8 image, ``(64,)`` for a chain of sites.
            Pairs are formed along the last axis first, then the one before, cyclically.
        phys_dim: the feature size of a site.
        bond_dim: the largest bond dimension D.
        num_classes: size of the label leg.

    Returns:
        The graph: input nodes ``x_k`` (site k, row-major), tree nodes ``t{level}_{i}``
        (shape (child, child, parent)) and ``root`` (child, child, label).
    """
    shape = tuple(check_positive_int("tree grid", g) for g in grid)
    check_positive_int("tree phys_dim", phys_dim)
    check_positive_int("tree bond_dim", bond_dim)
    check_positive_int("tree num_classes", num_classes)
    total = math.prod(shape)
    if total < 2:
        raise ValueError(f"a tree needs at least 2 sites, but the grid {shape} has {total}")
    inputs = [make_node((phys_dim,), f"x_{k}", ["phys"]) for k in range(total)]
    # (node, free axis, its size) at each position of the grid, sites row-major
    grid_positions = itertools.product(*map(range, shape))
    items = {pos: (x, "phys", phys_dim) for pos, x in zip(grid_positions, inputs, strict=True)}

    def join(a: tuple, b: tuple, name: str, axis: str, size: int) -> tuple[Any, str, int]:
        node = make_node((a[2], b[2], size), name, ["child0", "child1", axis])
        connect(a[0], a[1], node, "child0", name=f"{a[0].name}-{name}")
        connect(b[0], b[1], node, "child1", name=f"{b[0].name}-{name}")
        return node, axis, size

    dims, nodes = list(shape), []
    level, turn = 0, len(dims) - 1
    while len(items) > 2:
        while dims[turn] == 1:
            turn = (turn - 1) % len(dims)
        level += 1
        new_items: dict[tuple[int, ...], tuple[Any, str, int]] = {}
        count = 0
        for pos in sorted(items):
            if pos[turn] % 2:
                continue
            partner = (*pos[:turn], pos[turn] + 1, *pos[turn + 1 :])
            parent_pos = (*pos[:turn], pos[turn] // 2, *pos[turn + 1 :])
            a, b = items[pos], items.get(partner)
            if b is None:  # the odd site out, passed up unchanged
                new_items[parent_pos] = a
                continue
            up = min(bond_dim, a[2] * b[2])
            new_items[parent_pos] = join(a, b, f"t{level}_{count}", "parent", up)
            nodes.append(new_items[parent_pos][0])
            count += 1
        items = new_items
        dims[turn] = (dims[turn] + 1) // 2
        turn = (turn - 1) % len(dims)
    root = join(*(items[p] for p in sorted(items)), "root", "label", num_classes)[0]
    root["label"].set_name("label")
    return TNGraph(
        nodes=[*nodes, root, *inputs],
        input_nodes=[n.name for n in inputs],
        output_edges=[root["label"]],
    )


class TreeClassifier(GraphStudent):
    """A binary tree tensor network over an image's pixels or patches (see the module docstring).

    Args:
        input_shape: (channels, height, width) of one sample, or (n,) for flat inputs.
        num_classes: size C of the label leg on the root.
        bond_dim: largest bond dimension D (bonds near the leaves are capped, see above).
        feature_map, pool, patch, output, logit_scale, init_std, method:
            as in :class:`~tnkd.students.graph.GraphStudent`.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        bond_dim: int = 8,
        feature_map: str | dict | FeatureMap = "linear",
        pool: int = 1,
        patch: int = 1,
        output: str = "normalized",
        logit_scale: float = 5.0,
        init_std: float = 0.3,
        method: str = "auto",
    ) -> None:
        self._init_on_sites(locals(), tree_graph)
