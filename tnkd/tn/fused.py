r"""The tree engine: a binary tree of pair steps as one autograd node, native on CPU.

A binary tree tensor network repeats one step at every level: G nodes at once join a
three-leg node with its two per-sample children,

    out[g, p, n] = sum_{a, b} W[g, a, b, p] * left[g, a, n] * right[g, b, n],

optionally renormalised per (node, sample) to max-abs 1 as
:class:`~tnkd.tn.stable.StableNetwork` does. Its hand-written backward, with
``G = grad / divisor``:

    g_W[g, a, b, p]  = sum_n left[g, a, n] right[g, b, n] G[g, p, n]
    gO[g, a, b, n]   = sum_p W[g, a, b, p] G[g, p, n]
    g_left[g, a, n]  = sum_b gO[g, a, b, n] right[g, b, n]
    g_right[g, b, n] = sum_a gO[g, a, b, n] left[g, a, n]

:func:`tree_plan` reads a :class:`~tnkd.tn.stable.StableNetwork`'s schedule: when every step
is such a pair step (the trees of :func:`~tnkd.students.tree.tree_graph`, balanced or with odd
sites passed up, or any graph of that shape however drawn) it returns a :class:`TreePlan`,
whose levels name each node's children as (slot, row) pairs: a row of a block or of an
earlier level's result. :class:`FastTree` runs the whole plan as one autograd node by the
native level loop (``csrc/tree_levels.cpp``, see :mod:`tnkd.tn.native`) on CPU, float32 and
float64; elsewhere the plan's network contracts the same schedule on the stable engine
(batched einsum steps and autograd), which gives the same values. The planner
(:mod:`tnkd.tn.planner`) chooses this engine; :class:`~tnkd.students.graph.GraphStudent` calls
it. The speed against TensorKrowch is measured by ``benchmarks/tree_vs_tensorkrowch.py``.

Example:
    >>> import torch
    >>> from tnkd.students import TreeClassifier
    >>> from tnkd.tn.stable import StableNetwork
    >>> tree = TreeClassifier(input_shape=(16,), num_classes=3, bond_dim=4)
    >>> net = StableNetwork(tree.to_graph())
    >>> plan, _ = tree_plan(net)
    >>> blocks = net.to_blocks(tree.graph_operands(torch.rand(5, 16)))
    >>> values, log_scale = plan.contract(blocks)
    >>> reference, ref_log = net.contract(blocks)
    >>> torch.allclose(values, reference, atol=1e-6), torch.allclose(log_scale, ref_log)
    (True, True)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tnkd.tn import native
from tnkd.tn.stable import Column, StableNetwork, digits_range, direction_logits, full_precision

#: a level: (weight slot, left children, right children, renormalised)
Level = tuple[int, Column, Column, bool]


def tree_plan(net: StableNetwork) -> tuple[TreePlan | None, str]:
    """The tree engine's plan of a network's schedule and ``""``, or None and why not.

    Every step must join a node with two per-sample children, and the last step must give the
    whole result. A node's axes may come in any order: its weights are read as ``W[a, b, p]``
    (children's axes, then the parent's) through :meth:`TreePlan.arranged`.
    """
    first = len(net.blocks)
    levels, permutations = [], {}
    for group in net.groups:
        if group.pair is None:
            return None, "some step does not join a node with its two children"
        w, left, right, axes = group.pair
        if axes[1] < axes[0]:  # the children the other way round: no copy of the weights
            left, right, axes = right, left, (axes[1], axes[0], axes[2])
        weight, left, right = (group.columns[k] for k in (w, left, right))
        if not weight.whole or weight.source >= first:
            return None, "a node's weights are not one whole block"
        if axes != (0, 1, 2):
            permutations[weight.source] = (0, *(1 + k for k in axes))
        levels.append((weight.source, left, right, group.renorm))
    if net.last != (first + len(levels) - 1, 0) or len(net.groups[-1].steps) != 1:
        return None, "the last step does not give the whole result"
    return TreePlan(tuple(levels), net, permutations), ""


@dataclass(eq=False)
class TreePlan:
    """The levels of a tree (see :data:`Level`) for :class:`FastTree`, and how to run them.

    A tree student keeps its plan as its ``tree_plan``.
    """

    levels: tuple[Level, ...]
    #: the network whose schedule the levels are: it contracts where the native loop does not
    network: StableNetwork
    #: weight blocks whose axes are not (node, left child, right child, parent): how to read them
    permutations: dict[int, tuple[int, ...]]
    #: run the native level loop where it can (:meth:`kernels`); False: the stable engine
    native: bool = True

    def contract(
        self, blocks: Sequence[torch.Tensor], every: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, log_scale)`` of the blocks, as :meth:`StableNetwork.contract` gives them.

        ``every``: renormalise every level (no range check, no rerun).
        """
        with full_precision(blocks) as blocks:
            ext = self.kernels(blocks)
            if ext is None:
                return self.network.contract(blocks, every)
            out, divisors = FastTree.apply(self, ext, every, None, False, *self.arranged(blocks))
        return out[0].T, divisors.log().sum((0, 1))

    def normalized_logits(
        self,
        blocks: Sequence[torch.Tensor],
        log_scale: torch.Tensor,
        linear_leaves: bool = False,
        every: bool = False,
    ) -> torch.Tensor:
        """Logits ``exp(s) f / ||f||`` (batch, C), the head inside the native loop's autograd node.

        What :func:`~tnkd.tn.stable.direction_logits` does with :meth:`contract`'s values (and
        does so where the native loop does not run, and under autocast). With ``linear_leaves``
        the leaves' two input blocks are one (G, 2, batch) tensor of raw values ``[x_l, x_r]``
        (passed in both slots) and the [1, x] map is fused with the leaves
        (:func:`linear_leaf_features`).
        """
        if linear_leaves and blocks[self.levels[0][1].source].requires_grad:
            raise ValueError(
                "normalized_logits with linear_leaves gives the raw pairs no gradient, but they "
                "require one; pass the [1, x] features as blocks instead"
            )
        ext = self.kernels(blocks)
        if ext is None or torch.is_autocast_enabled(blocks[0].device.type):
            if linear_leaves:
                blocks = linear_leaf_features(self, blocks)
            return direction_logits(self.contract(blocks, every)[0], log_scale)
        return FastTree.apply(self, ext, every, log_scale, linear_leaves, *self.arranged(blocks))[0]

    def arranged(self, blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The blocks with every weight's axes as (node, left child, right child, parent)."""
        blocks = list(blocks)
        for slot, axes in self.permutations.items():
            blocks[slot] = blocks[slot].permute(*axes)
        return blocks

    def kernels(self, blocks: Sequence[torch.Tensor]):
        """The native level loop (:mod:`tnkd.tn.native`, ``"tree_levels"``) for these blocks, or None.

        None (the stable engine runs) with ``native = False``, off the CPU, for other dtypes than
        float32 and float64, blocks of mixed dtypes, while ``torch.compile`` traces (it cannot
        trace into the native functions) and where the kernels cannot be built.
        """
        first = blocks[0]
        if not self.native or not native.supports(first) or torch.compiler.is_compiling():
            return None
        same = all(b.dtype == first.dtype and b.device == first.device for b in blocks)
        return native.kernels("tree_levels") if same else None


class FastTree(torch.autograd.Function):
    r"""A :class:`TreePlan` as one autograd node, by the native level loop.

    ``FastTree.apply(plan, ext, every, head, linear_leaves, *blocks)`` returns ``(out,
    divisors)``: the root's (1, C, n) values (or, with ``head``, a logit scale s, the logits
    ``exp(s) v / ||v||`` as (n, C)) and the (R, 1, n) divisors of every renormalised node. In a
    tree every intermediate feeds exactly one parent, so the root's log-scale is the sum of all
    their logs, and the same divisors give the range check (:func:`native_tree_forward`).
    ``ext``: the native kernels (:meth:`TreePlan.kernels`); ``linear_leaves``: the leaves read
    raw pairs (:meth:`TreePlan.normalized_logits`).
    """

    @staticmethod
    def forward(ctx, plan, ext, every, head, linear_leaves, *blocks):  # noqa: D102
        ctx.save_for_backward(*blocks)
        args = (ext, plan.levels, blocks)
        log_scale = None if head is None else float(head)
        run = native_tree_forward(*args, every, log_scale, linear_leaves)
        # None: a divisor left the range; again, renormalising every level
        run = run or native_tree_forward(*args, True, log_scale, linear_leaves)
        ctx.ext, ctx.run = ext, run
        ctx.mark_non_differentiable(run.divisors)
        return (run.outs[-1] if head is None else run.logits), run.divisors

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_log):  # noqa: D102
        blocks = ctx.saved_tensors  # (raises if a block was changed in place since forward)
        grads = native_tree_backward(ctx.ext, ctx.run, blocks, grad_out, ctx.needs_input_grad[5:])
        g_head = grads.pop() if ctx.run.log_scale is not None else None  # (the head's last)
        return None, None, None, g_head, None, *grads


