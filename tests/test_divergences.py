import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnkd import divergences as dv

LOG = torch.log


def logits_of(probs):
    return LOG(torch.as_tensor(probs, dtype=torch.float64))


P, Q = logits_of([[0.5, 0.5]]), logits_of([[0.4, 0.6]])
ALL = ["kl", "reverse_kl", "renyi", "js", "hellinger", "tv", "skew_kl"]


def test_worked_example_entropies_and_kl():
    assert dv.entropy(P).item() == pytest.approx(0.693, abs=1e-3)
    assert dv.entropy(Q).item() == pytest.approx(0.673, abs=1e-3)
    assert dv.cross_entropy_between(P, Q).item() == pytest.approx(0.714, abs=1e-3)
    assert dv.cross_entropy_between(Q, P).item() == pytest.approx(0.693, abs=1e-3)
    assert dv.kl_divergence(P, Q).item() == pytest.approx(0.021, abs=1e-3)
    # KL = H(P, Q) - H(P)
    assert dv.kl_divergence(P, Q).item() == pytest.approx(
        (dv.cross_entropy_between(P, Q) - dv.entropy(P)).item(), abs=1e-12
    )


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0, 2.0, 7.0, math.inf])
def test_conditional_example_gives_minus_log_q_of_a(alpha):
    # P = Q(. | A): D_alpha(P || Q) = -log Q(A) for every alpha
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    in_a = torch.tensor([[True, False, True, False]])
    p = torch.where(in_a, q, torch.zeros_like(q))
    p = p / p.sum()
    value = dv.renyi_divergence(p.log(), q.log(), alpha)
    assert value.item() == pytest.approx(-math.log(0.4), rel=1e-9)


def test_known_closed_forms():
    js = dv.jensen_shannon_divergence(P, Q).item()
    m = torch.tensor([0.45, 0.55], dtype=torch.float64)
    p, q = (
        torch.tensor([0.5, 0.5], dtype=torch.float64),
        torch.tensor([0.4, 0.6], dtype=torch.float64),
    )
    assert js == pytest.approx(
        (0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()).item()
    )
    assert dv.total_variation_distance(P, Q).item() == pytest.approx(0.1)
    h2 = 1 - (p * q).sqrt().sum().item()
    assert dv.hellinger_distance(P, Q).item() == pytest.approx(h2)
    # D_1/2 = -2 log(1 - H^2)
    assert dv.renyi_divergence(P, Q, 0.5).item() == pytest.approx(-2 * math.log(1 - h2))
    assert dv.reverse_kl_divergence(P, Q).item() == pytest.approx((q * (q / p).log()).sum().item())
    mix = 0.1 * p + 0.9 * q
    assert dv.skew_kl_divergence(P, Q, skew=0.1).item() == pytest.approx(
        (p * (p / mix).log()).sum().item()
    )


