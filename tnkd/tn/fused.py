r"""One batched step of a tree-shaped contraction, fused, with a hand-written backward.

The step that a binary tree tensor network repeats at every level (and a chain drawn as a graph
at every site) joins a three-leg node with two per-sample vectors:

    out[g, p, n] = sum_{a, b} W[g, a, b, p] * left[g, a, n] * right[g, b, n]

for G nodes at once (g), each sample n. :func:`pair_step` computes it as the outer product
``left (x) right`` (G, A*B, n) and one batched matrix product with ``W`` viewed as
(G, A*B, P), optionally renormalising each (node, sample) to max-abs 1 as
:class:`~tnkd.tn.stable.StableNetwork` does; its backward is

    g_W[g, a, (b, p)]   = sum_n left[g, a, n] * Q[g, (b, p), n],   Q = right (x) g_out
    g_left[g, a, n]     = sum_{(b, p)} W[g, a, (b, p)] * Q[g, (b, p), n]
    g_right[g, b, n]    = sum_a left[g, a, n] * (W g_out)[g, a, b, n]

(three batched matrix products and two outer products). Done by autograd through
``torch.einsum``, the same step records a dozen nodes (permutes, reshapes, the two einsums'
internals), reduces broadcast gradients with separate multiply and sum kernels, and allocates
(G, A*B, n) temporaries that, at D = 16 and 128 nodes, are 13 MB each: larger than the cache,
fetched fresh from the allocator every step. Here the nodes run in chunks whose temporaries
stay near :data:`CHUNK_ELEMENTS` floats: on one core of this 2-core CPU a 128-node level at
D = 16, batch 100 took 4.6-4.8 ms backward in chunks of 4 nodes against 6-15 ms in one piece.

The interleaved form: when ``right`` is None, ``left`` holds the 2G children of the level in
order (node g's are 2g and 2g + 1, as a tree level's outputs are), read in place and given
back as one gradient, with no slicing for autograd to undo.

Example:
    >>> import torch
    >>> children = torch.rand(8, 3, 5)  # 8 children (4 nodes' pairs), bond 3, batch 5
    >>> weight = torch.rand(4, 3, 3, 2)
    >>> out, log, peak = pair_step(children, None, weight, renorm=True)
    >>> ref = torch.einsum("gabp,gan,gbn->gpn", weight, children[0::2], children[1::2])
    >>> torch.allclose(out * log.exp().unsqueeze(1), ref)
    True
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch

from tnkd.tn import native

#: target size (elements) of one chunk's (nodes, A*B, n) temporaries
CHUNK_ELEMENTS = 1 << 17
#: tensors multiplied into a value between two renormalisations on the lean plan of
#: :class:`TreePlan` (tried first; the network's plan, 12, after a pass had to be rerun)
LEAN_RENORM_AFTER = 64
#: a level whose temporaries are at most this size runs in one piece (fewer calls: at small
#: sizes the calls, not the arithmetic, set the time)
ONE_CHUNK_ELEMENTS = 1 << 18


def _children(left: torch.Tensor) -> torch.Tensor:
    """(2G, A, n) interleaved children -> (G, 2, A, n)."""
    return left.reshape(left.shape[0] // 2, 2, *left.shape[1:])


def _pairs(left: torch.Tensor, right: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if right is None:
        pairs = _children(left)
        return pairs[:, 0], pairs[:, 1]
    return left, right


def pair_forward(
    lhs: torch.Tensor, rhs: torch.Tensor, weight: torch.Tensor, renorm: bool, chunk: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The forward pass on (G, A, n), (G, B, n) children: ``(out, scale, peak, outer)``, no autograd.

    ``scale`` and ``peak`` (G, 1, n) are None without ``renorm``; ``outer`` is the (G, A*B, n)
    outer product of the children when the nodes fit one chunk (kept for
    :func:`pair_backward_small`), else None. Every chunk's tensors come from one ``split`` per
    operand (slicing chunk by chunk costs more Python time than the arithmetic at small D) and
    its outer product goes into one buffer reused by all chunks.
    """
    nodes, a, b, p = weight.shape
    batch = lhs.shape[2]
    w_t = weight.reshape(nodes, a * b, p).transpose(1, 2)
    outer = None
    if chunk >= nodes:
        outer = torch.mul(lhs.unsqueeze(2), rhs.unsqueeze(1), out=lhs.new_empty(nodes, a, b, batch))
        outer = outer.view(nodes, a * b, batch)
        out = torch.bmm(w_t, outer)
    else:
        out = lhs.new_empty(nodes, p, batch)
        buffer = lhs.new_empty(chunk, a, b, batch)
        for l_k, r_k, w_k, o_k in zip(
            lhs.unsqueeze(2).split(chunk),
            rhs.unsqueeze(1).split(chunk),
            w_t.split(chunk),
            out.split(chunk),
            strict=True,
        ):
            k = l_k.shape[0]
            product = torch.mul(l_k, r_k, out=buffer[:k])
            torch.bmm(w_k, product.view(k, a * b, batch), out=o_k)
    if not renorm:
        return out, None, None, outer
    peak = out.abs().amax(dim=1, keepdim=True)
    scale = peak.clamp_min(torch.finfo(out.dtype).tiny)
    return out.div_(scale), scale, peak, outer


