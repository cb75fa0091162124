"""Fast paths for chains: boundary sweeps and log-depth products with a tracked log-scale.

:func:`contract_chain` is the fast path for chains (MPS classifiers, TT networks), and
:func:`sweep_boundary`, its K-chains-at-once engine. They return the value *and a tracked
log-scale*, so that chains of any length neither overflow nor vanish:

- ``"native"``: the scan below with its loops in C++ (``tnkd/tn/csrc/chain_scan.cpp``,
  :mod:`tnkd.tn.native`, compiled on first use): the same steps, renormalisations, fallbacks
  and hand-written backward pass, but a step is one pass of register-tiled SIMD loops over
  L1-resident data instead of two ATen kernels dispatched from Python, the step matrices and
  features are read in place (no per-step copies), the K chains run on parallel threads, and
  :func:`contract_chain` is one autograd node from the features to the normalised values (the
  merge of site pairs and the output core included). float32 and float64 on the CPU; other
  dtypes and devices, or a machine without a compiler, run the Python scan.
- ``"scan"``: a boundary vector is swept along the chain (D^2 d work per site, sequential;
  the left and right halves of an MPS are swept together as K = 2 chains, two neighbouring
  sites are merged into one step up to D = 32, the vectors are renormalised every 16 sites),
  and the whole sweep is one autograd node with a hand-written backward pass: the gradient
  vector is swept back with the same two kernels per step (an outer product with the
  features and one batched matmul) and the cores' gradients come from one batched matmul per
  8 steps. Vectors are carried batch-last, as (D, B) columns, which makes both kernels 2.5x
  faster at D = 10 on a CPU.
- ``"sweep"``: the same sweep recorded by autograd step by step (three or four nodes per step,
  each with its own dispatch, broadcast reduction and gradient accumulation: at small D these
  per-kernel costs, not arithmetic, set its time). It was the CPU default before the scan and
  is the baseline of ``benchmarks/chain_speed.py``.
- ``"tree"``: every site's feature vector is contracted into its core in one batched
  operation, then the matrices are multiplied pairwise in log depth (D^3 work per site, but
  about 2 log2(N) large kernels instead of N small ones), renormalised at every level.
- ``"auto"`` picks ``native`` on CPU at every D (``scan`` where it cannot be compiled),
  ``tree`` on accelerators for D <= 64 and ``sweep`` above.

The measurements behind ``auto`` and the designs tried and not taken are on the documentation's
chain-speed benchmark page (``docs/benchmarks/chain.md``); ``benchmarks/chain_speed.py`` and
``benchmarks/chain_methods.py`` rerun them.

The generic path for any graph is :class:`tnkd.tn.contraction.CompiledNetwork`.
"""

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from tnkd.tn import native

CHAIN_METHODS = ("auto", "native", "scan", "sweep", "tree")
SCANS = ("native", "scan")  # one scan, its loops run by native code or from Python
TREE_MAX_BOND_DIM = 64
SCAN_RENORM_EVERY = 16
SCAN_MAX_MERGED_BOND_DIM = 32


