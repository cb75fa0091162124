import math

import pytest
import torch

from tnkd.students import MPSClassifier
from tnkd.teachers import MLP


def dense_reference(mps: MPSClassifier, x: torch.Tensor) -> torch.Tensor:
    """f(x) by explicit matrix products, site by site (independent of the engine)."""
    phi = mps.features(x)
    cores = mps.site_cores()
    out = []
    for b in range(x.shape[0]):
        mats = [torch.einsum("lsr,s->lr", cores[i], phi[b, i]) for i in range(mps.num_sites)]
        left = mps.left
        for m in mats[: mps.label_position]:
            left = left @ m
        right = mps.right
        for m in reversed(mats[mps.label_position :]):
            right = m @ right
        out.append(torch.einsum("l,lcr,r->c", left, mps.output_core, right))
    return torch.stack(out)


@pytest.mark.parametrize("feature_map", ["linear", "trig"])
@pytest.mark.parametrize("position", [0, 3, 7])
@pytest.mark.parametrize("method", ["native", "scan", "log_depth"])
def test_raw_output_equals_dense_reference_and_generic_path(feature_map, position, method):
    torch.manual_seed(0)
    mps = MPSClassifier(
        7,
        3,
        bond_dim=4,
        feature_map=feature_map,
        label_position=position,
        output="raw",
        init_std=0.8,
        method=method,
    ).double()
    x = torch.rand(5, 7, dtype=torch.float64)
    ref = dense_reference(mps, x)
    assert torch.allclose(mps.raw_forward(x), ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(mps.generic_forward(x), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["native", "scan"])
def test_uniform_cores_share_one_tensor(method):
    torch.manual_seed(1)
    mps = MPSClassifier(
        9, 2, bond_dim=3, uniform=True, output="raw", init_std=0.5, method=method
    ).double()
    x = torch.rand(4, 9, dtype=torch.float64)
    assert torch.allclose(mps.raw_forward(x), dense_reference(mps, x), rtol=1e-10)
    # the shared core's gradient sums the gradients of its 9 uses (dense reference: autograd)
    (grad,) = torch.autograd.grad(mps.raw_forward(x).sum(), mps.cores)
    (ref,) = torch.autograd.grad(dense_reference(mps, x).sum(), mps.cores)
    assert torch.allclose(grad, ref, rtol=1e-9, atol=1e-12)
    assert mps.cores.shape == (1, 3, 2, 3)
    assert mps.parameter_count() == 1 * 3 * 2 * 3 + 3 * 2 * 3 + 2 * 3


def test_linear_map_makes_f_affine_in_each_input():
    # With phi = [1, x] f is multilinear: f(.., t, ..) = (1 - t) f(.., 0, ..) + t f(.., 1, ..).
    torch.manual_seed(2)
    mps = MPSClassifier(6, 2, bond_dim=3, output="raw", init_std=1.0).double()
    x = torch.rand(1, 6, dtype=torch.float64).repeat(3, 1)
    x[0, 2], x[1, 2], x[2, 2] = 0.0, 1.0, 0.37
    f = mps.raw_forward(x)
    assert torch.allclose(f[2], 0.63 * f[0] + 0.37 * f[1], rtol=1e-10)


def test_normalized_logits_have_the_learned_norm():
    mps = MPSClassifier(10, 4, bond_dim=3, logit_scale=7.0)
    x = torch.rand(6, 10)
    logits = mps(x)
    assert torch.allclose(logits.norm(dim=-1), torch.full((6,), 7.0), rtol=1e-5)
    # same direction as the exact value f(x)
    raw = mps.raw_forward(x)
    assert torch.allclose(logits / 7.0, raw / raw.norm(dim=-1, keepdim=True), atol=1e-5)


def test_parameter_count_closed_form_and_compression():
    n, c, d, bond = 64, 10, 2, 10
    mps = MPSClassifier(n, c, bond_dim=bond)
    expected = (
        n * bond * d * bond + bond * c * bond + 2 * bond + 1
    )  # cores, output, boundaries, scale
    assert mps.parameter_count() == expected
    teacher = MLP(64, 10, hidden=(100,))
    assert mps.compression_ratio(teacher) == pytest.approx(
        (64 * 100 + 100 + 100 * 10 + 10) / expected
    )


@pytest.mark.parametrize("feature_map", ["linear", "trig"])
@pytest.mark.parametrize("method", ["auto", "log_depth"])  # auto: the native scan on CPU
def test_long_chain_is_finite_and_nonzero(feature_map, method):
    torch.manual_seed(0)
    mps = MPSClassifier(784, 10, bond_dim=20, feature_map=feature_map, method=method)
    x = torch.rand(8, 1, 28, 28)
    logits = mps(x)
    assert torch.isfinite(logits).all() and logits.abs().amax() > 0
    logits.logsumexp(-1).sum().backward()
    assert torch.isfinite(mps.cores.grad).all() and mps.cores.grad.abs().amax() > 0
    _, log_scale = mps.log_forward(x)
    assert torch.isfinite(log_scale).all()


def test_gradcheck_small():
    torch.manual_seed(3)
    mps = MPSClassifier(5, 2, bond_dim=2, output="raw", init_std=0.5).double()
    x = torch.rand(3, 5, dtype=torch.float64)

    def f(cores, out):
        return torch.func.functional_call(mps, {"cores": cores, "output_core": out}, (x,), {})

    torch.autograd.gradcheck(
        f,
        (
            mps.cores.detach().clone().requires_grad_(),
            mps.output_core.detach().clone().requires_grad_(),
        ),
    )


def test_bad_arguments_name_the_setting():
    with pytest.raises(ValueError, match="student bond_dim must be a positive integer, but got 0"):
        MPSClassifier(10, 2, bond_dim=0)
    with pytest.raises(
        ValueError, match=r"student bond_dim must be a positive integer, but got 2\.5"
    ):
        MPSClassifier(10, 2, bond_dim=2.5)
    with pytest.raises(ValueError, match="label_position must be an integer in \\[0, 10\\]"):
        MPSClassifier(10, 2, label_position=11)
    with pytest.raises(ValueError, match="MPSClassifier output must be one of"):
        MPSClassifier(10, 2, output="softmax")
    with pytest.raises(ValueError, match=r"unknown feature map 'rbf'"):
        MPSClassifier(10, 2, feature_map="rbf")
    mps = MPSClassifier(64, 10)
    with pytest.raises(ValueError, match="expects 64 inputs per sample, but got 784"):
        mps(torch.rand(2, 1, 28, 28))


def test_graph_is_the_diagram():
    mps = MPSClassifier(4, 3, bond_dim=2, label_position=2)
    graph = mps.to_graph()
    names = [n.name for n in graph.nodes]
    assert names[:7] == ["left", "site_0", "site_1", "output", "site_2", "site_3", "right"]
    assert graph.input_nodes == ["x_0", "x_1", "x_2", "x_3"]
    assert [e.dimension for e in graph.output_edges] == [3]
    # bonds: 6 between 7 chain tensors, 4 physical, 1 dangling label
    assert len(graph.edges()) == 6 + 4 + 1
    assert graph.node("site_1")["phys"].dimension == 2
    ax = mps.draw()
    assert ax is not None


def test_state_dict_round_trip_and_compile():
    torch.manual_seed(4)
    a = MPSClassifier(12, 3, bond_dim=3)
    b = MPSClassifier(12, 3, bond_dim=3)
    b.load_state_dict(a.state_dict())
    x = torch.rand(4, 12)
    assert torch.equal(a(x), b(x))
    compiled = torch.compile(a, backend="eager")
    assert torch.allclose(compiled(x), a(x), atol=1e-6)


def test_init_is_near_identity():
    mps = MPSClassifier(50, 5, bond_dim=6, init_std=0.0, output="raw")
    f = mps.raw_forward(torch.rand(3, 50))
    # zero noise: every transfer matrix is the identity, so f_c = left . right = 1 for all c
    assert torch.allclose(f, torch.ones(3, 5), atol=1e-6)
    assert math.isclose(float(mps.left.detach() @ mps.right.detach()), 1.0, rel_tol=1e-6)


def test_pooled_student_equals_the_student_on_pooled_images():
    torch.manual_seed(0)
    pooled = MPSClassifier(num_sites=16, num_classes=3, bond_dim=4, pool=2, init_std=0.3)
    plain = MPSClassifier(num_sites=16, num_classes=3, bond_dim=4, init_std=0.3)
    plain.load_state_dict(pooled.state_dict())
    x = torch.rand(5, 1, 8, 8)
    # 2x2 block means by hand
    blocks = x.reshape(5, 1, 4, 2, 4, 2).mean(dim=(3, 5))
    assert pooled.num_inputs == 64
    assert torch.allclose(pooled(x), plain(blocks), atol=1e-6)
    with pytest.raises(ValueError, match="pool=2 expects"):
        pooled(torch.rand(5, 64))


def test_patch_student_sees_row_major_blocks_of_pixels():
    torch.manual_seed(0)
    fmap = {"name": "learnable", "dim": 3, "in_features": 4, "num_sites": 16}
    patched = MPSClassifier(
        num_sites=16, num_classes=3, bond_dim=4, patch=2, feature_map=fmap, init_std=0.3
    ).double()
    pixel = MPSClassifier(
        num_sites=16,
        num_classes=3,
        bond_dim=4,
        feature_map={"name": "learnable", "dim": 3, "in_features": 1, "num_sites": 16},
        init_std=0.3,
    ).double()
    with torch.no_grad():
        # the patch map reads only each block's bottom-right pixel (index 3 of the row-major 2x2)
        patched.feature_map.weight.zero_()
        patched.feature_map.weight[:, 3, :] = pixel.feature_map.weight[:, 0, :]
        patched.feature_map.bias.copy_(pixel.feature_map.bias)
        for name in ("cores", "left", "right", "output_core", "log_logit_scale"):
            getattr(patched, name).copy_(getattr(pixel, name))
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    corners = x[:, :, 1::2, 1::2]  # the bottom-right pixel of every 2x2 block, by hand
    assert patched.num_inputs == 64
    assert torch.allclose(patched(x), pixel(corners), atol=1e-10)
    # the tensornetwork graph contraction agrees with the fast chain in patch mode too
    patched.output = "raw"
    assert torch.allclose(patched.generic_forward(x), patched.raw_forward(x), rtol=1e-9)


def test_patch_student_rejects_maps_and_inputs_that_do_not_fit():
    with pytest.raises(ValueError, match="in_features: 4"):
        MPSClassifier(num_sites=16, num_classes=3, patch=2, feature_map="linear")
    with pytest.raises(ValueError, match="patch=1 gives each site 1"):
        MPSClassifier(
            num_sites=16, num_classes=3, feature_map={"name": "learnable", "in_features": 4}
        )
    with pytest.raises(ValueError, match="cannot be combined"):
        MPSClassifier(num_sites=16, num_classes=3, pool=2, patch=2)
    student = MPSClassifier(
        num_sites=16, num_classes=3, patch=2, feature_map={"name": "learnable", "in_features": 4}
    )
    with pytest.raises(ValueError, match="patch=2 expects"):
        student(torch.rand(5, 64))


def test_method_names_the_kernel_and_the_plan_says_it():
    mps = MPSClassifier(8, 3, bond_dim=4, method="scan")
    assert mps.plan().kernel == "scan (torch steps, autograd)"
    assert mps.plan().reason == "asked for by name"
    assert MPSClassifier(8, 3).plan().reason.startswith("the graph is a chain; ")
    mps.method = "log_depth"  # switches the kernel of the next call
    assert mps.plan().kernel == "log-depth products"
    with pytest.raises(ValueError, match="'tree' is now named 'log_depth'"):  # its old name
        MPSClassifier(8, 3, bond_dim=4, method="tree")
    with pytest.raises(ValueError, match="MPSClassifier method must be one of"):
        MPSClassifier(8, 3, bond_dim=4, method="fastest")
