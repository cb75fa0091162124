"""Canonical forms and SVD truncation of tensor networks without loops (chains, TT networks, trees).

A network without loops is in *canonical form about a centre node* c when every other node,
read as a matrix from all its axes but the one that points towards c to that one axis, has
orthonormal columns (an isometry). Then the whole network, read across any bond next to c, is
U S V^T with U and V isometries: the singular values of c read across that bond are the
singular values of the full coefficient tensor across the bond (Schollwöck 2011, "The
density-matrix renormalization group in the age of matrix product states", sec. 4; for trees,
Shi, Duan & Vidal 2006). Truncating that bond to the r largest singular values is then the
best rank-r approximation across it. Truncating every bond in turn, moving the centre along,
keeps the error of a chain within

    || W - W_trunc ||_F <= sqrt( sum over bonds of the discarded squared singular values )

(the successive projections are nested and their errors orthogonal: Oseledets 2011, Thm. 2.2;
a chain cut from its end meets the bound with equality), with W the full coefficient tensor (all
physical and label indices). On a tree the projections are not nested, and the guaranteed bound
is the sum of the discarded norms (each projection is a contraction): :attr:`Truncation.error_bound`
gives the bound that holds.

Functions work on ``tensors`` plus ``indices`` (one label per axis; a label on two tensors is a
bond, a label on one is a free index: a physical leg or the label), the form
:meth:`tnkd.tn.graph.TNGraph.spec` gives once the input nodes are dropped
(:func:`network_of`). They compute in float64 and return the input dtype. Scales are kept
apart as a log-norm, so chains of hundreds of cores neither overflow nor vanish.

Example:
    >>> import torch
    >>> cores = [torch.randn(1, 2, 4), torch.randn(4, 2, 4), torch.randn(4, 2, 1)]
    >>> left, log_norm = left_canonicalize(cores)
    >>> m = left[1].reshape(-1, left[1].shape[-1])  # (r n) x r'
    >>> torch.allclose(m.T @ m, torch.eye(m.shape[1]), atol=1e-6)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tnkd.tn.decompositions import svd_rank
from tnkd.tn.graph import TNGraph, index_ends

Indices = Sequence[Sequence[str]]


def network_of(graph: TNGraph) -> tuple[list[torch.Tensor], list[tuple[str, ...]], list[str]]:
    """The parameter nodes of a graph as ``(tensors, indices, names)``; input legs become free."""
    spec = graph.spec()
    pairs = zip(graph.nodes, spec.node_indices, strict=True)
    kept = [(node, tuple(idx)) for node, idx in pairs if node.name not in spec.input_nodes]
    return [n.tensor for n, _ in kept], [idx for _, idx in kept], [n.name for n, _ in kept]


def hang(indices: Indices, center: int) -> tuple[list[int], dict[int, list[tuple[int, str]]]]:
    """A network without loops hung from node ``center``: nodes breadth-first, (child, bond)s.

    Raises:
        ValueError: the network has a loop or is not connected.
    """
    ends = index_ends(indices)
    bad = [label for label, e in ends.items() if len(e) > 2]
    if bad:
        raise ValueError(f"indices {bad} appear on more than two axes; expected bonds or free legs")
    bonds = {label: e for label, e in ends.items() if len(e) == 2}
    n = len(indices)
    if not 0 <= center < n:
        raise ValueError(f"centre must be a node index in [0, {n}), but got {center}")
    neighbours: list[list[tuple[int, str]]] = [[] for _ in range(n)]
    for label, ((a, _), (b, _)) in bonds.items():
        if a == b:
            raise ValueError(f"bond {label!r} joins node {a} to itself: a loop")
        neighbours[a].append((b, label))
        neighbours[b].append((a, label))
    if len(bonds) != n - 1:
        raise ValueError(
            f"canonical forms need a connected network without loops (n - 1 = {n - 1} bonds for "
            f"{n} nodes), but it has {len(bonds)} bonds; a PEPS has loops: it has no canonical form"
        )
    order, children, seen = [center], {}, {center}
    for v in order:
        children[v] = []
        for u, label in sorted(neighbours[v]):
            if u not in seen:
                seen.add(u)
                order.append(u)
                children[v].append((u, label))
    if len(order) != n:
        raise ValueError("canonical forms need a connected network; some nodes are not reachable")
    return order, children


def _split(t: torch.Tensor, axis: int) -> torch.Tensor:
    """``t`` as a (everything but ``axis``) x ``axis`` matrix; :func:`_join` undoes it."""
    return t.movedim(axis, -1).reshape(-1, t.shape[axis])


def _join(m: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """A :func:`_split` matrix of ``like`` with k columns back as a tensor, k long on ``axis``."""
    return m.reshape(*like.movedim(axis, -1).shape[:-1], m.shape[1]).movedim(-1, axis)


def _absorb(t: torch.Tensor, axis: int, mat: torch.Tensor) -> torch.Tensor:
    """Contract ``mat`` (new, old) into ``axis`` of ``t``; the axis keeps its position."""
    return torch.tensordot(mat, t, dims=([1], [axis])).movedim(0, axis)


def _qr_towards(tensors: list[torch.Tensor], indices: Indices, v: int, p: int, label: str) -> float:
    """Make node v an isometry towards neighbour p (QR), push R into p; returns log ||R||."""
    axis = indices[v].index(label)
    q, r = torch.linalg.qr(_split(tensors[v], axis))
    norm = float(r.norm())
    if norm > 0:
        r = r / norm
    tensors[v] = _join(q, tensors[v], axis)
    tensors[p] = _absorb(tensors[p], indices[p].index(label), r)
    return math.log(norm) if norm > 0 else 0.0


def canonicalize(
    tensors: Sequence[torch.Tensor], indices: Indices, center: int
) -> tuple[list[torch.Tensor], float]:
    """Bring a network without loops into canonical form about node ``center``.

    Args:
        tensors: the nodes.
        indices: one label per axis of each node (bonds: labels on two nodes).
        center: the index of the centre node.

    Returns:
        The new tensors (float64 computations, input dtype) with every node but the centre an
        isometry towards it and the centre of unit norm, and ``log_norm``: the network equals
        ``exp(log_norm)`` times the new one. A bond can shrink (exactly) to the number of
        states that can reach it.
    """
    dtype = tensors[0].dtype
    work = [t.detach().to(torch.float64) for t in tensors]
    order, children = hang(indices, center)
    log_norm = 0.0
    for v in reversed(order):  # deepest first: each child an isometry towards its parent
        for u, label in reversed(children[v]):
            log_norm += _qr_towards(work, indices, u, v, label)
    norm = float(work[center].norm())
    if norm > 0:
        work[center] = work[center] / norm
        log_norm += math.log(norm)
    return [t.to(dtype) for t in work], log_norm


class Discarded:
    """The error bound of a truncation from its ``discarded`` weights (and ``chain``)."""

    discarded: dict[str, float]
    chain: bool

    @property
    def total_discarded(self) -> float:
        """Sum of the discarded weights (for a chain, ||W - W_trunc||^2 / ||W||^2 is at most this)."""
        return float(sum(self.discarded.values()))

    @property
    def error_bound(self) -> float:
        """Bound on ||W - W_trunc||_F / ||W||_F: sqrt(total) for a chain, sum of sqrt for a tree."""
        if self.chain:
            return math.sqrt(self.total_discarded)
        return float(sum(math.sqrt(w) for w in self.discarded.values()))


@dataclass
class Truncation(Discarded):
    """What :func:`truncate` did.

    Attributes:
        tensors: the truncated network (float64 work, input dtype), in canonical form about
            the centre; the original network is approximated by ``exp(log_norm)`` times it.
        log_norm: the scale kept apart.
        spectra: per bond, its full spectrum (singular values of the unit-norm network across
            the bond, before it was cut), in sweep order.
        ranks: per bond, the rank kept.
        discarded: per bond, the discarded weight: the sum of the squared singular values cut
            (relative to the network's squared norm, which is 1).
    """

    tensors: list[torch.Tensor]
    log_norm: float
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    discarded: dict[str, float] = field(default_factory=dict)
    chain: bool = True


def truncate(
    tensors: Sequence[torch.Tensor],
    indices: Indices,
    center: int,
    rank: int | None = None,
    tolerance: float | None = None,
) -> Truncation:
    """Truncate every bond of a network without loops by SVD, from a canonical form.

    Args:
        tensors: the nodes.
        indices: one label per axis (bonds: labels on two nodes).
        center: the centre node (for a classifier: the node with the label).
        rank: keep at most this many singular values per bond.
        tolerance: keep the fewest singular values whose discarded tail has squared norm at
            most ``tolerance^2`` times the bond's total (relative, per bond). With neither,
            only numerically zero singular values are cut (the result equals the input).

    Returns:
        A :class:`Truncation`, with ``||W - exp(log_norm) W_trunc|| <= error_bound * ||W||``.

    Raises:
        ValueError: for networks with loops, or a rank < 1 / tolerance < 0.
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"truncation rank must be a positive integer, but got {rank!r}")
    if tolerance is not None and not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(
            f"truncation tolerance must be a finite number >= 0, but got {tolerance!r}"
        )
    dtype = tensors[0].dtype
    work, log_norm = canonicalize([t.to(torch.float64) for t in tensors], indices, center)
    order, children = hang(indices, center)
    chain = all(len(children[v]) + (v != center) <= 2 for v in order)  # every node: <= 2 bonds
    out = Truncation(tensors=[], log_norm=log_norm, chain=chain)
    # depth first: the centre moves down each bond (v, u), cutting it, back up after u's subtree
    moves = [(center, u, label, True) for u, label in reversed(children[center])]
    while moves:
        v, u, label, down = moves.pop()
        if not down:  # back up from u to v (exact; the scale is kept apart)
            out.log_norm += _qr_towards(work, indices, u, v, label)
            continue
        # the centre is at v: v's singular values across the bond are the network's
        axis = indices[v].index(label)
        left, s, right = torch.linalg.svd(_split(work[v], axis), full_matrices=False)
        max_tail = None if tolerance is None else tolerance**2 * float((s**2).sum())
        r = svd_rank(s, rank, max_tail, size=s.numel())
        out.spectra[label] = s.clone()
        out.ranks[label] = r
        out.discarded[label] = float((s[r:] ** 2).sum())
        work[v] = _join(left[:, :r], work[v], axis)
        work[u] = _absorb(work[u], indices[u].index(label), s[:r, None] * right[:r])
        moves += [(v, u, label, False), *((u, w, bond, True) for w, bond in reversed(children[u]))]
    out.tensors = [t.to(dtype) for t in work]
    return out