def _site_matrices(cores: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(K, N, D, d, D) cores and (K, B, N, d) features -> (K, B, N, D, D) transfer matrices."""
    return torch.einsum("knlsr,kbns->kbnlr", cores, features)


def _tree_product(mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordered product of (B, N, D, D) matrices in log depth; returns (B, D, D) and log-scale (B,)."""
    batch = mats.shape[0]
    log_scale = mats.new_zeros(batch)
    while mats.shape[1] > 1:
        n = mats.shape[1]
        tail = mats[:, -1:] if n % 2 else None
        pairs = mats[:, : n - (n % 2)]
        mats = torch.matmul(pairs[:, 0::2], pairs[:, 1::2])
        if tail is not None:
            mats = torch.cat([mats, tail], dim=1)
        scale = (
            mats.detach()
            .abs()
            .amax(dim=(2, 3), keepdim=True)
            .clamp_min(torch.finfo(mats.dtype).tiny)
        )
        mats = mats / scale
        log_scale = log_scale + torch.log(scale).sum(dim=(1, 2, 3))
    return mats[:, 0], log_scale


def default_renorm_every(dtype: torch.dtype, method: str = "sweep") -> int:
    """Sites between renormalisations: sweep 4 (training) or 8 (no-grad), scan 16, float16 1.

    Between two renormalisations a value may grow or shrink by the product of a few transfer
    matrices' norms; float32 and bfloat16 (range 1e+-38) absorb that for any sane cores, and
    :func:`sweep_boundary` falls back to renormalising every site if a value ever came out
    non-finite or zero (the scan also if a scale came near float32's subnormal range, and if a
    gradient overflowed on its way back). float16 (range 6.5e4) renormalises every site. A
    renormalisation is four kernels against the scan's two per step, so the scan spaces them
    further (measured at 784 sites, D = 10: every 16 sites trains 3 % faster than every 8, every
    32 another 4 %).
    """
    if dtype == torch.float16:
        return 1
    if method in SCANS:
        return SCAN_RENORM_EVERY
    return 4 if torch.is_grad_enabled() else 8


def default_block(bond_dim: int, method: str = "sweep") -> int:
    """Sites merged into one step: 2 for D <= 64 (``"scan"``: D <= 32), else 1.

    Merging k sites costs the same D^2 d^k / k flops per site when k = d = 2, halves the number
    of sequential steps (the sweep is launch-bound at small D) and adds a batch-independent
    D^3 d^k merge per block. Measured on 2 CPU cores at 784 sites, batch 100: k = 2 trains
    about 1.1-1.3x faster than k = 1 at D = 10 and 20, as fast at D = 50, and infers up to
    1.5x faster; k = 3, 4 gained nothing more. The scan (1 thread, 784 sites): k = 2 trains
    1.3x faster than k = 1 at D = 16, 1.1x at D = 20 and 24, as fast at D = 32, and 1.04-1.14x
    slower at D = 50 and 64; k = 3 was slower than 2 at D = 10.
    """
    if method in SCANS:
        return 2 if bond_dim <= SCAN_MAX_MERGED_BOND_DIM else 1
    return 2 if bond_dim <= 64 else 1


def _blocked(cores: torch.Tensor, features: torch.Tensor, block: int) -> list[tuple]:
    """Per step a (K, d^k*D, D) matrix and (K, B, d^k, 1) features, k = ``block`` (rest: 1)."""
    k, length, bond, d = cores.shape[0], cores.shape[1], cores.shape[2], cores.shape[3]
    batch = features.shape[1]
    steps: list[tuple] = []
    whole = (length // block) * block if block > 1 else 0
    if whole:
        nb = whole // block
        c = cores[:, :whole].reshape(k, nb, block, bond, d, bond)
        f = features[:, :, :whole].reshape(k, batch, nb, block, d)
        merged, feats = c[:, :, 0], f[:, :, :, 0]
        for j in range(1, block):
            merged = torch.einsum("knlsm,knmtr->knlstr", merged, c[:, :, j])
            merged = merged.reshape(k, nb, bond, -1, bond)
            feats = (feats.unsqueeze(-1) * f[:, :, :, j].unsqueeze(-2)).flatten(-2)
        dk = merged.shape[3]
        mats = merged.permute(0, 1, 3, 2, 4).reshape(k, nb, dk * bond, bond)
        steps += list(zip(mats.unbind(1), feats.unsqueeze(-1).unbind(2), strict=True))
    if whole < length:
        rest = cores[:, whole:]
        mats = rest.permute(0, 1, 3, 2, 4).reshape(k, length - whole, d * bond, bond)
        feats = features[:, :, whole:].unsqueeze(-1)
        steps += list(zip(mats.unbind(1), feats.unbind(2), strict=True))
    return steps


def _sweep(start, steps: list[tuple], every: int) -> tuple[torch.Tensor, torch.Tensor]:
    k, batch = start.shape[:2]
    # One step is an outer product with the features and one batched matmul against a
    # (K, d*D, D) matrix with row s*D + l. The steps are unbound once: slicing inside the loop
    # would make autograd allocate a full-size zero gradient per site (quadratic traffic).
    tiny = torch.finfo(start.dtype).tiny
    v = start
    scales = []
    for i, (core, phi) in enumerate(steps):
        v = torch.bmm((phi * v.unsqueeze(2)).view(k, batch, -1), core)
        if (i + 1) % every == 0 or i == len(steps) - 1:
            scale = v.detach().abs().amax(dim=2, keepdim=True).clamp_min(tiny)
            v = v / scale
            scales.append(scale)
    log_scale = torch.log(torch.cat(scales, dim=2)).sum(2) if scales else start.new_zeros(k, batch)
    return v, log_scale


def _autograd_sweep(
    start: torch.Tensor, cores: torch.Tensor, features: torch.Tensor, every: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return _sweep(start, _blocked(cores, features, block), max(1, every // block))


# Plans by (kind, sizes, block, device): small index tensors built once per chain shape.
_PLANS: dict[tuple, Any] = {}


def _remember(key: tuple, plan: Any) -> None:
    if len(_PLANS) >= 256:  # many shapes (a sweep over sizes): start over rather than grow
        _PLANS.clear()
    _PLANS[key] = plan


class _ChainPlan(NamedTuple):
    """Which merged block of a site tensor each of K chains reads at each of S scan steps.

    The site tensor is cut into blocks of ``block`` consecutive sites, each merged into one
    (D, d^block, D) core. Chain k reads block ``index[k, i]`` at step i; an ``in_first`` chain
    enters every block on its first site's left bond and leaves on its last site's right bond
    (a left-to-right sweep), the other chains enter on the last site's right bond (a
    right-to-left sweep, as the right half of an MPS does).
    """

    block: int
    index: torch.Tensor  # (K, S) long
    in_first: tuple[bool, ...]


def _mps_plan(
    left: int, right: int, block: int, device: torch.device
) -> tuple[_ChainPlan, int, int]:
    """The plan of an MPS's two halves: ``left`` sites swept rightwards, ``right`` leftwards.

    The site tensor is ``[A_0 .. A_{left-1}, I x pad, A_left .. A_{N-1}, I x extra]``: each
    half padded with identity sites to whole blocks next to the output core, and, if the
    halves have different numbers of blocks, one identity block at the end that the shorter
    half reads for its remaining steps. Returns the plan, ``pad`` and ``extra``.
    """
    key = ("mps", left, right, block, device)
    if key in _PLANS:
        return _PLANS[key]
    pad_l, pad_r = (-left) % block, (-right) % block
    nl, nr = (left + pad_l) // block, (right + pad_r) // block
    steps, extra = max(nl, nr, 1), block if nl != nr or nl == 0 else 0
    eye = nl + nr  # the identity block's index when there is one
    left_idx = list(range(nl)) + [eye] * (steps - nl)
    right_idx = list(range(nl + nr - 1, nl - 1, -1)) + [eye] * (steps - nr)
    index = torch.tensor([left_idx, right_idx], device=device)
    _remember(key, (_ChainPlan(block, index, (True, False)), pad_l + pad_r, extra))
    return _PLANS[key]


def _block_features(features: torch.Tensor, block: int) -> torch.Tensor:
    """(n, d, B) site features, n a multiple of ``block`` -> (n / block, d^block, B).

    The features of a block's sites become one vector, their outer product, index
    ``s_1 d^(k-1) + ... + s_k`` in site order (the merged core's physical index).
    """
    n, d, batch = features.shape
    # contiguous first: features usually arrive as a (B, n, d) tensor's permuted view, and the
    # products below on that view run 8x slower (measured: 780 us against 95 + 20 us at n = 784)
    f = features.contiguous().view(n // block, block, d, batch)
    phi = f[:, 0]
    for j in range(1, block):
        phi = (phi.unsqueeze(2) * f[:, j].unsqueeze(1)).flatten(1, 2)
    return phi


def _merge_cores(sites: torch.Tensor, block: int) -> list[torch.Tensor]:
    """Partial products of ``block`` neighbouring cores, each (n / block, D d^j, D), j = 1..block.

    ``sites`` is (n, D, d, D). The last product is the merged core ``M[(l, s_1..s_k), r]``; the
    others are kept for the backward pass. One batched matmul per merged site.
    """
    n, bond, d = sites.shape[:3]
    c = sites.reshape(n // block, block, bond, d, bond)
    merged = [c[:, 0].reshape(-1, bond * d, bond)]
    for j in range(1, block):
        prod = torch.bmm(merged[-1], c[:, j].reshape(-1, bond, d * bond))
        merged.append(prod.view(prod.shape[0], -1, bond))
    return merged


def _step_matrices(merged: torch.Tensor, plan: _ChainPlan, forward: bool) -> torch.Tensor:
    """(K, S, D, m*D) matrices of the steps: the merged blocks the plan reads, laid out per step.

    Forward step: ``v_out = mats[k, i] @ (phi (x) v_in)`` with columns ``(s, in)``; backward
    step: ``g_in = mats[k, i] @ (phi (x) g_out)`` with columns ``(s, out)``. A block's natural
    layout ``(l, s, r)`` is the backward matrix of a chain entering on ``l`` and the forward
    matrix of one entering on ``r``; the other two are its per-physical-index transpose.
    """
    blocks, rows, bond = merged.shape
    m = rows // bond
    natural = merged.view(blocks, bond, m, bond)
    swapped = natural.permute(0, 3, 2, 1)
    k, steps = plan.index.shape
    mats = merged.new_empty(k, steps, bond, m, bond)
    if all(plan.in_first) or not any(plan.in_first):
        source = swapped if plan.in_first[0] == forward else natural
        torch.index_select(source, 0, plan.index.flatten(), out=mats.view(k * steps, bond, m, bond))
    else:
        for chain, in_first in enumerate(plan.in_first):
            source = swapped if in_first == forward else natural
            torch.index_select(source, 0, plan.index[chain], out=mats[chain])
    return mats.view(k, steps, bond, m * bond)


def _renorm_plan(steps: int, every: int) -> list[bool]:
    """Which scan steps end with a renormalisation: every ``every``-th one and the last."""
    return [(i + 1) % every == 0 or i == steps - 1 for i in range(steps)]


def _scan_forward(
    start: torch.Tensor, mats: torch.Tensor, phi_list: Sequence[torch.Tensor], every: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry (K, D, B) vectors through the steps; all of them, (S+1, K, D, B), and the scales.

    Step i is ``v_{i+1} = mats[:, i] @ (phi_i (x) v_i)``: an outer product into a scratch and
    one bmm written straight into the next slot of the result. Every ``every``-th output and
    the last are divided by their max-abs; the scales are returned, (R, K, 1, B).
    """
    (k, bond, batch), steps = start.shape, mats.shape[1]
    m = phi_list[0].shape[1]
    tiny = torch.finfo(start.dtype).tiny
    vs = start.new_empty(steps + 1, k, 1, bond, batch)
    v_outer, v_flat = vs.unbind(0), vs.view(steps + 1, k, bond, batch).unbind(0)
    x = start.new_empty(k, m, bond, batch)
    x_flat = x.view(k, m * bond, batch)
    v_flat[0].copy_(start)
    scales = []
    plan = _renorm_plan(steps, every)
    for i, mat in enumerate(mats.unbind(1)):
        torch.mul(phi_list[i], v_outer[i], out=x)
        out = torch.bmm(mat, x_flat, out=v_flat[i + 1])
        if plan[i]:
            scale = out.abs().amax(dim=1, keepdim=True).clamp_min_(tiny)
            out.div_(scale)
            scales.append(scale)
    return vs.view(steps + 1, k, bond, batch), torch.stack(scales)


def _scan_backward(
    grad: torch.Tensor,
    mats: torch.Tensor,
    phi_list: Sequence[torch.Tensor],
    vs: torch.Tensor,
    scales: torch.Tensor,
    every: int,
    core_grads: bool,
    chunk: int = 8,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reverse scan: gradients of the start vectors and of every step's matrix.

    Step i computed ``y = M (phi (x) v)`` and ``v' = y / c`` (``c`` a constant); its
    vector-Jacobian product is ``g_y = g_v' / c`` and ``g_v = M' (phi (x) g_y)``, with ``M'`` the
    backward step matrix (``mats[:, i]``, see :func:`_step_matrices`): the forward step's two
    kernels again. With ``core_grads`` the outer products ``phi (x) g_y`` of ``chunk`` steps are
    kept and one bmm per chunk gives those steps' matrix gradients
    ``G[(s, out), in] = sum_b (phi (x) g_y)[(s, out), b] v[in, b]`` while the factors are still in
    cache (measured: faster than keeping every forward outer product for one large kernel).

    Returns:
        (S+1, K, D, B) vector gradients (``[i+1]`` of step i's output, ``[0]`` of the start)
        and, with ``core_grads``, the (S, K, m*D, D) step-matrix gradients ``G``.
    """
    (k, bond, batch), steps = grad.shape, mats.shape[1]
    m = phi_list[0].shape[1]
    gs = grad.new_empty(steps + 1, k, 1, bond, batch)
    g_outer, g_flat = gs.unbind(0), gs.view(steps + 1, k, bond, batch).unbind(0)
    chunk = chunk if core_grads else 1
    xs = grad.new_empty(chunk, k, m, bond, batch)
    x_outer, x_flat = xs.unbind(0), xs.view(chunk, k, m * bond, batch).unbind(0)
    g_mats = grad.new_empty(steps, k, m * bond, bond) if core_grads else None
    mat_list = mats.unbind(1)
    g_flat[steps].copy_(grad)
    plan, r = _renorm_plan(steps, every), scales.shape[0]
    for i in range(steps - 1, -1, -1):
        if plan[i]:
            r -= 1
            g_flat[i + 1].div_(scales[r])
        j = i % chunk
        torch.mul(phi_list[i], g_outer[i + 1], out=x_outer[j])
        torch.bmm(mat_list[i], x_flat[j], out=g_flat[i])
        if core_grads and j == 0:  # steps i .. i + n - 1 have their outer products in xs
            n = min(chunk, steps - i)
            torch.bmm(
                xs[:n].view(-1, m * bond, batch),
                vs[i : i + n].transpose(2, 3).reshape(-1, batch, bond),
                out=g_mats[i : i + n].view(-1, m * bond, bond),
            )
    return gs.view(steps + 1, k, bond, batch), g_mats


def _healthy(scales: torch.Tensor) -> bool:
    """Whether a scan stayed in float range: finite scales, none near underflow.

    A non-finite value anywhere propagates into the next scale. A scale below ``tiny / eps``
    means the largest entry came within a mantissa's width of the subnormal range, so smaller
    entries of the same vector lost digits.
    """
    info = torch.finfo(scales.dtype)
    low, high = torch.aminmax(scales)
    return bool(low >= info.tiny / info.eps) and bool(high <= info.max)


class _Scan(torch.autograd.Function):
    """The boundary-vector sweep as one autograd node with a hand-written backward (a reverse scan).

    Inputs: ``start`` (K, D, B) vectors, ``sites`` (n, D, d, D) cores, ``phis``
    (S, K, m, 1, B) block features (m = d^block), the :class:`_ChainPlan` and ``every`` steps
    between renormalisations. Outputs: the (K, D, B) vectors, max-abs 1 per sample, and their
    (K, B) log-scales (not differentiable: the scales are constants, as in the autograd sweep,
    so the gradient of ``v * exp(log_scale)`` is exact).

    Autograd would record three or four nodes per step and, in backward, run each with its own
    dispatch, broadcast reduction and gradient accumulation; at small D those per-op costs, not
    arithmetic, set the time. Here the forward pass merges each block of cores with one batched
    matmul per merged site and runs two kernels per step; the backward pass sweeps a gradient
    vector back with the same two kernels per step plus one per chunk of steps for the blocks'
    gradients, which a few batched matmuls then split into per-site ones.

    The vectors are carried as (D, B) columns, bond index first and batch last: the outer
    product then runs along the batch, the long contiguous axis, and the matmul has the batch as
    its wide dimension (measured on this 2-core CPU at D = 10, K x B = 2 x 100: 4.7 us per
    step against 11.7 us in the (B, D) layout).
    """

    @staticmethod
    def forward(ctx, start, sites, phis, plan, every):
        merged = _merge_cores(sites, plan.block)
        mats = _step_matrices(merged[-1], plan, forward=True)
        phi_list = phis.unbind(0)
        vs, scales = _scan_forward(start, mats, phi_list, every)
        if every > 1 and not _healthy(scales):
            # a value left float range between two renormalisations: renormalise every step
            every = 1
            vs, scales = _scan_forward(start, mats, phi_list, every)
        ctx.save_for_backward(sites, phis, vs, scales, *merged)
        ctx.plan, ctx.every, ctx.phi_list = plan, every, phi_list
        log_scale = torch.log(scales).sum(0)[:, 0]
        ctx.mark_non_differentiable(log_scale)
        return vs[-1].clone(), log_scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_v, _grad_log_scale):
        sites, phis, vs, scales, *merged = ctx.saved_tensors
        plan, every, phi_list = ctx.plan, ctx.every, ctx.phi_list
        bond = sites.shape[1]
        (k, steps), m, batch = plan.index.shape, phis.shape[2], grad_v.shape[2]
        need_cores = ctx.needs_input_grad[1]
        mats = _step_matrices(merged[-1], plan, forward=False)
        grad_v = grad_v.contiguous()
        gs, g_mats = _scan_backward(grad_v, mats, phi_list, vs, scales, every, need_cores)
        if every > 1 and not bool(torch.isfinite(gs[0]).all()):
            if bool(torch.isfinite(grad_v).all()):
                # a gradient left float range between two renormalisations: redo both passes
                # renormalising every step (the same function, so the same gradient)
                forward_mats = _step_matrices(merged[-1], plan, forward=True)
                vs, scales = _scan_forward(vs[0], forward_mats, phi_list, 1)
                gs, g_mats = _scan_backward(grad_v, mats, phi_list, vs, scales, 1, need_cores)
        grad_sites = grad_phis = None
        if need_cores:
            grad_sites = _merged_grads_to_sites(g_mats, merged, sites, plan)
        if ctx.needs_input_grad[2]:
            # g_phi[s, b] = sum_in v[in, b] (M^T g_y)[(s, in), b], M the forward step matrix
            forward_mats = _step_matrices(merged[-1], plan, forward=True)
            g_y = gs[1:].transpose(0, 1).reshape(k * steps, bond, batch)
            g_x = torch.bmm(forward_mats.view(k * steps, bond, m * bond).transpose(1, 2), g_y)
            v_in = vs[:-1].transpose(0, 1).reshape(k, steps, 1, bond, batch)
            grad_phis = (g_x.view(k, steps, m, bond, batch) * v_in).sum(3)
            grad_phis = grad_phis.transpose(0, 1).unsqueeze(3)
        grad_start = gs[0] if ctx.needs_input_grad[0] else None
        return grad_start, grad_sites, grad_phis, None, None


def _merged_grads_to_sites(
    g_mats: torch.Tensor, merged: list[torch.Tensor], sites: torch.Tensor, plan: _ChainPlan
) -> torch.Tensor:
    """Step-matrix gradients (S, K, m*D, D) -> gradients of the (n, D, d, D) site cores.

    ``G[(s, out), in]`` of a step is the gradient of its block's natural core ``[l, s, r]``
    with ``(in, out) = (l, r)`` for an ``in_first`` chain and ``(r, l)`` otherwise. Every
    block is read once, except the identity block of a shorter chain (a constant: its gradient
    is dropped), so the blocks' gradients are copied, not summed, and then pushed back through
    the merge: for ``M_j = M_{j-1} A_j``, ``g_{M_{j-1}} = g_{M_j} A_j^T`` and
    ``g_{A_j} = M_{j-1}^T g_{M_j}``.
    """
    n, bond = sites.shape[:2]
    block = plan.block
    (k, steps), blocks = plan.index.shape, n // block
    m = g_mats.shape[2] // bond
    g = g_mats.view(steps, k, m, bond, bond)
    g_blocks = sites.new_empty(blocks, bond, m, bond)
    for chain, in_first in enumerate(plan.in_first):
        # natural [l, s, r] from [s, out, in]
        src = g[:, chain].permute(0, 3, 1, 2) if in_first else g[:, chain].permute(0, 2, 1, 3)
        g_blocks.index_copy_(0, plan.index[chain], src)
    return _unmerge_grads(g_blocks.view(blocks, bond * m, bond), merged, sites, block)


def _unmerge_grads(
    g_m: torch.Tensor, merged: list[torch.Tensor], sites: torch.Tensor, block: int
) -> torch.Tensor:
    """Gradients of the (n / block, D d^block, D) merged blocks -> of the (n, D, d, D) sites."""
    n, bond, d = sites.shape[:3]
    blocks = n // block
    if block == 1:
        return g_m.view_as(sites)
    c = sites.reshape(blocks, block, bond, d, bond)
    grads = []
    for j in range(block - 1, 0, -1):
        g_m = g_m.view(blocks, -1, d * bond)  # rows (l, s_1..s_j), cols (s_j+1, r)
        grads.append(torch.bmm(merged[j - 1].transpose(1, 2), g_m).view_as(c[:, j]))
        g_m = torch.bmm(g_m, c[:, j].reshape(-1, bond, d * bond).transpose(1, 2))
    grads.append(g_m.view_as(c[:, 0]))
    return torch.stack(grads[::-1], dim=1).view_as(sites)


def _insert_identity(cores: torch.Tensor, at: int, count: int, extra: int) -> torch.Tensor:
    """(N, D, d, D) cores with ``count`` identity sites inserted before site ``at``, ``extra`` appended."""
    if count == 0 and extra == 0:
        return cores
    eye = _identity_cores(cores[:0], count + extra)
    return torch.cat([cores[:at], eye[:count], cores[at:], eye[count:]])


def _insert_e0(features: torch.Tensor, at: int, count: int, extra: int) -> torch.Tensor:
    """(N, d, B) features with the identity sites' ``e_0`` inserted like :func:`_insert_identity`."""
    if count == 0 and extra == 0:
        return features
    e0 = _pad_sites(features[:0], count + extra, 0, 1)
    return torch.cat([features[:at], e0[:count], features[at:], e0[count:]])


def _pad_sites(tensor: torch.Tensor, length: int, site_dim: int, feature_dim: int) -> torch.Tensor:
    """Pad features to ``length`` sites with ``e_0`` vectors (their identity sites' features)."""
    missing = length - tensor.shape[site_dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[site_dim] = missing
    pad = tensor.new_zeros(shape)
    pad.select(feature_dim, 0).fill_(1.0)
    return torch.cat([tensor, pad], dim=site_dim)


def _identity_cores(cores: torch.Tensor, length: int) -> torch.Tensor:
    """Pad (..., L, D, d, D) cores to ``length`` sites with ``I`` on physical index 0.

    With the feature ``e_0`` (:func:`_pad_sites`) such a site's transfer matrix is exactly the
    identity, whatever the feature map.
    """
    missing = length - cores.shape[-4]
    if missing == 0:
        return cores
    bond, d = cores.shape[-3], cores.shape[-2]
    eye = cores.new_zeros(*cores.shape[:-4], missing, bond, d, bond)
    eye[..., :, 0, :] = torch.eye(bond, dtype=cores.dtype, device=cores.device)
    return torch.cat([cores, eye], dim=-4)


def _scan(
    start: torch.Tensor,
    sites: torch.Tensor,
    features: torch.Tensor,
    plan: _ChainPlan,
    every: int,
    method: str = "scan",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run :class:`_Scan` on (K, D, B) start vectors, (n, D, d, D) sites, (n, d, B) features.

    Falls back to unmerged sites, renormalised every step, if the merged ones left float range.
    Returns the (K, D, B) normalised vectors and the (K, B) log-scales; ``every`` counts sites.
    ``method="native"`` runs :class:`_NativeScan` instead where :mod:`tnkd.tn.native` takes the
    tensors (float32 and float64 on a CPU with a compiler).
    """
    if method == "native" and native.supports(start):
        ext = native.kernels()
        if ext is not None:
            return _native_scan(start, sites, features, plan, every, ext)
    phis = _block_features(features, plan.block).index_select(0, plan.index.t().flatten())
    phis = phis.view(plan.index.shape[1], plan.index.shape[0], -1, 1, features.shape[2])
    v, log_scale = _Scan.apply(start, sites, phis, plan, max(1, every // plan.block))
    if plan.block > 1 and not bool(torch.isfinite(v.detach()).all()):
        single = _unmerged_plan(plan)
        phis = features.index_select(0, single.index.t().flatten())
        phis = phis.view(single.index.shape[1], single.index.shape[0], -1, 1, features.shape[2])
        v, log_scale = _Scan.apply(start, sites, phis, single, 1)
    return v, log_scale


def _native_scan(
    start: torch.Tensor,
    sites: torch.Tensor,
    features: torch.Tensor,
    plan: _ChainPlan,
    every: int,
    ext: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_scan` by :class:`_NativeScan` (same fallback to unmerged sites)."""
    bfeats = _block_features(features, plan.block)
    finite: list[bool] = []  # the kernel's check of the result, no extra pass over it
    v, log_scale = _NativeScan.apply(
        start, sites, bfeats, plan, max(1, every // plan.block), ext, finite
    )
    if plan.block > 1 and not finite[0]:
        single = _unmerged_plan(plan)
        v, log_scale = _NativeScan.apply(start, sites, features, single, 1, ext, finite)
    return v, log_scale


class _NativeRun(NamedTuple):
    """What a native forward pass leaves for its backward pass."""

    plan: _ChainPlan
    every: int  # steps between renormalisations
    merged: list[torch.Tensor]  # :func:`_merge_cores` of the sites
    bfeats: torch.Tensor  # (blocks, m, B) block features
    vs: torch.Tensor  # (S+1, K, D, B)
    scales: torch.Tensor  # (R, K, 1, B)


def _native_forward(
    ext: Any,
    start: torch.Tensor,
    sites: torch.Tensor,
    bfeats: torch.Tensor,
    plan: _ChainPlan,
    every: int,
) -> tuple[_NativeRun, torch.Tensor, bool]:
    """The native forward scan, renormalising every step if a value left float range.

    Returns the run, the (K, B) log-scales and whether the last vectors are finite.
    """
    merged = [ext.merge_pairs(sites)] if plan.block == 2 else _merge_cores(sites, plan.block)
    args = (merged[-1], bfeats, plan.index, list(plan.in_first))
    vs, scales, log_scale, healthy, finite = ext.scan_forward(start, *args, every)
    if every > 1 and not healthy:
        # a value left float range between two renormalisations: renormalise every step
        every = 1
        vs, scales, log_scale, _, finite = ext.scan_forward(start, *args, every)
    return _NativeRun(plan, every, merged, bfeats, vs, scales), log_scale, finite


def _native_backward(
    ext: Any,
    run: _NativeRun,
    sites: torch.Tensor,
    grad_v: torch.Tensor,
    need_cores: bool,
    keep_all: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The native reverse scan: vector gradients and the sites' gradients.

    The vector gradients are (S+1, K, D, B) with ``keep_all`` (``[i+1]`` of step i's output,
    ``[0]`` of the start), else (1, K, D, B), the start's only. Redoes both passes renormalising
    every step if a gradient left float range (the same function, so the same gradient), like
    :class:`_Scan`.
    """
    plan, every = run.plan, run.every
    args = (run.merged[-1], run.bfeats, plan.index, list(plan.in_first))
    grad_v = grad_v.contiguous()
    gs, g_blocks, grad_finite, start_finite = ext.scan_backward(
        grad_v, *args, run.vs, run.scales, every, need_cores, keep_all
    )
    if every > 1 and grad_finite and not start_finite:
        vs, scales, *_ = ext.scan_forward(run.vs[0], *args, 1)
        gs, g_blocks, *_ = ext.scan_backward(grad_v, *args, vs, scales, 1, need_cores, keep_all)
    if not need_cores:
        return gs, None
    if plan.block == 2:
        return gs, ext.unmerge_pairs(g_blocks, sites)
    return gs, _unmerge_grads(g_blocks, run.merged, sites, plan.block)


class _NativeScan(torch.autograd.Function):
    """:class:`_Scan` with both loops in native code (:mod:`tnkd.tn.native`).

    Inputs: ``start`` (K, D, B) vectors, ``sites`` (n, D, d, D) cores, ``bfeats``
    (n / block, d^block, B) block features (:func:`_block_features`), the :class:`_ChainPlan`,
    ``every`` steps between renormalisations, the compiled module and a list that receives
    whether the result is finite. The kernels read each step's merged block and features in
    place through the plan's index, so no per-step copies of matrices or features are made (the
    Python scan's :func:`_step_matrices` and feature gather), and they return the merged
    blocks' gradients already in the blocks' layout.
    """

    @staticmethod
    def forward(ctx, start, sites, bfeats, plan, every, ext, finite):
        run, log_scale, last_finite = _native_forward(ext, start, sites, bfeats, plan, every)
        finite.append(last_finite)
        ctx.save_for_backward(sites, bfeats, run.vs, run.scales, *run.merged)
        ctx.plan, ctx.every, ctx.ext = run.plan, run.every, ext
        ctx.mark_non_differentiable(log_scale)
        return run.vs[-1].clone(), log_scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_v, _grad_log_scale):
        sites, bfeats, vs, scales, *merged = ctx.saved_tensors
        plan, ext = ctx.plan, ctx.ext
        run = _NativeRun(plan, ctx.every, merged, bfeats, vs, scales)
        need_feats = ctx.needs_input_grad[2]
        gs, grad_sites = _native_backward(
            ext, run, sites, grad_v, ctx.needs_input_grad[1], keep_all=need_feats
        )
        grad_bfeats = None
        if need_feats:
            # g_phi[s, b] = sum_in v[in, b] (M^T g_y)[(s, in), b], M the forward step matrix,
            # summed over the steps that read a block
            (k, steps), bond, batch = plan.index.shape, sites.shape[1], grad_v.shape[2]
            m = bfeats.shape[1]
            mats = _step_matrices(merged[-1], plan, forward=True)
            g_y = gs[1:].transpose(0, 1).reshape(k * steps, bond, batch)
            g_x = torch.bmm(mats.view(k * steps, bond, m * bond).transpose(1, 2), g_y)
            v_in = vs[:-1].transpose(0, 1).reshape(k, steps, 1, bond, batch)
            g_phi = (g_x.view(k, steps, m, bond, batch) * v_in).sum(3)
            grad_bfeats = torch.zeros_like(bfeats).index_add_(
                0, plan.index.flatten(), g_phi.view(k * steps, m, batch)
            )
        grad_start = gs[0] if ctx.needs_input_grad[0] else None
        return grad_start, grad_sites, grad_bfeats, None, None, None, None


def _mps_sources(position: int, num_sites: int, pad: int, extra: int) -> torch.Tensor:
    """Which input site each site of :func:`_mps_plan`'s site tensor reads (-1: identity)."""
    key = ("sources", position, num_sites, pad, extra)
    if key not in _PLANS:
        sites = list(range(position)) + [-1] * pad + list(range(position, num_sites))
        _remember(key, torch.tensor(sites + [-1] * extra))
    return _PLANS[key]


class _NativeMPS(torch.autograd.Function):
    """An MPS with an output core, contracted natively in one autograd node: :func:`contract_chain`.

    Inputs: the ``left`` and ``right`` (D,) boundaries, the (N, D, d, D) ``cores``, the
    (D, C, D) ``output_core``, (B, N, d) ``features`` (constants: the feature map has no
    parameters), the output core's ``position`` and the compiled module. Outputs: the (B, C)
    values, max-abs 1 per sample, and their (B,) log-scales (constants, as in the scan).

    The left and right halves are swept as K = 2 chains (:func:`_mps_plan`) and the output core
    is contracted with their ends, ``values[b, c] = sum_{l, r} u[l, b] O[l, c, r] w[r, b]``; the
    backward pass differentiates that by hand and sweeps the two gradient vectors back. One node
    instead of about twenty: at small D the autograd bookkeeping of the preparation and of the
    output contraction cost as much as the whole native scan.
    """

    @staticmethod
    def forward(ctx, left, cores, right, output_core, features, position, ext):
        num_sites, bond = cores.shape[:2]
        batch = features.shape[0]
        every, block = _sweep_settings("native", features.dtype, bond, None, None)
        plan, pad, extra = _mps_plan(position, num_sites - position, block, features.device)
        sites = _insert_identity(cores, position, pad, extra)
        source = _mps_sources(position, num_sites, pad, extra)
        start = torch.stack([left, right]).unsqueeze(-1).expand(2, bond, batch)
        bfeats = ext.block_features(features, source, block)
        run, logs, finite = _native_forward(ext, start, sites, bfeats, plan, max(1, every // block))
        if block > 1 and not finite:
            feats = ext.block_features(features, source, 1)
            run, logs, _ = _native_forward(ext, start, sites, feats, _unmerged_plan(plan), 1)
        # values[b, c] = sum_{l, r} u[l, b] O[l, c, r] w[r, b], (u, w) = the halves' (D, B) ends
        values, log_scale, ow, scale = ext.mps_output_forward(run.vs[-1], output_core, logs)
        ctx.save_for_backward(sites, run.bfeats, run.vs, run.scales, output_core, ow, scale)
        ctx.run = run._replace(bfeats=None, vs=None, scales=None)  # the tensors are saved above
        ctx.ext, ctx.position, ctx.pad, ctx.num_sites = ext, position, pad, num_sites
        ctx.mark_non_differentiable(log_scale)
        return values, log_scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values, _grad_log_scale):
        sites, bfeats, vs, scales, output_core, ow, scale = ctx.saved_tensors
        run = ctx.run._replace(bfeats=bfeats, vs=vs, scales=scales)
        grad_v, grad_out = ctx.ext.mps_output_backward(
            grad_values, vs[-1], output_core, ow, scale, ctx.needs_input_grad[3]
        )
        need_cores = ctx.needs_input_grad[1]
        gs, grad_sites = _native_backward(ctx.ext, run, sites, grad_v, need_cores)
        grad_cores = None
        if need_cores:
            p, pad, n = ctx.position, ctx.pad, ctx.num_sites
            grad_cores = torch.cat([grad_sites[:p], grad_sites[p + pad : n + pad]])
        grad_out = grad_out if ctx.needs_input_grad[3] else None
        grad_start = gs[0].sum(-1)
        return grad_start[0], grad_cores, grad_start[1], grad_out, None, None, None


def _unmerged_plan(plan: _ChainPlan) -> _ChainPlan:
    """The same chains one site per step (a chain leaving a block rightwards reads it backwards)."""
    rows = []
    for chain, in_first in enumerate(plan.in_first):
        offsets = torch.arange(plan.block, device=plan.index.device)
        offsets = offsets if in_first else offsets.flip(0)
        rows.append((plan.index[chain].unsqueeze(1) * plan.block + offsets).flatten())
    return _ChainPlan(1, torch.stack(rows), plan.in_first)


def _parallel_plan(chains: int, steps: int, block: int, device: torch.device) -> _ChainPlan:
    """K chains side by side in one site tensor, each ``steps`` blocks, all swept rightwards."""
    key = ("parallel", chains, steps, block, device)
    if key not in _PLANS:
        index = torch.arange(chains * steps, device=device).view(chains, steps)
        _remember(key, _ChainPlan(block, index, (True,) * chains))
    return _PLANS[key]


def _sweep_settings(
    method: str, dtype: torch.dtype, bond_dim: int, renorm_every: Any, block: Any
) -> tuple[int, int]:
    """Validated ``(renorm_every, block)`` of a scan or sweep, defaults filled in."""
    every = default_renorm_every(dtype, method) if renorm_every is None else renorm_every
    block = default_block(bond_dim, method) if block is None else block
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"sweep block must be a positive integer, but got {block!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"sweep renorm_every must be a positive integer, but got {every!r}")
    return every, block


def resolve_chain_method(method: str, bond_dim: int, device: torch.device | None = None) -> str:
    """Turn ``"auto"`` into a method for this device and bond dimension; validate the name.

    CPU (or no device): ``"native"`` at every D, or ``"scan"`` if the native kernels cannot be
    compiled here (:func:`tnkd.tn.native.kernels` warns once; the first call on a machine
    compiles them, about 30 s) and while ``torch.compile`` traces (it cannot trace into the
    native functions and would break the graph there). Accelerators: ``"tree"`` for
    D <= ``TREE_MAX_BOND_DIM``, ``"sweep"`` above. The measurements behind the choice are in
    the module docstring.

    Example:
        >>> resolve_chain_method("auto", 10, torch.device("cpu")) in ("native", "scan")
        True
    """
    if method not in CHAIN_METHODS:
        raise ValueError(
            f"chain contraction method must be one of {CHAIN_METHODS}, but got {method!r}"
        )
    if method != "auto":
        return method
    if device is None or torch.device(device).type == "cpu":
        if torch.compiler.is_compiling():
            return "scan"
        return "native" if native.kernels() is not None else "scan"
    return "tree" if bond_dim <= TREE_MAX_BOND_DIM else "sweep"


def _tree_boundary(
    start: torch.Tensor, cores: torch.Tensor, features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    k, batch, bond = start.shape
    mats = _site_matrices(cores, features)
    prod, logs = _tree_product(mats.reshape(k * batch, *mats.shape[2:]))
    v = torch.einsum("kbl,kblr->kbr", start, prod.view(k, batch, bond, bond))
    scale = v.detach().abs().amax(dim=2, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    return v / scale, logs.view(k, batch) + torch.log(scale[..., 0])


def _sweep_boundary(
    start: torch.Tensor,
    cores: torch.Tensor,
    features: torch.Tensor,
    renorm_every: int | None = None,
    block: int | None = None,
    method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry boundary vectors through chains, K chains at once: ``v <- v A_0(x_0) A_1(x_1) ...``.

    ``A_i(x) = sum_s phi_s(x) A_i[:, s, :]`` is site i's transfer matrix. With ``"scan"`` and
    ``"sweep"`` one step is ``v <- (phi_i (x) v) @ A_i``: an outer product with the site's
    features and one batched matrix product (2 kernels, D^2 d work per sample), with a
    renormalisation every ``renorm_every`` sites whose scales are accumulated in log space.
    With ``block = k > 1``, k neighbouring cores are first merged into one (D, d^k, D) core (and
    their features into one d^k vector), so the sweep takes L/k steps. ``"scan"`` runs the loop
    as one autograd node with a hand-written backward (the same two kernels per step, in
    reverse), ``"native"`` the same in C++ loops (:mod:`tnkd.tn.native`); ``"sweep"`` lets
    autograd record every step. ``"tree"`` multiplies all transfer matrices pairwise in log
    depth. If a value comes out non-finite or zero, the sweep is
    redone renormalising after every unmerged site.

    Args:
        start: (K, B, D) boundary vectors.
        cores: (K, L, D, d, D) cores, oriented so the vector enters on the first bond index.
        features: (K, B, L, d).
        renorm_every: sites between renormalisations; default :func:`default_renorm_every`.
        block: sites merged per step; default :func:`default_block`.
        method: ``"auto"`` (see :func:`resolve_chain_method`), ``"native"``, ``"scan"``,
            ``"sweep"`` or ``"tree"`` (which ignores ``renorm_every`` and ``block``).

    Returns:
        (K, B, D) normalised vectors (max-abs 1 per sample) and (K, B) log-scales: the exact
        result is ``v * exp(log_scale)[..., None]``.

    Example:
        >>> start = torch.ones(1, 3, 4)  # K = 1 chain, batch 3, D = 4
        >>> cores = torch.eye(4).view(1, 1, 4, 1, 4).expand(1, 50, 4, 2, 4) * 2.0
        >>> features = torch.full((1, 3, 50, 2), 0.5)  # every transfer matrix is 2 I
        >>> v, log_scale = sweep_boundary(start, cores, features)
        >>> v[0, 0].tolist(), round(float(log_scale[0, 0]) / 0.693147, 3)
        ([1.0, 1.0, 1.0, 1.0], 50.0)
    """
    method = resolve_chain_method(method, cores.shape[2], start.device)
    if cores.shape[1] == 0:
        return start, start.new_zeros(start.shape[:2])
    if method == "tree":
        return _tree_boundary(start, cores, features)
    every, block = _sweep_settings(method, start.dtype, cores.shape[2], renorm_every, block)
    if method in SCANS:
        chains, length, bond, d = cores.shape[:4]
        padded = -(-length // block) * block
        sites = _identity_cores(cores, padded).reshape(chains * padded, bond, d, bond)
        feats = _pad_sites(features.permute(0, 2, 3, 1), padded, 1, 2)
        plan = _parallel_plan(chains, padded // block, block, start.device)
        v, log_scale = _scan(
            start.transpose(1, 2), sites, feats.reshape(chains * padded, d, -1), plan, every, method
        )
        return v.transpose(1, 2), log_scale
    v, log_scale = _autograd_sweep(start, cores, features, every, block)
    if every > 1 or block > 1:
        peak = v.detach().abs().amax(dim=2)
        if not bool(torch.isfinite(peak).all() and (peak > 0).all()):
            v, log_scale = _autograd_sweep(start, cores, features, 1, 1)
    return v, log_scale


def _contract_chain(
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
    result is ``values * exp(log_scale)[:, None]``; ``values`` has max-abs about 1 per sample.

    Args:
        left: (D,) left boundary vector.
        cores: (N, D, d, D) site cores (bond, physical, bond).
        right: (D,) right boundary vector.
        features: (B, N, d) feature vectors.
        output_core: (D, C, D) output core.
        position: p, the number of sites left of the output core (0..N).
        method: ``"auto"``, ``"native"``, ``"scan"``, ``"sweep"`` or ``"tree"`` (see
            :func:`sweep_boundary`).
        output_features: (B, d) features of an output core that also reads an input; then
            ``output_core`` is (D, d, C, D) and ``O(x) = sum_s phi_s(x) O[:, s]`` joins the halves.

    Returns:
        ``values`` (B, C) and ``log_scale`` (B,).
    """
    num_sites, bond = cores.shape[0], cores.shape[1]
    batch = features.shape[0]
    if features.shape[1] != num_sites:
        raise ValueError(f"expected features for {num_sites} sites, but got {features.shape[1]}")
    if not 0 <= position <= num_sites:
        raise ValueError(f"output core position must be in [0, {num_sites}], but got {position}")
    method = resolve_chain_method(method, bond, features.device)
    reads = output_features is not None
    if (
        method == "native"
        and not reads
        and native.supports(features)
        and not features.requires_grad
    ):
        ext = native.kernels()
        if ext is not None:
            return _NativeMPS.apply(left, cores, right, output_core, features, position, ext)
    if position in (0, num_sites):
        return _label_at_an_end(
            left, cores, right, features, output_core, position, method, output_features
        )
    if method in SCANS:
        every, block = _sweep_settings(method, features.dtype, bond, None, None)
        plan, pad, extra = _mps_plan(position, num_sites - position, block, features.device)
        sites = _insert_identity(cores, position, pad, extra)
        feats = _insert_e0(features.permute(1, 2, 0), position, pad, extra)  # (n, d, B)
        start = torch.stack([left, right]).unsqueeze(-1).expand(2, bond, batch)
        v, logs = _scan(start, sites, feats, plan, every, method)
        if reads:
            values = torch.einsum("lb,lscr,rb,bs->bc", v[0], output_core, v[1], output_features)
        else:
            # values[b, c] = sum_{l, r} u[l, b] O[l, c, r] w[r, b]: one matmul, one reduction
            ow = (output_core.reshape(-1, bond) @ v[1]).view(bond, -1, batch)
            values = (ow * v[0].unsqueeze(1)).sum(0).t()
    else:
        length = max(position, num_sites - position)
        left_cores, right_cores = cores[:position], cores[position:].flip(0).transpose(1, 3)
        left_feats = _pad_sites(features[:, :position], length, 1, 2)
        right_feats = _pad_sites(features[:, position:].flip(1), length, 1, 2)
        start = torch.stack([left.expand(batch, bond), right.expand(batch, bond)])
        v, logs = _sweep_boundary(
            start,
            torch.stack(
                [_identity_cores(left_cores, length), _identity_cores(right_cores, length)]
            ),
            torch.stack([left_feats, right_feats]),
            method=method,
        )
        if reads:
            values = torch.einsum("bl,lscr,br,bs->bc", v[0], output_core, v[1], output_features)
        else:
            values = torch.einsum("bl,lcr,br->bc", v[0], output_core, v[1])
    return _rescaled(values, logs.sum(0))


def _rescaled(values: torch.Tensor, log_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` scaled to max-abs 1 per sample, the scale moved into ``log_scale``."""
    scale = (
        values.detach().abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    )
    return values / scale, log_scale + torch.log(scale[:, 0])


def _label_at_an_end(
    left: torch.Tensor,
    cores: torch.Tensor,
    right: torch.Tensor,
    features: torch.Tensor,
    output_core: torch.Tensor,
    position: int,
    method: str,
    output_features: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`contract_chain` with the output core at an end: one chain swept towards it.

    (Two half-chains swept side by side would have one of them sweep identities all the way.)
    """
    batch, bond = features.shape[0], cores.shape[1]
    if position == cores.shape[0]:
        start, sites, feats, eq = left, cores, features, "bl,l{s}cr,r{b}->bc"
    else:
        start, sites, eq = right, cores.flip(0).transpose(1, 3), "l,l{s}cr,br{b}->bc"
        feats = features.flip(1)
    v, logs = _sweep_boundary(
        start.expand(batch, bond).unsqueeze(0),
        sites.unsqueeze(0),
        feats.unsqueeze(0),
        method=method,
    )
    ends = (v[0], right) if position == cores.shape[0] else (left, v[0])
    if output_features is None:
        values = torch.einsum(eq.format(s="", b=""), ends[0], output_core, ends[1])
    else:
        values = torch.einsum(
            eq.format(s="s", b=",bs"), ends[0], output_core, ends[1], output_features
        )
    return _rescaled(values, logs[0])


def _full_precision(fn: Any) -> Any:
    """Run a chain contraction in the parameters' precision even under autocast.

    bfloat16 keeps 8 bits of mantissa: products of hundreds of near-identity cores lose the
    small corrections that carry the signal (measured: a digits MPS under ``bf16-mixed`` learned
    at half the speed). So chains contract in float32 (or float64); the teacher, the feature
    maps and the divergences still run under autocast.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        device = tensors[0].device.type if tensors else "cpu"
        if not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        dtype = torch.promote_types(
            torch.float32, max((a.dtype for a in tensors), key=lambda d: torch.finfo(d).bits)
        )
        cast = [a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args]
        with torch.autocast(device_type=device, enabled=False):
            return fn(*cast, **kwargs)

    return wrapper


sweep_boundary = _full_precision(_sweep_boundary)
contract_chain = _full_precision(_contract_chain)
