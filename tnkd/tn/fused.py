r"""The tree engine: a binary tree of pair steps as one autograd node, native on CPU.

A binary tree tensor network repeats one step at every level: G nodes at once join a
three-leg node with its two per-sample children,

    out[g, p, n] = sum_{a, b} W[g, a, b, p] * left[g, a, n] * right[g, b, n],

computed as the outer product ``left (x) right`` (G, A*B, n) and one batched matrix product
with ``W`` viewed as (G, A*B, P), optionally renormalised per (node, sample) to max-abs 1 as
:class:`~tnkd.tn.stable.StableNetwork` does. Its hand-written backward, with
``G = grad / divisor``:

    g_W[g, (a, b), p] = sum_n (left (x) right)[g, (a, b), n] G[g, p, n]
    gO[g, a, b, n]    = sum_p W[g, a, b, p] G[g, p, n]
    g_left[g, a, n]   = sum_b gO[g, a, b, n] right[g, b, n]
    g_right[g, b, n]  = sum_a gO[g, a, b, n] left[g, a, n]

:func:`tree_plan` reads a :class:`~tnkd.tn.stable.StableNetwork`'s schedule: when every step
is such a pair step (the trees of :func:`~tnkd.students.tree.tree_graph`, balanced or with odd
sites passed up, or any graph of that shape however drawn) it returns a :class:`TreePlan`,
whose levels name each node's children as (slot, row) pairs: a row of a block or of an
earlier level's result. :class:`FastTree` runs the whole plan as one autograd node: on CPU
(float32, float64) by the native level loop (``csrc/tree_levels.cpp``, see
:mod:`tnkd.tn.native`), elsewhere by one Python loop (:func:`tree_forward`,
:func:`tree_backward`): two ATen kernels per level forward, about four backward. The planner
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
from typing import NamedTuple

import torch

from tnkd.tn import native
from tnkd.tn.stable import Column, StableNetwork, digits_range, direction_logits, full_precision

#: tensors multiplied into a value between two renormalisations on :class:`TreePlan`'s lean plan
LEAN_RENORM_AFTER = 64

#: a level: (weight slot, left children, right children, renormalised, result slot)
Level = tuple[int, Column, Column, bool, int]


def tree_plan(net: StableNetwork) -> tuple[TreePlan | None, str]:
    """The tree engine's plan of a network's schedule and ``""``, or None and why not.

    Every step must join a node with two per-sample children, and the last step must give the
    whole result. A node's axes may come in any order: its weights are read as ``W[a, b, p]``
    (children's axes, then the parent's) through :meth:`TreePlan.arranged`.
    """
    first = len(net.blocks)
    levels, permutations = [], {}
    for number, group in enumerate(net.groups):
        if group.pair is None:
            return None, "some step does not join a node with its two children"
        w, left, right, axes = group.pair
        if axes[1] < axes[0]:  # the children the other way round: no copy of the weights
            left, right, axes = right, left, (axes[1], axes[0], axes[2])
        weight = group.columns[w]
        if not weight.whole or weight.source >= first:
            return None, "a node's weights are not one whole block"
        if axes != (0, 1, 2):
            permutations[weight.source] = (0, *(1 + k for k in axes))
        columns = group.columns
        levels.append((weight.source, columns[left], columns[right], group.renorm, first + number))
    if net.last != (first + len(levels) - 1, 0) or len(net.groups[-1].steps) != 1:
        return None, "the last step does not give the whole result"
    return TreePlan(levels, permutations), ""


class TreePlan:
    """The levels of a tree (see :data:`Level`) for :class:`FastTree`, and how to run them.

    **Lean renormalisation.** The network's plan renormalises once more than 12 tensors were
    multiplied into a value (:class:`~tnkd.tn.stable.StableNetwork`); ``lean_levels`` do so
    once more than ``lean_after`` = :data:`LEAN_RENORM_AFTER` were (a 64-site tree: only the
    root, against two levels), and a pass tries them first. The range check is the same
    (every divisor within [tiny / eps, max * eps], finite); the first pass that fails it runs
    again renormalising every level and sets ``lean = False`` for good, so a network whose
    values do leave the range (a deep [cos, sin] tree) pays the rerun once and then runs the
    network's plan.

    ``native``: whether :class:`FastTree` runs the level loop in C++ where it can (default
    True); False runs the Python loop.

    Example:
        >>> from tnkd.students import TreeClassifier
        >>> tree = TreeClassifier(input_shape=(16,), num_classes=3, bond_dim=4)
        >>> len(tree.tree_plan.levels), tree.plan().engine
        (4, 'tree')
    """

    def __init__(
        self,
        levels: Sequence[Level],
        permutations: dict[int, tuple[int, ...]] | None = None,
        lean_after: int | None = LEAN_RENORM_AFTER,
    ) -> None:
        self.levels = tuple(levels)
        #: weight blocks whose axes are not (node, left child, right child, parent): how to read them
        self.permutations = dict(permutations or {})
        #: some levels are not renormalised: check the divisors' range (and rerun if needed)
        self.check = not all(level[3] for level in self.levels)
        #: run the level loop natively where it can (:meth:`kernels`); False: the Python loop
        self.native = True
        #: the levels with the lean renormalisation plan (see the class docstring), or None
        self.lean_levels = None if lean_after is None else self._lean(lean_after)
        #: whether the next pass tries the lean plan (False for good after one rerun)
        self.lean = self.lean_levels is not None

    def _lean(self, after: int) -> tuple | None:
        """The levels renormalised once more than ``after`` tensors were multiplied, or None."""
        count: dict[int, int] = {}
        lean = []
        for number, (w, left, right, renorm, out) in enumerate(self.levels):
            children = sum(max(count.get(s, 1) for s in c.sources) for c in (left, right))
            total = count.get(w, 1) + children
            renorm = total > after or number == len(self.levels) - 1
            count[out] = 0 if renorm else total
            lean.append((w, left, right, renorm, out))
        lean = tuple(lean)
        return None if [lv[3] for lv in lean] == [lv[3] for lv in self.levels] else lean

    def contract(
        self, blocks: Sequence[torch.Tensor], every: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, log_scale)`` of the blocks, as :meth:`StableNetwork.contract` gives them.

        ``every``: renormalise every level (no range check, no rerun).
        """
        with full_precision(self.arranged(blocks)) as blocks:
            ext = self.kernels(blocks)
            out, divisors = FastTree.apply(self, ext, every, self.check, None, False, *blocks)
        # every node feeds one parent: the root's log-scale is the sum of all divisors' logs
        return out[0].T, divisors.log().sum((0, 1))

    def normalized_logits(
        self,
        blocks: Sequence[torch.Tensor],
        log_scale: torch.Tensor,
        linear_leaves: bool = False,
        every: bool = False,
    ) -> torch.Tensor:
        """Logits ``exp(s) f / ||f||`` (batch, C), the head inside the native loop's autograd node.

        What :func:`~tnkd.tn.stable.direction_logits` does with :meth:`contract`'s values (and does so for the
        Python loop and under autocast). With ``linear_leaves`` the leaves' two input blocks are
        one (G, 2, batch) tensor of raw values ``[x_l, x_r]`` (passed in both slots) and the
        [1, x] map is fused with the leaves (:func:`linear_leaf_features`).
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
        args = (self, ext, every, self.check, log_scale, linear_leaves)
        return FastTree.apply(*args, *self.arranged(blocks))[0]

    def arranged(self, blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The blocks with every weight's axes as (node, left child, right child, parent)."""
        blocks = list(blocks)
        for slot, axes in self.permutations.items():
            blocks[slot] = blocks[slot].permute(*axes)
        return blocks

    def kernels(self, blocks: Sequence[torch.Tensor]):
        """The native level loop (:mod:`tnkd.tn.native`, ``"tree_levels"``) for these blocks, or None.

        None (the Python loop runs) with ``native = False``, off the CPU, for other dtypes than
        float32 and float64, blocks of mixed dtypes, while ``torch.compile`` traces (it cannot
        trace into the native functions) and where the kernels cannot be built.
        """
        first = blocks[0]
        if not self.native or not native.supports(first) or torch.compiler.is_compiling():
            return None
        if any(b.dtype != first.dtype or b.device != first.device for b in blocks):
            return None
        return native.kernels("tree_levels")


