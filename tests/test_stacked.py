import itertools

import torch

from tnkd.students import MPSClassifier, StackedMPS


def multilinear_design(x: torch.Tensor) -> torch.Tensor:
    """Every monomial prod_{i in S} x_i, S a subset of the variables: the [1, x] MPS's span."""
    n = x.shape[1]
    cols = [
        x[:, list(s)].prod(1) if s else torch.ones(x.shape[0], dtype=x.dtype)
        for k in range(n + 1)
        for s in itertools.combinations(range(n), k)
    ]
    return torch.stack(cols, 1)


def target(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0] ** 2 + x[:, 0] * x[:, 1]


def grid(points: int = 4) -> torch.Tensor:
    axis = torch.linspace(0, 1, points, dtype=torch.float64)
    return torch.cartesian_prod(axis, axis, axis)


def test_stacked_mps_with_copying_first_layer_represents_x1_squared_plus_x1x2():
    # z = 2 copies of d = 3 inputs: k = 6 hidden values y = (x1, x1, x2, x2, x3, x3).
    z, d = 2, 3
    copies = torch.zeros(2, 2, 2, z * d, dtype=torch.float64)  # [i1, i2, i3, j]
    for j in range(z * d):
        i = [0, 0, 0]
        i[j // z] = 1
        copies[(*tuple(i), j)] = 1.0  # y_j = x_(j // z)
    first = MPSClassifier.from_tensor(copies)
    # second layer: the multilinear polynomial y1 y2 + y1 y3 (= x1^2 + x1 x2)
    poly = torch.zeros(*([2] * (z * d)), 1, dtype=torch.float64)
    poly[(1, 1, 0, 0, 0, 0, 0)] = 1.0
    poly[(1, 0, 1, 0, 0, 0, 0)] = 1.0
    second = MPSClassifier.from_tensor(poly)
    net = StackedMPS.from_layers(first, second)
    x = torch.rand(50, 3, dtype=torch.float64)
    assert torch.allclose(net.first(x), x.repeat_interleave(z, 1), atol=1e-12)
    assert torch.allclose(net(x)[:, 0], target(x), atol=1e-12)
    assert torch.allclose(net.generic_forward(x)[:, 0], target(x), atol=1e-12)


def test_a_single_linear_map_mps_cannot_fit_x1_squared():
    # Any [1, x] MPS, at any bond dimension, is a multilinear polynomial of x1, x2, x3; its best
    # least-squares error on a 4x4x4 grid is the residual of the projection onto that span.
    x = grid()
    design = multilinear_design(x)
    assert design.shape[1] == 8
    coef = torch.linalg.lstsq(design, target(x).unsqueeze(1)).solution
    residual = (design @ coef).squeeze(1) - target(x)
    floor = residual.pow(2).mean().item()
    assert floor > 1e-3  # x1^2 on 4 points of x1 is not affine in x1: strictly above zero
    # the best MPS (full bond dimension, TT-SVD of the least-squares coefficients) reaches the
    # floor and no lower; more bond dimension cannot help
    c = torch.zeros(2, 2, 2, 1, dtype=torch.float64)
    for col, s in enumerate(s for k in range(4) for s in itertools.combinations(range(3), k)):
        idx = [0, 0, 0]
        for i in s:
            idx[i] = 1
        c[(*tuple(idx), 0)] = coef[col, 0]
    best = MPSClassifier.from_tensor(c)
    err = (best(x)[:, 0] - target(x)).pow(2).mean().item()
    assert abs(err - floor) < 1e-12
    # and gradient training of a wide MPS stays above the floor
    torch.manual_seed(0)
    mps = MPSClassifier(3, 1, bond_dim=8, output="raw", init_std=0.3).double()
    opt = torch.optim.Adam(mps.parameters(), lr=1e-2)
    for _ in range(400):
        opt.zero_grad()
        loss = (mps(x)[:, 0] - target(x)).pow(2).mean()
        loss.backward()
        opt.step()
    assert loss.item() >= floor - 1e-9


def test_stacked_trains_and_beats_the_multilinear_floor():
    torch.manual_seed(1)
    x = grid()
    net = StackedMPS(
        3, 1, hidden=6, bond_dim=4, hidden_output="raw", output="raw", init_std=0.3
    ).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(600):
        opt.zero_grad()
        loss = (net(x)[:, 0] - target(x)).pow(2).mean()
        loss.backward()
        opt.step()
    design = multilinear_design(x)
    coef = torch.linalg.lstsq(design, target(x).unsqueeze(1)).solution
    floor = ((design @ coef).squeeze(1) - target(x)).pow(2).mean().item()
    assert loss.item() < 0.1 * floor, (loss.item(), floor)


def test_classifier_shapes_state_dict_and_bad_stack():
    torch.manual_seed(2)
    a = StackedMPS(64, 10, hidden=6, bond_dim=(5, 4))
    b = StackedMPS(64, 10, hidden=6, bond_dim=(5, 4))
    b.load_state_dict(a.state_dict())
    x = torch.rand(3, 1, 8, 8)
    out = a(x)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    assert torch.equal(out, b(x))
    assert a.parameter_count() == a.first.parameter_count() + a.second.parameter_count()
    assert len(a.to_graphs()) == 2
    try:
        StackedMPS.from_layers(MPSClassifier(4, 3), MPSClassifier(5, 2))
    except ValueError as e:
        assert "3 outputs but the second layer has 5 sites" in str(e)
    else:
        raise AssertionError("mismatched layers must raise")
