"""TT-layers: a tensor-train matrix in place of a dense weight (Novikov et al. 2015).

A dense ``in x out`` weight with ``in = m_1...m_d`` and ``out = n_1...n_d`` is stored as cores
G_k of shape (r_{k-1}, m_k, n_k, r_k), r_0 = r_d = 1::

    W[(j_1..j_d), (i_1..i_d)] = G_1[:, i_1, j_1, :] G_2[:, i_2, j_2, :] ... G_d[:, i_d, j_d, :]

The layer never builds W unless that is cheapest (as for 4096 -> 16): the input meets groups of
neighbouring cores, one matrix product each, as :func:`tnkd.tn.tt_matrix.tt_linear` plans them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tnkd.registry import RecordsInitArgs
from tnkd.students.base import Student, check_positive_int
from tnkd.tn.decompositions import check_factors, check_ranks, factorize, tt_matrix_svd, tt_to_full
from tnkd.tn.graph import TNGraph, connect, make_node
from tnkd.tn.planner import Plan, plan
from tnkd.tn.tt_matrix import TTPlan, plan_for, tt_linear, tt_matvec


def _factors(
    in_features: int,
    out_features: int,
    in_factors: Sequence[int] | None,
    out_factors: Sequence[int] | None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The checked (in, out) factorisations: as given, or four as-equal-as-possible factors."""
    m = factorize(in_features, 4) if in_factors is None else in_factors
    m = check_factors(m, in_features, "TTLinear in_factors")
    n = factorize(out_features, len(m)) if out_factors is None else out_factors
    return m, check_factors(n, out_features, "TTLinear out_factors")


