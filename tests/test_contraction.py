import pytest
import torch

from tnkd.students import MPSClassifier
from tnkd.tn import chain, native
from tnkd.tn.chain import contract_chain
from tnkd.tn.contraction import CompiledNetwork, einsum_equation
from tnkd.tn.graph import TNGraph, connect, make_node
from tnkd.tn.planner import chain_kernel


def peps_2x2(bond: int = 3, phys: int = 2, label: int = 4) -> tuple[TNGraph, list[torch.Tensor]]:
    """A 2x2 PEPS (a loop, not a chain) with an input on every site and a label leg on site a."""
    torch.manual_seed(0)
    t = {
        "a": torch.randn(bond, bond, phys, label, dtype=torch.float64),  # right, down, phys, label
        "b": torch.randn(bond, bond, phys, dtype=torch.float64),  # left, down, phys
        "c": torch.randn(bond, bond, phys, dtype=torch.float64),  # up, right, phys
        "d": torch.randn(bond, bond, phys, dtype=torch.float64),  # up, left, phys
    }
    a = make_node(t["a"], "a", ["right", "down", "phys", "label"])
    b = make_node(t["b"], "b", ["left", "down", "phys"])
    c = make_node(t["c"], "c", ["up", "right", "phys"])
    d = make_node(t["d"], "d", ["up", "left", "phys"])
    connect(a, "right", b, "left")
    connect(a, "down", c, "up")
    connect(b, "down", d, "up")
    connect(c, "right", d, "left")
    inputs = []
    for node in (a, b, c, d):
        x = make_node((phys,), f"x_{node.name}", ["phys"])
        connect(node, "phys", x, "phys")
        inputs.append(x)
    graph = TNGraph([a, b, c, d, *inputs], [n.name for n in inputs], [a["label"]])
    return graph, [t["a"], t["b"], t["c"], t["d"]]


@pytest.mark.parametrize("optimize", ["greedy", "dp", "optimal"])
def test_non_chain_graph_equals_a_handwritten_einsum(optimize):
    graph, params = peps_2x2()
    net = CompiledNetwork(graph, optimize=optimize)
    x = torch.rand(7, 4, 2, dtype=torch.float64)
    out = net(params + list(x.unbind(1)))
    # written out by hand: a(r,d,s,l) b(r,e,t) c(d,f,v) d(e,f,q)
    ref = torch.einsum("rdsl,ret,dfv,efq,ns,nt,nv,nq->nl", *params, *x.unbind(1))
    assert out.shape == (7, 4)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_path_is_planned_once_for_any_batch_size():
    graph, params = peps_2x2()
    net = CompiledNetwork(graph)
    for batch in (3, 5, 3, 8):
        x = torch.rand(batch, 4, 2, dtype=torch.float64)
        net(params + list(x.unbind(1)))
    assert net.plans == 1
    assert len(net._expressions) == 3  # one cached expression per distinct set of shapes


def test_equation_uses_a_batch_index_on_inputs_only():
    graph, _ = peps_2x2()
    eq = einsum_equation(graph.spec())
    lhs, rhs = eq.split("->")
    terms = lhs.split(",")
    batch = rhs[0]
    assert all(batch not in t for t in terms[:4]) and all(t[0] == batch for t in terms[4:])


def test_wrong_operand_count_is_a_clear_error():
    graph, params = peps_2x2()
    with pytest.raises(ValueError, match="expected 8 operands"):
        CompiledNetwork(graph)(params)


@pytest.mark.parametrize("method", ["native", "scan", "log_depth"])
@pytest.mark.parametrize("position", [0, 5, 11])
def test_fast_paths_equal_the_generic_compiled_contraction(method, position):
    torch.manual_seed(1)
    mps = MPSClassifier(
        11, 4, bond_dim=5, label_position=position, output="raw", init_std=0.6, method=method
    ).double()
    x = torch.rand(6, 11, dtype=torch.float64)
    assert torch.allclose(mps.raw_forward(x), mps.generic_forward(x), rtol=1e-10, atol=1e-13)
    assert mps._compiled.plans == 1


@pytest.mark.parametrize("method", ["native", "scan", "log_depth"])
def test_fast_paths_gradcheck(method):
    torch.manual_seed(2)
    bond, n, d, c = 3, 6, 2, 2
    left = torch.randn(bond, dtype=torch.float64, requires_grad=True)
    right = torch.randn(bond, dtype=torch.float64, requires_grad=True)
    cores = torch.randn(n, bond, d, bond, dtype=torch.float64, requires_grad=True)
    out = torch.randn(bond, c, bond, dtype=torch.float64, requires_grad=True)
    feats = torch.rand(4, n, d, dtype=torch.float64, requires_grad=True)

    def f(left, cores, right, feats, out):
        values, log_scale = contract_chain(left, cores, right, feats, out, 2, method)
        return values * log_scale.exp().unsqueeze(-1)

    assert torch.autograd.gradcheck(f, (left, cores, right, feats, out))


