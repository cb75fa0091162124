"""The chain engine: an MPS with its label anywhere, contracted with a tracked log-scale.

:func:`contract_chain` contracts ``left - A_0 - ... - A_{p-1} - O - A_p - ... - A_{N-1} - right``
with an input on every site ``A_i`` and the label on ``O``, for one chain or for M chains of one
shape at once (a leading member axis, :class:`~tnkd.students.batched.BatchedMPS`). It returns the
values *and a tracked log-scale*, so that chains of any length neither overflow nor vanish. The
two halves are swept towards the label as K = 2 (or 2M) boundary vectors; each step is
``v <- A_i(x_i) v`` with ``A_i(x) = sum_s phi_s(x) A_i[:, s, :]``, two neighbouring sites merged
into one step up to D = 32, the vectors renormalised every 16 sites (their scales summed in log
space; a pass that leaves float range anyway is redone renormalising every site). Three kernels,
chosen by the planner (:func:`tnkd.tn.planner.chain_kernel`; why, measured:
``docs/benchmarks/chain.md``):

- ``"native"`` (CPU, float32/float64): the scan in C++ (``tnkd/tn/csrc/chain_scan.cpp``), one
  autograd node from the features to the normalised values with a hand-written backward pass.
- ``"scan"`` (wherever the native one does not run, and accelerators at D > 64): the same steps
  as torch operations (an outer product with the features and one batched matmul per step),
  differentiated by autograd; the tests' independent check of the native backward pass.
- ``"log_depth"`` (accelerators, D <= 64): every site's transfer matrix at once, each half's
  multiplied pairwise in log depth (D^3 work per site, but about 2 log2(N) large kernels instead
  of N small ones), renormalised at every level.

Example:
    >>> cores = torch.eye(4).view(1, 4, 1, 4).expand(50, 4, 2, 4) * 2.0  # A_i(x) = 2 I
    >>> features = torch.full((3, 50, 2), 0.5)
    >>> ones, out = torch.ones(4), torch.eye(4).view(4, 1, 4)
    >>> values, log_scale = contract_chain(ones, cores, ones, features, out, 20)
    >>> values[0].tolist(), round(float(log_scale[0]) / 0.693147, 3)  # 4 * 2^50
    ([1.0], 52.0)
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from tnkd.tn import native
from tnkd.tn.planner import SCAN_MAX_MERGED_BOND_DIM, chain_kernel
from tnkd.tn.stable import full_precision, rescaled

SCAN_RENORM_EVERY = 16


def _tree_product(mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordered product of (B, N, D, D) matrices in log depth; returns (B, D, D) and log-scale (B,).

    Neighbours are multiplied in pairs, level by level (an odd one out waits for the next level),
    each product divided by its largest magnitude.
    """
    batch, n, _, bond = mats.shape
    log_scale = mats.new_zeros(batch)
    while n > 1:
        tail = mats[:, n - 1 :] if n % 2 else None
        pairs = mats[:, : n - n % 2].reshape(batch, n // 2, 2, bond, bond)
        mats = torch.matmul(pairs[:, :, 0], pairs[:, :, 1])
        if tail is not None:
            mats = torch.cat([mats, tail], dim=1)
        mats, log, _ = rescaled(mats, (2, 3))
        log_scale = log_scale + log.sum(dim=(1, 2, 3))
        n = mats.shape[1]
    return mats[:, 0], log_scale


def _tree_halves(
    left: torch.Tensor, right: torch.Tensor, mats: torch.Tensor, position: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The halves' (2, M, D, B) ends and (2, M, B) log-scales by log-depth products.

    ``mats`` are the (M, B, N, D, D) transfer matrices; each half's are multiplied pairwise
    (:func:`_tree_product`) and applied to its boundary vector.
    """
    members, batch, _, bond, _ = mats.shape
    ends, logs = [], []
    for vector, part, eq in (
        (left, mats[:, :, :position], "ml,mblr->mrb"),
        (right, mats[:, :, position:], "mr,mblr->mlb"),
    ):
        if part.shape[2] == 0:
            ends.append(vector.unsqueeze(-1).expand(members, bond, batch))
            logs.append(vector.new_zeros(members, batch))
            continue
        prod, log_scale = _tree_product(part.reshape(members * batch, -1, bond, bond))
        ends.append(torch.einsum(eq, vector, prod.view(members, batch, bond, bond)))
        logs.append(log_scale.view(members, batch))
    return torch.stack(ends), torch.stack(logs)


def _settings(dtype: torch.dtype, bond_dim: int) -> tuple[int, int]:
    """Sites between renormalisations (16; float16: 1) and sites merged per step (2 up to D = 32).

    float32 and bfloat16 (range 1e+-38) absorb 16 sites' growth for any sane cores, float16
    (range 6.5e4) does not. Merging two sites costs the same D^2 d^2 / 2 flops per site when
    d = 2 and halves the sequential steps.
    """
    every = 1 if dtype == torch.float16 else SCAN_RENORM_EVERY
    return every, 2 if bond_dim <= SCAN_MAX_MERGED_BOND_DIM else 1


class _ChainPlan(NamedTuple):
    """Which merged block of a site tensor each of K chains reads at each of S scan steps.

    The site tensor is cut into blocks of ``block`` consecutive sites, each merged into one
    (D, d^block, D) core. Chain k reads block ``index[k, i]`` at step i; an ``in_first`` chain
    enters every block on its left bond (a left-to-right sweep), the others on its right bond.
    """

    block: int
    index: torch.Tensor  # (K, S) long
    in_first: tuple[bool, ...]


_PLANS: dict[tuple, tuple[_ChainPlan, torch.Tensor]] = {}  # a plain dict: torch.compile reads it


def _mps_plan(
    left: int, right: int, block: int, device: torch.device, members: int
) -> tuple[_ChainPlan, torch.Tensor]:
    """The plan of M chains' two halves: ``left`` sites swept rightwards, ``right`` leftwards.

    A member's site tensor is ``[A_0 .. A_{left-1}, I x pad, A_left .. A_{N-1}, I x extra]``:
    each half padded with identity sites to whole blocks next to the output core, and, if the
    halves have different numbers of blocks, one identity block at the end that the shorter
    half reads for its remaining steps. The members' site tensors follow each other; chains
    0..M-1 are the left halves, M..2M-1 the right halves. Returns the plan and the site
    tensor's sources: the input site each of its sites reads, N for an identity site.
    """
    key = (left, right, block, device, members)
    if key in _PLANS:
        return _PLANS[key]
    if len(_PLANS) >= 256:  # many shapes (a sweep over sizes): start over rather than grow
        _PLANS.clear()
    pad_l, pad_r = (-left) % block, (-right) % block
    nl, nr = (left + pad_l) // block, (right + pad_r) // block
    steps, extra = max(nl, nr, 1), block if nl != nr or nl == 0 else 0
    eye = nl + nr  # the identity block's index when there is one
    left_idx = torch.tensor(list(range(nl)) + [eye] * (steps - nl))
    right_idx = torch.tensor(list(range(nl + nr - 1, nl - 1, -1)) + [eye] * (steps - nr))
    offsets = torch.arange(members).unsqueeze(1) * (nl + nr + extra // block)  # blocks per member
    index = torch.cat([left_idx + offsets, right_idx + offsets]).to(device)
    n = left + right
    sources = [*range(left), *[n] * (pad_l + pad_r), *range(left, n), *[n] * extra]
    in_first = (True,) * members + (False,) * members
    _PLANS[key] = _ChainPlan(block, index, in_first), torch.tensor(sources, device=device)
    return _PLANS[key]


def _padded(
    tensor: torch.Tensor, sources: torch.Tensor, identity: Callable[[], torch.Tensor], axis: int
) -> torch.Tensor:
    """The sites of ``tensor`` (along ``axis``) that ``sources`` reads, ``identity()`` for N.

    An identity site is ``I`` on physical index 0, its feature ``e_0``: its transfer matrix is I.
    """
    if sources.shape[0] == tensor.shape[axis]:  # no identity site: sources is 0..N-1
        return tensor
    site = identity().expand(*tensor.shape[:axis], 1, *tensor.shape[axis + 1 :])
    return torch.cat([tensor, site], axis).index_select(axis, sources)


def _site_features(features: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """(B, N, d) features -> (n, d, B) features of the site tensor's sites (:func:`_padded`)."""
    f, kw = features.permute(1, 2, 0), {"dtype": features.dtype, "device": features.device}
    return _padded(f, sources, lambda: torch.eye(features.shape[2], 1, **kw), 0)


def _prepared(
    left: torch.Tensor, cores: torch.Tensor, right: torch.Tensor, features: torch.Tensor, at: int
) -> tuple[_ChainPlan, torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """What both scans of one chain's halves, or M chains' (member axes), start from.

    Returns the plan and sources (:func:`_mps_plan`), the (M n, D, d, D) site tensor, the
    (2M, D, B) start vectors and the scan steps between renormalisations (:func:`_settings`).
    """
    (num_sites, bond, d), members = cores.shape[-4:-1], 1 if cores.dim() == 4 else len(cores)
    every, block = _settings(features.dtype, bond)
    plan, sources = _mps_plan(at, num_sites - at, block, features.device, members)
    kw = {"dtype": cores.dtype, "device": cores.device}

    def identity() -> torch.Tensor:  # I on the bonds, e_0 on the physical index
        return torch.eye(bond, **kw)[:, None] * torch.eye(d, 1, **kw)[None]

    sites = _padded(cores, sources, identity, cores.dim() - 4).flatten(0, cores.dim() - 4)
    start = torch.cat([left, right]).view(-1, bond, 1).expand(2 * members, bond, features.shape[0])
    return plan, sites, start, max(1, every // block), sources


def _block_features(features: torch.Tensor, block: int) -> torch.Tensor:
    """(n, d, B) site features, n a multiple of ``block`` -> (n / block, d^block, B).

    The features of a block's sites become one vector, their outer product, index
    ``s_1 d^(k-1) + ... + s_k`` in site order (the merged core's physical index).
    """
    n, d, batch = features.shape
    # contiguous first: features usually arrive as a permuted view, slow to multiply
    f = features.contiguous().view(n // block, block, d, batch)
    phi = f[:, 0]
    for j in range(1, block):
        phi = (phi.unsqueeze(2) * f[:, j].unsqueeze(1)).flatten(1, 2)
    return phi


def _per_member(features: torch.Tensor, members: int) -> torch.Tensor:
    """(n, ...) features of one member's site tensor repeated for M members (read by its index)."""
    return features if members == 1 else features.repeat(members, *(1,) * (features.dim() - 1))


def _merge_cores(sites: torch.Tensor, block: int) -> torch.Tensor:
    """(n, D, d, D) sites -> (n / block, D d^block, D) merged cores ``M[(l, s_1..s_k), r]``.

    The product of ``block`` neighbouring cores, one batched matmul per merged site.
    """
    n, bond, d = sites.shape[:3]
    c = sites.reshape(n // block, block, bond, d, bond)
    merged = c[:, 0].reshape(-1, bond * d, bond)
    for j in range(1, block):
        merged = torch.bmm(merged, c[:, j].reshape(-1, bond, d * bond))
        merged = merged.view(n // block, -1, bond)
    return merged


def _step_matrices(merged: torch.Tensor, plan: _ChainPlan) -> torch.Tensor:
    """(K, S, D, m*D) matrices of the steps: the merged blocks the plan reads, laid out per step.

    Step i of chain k is ``v_out = mats[k, i] @ (phi (x) v_in)``, columns ``(s, in)``: a block
    ``(l, s, r)`` as it is for a chain entering on ``r``, read as ``(r, s, l)`` for one on ``l``.
    """
    blocks, rows, bond = merged.shape
    natural = merged.view(blocks, bond, rows // bond, bond)
    swapped = natural.permute(0, 3, 2, 1)
    chains = [
        (swapped if in_first else natural).index_select(0, plan.index[k])
        for k, in_first in enumerate(plan.in_first)
    ]
    return torch.stack(chains).flatten(3)


def _unmerged_plan(plan: _ChainPlan) -> _ChainPlan:
    """The same chains one site per step (a chain leaving a block rightwards reads it backwards)."""
    rows = []
    for chain, in_first in enumerate(plan.in_first):
        offsets = torch.arange(plan.block, device=plan.index.device)
        offsets = offsets if in_first else offsets.flip(0)
        rows.append((plan.index[chain].unsqueeze(1) * plan.block + offsets).flatten())
    return _ChainPlan(1, torch.stack(rows), plan.in_first)


def _scan(
    start: torch.Tensor, sites: torch.Tensor, features: torch.Tensor, plan: _ChainPlan, every: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Python scan of (K, D, B) start vectors, (n, D, d, D) sites, (n, d, B) features.

    Step i is ``v_{i+1} = mats[:, i] @ (phi_i (x) v_i)`` (an outer product and one batched
    matmul), the output of every ``every``-th step and the last divided by their max-abs,
    recorded by autograd. A pass that left float range is redone one site per step,
    renormalising every step. Returns the (K, D, B) vectors and their (K, B) log-scales.
    """
    info, batch = torch.finfo(start.dtype), start.shape[2]
    while True:
        steps = plan.index.shape[1]
        mats = _step_matrices(_merge_cores(sites, plan.block), plan)
        phis = _block_features(features, plan.block).index_select(0, plan.index.t().flatten())
        phis = phis.view(steps, plan.index.shape[0], -1, 1, batch)
        # unbound once: slicing inside the loop would make autograd allocate a full-size zero
        # gradient per step (quadratic traffic)
        v, logs, peaks = start, [], []
        for i, (mat, phi) in enumerate(zip(mats.unbind(1), phis.unbind(0), strict=True)):
            v = torch.bmm(mat, (phi * v.unsqueeze(1)).flatten(1, 2))
            if (i + 1) % every == 0 or i == steps - 1:
                v, log, peak = rescaled(v, (1,))
                logs.append(log)
                peaks.append(peak)
        # a non-finite value propagates into the next peak; one below tiny / eps came within a
        # mantissa's width of the subnormal range, so smaller entries of that vector lost digits
        low, high = torch.aminmax(torch.cat(peaks, dim=1))
        healthy = bool(low >= info.tiny / info.eps) and bool(high <= info.max)
        if healthy or (every == 1 and plan.block == 1):
            return v, torch.cat(logs, dim=1).sum(1)
        plan, every = _unmerged_plan(plan), 1


class _NativeRun(NamedTuple):
    """What a native forward pass leaves for its backward pass."""

    plan: _ChainPlan
    every: int  # steps between renormalisations
    merged: torch.Tensor  # the sites' merged blocks (:func:`_merge_cores`)
    bfeats: torch.Tensor  # (blocks, m, B) block features
    vs: torch.Tensor  # (S+1, K, D, B)
    scales: torch.Tensor  # (R, K, 1, B)


def _native_forward(
    ext: Any,
    start: torch.Tensor,
    sites: torch.Tensor,
    features: torch.Tensor,
    sources: torch.Tensor,
    plan: _ChainPlan,
    every: int,
) -> tuple[_NativeRun, torch.Tensor]:
    """The native forward scan from the (B, N, d) features; ``every`` counts steps.

    A pass that left float range is redone renormalising every step, and one whose last vectors
    are still not finite one site per step (as :func:`_scan` does). Returns the run and the
    (K, B) log-scales.
    """
    merged = None
    while True:
        if merged is None:  # made again only when the plan goes one site per step
            bfeats = ext.block_features(features, sources, plan.block)
            bfeats = _per_member(bfeats, len(plan.in_first) // 2)
            merged = ext.merge_pairs(sites) if plan.block == 2 else _merge_cores(sites, plan.block)
        args = (merged, bfeats, plan.index, list(plan.in_first))
        vs, scales, log_scale, healthy, finite = ext.scan_forward(start, *args, every)
        if every > 1 and not healthy:
            every = 1
        elif plan.block > 1 and not finite:
            plan, every, merged = _unmerged_plan(plan), 1, None
        else:
            return _NativeRun(plan, every, merged, bfeats, vs, scales), log_scale


def _feature_grads(
    run: _NativeRun, gs: torch.Tensor, features: torch.Tensor, sources: torch.Tensor
) -> torch.Tensor:
    """Gradients of the (B, N, d) features from a native run's (S+1, K, D, B) vector gradients.

    Step i computed ``y = M (phi (x) v)``, M its matrix (:func:`_step_matrices`), so
    ``g_phi[s, b] = sum_in v[in, b] (M^T g_y)[(s, in), b]``; these are summed over the steps
    that read a block, then pushed through the block features (an outer product of the sites'
    features, recomputed here under autograd).
    """
    plan, vs, bfeats = run.plan, run.vs, run.bfeats
    (k, steps), bond, batch, m = plan.index.shape, vs.shape[2], vs.shape[3], bfeats.shape[1]
    mats = _step_matrices(run.merged, plan).view(k * steps, bond, m * bond)
    g_y = gs[1:].transpose(0, 1).reshape(k * steps, bond, batch)
    g_x = torch.bmm(mats.transpose(1, 2), g_y).view(k, steps, m, bond, batch)
    g_phi = (g_x * vs[:-1].transpose(0, 1).reshape(k, steps, 1, bond, batch)).sum(3)
    g_bfeats = torch.zeros_like(bfeats).index_add_(0, plan.index.flatten(), g_phi.flatten(0, 1))
    with torch.enable_grad():
        f = features.detach().requires_grad_()
        phi = _block_features(_site_features(f, sources), plan.block)
        (grad,) = torch.autograd.grad(_per_member(phi, k // 2), f, g_bfeats)
    return grad


def _close(
    ends: torch.Tensor,
    output_core: torch.Tensor,
    output_features: torch.Tensor | None,
    logs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output core between the halves' (2, M, D, B) ends ``u``, ``w``, normalised per sample.

    ``values[m, b, c] = sum_{l, r} u[m, l, b] O[m, l, c, r] w[m, r, b]`` (with ``O(x) =
    sum_s phi_s(x) O[:, s]`` if the output core reads ``output_features``) over their max-abs:
    returns them (M, B, C) and the log-scales (M, B), the halves' ``logs`` (2, M, B) included.
    """
    u, w = ends
    if output_features is None:
        values = torch.einsum("mlb,mlcr,mrb->mbc", u, output_core, w)
    else:
        values = torch.einsum("mlb,mlscr,mrb,bs->mbc", u, output_core, w, output_features)
    values, log, _ = rescaled(values, (2,))
    return values, logs.sum(0) + log[..., 0]


class _NativeChain(torch.autograd.Function):
    """:func:`contract_chain` by the native scan, in one autograd node.

    Arguments and outputs as :func:`contract_chain`'s (``position`` after the features, then the
    compiled module); the log-scales are constants (the gradient of ``values * exp(log_scale)``
    is exact). The halves are swept as K = 2M chains (:func:`_mps_plan`). One chain's output
    core (the usual case) is contracted natively too and differentiated by hand; others are
    closed by :func:`_close`, differentiated by autograd inside the backward pass.
    """

    @staticmethod
    def forward(ctx, left, cores, right, output_core, features, output_features, position, ext):
        ctx.single = cores.dim() == 4  # one chain: no member axis in or out (and no views of it)
        members, num_sites, bond = 1 if ctx.single else len(cores), *cores.shape[-4:-2]
        plan, sites, start, every, sources = _prepared(left, cores, right, features, position)
        run, logs = _native_forward(ext, start, sites, features, sources, plan, every)
        ctx.native_close = ctx.single and output_features is None
        if ctx.native_close:
            values, log_scale, *closing = ext.mps_output_forward(run.vs[-1], output_core, logs)
        else:
            output_core = output_core[None] if ctx.single else output_core
            ends, logs = run.vs[-1].view(2, members, bond, -1), logs.view(2, members, -1)
            values, log_scale = _close(ends, output_core, output_features, logs)
            values, log_scale = (values[0], log_scale[0]) if ctx.single else (values, log_scale)
            closing = ()
        ctx.save_for_backward(
            sites, run.bfeats, run.vs, run.scales, output_core, features, output_features, *closing
        )
        ctx.run = run._replace(bfeats=None, vs=None, scales=None)  # the tensors are saved above
        ctx.ext, ctx.sources, ctx.num_sites = ext, sources, num_sites
        ctx.mark_non_differentiable(log_scale)
        return values, log_scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values, _grad_log_scale):
        sites, bfeats, vs, scales, output_core, features, ofeats, *closing = ctx.saved_tensors
        run = ctx.run._replace(bfeats=bfeats, vs=vs, scales=scales)
        members = 1 if ctx.single else output_core.shape[0]
        bond, need = sites.shape[1], ctx.needs_input_grad
        grad_ofeats = None
        if ctx.native_close:  # (grad_out is None unless need[3])
            grad_v, grad_out = ctx.ext.mps_output_backward(
                grad_values, vs[-1], output_core, *closing, need[3]
            )
        else:
            grad_values = grad_values[None] if ctx.single else grad_values
            with torch.enable_grad():
                ends = vs[-1].detach().view(2, members, bond, -1).requires_grad_()
                core = output_core.detach().requires_grad_()
                ofeats = None if ofeats is None else ofeats.detach()
                inputs = [ends, core] if ofeats is None else [ends, core, ofeats.requires_grad_()]
                values, _ = _close(ends, core, ofeats, vs.new_zeros(2, members, 1))
                grads = torch.autograd.grad(values, inputs, grad_values)
            grad_v = grads[0].view(2 * members, bond, -1)
            grad_out = (grads[1][0] if ctx.single else grads[1]) if need[3] else None
            grad_ofeats = grads[2] if len(grads) > 2 and need[5] else None
        # the reverse scan (vector gradients: [0] of the start; all of them for the features'),
        # redone after a forward pass renormalising every step if a gradient left float range
        args = (run.merged, bfeats, run.plan.index, list(run.plan.in_first))
        grad_v = grad_v.contiguous()
        gs, g_blocks, grad_finite, start_finite = ctx.ext.scan_backward(
            grad_v, *args, vs, scales, run.every, need[1], need[4]
        )
        if run.every > 1 and grad_finite and not start_finite:
            vs, scales, *_ = ctx.ext.scan_forward(vs[0], *args, 1)
            gs, g_blocks, *_ = ctx.ext.scan_backward(grad_v, *args, vs, scales, 1, need[1], need[4])
            run = run._replace(vs=vs)  # the feature gradients pair this pass's vectors and gs
        grad_cores = grad_feats = None
        if need[1]:  # the merged blocks' gradients in the sites' layout
            if run.plan.block == 2:
                g_blocks = ctx.ext.unmerge_pairs(g_blocks, sites)
            grad_cores = g_blocks.view(members, -1, *sites.shape[1:])
            if grad_cores.shape[1] != ctx.num_sites:  # without the identity sites
                grad_cores = grad_cores[:, ctx.sources < ctx.num_sites]
        if need[4]:
            grad_feats = _feature_grads(run, gs, features, ctx.sources)
        grad_left, grad_right = gs[0].sum(-1).view(2, members, bond)
        if ctx.single:
            grad_left, grad_right = grad_left[0], grad_right[0]
            grad_cores = None if grad_cores is None else grad_cores[0]
        return grad_left, grad_cores, grad_right, grad_out, grad_feats, grad_ofeats, None, None


def contract_chain(
    left: torch.Tensor,
    cores: torch.Tensor,
    right: torch.Tensor,
    features: torch.Tensor,
    output_core: torch.Tensor,
    position: int,
    method: str = "auto",
    output_features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contract an MPS with an output core, returning ``(values, log_scale)``.

    The network is ``left - A_0 - ... - A_{p-1} - O - A_p - ... - A_{N-1} - right`` with
    ``x_i`` (features) on every ``A_i``'s physical leg and the output index on ``O``. The exact
    result is ``values * exp(log_scale)[..., None]``; ``values`` has max-abs 1 per sample.
    With a leading member axis on ``left``, ``cores``, ``right`` and ``output_core``, M chains of
    one shape read the same features and each gets its own values.

    Args:
        left: (D,) left boundary vector, or (M, D).
        cores: (N, D, d, D) site cores (bond, physical, bond), or (M, N, D, d, D).
        right: (D,) right boundary vector, or (M, D).
        features: (B, N, d) feature vectors.
        output_core: (D, C, D) output core, or (M, D, C, D).
        position: p, the number of sites left of the output core (0..N).
        method: the kernel, ``"auto"`` (the planner's choice for the device and D, see
            :func:`tnkd.tn.planner.chain_kernel`), ``"native"``, ``"scan"`` or ``"log_depth"``.
        output_features: (B, d) features of an output core that also reads an input; then
            ``output_core`` is (D, d, C, D) and ``O(x) = sum_s phi_s(x) O[:, s]`` joins the halves.

    Returns:
        ``values`` (B, C) and ``log_scale`` (B,); with members (M, B, C) and (M, B).

    Under autocast the chain is contracted in float32 (:func:`~tnkd.tn.stable.full_precision`).
    """
    num_sites, bond = cores.shape[-4], cores.shape[-3]
    if features.shape[1] != num_sites:
        raise ValueError(f"expected features for {num_sites} sites, but got {features.shape[1]}")
    if not 0 <= position <= num_sites:
        raise ValueError(f"output core position must be in [0, {num_sites}], but got {position}")
    operands = (left, cores, right, features, output_core, output_features)
    with full_precision(operands) as (left, cores, right, features, output_core, output_features):
        kernel = chain_kernel(method, bond, features.device, features.dtype)[0]
        if kernel == "native" and num_sites > 0:
            args = (left, cores, right, output_core, features, output_features, position)
            return _NativeChain.apply(*args, native.kernels())
        single = cores.dim() == 4
        if single:
            left, cores, right, output_core = (t[None] for t in (left, cores, right, output_core))
        members = cores.shape[0]
        if kernel == "log_depth" or num_sites == 0:
            mats = torch.einsum("mnlsr,bns->mbnlr", cores, features)
            ends, logs = _tree_halves(left, right, mats, position)
        else:  # the Python scan of both halves
            plan, sites, start, every, sources = _prepared(left, cores, right, features, position)
            feats = _per_member(_site_features(features, sources), members)
            v, logs = _scan(start, sites, feats, plan, every)
            ends, logs = v.view(2, members, bond, -1), logs.view(2, members, -1)
        values, log_scale = _close(ends, output_core, output_features, logs)
    return (values[0], log_scale[0]) if single else (values, log_scale)
