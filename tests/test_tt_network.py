import math

import pytest
import torch

from tnkd.students import TTNetwork
from tnkd.students.tt_network import iverson_equal_cores, odd_even_matricization


def small_net(equal_cores: bool, **kw) -> TTNetwork:
    kw.setdefault("output", "raw")
    kw.setdefault("init_std", 0.7)
    return TTNetwork(
        (1, 4, 6), 3, patch_size=2, rank=3, feature_dim=3, equal_cores=equal_cores, **kw
    ).double()


def dense_reference(net: TTNetwork, x: torch.Tensor) -> torch.Tensor:
    """l(X) = W contracted with every patch's feature vector, W built core by core (no engine)."""
    w = net.full_tensor()  # (n, ..., n, C)
    phi = net.features(x)  # (B, d, n)
    out = []
    for b in range(x.shape[0]):
        t = w
        for k in range(net.num_patches):
            t = torch.tensordot(phi[b, k], t, dims=([0], [0]))
        out.append(t)
    return torch.stack(out)


@pytest.mark.parametrize("equal_cores", [False, True])
def test_fast_and_generic_paths_equal_the_dense_reference(equal_cores):
    torch.manual_seed(0)
    net = small_net(equal_cores)
    assert net.num_patches == 6
    x = torch.rand(5, 1, 4, 6, dtype=torch.float64)
    ref = dense_reference(net, x)
    assert torch.allclose(net.raw_forward(x), ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(net.generic_forward(x), ref, rtol=1e-10, atol=1e-12)


def test_patches_are_row_major_blocks():
    net = TTNetwork((1, 4, 4), 2, patch_size=2, rank=2)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    p = net.patches(x)
    assert p.shape == (1, 4, 4)
    assert p[0, 0].tolist() == [0, 1, 4, 5]
    assert p[0, 1].tolist() == [2, 3, 6, 7]
    assert p[0, 3].tolist() == [10, 11, 14, 15]


def test_equal_cores_share_one_tensor_and_count_it_once():
    a = TTNetwork((1, 28, 28), 10, patch_size=4, rank=8, feature_dim=4, equal_cores=True)
    b = TTNetwork((1, 28, 28), 10, patch_size=4, rank=8, feature_dim=4, equal_cores=False)
    fmap = (16 + 1) * 3  # learnable map: A (16 x 3) and b (3)
    assert a.parameter_count() == fmap + 4 * 8 + 8 * 4 * 8 + 8 * 4 * 10 + 1
    assert b.parameter_count() == fmap + 4 * 8 + 47 * 8 * 4 * 8 + 8 * 4 * 10 + 1
    assert a.inner_cores.shape == (1, 8, 4, 8)


@pytest.mark.parametrize(("n", "r", "d"), [(2, 3, 4), (3, 3, 6), (3, 4, 4), (2, 5, 6), (4, 3, 4)])
def test_iverson_equal_cores_reach_rank_q_to_the_d_over_2(n, r, d):
    # The equal-cores expressivity construction: one shared inner core of rank r gives an
    # odd/even matricization of rank q^(d/2), q = min(n, r - 1), far above the TT-rank r.
    first, inner, last = iverson_equal_cores(n, r, d)
    net = TTNetwork(
        (1, 1, d),
        1,
        patch_size=1,
        rank=r,
        feature_map={"name": "poly", "degree": n - 1},
        equal_cores=True,
        output="raw",
    ).double()
    with torch.no_grad():
        net.first.copy_(first)
        net.inner_cores.copy_(inner.unsqueeze(0))
        net.last.copy_(last)
    w = net.full_tensor()[..., 0]
    q = min(n, r - 1)
    # independent truth: the tensor is prod_k [i_(2k-1) = i_(2k) < q]
    idx = torch.stack(torch.meshgrid(*[torch.arange(n)] * d, indexing="ij"), -1)
    expected = torch.ones(w.shape, dtype=torch.float64)
    for k in range(0, d, 2):
        expected *= ((idx[..., k] == idx[..., k + 1]) & (idx[..., k] < q)).double()
    assert torch.equal(w, expected)
    assert torch.linalg.matrix_rank(odd_even_matricization(w)) == q ** (d // 2)
    # the sequential (first half / second half) matricization is bounded by the TT-rank
    half = w.reshape(n ** (d // 2), -1)
    assert torch.linalg.matrix_rank(half) <= r


@pytest.mark.parametrize(("n", "r", "d"), [(2, 2, 4), (3, 2, 4), (3, 3, 4), (2, 3, 6), (3, 4, 6)])
@pytest.mark.parametrize("equal_cores", [False, True])
def test_random_cores_reach_the_expressivity_lower_bound(n, r, d, equal_cores):
    # Khrulkov et al. 2018 (different cores: q = min(n, r)) and the equal-cores theorem
    # (q = min(n, r - 1)): for random cores the odd/even matricization has rank >= q^(d/2);
    # it can never exceed the cut bound r^(d - 1) nor the matrix size n^(d/2).
    torch.manual_seed(n * 100 + r * 10 + d)
    net = TTNetwork(
        (1, 1, d),
        1,
        patch_size=1,
        rank=r,
        feature_map={"name": "poly", "degree": n - 1},
        equal_cores=equal_cores,
        output="raw",
    ).double()
    with torch.no_grad():
        for p in (net.first, net.inner_cores, net.last):
            p.copy_(torch.randn_like(p))
    w = net.full_tensor()[..., 0]
    rank = int(torch.linalg.matrix_rank(odd_even_matricization(w)))
    q = min(n, r - 1) if equal_cores else min(n, r)
    assert q ** (d // 2) <= rank <= min(n ** (d // 2), r ** (d - 1))


def test_gradients_match_finite_differences():
    torch.manual_seed(2)
    for equal in (False, True):
        net = small_net(equal)
        x = torch.rand(3, 1, 4, 6, dtype=torch.float64)
        names = ["first", "inner_cores", "last", "feature_map.weight"]
        params = {
            n: p.detach().clone().requires_grad_() for n, p in net.named_parameters() if n in names
        }

        def f(*tensors, net=net, x=x, names=names):
            return torch.func.functional_call(net, dict(zip(names, tensors, strict=True)), (x,))

        assert torch.autograd.gradcheck(f, tuple(params[n] for n in names))


def test_long_network_is_finite_at_init_and_after_a_step():
    torch.manual_seed(3)
    for equal in (False, True):
        net = TTNetwork(
            (1, 28, 28), 10, patch_size=1, rank=16, feature_map="linear", equal_cores=equal
        )
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
        for _ in range(2):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            assert all(torch.isfinite(g).all() for g in grads)
            opt.step()
        out = net(x)
        assert torch.isfinite(out).all() and out.abs().amax() > 0
        _, log_scale = net.log_forward(x)
        assert torch.isfinite(log_scale).all()


def test_learns_a_patch_task():
    # label = which half of a 4x4 image is brighter: a few Adam steps separate it
    torch.manual_seed(4)
    x = torch.rand(512, 1, 4, 4)
    y = (x[..., :2].sum((1, 2, 3)) > x[..., 2:].sum((1, 2, 3))).long()
    net = TTNetwork((1, 4, 4), 2, patch_size=2, rank=4, feature_dim=4, equal_cores=True)
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    acc = (net(x).argmax(-1) == y).float().mean().item()
    assert acc > 0.93, acc


def test_state_dict_round_trip_and_compile():
    torch.manual_seed(5)
    a = TTNetwork((1, 8, 8), 4, patch_size=2, rank=3, equal_cores=True)
    b = TTNetwork((1, 8, 8), 4, patch_size=2, rank=3, equal_cores=True)
    b.load_state_dict(a.state_dict())
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(a(x), b(x))
    assert torch.allclose(torch.compile(a, backend="eager")(x), a(x), atol=1e-6)


def test_graph_is_the_diagram():
    net = TTNetwork((1, 4, 4), 3, patch_size=2, rank=5, feature_dim=4)
    graph = net.to_graph()
    assert [n.name for n in graph.nodes][:4] == ["core_0", "core_1", "core_2", "core_3"]
    assert graph.input_nodes == ["x_0", "x_1", "x_2", "x_3"]
    assert [e.dimension for e in graph.output_edges] == [3]
    assert graph.node("core_1")["left"].dimension == 5
    assert len(graph.edges()) == 3 + 4 + 1
    assert net.draw() is not None


def test_bad_arguments_name_the_setting():
    with pytest.raises(ValueError, match="patch_size 5x5 must divide the image size 28x28"):
        TTNetwork((1, 28, 28), 10, patch_size=5)
    with pytest.raises(ValueError, match="TTNetwork rank must be a positive integer, but got 0"):
        TTNetwork((1, 28, 28), 10, rank=0)
    with pytest.raises(ValueError, match="takes 1 value"):
        TTNetwork((1, 28, 28), 10, patch_size=4, feature_map="linear")
    with pytest.raises(ValueError, match="at least 2 patches"):
        TTNetwork((1, 4, 4), 2, patch_size=4)
    net = TTNetwork((1, 28, 28), 10, patch_size=4)
    with pytest.raises(ValueError, match="expects 784 inputs per sample, but got 64"):
        net(torch.rand(2, 1, 8, 8))
    assert math.isfinite(net(torch.rand(2, 1, 28, 28)).sum().item())