class FastTree(torch.autograd.Function):
    r"""A :class:`TreePlan` as one autograd node: the native level loop, or the Python loop.

    ``FastTree.apply(plan, ext, every, check, head, linear_leaves, *blocks)`` returns ``(out,
    divisors)``: the root's (1, C, n) values (or, with ``head``, a logit scale s, the logits
    ``exp(s) v / ||v||`` as (n, C)) and the (K, 1, n) divisors of every renormalised node. In a
    tree every intermediate feeds exactly one parent, so the root's log-scale is the sum of all
    their logs: no per-level log-scale tensors, and the same divisors give the range check (one
    ``aminmax``). When a divisor left the range where float keeps its digits (or is not
    finite), the forward runs again renormalising every level, as the stable engine does.

    ``ext``: the native kernels (``csrc/tree_levels.cpp``, :meth:`TreePlan.kernels`), which run
    the whole loop as one call forward and one backward. Where every level reads the one below
    in pairs (a balanced tree), thread t runs all levels of its own subtrees and the few top
    levels run on one thread; other trees split the batch into per-thread column ranges. Only
    the native loop takes the head (the root not renormalised: its squared norms ``||v||^2``
    join the divisors, so the range check guarantees they neither overflowed nor lost digits;
    backward of ``exp(s) v / ||v||`` first) and
    ``linear_leaves`` (the two input blocks one (G, 2, n) tensor of raw pairs, the [1, x] map
    fused with the leaves). ``ext=None``: the Python loop (:func:`tree_forward`), for other
    devices or dtypes, ``torch.compile`` tracing, ``plan.native = False`` or no compiler.
    """

    @staticmethod
    def forward(ctx, plan, ext, every, check, head, linear_leaves, *blocks):  # noqa: D102
        ctx.save_for_backward(*blocks)
        ctx.plan, ctx.ext = plan, ext
        levels = plan.levels
        if plan.lean and not every:
            levels, check = plan.lean_levels, True
        if ext is None:  # the Python loop: no head, no fused leaves (see TreePlan)
            if head is not None or linear_leaves:
                raise ValueError("the Python level loop takes no head and no raw [1, x] leaves")
            run = tree_forward(levels, blocks, every, check)
            if run is None:
                plan.lean = False  # this network's values leave the range: its plan from now on
                run = tree_forward(plan.levels, blocks, True, False)
            out, divisors, ctx.saved = run
            ctx.mark_non_differentiable(divisors)
            return out, divisors
        log_scale = None if head is None else float(head)
        run = native_tree_forward(ext, levels, blocks, every, check, log_scale, linear_leaves)
        if run is None:
            plan.lean = False
            run = native_tree_forward(
                ext, plan.levels, blocks, True, False, log_scale, linear_leaves
            )
        out, divisors, ctx.saved = run
        ctx.mark_non_differentiable(divisors)
        return (out if head is None else ctx.saved.logits), divisors

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_log):  # noqa: D102
        blocks = ctx.saved_tensors  # (raises if a block was changed in place since forward)
        needs = ctx.needs_input_grad[6:]
        g_head = None
        if ctx.ext is None:
            grads = tree_backward(ctx.plan.levels, ctx.saved, grad_out, needs)
        else:  # the head's backward in the kernel too
            grads = native_tree_backward(ctx.ext, ctx.saved, blocks, grad_out, needs)
            g_head = grads.pop() if ctx.saved.log_scale is not None else None
        return None, None, None, None, g_head, None, *grads


