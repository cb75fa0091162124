import itertools
from collections.abc import Callable

import jsonargparse
import pytest
import torch
from tn_reference import dense_coefficients, evaluate_dense
from torch import nn

from tnkd.students import GraphStudent, MPSClassifier, PEPSClassifier, TreeClassifier
from tnkd.tn.graph import TNGraph, connect, make_node


def draw_mps(mps: MPSClassifier) -> TNGraph:
    """The MPS as a user draws it: nodes from the classifier's tensors, edges by hand."""
    p, n = mps.label_position, mps.num_sites
    left = make_node(mps.left, "L", ["r"])
    right = make_node(mps.right, "R", ["l"])
    out = make_node(mps.output_core, "O", ["l", "label", "r"])
    sites = [make_node(mps.cores[i], f"A{i}", ["l", "phys", "r"]) for i in range(n)]
    chain = [left, *sites[:p], out, *sites[p:], right]
    for a, b in itertools.pairwise(chain):
        connect(a, "r", b, "l")
    xs = [make_node((2,), f"x{i}", ["phys"]) for i in range(n)]
    for a, x in zip(sites, xs, strict=False):
        connect(a, "phys", x, "phys")
    return TNGraph(chain + xs, [x.name for x in xs], [out["label"]])


@pytest.mark.parametrize("feature_map", ["linear", "trig"])
def test_a_user_drawn_mps_equals_mps_classifier_with_the_same_cores(feature_map):
    torch.manual_seed(0)
    mps = MPSClassifier(9, 4, bond_dim=5, feature_map=feature_map, init_std=0.5).double()
    drawn = GraphStudent(draw_mps(mps), feature_map=feature_map).double()
    with torch.no_grad():
        drawn.log_logit_scale.copy_(mps.log_logit_scale)
    x = torch.rand(6, 9, dtype=torch.float64)
    assert torch.allclose(drawn.raw_forward(x), mps.raw_forward(x), rtol=1e-12, atol=1e-12)
    assert torch.allclose(drawn(x), mps(x), rtol=1e-12, atol=1e-12)


def test_graph_student_equals_the_dense_coefficient_tensor_and_its_gradients_are_right():
    torch.manual_seed(1)
    mps = MPSClassifier(5, 3, bond_dim=3, init_std=0.5).double()
    student = GraphStudent(draw_mps(mps), output="raw").double()
    x = torch.rand(4, 5, dtype=torch.float64)
    w = dense_coefficients(student.to_graph())
    ref = evaluate_dense(w, list(student.features(x).unbind(1)))
    assert torch.allclose(student(x), ref, rtol=1e-12, atol=1e-12)

    blocks = [b.detach().clone().requires_grad_() for b in student.operand_blocks(x)]

    def raw(*bs):
        values, log_scale = student.network.contract(list(bs))
        return values * log_scale.exp().unsqueeze(1)

    assert torch.autograd.gradcheck(raw, blocks)


@pytest.mark.parametrize(
    "make",
    [
        lambda: MPSClassifier(6, 3, bond_dim=4, init_std=0.0),
        lambda: TreeClassifier(input_shape=(1, 4, 4), num_classes=3, bond_dim=4, init_std=0.0),
        lambda: PEPSClassifier(
            input_shape=(1, 4, 4), num_classes=3, bond_dim=2, patch=2, init_std=0.0
        ),
    ],
)
def test_copy_tensor_initialisation_contracts_to_the_bond_dimension(make):
    """Nodes drawn from shapes start as copy tensors: with the [1, x] map (w = e_0, w . phi = 1)
    every class of the contraction equals the number of channels, for a chain, a tree or loops."""
    student = make()
    if isinstance(student, MPSClassifier):  # draw it from shapes, not tensors
        graph = draw_mps(student)
        for node in graph.nodes:
            node.tensor = torch.zeros_like(node.tensor)
        student = GraphStudent(graph, output="raw", init_std=0.0)
        channels = 4
    else:
        student.output = "raw"
        channels = 4 if isinstance(student, TreeClassifier) else 2
    x = torch.rand(
        5,
        *((6,) if isinstance(student, GraphStudent) and student.input_shape is None else (1, 4, 4)),
    )
    assert torch.allclose(student(x), torch.full((5, 3), float(channels)), rtol=1e-5)


def test_to_graph_round_trips():
    tree = TreeClassifier(input_shape=(1, 4, 4), num_classes=3, bond_dim=3, init_std=0.3)
    again = GraphStudent(tree.to_graph(), input_shape=(1, 4, 4))
    with torch.no_grad():
        again.log_logit_scale.copy_(tree.log_logit_scale)
    x = torch.rand(3, 1, 4, 4)
    assert torch.allclose(again(x), tree(x), atol=1e-6)


