"""The portable engine: contractions written in tensor operations only, for export.

``torch.export`` and the ONNX exporter capture a program as a fixed graph of tensor operations:
a Python branch on a tensor's value (the fast engines check their renormalisation range, and
choose kernels) or a call into tnkd's C++ kernels cannot be captured. The portable engine
computes the same contraction, with its log-scale, using only shape-static loops:

* a **chain** (:func:`chain_log_contract`): two boundary vectors swept in from the ends to the
  label core, one site a step, both halves in one batched step (:func:`_step`), rescaled every
  :data:`RESCALE_EVERY` sites, so a 784-site chain stays finite for any feature map.
* **any other graph**: the stable engine (:class:`~tnkd.tn.stable.StableNetwork`) with
  ``every=True``: its grouped pairwise steps, each rescaled, and no range check.
* a **TT-matrix** (:func:`~tnkd.tn.tt_matrix.tt_matvec`): one einsum per core.

A student switched to this engine (:meth:`tnkd.students.graph.GraphStudent`'s ``portable``, as
:func:`tnkd.export.portable` does; the planner never picks it) contracts in float64 and returns
its own dtype, so an export differs from the trained student by that student's own rounding
alone. The contractions return ``(values, log_scale)`` as every engine does
(:mod:`tnkd.tn.planner`), tested against the dense ``opt_einsum`` reference. What was tried
first, and the rounding measured: ``docs/benchmarks/inference.md``.
"""

from __future__ import annotations

import torch

from tnkd.tn.chain import _close
from tnkd.tn.stable import rescaled

#: the sweeps divide their vectors by their largest magnitude every so many sites (a fixed
#: schedule: no branch on values); a site multiplies the largest magnitude by at most
#: ``D d max|x| max|A|``, so 4 sites stay far from float32's range for trained cores
RESCALE_EVERY = 4


def _step(state: torch.Tensor, core: torch.Tensor, repeated: torch.Tensor) -> torch.Tensor:
    """``sum_{i,s} state_i x_s A_isj``: ``state @ A`` with A as (D, d D), times x, summed over s.

    ``repeated`` is x repeated to (..., d D) (each ``x_s`` D times); the sum over s is a product
    with D x D identities stacked d times (ONNX Runtime runs matrix products fast, broadcasts
    and ``Expand`` slowly).
    """
    bond = core.shape[-2]
    sums = torch.eye(bond, dtype=core.dtype, device=core.device).repeat(core.shape[-1] // bond, 1)
    return (state @ core * repeated) @ sums


def _half(cores: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cores (n, D, d, D) as (n, D, d D); features (B, n, d) repeated to (B, n, d D) by a product."""
    n, bond, d, _ = cores.shape
    ones = torch.ones(1, bond, dtype=features.dtype, device=features.device)
    repeat = torch.kron(torch.eye(d, dtype=features.dtype, device=features.device), ones)
    return cores.reshape(n, bond, d * bond), features @ repeat


def chain_log_contract(  # the arguments of tnkd.tn.chain.contract_chain
    left: torch.Tensor, cores: torch.Tensor, right: torch.Tensor, features: torch.Tensor,
    output_core: torch.Tensor, position: int, output_features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain ``left - A_0 .. A_{p-1} - O - A_p .. A_{N-1} - right`` by two boundary sweeps.

    Arguments as :func:`tnkd.tn.chain.contract_chain`'s for one chain (no member axis).

    Returns:
        ``values`` (B, C) of largest magnitude 1 per sample, and ``log_scale`` (B,).
    """
    batch, num, _ = features.shape
    # the right half is read from the right end, each core transposed (i, s, j) -> (j, s, i),
    # so that both halves are the same step and their common length runs as one batched product
    halves = [
        _half(cores[:position], features[:, :position]),
        _half(cores[position:].flip(0).transpose(1, 3), features[:, position:].flip(1)),
    ]
    common = min(position, num - position)
    paired = torch.stack([halves[0][0][:common], halves[1][0][:common]], 1)  # (k, 2, D, d D)
    repeated = torch.stack([halves[0][1][:, :common], halves[1][1][:, :common]])  # (2, B, k, d D)
    state = torch.stack([left, right])[:, None, :].expand(2, batch, cores.shape[-1])
    logs = features.new_zeros(2, batch)
    for k in range(common):
        state = _step(state, paired[k], repeated[:, :, k])
        if (k + 1) % RESCALE_EVERY == 0:  # each half by its own largest magnitude
            state, log, _ = rescaled(state, (-1,))
            logs = logs + log.squeeze(-1)
    # the rest of the longer half, alone
    longer = 0 if position > common else 1
    (rest_cores, rest_features), ends, logs = halves[longer], list(state), list(logs)
    for k in range(common, max(position, num - position)):
        ends[longer] = _step(ends[longer], rest_cores[k], rest_features[:, k])
        if (k + 1) % RESCALE_EVERY == 0:
            ends[longer], log, _ = rescaled(ends[longer], (-1,))
            logs[longer] = logs[longer] + log.squeeze(-1)
    # the label core between the ends, as the chain engine joins them (one member)
    ends, logs = torch.stack(ends).transpose(1, 2)[:, None], torch.stack(logs)[:, None]
    values, log_scale = _close(ends, output_core[None], output_features, logs)
    return values[0], log_scale[0]