def entanglement_entropy(singular_values: torch.Tensor) -> float:
    """Von Neumann entropy S = -sum p log p, p_i = s_i^2 / sum s^2 (natural log; 0 for rank 1)."""
    p = singular_values.double() ** 2
    total = float(p.sum())
    if total <= 0:
        return 0.0
    p = p[p > 0] / total
    return float(-(p * p.log()).sum()) + 0.0  # + 0.0: no "-0.0" for rank 1


def left_canonicalize(cores: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """Left-canonical chain: every core but the last, read as (r n) x r', has orthonormal columns.

    Args:
        cores: (r_{k-1}, n_k, r_k) cores, r_0 = r_N = 1 (any end ranks work).

    Returns:
        The cores (the last one of unit norm, holding the rest) and ``log_norm``: the chain equals
        ``exp(log_norm)`` times the new one.
    """
    indices = [(f"b{k}", f"s{k}", f"b{k + 1}") for k in range(len(cores))]
    return canonicalize(cores, indices, len(cores) - 1)


def right_canonicalize(cores: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """Right-canonical chain: every core but the first, read as r x (n r'), has orthonormal rows."""
    indices = [(f"b{k}", f"s{k}", f"b{k + 1}") for k in range(len(cores))]
    return canonicalize(cores, indices, 0)
