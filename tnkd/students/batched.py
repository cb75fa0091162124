"""Several students of one shape as one model: a leading member index on every parameter.

A grid trains many small students of the same shape (seeds x divergences x temperatures).
Stacked, M members share every kernel launch: ``model(x)`` returns ``(M, batch, C)`` logits,
member k's from member k's parameters only, so a sum of per-member losses gives each member
exactly its own gradient, and one Adam(W) over the stacked parameters (elementwise) is M
separate optimizers.

* :class:`BatchedMPS`: members of one :class:`~tnkd.students.mps.MPSClassifier` shape with a
  parameter-free feature map, contracted by the chain engine with a member axis
  (:func:`~tnkd.tn.chain.contract_chain`: the M left halves and M right halves as one scan of
  2M chains instead of M scans of 2), each member's output core closing its two halves.
* :class:`MemberList`: any other student: the members in a list, run one after the other in
  the same step (the teacher, data and training loop are still shared).

:func:`batch_students` picks one. :meth:`member` gives member k back as an ordinary student
(its own class, parameters copied), e.g. to save or test it alone.

Example:
    >>> import torch
    >>> from tnkd.students import MPSClassifier
    >>> members = [MPSClassifier(16, 3, bond_dim=4) for _ in range(3)]
    >>> model = batch_students(members)
    >>> x = torch.rand(5, 16)
    >>> model(x).shape
    torch.Size([3, 5, 3])
    >>> bool(torch.allclose(model(x)[1], members[1](x), atol=1e-5))
    True
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tnkd.students.base import check_choice, scaled_values
from tnkd.students.mps import MPSClassifier
from tnkd.tn.chain import contract_chain
from tnkd.tn.planner import engine_and_kernel
from tnkd.tn.stable import direction_logits

#: the parameters an MPSClassifier member stacks (``log_logit_scale`` only with normalized output)
MPS_PARAMETERS = ("cores", "left", "right", "output_core", "log_logit_scale")


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def check_same_shape(members: Sequence[nn.Module]) -> None:
    """Raise a one-line ``ValueError`` unless all members have one class and one parameter shape.

    Students that record their constructor arguments (``init_args``) must also agree on them.
    """
    if not members:
        raise ValueError("a batched model needs at least one member, but got none")
    first = members[0]
    for k, other in enumerate(members[1:], start=1):
        if type(other) is not type(first):
            raise ValueError(
                "batched members must be one student shape, but member 0 is a "
                f"{type(first).__name__} and member {k} a {type(other).__name__}"
            )
        args = getattr(first, "init_args", None), getattr(other, "init_args", None)
        shapes = _shapes(first), _shapes(other)
        for what, (a, b) in (("student arguments", args), ("parameter shapes", shapes)):
            if isinstance(a, dict) and isinstance(b, dict) and a != b:
                diff = sorted(key for key in {*a, *b} if a.get(key) != b.get(key))
                shown = ", ".join(f"{key}: {a.get(key)!r} vs {b.get(key)!r}" for key in diff)
                raise ValueError(
                    f"batched members must have the same {what}, but member 0 and member {k} "
                    f"differ in {shown}"
                )


class _Batched(nn.Module):
    """What both batched models have: the members' count, sizes and constructor arguments."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        check_same_shape(members)
        self.num_members = len(members)
        self.num_classes = getattr(members[0], "num_classes", None)
        self.num_inputs = getattr(members[0], "num_inputs", None)
        self._member_args = dict(getattr(members[0], "init_args", {}) or {})

    @property
    def init_args(self) -> dict[str, Any]:
        """The members' constructor arguments (one shape)."""
        return dict(self._member_args)