@pytest.mark.parametrize("method", ["native", "scan", "log_depth"])
def test_784_sites_bond_100_finite_values_and_gradients(method):
    torch.manual_seed(3)
    mps = MPSClassifier(784, 10, bond_dim=100, method=method)
    x = torch.rand(2, 784)
    logits = mps(x)
    assert torch.isfinite(logits).all() and logits.abs().amax() > 0
    logits.logsumexp(-1).sum().backward()
    for p in mps.parameters():
        assert torch.isfinite(p.grad).all()
    assert mps.cores.grad.abs().amax() > 0
    values, log_scale = mps.log_forward(x)
    assert torch.isfinite(log_scale).all() and torch.isfinite(values).all()


def test_raw_value_that_overflows_float32_is_carried_by_the_log_scale():
    # every transfer matrix is 2 * I: f = 2^784 * (left . O . right), far beyond float32's range
    mps = MPSClassifier(784, 3, bond_dim=4, init_std=0.0, output="raw")
    with torch.no_grad():
        mps.cores.mul_(2.0)
    values, log_scale = mps.log_forward(torch.rand(2, 784))
    assert torch.allclose(
        log_scale, torch.full((2,), 784 * torch.log(torch.tensor(2.0)).item()), rtol=1e-5
    )
    assert torch.allclose(values, torch.ones(2, 3), atol=1e-5)


def test_auto_kernel_is_native_on_cpu_and_log_depth_or_scan_on_accelerators():
    # "native" where its kernels compile (tests/test_native_chain.py), else the Python scan
    cpu = "native" if native.kernels() is not None else "scan"
    for bond in (2, 10, 16, 50, 64, 65, 200):
        assert chain_kernel("auto", bond, torch.device("cpu"))[0] == cpu
        assert chain_kernel("auto", bond)[0] == cpu
    assert chain_kernel("auto", 10, torch.device("cuda"))[0] == "log_depth"
    assert chain_kernel("auto", 64, torch.device("cuda"))[0] == "log_depth"
    assert chain_kernel("auto", 65, torch.device("cuda"))[0] == "scan"
    for kernel in ("scan", "log_depth"):
        assert chain_kernel(kernel, 10, torch.device("cpu"))[0] == kernel
    # the native scan takes float32 and float64 on a CPU; anything else runs the Python scan
    assert chain_kernel("native", 10, torch.device("cuda"))[0] == "scan"
    assert chain_kernel("native", 10, None, torch.float16)[0] == "scan"
    with pytest.raises(ValueError, match="chain kernel must be one of"):
        chain_kernel("fastest", 10)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("method", ["native", "scan"])
@pytest.mark.parametrize("factor", [1e6, 1e-6])
def test_scan_falls_back_to_renormalising_every_site_when_blocks_would_overflow(
    grad, method, factor
):
    # transfer matrices 1e6 * I: 16 sites between renormalisations would reach 1e96 in float32,
    # and 1e-6 * I would sink to 1e-96, below its range
    mps = MPSClassifier(64, 3, bond_dim=4, init_std=0.0, output="raw", method=method)
    with torch.no_grad():
        mps.cores.mul_(factor)
    with torch.set_grad_enabled(grad):
        values, log_scale = mps.log_forward(torch.rand(2, 64))
    expected = 64 * torch.log(torch.tensor(factor, dtype=torch.float64)).item()
    assert torch.allclose(
        log_scale.double(), torch.full((2,), expected, dtype=torch.float64), rtol=1e-6
    )
    assert torch.allclose(values, torch.ones(2, 3), atol=1e-5)


def _dense_chains(left, cores, right, feats, out, position):
    """M chains' exact values, (M, B, C), by explicit products site by site (no rescaling)."""
    mats = torch.einsum("mnlsr,bns->mbnlr", cores, feats)
    u = left.unsqueeze(1).expand(-1, feats.shape[0], -1)
    for i in range(position):
        u = torch.einsum("mbl,mblr->mbr", u, mats[:, :, i])
    w = right.unsqueeze(1).expand(-1, feats.shape[0], -1)
    for i in reversed(range(position, cores.shape[1])):
        w = torch.einsum("mblr,mbr->mbl", mats[:, :, i], w)
    return torch.einsum("mbl,mlcr,mbr->mbc", u, out, w)


def _random_chains(members, length, bond, d=2, batch=3, classes=2, seed=5):
    torch.manual_seed(seed)
    left = torch.randn(members, bond, dtype=torch.float64)
    right = torch.randn(members, bond, dtype=torch.float64)
    cores = torch.randn(members, length, bond, d, bond, dtype=torch.float64) / bond**0.5
    out = torch.randn(members, bond, classes, bond, dtype=torch.float64)
    feats = torch.rand(batch, length, d, dtype=torch.float64)
    return [t.requires_grad_() for t in (left, cores, right, feats, out)]