@pytest.mark.parametrize("alpha", [0.25, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_analytic_renyi_gradient(alpha, temperature):
    torch.manual_seed(0)
    v = torch.randn(3, 6, dtype=torch.float64)
    z = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    # per-sample sum instead of batch mean: multiply by the batch size
    (3 * dv.renyi_divergence(v, z, alpha, temperature)).backward()
    p, q = torch.softmax(v / temperature, -1), torch.softmax(z.detach() / temperature, -1)
    w = p**alpha * q ** (1 - alpha)
    expected = (q - w / w.sum(-1, keepdim=True)) / temperature
    assert torch.allclose(z.grad, expected, atol=1e-10)


@pytest.mark.parametrize("name", ALL)
def test_gradcheck(name):
    torch.manual_seed(1)
    div = dv.build_divergence(name)
    v = torch.randn(2, 4, dtype=torch.float64)
    z = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: div(v, s, 2.0), (z,))


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_high_temperature_gradient_matches_kl(alpha):
    torch.manual_seed(2)
    n, t = 5, 200.0
    v = torch.randn(1, n, dtype=torch.float64)
    v = v - v.mean()
    z = torch.randn(1, n, dtype=torch.float64)
    z = (z - z.mean()).requires_grad_()
    div = dv.RenyiDivergence(alpha)
    (grad,) = torch.autograd.grad(div(v, z, t), z)
    assert torch.allclose(grad, alpha / (n * t**2) * (z - v), rtol=1e-2)
    scaled = div.scale(t) * grad
    kl = dv.KLDivergence()
    (kl_grad,) = torch.autograd.grad(kl.scale(t) * kl(v, z, t), z)
    assert torch.allclose(scaled, kl_grad, rtol=1e-2)


@pytest.mark.parametrize("name", ["js", "hellinger", "reverse_kl", "skew_kl"])
def test_scales_make_high_temperature_gradients_match_kl(name):
    torch.manual_seed(3)
    v = torch.randn(2, 6, dtype=torch.float64)
    z = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    t = 300.0
    div, kl = dv.build_divergence(name), dv.KLDivergence()
    (g,) = torch.autograd.grad(div.loss(v, z, t), z)
    (g_kl,) = torch.autograd.grad(kl.loss(v, z, t), z)
    assert torch.allclose(g, g_kl, rtol=0, atol=1e-2 * g_kl.abs().max().item())


probs = st.lists(st.floats(0.01, 1.0), min_size=2, max_size=6)


def pair(draw_p, draw_q):
    n = min(len(draw_p), len(draw_q))
    p = torch.tensor(draw_p[:n], dtype=torch.float64)
    q = torch.tensor(draw_q[:n], dtype=torch.float64)
    return (p / p.sum()).log().unsqueeze(0), (q / q.sum()).log().unsqueeze(0)


@settings(max_examples=60, deadline=None)
@given(probs, probs)
def test_properties(a, b):
    lp, lq = pair(a, b)
    for name in ALL:
        assert dv.build_divergence(name)(lp, lq).item() >= -1e-12
        assert abs(dv.build_divergence(name)(lp, lp).item()) <= 1e-12
    alphas = [0.0, 0.1, 0.5, 0.9, 1.0, 1.5, 2.0, 5.0, math.inf]
    values = [dv.renyi_divergence(lp, lq, a).item() for a in alphas]
    assert all(x <= y + 1e-9 for x, y in itertools.pairwise(values))
    for alpha in (0.2, 0.5, 0.7):
        lhs = dv.renyi_divergence(lp, lq, alpha).item()
        rhs = alpha / (1 - alpha) * dv.renyi_divergence(lq, lp, 1 - alpha).item()
        assert lhs == pytest.approx(rhs, rel=1e-7, abs=1e-12)
    assert dv.renyi_divergence(lp, lq, 0.5).item() == pytest.approx(
        dv.renyi_divergence(lq, lp, 0.5).item(), abs=1e-12
    )


@settings(max_examples=30, deadline=None)
@given(probs, probs)
def test_limits_agree_with_neighbours(a, b):
    lp, lq = pair(a, b)
    kl = dv.kl_divergence(lp, lq).item()
    for eps in (1e-6, 1e-5, 2e-4):
        # |D_alpha - KL| ~ |alpha - 1| Var_P[log p/q] / 2, and the variance is bounded here
        assert dv.renyi_divergence(lp, lq, 1 - eps).item() == pytest.approx(kl, abs=20 * eps)
        assert dv.renyi_divergence(lp, lq, 1 + eps).item() == pytest.approx(kl, abs=20 * eps)
    assert dv.renyi_divergence(lp, lq, 1e-7).item() == pytest.approx(
        dv.renyi_divergence(lp, lq, 0.0).item(), abs=1e-5
    )
    assert dv.renyi_divergence(lp, lq, 1e5).item() == pytest.approx(
        dv.renyi_divergence(lp, lq, math.inf).item(), abs=1e-3
    )


def test_no_cliff_at_the_series_boundary():
    # values and gradients just inside and just outside the expansion radius around alpha = 1 agree
    torch.manual_seed(4)
    v = torch.randn(4, 10, dtype=torch.float64) * 3
    z0 = torch.randn(4, 10, dtype=torch.float64)
    r = 1e-4  # the old expansion radius around alpha = 1
    for edge in (1 - r, 1 + r):
        out = []
        for alpha in (edge - 1e-9, edge + 1e-9):
            z = z0.clone().requires_grad_()
            value = dv.renyi_divergence(v, z, alpha)
            out.append((value.item(), torch.autograd.grad(value, z)[0]))
        assert abs(out[0][0] - out[1][0]) < 1e-7
        assert torch.allclose(out[0][1], out[1][1], atol=1e-7)


@pytest.mark.parametrize("name", ALL)
def test_teacher_zeros_never_give_nan(name):
    v = torch.tensor([[0.0, -math.inf, 2.0], [-math.inf, 1.0, -math.inf]])
    z = torch.randn(2, 3, requires_grad=True)
    div = dv.build_divergence(name)
    value = div(v, z, 2.0)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0, math.inf])
def test_renyi_with_teacher_zeros(alpha):
    v = torch.tensor([[0.0, -math.inf, 2.0]])
    z = torch.randn(1, 3, requires_grad=True)
    value = dv.renyi_divergence(v, z, alpha)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    ("scale", "temperature", "classes"), [(1e4, 0.05, 10), (1e4, 100.0, 10), (5.0, 1.0, 1000)]
)
def test_extreme_inputs_are_finite(name, scale, temperature, classes):
    torch.manual_seed(6)
    v = torch.randn(8, classes) * scale
    z = (torch.randn(8, classes) * scale).requires_grad_()
    value = dv.build_divergence(name)(v, z, temperature)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("name", ALL)
