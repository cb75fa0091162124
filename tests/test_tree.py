import pytest
import torch
from tn_reference import dense_coefficients, evaluate_dense

from tnkd.students import TreeClassifier
from tnkd.students.tree import tree_graph


@pytest.mark.parametrize(
    ("input_shape", "kwargs"),
    [
        ((8,), {"bond_dim": 3}),  # a chain of 8 sites: a balanced tree
        ((1, 4, 4), {"bond_dim": 5}),  # 2D pairs, alternating rows and columns
        ((1, 3, 2), {"bond_dim": 4}),  # odd sites are passed up unchanged
        ((1, 4, 4), {"bond_dim": 3, "patch": 2}),  # 2x2 patches: product features, d = 16
        ((1, 4, 4), {"bond_dim": 3, "feature_map": "trig", "pool": 2}),
    ],
)
def test_tree_equals_the_dense_contraction_of_all_its_cores(input_shape, kwargs):
    torch.manual_seed(0)
    tree = TreeClassifier(input_shape, num_classes=3, output="raw", init_std=0.5, **kwargs).double()
    x = torch.rand(5, *input_shape, dtype=torch.float64)
    w = dense_coefficients(tree.to_graph())
    ref = evaluate_dense(w, list(tree.features(x).unbind(1)))
    assert torch.allclose(tree(x), ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(tree.generic_forward(x), ref, rtol=1e-10, atol=1e-12)


def test_tree_gradients_match_finite_differences():
    torch.manual_seed(1)
    tree = TreeClassifier((1, 4, 2), num_classes=2, bond_dim=3, output="raw", init_std=0.5).double()
    x = torch.rand(3, 1, 4, 2, dtype=torch.float64)
    leaves = [p.detach().clone().requires_grad_() for p in tree.blocks]

    def f(*blocks):
        inputs = [
            b
            for b, is_input in zip(tree.operand_blocks(x), tree._block_kinds, strict=False)
            if is_input
        ]
        it_p, it_x = iter(blocks), iter(inputs)
        ops = [next(it_x) if is_input else next(it_p) for is_input in tree._block_kinds]
        values, log_scale = tree.network.contract(ops)
        return values * log_scale.exp().unsqueeze(1)

    assert torch.autograd.gradcheck(f, leaves)


def test_tree_shapes_and_parameter_count():
    graph = tree_graph((8, 8), phys_dim=2, bond_dim=8, num_classes=10)
    shapes = sorted({tuple(n.shape) for n in graph.nodes if n.name not in graph.input_nodes})
    # leaves see 2 pixels (4 states: the bond is capped at 4), then 8, and the root carries 10
    assert shapes == [(2, 2, 4), (4, 4, 8), (8, 8, 8), (8, 8, 10)]
    tree = TreeClassifier((1, 8, 8), num_classes=10, bond_dim=8)
    expected = 32 * 16 + 16 * 128 + (8 + 4 + 2) * 512 + 640 + 1  # + the logit scale
    assert tree.parameter_count() == expected


def test_odd_sites_pass_up_and_every_site_is_used_once():
    graph = tree_graph((3, 3), phys_dim=2, bond_dim=4, num_classes=2)
    spec = graph.spec()
    assert len(graph.input_nodes) == 9
    assert len([n for n in spec.node_names if n not in spec.input_nodes]) == 8  # n - 1 nodes
    for name in graph.input_nodes:
        assert len(graph.node(name).edges) == 1 and not graph.node(name).edges[0].is_dangling()


def test_tree_draws_with_positions_for_every_node():
    tree = TreeClassifier((1, 4, 4), num_classes=3, bond_dim=3)
    graph = tree.to_graph()
    assert set(graph.positions) == {n.name for n in graph.nodes}
    assert tree.draw() is not None


def test_bad_tree_settings_are_clear_errors():
    with pytest.raises(ValueError, match="at least 2 sites"):
        tree_graph((1,), 2, 3, 2)
    with pytest.raises(ValueError, match="bond_dim must be a positive integer"):
        TreeClassifier((1, 4, 4), bond_dim=0)
    with pytest.raises(ValueError, match="must divide the image size"):
        TreeClassifier((1, 5, 5), pool=2)
