"""Float32 divergences against a 60-digit reference, at extreme temperatures and orders.

The reference is written from the textbook definitions with Python's ``decimal`` module (60
significant digits), independent of the float code; gradients are its central differences.
"""

import math
from decimal import Decimal, localcontext

import pytest
import torch

from tnkd import divergences as dv

TEMPERATURES = [0.05, 1.0, 100.0, 1e4]
ALPHAS = [0.0, 1e-8, 1e-3, 0.5, 1.0, 2.0, 1e3, math.inf]
PREC = 60


def _dec(x: float | Decimal) -> Decimal:
    return x if isinstance(x, Decimal) else Decimal(x)  # Decimal(float): its exact value


def _softmax(logits: list[float], t: Decimal) -> list[Decimal]:
    finite = [_dec(x) / t for x in logits if x != -math.inf]
    top = max(finite)
    e = [(_dec(x) / t - top).exp() if x != -math.inf else Decimal(0) for x in logits]
    total = sum(e)
    return [x / total for x in e]


def _kl(p: list[Decimal], q: list[Decimal]) -> Decimal:
    return sum((a * (a.ln() - b.ln()) for a, b in zip(p, q, strict=True) if a > 0), Decimal(0))


def _renyi(p: list[Decimal], q: list[Decimal], alpha: float) -> Decimal:
    if alpha == 0:
        return -sum(b for a, b in zip(p, q, strict=True) if a > 0).ln()
    if math.isinf(alpha):
        return max(a.ln() - b.ln() for a, b in zip(p, q, strict=True) if a > 0)
    if alpha == 1:
        return _kl(p, q)
    al = _dec(alpha)
    s = sum(((al * a.ln()) + (1 - al) * b.ln()).exp() for a, b in zip(p, q, strict=True) if a > 0)
    return s.ln() / (al - 1)


def _standardized(logits: list) -> list[Decimal]:
    """Z-scores with Bessel's correction (Sun et al. 2024), in Decimal."""
    x = [_dec(a) for a in logits]
    mean = sum(x) / len(x)
    std = (sum((a - mean) ** 2 for a in x) / (len(x) - 1)).sqrt()
    return [(a - mean) / std for a in x]


#: the target class of each of the two rows (DKD)
TARGETS = [1, 3]


def _dkd(p: list[Decimal], q: list[Decimal], target: int) -> tuple[Decimal, Decimal]:
    """(TCKD, NCKD) from the definitions: binary KL and KL of the renormalised non-targets."""
    rest_p, rest_q = 1 - p[target], 1 - q[target]
    tckd = _kl([p[target], rest_p], [q[target], rest_q])
    others = [j for j in range(len(p)) if j != target]
    nckd = _kl([p[j] / rest_p for j in others], [q[j] / rest_q for j in others])
    return tckd, nckd


def _reference(
    name: str, alpha: float | None, v: list, z: list, t: float, target: int | None = None
):
    """The scaled loss term ``scale(T) * D`` of one sample (Renyi: its limit at alpha = 0)."""
    td = _dec(t)
    if name.endswith("_std"):
        name, v, z = name[: -len("_std")], _standardized(v), _standardized(z)
    p, q = _softmax(v, td), _softmax(z, td)
    if name == "dkd":
        tckd, nckd = _dkd(p, q, target)
        return td**2 * (tckd + 8 * nckd)
    if name == "kl":
        return td**2 * _kl(p, q)
    if name == "reverse_kl":
        return td**2 * _kl(q, p)
    if name == "js":
        m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
        return 4 * td**2 * (_kl(p, m) + _kl(q, m)) / 2
    if name == "hellinger":
        return 4 * td**2 * sum((a.sqrt() - b.sqrt()) ** 2 for a, b in zip(p, q, strict=True)) / 2
    if name == "tv":
        return td * sum(abs(a - b) for a, b in zip(p, q, strict=True)) / 2
    if name == "skew_kl":
        m = [Decimal("0.1") * a + Decimal("0.9") * b for a, b in zip(p, q, strict=True)]
        return td**2 / Decimal("0.81") * _kl(p, m)
    assert name == "renyi"
    if alpha == 0:
        return td**2 * _kl(q, p)
    if alpha == 1:
        return td**2 * _kl(p, q)
    if math.isinf(alpha):
        return td**2 * _renyi(p, q, alpha)
    return td**2 / _dec(alpha) * _renyi(p, q, alpha)


def _reference_loss_and_grad(name, alpha, v: torch.Tensor, z: torch.Tensor, t: float):
    """Batch-mean loss and its gradient by central differences, all in 60 digits."""
    with localcontext() as ctx:
        ctx.prec = PREC
        rows_v, rows_z = v.tolist(), z.tolist()
        n = len(rows_v)
        value = sum(
            _reference(name, alpha, a, b, t, c)
            for a, b, c in zip(rows_v, rows_z, TARGETS, strict=True)
        )
        h = Decimal("1e-22")
        grad = []
        for a, b, c in zip(rows_v, rows_z, TARGETS, strict=True):
            row = []
            for j in range(len(b)):
                up, down = [_dec(x) for x in b], [_dec(x) for x in b]
                up[j] += h
                down[j] -= h
                f_up = _reference(name, alpha, a, up, t, c)
                f_down = _reference(name, alpha, a, down, t, c)
                row.append(float((f_up - f_down) / (2 * h) / n))
            grad.append(row)
        return float(value / n), torch.tensor(grad, dtype=torch.float64)


