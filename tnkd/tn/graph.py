"""Tensor-network graphs in diagram notation, built with ``tensornetwork`` nodes and edges.

A student describes itself as a :class:`TNGraph`: a node per tensor (its parameters, plus one
*input* node per feature vector of a single sample), an edge per contracted index, and the
dangling edges that are the outputs. The graph is for one sample; the contraction engine adds a
batch index to every input node when it compiles the graph (see :mod:`tnkd.tn.contraction`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import tensornetwork as tn
import torch


def make_node(tensor: torch.Tensor | Sequence[int], name: str, axes: Sequence[str]) -> tn.Node:
    """A ``tensornetwork`` node with named axes holding a (detached) torch tensor or zeros of a shape."""
    value = torch.zeros(tuple(tensor)) if not isinstance(tensor, torch.Tensor) else tensor.detach()
    if value.ndim != len(axes):
        raise ValueError(
            f"node {name!r}: expected {value.ndim} axis names for shape {tuple(value.shape)}, got {list(axes)}"
        )
    return tn.Node(value, name=name, axis_names=list(axes), backend="pytorch")


def connect(a: tn.Node, a_axis: str, b: tn.Node, b_axis: str, name: str | None = None) -> tn.Edge:
    """Connect axis ``a_axis`` of ``a`` with axis ``b_axis`` of ``b`` (one bond of the diagram)."""
    if a[a_axis].dimension != b[b_axis].dimension:
        raise ValueError(
            f"cannot connect {a.name}.{a_axis} (size {a[a_axis].dimension}) with "
            f"{b.name}.{b_axis} (size {b[b_axis].dimension}): sizes differ"
        )
    return tn.connect(a[a_axis], b[b_axis], name=name or f"{a.name}.{a_axis}-{b.name}.{b_axis}")


def index_ends(node_indices: Sequence[Sequence[str]]) -> dict[str, list[tuple[int, int]]]:
    """Index name -> its ``(node, axis)`` places, in node order: two for a bond, one if dangling."""
    ends: dict[str, list[tuple[int, int]]] = {}
    for k, indices in enumerate(node_indices):
        for axis, name in enumerate(indices):
            ends.setdefault(name, []).append((k, axis))
    return ends


@dataclass
class NetworkSpec:
    """What the contraction engine needs to know about a graph: names, shapes and index labels.

    Attributes:
        node_names: operand order.
        node_shapes: per-sample shapes (input nodes without their batch index).
        node_indices: one index name per axis, shared by the two ends of an edge.
        input_nodes: names of the nodes that get a batch index.
        output_indices: the dangling indices, in output order.
    """

    node_names: tuple[str, ...]
    node_shapes: tuple[tuple[int, ...], ...]
    node_indices: tuple[tuple[str, ...], ...]
    input_nodes: frozenset[str]
    output_indices: tuple[str, ...]


@dataclass
class TNGraph:
    """A tensor network in diagram notation.

    Attributes:
        nodes: every node, in operand order (parameters and inputs).
        input_nodes: names of the per-sample input nodes.
        output_edges: dangling edges, in output order.
        positions: optional ``name -> (x, y)`` layout for :meth:`draw`.
    """

    nodes: list[tn.Node]
    input_nodes: list[str]
    output_edges: list[tn.Edge]
    positions: dict[str, tuple[float, float]] = field(default_factory=dict)

    def node(self, name: str) -> tn.Node:
        """The node called ``name``."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r}; nodes are {[n.name for n in self.nodes]}")

    def edges(self) -> list[tn.Edge]:
        """All edges (bonds and dangling), each once."""
        return list({id(e): e for n in self.nodes for e in n.edges}.values())

    def spec(self) -> NetworkSpec:
        """Index labels per axis: each edge gets a unique name; the outputs are the dangling edges."""
        names: dict[int, str] = {}
        used: set[str] = set()
        for e in self.edges():
            base = e.name or "e"
            label, k = base, 1
            while label in used:
                k += 1
                label = f"{base}#{k}"
            used.add(label)
            names[id(e)] = label
        node_names = tuple(n.name for n in self.nodes)
        if len(set(node_names)) != len(node_names):
            raise ValueError("node names of a graph must be unique")
        outputs = tuple(names[id(e)] for e in self.output_edges)
        dangling = {names[id(e)] for e in self.edges() if e.is_dangling()}
        if set(outputs) != dangling:
            raise ValueError(
                f"every dangling edge must be an output: dangling {sorted(dangling)}, outputs {list(outputs)}"
            )
        return NetworkSpec(
            node_names=node_names,
            node_shapes=tuple(tuple(int(d) for d in n.shape) for n in self.nodes),
            node_indices=tuple(tuple(names[id(e)] for e in n.edges) for n in self.nodes),
            input_nodes=frozenset(self.input_nodes),
            output_indices=outputs,
        )

    def to_dict(self) -> dict[str, Any]:
        """The diagram as plain data (node names, shapes and axis names; edges; outputs; layout).

        The tensors' values are left out: a student's trained values live in its state dict.
        :meth:`from_dict` builds the same diagram (nodes of zeros) back.
        """
        where = {id(n): n.name for n in self.nodes}

        def end(node: tn.Node, axis: int) -> list[str]:  # [node name, axis name]
            return [where[id(node)], node.axis_names[axis]]

        bonds = [e for e in self.edges() if not e.is_dangling()]
        return {
            "nodes": [[n.name, [int(d) for d in n.shape], list(n.axis_names)] for n in self.nodes],
            "edges": [[*end(e.node1, e.axis1), *end(e.node2, e.axis2), e.name] for e in bonds],
            "inputs": list(self.input_nodes),
            "outputs": [[*end(e.node1, e.axis1), e.name] for e in self.output_edges],
            "positions": {k: [float(x), float(y)] for k, (x, y) in self.positions.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TNGraph:
        """The diagram :meth:`to_dict` wrote (every node's tensor zeros of its shape)."""
        nodes = {name: make_node(shape, name, axes) for name, shape, axes in data["nodes"]}
        for a, a_axis, b, b_axis, name in data["edges"]:
            connect(nodes[a], a_axis, nodes[b], b_axis, name=name)
        outputs = [nodes[node][axis] for node, axis, _ in data["outputs"]]
        for edge, (*_, name) in zip(outputs, data["outputs"], strict=True):
            edge.name = name
        positions = {k: (float(x), float(y)) for k, (x, y) in data.get("positions", {}).items()}
        return cls(list(nodes.values()), list(data["inputs"]), outputs, positions)

    def to_graphviz(self) -> Any:
        """A ``graphviz.Graph`` of the diagram (render it with the ``dot`` program installed)."""
        from tensornetwork.visualization.graphviz import to_graphviz

        return to_graphviz(self.nodes)

    def draw(self, ax: Any = None, max_nodes: int = 40) -> Any:
        """Draw the diagram with matplotlib: circles are tensors, lines are indices.

        Input nodes are drawn as small squares, dangling (output) edges as short free lines
        labelled with their size. Long chains are cut to ``max_nodes`` parameter nodes.

        Returns:
            The matplotlib ``Axes``.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(10, 2.8))
        params = [n for n in self.nodes if n.name not in self.input_nodes]
        head = max_nodes // 2  # the first nodes and the last ``max_nodes - head``
        shown = params if len(params) <= max_nodes else params[:head] + params[head - max_nodes :]
        pos = dict(self.positions)
        for i, n in enumerate(shown):
            pos.setdefault(n.name, (float(i), 0.0))
        for n in self.nodes:
            if n.name in self.input_nodes and n.name not in pos:
                neighbours = [
                    e.node1 if e.node2 is n else e.node2 for e in n.edges if not e.is_dangling()
                ]
                if neighbours and neighbours[0].name in pos:
                    pos[n.name] = (pos[neighbours[0].name][0], -1.0)  # below its neighbour
        for e in self.edges():
            a, b = pos.get(e.node1.name), None if e.is_dangling() else pos.get(e.node2.name)
            if a is not None and e.is_dangling():
                ax.plot([a[0], a[0]], [a[1], a[1] + 0.6], color="tab:red", lw=2)
                ax.text(a[0], a[1] + 0.7, f"{e.name} ({e.dimension})", ha="center", fontsize=8)
            elif a is not None and b is not None:
                ax.plot([a[0], b[0]], [a[1], b[1]], color="0.3", lw=1.2, zorder=1)
                middle = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + 0.08)
                ax.text(*middle, str(e.dimension), fontsize=6, ha="center")
        for name, (x, y) in pos.items():
            if name in self.input_nodes:
                ax.scatter([x], [y], s=60, marker="s", color="tab:gray", zorder=2)
            else:
                ax.scatter([x], [y], s=260, marker="o", color="tab:blue", zorder=2)
                ax.text(x, y - 0.35, name, ha="center", fontsize=7)
        if len(params) > max_nodes:
            ax.set_title(f"{len(params)} tensors, {max_nodes} shown", fontsize=9)
        ax.set_axis_off()
        return ax
