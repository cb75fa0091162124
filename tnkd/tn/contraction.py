"""The contraction engine: a graph becomes one einsum, planned once by ``opt_einsum``.

Two ways to evaluate a student, tested equal to each other:

* :class:`CompiledNetwork`, the generic path for any graph (tree, small PEPS, chain): the
  graph's index names become einsum symbols (one cached helper), a batch index is added to every
  input node, the contraction path is planned and the ``opt_einsum`` expression is cached per
  input shape and executed on torch tensors (autograd, mixed precision and GPUs work). A graph
  with one input node (a TT-layer) is planned on the batched shapes, where the best order can
  depend on the batch size; a graph with several (a 784-site chain) is planned once on the
  single-sample network, which keeps its planning cheap.
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
        self._single_equation = einsum_equation(self.spec, batched=False)
        self._path: list[tuple[int, ...]] | None = None
        self._expressions: dict[tuple[tuple[int, ...], ...], Any] = {}
        self.plans = 0
        # one input node: the batch index is an ordinary index of one tensor, so the planner can
        # see the batched sizes (for a TT-layer at batch 256 its path does 2.4x fewer flops than
        # the single-sample one); several: it would be a hyperedge over all inputs
        self.plan_per_shape = len(self.spec.input_nodes) == 1

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
            if self.plan_per_shape:
                path, _ = oe.contract_path(
                    self.equation, *shapes, shapes=True, optimize=self.optimize
                )
                self.plans += 1
            else:
                path = self.path
            expr = oe.contract_expression(self.equation, *shapes, optimize=path)
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

CHAIN_METHODS = ("auto", "sweep", "tree")
TREE_MAX_BOND_DIM = 64


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


def default_renorm_every(dtype: torch.dtype) -> int:
    """Sites between renormalisations of a sweep: 4 when training, 8 under no-grad, 1 in float16.

    Between two renormalisations a value may grow or shrink by the product of a few transfer
    matrices' norms; float32 and bfloat16 (range 1e+-38) absorb that for any sane cores, and
    :func:`sweep_boundary` falls back to renormalising every site if a value ever came out
    non-finite or zero. float16 (range 6.5e4) renormalises every site.
    """
    if dtype == torch.float16:
        return 1
    return 4 if torch.is_grad_enabled() else 8


def default_block(bond_dim: int) -> int:
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


def _sweep_boundary(
    start: torch.Tensor,
    cores: torch.Tensor,
    features: torch.Tensor,
    renorm_every: int | None = None,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sweep boundary vectors through chains, K chains at once.

    One step is ``v <- (phi_i (x) v) @ A_i``: an outer product with the site's features and one
    batched matrix product (2 kernels), with a renormalisation every ``renorm_every`` sites
    whose scales are accumulated in log space. With ``block = k > 1``, k neighbouring cores are
    first merged into one (D, d^k, D) core (and their features into one d^k vector), so the
    sweep takes N/k steps.

    Args:
        start: (K, B, D) boundary vectors.
        cores: (K, L, D, d, D) cores, oriented so the vector enters on the first bond index.
        features: (K, B, L, d).
        renorm_every: sites between renormalisations; default :func:`default_renorm_every`.
        block: sites merged per step; default :func:`default_block`.

    Returns:
        (K, B, D) normalised vectors (max-abs 1 per sample) and (K, B) log-scales.
    """
    every = default_renorm_every(start.dtype) if renorm_every is None else renorm_every
    block = default_block(cores.shape[2]) if block is None else block
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"sweep block must be a positive integer, but got {block!r}")
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"sweep renorm_every must be a positive integer, but got {every!r}")
    steps = _blocked(cores, features, block)
    v, log_scale = _sweep(start, steps, max(1, every // block))
    if every > 1 or block > 1:
        peak = v.detach().abs().amax(dim=2)
        if not bool(torch.isfinite(peak).all() and (peak > 0).all()):
            v, log_scale = _sweep(start, _blocked(cores, features, 1), 1)
    return v, log_scale


def _identity_padding(
    cores: torch.Tensor, features: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (L, D, d, D) cores and (B, L, d) features to ``length`` sites with identity transfers."""
    missing = length - cores.shape[0]
    if missing == 0:
        return cores, features
    bond, d = cores.shape[1], cores.shape[2]
    eye = torch.zeros(missing, bond, d, bond, dtype=cores.dtype, device=cores.device)
    eye[:, :, 0, :] = torch.eye(bond, dtype=cores.dtype, device=cores.device)
    pad_feat = torch.zeros(
        features.shape[0], missing, d, dtype=features.dtype, device=features.device
    )
    pad_feat[..., 0] = 1.0
    return torch.cat([cores, eye]), torch.cat([features, pad_feat], dim=1)


def resolve_chain_method(method: str, bond_dim: int, device: torch.device | None = None) -> str:
    """Turn ``"auto"`` into ``"tree"`` or ``"sweep"``; validate the name."""
    if method not in CHAIN_METHODS:
        raise ValueError(
            f"chain contraction method must be one of {CHAIN_METHODS}, but got {method!r}"
        )
    if method != "auto":
        return method
    on_accelerator = device is not None and torch.device(device).type != "cpu"
    return "tree" if on_accelerator and bond_dim <= TREE_MAX_BOND_DIM else "sweep"


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
    left_cores, right_cores = cores[:position], cores[position:].flip(0).transpose(1, 3)
    left_feats, right_feats = features[:, :position], features[:, position:].flip(1)
    length = max(position, num_sites - position)
    lc, lf = _identity_padding(left_cores, left_feats, length)
    rc, rf = _identity_padding(right_cores, right_feats, length)
    if length == 0:
        u = left.expand(batch, bond)
        w = right.expand(batch, bond)
        log_scale = features.new_zeros(batch)
    elif method == "sweep":
        start = torch.stack([left.expand(batch, bond), right.expand(batch, bond)])
        v, logs = sweep_boundary(start, torch.stack([lc, rc]), torch.stack([lf, rf]))
        u, w = v[0], v[1]
        log_scale = logs.sum(0)
    else:
        mats = _site_matrices(torch.stack([lc, rc]), torch.stack([lf, rf]))
        prod, logs = _tree_product(mats.reshape(2 * batch, length, bond, bond))
        u = torch.einsum("l,blr->br", left, prod[:batch])
        w = torch.einsum("l,blr->br", right, prod[batch:])
        log_scale = logs[:batch] + logs[batch:]
    values = torch.einsum("bl,lcr,br->bc", u, output_core, w)
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
