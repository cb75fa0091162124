"""Shrink a trained student the tensor-network way: canonical form, then SVD truncation of every bond.

Train wide, cut, let the teacher repair: :func:`truncate_student` brings an
:class:`~tnkd.students.mps.MPSClassifier`, a :class:`~tnkd.students.tt_network.TTNetwork` or a
:class:`~tnkd.students.tree.TreeClassifier` into canonical form about its label node
(:mod:`tnkd.tn.canonical`), cuts every bond to ``bond_dim`` singular values and/or a relative
``tolerance``, and returns a smaller student *of the same class* that trains on (bonds whose kept
rank is below the new bond dimension are zero-padded, and the padding stays at zero).
:func:`bond_spectra` gives every bond's singular values and :func:`entanglement_entropies` the
entropy -sum p log p, p = s^2 / sum s^2, per bond: the bonds with little entropy are the ones that
can be cut. Tensors shared between sites (uniform MPS, equal-core TT networks) are refused: a
canonical form makes them differ; a PEPS has loops and no canonical form. :class:`TruncatedMPS`
does the cut on construction, from a checkpoint, for YAML configs.

Example:
    >>> mps = MPSClassifier(num_sites=10, num_classes=3, bond_dim=8)
    >>> small, report = truncate_student(mps, bond_dim=4)
    >>> small.bond_dim, type(small).__name__, report.error_bound < 1
    (4, 'MPSClassifier', True)
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tnkd.feature_maps import FeatureMap
from tnkd.students.base import Student
from tnkd.students.graph import GraphStudent
from tnkd.students.mps import MPSClassifier
from tnkd.students.tree import TreeClassifier
from tnkd.students.tt_network import TTNetwork
from tnkd.tn.canonical import Discarded, Truncation, entanglement_entropy, network_of, truncate


@dataclass
class TruncationReport(Discarded):
    """What a truncation kept and cut (see :class:`tnkd.tn.canonical.Truncation`).

    ``ranks``, ``discarded``, ``spectra`` and ``chain`` are the truncation's; ``params_before``
    and ``params_after`` count the trainable parameters of the two students.
    """

    ranks: dict[str, int]
    discarded: dict[str, float]
    spectra: dict[str, torch.Tensor]
    params_before: int
    params_after: int
    chain: bool = True


#: the families truncate_student rebuilds (a subclass, e.g. TruncatedMPS, as its family)
FAMILIES = (MPSClassifier, TTNetwork, TreeClassifier)


def _network(student: Student) -> tuple[list[torch.Tensor], list[tuple[str, ...]], list[str], int]:
    """(tensors, indices, node names, centre) of a student's graph without its input nodes."""
    if isinstance(student, MPSClassifier) and student.uniform:
        raise ValueError(
            "a uniform MPS shares one core between all sites; its canonical form has different "
            "cores: truncate an MPS with uniform=False"
        )
    if isinstance(student, TTNetwork) and student.equal_cores:
        raise ValueError(
            "a TT network with equal cores shares its inner core; its canonical form has "
            "different cores: truncate a TTNetwork with equal_cores=False"
        )
    if not isinstance(student, GraphStudent):
        raise ValueError(
            f"truncation supports MPSClassifier, TTNetwork and tree graph students, but got "
            f"{type(student).__name__}"
        )
    graph = student.to_graph()
    tensors, indices, names = network_of(graph)
    label = graph.spec().output_indices[0]
    center = next(k for k, idx in enumerate(indices) if label in idx)
    return tensors, indices, names, center