def _float_loss_and_grad(name, alpha, v, z, t, dtype):
    standardize = name.endswith("_std")
    base = name[: -len("_std")] if standardize else name
    if base == "renyi":
        div = dv.RenyiDivergence(alpha, standardize=standardize)
    else:
        div = dv.build_divergence({"name": base, "standardize": standardize})
    zz = z.to(dtype).clone().requires_grad_()
    loss = div.loss(v.to(dtype), zz, t, target=torch.tensor(TARGETS))
    (grad,) = torch.autograd.grad(loss, zz)
    return loss.item(), grad.double()


def _logits(seed: int, teacher_zero: bool = False):
    g = torch.Generator().manual_seed(seed)
    v = (torch.randn(2, 5, generator=g) * 3).float()
    z = (torch.randn(2, 5, generator=g) * 3).float()
    if teacher_zero:
        v[0, 1] = -math.inf
    return v, z


def _check(name, alpha, t, v, z, dtype, rel, abs_):
    ref, ref_grad = _reference_loss_and_grad(name, alpha, v, z, t)
    value, grad = _float_loss_and_grad(name, alpha, v, z, t, dtype)
    assert math.isfinite(value)
    assert abs(value - ref) <= max(rel * abs(ref), abs_), (value, ref)
    scale = ref_grad.abs().max().item()
    assert (grad - ref_grad).abs().max().item() <= max(rel * scale, abs_), (grad, ref_grad)


@pytest.mark.parametrize("t", TEMPERATURES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_renyi_loss_float32_matches_the_reference(alpha, t):
    v, z = _logits(0)
    _check("renyi", alpha, t, v, z, torch.float32, rel=1e-4, abs_=1e-6)


@pytest.mark.parametrize("t", TEMPERATURES)
@pytest.mark.parametrize("name", ["kl", "reverse_kl", "js", "hellinger", "tv", "skew_kl"])
def test_other_losses_float32_match_the_reference(name, t):
    v, z = _logits(1)
    _check(name, None, t, v, z, torch.float32, rel=1e-4, abs_=1e-6)


@pytest.mark.parametrize("t", [0.05, 1.0, 1e4])
@pytest.mark.parametrize("alpha", [1e-8, 0.5, 2.0, math.inf])
def test_float64_is_accurate_to_many_more_digits(alpha, t):
    v, z = _logits(2)
    _check("renyi", alpha, t, v, z, torch.float64, rel=1e-9, abs_=1e-12)
    _check("kl", None, t, v, z, torch.float64, rel=1e-9, abs_=1e-12)


@pytest.mark.parametrize("name", ["kl", "js", "hellinger", "tv", "skew_kl"])
def test_teacher_zeros_match_the_reference(name):
    v, z = _logits(3, teacher_zero=True)
    _check(name, None, 2.0, v, z, torch.float32, rel=1e-4, abs_=1e-6)


@pytest.mark.parametrize("alpha", [1e-3, 0.5, 2.0, math.inf])
def test_renyi_with_teacher_zeros_matches_the_reference(alpha):
    # (at alpha = 0 the scaled loss of such a teacher is infinite; the float code floors it)
    v, z = _logits(3, teacher_zero=True)
    _check("renyi", alpha, 2.0, v, z, torch.float32, rel=1e-4, abs_=1e-6)


@pytest.mark.parametrize("t", [1.0, 100.0])
def test_the_scaled_renyi_loss_is_continuous_down_to_alpha_zero(t):
    v, z = _logits(4)
    div = [dv.RenyiDivergence(a) for a in (0.0, 1e-12, 1e-6, 1e-3)]
    values = [d.loss(v.double(), z.double(), t).item() for d in div]
    # it tends to T^2 KL(Q || P), reached at alpha = 0
    assert values[1] == pytest.approx(values[0], rel=1e-9)
    assert values[2] == pytest.approx(values[0], rel=1e-5)
    assert values[3] == pytest.approx(values[0], rel=1e-2)
    reverse = dv.ReverseKLDivergence().loss(v.double(), z.double(), t).item()
    assert values[0] == pytest.approx(reverse, rel=1e-12)


@pytest.mark.parametrize("t", TEMPERATURES)
@pytest.mark.parametrize("name", ["dkd", "kl_std", "js_std", "dkd_std"])
def test_logit_losses_float32_match_the_reference(name, t):
    # DKD (target_weight 1, nontarget_weight 8) and standardized losses (Sun et al. 2024)
    v, z = _logits(5)
    _check(name, None, t, v, z, torch.float32, rel=1e-4, abs_=1e-6)


@pytest.mark.parametrize("t", [0.05, 4.0, 1e4])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0, math.inf])
def test_standardized_renyi_float32_matches_the_reference(alpha, t):
    v, z = _logits(6)
    _check("renyi_std", alpha, t, v, z, torch.float32, rel=1e-4, abs_=1e-6)


def test_dkd_with_teacher_zeros_matches_the_reference():
    v, z = _logits(3, teacher_zero=True)  # row 0 has p_1 = 0 at its target class 1
    _check("dkd", None, 2.0, v, z, torch.float32, rel=1e-4, abs_=1e-6)