class _NativeRun(NamedTuple):
    """What a native forward pass of :class:`FastTree` leaves for its backward pass."""

    slots: list[list]  # the weights' slots, the children's (slot, row) lists
    renorm: list[bool]  # which levels were renormalised
    linear: bool  # [1, x] leaves on raw pairs
    outs: list[torch.Tensor]  # every level's (G, P, n) result
    divisors: torch.Tensor  # (R, 1, n)
    inverse: torch.Tensor | None  # (n,) 1 / ||v|| (None: no head)
    log_scale: float | None  # the head's s
    logits: torch.Tensor | None  # (n, C) exp(s) v / ||v||


@functools.lru_cache(maxsize=256)
def _native_plan(levels: tuple, every: bool, square: bool) -> tuple[list[list], list[bool]]:
    """The kernels' plan arguments: the levels' slots, and which levels are renormalised.

    The slots: the weights', and every node's left and right children as (slot, row) lists; the
    levels renormalised as :func:`native_tree_forward` says. Made once per plan (read only).
    """
    last = len(levels) - 1
    renorm = [bool(every or lv[3]) and not (square and k == last) for k, lv in enumerate(levels)]
    slots = [[lv[0] for lv in levels]]
    for side in (1, 2):
        members = [m for lv in levels for m in lv[side].members]
        slots += [[m[0] for m in members], [m[1] for m in members]]
    return slots, renorm