def _pad(value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    out = value.new_zeros(shape)
    out[tuple(slice(0, s) for s in value.shape)] = value
    return out


def _like(student: Student, width: int) -> GraphStudent:
    """A student of ``student``'s family and arguments with bond dimension (TT-rank) ``width``."""
    family = next((c for c in FAMILIES if isinstance(student, c)), None)
    if family is None:
        raise ValueError(
            f"truncation of {type(student).__name__} is not supported: use MPSClassifier, "
            "TTNetwork or TreeClassifier"
        )
    accepted = inspect.signature(family).parameters
    args = {k: v for k, v in student.init_args.items() if k in accepted}
    args["feature_map"] = copy.deepcopy(student.feature_map)  # learned maps keep what they learned
    args["rank" if family is TTNetwork else "bond_dim"] = width
    return family(**args)


def truncate_student(
    student: Student, bond_dim: int | None = None, tolerance: float | None = None
) -> tuple[Student, TruncationReport]:
    """Canonicalise a student about its label node and cut every bond by SVD.

    Args:
        student: an :class:`MPSClassifier` (not uniform), a :class:`TTNetwork` (different
            cores) or a :class:`TreeClassifier`.
        bond_dim: keep at most this many singular values per bond; the new student's bond
            dimension (TT rank). Default: the largest rank kept.
        tolerance: also cut each bond's smallest singular values while their squared sum stays
            below ``tolerance^2`` times the bond's total.

    Returns:
        The truncated student (same class, same feature map, output mode and logit scale; the
        scale canonicalisation takes out is spread evenly over the tensors, so its raw output is
        the truncated function itself) and a :class:`TruncationReport`. With ``bond_dim`` at
        least the student's and no tolerance the new student computes the same function (up to
        rounding).
    """
    tensors, indices, names, center = _network(student)
    cut: Truncation = truncate(tensors, indices, center, rank=bond_dim, tolerance=tolerance)
    width = bond_dim if bond_dim is not None else max(cut.ranks.values(), default=1)
    factor = math.exp(cut.log_norm / len(cut.tensors))  # the scale, shared evenly
    values = {name: t * factor for name, t in zip(names, cut.tensors, strict=True)}
    new = _like(student, width).to(student._dtype())
    shapes = {name: tuple(t.shape) for name, t in new.node_tensors().items()}
    new.load_node_tensors({name: _pad(t, shapes[name]) for name, t in values.items()})
    if hasattr(student, "log_logit_scale") and hasattr(new, "log_logit_scale"):
        with torch.no_grad():
            new.log_logit_scale.copy_(student.log_logit_scale)
    report = TruncationReport(
        ranks=cut.ranks,
        discarded=cut.discarded,
        spectra=cut.spectra,
        params_before=student.parameter_count(),
        params_after=new.parameter_count(),
        chain=cut.chain,
    )
    return new, report


def bond_spectra(student: Student) -> dict[str, torch.Tensor]:
    """Each bond's singular values (unit-norm network), in canonical-sweep order; nothing is cut."""
    tensors, indices, _, center = _network(student)
    return truncate(tensors, indices, center).spectra


def chain_bond_spectra(student: MPSClassifier) -> list[torch.Tensor]:
    """An MPS's bond spectra, left to right.

    Bond k sits between the k-th and (k+1)-th tensors of
    ``left, site_0, ..., output, ..., site_{N-1}, right``.
    """
    spectra = bond_spectra(student)
    return [spectra[f"bond_{k}"] for k in range(len(spectra))]


def entanglement_entropies(spectra: dict[str, torch.Tensor] | list[torch.Tensor]) -> list[float]:
    """Entanglement entropy of each bond's spectrum (see :func:`tnkd.tn.canonical.entanglement_entropy`)."""
    values = spectra.values() if isinstance(spectra, dict) else spectra
    return [entanglement_entropy(s) for s in values]


def load_student_state(checkpoint: str | Path, prefix: str = "student.") -> dict[str, torch.Tensor]:
    """A student's state dict from a Lightning checkpoint (keys under ``prefix``) or a plain one."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass a run's last.ckpt or a state dict file"
        )
    try:
        data: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"checkpoint {path} could not be read as tensors ({type(err).__name__}); pass a "
            "run's .ckpt or a state dict"
        ) from err
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds no state dict")
    return student_state(state, prefix)


def student_state(state: dict[str, Any], prefix: str = "student.") -> dict[str, Any]:
    """The entries of a module's state dict under ``prefix``, without it (all of them if none)."""
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


class TruncatedMPS(MPSClassifier):
    """An :class:`MPSClassifier` started from a wider trained MPS, truncated by SVD.

    Loads the wide MPS from ``checkpoint`` (its bond dimension read from the file), truncates every
    bond to ``bond_dim`` (:func:`truncate_student`; ``truncation`` holds the report) and starts
    from the result. Its checkpoints are described as a plain ``MPSClassifier`` of the new
    ``bond_dim`` (:meth:`checkpoint_spec`), so loading them never reads the source again. In YAML
    (a fine-tuning run)::

        student:
          class_path: tnkd.students.TruncatedMPS
          init_args: {checkpoint: runs/checkpoints/mnist-mps32/last.ckpt, bond_dim: 8,
                      num_sites: 196, pool: 2, num_classes: 10, feature_map: linear}

    Args:
        checkpoint: a Lightning checkpoint of a distillation run, or an MPS state dict file.
        bond_dim: the new bond dimension.
        tolerance: also cut singular values by relative tolerance (see :func:`truncate_student`).
        num_sites, num_classes, feature_map, label_position, output, method, pool, patch: as
            for the wide MPS (see :class:`MPSClassifier`).
    """

    def __init__(
        self,
        checkpoint: str,
        bond_dim: int,
        num_sites: int,
        num_classes: int,
        tolerance: float | None = None,
        feature_map: str | dict | FeatureMap = "linear",
        label_position: int | None = None,
        output: str = "normalized",
        method: str = "auto",
        pool: int = 1,
        patch: int = 1,
    ) -> None:
        state = load_student_state(checkpoint)
        if "cores" not in state or state["cores"].ndim != 4:
            raise ValueError(f"checkpoint {checkpoint} holds no MPSClassifier (no 4-way 'cores')")
        args = self.checkpoint_spec()["init_args"]  # the arguments as an MPSClassifier's
        wide = MPSClassifier(**{**args, "bond_dim": int(state["cores"].shape[1])})
        wide.load_state_dict(state)
        small, report = truncate_student(wide, bond_dim=bond_dim, tolerance=tolerance)
        super().__init__(**args)
        self.load_state_dict(small.state_dict())
        self.truncation = report

    def checkpoint_spec(self) -> dict[str, Any]:
        """Described as the :class:`MPSClassifier` it is, so loading never reads ``checkpoint``."""
        args = {k: v for k, v in self.init_args.items() if k not in ("checkpoint", "tolerance")}
        return {"class_path": "tnkd.students.MPSClassifier", "init_args": args}
