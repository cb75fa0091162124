import math

import pytest
import torch
from torch import nn

import tnkd.students.tt_linear as tt_linear_module
from tnkd.students import TTMLP, TTLinear, TTMLPFromTeacher
from tnkd.teachers import CNN, MLP, save_teacher
from tnkd.tn.contraction import CompiledNetwork


def test_matches_the_dense_product_of_its_weight():
    torch.manual_seed(0)
    layer = TTLinear(60, 24, (3, 4, 5), (2, 3, 4), ranks=[3, 5]).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(7, 60, dtype=torch.float64)
    assert torch.allclose(layer(x), x @ layer.dense_weight().T + layer.bias, atol=1e-12)


@pytest.mark.parametrize(
    ("in_factors", "out_factors", "ranks", "lead"),
    [
        ((3, 4, 5), (2, 3, 4), [3, 5], (7,)),
        ((8, 8, 8, 8), (2, 2, 2, 2), 8, (2, 3)),
        ((8, 8, 8, 8), (8, 8, 8, 8), 4, (33,)),
        ((7, 7, 4, 4), (5, 5, 6, 8), [4, 2, 3], (1,)),
        ((5, 6), (7, 2), 3, (2, 1, 4)),
        ((16,), (9,), [], ()),
    ],
)
def test_equals_dense_product_for_shapes_ranks_and_leading_dims(
    in_factors, out_factors, ranks, lead
):
    torch.manual_seed(7)
    in_features, out_features = math.prod(in_factors), math.prod(out_factors)
    layer = TTLinear(in_features, out_features, in_factors, out_factors, ranks=ranks).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(*lead, in_features, dtype=torch.float64)
    expected = x @ layer.dense_weight().T + layer.bias
    assert layer(x).shape == (*lead, out_features)
    assert torch.allclose(layer(x), expected, atol=1e-10)
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-10)


def test_graph_compiled_generically_equals_the_layer():
    torch.manual_seed(8)
    layer = TTLinear(60, 24, (3, 4, 5), (2, 3, 4), ranks=[3, 5], bias=False).double()
    graph = layer.to_graph()
    net = CompiledNetwork(graph)
    cores = [node.tensor for node in graph.nodes[:-1]]  # the layer's cores, end ranks dropped
    for batch in (3, 9, 3):
        x = torch.randn(batch, 60, dtype=torch.float64)
        out = net([*cores, x.reshape(batch, 3, 4, 5)]).reshape(batch, 24)
        assert torch.allclose(out, layer(x), atol=1e-12)
    # one input node: the generic path is planned on the batched shapes, once per batch size
    assert net.plan_per_shape and net.plans == 2


def test_published_example_einsum_and_parameter_share():
    # 4096 = 8.8.8.8 inputs, 16 = 2.2.2.2 outputs, rank 8
    torch.manual_seed(1)
    layer = TTLinear(4096, 16, (8, 8, 8, 8), (2, 2, 2, 2), ranks=8, bias=False).double()
    # tnkd stores cores as (rank, in, out, rank); the einsum wants (in, out, rank, rank)
    first, mid1, mid2, last = layer.cores
    a = first[0]  # (in 8, out 2, rank 8)
    b, c = mid1.permute(1, 2, 0, 3), mid2.permute(1, 2, 0, 3)  # (8, 2, 8, 8)
    d = last[..., 0].permute(1, 2, 0)  # (8, 2, 8)
    assert [tuple(t.shape) for t in (a, b, c, d)] == [
        (8, 2, 8),
        (8, 2, 8, 8),
        (8, 2, 8, 8),
        (8, 2, 8),
    ]
    x = torch.randn(3, 4096, dtype=torch.float64)
    expected = torch.einsum("aei,bfij,cgjk,dhk,nabcd->nefgh", a, b, c, d, x.reshape(3, 8, 8, 8, 8))
    assert torch.allclose(layer(x), expected.reshape(3, 16), atol=1e-12)
    assert layer.weight_parameter_count() == 2304
    assert layer.weight_parameter_count() / (4096 * 16) == pytest.approx(0.03515625)
    with_bias = TTLinear(4096, 16, (8, 8, 8, 8), (2, 2, 2, 2), ranks=8)
    assert sum(p.numel() for p in with_bias.parameters()) == 2304 + 16


def test_from_dense_full_rank_is_exact_and_truncation_errs():
    torch.manual_seed(2)
    dense = nn.Linear(24, 12).double()
    layer = TTLinear.from_linear(dense, in_factors=(2, 3, 4), out_factors=(3, 2, 2))
    x = torch.randn(5, 24, dtype=torch.float64)
    assert torch.allclose(layer(x), dense(x), atol=1e-12)
    small = TTLinear.from_linear(dense, in_factors=(2, 3, 4), out_factors=(3, 2, 2), ranks=2)
    assert small.ranks == (2, 2)
    assert (small(x) - dense(x)).norm() > 1e-3


