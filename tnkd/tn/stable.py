"""Stable contraction of any graph: the planned pairwise path, executed with a tracked log-scale.

:class:`~tnkd.tn.contraction.CompiledNetwork` hands the whole graph to one ``opt_einsum``
expression: exact, but a deep network's value (a product of hundreds of factors) leaves the
floating-point range; a 784-site MPS with the [cos, sin] map underflows to exactly 0.
:class:`StableNetwork` executes the plan one step at a time (a step joins two tensors, or a node
with all its children) and keeps every intermediate tensor as

    T = values * exp(log_scale),    max |values| = 1 for each sample,

renormalising (:func:`rescaled`) once more than :data:`RENORM_AFTER` tensors have been multiplied
into an intermediate, and after every step on a rerun if a value came within a mantissa's width
of the float range (or was 0, inf or NaN). Scales come from detached values, so gradients flow
through ``values``; a network whose value is 1e-400 comes back finite, log-scale about -921.

**Steps at the same depth run as one batched kernel.** A step's depth in the contraction tree
is one more than its deepest operand's, so steps of one depth are independent; those that share
an equation (up to renaming indices) and operand shapes are stacked and contracted by one
``torch.einsum`` with a leading group index. On a binary tree this is the level-by-level
contraction: about log2(N) kernels instead of N. Graphs with loops (PEPS) run as they are drawn.

Every step runs through ``torch.einsum`` and autograd (second derivatives work). This is the
planner's ``stable`` engine (:mod:`tnkd.tn.planner`); the tree engine (:mod:`tnkd.tn.fused`) is
built from its schedule. Measured by ``benchmarks/graph_speed.py`` (the graph benchmark page).

Example:
    >>> import torch
    >>> from tnkd.students import MPSClassifier
    >>> mps = MPSClassifier(num_sites=300, num_classes=3, bond_dim=4, feature_map="trig")
    >>> net = StableNetwork(mps.to_graph())
    >>> values, log_scale = net(mps.graph_operands(torch.rand(2, 300)))
    >>> values.shape, bool(torch.isfinite(log_scale).all())
    (torch.Size([2, 3]), True)
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import opt_einsum as oe
import torch

from tnkd.tn.canonical import hang
from tnkd.tn.contraction import BATCH_INDEX as BATCH
from tnkd.tn.contraction import einsum_equation
from tnkd.tn.graph import NetworkSpec, TNGraph, index_ends

#: tensors multiplied into an intermediate between two renormalisations
RENORM_AFTER = 12


def as_slice(index: Sequence[int]) -> slice | None:
    """``index`` as a slice when it is evenly spaced and increasing (a view, no copy), else None."""
    step = index[1] - index[0] if len(index) > 1 else 1
    if step > 0 and all(b - a == step for a, b in itertools.pairwise(index)):
        return slice(index[0], index[-1] + 1, step)
    return None


@functools.cache
def digits_range(dtype: torch.dtype) -> tuple[float, float]:
    """``[tiny / eps, max * eps]``: the magnitudes at which ``dtype`` keeps all its digits."""
    info = torch.finfo(dtype)
    return info.tiny / info.eps, info.max * info.eps


class Column:
    """One operand column of a group: per step, the (slot, row) it reads.

    A slot is a block (``0 .. len(blocks) - 1``) or a group's result (from ``len(blocks)`` on,
    in order). One source read in order is taken whole; evenly spaced rows as a slice (a view);
    other rows by ``index_select``; rows of several sources stacked.
    """

    def __init__(self, members: tuple[tuple[int, int], ...], sizes: Sequence[int]) -> None:
        self.members = members
        self.sources = tuple(dict.fromkeys(src for src, _ in members))
        self.source = self.sources[0] if len(self.sources) == 1 else None
        self.index = [g for _, g in members]
        self.slice = as_slice(self.index)
        self.rows = torch.tensor(self.index)  # for index_select
        # the whole source, in order (``sizes``: the rows of each slot)
        self.whole = self.source is not None and self.index == list(range(sizes[self.source]))

    def take(self, slots: Sequence[torch.Tensor]) -> torch.Tensor:
        """The column's operand, stacked along a leading group axis."""
        if self.whole:
            return slots[self.source]
        if self.source is not None:
            src = slots[self.source]
            if self.slice is not None:
                return src[self.slice]
            if self.rows.device != src.device:  # moved once, kept on the operands' device
                self.rows = self.rows.to(src.device)
            return src.index_select(0, self.rows)
        return torch.stack([slots[s][g] for s, g in self.members])

    def take_log(self, logs: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """The operands' (G, batch or 1) log-scales, or None if none has one."""
        if self.source is not None:
            return self.take(logs) if self.source in logs else None
        present = [logs[s] for s in self.sources if s in logs]
        if not present:
            return None
        zero = present[0].new_zeros(max(q.shape[1] for q in present))
        return torch.stack(
            [logs[s][g].expand_as(zero) if s in logs else zero for s, g in self.members]
        )


@dataclass
class _Group:
    """Steps of one depth that share an equation and operand shapes: one batched einsum.

    ``stages`` splits a step that joins several per-sample operands with parameters (a tree node
    with its children, a chain core with its vector and features) in two: the per-sample
    operands' outer product first (elementwise along contiguous samples), then one batched
    matrix product with the parameters, laid out so that it needs no copy.
    """

    scale_axes: list[int]  # the result's axes but the group and batch axes (one scale each)
    steps: list[tuple[tuple[int, ...], int]]  # (input slots in canonical operand order, result)
    columns: list[Column]
    stages: list[tuple[str, tuple[int, ...]]]  # (equation, operand positions; -1: previous)
    renorm: bool = True  # renormalise the result (see RENORM_AFTER and StableNetwork)
    # (weight, left, right, the weight's axes) of a step the tree engine runs (see _pair_roles)
    pair: tuple[int, int, int, tuple[int, int, int]] | None = None


def tree_path(spec: NetworkSpec) -> list[tuple[int, ...]] | None:
    """The bottom-up path of a graph without loops, or None if the graph has a loop.

    The graph is hung from the node that holds the (first) output index. Each node with
    children is contracted with all of them in one step (its input nodes and the results of its
    child subtrees), after those subtrees: a tree network is contracted level by level, a chain
    is swept from both ends towards its output core, as the fast chain path does. Every step
    absorbs whole subtrees, so no intermediate is larger than a node with its open bonds.

    Returns:
        A path in ``opt_einsum``'s format (positions in the shrinking operand list).
    """
    n = len(spec.node_names)
    root = index_ends(spec.node_indices)[spec.output_indices[0]][0][0] if spec.output_indices else 0
    try:
        order, children = hang(spec.node_indices, root)
    except ValueError:
        return None  # a loop (or disconnected pieces)
    height = [0] * n
    for v in reversed(order):
        height[v] = 1 + max((height[u] for u, _ in children[v]), default=-1)
    current = list(range(n))  # operand ids in opt_einsum's list order
    result_of = {v: v for v in range(n)}
    path: list[tuple[int, ...]] = []
    # lowest subtrees first, so that the steps of one level sit next to each other
    for v in sorted((v for v in order if children[v]), key=lambda v: (height[v], v)):
        ids = [result_of[v]] + [result_of[u] for u, _ in children[v]]  # (in node order)
        path.append(tuple(current.index(i) for i in ids))
        result_of[v] = n + len(path) - 1
        current = [i for i in current if i not in ids] + [result_of[v]]
    return path


def _schedule(
    spec: NetworkSpec, path: Sequence[Sequence[int]]
) -> tuple[list[_Group], int, tuple[str, ...], int]:
    """Turn a contraction path into grouped steps, in order of depth.

    Returns:
        The groups, the depth (levels of the contraction tree), the index names of the last slot
        and its id.
    """
    batched = [(BATCH,) if n in spec.input_nodes else () for n in spec.node_names]
    names = [idx + b for idx, b in zip(spec.node_indices, batched, strict=True)]
    shapes = [s + (-1,) * len(b) for s, b in zip(spec.node_shapes, batched, strict=True)]
    sizes = dict(zip(itertools.chain(*names), itertools.chain(*shapes), strict=True))
    depth = [0] * len(names)
    current = list(range(len(names)))
    groups: dict[tuple, _Group] = {}
    for contraction in path:
        ids = [current[i] for i in contraction]
        current = [s for i, s in enumerate(current) if i not in contraction]
        needed = {BATCH, *spec.output_indices}.union(*(names[s] for s in current))
        # canonical operand order (stable: ties keep the path's order), then canonical labels
        ids.sort(key=lambda s: (len(shapes[s]), shapes[s]))
        seen = dict.fromkeys(ix for s in ids for ix in names[s])
        labels = {ix: oe.get_symbol(k + 1) for k, ix in enumerate(seen)}
        # the batch index last: elementwise work runs along contiguous samples
        kept = [ix for ix in seen if ix in needed and ix != BATCH] + [BATCH] * (BATCH in seen)
        operands = [names[s] for s in ids]
        new = len(names)
        names.append(tuple(kept))
        shapes.append(tuple(sizes[ix] for ix in kept))
        depth.append(1 + max(depth[s] for s in ids))
        current.append(new)
        terms = tuple("".join(labels[ix] for ix in idx) for idx in (*operands, kept))
        key = (depth[new], terms, tuple(shapes[s] for s in ids))
        if key not in groups:
            axes = [1 + k for k, ix in enumerate(kept) if ix != BATCH]
            stages = _stages(operands, kept, labels)
            groups[key] = _Group(axes, [], [], stages, pair=_pair_roles(operands, kept))
        groups[key].steps.append((tuple(ids), new))
    if len(current) != 1:
        raise ValueError(f"the contraction path left {len(current)} tensors; expected one")
    ordered = [g for _, g in sorted(groups.items(), key=lambda item: item[0][0])]  # (stable)
    return ordered, max(depth), names[current[0]], current[0]


def _pair_roles(
    operands: list[tuple[str, ...]], kept: list[str]
) -> tuple[int, int, int, tuple[int, int, int]] | None:
    """Roles of a step that joins a three-leg node with two per-sample vectors, or None.

    The step ``W[a, b, p] * left[a, n] * right[b, n] -> out[p, n]`` (a tree node and its two
    children; a chain core with its vector and its feature vector) is what the tree engine
    (:mod:`tnkd.tn.fused`) runs; its roles: the positions of W, left and right, and W's axes for
    (a, b, p).
    """
    if len(operands) != 3 or len(kept) != 2 or kept[1] != BATCH:
        return None
    params = [k for k, idx in enumerate(operands) if BATCH not in idx]
    vectors = [k for k, idx in enumerate(operands) if len(idx) == 2 and idx[1] == BATCH]
    if len(params) != 1 or len(vectors) != 2:
        return None
    w = operands[params[0]]
    legs = (operands[vectors[0]][0], operands[vectors[1]][0], kept[0])  # left, right, kept
    axes = tuple(w.index(ix) if ix in w else -1 for ix in legs)
    if len(w) != 3 or sorted(axes) != [0, 1, 2]:
        return None
    return params[0], vectors[0], vectors[1], axes


def _stages(
    operands: list[tuple[str, ...]], kept: list[str], labels: dict[str, str]
) -> list[tuple[str, tuple[int, ...]]]:
    """One einsum, or two: per-sample operands' product first, then the parameters (see _Group)."""

    def term(indices: Sequence[str]) -> str:  # with the group index first
        return oe.get_symbol(0) + "".join(labels[ix] for ix in indices)

    per_sample = [k for k, idx in enumerate(operands) if BATCH in idx]
    params = [k for k, idx in enumerate(operands) if BATCH not in idx]
    everything = [term(idx) for idx in operands]
    if len(per_sample) < 2 or not params:
        return [(",".join(everything) + "->" + term(kept), tuple(range(len(operands))))]
    later = set(kept).union(*(operands[k] for k in params))
    seen = dict.fromkeys(ix for k in per_sample for ix in operands[k])
    product = [ix for ix in seen if ix in later and ix != BATCH] + [BATCH]
    first = ",".join(everything[k] for k in per_sample) + "->" + term(product)
    second = ",".join([*(everything[k] for k in params), term(product)]) + "->" + term(kept)
    return [(first, tuple(per_sample)), (second, (*params, -1))]


def _layout(
    groups: list[_Group], num_nodes: int, inputs: set[int]
) -> tuple[list[tuple[int, ...]], dict[int, tuple[int, int]]]:
    """Blocks of original operands (one per group column made only of them) and every step's source.

    Sets every group's ``columns``. Returns ``blocks``: node positions per block, and for every
    operand and result of the schedule its ``(slot, row)``: a slot is a block or (from
    ``len(blocks)`` on) a group's result.
    """
    columns = [list(zip(*(inputs for inputs, _ in group.steps), strict=True)) for group in groups]
    blocks: list[tuple[int, ...]] = []
    slots: dict[int, tuple[int, int]] = {}
    for column in itertools.chain.from_iterable(columns):
        if all(s < num_nodes for s in column) and len({s in inputs for s in column}) == 1:
            slots.update((s, (len(blocks), g)) for g, s in enumerate(column))
            blocks.append(column)
            continue
        for s in column:
            if s < num_nodes:
                slots[s] = (len(blocks), 0)
                blocks.append((s,))
    sizes = [len(block) for block in blocks]
    for group, group_columns in zip(groups, columns, strict=True):
        group.columns = [Column(tuple(slots[s] for s in c), sizes) for c in group_columns]
        slots.update((output, (len(sizes), g)) for g, (_, output) in enumerate(group.steps))
        sizes.append(len(group.steps))
    return blocks, slots


class StableNetwork:
    """A graph contracted along a planned pairwise path, with a per-sample log-scale.

    Args:
        graph: a :class:`~tnkd.tn.graph.TNGraph` (or its ``spec()``).
        optimize: ``"auto"`` (:func:`tree_path` for graphs without loops, else ``"greedy"``) or
            any ``opt_einsum`` path optimizer (``"greedy"``, ``"dp"``, ``"optimal"``, a
            ``PathOptimizer``, an explicit path). The path is planned once, on the
            single-sample network, like :class:`~tnkd.tn.contraction.CompiledNetwork`'s.

    Call it with one tensor per node in the graph's node order (input nodes with a leading batch
    index). It returns ``(values, log_scale)``: ``values`` of shape ``(batch, *outputs)`` with
    max-abs 1 per sample (0 where the value is exactly 0), and ``log_scale`` of shape ``(batch,)``.

    **Blocks.** The nodes that enter the same operand column of a group (say, all leaves of a
    tree, or all their left inputs) form a *block*; ``blocks`` lists them. :meth:`contract`
    takes one stacked tensor per block, so a student that stores its parameters stacked by
    block (as :class:`~tnkd.students.graph.GraphStudent` does) feeds a whole tree level to one
    kernel without copying it. ``groups`` (the schedule, in order) and ``last`` (the result's
    slot and row) are what the tree engine (:func:`tnkd.tn.fused.tree_plan`) reads; ``depth``
    counts the levels of the contraction tree (sequential kernels, ignoring grouping),
    ``kernels`` the batched einsums per call (one per group).
    """

    def __init__(self, graph: TNGraph | NetworkSpec, optimize: Any = "auto") -> None:
        self.spec = graph.spec() if isinstance(graph, TNGraph) else graph
        if not self.spec.input_nodes:
            raise ValueError("a StableNetwork needs at least one input node (the batch index)")
        path = tree_path(self.spec) if optimize == "auto" else optimize
        self.path, self.path_info = oe.contract_path(
            einsum_equation(self.spec, batched=False),
            *self.spec.node_shapes,
            shapes=True,
            optimize="greedy" if path is None else path,
        )
        self.groups, self.depth, last_names, last = _schedule(self.spec, self.path)
        self.kernels = len(self.groups)
        inputs = {k for k, n in enumerate(self.spec.node_names) if n in self.spec.input_nodes}
        self.blocks, where = _layout(self.groups, len(self.spec.node_names), inputs)
        # renormalise a group's results once more than RENORM_AFTER tensors were multiplied into
        # them (an original operand counts 1, a renormalised result 0), and always the last group
        carried = dict.fromkeys(range(len(self.spec.node_names)), 1)
        for group in self.groups:
            counts = [sum(carried[s] for s in ids) for ids, _ in group.steps]
            group.renorm = group is self.groups[-1] or max(counts) > RENORM_AFTER
            for (_, output), count in zip(group.steps, counts, strict=True):
                carried[output] = 0 if group.renorm else count
        #: some group is not renormalised: a contraction checks its range (and may rerun)
        self.checks_range = not all(group.renorm for group in self.groups)
        self.block_is_input = [block[0] in inputs for block in self.blocks]
        self.last = where[last]
        self._permutation = tuple(last_names.index(ix) for ix in (BATCH, *self.spec.output_indices))

    def to_blocks(self, operands: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-node operands (graph order) -> one stacked tensor per block."""
        if len(operands) != len(self.spec.node_names):
            raise ValueError(
                f"expected {len(self.spec.node_names)} operands (one per node), got {len(operands)}"
            )
        return [
            torch.stack([operands[i].movedim(0, -1) if is_input else operands[i] for i in block])
            for block, is_input in zip(self.blocks, self.block_is_input, strict=True)
        ]

    def from_blocks(self, blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One stacked tensor per block -> per-node operands in graph order (views)."""
        out: list[torch.Tensor] = [None] * len(self.spec.node_names)  # type: ignore[list-item]
        for block, tensor, is_input in zip(self.blocks, blocks, self.block_is_input, strict=True):
            for g, i in enumerate(block):
                out[i] = tensor[g].movedim(-1, 0) if is_input else tensor[g]
        return out

    def __call__(self, operands: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Contract per-node operands; returns ``values`` (batch, *outputs), ``log_scale`` (batch,)."""
        return self.contract(self.to_blocks(operands))

    def contract(
        self, blocks: Sequence[torch.Tensor], every: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Contract stacked operands, one tensor per block (see ``blocks``).

        A parameter block is ``(G, *node shape)``, an input block ``(G, *node shape, batch)``
        (intermediates keep the batch index last too: elementwise work then runs along
        contiguous samples). ``every=True`` renormalises after every step and skips the range
        check (no data-dependent branch: what ``torch.compile`` traces in one graph).
        """
        if len(blocks) != len(self.blocks):
            raise ValueError(f"expected {len(self.blocks)} blocks, got {len(blocks)}")
        with full_precision(blocks) as blocks:
            tensors = list(blocks)
            logs: dict[int, torch.Tensor] = {}
            peaks = []
            for group in self.groups:
                ops = [c.take(tensors) for c in group.columns]
                result = ops[0]
                for eq, positions in group.stages:
                    result = torch.einsum(eq, *[result if k < 0 else ops[k] for k in positions])
                parts = []  # the result's log-scale: its own (if renormalised), its operands'
                if group.renorm or every:  # per (group entry, sample)
                    result, log, peak = rescaled(result, group.scale_axes)
                    parts.append(log.reshape(result.shape[0], -1))
                    peaks.append(peak)
                parts += [p for c in group.columns if (p := c.take_log(logs)) is not None]
                if parts:
                    logs[len(tensors)] = sum(parts[1:], parts[0])
                tensors.append(result)
            if not every and self.checks_range:
                # between renormalisations a value may have left the range where float keeps all
                # its digits: then contract again, renormalising after every step
                lowest, highest = digits_range(blocks[0].dtype)
                worst = torch.cat([p.reshape(-1) for p in peaks])
                if not bool(((worst >= lowest) & (worst <= highest)).all()):  # False for NaN too
                    return self.contract(blocks, every=True)
        slot, g = self.last
        values = tensors[slot][g].permute(*self._permutation)
        batch = values.shape[0]
        log_scale = logs[slot][g].expand(batch) if slot in logs else values.new_zeros(batch)
        return values, log_scale


@contextlib.contextmanager
def full_precision(tensors: Sequence[Any]):
    """The tensors as they are, or under autocast in float32 (or wider) with autocast off.

    Products of many tensors (chains, trees, any network) lose their small corrections in
    bfloat16, which keeps 8 bits of mantissa, so a network is contracted in float32, or in its
    widest operand's dtype (the teacher, feature maps and divergences still run under autocast).
    Items that are not tensors (None, ints) pass through.
    """
    present = [t for t in tensors if isinstance(t, torch.Tensor)]
    device = present[0].device.type if present else "cpu"
    if not torch.is_autocast_enabled(device):
        yield list(tensors)
        return
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in present), torch.float32)
    with torch.autocast(device_type=device, enabled=False):
        yield widened(tensors, dtype)


def widened(tensors: Sequence[Any], dtype: torch.dtype) -> list[Any]:
    """The floating tensors converted to ``dtype`` (other items, None or ints, as they are)."""
    return [
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors
    ]


def rescaled(
    values: torch.Tensor, dims: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``values`` divided by their largest magnitude over ``dims``: the engines' max-abs rescaling.

    The divisor comes from detached values (gradients flow through the quotient only), clamped
    at the dtype's smallest normal number (an all-zero slice stays 0, with a finite log); its
    log goes into the caller's running log-scale.

    Args:
        values: any tensor.
        dims: the axes the largest magnitude is taken over (none: every entry alone).

    Returns:
        ``(values / scale, log(scale), peak)``, ``peak`` the largest magnitudes before the clamp,
        both with ``dims`` kept as axes of size 1.
    """
    peak = values.detach().abs()
    if dims:
        peak = peak.amax(dim=tuple(dims), keepdim=True)
    scale = peak.clamp_min(torch.finfo(values.dtype).tiny)
    return values / scale, torch.log(scale), peak


def direction_logits(values: torch.Tensor, log_logit_scale: torch.Tensor) -> torch.Tensor:
    """Normalized logits ``exp(s) v / ||v||``: what a student with ``output="normalized"`` returns.

    The norm is over the last dimension, clamped at the smallest normal float.
    ``log_logit_scale`` broadcasts against ``values`` (a scalar, or ``(M, 1, 1)`` for stacked
    members).

    Example:
        >>> direction_logits(torch.tensor([[3.0, 4.0]]), torch.tensor(0.0))
        tensor([[0.6000, 0.8000]])
    """
    tiny = torch.finfo(values.dtype).tiny
    return torch.exp(log_logit_scale) * (values / values.norm(dim=-1, keepdim=True).clamp_min(tiny))


def log_abs(values: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Log |f| of a contraction returned as ``(values, log_scale)``: finite where f != 0."""
    shape = (log_scale.shape[0],) + (1,) * (values.ndim - 1)
    return torch.log(values.abs()) + log_scale.view(shape)


def planned_cost(graph: TNGraph | NetworkSpec, optimize: Any = "auto") -> dict[str, float]:
    """Flops and largest intermediate (entries) of the planned path, for one sample.

    Multiply by the batch size for the batched contraction. Used to say which sizes of a family
    are affordable to contract exactly.
    """
    net = StableNetwork(graph, optimize=optimize)
    return {
        "flops": float(net.path_info.opt_cost),
        "largest_intermediate": float(net.path_info.largest_intermediate),
        "depth": float(net.depth),
        "kernels": float(net.kernels),
    }
