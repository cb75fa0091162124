"""PEPS classifier: a projected entangled pair state on a small grid of image patches.

Cheng, Chen, Wang & Xiang 2021 ("Supervised learning with projected entangled pair states")
put one tensor on each patch of an image, connect each to its four grid neighbours with bonds of
dimension D, and carry the label on one tensor (here the centre)::

    p0_0 -- p0_1 -- p0_2
     |        |       |
    p1_0 -- p1_1 -- p1_2 -- label      (phi(patch) on the input leg of every node)
     |        |       |
    p2_0 -- p2_1 -- p2_2

Unlike a chain or a tree, the grid has loops: the network is contracted exactly along a path
that ``opt_einsum`` plans once (feature vectors first, then the grid), in one batched kernel per
group of equal steps (:class:`~tnkd.tn.stable.StableNetwork`). The exact cost grows as
D^(min(rows, cols)) per sample, so exact contraction is for small grids (Cheng et al. contract
larger ones approximately, boundary MPS): 4x4 grids up to D = 6 and 7x7 grids at D = 2 train at
about 0.1 s per step of batch 100 on one CPU thread; a 14x14 grid is out of reach exactly
(planned costs: ``docs/benchmarks/graphs.md``, "PEPS cost"). The MNIST grid
(``configs/mnist/grid_peps.yaml``) uses 4x4 at D = 4 with a learned patch map of size 4.

Example:
    >>> import torch
    >>> peps = PEPSClassifier(input_shape=(1, 8, 8), num_classes=10, patch=2, bond_dim=2)
    >>> peps.grid, peps.site_dim
    ((4, 4), 16)
    >>> peps(torch.rand(3, 1, 8, 8)).shape
    torch.Size([3, 10])
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tnkd.feature_maps import FeatureMap
from tnkd.students.base import check_positive_int
from tnkd.students.graph import GraphStudent
from tnkd.tn.graph import TNGraph, connect, make_node


def peps_graph(
    rows: int,
    cols: int,
    phys_dim: int,
    bond_dim: int,
    num_classes: int,
    label_site: Sequence[int] | None = None,
) -> TNGraph:
    """A rows x cols PEPS with an input leg on every node and the label on one node.

    Args:
        rows: grid rows.
        cols: grid columns.
        phys_dim: feature size of a site.
        bond_dim: bond dimension D of every grid edge.
        num_classes: size of the label leg.
        label_site: ``(row, col)`` of the node with the label; default the centre.

    Returns:
        The graph: nodes ``p{i}_{j}`` with axes among ``up, left, right, down`` (those that
        have a neighbour), ``phys``, and ``label`` on the label node; input nodes ``x_k``,
        k = i * cols + j.
    """
    rows = check_positive_int("PEPS rows", rows)
    cols = check_positive_int("PEPS cols", cols)
    check_positive_int("PEPS phys_dim", phys_dim)
    check_positive_int("PEPS bond_dim", bond_dim)
    check_positive_int("PEPS num_classes", num_classes)
    if rows * cols < 2:
        raise ValueError(f"a PEPS needs at least 2 sites, but got a {rows}x{cols} grid")
    li, lj = (rows // 2, cols // 2) if label_site is None else tuple(label_site)
    if not (0 <= li < rows and 0 <= lj < cols):
        raise ValueError(
            f"PEPS label_site must be inside the {rows}x{cols} grid, but got {label_site!r}"
        )
    nodes, inputs, positions = {}, [], {}
    for i, j in itertools.product(range(rows), range(cols)):
        sides = {"up": i > 0, "left": j > 0, "right": j < cols - 1, "down": i < rows - 1}
        axes = [a for a, ok in sides.items() if ok]
        shape = [bond_dim] * len(axes) + [phys_dim]
        axes.append("phys")
        if (i, j) == (li, lj):
            axes.append("label")
            shape.append(num_classes)
        node = nodes[i, j] = make_node(tuple(shape), f"p{i}_{j}", axes)
        if j > 0:  # the bonds to the left and upper neighbours, made before
            connect(nodes[i, j - 1], "right", node, "left", name=f"h{i}_{j - 1}")
        if i > 0:
            connect(nodes[i - 1, j], "down", node, "up", name=f"v{i - 1}_{j}")
        x = make_node((phys_dim,), f"x_{i * cols + j}", ["phys"])
        connect(node, "phys", x, "phys", name=f"phys_{i * cols + j}")
        inputs.append(x)
        positions[node.name] = (float(j), float(-i))
        positions[x.name] = (j + 0.3, -i - 0.3)
    label = nodes[li, lj]["label"]
    label.set_name("label")
    return TNGraph(
        nodes=[*nodes.values(), *inputs],
        input_nodes=[x.name for x in inputs],
        output_edges=[label],
        positions=positions,
    )


class PEPSClassifier(GraphStudent):
    """A PEPS over the patches of an image (see the module docstring).

    Args:
        input_shape: (channels, height, width) of one sample.
        num_classes: size C of the label leg.
        bond_dim: bond dimension D.
        patch: patch side (the grid is (H / patch) x (W / patch)).
        feature_map: the site map: a scalar map gives the product map of the patch's pixels
            (size d^(patch^2)); ``{name: learnable, in_features: patch^2, dim: n}`` learns one.
        label_site: ``(row, col)`` of the label node; default the centre.
        pool, output, logit_scale, init_std, method: as in
            :class:`~tnkd.students.graph.GraphStudent` (pool with ``patch=1``: a grid of pooled
            pixels).
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        bond_dim: int = 3,
        patch: int = 7,
        pool: int = 1,
        feature_map: str | dict | FeatureMap = "linear",
        label_site: Sequence[int] | None = None,
        output: str = "normalized",
        logit_scale: float = 5.0,
        init_std: float = 0.3,
        method: str = "auto",
    ) -> None:
        def draw(grid: tuple[int, ...], dim: int, bond: int, classes: int) -> TNGraph:
            if len(grid) != 2:
                raise ValueError(
                    f"PEPSClassifier needs a one-channel image grid, but the sites form {grid}"
                )
            return peps_graph(*grid, dim, bond, classes, label_site)

        self._init_on_sites(locals(), draw)