class BatchedMPS(_Batched):
    """M MPS classifiers of one shape, each parameter stacked along a leading member index.

    ``cores`` is (M, N, D, d, D), ``left``/``right`` (M, D), ``output_core`` (M, D, C, D),
    ``log_logit_scale`` (M,); member k's logits equal ``members[k](x)`` up to rounding (same
    kernel, same renormalised log-scale).

    Args:
        members: MPSClassifier students of one shape whose feature map has no parameters
            (their parameters are copied; the members themselves are not kept).

    Raises:
        ValueError: members of different shapes or arguments, a learnable feature map, or
            members on another engine than the chain's.
    """

    def __init__(self, members: Sequence[MPSClassifier]) -> None:
        super().__init__(members)
        template = members[0]
        if not isinstance(template, MPSClassifier):
            raise ValueError(
                f"BatchedMPS stacks MPSClassifier members, but got {type(template).__name__}"
            )
        why_not = BatchedMPS.refusal(template)
        if why_not:
            raise ValueError(f"BatchedMPS {why_not}; use MemberList")
        # the template keeps the shared, parameter-free parts: input flattening, feature map
        self.template = copy.deepcopy(template)
        for name in MPS_PARAMETERS:
            if hasattr(template, name):
                stacked = torch.stack([getattr(m, name).detach() for m in members]).clone()
                self.register_parameter(name, nn.Parameter(stacked))
                delattr(self.template, name)  # the template keeps no parameters of its own

    @staticmethod
    def refusal(member: MPSClassifier) -> str | None:
        """Why members like ``member`` cannot be stacked, or None (the type aside)."""
        if any(True for _ in member.feature_map.parameters()):
            name = type(member.feature_map).__name__
            return f"needs a feature map without parameters, but got {name} with parameters"
        if member.engine != "chain":
            return f"runs the chain engine, but the members run the {member.engine} engine"
        return None

    def member(self, k: int) -> MPSClassifier:
        """Member ``k`` as an ordinary MPSClassifier (parameters copied)."""
        out = copy.deepcopy(self.template)
        for name in MPS_PARAMETERS:
            if hasattr(self, name):
                out.register_parameter(name, nn.Parameter(getattr(self, name)[k].detach().clone()))
        out._compiled = None
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (M, batch, C)."""
        t = self.template
        features = t.feature_map(t.flatten_input(x)).to(self.cores.dtype)
        cores = self.cores.expand(-1, t.num_sites, -1, -1, -1)  # uniform: one shared core
        kernel = engine_and_kernel(t.method)[1]  # the chain kernel the members' method names
        values, log_scale = contract_chain(
            self.left, cores, self.right, features, self.output_core, t.label_position, kernel
        )
        if t.output == "raw":
            return scaled_values(values, log_scale)
        return direction_logits(values, self.log_logit_scale.view(-1, 1, 1))


class MemberList(_Batched):
    """Any students of one shape, run one after the other: ``(M, batch, C)`` logits.

    The fallback of :func:`batch_students` for students :class:`BatchedMPS` does not cover
    (TT networks, trees, PEPS, learnable feature maps...).
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__(members)
        self.members = nn.ModuleList(members)

    def member(self, k: int) -> nn.Module:
        """Member ``k`` (a copy)."""
        return copy.deepcopy(self.members[k])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (M, batch, C)."""
        return torch.stack([m(x) for m in self.members])


def batch_students(members: Sequence[nn.Module], kind: str = "auto") -> nn.Module:
    """M students of one shape as one model whose ``forward`` returns (M, batch, C) logits.

    Args:
        members: the students, each built as its separate run builds it (seed, then factory).
        kind: ``"auto"`` (:class:`BatchedMPS` where it applies, else :class:`MemberList`),
            ``"batched"`` or ``"list"``.

    Returns:
        The batched model (with ``num_members``, ``num_classes`` and ``member(k)``).
    """
    check_choice("kind", kind, ("auto", "batched", "list"))
    first = members[0] if members else None  # the batched model checks the members
    fits = type(first) is MPSClassifier and not BatchedMPS.refusal(first)
    if kind == "batched" or (kind == "auto" and fits):
        return BatchedMPS(members)  # type: ignore[arg-type]
    return MemberList(members)
