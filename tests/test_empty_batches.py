"""Empty batches: every divergence refuses them in one line (never NaN), every student returns
empty logits (never a reshape error), a training step refuses them in one line."""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
from torch import nn

import tnkd.divergences as divergences
import tnkd.students as students
from tnkd.divergences import DIVERGENCES, build_divergence
from tnkd.students.base import Student
from tnkd.students.batched import BatchedMPS, MemberList
from tnkd.teachers import MLP, save_teacher
from tnkd.training.modules import DistillationModule

C = 5
EMPTY = torch.zeros(0, C)
TARGET = torch.zeros(0, dtype=torch.long)
ONE_LINE = r"^a divergence of an empty batch \(per-sample values of shape \(0,\)\) is undefined"


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("name", DIVERGENCES.names())
def test_every_registered_divergence_refuses_an_empty_batch_in_one_line(name):
    divergence = build_divergence(name)
    for call in (divergence, divergence.loss):
        with pytest.raises(ValueError, match=ONE_LINE) as error:
            call(EMPTY, EMPTY, 2.0, target=TARGET)
        _one_line(error)
    # the per-sample values of an empty batch are an empty result, not an error
    if type(divergence).per_sample is not divergences.Divergence.per_sample:
        assert divergence.per_sample(divergence.ratios(EMPTY, EMPTY, 2.0)).shape == (0,)
    # and a batch of one sample is finite
    z = torch.randn(1, C)
    assert torch.isfinite(divergence(z, z + 1, 2.0, target=torch.zeros(1, dtype=torch.long)))


NOT_A_DIVERGENCE = ("log_probs", "log_ratios", "standardize_logits", "build_divergence")
FUNCTIONAL = [
    name
    for name in divergences.__all__
    if inspect.isfunction(getattr(divergences, name))
    and not name.startswith("check_")
    and name not in NOT_A_DIVERGENCE
]


@pytest.mark.parametrize("name", FUNCTIONAL)
def test_every_functional_twin_refuses_an_empty_batch_in_one_line_or_is_empty(name):
    fn = getattr(divergences, name)
    params = inspect.signature(fn).parameters
    logits = [k for k in params if k.endswith("logits")]  # (teacher, student), (p, q), (logits)
    args = [EMPTY] * len(logits)
    kwargs = {"target": TARGET} if "target" in params else {}
    if "alpha" in params:
        kwargs["alpha"] = 2.0
    if name.endswith("_parts"):  # per-sample values: an empty result
        assert all(part.shape == (0,) for part in fn(*args, **kwargs))
        return
    with pytest.raises(ValueError, match=ONE_LINE):
        fn(*args, **kwargs)


def test_functional_list_is_not_empty():
    assert {"kl_divergence", "renyi_divergence", "decoupled_kd", "entropy"} <= set(FUNCTIONAL)


def _graph():
    from tnkd.tn.graph import TNGraph, connect, make_node

    cores = [make_node((2, 3), "A0", ["phys", "r"])]
    cores += [make_node((3, 2, 3), f"A{i}", ["l", "phys", "r"]) for i in (1, 2)]
    cores += [make_node((3, 2, C), "A3", ["l", "phys", "label"])]
    for a, b in itertools.pairwise(cores):
        connect(a, "r", b, "l")
    xs = [make_node((2,), f"x{i}", ["phys"]) for i in range(4)]
    for c, x in zip(cores, xs, strict=True):
        connect(c, "phys", x, "phys")
    return TNGraph(cores + xs, [x.name for x in xs], [cores[-1]["label"]])


def _students(tmp_path):
    """One small instance of every student class the package exports, with its input shape."""
    teacher = tmp_path / "mlp.pt"
    save_teacher(MLP(16, C, hidden=(8,)), teacher)
    wide = students.MPSClassifier(16, C, bond_dim=4)
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    from tnkd.students.tt_linear import TTLinear

    layers = nn.Sequential(TTLinear(16, 8, (4, 4), (2, 4), ranks=2), nn.ReLU(), nn.Linear(8, C))
    return {
        "MPSClassifier": (students.MPSClassifier(16, C, bond_dim=3), (16,)),
        "GraphStudent": (students.GraphStudent(_graph()), (4,)),
        "PEPSClassifier": (
            students.PEPSClassifier((1, 4, 4), C, bond_dim=2, patch=2),
            (1, 4, 4),
        ),
        "StackedMPS": (students.StackedMPS(16, C, hidden=3, bond_dim=3), (16,)),
        "TreeClassifier": (students.TreeClassifier((1, 4, 4), C, bond_dim=2), (1, 4, 4)),
        "TTMLP": (students.TTMLP(layers, 16, C), (16,)),
        "TTMLPFromTeacher": (students.TTMLPFromTeacher(str(teacher), ranks=2), (16,)),
        "TTNetwork": (
            students.TTNetwork((1, 4, 4), C, patch_size=2, rank=2, feature_dim=2),
            (1, 4, 4),
        ),
        "TruncatedMPS": (
            students.TruncatedMPS(str(tmp_path / "wide.pt"), 2, 16, C),
            (16,),
        ),
    }


def test_every_student_returns_empty_logits_for_an_empty_batch(tmp_path):
    built = _students(tmp_path)
    exported = {
        name
        for name in students.__all__
        if inspect.isclass(getattr(students, name))
        and issubclass(getattr(students, name), Student)
        and name != "Student"
    }
    assert exported == set(built)  # a new student class must be added here
    for name, (student, shape) in built.items():
        out = student(torch.rand(0, *shape))
        assert out.shape == (0, C), name
        assert student(torch.rand(3, *shape)).shape == (3, C), name  # the same student works


def test_batched_students_return_empty_logits_for_an_empty_batch():
    members = [students.MPSClassifier(16, C, bond_dim=3) for _ in range(2)]
    for batched in (BatchedMPS(members), MemberList(members)):
        assert batched(torch.rand(0, 16)).shape == (2, 0, C)


def test_tt_linear_maps_an_empty_batch_to_an_empty_batch():
    from tnkd.students.tt_linear import TTLinear

    assert TTLinear(16, 8, (4, 4), (2, 4), ranks=2)(torch.rand(0, 16)).shape == (0, 8)


def test_a_training_step_on_an_empty_batch_is_one_line():
    module = DistillationModule(students.MPSClassifier(16, C, bond_dim=3), beta=0.0)
    with pytest.raises(ValueError, match=r"^an empty batch \(0 samples\) reached the train step"):
        module._shared_step((torch.rand(0, 16), TARGET), "train")
