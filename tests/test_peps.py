import pytest
import torch
from tn_reference import dense_coefficients, evaluate_dense

from tnkd.students import PEPSClassifier
from tnkd.students.peps import peps_graph
from tnkd.tn.stable import planned_cost


@pytest.mark.parametrize(
    ("input_shape", "kwargs"),
    [
        ((1, 4, 4), {"patch": 2, "bond_dim": 2}),  # the 2x2-patch PEPS of the notebook
        ((1, 2, 3), {"patch": 1, "bond_dim": 3, "feature_map": "trig"}),  # 2x3 pixels
        ((1, 3, 3), {"patch": 1, "bond_dim": 2, "label_site": (0, 2)}),
    ],
)
def test_peps_equals_the_dense_contraction_of_all_its_cores(input_shape, kwargs):
    for method in ("reference", "stable"):
        torch.manual_seed(0)
        peps = PEPSClassifier(
            input_shape, num_classes=3, output="raw", init_std=0.5, method=method, **kwargs
        ).double()
        x = torch.rand(4, *input_shape, dtype=torch.float64)
        w = dense_coefficients(peps.to_graph())
        ref = evaluate_dense(w, list(peps.features(x).unbind(1)))
        assert peps.plan().engine == method
        assert torch.allclose(peps(x), ref, rtol=1e-10, atol=1e-12), method


def test_peps_gradients_match_finite_differences():
    torch.manual_seed(1)
    peps = PEPSClassifier((1, 2, 2), num_classes=2, patch=1, bond_dim=2, output="raw", init_std=0.5)
    peps = peps.double()
    x = torch.rand(3, 1, 2, 2, dtype=torch.float64)
    leaves = [p.detach().clone().requires_grad_() for p in peps.blocks]

    def f(*blocks):
        inputs = [
            b
            for b, is_input in zip(peps.operand_blocks(x), peps._block_kinds, strict=False)
            if is_input
        ]
        it_p, it_x = iter(blocks), iter(inputs)
        ops = [next(it_x) if is_input else next(it_p) for is_input in peps._block_kinds]
        values, log_scale = peps.network.contract(ops)
        return values * log_scale.exp().unsqueeze(1)

    assert torch.autograd.gradcheck(f, leaves)


def test_grid_shapes_and_label_site():
    graph = peps_graph(3, 4, phys_dim=2, bond_dim=3, num_classes=5)
    node = graph.node("p1_2")  # the centre (rows // 2, cols // 2) has 4 bonds, phys and label
    assert node.axis_names == ["up", "left", "right", "down", "phys", "label"]
    assert graph.node("p0_0").axis_names == ["right", "down", "phys"]
    assert len(graph.input_nodes) == 12


def test_exact_cost_grows_with_the_grid_width():
    small = planned_cost(peps_graph(2, 2, 2, 3, 10))["largest_intermediate"]
    wide = planned_cost(peps_graph(4, 4, 2, 3, 10))["largest_intermediate"]
    assert wide > small


def test_bad_peps_settings_are_clear_errors():
    with pytest.raises(ValueError, match="label_site must be inside"):
        peps_graph(2, 2, 2, 2, 2, label_site=(3, 0))
    with pytest.raises(ValueError, match="at least 2 sites"):
        peps_graph(1, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="4096"):
        PEPSClassifier((1, 28, 28), patch=7)  # the product map of 49 pixels would be 2^49
