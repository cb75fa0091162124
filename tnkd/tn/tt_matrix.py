"""TT-matrix times a batch of vectors: a sequential contraction planned per batch size.

A TT-matrix ``W`` (out x in, ``in = m_1...m_d``, ``out = n_1...n_d``) is stored as cores G_k of
shape (r_{k-1}, m_k, n_k, r_k), r_0 = r_d = 1. The product ``y = x @ W.T + b`` for a batch of B
rows never needs W: Novikov et al. (2015, "Tensorizing Neural Networks", Sec. 5) contract the
input, reshaped to (B, m_1, ..., m_d), with one core at a time, each step one matrix product
over the batch. :func:`tt_linear` does that with two refinements, chosen per shape by :func:`plan_tt_matvec`,
which counts the multiply-adds of every choice, merges included, for the actual batch size:

* **Groups.** Neighbouring cores may first be merged into one core (r_a, m_a...m_b, n_a...n_b,
  r_b), at a cost independent of the batch, where that saves multiply-adds per sample (examples:
  :func:`plan_tt_matvec`; measured: ``docs/benchmarks/tt-layers.md``).
* **Direction.** The sweep starts from the first core or from the last.

Each step is one ``mm`` or one ``bmm`` with the step matrix shared over the leading index, on
layouts chosen so that a step's output is the next step's input as a view: a state (B·rows,
inner, cols) times a matrix (out, inner) gives (B·rows, out, cols). On CPU the batch is cut into
equal chunks whose largest state holds at most ``CHUNK_FLOATS`` numbers, in buffers reused by
every chunk. Training runs through a :class:`torch.autograd.Function` that keeps the input and
the step matrices and recomputes a chunk's states in the backward pass (a one-chunk batch keeps
its states); a plan of one group (all cores merged) is a plain ``addmm``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from math import prod

import torch

from tnkd.tn.stable import widened

CHUNK_FLOATS = 1 << 20
"""Bound on the numbers in one chunk's largest intermediate state on CPU (4 MiB in float32)."""


@dataclass(frozen=True)
class TTStep:
    """One step of a sweep: a state viewed as (B·rows, inner, cols) times an (out, inner) matrix.

    The matrix is cores ``start..stop-1`` merged into one. ``cols == 1`` makes the step one
    ``mm`` over B·rows rows.
    """

    start: int
    stop: int
    rows: int
    inner: int
    cols: int
    out: int

    @property
    def macs(self) -> int:
        """Multiply-adds per sample."""
        return self.rows * self.inner * self.cols * self.out

    @property
    def out_size(self) -> int:
        """Numbers in the step's output, per sample."""
        return self.rows * self.out * self.cols


@dataclass(frozen=True)
class TTPlan:
    """A planned contraction.

    Attributes:
        groups: ``(start, stop)`` core ranges, left to right.
        reverse: the sweep starts from the last group (else from the first).
        steps: the steps in the order they run.
        cost: the multiply-adds the plan was chosen by, batch included.
        chunk: samples contracted together.
    """

    groups: tuple[tuple[int, int], ...]
    reverse: bool
    steps: tuple[TTStep, ...]
    cost: int
    chunk: int


def _merge_macs(m: Sequence[int], n: Sequence[int], ranks: Sequence[int], a: int, b: int) -> int:
    """Multiply-adds of :func:`merge_cores` on cores a..b-1 (halves first; 0 for one core)."""
    if b - a == 1:
        return 0
    h = a + (b - a) // 2
    top = ranks[a] * ranks[h] * ranks[b] * prod(m[a:b]) * prod(n[a:b])
    return top + _merge_macs(m, n, ranks, a, h) + _merge_macs(m, n, ranks, h, b)


def _steps(
    m: Sequence[int],
    n: Sequence[int],
    ranks: Sequence[int],
    groups: Sequence[tuple[int, int]],
    reverse: bool,
) -> tuple[TTStep, ...]:
    """The steps of a sweep over these groups, in the order they run.

    From the first group on, the state before group g is (B·N_<g, R_{g-1}·M_g, M_>g) and its
    matrix (N_g·R_g, R_{g-1}·M_g); from the last group, (B·M_<g, M_g·R_g, N_>g) and
    (R_{g-1}·N_g, M_g·R_g). M, N are the groups' factor products and R the boundary ranks.
    """
    gm = [prod(m[a:b]) for a, b in groups]
    gn = [prod(n[a:b]) for a, b in groups]
    gr = [ranks[a] for a, _ in groups] + [ranks[-1]]
    if not reverse:
        return tuple(
            TTStep(a, b, prod(gn[:g]), gr[g] * gm[g], prod(gm[g + 1 :]), gn[g] * gr[g + 1])
            for g, (a, b) in enumerate(groups)
        )
    return tuple(
        TTStep(a, b, prod(gm[:g]), gm[g] * gr[g + 1], prod(gn[g + 1 :]), gr[g] * gn[g])
        for g, (a, b) in reversed(list(enumerate(groups)))
    )