def test_half_precision_inputs_and_bf16_autocast(name):
    torch.manual_seed(7)
    div = dv.build_divergence(name)
    v, z = torch.randn(4, 10).half(), torch.randn(4, 10).half().requires_grad_()
    value = div(v, z, 2.0)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value) and torch.isfinite(z.grad).all()
    zb = torch.randn(4, 10, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = div(torch.randn(4, 10) @ torch.eye(10), zb @ torch.eye(10), 2.0)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(zb.grad).all()


def test_batch_mean_not_class_mean():
    v, z = torch.randn(2, 7), torch.randn(2, 7)
    both = dv.kl_divergence(v, z)
    single = [dv.kl_divergence(v[i : i + 1], z[i : i + 1]) for i in range(2)]
    assert torch.allclose(both, (single[0] + single[1]) / 2)
    assert dv.kl_divergence(v.view(1, 2, 7), z.view(1, 2, 7)).item() == pytest.approx(both.item())


def test_functional_twins_equal_modules():
    v, z = torch.randn(3, 5), torch.randn(3, 5)
    pairs = [
        (dv.kl_divergence(v, z, 2.0), dv.KLDivergence()(v, z, 2.0)),
        (dv.reverse_kl_divergence(v, z, 2.0), dv.ReverseKLDivergence()(v, z, 2.0)),
        (dv.renyi_divergence(v, z, 0.7, 2.0), dv.RenyiDivergence(0.7)(v, z, 2.0)),
        (dv.jensen_shannon_divergence(v, z, 2.0), dv.JensenShannonDivergence()(v, z, 2.0)),
        (dv.hellinger_distance(v, z, 2.0), dv.HellingerDistance()(v, z, 2.0)),
        (dv.total_variation_distance(v, z, 2.0), dv.TotalVariationDistance()(v, z, 2.0)),
        (dv.skew_kl_divergence(v, z, 0.2, 2.0), dv.SkewKLDivergence(0.2)(v, z, 2.0)),
    ]
    for functional, module in pairs:
        assert torch.equal(functional, module)


def test_registry_and_scales():
    assert isinstance(dv.build_divergence("KL"), dv.KLDivergence)
    assert isinstance(dv.build_divergence("forward-kl"), dv.KLDivergence)
    renyi = dv.build_divergence({"name": "renyi", "alpha": 0.5})
    assert renyi.alpha == 0.5 and renyi.scale(4.0) == pytest.approx(32.0)
    assert dv.build_divergence(renyi) is renyi
    assert (
        dv.RenyiDivergence(math.inf).scale(3.0) == 9.0 and dv.RenyiDivergence(0.0).scale(3.0) == 9.0
    )
    assert dv.KLDivergence(scale=1.0).scale(4.0) == 1.0
    assert dv.TotalVariationDistance().scale(4.0) == 4.0
    with pytest.raises(
        ValueError, match="unknown divergence 'kld'; expected one of: decoupled_kd, dkd, forward_kl"
    ):
        dv.build_divergence("kld")
    assert set(ALL) <= set(dv.DIVERGENCES.names())
    loss = dv.KLDivergence().loss(P, Q, 2.0)
    assert loss.item() == pytest.approx(4.0 * dv.kl_divergence(P, Q, 2.0).item())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: dv.RenyiDivergence(-1.0), r"renyi alpha must be >= 0 \(or inf\), but got -1.0"),
        (lambda: dv.RenyiDivergence(float("nan")), "renyi alpha must be >= 0"),
        (
            lambda: dv.kl_divergence(P, Q, 0.0),
            "temperature must be a finite number > 0, but got 0.0",
        ),
        (
            lambda: dv.kl_divergence(P, Q, -1.0),
            "temperature must be a finite number > 0, but got -1.0",
        ),
        (lambda: dv.kl_divergence(P, Q, float("inf")), "temperature must be a finite number > 0"),
        (
            lambda: dv.kl_divergence(torch.zeros(2, 3), torch.zeros(2, 4)),
            "must have the same shape",
        ),
        (
            lambda: dv.kl_divergence(torch.zeros(1, 3), torch.tensor([[0.0, float("nan"), 1.0]])),
            "student_logits must be finite",
        ),
        (
            lambda: dv.kl_divergence(torch.tensor([[0.0, float("nan"), 1.0]]), torch.zeros(1, 3)),
            "teacher_logits must be finite or -inf",
        ),
        (
            lambda: dv.kl_divergence(torch.full((1, 3), -math.inf), torch.zeros(1, 3)),
            "all -inf row",
        ),
        (lambda: dv.SkewKLDivergence(1.0), r"skew_kl skew must be in \[0, 1\)"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_validation_can_be_skipped():
    div = dv.KLDivergence(validate=False)
    out = div(torch.zeros(1, 3), torch.tensor([[0.0, float("nan"), 1.0]]))
    assert torch.isnan(out)