@pytest.mark.parametrize("merge", [False, True])  # one site per step, or pairs of sites
@pytest.mark.parametrize("method", ["native", "scan"])
@pytest.mark.parametrize("members", [1, 3])
def test_renormalisation_intervals_and_blocks_match_a_plain_loop(
    monkeypatch, merge, method, members
):
    # 41 sites: blocks leave a rest, halves of different lengths; values and every gradient
    # (features too: a learnable map) equal autograd through the plain float64 loop
    monkeypatch.setattr(chain, "SCAN_MAX_MERGED_BOND_DIM", 32 if merge else 1)
    args = _random_chains(members, 41, 5, d=3)
    ref = _dense_chains(*args, 17)
    weights = torch.randn_like(ref)
    want = torch.autograd.grad((ref * weights).sum(), args)
    for every in (1, 3, 8, 40):
        monkeypatch.setattr(chain, "SCAN_RENORM_EVERY", every)
        values, log_scale = contract_chain(*args, 17, method)
        exact = values * log_scale.exp().unsqueeze(-1)
        assert torch.allclose(exact, ref, rtol=1e-10, atol=1e-14)
        got = torch.autograd.grad((exact * weights).sum(), args)
        for g, w in zip(got, want, strict=True):
            assert torch.allclose(g, w, rtol=1e-9, atol=1e-12)


def test_members_and_bad_arguments_are_checked():
    left, cores, right, feats, out = _random_chains(2, 6, 3)
    with pytest.raises(ValueError, match="chain kernel must be one of"):
        contract_chain(left, cores, right, feats, out, 2, "sweepy")
    with pytest.raises(ValueError, match="expected features for 6 sites, but got 5"):
        contract_chain(left, cores, right, feats[:, :5], out, 2)
    with pytest.raises(ValueError, match=r"position must be in \[0, 6\], but got 7"):
        contract_chain(left, cores, right, feats, out, 7)


@pytest.mark.parametrize("method", ["native", "scan", "log_depth"])
def test_members_and_a_reading_label_tensor_pass_gradcheck(method):
    # M = 2 chains of one shape, and an output core that reads an input (D, d, C, D)
    left, cores, right, feats, _ = _random_chains(2, 5, 3, seed=7)
    out = torch.randn(2, 3, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    label_feats = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)

    def f(left, cores, right, feats, out, label_feats):
        values, log_scale = contract_chain(left, cores, right, feats, out, 2, method, label_feats)
        return values * log_scale.exp().unsqueeze(-1)

    assert torch.autograd.gradcheck(f, (left, cores, right, feats, out, label_feats))


def test_native_gradient_survives_an_overflow_between_renormalisations(monkeypatch):
    # Every transfer matrix is 1e-3 * I: between two renormalisations (8 sites) the vector
    # shrinks by 1e-24, inside float32's range. Going back, a gradient of size 1e15 is first
    # divided by that scale (1e39: beyond float32) and then shrinks again; the native backward
    # pass sees the overflow and redoes both passes renormalising every step. (The Python
    # scan's autograd cannot redo a pass: it is the fallback for ordinary gradients.)
    if native.kernels() is None:
        pytest.skip("the native chain scan cannot be compiled here")
    method = "native"
    monkeypatch.setattr(chain, "SCAN_RENORM_EVERY", 8)
    bond, length, g = 3, 32, 1e-3
    cores = torch.zeros(length, bond, 2, bond)
    cores[:, :, 0, :] = g * torch.eye(bond)
    cores[:, 0, 1, 2] = g  # an off-diagonal entry reached through the second feature
    cores.requires_grad_()
    feats = torch.zeros(2, length, 2)
    feats[..., 0] = 1.0
    feats[1, :, 1] = 0.5
    # the label at the end, read off the left half's vector: values[c] = u[c]
    out = torch.zeros(bond, bond, bond)
    out[:, :, 0] = torch.eye(bond)
    right = torch.eye(bond)[0]
    weights = torch.tensor([1.0, -2.0, 3.0]) * 1e15
    values, _ = contract_chain(torch.ones(bond), cores, right, feats, out, length, method)
    (grad,) = torch.autograd.grad((values * weights).sum(), cores)
    # reference: the plain loop in float64, whose range needs no renormalisation here
    c64 = cores.detach().double().requires_grad_()
    ref = torch.ones(2, bond, dtype=torch.float64)
    for i in range(length):
        ref = torch.einsum("bl,bs,lsr->br", ref, feats[:, i].double(), c64[i])
    ref = ref / ref.abs().amax(dim=1, keepdim=True).detach()
    (want,) = torch.autograd.grad((ref * weights.double()).sum(), c64)
    assert torch.isfinite(grad).all()
    assert torch.allclose(grad.double(), want, rtol=1e-4, atol=want.abs().amax().item() * 1e-6)


def test_scan_settings():
    assert chain._settings(torch.float16, 10) == (1, 2)  # float16: renormalise every site
    assert chain._settings(torch.float32, 32) == (chain.SCAN_RENORM_EVERY, 2)
    assert chain._settings(torch.float64, 33)[1] == 1  # no merged pairs above D = 32