def native_tree_forward(ext, levels, blocks, every, log_scale, linear) -> _NativeRun | None:
    """The native forward pass of ``levels`` (a :class:`_NativeRun`), or None to rerun.

    Renormalises each level as its plan says, or every level with ``every``; with the head (a
    float ``log_scale`` s) and not ``every``, the root is not: its squared norms are the
    divisors' last row instead. None where some level was not renormalised and a divisor left
    :func:`~tnkd.tn.stable.digits_range` (or is NaN). ``linear``: the first level's children are
    the raw (G, 2, n) pairs of the [1, x] map (:func:`linear_leaf_features`).
    """
    square = log_scale is not None and not every
    slots, renorm = _native_plan(levels, every, square)
    outs, divisors, in_range, logits, inverse = ext.tree_forward(
        list(blocks), slots, renorm, linear, square, log_scale, *digits_range(blocks[0].dtype)
    )
    if not (in_range or all(renorm)):  # (every level renormalised: nothing to check)
        return None
    return _NativeRun(slots, renorm, linear, outs, divisors, inverse, log_scale, logits)


def native_tree_backward(ext, run: _NativeRun, blocks, grad_out, needs) -> list:
    """Gradients of the blocks (None where not needed), then the head's (``grad_out``: logits')."""
    return ext.tree_backward(list(blocks), grad_out, list(needs), *run[:-1])  # all but the logits


def linear_leaf_features(plan: TreePlan, blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Blocks with the leaves' (G, 2, n) raw pairs replaced by their [1, x] features."""
    out, pairs = list(blocks), blocks[plan.levels[0][1].source]
    for k in (0, 1):  # the left child's [1, x_l], the right's [1, x_r]
        values = pairs[:, k]
        out[plan.levels[0][1 + k].source] = torch.stack([torch.ones_like(values), values], 1)
    return out
