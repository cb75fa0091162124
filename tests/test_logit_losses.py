"""Logit standardization, decoupled KD and teacher ensembles against closed forms and limits.

Float32 accuracy against a 60-digit reference is in tests/test_divergence_precision.py.
"""

import math

import pytest
import torch

from tnkd import divergences as dv
from tnkd.students import MPSClassifier
from tnkd.teachers import MLP, TeacherEnsemble, save_teacher
from tnkd.training.modules import DistillationModule
from tnkd.training.teacher_cache import module_digest

NAMES = ["kl", "reverse_kl", "renyi", "js", "hellinger", "tv", "skew_kl", "dkd"]


def _logits(seed, rows=4, classes=6):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(rows, classes, generator=g, dtype=torch.float64) * 3
    z = torch.randn(rows, classes, generator=g, dtype=torch.float64) * 2
    return v, z


def test_standardize_logits_closed_form():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0], [0.0, 0.0, 6.0]], dtype=torch.float64)
    out = dv.standardize_logits(x)
    # mean 2, sample std 1; a constant row; mean 2, sample std sqrt(12)
    s = math.sqrt(12)
    expected = torch.tensor(
        [[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [-2 / s, -2 / s, 4 / s]], dtype=torch.float64
    )
    assert torch.allclose(out, expected, atol=1e-15)
    constant = torch.full((1, 5), 0.1, dtype=torch.float32)
    assert torch.equal(dv.standardize_logits(constant), torch.zeros(1, 5))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [0.5, 4.0])
def test_standardized_losses_ignore_shift_and_positive_scale_of_either_side(name, temperature):
    v, z = _logits(0)
    div = dv.build_divergence({"name": name, "standardize": True})
    target = torch.tensor([0, 2, 5, 1])
    base = div.loss(v, z, temperature, target=target)
    shift_v, shift_z = (
        torch.randn(4, 1, dtype=torch.float64),
        torch.randn(4, 1, dtype=torch.float64),
    )
    for a, b in [(v * 7.5 + shift_v, z), (v, z * 0.02 - 4), (v * 0.3 + shift_v, z * 11 + shift_z)]:
        # (the rescaled teacher keeps its top class, so DKD's target does not move either)
        assert torch.allclose(div.loss(a, b, temperature, target=target), base, rtol=1e-12)
    plain = dv.build_divergence(name)
    assert not torch.allclose(
        plain.loss(v * 7.5, z, temperature, target=target),
        plain.loss(v, z, temperature, target=target),
    )


def test_standardized_loss_is_the_plain_loss_of_z_scored_logits():
    v, z = _logits(1)
    div = dv.RenyiDivergence(0.5, standardize=True)
    zs = lambda x: (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)  # noqa: E731
    assert torch.allclose(div.loss(v, z, 2.0), dv.RenyiDivergence(0.5).loss(zs(v), zs(z), 2.0))
    with pytest.raises(ValueError, match="standardize needs finite teacher logits"):
        v[0, 1] = -math.inf
        dv.KLDivergence(standardize=True)(v, z)
    with pytest.raises(ValueError, match="kl standardize must be true or false"):
        dv.KLDivergence(standardize="yes")


@pytest.mark.parametrize("temperature", [0.3, 1.0, 4.0, 50.0])
def test_dkd_parts_recombine_into_kl_with_the_one_minus_p_t_factor(temperature):
    v, z = _logits(2, rows=8, classes=10)
    target = torch.arange(8)
    tckd, nckd, rest = dv.decoupled_kd_parts(v, z, target, temperature)
    p = torch.softmax(v / temperature, -1)
    assert torch.allclose(rest, 1 - p[torch.arange(8), target], rtol=1e-12)
    kl = (
        p * (torch.log_softmax(v / temperature, -1) - torch.log_softmax(z / temperature, -1))
    ).sum(-1)
    assert torch.allclose(tckd + rest * nckd, kl, rtol=1e-10)
    # DKD with both weights 1 is KL + p_t NCKD, not KL (the paper drops the factor)
    dkd = dv.decoupled_kd(v, z, target, temperature, target_weight=1.0, nontarget_weight=1.0)
    assert torch.allclose(dkd, (kl + (1 - rest) * nckd).mean(), rtol=1e-10)
    assert dkd > kl.mean()


