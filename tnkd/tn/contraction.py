"""The reference engine: a graph becomes one einsum, planned once by ``opt_einsum``.

:class:`CompiledNetwork` is the generic path for any graph (tree, small PEPS, chain): the
graph's index names become einsum symbols (:func:`einsum_equation`), a batch index is added to
every input node, and the ``opt_einsum`` expression is cached per input shape and executed on
torch tensors (autograd, mixed precision and GPUs work). It keeps no scale: the planner's other
engines (:mod:`tnkd.tn.planner`) track a log-scale and are tested equal to it.
"""

import functools
from collections.abc import Sequence
from typing import Any

import opt_einsum as oe
import torch

from tnkd.tn.graph import NetworkSpec, TNGraph

BATCH_INDEX = "__batch__"


def einsum_equation(spec: NetworkSpec, batched: bool = True) -> str:
    """The einsum equation of a graph, symbols generated from index names (batch index first)."""
    names = dict.fromkeys([BATCH_INDEX, *(i for idx in spec.node_indices for i in idx)])
    sym = {name: oe.get_symbol(k) for k, name in enumerate(names)}
    b = sym[BATCH_INDEX] if batched else ""
    terms = [
        (b if (n in spec.input_nodes) else "") + "".join(sym[i] for i in idx)
        for n, idx in zip(spec.node_names, spec.node_indices, strict=True)
    ]
    out = b + "".join(sym[i] for i in spec.output_indices)
    return ",".join(terms) + "->" + out


class CompiledNetwork:
    """A graph compiled into a cached ``opt_einsum`` expression.

    Args:
        graph: the student's :class:`~tnkd.tn.graph.TNGraph` (or its ``spec()``).
        optimize: any ``opt_einsum`` path optimizer: ``"greedy"`` (default), ``"dp"``,
            ``"optimal"``, ``"auto"``, or a ``PathOptimizer`` instance such as a ``cotengra``
            ``HyperOptimizer``.

    Call it with one tensor per node, in the graph's node order: parameter tensors with the
    node's shape, input tensors with a leading batch index. With one input node the path is
    planned on the first call for each set of shapes (batch size included); with several, once
    on the single-sample network. Either way it is reused after (``plans`` counts the plannings).

    Example:
        >>> import torch
        >>> from tnkd.students import MPSClassifier
        >>> mps = MPSClassifier(num_sites=6, num_classes=3, bond_dim=4)
        >>> net = CompiledNetwork(mps.to_graph())
        >>> x = torch.rand(5, 6)
        >>> torch.allclose(net(mps.graph_operands(x)), mps.raw_forward(x), atol=1e-5)
        True
    """

    def __init__(self, graph: TNGraph | NetworkSpec, optimize: Any = "greedy") -> None:
        self.spec = graph.spec() if isinstance(graph, TNGraph) else graph
        self.optimize = optimize
        self.equation = einsum_equation(self.spec, batched=True)
        self._expressions: dict[tuple[tuple[int, ...], ...], Any] = {}
        self.plans = 0
        # one input node: the batch index is an ordinary index that the planner sees (its best
        # order can depend on the batch size); several: it would be a hyperedge over all inputs
        self.plan_per_shape = len(self.spec.input_nodes) == 1

    def _plan(self, equation: str, shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
        self.plans += 1
        return oe.contract_path(equation, *shapes, shapes=True, optimize=self.optimize)[0]

    @functools.cached_property
    def path(self) -> list[tuple[int, ...]]:
        """The contraction path, planned once on the single-sample network."""
        return self._plan(einsum_equation(self.spec, batched=False), self.spec.node_shapes)

    def expression(self, shapes: tuple[tuple[int, ...], ...]) -> Any:
        """The cached ``opt_einsum`` expression for these operand shapes."""
        expr = self._expressions.get(shapes)
        if expr is None:
            path = self._plan(self.equation, shapes) if self.plan_per_shape else self.path
            expr = self._expressions[shapes] = oe.contract_expression(
                self.equation, *shapes, optimize=path
            )
        return expr

    def __call__(self, operands: Sequence[torch.Tensor]) -> torch.Tensor:
        """Contract the network; returns ``(batch, *output_sizes)``."""
        if len(operands) != len(self.spec.node_names):
            raise ValueError(
                f"expected {len(self.spec.node_names)} operands (one per node), got {len(operands)}"
            )
        shapes = tuple(tuple(t.shape) for t in operands)
        return self.expression(shapes)(*operands, backend="torch")