class _NativeRun(NamedTuple):
    """What a native forward pass of :class:`FastTree` leaves for its backward pass."""

    slots: list[list]  # the weights' slots, the children's (slot, row) lists
    renorm: list[bool]  # which levels were renormalised
    linear: bool  # [1, x] leaves on raw pairs
    outs: list[torch.Tensor]  # every level's (G, P, n) result
    divisors: torch.Tensor  # (R, 1, n)
    log_scale: float | None  # the head's s (None: no head)
    logits: torch.Tensor | None  # (n, C) exp(s) v / ||v||
    inverse: torch.Tensor | None  # (n,) 1 / ||v||


@functools.lru_cache(maxsize=256)
def _native_plan(levels: tuple, every: bool, square: bool) -> tuple[list[list], list[bool]]:
    """The kernels' plan arguments: the levels' slots, and which levels are renormalised.

    The slots: the weights', and every node's left and right children as (slot, row) lists;
    renormalised: with ``every``, or by the level's own plan, but not the root with the head's
    ``square``. Made once per plan (the lists are read, never changed).
    """
    last = len(levels) - 1
    renorm = [bool(every or lv[3]) and not (square and k == last) for k, lv in enumerate(levels)]
    slots = [[lv[0] for lv in levels]]
    for side in (1, 2):
        members = [m for lv in levels for m in lv[side].members]
        slots += [[m[0] for m in members], [m[1] for m in members]]
    return slots, renorm