def test_dkd_parts_closed_form_on_three_classes():
    p = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.1, 0.4]], dtype=torch.float64)
    tckd, nckd, rest = dv.decoupled_kd_parts(p.log(), q.log(), torch.tensor([0]))
    binary = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    hat = (2 / 3) * math.log((2 / 3) / 0.2) + (1 / 3) * math.log((1 / 3) / 0.8)
    assert tckd.item() == pytest.approx(binary, rel=1e-12)
    assert nckd.item() == pytest.approx(hat, rel=1e-12)
    assert rest.item() == pytest.approx(0.3, rel=1e-12)
    div = dv.build_divergence({"name": "dkd", "target_weight": 2.0, "nontarget_weight": 5.0})
    at_3 = div(p.log(), q.log(), 3.0, target=torch.tensor([0])).item()
    assert div.loss(p.log(), q.log(), 3.0, target=torch.tensor([0])).item() == pytest.approx(
        9 * at_3
    )
    assert div(p.log(), q.log(), 1.0, target=torch.tensor([0])).item() == pytest.approx(
        2 * binary + 5 * hat, rel=1e-12
    )


def test_dkd_uses_the_teachers_top_class_for_unlabeled_samples():
    v, z = _logits(3)
    top = v.argmax(-1)
    div = dv.DecoupledKD(1.0, 8.0)
    labels = top.clone()
    labels[[1, 3]] = -1
    assert torch.allclose(div(v, z, 2.0, target=labels), div(v, z, 2.0, target=top))
    assert torch.allclose(div(v, z, 2.0), div(v, z, 2.0, target=top))
    assert torch.allclose(div.scale(2.0) * div(v, z, 2.0), div.loss(v, z, 2.0))
    with pytest.raises(ValueError, match="dkd nontarget_weight must be a finite number >= 0"):
        dv.DecoupledKD(nontarget_weight=-1.0)
    with pytest.raises(ValueError, match="expected one target per sample"):
        div(v, z, 2.0, target=torch.zeros(3, dtype=torch.long))


def test_dkd_gradient_matches_finite_differences():
    v, z = _logits(4, rows=3, classes=5)
    target = torch.tensor([4, 0, 2])
    div = dv.DecoupledKD(1.5, 3.0)
    assert torch.autograd.gradcheck(
        lambda s: div.loss(v, s, 2.0, target=target), z.clone().requires_grad_()
    )


def test_ensemble_target_is_the_average_of_softened_probabilities(tmp_path):
    torch.manual_seed(0)
    members = [MLP(64, 10, hidden=(8,)).eval() for _ in range(3)]
    x = torch.rand(5, 64)
    for t in (1.0, 4.0):
        ensemble = TeacherEnsemble(members, temperature=t)
        expected = torch.stack([torch.softmax(m(x) / t, -1) for m in members]).mean(0)
        assert torch.allclose(torch.softmax(ensemble(x) / t, -1), expected, atol=1e-6)
    one = TeacherEnsemble(members[:1], temperature=2.0)
    assert torch.allclose(
        torch.softmax(one(x) / 2, -1), torch.softmax(members[0](x) / 2, -1), atol=1e-6
    )
    paths = [str(save_teacher(m, tmp_path / f"t{i}.pt")) for i, m in enumerate(members)]
    module = DistillationModule(
        MPSClassifier(64, 10, bond_dim=2), teacher_checkpoint=paths, temperature=4.0
    )
    assert isinstance(module.teacher, TeacherEnsemble) and len(module.teacher.members) == 3
    assert torch.allclose(module.teacher(x), TeacherEnsemble(members, 4.0)(x), atol=1e-6)
    assert module.size_summary()["teacher_params"] == 3 * sum(
        p.numel() for p in members[0].parameters()
    )
    other = DistillationModule(
        MPSClassifier(64, 10, bond_dim=2), teacher_checkpoint=paths, temperature=2.0
    )
    assert module_digest(other.teacher) != module_digest(module.teacher)  # cached per temperature
    with pytest.raises(ValueError, match="same number of classes"):
        TeacherEnsemble([members[0], MLP(64, 5, hidden=(8,))])
