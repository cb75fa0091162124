"""The contraction engine: a graph becomes one einsum, planned once by ``opt_einsum``.

Two ways to evaluate a student, tested equal to each other:

* :class:`CompiledNetwork`, the generic path for any graph (tree, small PEPS, chain): the
  graph's index names become einsum symbols (one cached helper), a batch index is added to every
  input node, the contraction path is planned once per input shape (on the single-sample network,
  so planning a 784-site chain is cheap) and the ``opt_einsum`` expression is cached and executed
  on torch tensors (autograd, mixed precision and GPUs work).
* :func:`contract_chain`, the fast path for chains (MPS classifiers, TT networks). It returns the
  value *and a tracked log-scale*, so that chains of any length neither overflow nor vanish:

  - ``"sweep"``: a boundary vector is swept along the chain (D^2 d work per site, sequential;
    the left and right halves are swept together as one batch, two neighbouring sites are
    merged into one step, and the vectors are renormalised every few sites).
  - ``"tree"``: every site's feature vector is contracted into its core in one batched
    operation, then the matrices are multiplied pairwise in log depth (D^3 work per site, but
    about 2 log2(N) large kernels instead of N small ones), renormalised at every level.
  - ``"auto"`` picks ``sweep`` on CPU at every bond dimension (measured faster there at D = 10,
    20 and 50: see ``benchmarks/contraction.py``), and ``tree`` on accelerators for D <= 64,
    where a few large kernels beat hundreds of small launches (measured on an H200 at batch
    100 with ``benchmarks/chain_methods.py``: a 784-site training step 4.9x faster at D = 32 and
    2.2x at D = 64, 196 sites 2.1x and 1.3x). Above D = 64 the tree's D^3 work per site was not
    measured, so the sweep stays the choice there.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import opt_einsum as oe
import torch

from tnkd.tn.graph import NetworkSpec, TNGraph

BATCH_INDEX = "__batch__"


@functools.lru_cache(maxsize=256)
def _symbols(indices: tuple[str, ...]) -> dict[str, str]:
    return {name: oe.get_symbol(i) for i, name in enumerate(indices)}


def einsum_equation(spec: NetworkSpec, batched: bool = True) -> str:
    """The einsum equation of a graph, symbols generated from index names (batch index first)."""
    names: list[str] = [BATCH_INDEX]
    for idx in spec.node_indices:
        names.extend(i for i in idx if i not in names)
    sym = _symbols(tuple(names))
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
    node's shape, input tensors with a leading batch index. The path is planned on the first
    call for a given set of shapes and reused after (``plans`` counts the plannings).

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
        self._single_equation = einsum_equation(self.spec, batched=False)
        self._path: list[tuple[int, ...]] | None = None
        self._expressions: dict[tuple[tuple[int, ...], ...], Any] = {}
        self.plans = 0

    @property
    def path(self) -> list[tuple[int, ...]]:
        """The contraction path, planned once on the single-sample network."""
        if self._path is None:
            path, _ = oe.contract_path(
                self._single_equation, *self.spec.node_shapes, shapes=True, optimize=self.optimize
            )
            self._path = path
            self.plans += 1
        return self._path

    def expression(self, shapes: tuple[tuple[int, ...], ...]) -> Any:
        """The cached ``opt_einsum`` expression for these operand shapes."""
        expr = self._expressions.get(shapes)
        if expr is None:
            expr = oe.contract_expression(self.equation, *shapes, optimize=self.path)
            self._expressions[shapes] = expr
        return expr

    def __call__(self, operands: Sequence[torch.Tensor]) -> torch.Tensor:
        """Contract the network; returns ``(batch, *output_sizes)``."""
        if len(operands) != len(self.spec.node_names):
            raise ValueError(
                f"expected {len(self.spec.node_names)} operands (one per node), got {len(operands)}"
            )
        shapes = tuple(tuple(t.shape) for t in operands)
        return self.expression(shapes)(*operands, backend="torch")


# --------------------------------------------------------------------------------------------
# Fast chain paths
# --------------------------------------------------------------------------------------------

CHAIN_METHODS = ("auto", "scan", "sweep", "tree")
TREE_MAX_BOND_DIM = 64
SCAN_RENORM_EVERY = 8


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
    """Sites between renormalisations of a sweep: 4 when training, 8 under no-grad, 1 in float16.

    Between two renormalisations a value may grow or shrink by the product of a few transfer
    matrices' norms; float32 and bfloat16 (range 1e+-38) absorb that for any sane cores, and
    :func:`sweep_boundary` falls back to renormalising every site if a value ever came out
    non-finite or zero. float16 (range 6.5e4) renormalises every site.
    """
    if dtype == torch.float16:
        return 1
    if method == "scan":
        return SCAN_RENORM_EVERY
    return 4 if torch.is_grad_enabled() else 8


def default_block(bond_dim: int, method: str = "sweep") -> int:
    """Sites merged into one sweep step: 2 for D <= 64, else 1.

    Merging k sites costs the same D^2 d^k / k flops per site when k = d = 2, halves the number
    of sequential steps (the sweep is launch-bound at small D) and adds a batch-independent
    D^3 d^k merge per block. Measured on 2 CPU cores at 784 sites, batch 100: k = 2 trains
    about 1.1-1.3x faster than k = 1 at D = 10 and 20, as fast at D = 50, and infers up to
    1.5x faster; k = 3, 4 gained nothing more.
    """
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


def _scan_features(features: torch.Tensor, block: int) -> torch.Tensor:
    """(L, K, d, B) features, L a multiple of ``block`` -> (S, K, m, 1, B), m = d^block.

    The features of ``block`` neighbouring sites become one vector, their outer product, with
    index ``s_1 d^(k-1) + ... + s_k``: site-major with the batch last, the scan's layout.
    """
    length, k, d, batch = features.shape
    f = features.reshape(length // block, block, k, d, batch)
    phi = f[:, 0]
    for j in range(1, block):
        phi = (phi.unsqueeze(3) * f[:, j].unsqueeze(2)).flatten(2, 3)
    return phi.unsqueeze(3).contiguous()


def _merge_cores(cores: torch.Tensor, block: int) -> list[torch.Tensor]:
    """Partial products of ``block`` neighbouring cores, each (K*S, D * d^j, D), j = 1..block.

    The last is the merged core ``M[(l, s_1..s_k), r]``; the others are kept for the backward
    pass. One batched matmul per merged site.
    """
    k, length, bond, d = cores.shape[:4]
    c = cores.reshape(k * (length // block), block, bond, d, bond)
    merged = [c[:, 0].reshape(-1, bond * d, bond)]
    for j in range(1, block):
        prod = torch.bmm(merged[-1], c[:, j].reshape(-1, bond, d * bond))
        merged.append(prod.view(prod.shape[0], -1, bond))
    return merged


def _renorm_plan(steps: int, every: int) -> list[bool]:
    """Which scan steps end with a renormalisation: every ``every``-th one and the last."""
    return [(i + 1) % every == 0 or i == steps - 1 for i in range(steps)]


def _scan_forward(
    start: torch.Tensor, mats: torch.Tensor, phi_list: Sequence[torch.Tensor], every: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry (K, D, B) vectors through the steps; all of them, (S+1, K, D, B), and the scales.

    Step i is ``v_{i+1} = mats[i] @ (phi_i (x) v_i)``: an outer product into a scratch and one
    bmm written straight into the next slot of the result. Every ``every``-th output is divided
    by its 2-norm and the last by its max-abs; the scales are returned, (R, K, 1, B). A zero
    vector gives NaNs (no clamp: two kernels per renormalisation, not four), which the caller
    sees and answers by renormalising every step (:func:`_healthy`), where zeros are clamped.
    """
    steps, (k, bond, batch) = mats.shape[0], start.shape
    m = phi_list[0].shape[1]
    vs = start.new_empty(steps + 1, k, 1, bond, batch)
    v_outer, v_flat = vs.unbind(0), vs.view(steps + 1, k, bond, batch).unbind(0)
    x = start.new_empty(k, m, bond, batch)
    x_flat = x.view(k, m * bond, batch)
    v_flat[0].copy_(start)
    scales = []
    plan = _renorm_plan(steps, every)
    for i, mat in enumerate(mats.unbind(0)):
        torch.mul(phi_list[i], v_outer[i], out=x)
        out = torch.bmm(mat, x_flat, out=v_flat[i + 1])
        if plan[i] and i < steps - 1:
            scale = out.abs().amax(dim=1, keepdim=True).clamp_min_(torch.finfo(out.dtype).tiny)
            out.div_(scale)
            scales.append(scale)
    scale = out.abs().amax(dim=1, keepdim=True).clamp_min_(torch.finfo(out.dtype).tiny)
    out.div_(scale)
    scales.append(scale)
    return vs.view(steps + 1, k, bond, batch), torch.stack(scales)