def native_tree_forward(ext, levels, blocks, every, check, log_scale, linear):
    """:func:`tree_forward` by the native level loop: ``(root, divisors, saved)`` or None.

    The same renormalisations (``renorm`` of the level, or ``every``; with the head, a float
    ``log_scale`` s, and not ``every``, not the root: its squared norms are the divisors' last
    row instead) and the same range check, from the kernel's smallest and largest divisor. With
    the head, the kernel also gives the logits ``exp(s) v / ||v||`` (``saved.logits``). With
    ``linear`` the first level's children are the raw (G, 2, n) pairs of the [1, x] map
    (:func:`linear_leaf_features`). ``saved`` is a :class:`_NativeRun`.
    """
    square = log_scale is not None and not every
    slots, renorm = _native_plan(levels, every, square)
    outs, divisors, low, high, logits, inverse = ext.tree_forward(
        list(blocks), *slots, renorm, linear, square, log_scale
    )
    if (check or square) and not every:
        lowest, highest = digits_range(divisors.dtype)
        if not (low >= lowest and high <= highest):
            return None  # False for NaN too
    saved = _NativeRun(slots, renorm, linear, outs, divisors, log_scale, logits, inverse)
    return outs[-1], divisors, saved


def native_tree_backward(ext, saved: _NativeRun, blocks, grad_out, needs) -> list:
    """Gradients of the blocks from :func:`native_tree_forward` (None where not needed).

    With the head, ``grad_out`` is the logits' (n, C) gradient and the log-scale's gradient
    comes last.
    """
    return ext.tree_backward(
        list(blocks),
        saved.outs,
        saved.divisors,
        *saved.slots,
        saved.renorm,
        saved.linear,
        grad_out,
        list(needs),
        saved.inverse,
        saved.log_scale,
    )


def linear_leaf_features(plan: TreePlan, blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Blocks with the leaves' (G, 2, n) raw pairs replaced by their [1, x] features."""
    l_slot, r_slot = plan.levels[0][1].source, plan.levels[0][2].source
    pairs = blocks[l_slot]
    out = list(blocks)
    for slot, k in ((l_slot, 0), (r_slot, 1)):
        values = pairs[:, k]
        out[slot] = torch.stack([torch.ones_like(values), values], 1)
    return out


def tree_forward(levels, blocks, every: bool, check: bool):
    """The Python loop of :class:`FastTree`: ``(root, divisors, saved)``, or None.

    ``divisors`` (K, 1, n): every renormalised node's divisors; None when one left the range
    where float keeps all its digits (the caller reruns renormalising every level).
    """
    slots = list(blocks)
    saved, scales = [], []
    info = torch.finfo(blocks[0].dtype)
    for w, left, right, renorm, _ in levels:
        weight = slots[w]
        nodes, a, b, p = weight.shape
        lhs, rhs = left.take(slots), right.take(slots)
        outer = (lhs.unsqueeze(2) * rhs.unsqueeze(1)).view(nodes, a * b, -1)
        out = torch.bmm(weight.reshape(nodes, a * b, p).mT, outer)
        scale = None
        if every or renorm:
            scale = out.abs().amax(1, keepdim=True).clamp_min_(info.tiny)
            out.div_(scale)
            scales.append(scale)
        slots.append(out)
        saved.append((lhs, rhs, weight, scale, outer))
    divisors = torch.cat(scales)
    if check and not every:
        low, high = torch.aminmax(divisors)
        lowest, highest = digits_range(divisors.dtype)
        if not (low.item() >= lowest and high.item() <= highest):
            return None  # False for NaN too
    return out, divisors, (saved, [t.shape[0] for t in slots])


def tree_backward(levels, saved, grad_out, needs) -> list:
    """Gradients of the blocks from :func:`tree_forward` (None where not needed)."""
    steps, rows = saved
    need = list(needs) + [False] * len(levels)
    for w, left, right, _, out in levels:
        need[out] = need[w] or any(need[s] for s in left.sources + right.sources)
    grads = {levels[-1][4]: grad_out}
    for (w, left, right, _, out), (lhs, rhs, weight, scale, outer) in reversed(
        list(zip(levels, steps, strict=True))
    ):
        grad = grads.pop(out, None)
        if grad is None:
            continue
        nodes, a, b, p = weight.shape
        g = grad if scale is None else grad / scale
        if need[w]:
            grads[w] = torch.bmm(outer, g.mT).view(weight.shape)
        if any(need[s] for s in left.sources + right.sources):
            g_outer = torch.bmm(weight.reshape(nodes, a * b, p), g).view(nodes, a, b, -1)
            left.give(grads, (g_outer * rhs.unsqueeze(1)).sum(2), rows)
            right.give(grads, g_outer.mul_(lhs.unsqueeze(2)).sum(1), rows)
    return [grads.get(k) if needs[k] else None for k in range(len(needs))]
