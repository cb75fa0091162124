"""tnkd.students.batched: M students of one shape as one model with a leading member index."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tnkd.students import MPSClassifier, TTNetwork
from tnkd.students.batched import BatchedMPS, MemberList, batch_students


def _members(count: int = 3, **kwargs) -> list[MPSClassifier]:
    out = []
    for seed in range(count):
        torch.manual_seed(seed)
        mps = MPSClassifier(**{"num_sites": 12, "num_classes": 3, "bond_dim": 4, **kwargs})
        mps = mps.double()
        with torch.no_grad():  # move away from the near-identity start: members really differ
            for p in mps.parameters():
                p.add_(0.2 * torch.randn_like(p))
        out.append(mps)
    return out


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"uniform": True},
        {"label_position": 0},
        {"label_position": 12},
        {"label_position": 3},
        {"feature_map": "trig"},
        {"method": "scan"},
        {"method": "log_depth"},
        {"num_sites": 9, "pool": 2},
    ],
)
def test_each_member_computes_its_own_logits_and_gets_its_own_gradient(kwargs):
    members = _members(**kwargs)
    model = batch_students(members)
    assert isinstance(model, BatchedMPS) and model.num_members == 3
    x = torch.rand(5, 1, 6, 6) if kwargs.get("pool") else torch.rand(5, 12)
    y = torch.tensor([0, 2, 1, 1, 0])
    z = model(x)
    assert z.shape == (3, 5, 3)
    losses = [F.cross_entropy(m(x), y) for m in members]
    # member k's loss in the batched model depends on member k's parameters only, so the
    # summed loss gives each slice of a stacked parameter its member's own gradient
    sum(F.cross_entropy(z[k], y) * (k + 1) for k in range(3)).backward()
    for k, (member, loss) in enumerate(zip(members, losses, strict=True)):
        torch.testing.assert_close(z[k], member(x), rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad((k + 1) * loss, list(member.parameters()))
        for (name, stacked), grad in zip(model.named_parameters(), grads, strict=True):
            torch.testing.assert_close(stacked.grad[k], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_members_on_another_engine_run_one_after_the_other():
    members = _members(method="stable", output="raw")  # BatchedMPS runs the chain engine only
    model = batch_students(members)
    assert type(model).__name__ == "MemberList"
    with pytest.raises(ValueError, match="BatchedMPS runs the chain engine, but the members run"):
        batch_students(members, kind="batched")
    x = torch.rand(4, 12, dtype=torch.float64)
    torch.testing.assert_close(model(x)[1], members[1].generic_forward(x), rtol=1e-10, atol=1e-12)


def test_raw_output_equals_the_dense_contraction_of_each_member():
    members = _members(output="raw")
    model = batch_students(members)
    x = torch.rand(4, 12, dtype=torch.float64)
    for k, member in enumerate(members):
        # independent truth: the generic opt_einsum contraction of the member's graph
        torch.testing.assert_close(model(x)[k], member.generic_forward(x), rtol=1e-10, atol=1e-12)


def test_member_gives_back_an_ordinary_student_with_the_members_parameters():
    members = _members()
    model = batch_students(members)
    x = torch.rand(4, 12, dtype=torch.float64)
    back = model.member(1)
    assert type(back) is MPSClassifier and back.init_args == members[1].init_args
    torch.testing.assert_close(back(x), members[1](x), rtol=1e-12, atol=1e-12)
    assert all(p.requires_grad for p in back.parameters())


def test_one_adam_over_stacked_parameters_is_one_adam_per_member():
    members = _members(2)
    model = batch_students([m for m in members])
    separate = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in members]
    joint = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.rand(6, 12, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    for _ in range(3):
        for m, opt in zip(members, separate, strict=True):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        joint.zero_grad()
        z = model(x)
        sum(F.cross_entropy(z[k], y) for k in range(2)).backward()
        joint.step()
    for k, m in enumerate(members):
        for stacked, own in zip(model.parameters(), m.parameters(), strict=True):
            torch.testing.assert_close(stacked[k], own, rtol=1e-10, atol=1e-12)


def test_other_students_run_as_a_member_list():
    torch.manual_seed(0)
    members = [
        TTNetwork(input_shape=(1, 8, 8), num_classes=3, patch_size=4, rank=3) for _ in range(2)
    ]
    model = batch_students(members)
    assert isinstance(model, MemberList)
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(model(x), torch.stack([m(x) for m in members]))
    learnable = _members(2, feature_map={"name": "learnable", "dim": 2})
    assert isinstance(batch_students(learnable), MemberList)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        (lambda: _members(1) + _members(1, bond_dim=5), "bond_dim: 4 vs 5"),
        (lambda: [*_members(1), MemberList(_members(1))], "member 1 a MemberList"),
        (lambda: [], "at least one member"),
    ],
)
def test_members_of_different_shapes_are_refused_in_one_line(members, message):
    with pytest.raises(ValueError, match=message) as err:
        batch_students(members())
    assert "\n" not in str(err.value)


def test_bad_kind_is_refused():
    with pytest.raises(
        ValueError, match=r"kind must be one of \('auto', 'batched', 'list'\), but got 'x'"
    ):
        batch_students(_members(1), kind="x")