def _scan_backward(
    grad: torch.Tensor,
    mats_t: torch.Tensor,
    phi_list: Sequence[torch.Tensor],
    vs: torch.Tensor,
    scales: torch.Tensor,
    every: int,
    core_grads: bool,
    chunk: int = 8,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reverse scan: gradients of the start and of every step's (merged) core.

    Step i computed ``y = A^T (phi (x) v)`` and ``v' = y / c`` (``c`` a constant); its
    vector-Jacobian product is ``g_y = g_v' / c``, ``g_v = A (phi (x) g_y)`` with ``A`` the
    merged core as a (D, m*D) matrix (``mats_t[i]``): the forward step's two kernels again.
    With ``core_grads`` the outer products ``phi (x) g_y`` of ``chunk`` steps are kept and one
    bmm per chunk gives those steps' core gradients
    ``g_A[(s, r), l] = sum_b (phi (x) g_y)[(s, r), b] v[l, b]`` while the factors are still in
    cache (measured: faster than keeping every forward outer product for one large kernel).

    Returns:
        (S+1, K, D, B) vector gradients (``[i+1]`` of step i's output, ``[0]`` of the start)
        and, with ``core_grads``, (S, K, m*D, D) core gradients.
    """
    steps, (k, bond, batch) = mats_t.shape[0], grad.shape
    m = phi_list[0].shape[1]
    gs = grad.new_empty(steps + 1, k, 1, bond, batch)
    g_outer, g_flat = gs.unbind(0), gs.view(steps + 1, k, bond, batch).unbind(0)
    chunk = chunk if core_grads else 1
    xs = grad.new_empty(chunk, k, m, bond, batch)
    x_outer, x_flat = xs.unbind(0), xs.view(chunk, k, m * bond, batch).unbind(0)
    g_cores = grad.new_empty(steps, k, m * bond, bond) if core_grads else None
    g_flat[steps].copy_(grad)
    plan, r = _renorm_plan(steps, every), scales.shape[0]
    for i in range(steps - 1, -1, -1):
        if plan[i]:
            r -= 1
            g_flat[i + 1].div_(scales[r])
        j = i % chunk
        torch.mul(phi_list[i], g_outer[i + 1], out=x_outer[j])
        torch.bmm(mats_t[i], x_flat[j], out=g_flat[i])
        if core_grads and j == 0:  # steps i .. i + n - 1 have their outer products in xs
            n = min(chunk, steps - i)
            torch.bmm(
                xs[:n].view(-1, m * bond, batch),
                vs[i : i + n].transpose(2, 3).reshape(-1, batch, bond),
                out=g_cores[i : i + n].view(-1, m * bond, bond),
            )
    return gs.view(steps + 1, k, bond, batch), g_cores


class _Scan(torch.autograd.Function):
    """The boundary-vector sweep as one autograd node with a hand-written backward (a reverse scan).

    Inputs: ``start`` (K, D, B), ``cores`` (K, L, D, d, D), ``phis`` (S, K, m, 1, B) from
    :func:`_scan_features`, ``block`` sites per step (L = S * block, m = d^block) and
    ``every`` steps between renormalisations. Outputs: the (K, D, B) vectors, max-abs 1 per
    sample, and their (K, B) log-scales (not differentiable: the scales are constants, as in
    the autograd sweep, so the gradient of ``v * exp(log_scale)`` is exact).

    Autograd would record three or four nodes per step and, in backward, run each with its own
    dispatch, broadcast reduction and gradient accumulation; at small D those per-op costs, not
    arithmetic, set the time. Here the forward pass merges each block of cores with one batched
    matmul per merged site and runs two kernels per step; the backward pass sweeps a gradient
    vector back with the same two kernels per step plus one for the step's core gradient, and
    the merged-core gradients are split into per-site ones by a few batched matmuls.

    The vectors are carried as (D, B) columns, bond index first and batch last: the outer
    product then runs along the batch, the long contiguous axis, and the matmul has the batch as
    its wide dimension (measured on this 2-core CPU at D = 10, K x B = 2 x 100: 4.7 us per
    step against 11.7 us in the (B, D) layout).
    """

    @staticmethod
    def forward(ctx, start, cores, phis, block, every):
        k, length, bond = cores.shape[:3]
        steps, m = length // block, phis.shape[2]
        merged = _merge_cores(cores, block)
        mats = merged[-1].view(k, steps, bond, m, bond).permute(1, 0, 4, 3, 2)
        mats = mats.reshape(steps, k, bond, m * bond)
        phi_list = phis.unbind(0)
        vs, scales = _scan_forward(start, mats, phi_list, every)
        if every > 1 and not _healthy(vs[-1], scales):
            # a value left float range between two renormalisations: renormalise every step
            every = 1
            vs, scales = _scan_forward(start, mats, phi_list, every)
        ctx.save_for_backward(cores, phis, vs, *merged)
        ctx.scales, ctx.block, ctx.every, ctx.phi_list = scales, block, every, phi_list
        log_scale = torch.log(scales).sum(0)[:, 0]
        ctx.mark_non_differentiable(log_scale)
        return vs[-1].clone(), log_scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_v, _grad_log_scale):
        cores, phis, vs, *merged = ctx.saved_tensors
        block, every, scales, phi_list = ctx.block, ctx.every, ctx.scales, ctx.phi_list
        k, length, bond, d = cores.shape[:4]
        steps, m, batch = length // block, phis.shape[2], grad_v.shape[2]
        need_cores = ctx.needs_input_grad[1]
        mats_t = merged[-1].view(k, steps, bond, m * bond).transpose(0, 1).contiguous()
        grad_v = grad_v.contiguous()
        gs, g_m = _scan_backward(grad_v, mats_t, phi_list, vs, scales, every, need_cores)
        if every > 1 and not bool(torch.isfinite(gs[0]).all()):
            if bool(torch.isfinite(grad_v).all()):
                # a gradient left float range between two renormalisations: redo both passes
                # renormalising every step (the same function, so the same gradient)
                mats = mats_t.view(steps, k, bond, m, bond).permute(0, 1, 4, 3, 2)
                vs, scales = _scan_forward(
                    vs[0], mats.reshape(steps, k, bond, m * bond), phi_list, 1
                )
                gs, g_m = _scan_backward(grad_v, mats_t, phi_list, vs, scales, 1, need_cores)
        grad_cores = grad_phis = None
        if need_cores:
            # g_m[(s, r), l] -> the merged core's gradient [(l, s), r], then back through the merge
            g_m = g_m.view(steps, k, m, bond, bond).permute(1, 0, 4, 2, 3)
            g_m = g_m.reshape(k * steps, bond * m, bond)
            c = cores.reshape(k * steps, block, bond, d, bond)
            grads = []
            for j in range(block - 1, 0, -1):
                g_m = g_m.view(k * steps, -1, d * bond)  # rows (l, s_1..s_j), cols (s_j+1, r)
                grads.append(torch.bmm(merged[j - 1].transpose(1, 2), g_m).view_as(c[:, j]))
                g_m = torch.bmm(g_m, c[:, j].reshape(-1, bond, d * bond).transpose(1, 2))
            grads.append(g_m.view_as(c[:, 0]))
            grad_cores = torch.stack(grads[::-1], dim=1).view_as(cores)
        if ctx.needs_input_grad[2]:
            mats = merged[-1].view(k, steps, bond, m, bond).permute(1, 0, 3, 2, 4)
            mats = mats.reshape(steps * k, m * bond, bond)  # rows (s, l), cols r
            g_x = torch.bmm(mats, gs[1:].reshape(steps * k, bond, batch))
            grad_phis = (g_x.view(steps, k, m, bond, batch) * vs[:-1].unsqueeze(2)).sum(
                3, keepdim=True
            )
        grad_start = gs[0] if ctx.needs_input_grad[0] else None
        return grad_start, grad_cores, grad_phis, None, None


def _healthy(v: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether a scan stayed in float range: a finite output and no scale near underflow.

    A scale below ``tiny / eps`` means the largest entry came within a mantissa's width of the
    subnormal range, so smaller entries of the same vector lost digits.
    """
    info = torch.finfo(v.dtype)
    return bool(torch.isfinite(v).all()) and bool(scales.amin() >= info.tiny / info.eps)


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


def _scan_chains(
    start: torch.Tensor, cores: torch.Tensor, features: torch.Tensor, every: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan in its own layout: (K, D, B) start, (K, L, D, d, D) cores, (L, K, d, B) features.

    Pads the chains with identity sites to a multiple of ``block`` and falls back to unmerged
    sites if the merged ones left float range. Returns the (K, D, B) normalised vectors and
    the (K, B) log-scales; ``every`` counts sites.
    """
    length = -(-cores.shape[1] // block) * block
    phis = _scan_features(_pad_sites(features, length, 0, 2), block)
    cores_padded = _identity_cores(cores, length)
    v, log_scale = _Scan.apply(start, cores_padded, phis, block, max(1, every // block))
    if block > 1 and not bool(torch.isfinite(v.detach()).all()):
        v, log_scale = _Scan.apply(start, cores, _scan_features(features, 1), 1, 1)
    return v, log_scale


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
    """Turn ``"auto"`` into ``"tree"`` or ``"sweep"``; validate the name."""
    if method not in CHAIN_METHODS:
        raise ValueError(
            f"chain contraction method must be one of {CHAIN_METHODS}, but got {method!r}"
        )
    if method != "auto":
        return method
    if device is None or torch.device(device).type == "cpu":
        return "scan"
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
    reverse); ``"sweep"`` lets autograd record every step. ``"tree"`` multiplies all transfer
    matrices pairwise in log depth. If a value comes out non-finite or zero, the sweep is
    redone renormalising after every unmerged site.

    Args:
        start: (K, B, D) boundary vectors.
        cores: (K, L, D, d, D) cores, oriented so the vector enters on the first bond index.
        features: (K, B, L, d).
        renorm_every: sites between renormalisations; default :func:`default_renorm_every`.
        block: sites merged per step; default :func:`default_block`.
        method: ``"auto"`` (see :func:`resolve_chain_method`), ``"scan"``, ``"sweep"`` or
            ``"tree"`` (which ignores ``renorm_every`` and ``block``).

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
    if method == "scan":
        features = features.permute(2, 0, 3, 1)
        v, log_scale = _scan_chains(start.transpose(1, 2), cores, features, every, block)
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
        method: ``"auto"``, ``"sweep"`` or ``"tree"``.

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
    length = max(position, num_sites - position)
    left_cores, right_cores = cores[:position], cores[position:].flip(0).transpose(1, 3)
    if method == "scan":
        every, block = _sweep_settings(method, features.dtype, bond, None, None)
        length = -(-length // block) * block
        feats = features.permute(1, 2, 0)  # (N, d, B): the scan's batch-last layout
        left_feats = _pad_sites(feats[:position], length, 0, 1)
        right_feats = _pad_sites(feats[position:].flip(0), length, 0, 1)
        v, logs = _scan_chains(
            torch.stack([left, right]).unsqueeze(-1).expand(2, bond, batch),
            torch.stack(
                [_identity_cores(left_cores, length), _identity_cores(right_cores, length)]
            ),
            torch.stack([left_feats, right_feats], dim=1),
            every,
            block,
        )
        # values[b, c] = sum_{l, r} u[l, b] O[l, c, r] w[r, b], as one matmul and one reduction
        ow = (output_core.reshape(-1, bond) @ v[1]).view(bond, -1, batch)
        values = (ow * v[0].unsqueeze(1)).sum(0).t()
    else:
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
        values = torch.einsum("bl,lcr,br->bc", v[0], output_core, v[1])
    log_scale = logs.sum(0)
    scale = (
        values.detach().abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    )
    return values / scale, log_scale + torch.log(scale[:, 0])


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