def test_product_map_of_a_patch_is_the_kronecker_product_of_the_pixel_maps():
    peps = PEPSClassifier(input_shape=(1, 4, 4), num_classes=3, bond_dim=2, patch=2)
    x = torch.rand(2, 1, 4, 4)
    phi = peps.features(x)
    assert phi.shape == (2, 4, 16)
    top_left = x[0, 0, :2, :2].reshape(-1)  # the first patch, row-major
    one = [torch.tensor([1.0, v]) for v in top_left]
    ref = torch.kron(torch.kron(torch.kron(one[0], one[1]), one[2]), one[3])
    assert torch.allclose(phi[0, 0], ref)


def test_input_positions_tie_input_nodes_to_sites():
    torch.manual_seed(2)
    mps = MPSClassifier(4, 2, bond_dim=3, init_std=0.5).double()
    graph = draw_mps(mps)
    flipped = GraphStudent(graph, output="raw", input_positions=[3, 2, 1, 0]).double()
    x = torch.rand(3, 4, dtype=torch.float64)
    mps.output = "raw"
    assert torch.allclose(flipped(x), mps(x.flip(1)), rtol=1e-12)


def test_yaml_names_a_graph_function_or_a_family_by_class_path():
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--student", type=Callable[[], nn.Module])  # as `tnkd compare` takes it
    cfg = parser.parse_object(
        {
            "student": {
                "class_path": "tnkd.students.GraphStudent",
                "init_args": {
                    "graph": "tnkd.students.tree.tree_graph",
                    "graph_args": {"grid": [4, 4], "phys_dim": 2, "bond_dim": 3, "num_classes": 5},
                    "input_shape": [1, 4, 4],
                },
            }
        }
    )
    student = parser.instantiate(cfg).student()
    assert isinstance(student, GraphStudent) and student.num_classes == 5
    assert student(torch.rand(2, 1, 4, 4)).shape == (2, 5)
    cfg = parser.parse_object(
        {
            "student": {
                "class_path": "tnkd.students.PEPSClassifier",
                "init_args": {"input_shape": [1, 4, 4], "patch": 2, "bond_dim": 2},
            }
        }
    )
    assert parser.instantiate(cfg).student()(torch.rand(2, 1, 4, 4)).shape == (2, 10)


def test_graph_student_trains():
    torch.manual_seed(0)
    student = TreeClassifier(input_shape=(1, 4, 4), num_classes=2, bond_dim=3)
    x = torch.rand(32, 1, 4, 4)
    y = (x[:, 0, :2].mean((1, 2)) > x[:, 0, 2:].mean((1, 2))).long()
    opt = torch.optim.Adam(student.parameters(), lr=0.05)
    first = None
    for _ in range(25):
        loss = nn.functional.cross_entropy(student(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def two_labels() -> TNGraph:
    a = make_node((2, 3, 4), "a", ["phys", "label", "bond"])
    b = make_node((4, 2, 3), "b", ["bond", "phys", "label"])
    connect(a, "bond", b, "bond")
    xs = [make_node((2,), f"x{i}", ["phys"]) for i in range(2)]
    connect(a, "phys", xs[0], "phys")
    connect(b, "phys", xs[1], "phys")
    return TNGraph([a, b, *xs], ["x0", "x1"], [a["label"], b["label"]])


def test_bad_graphs_are_clear_errors():
    with pytest.raises(ValueError, match="exactly one dangling edge"):
        GraphStudent(two_labels())
    mps = MPSClassifier(3, 2, bond_dim=2)
    with pytest.raises(ValueError, match="gives 3 features per site"):
        GraphStudent(draw_mps(mps), feature_map={"name": "poly", "degree": 2})
    with pytest.raises(ValueError, match="input_positions has 2 sites"):
        GraphStudent(draw_mps(mps), input_positions=[0, 1])
    with pytest.raises(ValueError, match="cannot import graph function"):
        GraphStudent("tnkd.students.no_such_graph")
    with pytest.raises(ValueError, match="graph_args are for a graph given as a function"):
        GraphStudent(draw_mps(mps), graph_args={"grid": [2]})
    with pytest.raises(ValueError, match="must be a TNGraph"):
        GraphStudent(lambda: 3)
    with pytest.raises(ValueError, match="method must be one of"):
        GraphStudent(draw_mps(mps), method="fast")


def test_students_pickle_and_deepcopy():
    import copy
    import pickle

    tree = TreeClassifier(input_shape=(1, 4, 4), num_classes=3, bond_dim=3)
    x = torch.rand(2, 1, 4, 4)
    tree(x)  # builds the contraction function
    for clone in (copy.deepcopy(tree), pickle.loads(pickle.dumps(tree))):
        assert torch.allclose(clone(x), tree(x))