def _groupings(d: int) -> Iterator[tuple[tuple[int, int], ...]]:
    """Every split of cores 0..d-1 into runs of neighbours (2^(d-1) of them)."""
    for cuts in itertools.product((False, True), repeat=d - 1):
        bounds = [0, *(k + 1 for k, cut in enumerate(cuts) if cut), d]
        yield tuple(itertools.pairwise(bounds))


def _check_sizes(
    in_factors: Sequence[int], out_factors: Sequence[int], ranks: Sequence[int], batch: int
) -> None:
    d = len(in_factors)
    if d < 1 or len(out_factors) != d or len(ranks) != d - 1:
        raise ValueError(
            f"a TT-matrix needs d >= 1 in factors, d out factors and d - 1 ranks, but got "
            f"{len(in_factors)}, {len(out_factors)} and {len(ranks)}"
        )
    sizes = [*in_factors, *out_factors, *ranks]
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"TT-matrix factors and ranks must be positive integers, but got {sizes}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be a non-negative integer, but got {batch!r}")


def build_plan(
    in_factors: Sequence[int],
    out_factors: Sequence[int],
    ranks: Sequence[int],
    groups: Sequence[tuple[int, int]],
    reverse: bool,
    batch: int,
    training: bool = True,
    chunk_floats: int | None = CHUNK_FLOATS,
) -> TTPlan:
    """The plan of one grouping and direction, with its cost (see :func:`plan_tt_matvec`).

    Args:
        in_factors: (m_1, ..., m_d).
        out_factors: (n_1, ..., n_d).
        ranks: the inner ranks (r_1, ..., r_{d-1}).
        groups: ``(start, stop)`` runs of neighbouring cores covering 0..d-1 in order.
        reverse: sweep from the last group.
        batch: rows of the input.
        training: cost of forward + backward (else forward only).
        chunk_floats: bound on one chunk's largest state, in numbers; None: the whole batch at
            once (accelerators, whose caching allocators make fresh buffers cheap).

    Returns:
        The :class:`TTPlan`.
    """
    _check_sizes(in_factors, out_factors, ranks, batch)
    d = len(in_factors)
    groups = tuple((int(a), int(b)) for a, b in groups)
    bounds = [0, *(b for _, b in groups)]  # no groups: [0], which does not reach d
    runs = groups == tuple(itertools.pairwise(bounds)) and all(a < b for a, b in groups)
    if not runs or bounds[-1] != d:
        raise ValueError(
            f"groups must be (start, stop) runs covering cores 0..{d - 1} in order, but got "
            f"{list(groups)}"
        )
    full = (1, *ranks, 1)
    steps = _steps(in_factors, out_factors, full, groups, reverse)
    merge = sum(_merge_macs(in_factors, out_factors, full, a, b) for a, b in groups)
    macs = sum(s.macs for s in steps)
    cost = batch * (4 * macs - steps[-1].macs) + 3 * merge if training else batch * macs + merge
    largest = max((s.out_size for s in steps[:-1]), default=0)
    chunk = max(batch, 1)
    if chunk_floats is not None and largest > 0:
        # as few chunks as the bound allows, of equal size (no small last chunk)
        chunks = -(-chunk * largest // max(chunk_floats, largest))
        chunk = -(-chunk // chunks)
    return TTPlan(groups, bool(reverse), steps, cost, chunk)


@functools.lru_cache(maxsize=1024)
def plan_tt_matvec(
    in_factors: tuple[int, ...],
    out_factors: tuple[int, ...],
    ranks: tuple[int, ...],
    batch: int,
    training: bool = True,
    chunk_floats: int | None = CHUNK_FLOATS,
) -> TTPlan:
    """The cheapest sweep for a batch of ``batch`` rows, by counted multiply-adds (cached).

    Every grouping of neighbouring cores (2^(d-1)) in both directions is costed: for inference
    ``batch * sum(step MACs) + merge MACs``; for training, whose backward pass recomputes every
    state but the output and takes two products per step (input and matrix gradients),
    ``batch * (4 * sum - last step) + 3 * merge``. The arguments are :func:`build_plan`'s (as
    tuples, for the cache) but the grouping and the direction, which this chooses; returns the
    cheapest :class:`TTPlan` (the first found among equals).

    Example:
        >>> plan_tt_matvec((8, 8, 8, 8), (8, 8, 8, 8), (16, 16, 16), batch=256).groups
        ((0, 2), (2, 4))
        >>> plan_tt_matvec((8, 8, 8, 8), (2, 2, 2, 2), (8, 8, 8), batch=256).groups
        ((0, 4),)
    """
    _check_sizes(in_factors, out_factors, ranks, batch)
    plans = (
        build_plan(in_factors, out_factors, ranks, groups, reverse, batch, training, chunk_floats)
        for groups in _groupings(len(in_factors))
        for reverse in ((False, True) if len(groups) > 1 else (False,))
    )
    return min(plans, key=lambda plan: plan.cost)


def _combine(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """(ra, A1, B1, r) and (r, A2, B2, rb) -> (ra, A1·A2, B1·B2, rb): one ``mm``, one block swap."""
    ra, a1, b1, r = left.shape
    _, a2, b2, rb = right.shape
    prod = torch.mm(left.reshape(-1, r), right.reshape(r, -1)).view(ra * a1, b1, a2, b2 * rb)
    return prod.transpose(1, 2).reshape(ra, a1 * a2, b1 * b2, rb)


def merge_cores(cores: Sequence[torch.Tensor], out_first: bool = False) -> torch.Tensor:
    """Neighbouring cores (r_{k-1}, m_k, n_k, r_k) merged into one, halves first.

    Args:
        cores: the cores, left to right.
        out_first: return (r_a, N, M, r_b) instead of (r_a, M, N, r_b).

    Returns:
        The merged core, ``M = m_a...m_b`` and ``N = n_a...n_b``. Merging two halves last makes
        its block swap move runs of N_right·r_b (or M_right·r_b) contiguous numbers.
    """
    if len(cores) == 1:
        return cores[0].transpose(1, 2) if out_first else cores[0]
    half = len(cores) // 2
    return _combine(merge_cores(cores[:half], out_first), merge_cores(cores[half:], out_first))


def step_matrices(cores: Sequence[torch.Tensor], plan: TTPlan) -> list[torch.Tensor]:
    """The plan's (out, inner) step matrices in step order, differentiable in the cores.

    From the first group on, a step matrix is the transpose of the merged (r_a·M, N·r_b) cores
    (a view); from the last, the merged (r_a·N, M·r_b) cores.
    """
    merged = [merge_cores(cores[s.start : s.stop], out_first=plan.reverse) for s in plan.steps]
    if plan.reverse:
        return [m.reshape(s.out, s.inner) for m, s in zip(merged, plan.steps, strict=True)]
    return [m.reshape(s.inner, s.out).t() for m, s in zip(merged, plan.steps, strict=True)]


def _forward_step(
    state: torch.Tensor,
    mat: torch.Tensor,
    step: TTStep,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> None:
    """One step on a chunk: (P, inner, cols) state times (out, inner) matrix (+ bias), into ``out``.

    ``out`` and ``bias`` are laid out one sample per row: (b, rows·out·cols) and (rows·out·cols,).
    """
    if step.cols == 1:
        state2, out2 = state.view(-1, step.inner), out.view(-1, step.out)
        if bias is not None and step.rows == 1:
            torch.addmm(bias, state2, mat.t(), out=out2)
            return
        torch.mm(state2, mat.t(), out=out2)
    else:
        st = state.view(-1, step.inner, step.cols)
        torch.bmm(mat.expand(st.shape[0], -1, -1), st, out=out.view(st.shape[0], step.out, -1))
    if bias is not None:
        out.view(-1, bias.shape[0]).add_(bias)


def _backward_step(
    g: torch.Tensor,
    state: torch.Tensor,
    mat: torch.Tensor,
    step: TTStep,
    grad_mat: torch.Tensor | None,
    grad_state: torch.Tensor | None,
    scratch: torch.Tensor,
    first: bool,
) -> None:
    """Write (first chunk) or add one step's matrix gradient; write its state gradient if asked."""
    beta = 0 if first else 1  # 0: the buffer's old contents are ignored, even NaN
    if step.cols == 1:
        g2 = g.view(-1, step.out)
        if grad_mat is not None:
            grad_mat.addmm_(g2.t(), state.view(-1, step.inner), beta=beta)
        if grad_state is not None:
            torch.mm(g2, mat, out=grad_state.view(-1, step.inner))
        return
    g3 = g.view(-1, step.out, step.cols)
    st = state.view(-1, step.inner, step.cols)
    p, n = g3.shape[0], g3.shape[0] * step.cols
    if grad_mat is not None:
        # sum_p g_p st_p^T: P products then their sum (P·out·inner numbers written), or one
        # product after moving cols next to P in both operands (P·cols·(out + inner) copied),
        # whichever moves less memory; two or three kernels either way (an addbmm would be P)
        if step.out * step.inner <= step.cols * (step.out + step.inner):
            prods = scratch[: p * step.out * step.inner].view(p, step.out, step.inner)
            torch.bmm(g3, st.transpose(1, 2), out=prods)
            if first:
                torch.sum(prods, 0, out=grad_mat)
            else:
                grad_mat.add_(prods.sum(0))
        else:
            gt = scratch[: step.out * n].view(step.out, p, step.cols)
            sc = scratch[step.out * n : (step.out + step.inner) * n].view(step.inner, p, step.cols)
            gt.copy_(g3.transpose(0, 1))
            sc.copy_(st.transpose(0, 1))
            grad_mat.addmm_(gt.view(step.out, n), sc.view(step.inner, n).t(), beta=beta)
    if grad_state is not None:
        torch.bmm(mat.t().expand(p, -1, -1), g3, out=grad_state.view(p, step.inner, step.cols))


def _scratch_size(step: TTStep) -> int:
    """Numbers per sample that :func:`_backward_step` needs for this step's matrix gradient."""
    if step.cols == 1:
        return 0
    return step.rows * min(step.out * step.inner, step.cols * (step.out + step.inner))


def _states(
    x: torch.Tensor,
    mats: Sequence[torch.Tensor],
    steps: Sequence[TTStep],
    buffers: Sequence[torch.Tensor],
    compute: bool = True,
) -> list[torch.Tensor]:
    """Every step's input for a chunk ``x``: ``x``, then the other steps' outputs in ``buffers``.

    ``compute=False``: the buffers hold those states already (kept by the forward pass).
    """
    states = [x]
    for mat, step, buf in zip(mats[:-1], steps[:-1], buffers, strict=True):
        out = buf[: x.shape[0] * step.out_size]
        if compute:
            _forward_step(states[-1], mat, step, out)
        states.append(out)
    return states


def _sweep(
    x: torch.Tensor, mats: Sequence[torch.Tensor], bias: torch.Tensor | None, plan: TTPlan
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The forward pass, chunk by chunk, into one (batch, out) tensor.

    The intermediate states live in one buffer per step, allocated once for a chunk and reused by
    every chunk. Returns the output and the buffers (holding the last chunk's states).
    """
    batch = x.shape[0]
    chunk = max(1, min(plan.chunk, batch))
    buffers = [x.new_empty(chunk * s.out_size) for s in plan.steps[:-1]]
    y = x.new_empty(batch, plan.steps[-1].out_size)
    for c0 in range(0, batch, chunk):
        state = _states(x[c0 : c0 + chunk], mats, plan.steps, buffers)[-1]
        _forward_step(state, mats[-1], plan.steps[-1], y[c0 : c0 + chunk], bias)
    return y, buffers


class _TTLinearFunction(torch.autograd.Function):
    """``x @ W.T + b`` through a plan, saving x and the step matrices (see the module doc)."""

    @staticmethod
    def forward(ctx, plan, x, bias, *mats):  # type: ignore[override]
        y, buffers = _sweep(x, mats, bias, plan)
        # one chunk: keep its states (no more memory than recomputing them would take)
        ctx.plan = plan
        ctx.save_for_backward(x, *mats, *(buffers if plan.chunk >= x.shape[0] else ()))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        plan: TTPlan = ctx.plan
        steps = plan.steps
        x, *rest = ctx.saved_tensors
        mats, kept = rest[: len(steps)], rest[len(steps) :]
        need_x, need_bias = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        # written by the first chunk, added to by the others (an empty batch: zero)
        new = torch.zeros if x.shape[0] == 0 else torch.empty
        grads = [
            new(m.shape, dtype=m.dtype, device=m.device) if need else None
            for m, need in zip(mats, ctx.needs_input_grad[3:], strict=True)
        ]
        dx = torch.empty_like(x) if need_x else None
        dy = dy.contiguous()
        batch = x.shape[0]
        chunk = max(1, min(plan.chunk, batch))
        states = list(kept) or [x.new_empty(chunk * s.out_size) for s in steps[:-1]]
        largest = max((s.out_size for s in steps[:-1]), default=0)
        grad_bufs = [x.new_empty(chunk * largest) for _ in range(2 if len(steps) > 1 else 0)]
        scratch = x.new_empty(chunk * max(_scratch_size(s) for s in steps))
        for c0 in range(0, batch, chunk):
            c1 = min(batch, c0 + chunk)
            inputs = _states(x[c0:c1], mats, steps, states, compute=not kept)
            g = dy[c0:c1]
            for i in range(len(steps) - 1, -1, -1):  # g: the output's gradient, g_in: the input's
                if i > 0:
                    g_in = grad_bufs[i % 2][: (c1 - c0) * steps[i - 1].out_size]
                else:
                    g_in = dx[c0:c1] if need_x else None
                _backward_step(g, inputs[i], mats[i], steps[i], grads[i], g_in, scratch, c0 == 0)
                g = g_in
        dbias = dy.sum(0) if need_bias else None  # (False for a None bias)
        return (None, dx, dbias, *grads)


def tt_linear(
    x: torch.Tensor,
    cores: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    plan: TTPlan | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for the TT-matrix W of ``cores``, without forming W (unless planned so).

    The functional twin of :class:`~tnkd.students.TTLinear`; see the module doc for the algorithm.

    Args:
        x: (batch, in_features) input.
        cores: d cores (r_{k-1}, m_k, n_k, r_k), r_0 = r_d = 1.
        bias: optional (out_features,) bias.
        plan: a :func:`plan_tt_matvec` plan for this batch size; planned here if None (cached).

    Returns:
        (batch, out_features).

    Example:
        >>> cores = [torch.randn(1, 4, 2, 3), torch.randn(3, 4, 5, 1)]
        >>> tt_linear(torch.randn(7, 16), cores).shape
        torch.Size([7, 10])
    """
    in_features = prod(int(c.shape[1]) for c in cores)
    if x.ndim != 2 or x.shape[1] != in_features:
        raise ValueError(
            f"tt_linear expects a (batch, {in_features}) input, but got {tuple(x.shape)}"
        )
    if plan is None:
        plan = plan_for(x, cores)
    mats = step_matrices(cores, plan)
    x = x.contiguous()
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # like nn.Linear under autocast: the products run in the autocast dtype
        x, bias, *mats = widened([x, bias, *mats], torch.get_autocast_dtype(device))
        with torch.autocast(device, enabled=False):
            return _run(x, mats, bias, plan)
    return _run(x, mats, bias, plan)


def plan_for(
    x: torch.Tensor, cores: Sequence[torch.Tensor], training: bool | None = None
) -> TTPlan:
    """:func:`plan_tt_matvec` for this (batch, in) input and these cores.

    ``training`` defaults to whether autograd will record the product; chunks are used on CPU only.
    """
    if training is None:
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *cores))
    return plan_tt_matvec(
        tuple(int(c.shape[1]) for c in cores),
        tuple(int(c.shape[2]) for c in cores),
        tuple(int(c.shape[3]) for c in cores[:-1]),
        int(x.shape[0]),
        training,
        CHUNK_FLOATS if x.device.type == "cpu" else None,
    )


def _run(
    x: torch.Tensor, mats: list[torch.Tensor], bias: torch.Tensor | None, plan: TTPlan
) -> torch.Tensor:
    if len(plan.steps) == 1:
        # all cores merged into W: one product with no intermediate, autograd's own backward
        w_t = mats[0].t()
        return x @ w_t if bias is None else torch.addmm(bias, x, w_t)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, *mats)):
        return _TTLinearFunction.apply(plan, x, bias, *mats)
    return _sweep(x, mats, bias, plan)[0]


def tt_matvec(
    x: torch.Tensor, cores: Sequence[torch.Tensor], bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T + bias`` for the TT-matrix W of ``cores`` (r, m_k, n_k, r'), one core a step.

    The portable twin of :func:`tnkd.tn.tt_matrix.tt_linear` (which merges cores and orders
    the steps per batch size): the input (B, m_1 ... m_d) meets core k, which trades the index
    m_k for n_k; d einsums with no plan, so the captured program serves every batch size.
    """
    batch, state = x.shape[0], x  # read by each step as (B, r_{k-1}, m_k, the rest)
    for core in cores:
        r, m = core.shape[:2]
        state = torch.einsum("brmx,rmns->bsxn", state.reshape(batch, r, m, -1), core)
    out = state.reshape(batch, -1)
    return out if bias is None else out + bias
