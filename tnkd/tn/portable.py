"""The portable engine: contractions written in tensor operations only, for export.

``torch.export`` and the ONNX exporter capture a program as a fixed graph of tensor operations:
a Python branch on a tensor's value (the fast engines check their renormalisation range, and
choose kernels) or a call into tnkd's C++ kernels cannot be captured. The portable engine
computes the same contraction, with its log-scale, using only shape-static loops:

* a **chain** (:func:`chain_log_contract`): every site's transfer matrix
  ``M_i = sum_s x_i[s] A_i[:, s, :]`` at once, then products of neighbouring pairs, level by
  level (``ceil(log2 N)`` levels of one batched matmul each), every product divided by its
  largest magnitude and the logarithm of that kept per sample. A 784-site chain is 10 levels,
  its values finite for any feature map. The two halves either side of the label are joined
  by the label core.
* **any other graph**: the stable engine (:class:`~tnkd.tn.stable.StableNetwork`) with
  ``every=True``: its grouped pairwise steps, each rescaled, and no range check.
* a **TT-matrix** (:func:`tt_matvec`): one einsum per core, no plan per batch size.

The contractions return ``(values, log_scale)`` with ``f(x) = values * exp(log_scale)``, as every engine
does (:mod:`tnkd.tn.planner`); their results equal the other engines' to rounding (tested
against the dense ``opt_einsum`` reference). The planner never picks this engine by itself:
:func:`tnkd.export.portable` switches a student to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _divided(tensor: torch.Tensor, log: torch.Tensor, dims: tuple[int, ...]):
    """``tensor`` divided by its largest magnitude over ``dims``; the logarithm added to ``log``."""
    scale = tensor.detach().abs().amax(dim=dims, keepdim=True)
    scale = scale.clamp_min(torch.finfo(tensor.dtype).tiny)
    return tensor / scale, log + torch.log(scale.reshape(log.shape))


def _product(mats: torch.Tensor, logs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, n, D, D)`` matrices multiplied in order, by pairs, level by level; ``(B, D, D)``, ``(B,)``."""
    batch, n, bond = mats.shape[0], mats.shape[1], mats.shape[-1]
    if n == 0:
        eye = torch.eye(bond, dtype=mats.dtype, device=mats.device)
        return eye.expand(batch, bond, bond), logs.new_zeros(batch)
    while n > 1:
        if n % 2:  # an identity closes the odd one out (a static shape: no branch on values)
            eye = torch.eye(bond, dtype=mats.dtype, device=mats.device)
            mats = torch.cat([mats, eye.expand(batch, 1, bond, bond)], 1)
            logs = torch.cat([logs, logs.new_zeros(batch, 1)], 1)
            n += 1
        pairs = mats.reshape(batch, n // 2, 2, bond, bond)
        mats = pairs[:, :, 0] @ pairs[:, :, 1]
        logs = logs.reshape(batch, n // 2, 2).sum(-1)
        mats, logs = _divided(mats, logs, (-2, -1))
        n //= 2
    return mats[:, 0], logs[:, 0]


def chain_log_contract(
    left: torch.Tensor,
    cores: torch.Tensor,
    right: torch.Tensor,
    features: torch.Tensor,
    output_core: torch.Tensor,
    position: int,
    output_features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain ``left - A_0 .. A_{p-1} - O - A_p .. A_{N-1} - right`` by log-depth products.

    Arguments as :func:`tnkd.tn.chain.contract_chain`: ``left``, ``right`` (D,) boundaries,
    ``cores`` (N, D, d, D), ``features`` (B, N, d), ``output_core`` (D, C, D) (or (D, d, C, D)
    with ``output_features`` (B, d) for a label core that reads an input), ``position`` p.

    Returns:
        ``values`` (B, C) of largest magnitude 1 per sample, and ``log_scale`` (B,).
    """
    mats = torch.einsum("bnd,nidj->bnij", features, cores).contiguous()
    logs = features.new_zeros(features.shape[:2])
    mats, logs = _divided(mats, logs, (-2, -1))
    before, log_before = _product(mats[:, :position], logs[:, :position])
    after, log_after = _product(mats[:, position:], logs[:, position:])
    u = torch.einsum("i,bij->bj", left, before)
    w = torch.einsum("bij,j->bi", after, right)
    # pairwise einsums only: torch.einsum plans three operands with opt_einsum, on int(batch)
    if output_features is None:
        joined = torch.einsum("bl,lcr->bcr", u, output_core)
    else:
        joined = torch.einsum("bl,lscr->bscr", u, output_core)
        joined = torch.einsum("bscr,bs->bcr", joined, output_features)
    values = torch.einsum("bcr,br->bc", joined, w)
    return _divided(values, log_before + log_after, (1,))


def tt_matvec(
    x: torch.Tensor, cores: Sequence[torch.Tensor], bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T + bias`` for the TT-matrix W of ``cores`` (r, m_k, n_k, r'), one core a step.

    The portable twin of :func:`tnkd.tn.tt_matrix.tt_linear` (which merges cores and orders
    the steps per batch size): the input (B, m_1 ... m_d) meets core k, which trades the index
    m_k for n_k; d einsums with no plan, so the captured program serves every batch size.
    """
    batch = x.shape[0]
    state = x.reshape(batch, 1, -1)  # (B, r_0, m_1 ... m_d)
    for core in cores:
        r, m, _, r_next = core.shape
        state = torch.einsum("brmx,rmns->bsxn", state.reshape(batch, r, m, -1), core)
        state = state.reshape(batch, r_next, -1)
    out = state.reshape(batch, -1)
    return out if bias is None else out + bias