class TTLinear(RecordsInitArgs, nn.Module):
    """A drop-in replacement of ``nn.Linear(in_features, out_features)`` with a TT-matrix weight.

    Args:
        in_features: input size, ``prod(in_factors)``.
        out_features: output size, ``prod(out_factors)``.
        in_factors: (m_1, ..., m_d); default: ``factorize(in_features, 4)``.
        out_factors: (n_1, ..., n_d), same length; default: ``factorize(out_features, d)``.
        ranks: inner TT-ranks (r_1..r_{d-1}), or one int for all.
        bias: learn an additive bias.

    The forward pass's plan is cached per batch size (``plans`` counts the plannings; speed:
    ``benchmarks/tt_layers.py``); :meth:`to_graph` is the same network for the generic
    contraction engine (tested equal).

    Example:
        >>> layer = TTLinear(4096, 16, (8, 8, 8, 8), (2, 2, 2, 2), ranks=8, bias=False)
        >>> layer(torch.rand(5, 4096)).shape, layer.weight_parameter_count()
        (torch.Size([5, 16]), 2304)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        in_factors: Sequence[int] | None = None,
        out_factors: Sequence[int] | None = None,
        ranks: int | Sequence[int] = 8,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("TTLinear in_features", in_features)
        self.out_features = check_positive_int("TTLinear out_features", out_features)
        m, n = _factors(in_features, out_features, in_factors, out_factors)
        if len(m) != len(n):
            raise ValueError(f"TTLinear in_factors {m} and out_factors {n} need the same length")
        d = len(m)
        inner = check_ranks(ranks, d - 1, "TTLinear")
        self.in_factors, self.out_factors, self.ranks = m, n, tuple(inner)
        full = [1, *inner, 1]
        # Var(W_ij) = prod_k Var(G_k) * prod_k r_k; aim at 1 / in_features like a dense layer.
        std = (1.0 / (in_features * math.prod(inner))) ** (1 / (2 * d))
        self.cores = nn.ParameterList(
            nn.Parameter(torch.randn(full[k], m[k], n[k], full[k + 1]) * std) for k in range(d)
        )
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._plans: dict[tuple, TTPlan] = {}
        self.plans = 0

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        in_factors: Sequence[int] | None = None,
        out_factors: Sequence[int] | None = None,
        ranks: int | Sequence[int] | None = None,
        tolerance: float | None = None,
    ) -> TTLinear:
        """Start from a trained ``(out, in)`` weight by TT-SVD (ranks from the unfoldings if not given).

        Ranks above what the factor shapes allow are capped there (see ``layer.ranks``); the
        global random state is left as it was.
        """
        out_features, in_features = weight.shape
        m, n = _factors(in_features, out_features, in_factors, out_factors)
        cores = tt_matrix_svd(weight.detach(), m, n, ranks=ranks, tolerance=tolerance)
        kept = [int(c.shape[-1]) for c in cores[:-1]]
        # the layer's random start is overwritten below: leave the global random state be
        with torch.random.fork_rng(devices=[]):
            layer = cls(in_features, out_features, m, n, kept, bias is not None)
        layer = layer.to(weight.dtype)
        with torch.no_grad():
            for p, c in zip(layer.cores, cores, strict=True):
                p.copy_(c)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: object) -> TTLinear:
        """:meth:`from_dense` of an ``nn.Linear`` (its weight and bias)."""
        return cls.from_dense(linear.weight, linear.bias, **kwargs)  # type: ignore[arg-type]

    def weight_parameter_count(self) -> int:
        """Scalars in the TT cores (without the bias)."""
        return sum(c.numel() for c in self.cores)

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) matrix the cores represent (for tests and inspection; not used in forward)."""
        d = len(self.cores)
        w = tt_to_full(list(self.cores))  # (m1, n1, m2, n2, ...)
        w = w.permute(*[2 * k + 1 for k in range(d)], *[2 * k for k in range(d)])
        return w.reshape(self.out_features, self.in_features)

    def to_graph(self) -> TNGraph:
        """The layer for one input: cores in a row, the reshaped input on their ``in`` legs."""
        d = len(self.cores)
        nodes = []
        for k, core in enumerate(self.cores):  # the end cores without their outer ranks (1)
            axes = ["left"] * (k > 0) + ["in", "out"] + ["right"] * (k < d - 1)
            core = core[0] if k == 0 else core
            nodes.append(make_node(core[..., 0] if k == d - 1 else core, f"core_{k}", axes))
        for k in range(d - 1):
            connect(nodes[k], "right", nodes[k + 1], "left", name=f"rank_{k + 1}")
        x = make_node(self.in_factors, "x", [f"in_{k}" for k in range(d)])
        for k in range(d):
            connect(nodes[k], "in", x, f"in_{k}", name=f"in_{k}")
            nodes[k]["out"].set_name(f"out_{k}")
        return TNGraph(
            nodes=[*nodes, x],
            input_nodes=["x"],
            output_edges=[nodes[k]["out"] for k in range(d)],
            positions={f"core_{k}": (float(k), 0.0) for k in range(d)},
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` for ``x`` of shape (..., in_features), without forming W."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"TTLinear expects {self.in_features} input features, but got {x.shape[-1]}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.portable:  # tensor operations only (tnkd.export.portable)
            return tt_matvec(x2, list(self.cores), self.bias).reshape(*lead, self.out_features)
        y = tt_linear(x2, list(self.cores), self.bias, self.matvec_plan(x2))
        return y.reshape(*lead, self.out_features)

    #: contract with the portable engine (see :func:`tnkd.export.portable`)
    portable = False

    def plan(self, device: torch.device | str | None = None) -> Plan:
        """Which engine contracts this layer's graph on ``device`` (default: its cores'), and why.

        Example:
            >>> TTLinear(64, 64, in_factors=(8, 8), out_factors=(8, 8), ranks=4).plan().engine
            'tt_matrix'
        """
        return plan(
            self.to_graph().spec(),
            "portable" if self.portable else "auto",
            self.cores[0].device if device is None else device,
        )

    def matvec_plan(self, x: torch.Tensor) -> TTPlan:
        """The contraction plan for a (batch, in_features) input, planned once per batch size."""
        cores = list(self.cores)
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *cores))
        key = (x.shape[0], training, x.device.type)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = plan_for(x, cores, training)
            self.plans += 1
        return plan

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"{self.in_features} -> {self.out_features}, in_factors={self.in_factors}, "
            f"out_factors={self.out_factors}, ranks={self.ranks}, bias={self.bias is not None}"
        )


class TTMLP(Student):
    """An MLP whose dense layers are TT-layers: a compressed student made from a trained MLP teacher.

    Its TT-layers run :class:`TTLinear`'s planned contraction; ``benchmarks/ttmlp_epoch.py``
    times an epoch.

    Args:
        layers: the network, an ``nn.Sequential`` of ``Flatten``, ``TTLinear``/``Linear``,
            activations and dropout.
        num_inputs: input size.
        num_classes: output size.
    """

    def __init__(self, layers: nn.Sequential, num_inputs: int, num_classes: int) -> None:
        super().__init__()
        self.layers = layers
        self.num_inputs, self.num_classes = num_inputs, num_classes

    @classmethod
    def from_mlp(
        cls,
        mlp: nn.Sequential,
        ranks: int | Sequence[int] | None = 8,
        tolerance: float | None = None,
        num_factors: int = 4,
        keep_dense_below: int = 64,
    ) -> TTMLP:
        """Replace each ``nn.Linear`` of a trained MLP by a TT-layer started by TT-SVD.

        Layers whose input or output has fewer than ``keep_dense_below`` units (the class
        layer, say) stay dense; the others get factorisations from :func:`factorize`
        (``num_factors`` factors each) and TT-SVD ranks ``ranks`` (or from ``tolerance``).
        """
        new = []
        for layer in mlp:
            wide = isinstance(layer, nn.Linear)
            if wide and min(layer.in_features, layer.out_features) >= keep_dense_below:
                m = factorize(layer.in_features, num_factors)  # out_factors: as many (default)
                rank = None if tolerance is not None else ranks
                new.append(
                    TTLinear.from_linear(layer, in_factors=m, ranks=rank, tolerance=tolerance)
                )
            else:
                new.append(copy.deepcopy(layer).train())  # never share weights with the teacher
        linears = [m for m in mlp if isinstance(m, nn.Linear)]
        return cls(nn.Sequential(*new), linears[0].in_features, linears[-1].out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.layers(self.flatten_input(x))

    def tt_layers(self) -> list[TTLinear]:
        """The TT-layers, in order."""
        return [m for m in self.layers if isinstance(m, TTLinear)]

    def to_graph(self) -> TNGraph:
        """The first TT-layer's diagram (the layers are separated by nonlinearities)."""
        return self.tt_layers()[0].to_graph()


class TTMLPFromTeacher(TTMLP):
    """:meth:`TTMLP.from_mlp` of a saved MLP teacher, as a class a YAML config can name.

    Args:
        teacher_checkpoint: the teacher file written by ``TeacherModule(export_path=...)`` (an
            :class:`tnkd.teachers.MLP`, or any ``nn.Sequential`` of linear layers).
        ranks, tolerance, num_factors, keep_dense_below: as in :meth:`TTMLP.from_mlp`.

    The TT-SVD start is recomputed from the teacher file each time the student is built; when
    a run resumes from a checkpoint, the checkpoint's weights then replace it.
    """

    def __init__(
        self,
        teacher_checkpoint: str,
        ranks: int | Sequence[int] | None = 8,
        tolerance: float | None = None,
        num_factors: int = 4,
        keep_dense_below: int = 64,
    ) -> None:
        from tnkd.teachers import load_teacher

        mlp = load_teacher(teacher_checkpoint)
        if not isinstance(mlp, nn.Sequential):
            raise ValueError(
                f"TTMLPFromTeacher needs an MLP teacher (an nn.Sequential of linear layers), but "
                f"{teacher_checkpoint} holds a {type(mlp).__name__}; train one with "
                f"configs/mnist/teacher_mlp.yaml"
            )
        built = TTMLP.from_mlp(mlp, ranks, tolerance, num_factors, keep_dense_below)
        super().__init__(built.layers, built.num_inputs, built.num_classes)

    def checkpoint_spec(self) -> dict[str, Any]:
        """Described as the :class:`TTMLP` it is, so loading never reads the teacher file again."""
        args = {name: getattr(self, name) for name in ("layers", "num_inputs", "num_classes")}
        return {"class_path": "tnkd.students.TTMLP", "init_args": args}