def test_forward_does_not_rebuild_the_weight_and_plans_once(monkeypatch):
    layer = TTLinear(64, 16, (4, 4, 4), (2, 2, 4), ranks=4)

    def forbidden(*args, **kwargs):
        raise AssertionError("forward must not build the dense weight")

    monkeypatch.setattr(layer, "dense_weight", forbidden)
    calls = []
    planner = tt_linear_module.plan_for
    monkeypatch.setattr(
        tt_linear_module, "plan_for", lambda *a: calls.append(a[0].shape) or planner(*a)
    )
    layer(torch.randn(3, 64))
    layer(torch.randn(5, 64))
    layer(torch.randn(5, 64))
    layer(torch.randn(5, 1, 64))
    assert layer.plans == 2 and calls == [(3, 64), (5, 64)]  # once per batch size
    x = torch.randn(5, 64)
    assert layer.matvec_plan(x) is layer.matvec_plan(x)


def test_gradcheck():
    torch.manual_seed(3)
    layer = TTLinear(12, 6, (3, 4), (2, 3), ranks=2).double()
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_gradcheck_in_the_cores_and_bias():
    torch.manual_seed(9)
    layer = TTLinear(24, 12, (2, 3, 4), (3, 2, 2), ranks=[2, 3]).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 3, 24, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in layer.named_parameters()]

    def f(x, *tensors):
        return torch.func.functional_call(layer, dict(zip(names, tensors, strict=True)), (x,))

    inputs = (x, *(p.detach().clone().requires_grad_() for p in layer.parameters()))
    assert torch.autograd.gradcheck(f, inputs)


def test_init_has_dense_like_output_scale():
    torch.manual_seed(4)
    layer = TTLinear(4096, 256, ranks=8, bias=False)
    x = torch.randn(64, 4096)
    ratio = layer(x).std() / x.std()
    assert 0.3 < ratio < 3.0  # a dense layer with Var(W) = 1/in keeps the scale: ratio ~ 1


def test_bad_arguments():
    with pytest.raises(
        ValueError,
        match=r"TTLinear in_factors \(8, 8, 8, 8\) multiply to 4096 but the size is 4000",
    ):
        TTLinear(4000, 16, (8, 8, 8, 8), (2, 2, 2, 2))
    with pytest.raises(ValueError, match="TTLinear ranks must be 3 positive integers"):
        TTLinear(4096, 16, (8, 8, 8, 8), (2, 2, 2, 2), ranks=[8, 0, 8])
    with pytest.raises(ValueError, match="expects 4096 input features, but got 10"):
        TTLinear(4096, 16, (8, 8, 8, 8), (2, 2, 2, 2))(torch.randn(2, 10))


def test_ttmlp_from_a_trained_mlp():
    torch.manual_seed(5)
    mlp = MLP(784, 10, hidden=(256, 256)).double().eval()
    exact = TTMLP.from_mlp(mlp, ranks=None, tolerance=1e-12).double().eval()
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    assert torch.allclose(exact(x), mlp(x), atol=1e-8)
    small = TTMLP.from_mlp(mlp, ranks=4)
    assert len(small.tt_layers()) == 2  # the 256 -> 10 class layer stays dense
    assert small.num_inputs == 784 and small.num_classes == 10
    assert small.compression_ratio(mlp) > 10
    assert small.to_graph().input_nodes == ["x"]
    # the student owns its weights
    assert all(p.data_ptr() != q.data_ptr() for p in small.parameters() for q in mlp.parameters())


def test_ttmlp_from_a_saved_teacher_file(tmp_path):
    torch.manual_seed(6)
    mlp = MLP(64, 10, hidden=(128,)).eval()
    path = save_teacher(mlp, tmp_path / "mlp.pt")
    student = TTMLPFromTeacher(str(path), ranks=3, num_factors=2).eval()
    reference = TTMLP.from_mlp(mlp, ranks=3, num_factors=2).eval()
    x = torch.rand(5, 64)
    assert torch.equal(student(x), reference(x))
    assert [t.ranks for t in student.tt_layers()] == [t.ranks for t in reference.tt_layers()]
    cnn = save_teacher(CNN((1, 8, 8), 10, channels=(4,), hidden=8), tmp_path / "cnn.pt")
    with pytest.raises(ValueError, match="needs an MLP teacher"):
        TTMLPFromTeacher(str(cnn))
    with pytest.raises(FileNotFoundError):
        TTMLPFromTeacher(str(tmp_path / "missing.pt"))


def test_empty_factors_are_an_error_not_the_default():
    with pytest.raises(ValueError, match="in_factors must be positive integers"):
        TTLinear(16, 4, in_factors=())
    with pytest.raises(ValueError, match="positive integers"):
        TTLinear.from_dense(torch.randn(4, 16), in_factors=())


def test_from_dense_leaves_the_global_random_state_alone():
    weight = torch.randn(16, 64)
    torch.manual_seed(3)
    TTLinear.from_dense(weight, ranks=2)
    after = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(3))