def pair_backward_small(
    lhs: torch.Tensor,
    rhs: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    outer: torch.Tensor,
    grad: torch.Tensor,
    needs: tuple[bool, bool, bool],
    interleaved: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(g_left, g_right, g_weight)`` of one chunk, from the forward's saved ``outer``.

    ``g_weight = outer g^T``; the children's from ``gO = W g`` (G, A, B, n):
    ``g_left = sum_b gO * right``, ``g_right = sum_a gO * left``. At small sizes these are
    fewer and smaller kernels than the Q form of :func:`pair_backward` (measured 39-62 us
    against 49-73 us per level for 4-16 nodes at D = 4-8, batch 100, one core). With
    ``interleaved`` both children's gradients come back as one (2G, A, n) tensor in
    ``g_left`` (node g's children at 2g and 2g + 1) and ``g_right`` is None.
    """
    nodes, a, b, p = weight.shape
    g = grad if scale is None else grad / scale
    need_left, need_right, need_weight = needs
    g_weight = torch.bmm(outer, g.mT).view(weight.shape) if need_weight else None
    g_left = g_right = None
    if need_left or need_right:
        g_outer = torch.bmm(weight.reshape(nodes, a * b, p), g).view(nodes, a, b, -1)
        if need_left:
            g_left = (g_outer * rhs.unsqueeze(1)).sum(2)
        if need_right:
            g_right = g_outer.mul_(lhs.unsqueeze(2)).sum(1)
        if interleaved:
            return torch.stack([g_left, g_right], dim=1).flatten(0, 1), None, g_weight
    return g_left, g_right, g_weight


def pair_backward(
    lhs: torch.Tensor,
    rhs: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    grad: torch.Tensor,
    needs: tuple[bool, bool, bool],
    chunk: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(g_left, g_right, g_weight)`` of :func:`pair_forward` (None where not needed)."""
    nodes, a, b, p = weight.shape
    batch = lhs.shape[2]
    g = grad.contiguous() if scale is None else grad / scale
    need_left, need_right, need_weight = needs
    w = weight.reshape(nodes, a, b * p)
    w_swapped = weight.transpose(1, 2).reshape(nodes, b, a * p) if need_right else None
    if chunk >= nodes:
        g_left = g_right = g_weight = None
        if need_left or need_weight:
            # Q = right (x) g: g_left = W[a, (b p)] Q, g_weight[a, (b p)] = left Q^T
            q = torch.mul(rhs.unsqueeze(2), g.unsqueeze(1), out=g.new_empty(nodes, b, p, batch))
            q = q.view(nodes, b * p, batch)
            g_left = torch.bmm(w, q) if need_left else None
            g_weight = torch.bmm(lhs, q.transpose(1, 2)).view(weight.shape) if need_weight else None
        if need_right:
            # Q' = left (x) g: g_right = W[b, (a p)] Q' (W's first two axes swapped)
            q = torch.mul(lhs.unsqueeze(2), g.unsqueeze(1), out=g.new_empty(nodes, a, p, batch))
            g_right = torch.bmm(w_swapped, q.view(nodes, a * p, batch))
        return g_left, g_right, g_weight
    g_left = lhs.new_empty(lhs.shape) if need_left else None
    g_right = rhs.new_empty(rhs.shape) if need_right else None
    g_weight = weight.new_empty(nodes, a, b * p) if need_weight else None
    none = [None] * ((nodes + chunk - 1) // chunk)
    if need_left or need_weight:
        q_buffer = g.new_empty(chunk, b, p, batch)
        for r_k, g_k, w_k, l_k, gl_k, gw_k in zip(
            rhs.unsqueeze(2).split(chunk),
            g.unsqueeze(1).split(chunk),
            w.split(chunk),
            lhs.split(chunk),
            none if g_left is None else g_left.split(chunk),
            none if g_weight is None else g_weight.split(chunk),
            strict=True,
        ):
            k = r_k.shape[0]
            q = torch.mul(r_k, g_k, out=q_buffer[:k]).view(k, b * p, batch)
            if gl_k is not None:
                torch.bmm(w_k, q, out=gl_k)
            if gw_k is not None:
                torch.bmm(l_k, q.transpose(1, 2), out=gw_k)
    if need_right:
        q_buffer = g.new_empty(chunk, a, p, batch)
        for l_k, g_k, w_k, gr_k in zip(
            lhs.unsqueeze(2).split(chunk),
            g.unsqueeze(1).split(chunk),
            w_swapped.split(chunk),
            g_right.split(chunk),
            strict=True,
        ):
            k = l_k.shape[0]
            q = torch.mul(l_k, g_k, out=q_buffer[:k]).view(k, a * p, batch)
            torch.bmm(w_k, q, out=gr_k)
    return g_left, g_right, None if g_weight is None else g_weight.view(weight.shape)


def pair_backward_interleaved(
    children: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    grad: torch.Tensor,
    needs: tuple[bool, bool],
    chunk: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(g_children, g_weight)`` when both children are one (G, 2, A, n) tensor.

    Both children's gradients come from one batched product: Q = children (x) g holds
    ``left (x) g`` and ``right (x) g`` side by side, and the stacked matrices
    ``[W[b, (a p)], W[a, (b p)]]`` turn them into ``g_right`` and ``g_left`` (then swapped
    back), so a level costs two outer-product-sized passes and two batched products.
    """
    nodes, a, b, p = weight.shape
    batch = children.shape[3]
    g = grad.contiguous() if scale is None else grad / scale
    need_children, need_weight = needs
    w_both = None
    if need_children:
        w_both = torch.stack([weight.transpose(1, 2), weight], dim=1).view(nodes * 2, a, b * p)
    if chunk >= nodes:
        q = torch.mul(
            children.unsqueeze(3), g[:, None, None], out=g.new_empty(nodes, 2, a, p, batch)
        )
        g_children = g_weight = None
        if need_children:
            g_children = torch.bmm(w_both, q.view(nodes * 2, a * p, batch))
            g_children = g_children.view(nodes, 2, a, batch).flip(1)
        if need_weight:
            q_right = q[:, 1].view(nodes, b * p, batch)
            g_weight = torch.bmm(children[:, 0], q_right.transpose(1, 2)).view(weight.shape)
        return g_children, g_weight
    swapped = children.new_empty(nodes, 2, a, batch) if need_children else None
    g_weight = weight.new_empty(nodes, a, b * p) if need_weight else None
    none = [None] * ((nodes + chunk - 1) // chunk)
    q_buffer = g.new_empty(chunk, 2, a, p, batch)
    for c_k, g_k, w_k, s_k, gw_k in zip(
        children.unsqueeze(3).split(chunk),
        g[:, None, None].split(chunk),
        none if w_both is None else w_both.split(2 * chunk),
        none if swapped is None else swapped.split(chunk),
        none if g_weight is None else g_weight.split(chunk),
        strict=True,
    ):
        k = c_k.shape[0]
        q = torch.mul(c_k, g_k, out=q_buffer[:k])
        if s_k is not None:
            torch.bmm(w_k, q.view(k * 2, a * p, batch), out=s_k.view(k * 2, a, batch))
        if gw_k is not None:
            q_right = q[:, 1].view(k, b * p, batch)
            torch.bmm(c_k[:, 0, :, 0], q_right.transpose(1, 2), out=gw_k)
    g_children = None if swapped is None else swapped.flip(1)
    return g_children, None if g_weight is None else g_weight.view(weight.shape)


def chunk_size(weight_shape: tuple[int, ...] | torch.Size, batch: int) -> int:
    """Nodes per chunk (all of them when a level's temporaries fit ONE_CHUNK_ELEMENTS).

    Otherwise as many as keep a chunk's (nodes, A*B, n) temporaries near CHUNK_ELEMENTS.
    """
    nodes, a, b, p = weight_shape
    per_node = max(1, max(a, p) * b * batch)
    if nodes * per_node <= ONE_CHUNK_ELEMENTS:
        return nodes
    return max(1, CHUNK_ELEMENTS // per_node)


class _PairStep(torch.autograd.Function):
    """``pair_step`` as one autograd node (see the module docstring for the formulas)."""

    @staticmethod
    def forward(ctx, left, right, weight, renorm, chunk):
        lhs, rhs = _pairs(left, right)
        out, scale, peak, _ = pair_forward(lhs, rhs, weight, renorm, chunk)
        if scale is None:
            log = peak = out.new_empty(0)
        else:
            log = torch.log(scale).view(out.shape[0], out.shape[2])
        ctx.save_for_backward(left, right, weight, scale)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(log, peak)
        return out, log, peak

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_log, _grad_peak):
        left, right, weight, scale = ctx.saved_tensors
        need_left, need_right, need_weight = ctx.needs_input_grad[:3]
        if right is None:
            g_children, g_weight = pair_backward_interleaved(
                _children(left), weight, scale, grad_out, (need_left, need_weight), ctx.chunk
            )
            g_left = None if g_children is None else g_children.flatten(0, 1)
            return g_left, None, g_weight, None, None
        g_left, g_right, g_weight = pair_backward(
            left, right, weight, scale, grad_out, (need_left, need_right, need_weight), ctx.chunk
        )
        return g_left, g_right, g_weight, None, None


def pair_step(
    left: torch.Tensor,
    right: torch.Tensor | None,
    weight: torch.Tensor,
    renorm: bool = False,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""G nodes ``W[g, a, b, p]`` applied to their two children, fused (see the module docstring).

    Args:
        left: (G, A, n) left children, or (2G, A, n) both children interleaved when ``right``
            is None (node g's at 2g and 2g + 1).
        right: (G, B, n) right children, or None.
        weight: (G, A, B, P) nodes.
        renorm: divide each (node, sample) by its max-abs over P; the divisors are constants
            (not differentiated), their logs returned.
        chunk: nodes per chunk (default: as many as keep the temporaries near
            :data:`CHUNK_ELEMENTS` elements).

    Returns:
        ``(out, log, peak)``: (G, P, n) values; with ``renorm`` the (G, n) log-divisors and the
        (G, 1, n) max-abs before division (both empty without ``renorm``), so that the exact
        step is ``out * exp(log)``.
    """
    if weight.ndim != 4:
        raise ValueError(f"pair_step expects a (G, A, B, P) weight, but got {tuple(weight.shape)}")
    nodes, a, b, _ = weight.shape
    lhs, rhs = _pairs(left, right)
    if lhs.ndim != 3 or tuple(lhs.shape[:2]) != (nodes, a) or tuple(rhs.shape[:2]) != (nodes, b):
        raise ValueError(
            f"pair_step expects children ({nodes}, {a}, n) and ({nodes}, {b}, n) for a weight of "
            f"shape {tuple(weight.shape)}, but got {tuple(lhs.shape)} and {tuple(rhs.shape)}"
        )
    if chunk is None:
        chunk = chunk_size(weight.shape, lhs.shape[2])
    return _PairStep.apply(left, right, weight, renorm, chunk)


# ---- a whole tree as one tight loop ----------------------------------------------------------


class FastTree(torch.autograd.Function):
    r"""A balanced tree of pair steps as one autograd node: a tight loop over a :class:`TreePlan`.

    Used by :class:`~tnkd.tn.stable.StableNetwork` (``fast_plan``) when every step is a pair
    step whose operands are whole tensors: the weight a whole parameter block in (child,
    child, parent) order, the children either a level's result interleaved (node g's at 2g and
    2g + 1) or two whole blocks (the leaves). That is any balanced binary tree of
    :func:`~tnkd.students.tree.tree_graph` (a power of two of sites along each axis); a tree
    with odd sites passed up, a chain drawn as a graph or a user graph whose operands are
    slices goes through the general one-node path (:class:`~tnkd.tn.stable._PairNetwork`).

    ``FastTree.apply(plan, every, check, head, linear_leaves, *blocks)`` returns ``(out,
    divisors)``: the root's (1, C, n) values (or, with ``head``, a logit scale s, the logits
    ``exp(s) v / ||v||`` as (n, C)) and the (K, 1, n) divisors of every renormalised node. In a
    tree every intermediate feeds exactly one parent, so the root's log-scale is the sum of all
    their logs, ``log_root[n] = sum_k log divisors[k, 0, n]``: no per-level log-scale tensors,
    and the same divisors give the range check (one ``aminmax``). Renormalisation follows the
    network's plan; when a divisor left the range where float keeps its digits (or is not
    finite), the forward runs again renormalising every level, as the general path does. With
    ``head``, the root v is not renormalised by its max-abs: its squared norms ``||v||^2`` (one
    ``vecdot``) join the divisors, so the range check guarantees they neither overflowed nor
    lost digits, and ``d = v / ||v||`` (on the rerun, which renormalises every level, the root
    has max-abs 1 first). The backward of ``exp(s) d`` comes first:
    ``dL/dv = exp(s) (g - d (g . d)) / ||v||``, ``dL/ds = exp(s) sum g . d``. With
    ``linear_leaves`` the two input blocks are one (G, 2, n) tensor of raw pairs and the [1, x]
    map is fused with the leaves (:meth:`_Workspace._linear_leaf`).

    **The native level loop.** On CPU (float32, float64) the whole loop runs in C++
    (``csrc/tree_levels.cpp``, built on first use by :func:`tnkd.tn.native.kernels`
    ``("tree_levels")``): the same levels, renormalisations, range check and rerun, [1, x]
    leaves and head, and the same hand-written backward (formulas in the module docstring), as
    one call forward and one backward instead of two ATen kernels per level forward and about
    six backward. Samples and subtrees are independent, so the threads need not meet between
    levels: where every level reads the one below (a balanced tree), thread t runs all levels of
    its own subtrees (the nodes below level ``top``, the first with fewer nodes than threads) on
    every column of the batch, and the few top levels (at 2 threads: the root) then run on one
    thread; each weight's gradient is written by one thread only. Other plans split the batch
    into per-thread column ranges, each thread with its own weight-gradient buffer, summed at
    the end. Inside a thread, a node's columns go in chunks of up to 4 SIMD registers whose
    outer product stays in L1, and the products are register-tiled loops along the batch (the
    weights' gradients: along the node's output axis, or the (child, output) pairs where the
    output axis is narrower than a register). ``plan.native = False``, other devices or
    dtypes, ``torch.compile`` tracing, or no compiler: the Python loop below, with its
    workspaces. Speed against the Python loop and TensorKrowch's ``Tree``:
    ``benchmarks/tree_vs_tensorkrowch.py`` (figures on the docs' benchmark pages).
    """

    @staticmethod
    def forward(ctx, plan, every, check, head, linear_leaves, *blocks):  # noqa: D102
        ext = tree_kernels(blocks) if getattr(plan, "native", True) else None  # (older pickles)
        space = None
        if ext is not None:  # the whole level loop in C++ (tnkd.tn.native, "tree_levels")
            log_scale = None if head is None else float(head)

            def run_fn(levels, blocks, every, check, _head):  # the head too
                return native_tree_forward(
                    ext, levels, blocks, every, check, log_scale, linear_leaves
                )

        else:
            batch = blocks[plan.levels[0][1]].shape[-1]
            space = plan.take(blocks, batch)
            if linear_leaves:
                if space is None:  # no workspace: the [1, x] features, then the general loop
                    blocks = linear_leaf_features(plan, blocks)
                else:
                    space.linear = True
            run_fn = tree_forward if space is None else space.forward
        levels = plan.levels
        if plan.lean and not every:
            levels, check = plan.lean_levels, True
        run = run_fn(levels, blocks, every, check, head is not None)
        if run is None:
            plan.lean = False  # this network's values leave the range: its own plan from now on
            run = run_fn(plan.levels, blocks, True, False, head is not None)
        out, divisors, ctx.saved, square = run
        ctx.plan, ctx.space, ctx.ext = plan, space, ext
        if space is not None:
            if any(ctx.needs_input_grad):
                # back to the pool when this node is freed (after its last backward)
                ctx.lease = _Lease(plan, space)
            else:
                plan.give_back(space)  # no backward will read it
        ctx.save_for_backward(*blocks)
        ctx.mark_non_differentiable(divisors)
        ctx.head = None
        if ext is not None and head is not None:  # the kernel's logits
            return ctx.saved.logits, divisors
        if head is not None:  # logits exp(s) v / ||v|| of the root v
            values = out[0]
            if square is not None:  # ||v||^2 in range: checked with the divisors
                inverse = square.view(-1).rsqrt()
            else:  # renormalised (max-abs 1): 1 <= ||v|| <= sqrt(C), or an all-zero root
                inverse = torch.linalg.vecdot(values, values, dim=0).rsqrt_().clamp_max_(1.0)
            direction = values * inverse
            scale = head.exp()
            ctx.head = (direction, inverse, scale)
            return (direction * scale).T, divisors
        return out, divisors

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_log):  # noqa: D102
        blocks = ctx.saved_tensors  # (raises if a block was changed in place since forward)
        plan, space, needs = ctx.plan, ctx.space, ctx.needs_input_grad[5:]
        if ctx.ext is not None:  # the head's backward in the kernel too
            grads = native_tree_backward(ctx.ext, ctx.saved, blocks, grad_out, needs)
            g_head = grads.pop() if ctx.saved.log_scale is not None else None
            return None, None, None, g_head, None, *grads
        g_head = None
        if ctx.head is not None:  # see normalized_logits
            direction, inverse, scale = ctx.head
            dot = torch.linalg.vecdot(grad_out.T, direction, dim=0)  # (n,): g . d per sample
            g_head = dot.sum().mul_(scale)
            grad_out = torch.addcmul(grad_out.T, direction, dot, value=-1).mul_(inverse * scale)
            grad_out = grad_out.unsqueeze(0)
        if space is None:
            grads = tree_backward(plan.levels, ctx.saved, grad_out, needs)
        else:  # the head's gradient is a fresh tensor: divided in place
            grads = space.backward(plan.levels, ctx.saved, grad_out, needs, g_head is not None)
        return None, None, None, g_head, None, *grads


def tree_kernels(blocks: Sequence[torch.Tensor]):
    """The native level loop (:mod:`tnkd.tn.native`, ``"tree_levels"``) for these blocks, or None.

    None (the Python loop runs) off the CPU, for other dtypes than float32 and float64, blocks
    of mixed dtypes, while ``torch.compile`` traces (it cannot trace into the native functions)
    and where the kernels cannot be built.
    """
    first = blocks[0]
    if not native.supports(first) or torch.compiler.is_compiling():
        return None
    if any(b.dtype != first.dtype or b.device != first.device for b in blocks):
        return None
    return native.kernels("tree_levels")


class _NativeRun(NamedTuple):
    """What a native forward pass of :class:`FastTree` leaves for its backward pass."""

    slots: list[list]  # the levels' (weight, left, right, interleaved) columns
    renorm: list[bool]  # which levels were renormalised
    linear: bool  # [1, x] leaves on raw pairs
    outs: list[torch.Tensor]  # every level's (G, P, n) result
    divisors: torch.Tensor  # (R, 1, n)
    log_scale: float | None  # the head's s (None: no head)
    logits: torch.Tensor | None  # (n, C) exp(s) v / ||v||
    inverse: torch.Tensor | None  # (n,) 1 / ||v||


#: the range where float keeps all its digits, per dtype (see StableNetwork)
_RANGES = {
    dtype: (
        torch.finfo(dtype).tiny / torch.finfo(dtype).eps,
        torch.finfo(dtype).max * torch.finfo(dtype).eps,
    )
    for dtype in (torch.float32, torch.float64)
}


@functools.lru_cache(maxsize=256)
def _native_plan(levels: tuple, every: bool, square: bool) -> tuple[list[list], list[bool]]:
    """The kernels' plan arguments: the levels' columns, and which levels are renormalised.

    The columns: (weight, left, right, interleaved) slots; renormalised: with ``every``, or by
    the level's own plan, but not the root with the head's ``square``. Made once per plan (the
    lists are read, never changed).
    """
    last = len(levels) - 1
    renorm = [bool(every or lv[4]) and not (square and k == last) for k, lv in enumerate(levels)]
    return [list(column) for column in zip(*levels, strict=True)][:4], renorm


def native_tree_forward(ext, levels, blocks, every, check, log_scale, linear):
    """:func:`tree_forward` by the native level loop: ``(root, divisors, saved, square)`` or None.

    The same renormalisations (``renorm`` of the level, or ``every``; with the head, a float
    ``log_scale`` s, and not ``every``, not the root: its squared norms are the divisors' last
    row instead) and the same range check, from the kernel's smallest and largest divisor. With
    the head, the kernel also gives the logits ``exp(s) v / ||v||`` (``saved.logits``). With
    ``linear`` the first level's children are the raw (G, 2, n) pairs of the [1, x] map
    (:meth:`_Workspace._linear_leaf`). ``saved`` is a :class:`_NativeRun`.
    """
    square = log_scale is not None and not every
    slots, renorm = _native_plan(levels, every, square)
    outs, divisors, low, high, logits, inverse = ext.tree_forward(
        list(blocks), *slots, renorm, linear, square, log_scale
    )
    if (check or square) and not every:
        lowest, highest = _RANGES[divisors.dtype]
        if not (low >= lowest and high <= highest):
            return None  # False for NaN too
    saved = _NativeRun(slots, renorm, linear, outs, divisors, log_scale, logits, inverse)
    return outs[-1], divisors, saved, divisors[-1:] if square else None


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
    _, l_slot, r_slot = plan.levels[0][:3]
    pairs = blocks[l_slot]
    out = list(blocks)
    for slot, k in ((l_slot, 0), (r_slot, 1)):
        values = pairs[:, k]
        out[slot] = torch.stack([torch.ones_like(values), values], 1)
    return out


class _Lease:
    """Gives a workspace back to its plan's pool when the autograd node holding it is freed."""

    def __init__(self, plan: TreePlan, space: _Workspace) -> None:
        self.plan, self.space = plan, space

    def __del__(self) -> None:
        self.plan.give_back(self.space)


class TreePlan:
    """The levels of a :class:`FastTree` and its pool of workspaces.

    ``levels``: per level ``(weight, left, right, interleaved, renorm, out)``: slot numbers
    (blocks first, then the levels' results in order), whether ``left`` holds both children
    interleaved, whether the level is renormalised, and the slot of its result.

    **Lean renormalisation.** The network's plan renormalises once more than 12 tensors were
    multiplied into a value (:class:`~tnkd.tn.stable.StableNetwork`); ``lean_levels`` do so
    once more than ``lean_after`` = :data:`LEAN_RENORM_AFTER` were (a 64-site tree: only the
    root, against two levels), and a pass tries them first. The range check is the same
    (every divisor within [tiny / eps, max * eps], finite); the first pass that fails it runs
    again renormalising every level and sets ``lean = False`` for good, so a network whose
    values do leave the range (a deep [cos, sin] tree) pays the rerun once and then runs the
    network's plan.

    ``native``: whether :class:`FastTree` runs the level loop in C++ where it can (default
    True; see there); False runs the Python loop below.

    **Workspaces** (the Python loop). When every level's temporaries fit one chunk (small
    trees, where the Python-level calls set the time), a forward pass takes a
    :class:`_Workspace` from the pool: buffers for every level's outer product and result with
    all their views made once, so that a level is two calls forward (``mul`` and ``bmm`` with
    ``out=``) and about six backward. The workspace goes back to the pool when the autograd
    node that saved it is freed (after its last backward; at once for a pass that needs no
    gradient); a forward pass that finds the pool empty (the previous step's graph still alive,
    a second forward before the first one's backward) makes a new one, so no buffer is written
    while a backward may still read it, and the backward only writes scratch buffers
    (``retain_graph`` works). The root's value and the weights' gradients are fresh tensors
    (the caller keeps them). (The native loop makes every level's result afresh in each pass:
    nothing to pool.)

    Example:
        >>> from tnkd.students import TreeClassifier
        >>> tree = TreeClassifier(input_shape=(16,), num_classes=3, bond_dim=4)
        >>> len(tree.network.stable.fast_plan.levels), tree.fast_path
        (4, True)
    """

    def __init__(
        self,
        levels: Sequence[tuple[int, int, int, bool, bool, int]],
        lean_after: int | None = LEAN_RENORM_AFTER,
    ) -> None:
        self.levels = tuple(levels)
        self._free: dict[tuple, list[_Workspace]] = {}
        #: run the level loop natively where it can (:func:`tree_kernels`); False: the Python loop
        self.native = True
        #: the levels with the lean renormalisation plan (see the class docstring), or None
        self.lean_levels = None if lean_after is None else self._lean(lean_after)
        #: whether the next pass tries the lean plan (False for good after one rerun)
        self.lean = self.lean_levels is not None

    def _lean(self, after: int) -> tuple | None:
        """The levels renormalised once more than ``after`` tensors were multiplied, or None."""
        count: dict[int, int] = {}
        lean = []
        for number, (w, left, right, interleaved, renorm, out) in enumerate(self.levels):
            children = (
                2 * count.get(left, 1) if interleaved else count.get(left, 1) + count.get(right, 1)
            )
            total = count.get(w, 1) + children
            renorm = total > after or number == len(self.levels) - 1
            count[out] = 0 if renorm else total
            lean.append((w, left, right, interleaved, renorm, out))
        lean = tuple(lean)
        return None if [lv[4] for lv in lean] == [lv[4] for lv in self.levels] else lean

    def take(self, blocks: Sequence[torch.Tensor], batch: int) -> _Workspace | None:
        """A free workspace for these blocks' shapes and this batch, or None (chunked levels)."""
        weights = tuple(blocks[level[0]].shape for level in self.levels)
        key = (batch, blocks[0].dtype, blocks[0].device, weights)
        free = self._free.get(key)
        if free:
            return free.pop()
        if any(chunk_size(shape, batch) < shape[0] for shape in weights):
            return None
        space = _Workspace(self.levels, weights, batch, blocks[0].dtype, blocks[0].device)
        space.key = key
        return space

    def give_back(self, space: _Workspace) -> None:
        """Return a workspace to the pool (at most two kept per key)."""
        free = self._free.setdefault(space.key, [])
        if len(free) < 2:
            free.append(space)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_free": {}}


class _Workspace:
    """Buffers and their views for one pass of a :class:`TreePlan` (see there)."""

    def __init__(self, levels, weights, batch, dtype, device) -> None:
        self.key: tuple = ()
        made: dict[int, torch.Tensor] = {}  # level result slot -> its buffer
        largest = max(nodes * a * b for nodes, a, b, _ in weights) * batch
        # backward scratch shared by all levels: g_outer = W g, and its product with a child
        scratch = [torch.empty(largest, dtype=dtype, device=device) for _ in range(2)]
        self.views = []
        last = len(levels) - 1
        for number, ((_, l_slot, _, interleaved, _, o_slot), shape) in enumerate(
            zip(levels, weights, strict=True)
        ):
            nodes, a, b, p = shape
            size = nodes * a * b * batch
            outer = torch.empty(nodes, a, b, batch, dtype=dtype, device=device)
            g_outer = scratch[0][:size].view(nodes, a, b, batch)
            temp = scratch[1][:size].view(nodes, a, b, batch)
            out = None
            if number < last:
                out = made[o_slot] = torch.empty(nodes, p, batch, dtype=dtype, device=device)
            lhs = rhs = g_pair = None
            if interleaved and l_slot in made:
                pairs = made[l_slot].view(nodes, 2, a, batch)
                lhs, rhs = pairs[:, 0].unsqueeze(2), pairs[:, 1].unsqueeze(1)
                g_children = torch.empty(nodes, 2, a, batch, dtype=dtype, device=device)
                g_pair = (g_children[:, 0], g_children[:, 1], g_children.view(2 * nodes, a, batch))
            self.views.append(
                (outer, outer.view(nodes, a * b, batch), g_outer, temp, out, lhs, rhs, g_pair)
            )
        # per level: (weight, its data pointer, (G, A*B, P) view, its transpose), made again
        # only when another tensor (or storage) comes in
        self.weights: list[tuple] = [(None, 0, None, None)] * len(levels)
        self.flat_scratch = [v[2].flatten(1, 2) for v in self.views]
        self.linear = False  # this pass's leaves are raw (G, 2, n) pairs: see _linear_leaf
        self.info = torch.finfo(dtype)
        # the range where float keeps all its digits (see StableNetwork)
        self.lowest, self.highest = self.info.tiny / self.info.eps, self.info.max * self.info.eps
        self._leaf = None

    def _linear_leaf(
        self, level: int, pairs: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The leaves on raw pairs ``[x_l, x_r]`` with the [1, x] map, fused with the map.

        The outer product of ``[1, x_l]`` and ``[1, x_r]`` is ``[1, x_r, x_l, x_l x_r]``: row 0
        is written once, so the level is two copies, a product and one matrix product, written
        into ``out`` (a fresh tensor when None). Returns ``(outer, out)``.
        """
        if self._leaf is None:
            nodes, batch = pairs.shape[0], pairs.shape[2]
            outer = torch.empty(nodes, 4, batch, dtype=pairs.dtype, device=pairs.device)
            outer[:, 0] = 1
            self._leaf = (outer, outer[:, 1], outer[:, 2], outer[:, 3])
        outer, right, left, both = self._leaf
        right.copy_(pairs[:, 1])
        left.copy_(pairs[:, 0])
        torch.mul(left, right, out=both)
        _, w_t = self.weight_views(level, weight)
        if out is None:
            return outer, torch.bmm(w_t, outer)
        return outer, torch.bmm(w_t, outer, out=out)

    def weight_views(self, level: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``weight`` as (G, A*B, P) and (G, P, A*B) views, kept while it is the same tensor."""
        cached, pointer, flat, flat_t = self.weights[level]
        if cached is not weight or pointer != weight.data_ptr():
            nodes, a, b, p = weight.shape
            flat = weight.view(nodes, a * b, p)
            flat_t = flat.mT
            self.weights[level] = (weight, weight.data_ptr(), flat, flat_t)
        return flat, flat_t

    def forward(self, levels, blocks, every: bool, check: bool, head: bool = False):
        """:func:`tree_forward` in the workspace's buffers."""
        last = len(levels) - 1
        slots = list(blocks)
        saved, scales = [], []
        info = self.info
        tiny = info.tiny
        out = None
        linear, self.linear = self.linear, False
        for number, (w_slot, l_slot, r_slot, interleaved, renorm, _) in enumerate(levels):
            outer, outer_flat, _, _, out, lhs, rhs, _ = self.views[number]
            weight = slots[w_slot]
            nodes = weight.shape[0]
            if linear and number == 0:
                # lhs None marks the fused leaves; rhs: their outer product
                lhs, (rhs, out) = None, self._linear_leaf(number, slots[l_slot], weight, out)
            else:
                _, w_t = self.weight_views(number, weight)
                if lhs is None:
                    if interleaved:
                        pairs = slots[l_slot].view(nodes, 2, weight.shape[1], -1)
                        lhs, rhs = pairs[:, 0].unsqueeze(2), pairs[:, 1].unsqueeze(1)
                    else:
                        lhs, rhs = slots[l_slot].unsqueeze(2), slots[r_slot].unsqueeze(1)
                torch.mul(lhs, rhs, out=outer)
                if out is None:  # the root: a fresh tensor for the caller
                    out = torch.bmm(w_t, outer_flat)
                else:
                    torch.bmm(w_t, outer_flat, out=out)
            scale = None
            if (every or renorm) and not (head and not every and number == last):
                scale = out.abs().amax(1, keepdim=True).clamp_min_(tiny)
                out.div_(scale)
                scales.append(scale)
            slots.append(out)
            saved.append((lhs, rhs, weight, scale))
        run = _finish(out, scales, saved, every, check, head, self.lowest, self.highest)
        if run is None:
            self.linear = linear  # the rerun reads the same raw pairs
        return run

    def backward(self, levels, saved, grad_out, needs, own_root: bool = False):
        """:func:`tree_backward` in the workspace's buffers (weights' gradients fresh)."""
        slots: list = [None] * (len(needs) + len(levels))
        need_slot = list(needs) + [False] * len(levels)
        for w_slot, l_slot, r_slot, interleaved, _, o_slot in levels:
            need_slot[o_slot] = (
                need_slot[w_slot] or need_slot[l_slot] or (not interleaved and need_slot[r_slot])
            )
        slots[levels[-1][5]] = grad_out
        # slots whose gradient is ours to change (a workspace buffer): divided in place
        owned = {levels[-1][5]} if own_root else set()
        for level in range(len(levels) - 1, -1, -1):
            w_slot, l_slot, r_slot, interleaved, _, o_slot = levels[level]
            grad = slots[o_slot]
            if grad is None:
                continue
            slots[o_slot] = None
            _, outer_flat, g_outer, temp, _, _, _, g_pair = self.views[level]
            g_outer_flat = self.flat_scratch[level]
            lhs, rhs, weight, scale = saved[level]
            if scale is not None:
                grad = grad.div_(scale) if o_slot in owned else grad / scale
            if lhs is None:  # fused [1, x] leaves: rhs is their (G, 4, n) outer product
                if need_slot[w_slot]:
                    slots[w_slot] = torch.bmm(rhs, grad.mT).view(weight.shape)
                continue
            nodes, a = weight.shape[:2]
            if need_slot[w_slot]:
                slots[w_slot] = torch.bmm(outer_flat, grad.mT).view(weight.shape)
            need_l = need_slot[l_slot]
            need_r = need_l if interleaved else need_slot[r_slot]
            if not (need_l or need_r):
                continue
            flat, _ = self.weight_views(level, weight)
            torch.bmm(flat, grad, out=g_outer_flat)
            if g_pair is not None:
                g_left, g_right, g_children = g_pair
                torch.sum(torch.mul(g_outer, rhs, out=temp), 2, out=g_left)
                torch.sum(g_outer.mul_(lhs), 1, out=g_right)
                slots[l_slot] = g_children
                owned.add(l_slot)
                continue
            g_left = (g_outer * rhs).sum(2) if need_l else None
            g_right = g_outer.mul_(lhs).sum(1) if need_r else None
            if interleaved:
                slots[l_slot] = torch.stack([g_left, g_right], 1).view(2 * nodes, a, -1)
            else:
                slots[l_slot], slots[r_slot] = g_left, g_right
        return slots[: len(needs)]


def tree_forward(plan, blocks, every: bool, check: bool, head: bool = False):
    """The forward pass of :class:`FastTree` (its ``levels``): ``(root, divisors, saved)``.

    ``divisors`` (K, 1, n): every renormalised node's divisors; None when one left the range
    (the caller reruns renormalising every level).
    """
    slots = list(blocks)
    slots.extend([None] * len(plan))
    saved = []
    scales = []
    batch = blocks[plan[0][1]].shape[-1]
    tiny = torch.finfo(blocks[0].dtype).tiny
    out = None
    for w_slot, l_slot, r_slot, interleaved, renorm, o_slot in plan:
        weight = slots[w_slot]
        nodes, a, b, p = weight.shape
        if interleaved:
            pairs = slots[l_slot].view(nodes, 2, a, batch)
            lhs, rhs = pairs[:, 0], pairs[:, 1]
        else:
            lhs, rhs = slots[l_slot], slots[r_slot]
        chunk = chunk_size(weight.shape, batch)
        if chunk >= nodes:
            outer = torch.mul(lhs.unsqueeze(2), rhs.unsqueeze(1))
            out = torch.bmm(weight.reshape(nodes, a * b, p).mT, outer.view(nodes, a * b, batch))
        else:
            outer = None
            out = pair_forward(lhs, rhs, weight, False, chunk)[0]
        scale = None
        if (every or renorm) and not (head and not every and o_slot == plan[-1][5]):
            scale = out.abs().amax(1, keepdim=True).clamp_min_(tiny)
            out.div_(scale)
            scales.append(scale)
        slots[o_slot] = out
        saved.append((lhs, rhs, weight, scale, outer, chunk))
    info = torch.finfo(out.dtype)
    lowest, highest = info.tiny / info.eps, info.max * info.eps
    return _finish(out, scales, saved, every, check, head, lowest, highest)


def _finish(out, scales, saved, every, check, head, lowest, highest):
    """End of a forward pass: ``(root, divisors, saved, square)`` or None (rerun needed).

    With ``head`` (and not ``every``) the root was not renormalised: its squared norms
    ``square`` (1, 1, n) join the divisors, so that the range check also guarantees that
    ``||v||^2`` neither overflowed nor lost digits (``||v||`` within the square roots of the
    range). ``square`` is None otherwise.
    """
    square = None
    if head and not every:
        square = torch.linalg.vecdot(out, out, dim=1).unsqueeze(1)
        scales.append(square)
        check = True
    divisors = scales[0] if len(scales) == 1 else torch.cat(scales)
    if check and not every:
        low, high = torch.aminmax(divisors)
        if not (low.item() >= lowest and high.item() <= highest):
            return None  # False for NaN too
    return out, divisors, saved, square


def tree_backward(plan, saved, grad_out, needs):
    """Gradients of the blocks of :class:`FastTree` (None where not needed)."""
    slots: list = [None] * (len(needs) + len(plan))
    slots[plan[-1][5]] = grad_out
    need_slot = list(needs) + [False] * len(plan)
    for w_slot, l_slot, r_slot, interleaved, _, o_slot in plan:
        need_slot[o_slot] = (
            need_slot[w_slot] or need_slot[l_slot] or (not interleaved and need_slot[r_slot])
        )
    for level in range(len(plan) - 1, -1, -1):
        w_slot, l_slot, r_slot, interleaved, _, o_slot = plan[level]
        grad = slots[o_slot]
        slots[o_slot] = None
        lhs, rhs, weight, scale, outer, chunk = saved[level]
        need_w = need_slot[w_slot]
        need_l = need_slot[l_slot]
        need_r = need_l if interleaved else need_slot[r_slot]
        if outer is not None:
            nodes, a, b, p = weight.shape
            g = grad if scale is None else grad / scale
            if need_w:
                slots[w_slot] = torch.bmm(outer.view(nodes, a * b, -1), g.mT).view(weight.shape)
            if need_l or need_r:
                g_outer = torch.bmm(weight.reshape(nodes, a * b, p), g).view(nodes, a, b, -1)
                if interleaved:
                    g_children = g_outer.new_empty(nodes, 2, a, g.shape[2])
                    torch.sum(g_outer * rhs.unsqueeze(1), 2, out=g_children[:, 0])
                    torch.sum(g_outer.mul_(lhs.unsqueeze(2)), 1, out=g_children[:, 1])
                    slots[l_slot] = g_children.view(2 * nodes, a, -1)
                    continue
                if need_l:
                    slots[l_slot] = (g_outer * rhs.unsqueeze(1)).sum(2)
                if need_r:
                    slots[r_slot] = g_outer.mul_(lhs.unsqueeze(2)).sum(1)
            continue
        g_left, g_right, g_weight = pair_backward(
            lhs,
            rhs,
            weight,
            scale,
            grad,
            (need_l, need_r, need_w),
            chunk,
        )
        if need_w:
            slots[w_slot] = g_weight
        if interleaved:
            if need_l:
                slots[l_slot] = torch.stack([g_left, g_right], 1).view(
                    2 * weight.shape[0], weight.shape[1], -1
                )
        else:
            if need_l:
                slots[l_slot] = g_left
            if need_r:
                slots[r_slot] = g_right
    return slots[: len(needs)]


class _NormalizedLogits(torch.autograd.Function):
    """``exp(s) * v / ||v||`` per row as one autograd node (see :func:`normalized_logits`)."""

    @staticmethod
    def forward(ctx, values, log_scale):
        inverse = values.norm(dim=1, keepdim=True).clamp_min_(torch.finfo(values.dtype).tiny)
        direction = values / inverse
        inverse.reciprocal_()
        scale = log_scale.exp()
        ctx.save_for_backward(direction, inverse, scale)
        return direction * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        direction, inverse, scale = ctx.saved_tensors
        dot = (grad * direction).sum(1, keepdim=True)
        g_values = (grad - direction * dot).mul_(scale * inverse)
        return g_values, (dot.sum() * scale).reshape(scale.shape)


def normalized_logits(values: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    r"""Logits ``exp(s) v / ||v||`` (rows of a (batch, C) ``values``), with a hand-written backward.

    With ``d = v / ||v||`` and the upstream gradient ``g``:
    ``dL/dv = exp(s) (g - d (g . d)) / ||v||`` and ``dL/ds = exp(s) sum_rows g . d``. One
    autograd node instead of five (norm, clamp, divide, exp, multiply); the rows' norms are
    clamped at the smallest normal float, as :class:`~tnkd.students.graph.GraphStudent` does.

    Example:
        >>> v, s = torch.tensor([[3.0, 4.0]]), torch.tensor(0.0)
        >>> normalized_logits(v, s)
        tensor([[0.6000, 0.8000]])
    """
    return _NormalizedLogits.apply(values, log_scale)
