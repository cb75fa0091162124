import pytest
import torch

from tnkd.students import MPSClassifier
from tnkd.tn import native
from tnkd.tn.chain import (
    contract_chain,
    default_block,
    default_renorm_every,
    resolve_chain_method,
    sweep_boundary,
)
from tnkd.tn.contraction import CompiledNetwork, einsum_equation
from tnkd.tn.graph import TNGraph, connect, make_node


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


@pytest.mark.parametrize("method", ["scan", "sweep", "tree"])
@pytest.mark.parametrize("position", [0, 5, 11])
def test_fast_paths_equal_the_generic_compiled_contraction(method, position):
    torch.manual_seed(1)
    mps = MPSClassifier(
        11, 4, bond_dim=5, label_position=position, output="raw", init_std=0.6, method=method
    ).double()
    x = torch.rand(6, 11, dtype=torch.float64)
    assert torch.allclose(mps.raw_forward(x), mps.generic_forward(x), rtol=1e-10, atol=1e-13)
    assert mps._compiled.plans == 1


@pytest.mark.parametrize("method", ["scan", "sweep", "tree"])
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


@pytest.mark.parametrize("method", ["scan", "sweep", "tree"])
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


def test_auto_method_is_native_on_cpu_and_tree_or_sweep_on_accelerators():
    # "native" where its kernels compile (tests/test_native_chain.py), else the Python scan
    cpu = "native" if native.kernels() is not None else "scan"
    for bond in (2, 10, 16, 50, 64, 65, 200):
        assert resolve_chain_method("auto", bond, torch.device("cpu")) == cpu
        assert resolve_chain_method("auto", bond) == cpu
    assert resolve_chain_method("auto", 10, torch.device("cuda")) == "tree"
    assert resolve_chain_method("auto", 64, torch.device("cuda")) == "tree"
    assert resolve_chain_method("auto", 65, torch.device("cuda")) == "sweep"
    for method in ("native", "scan", "sweep", "tree"):
        assert resolve_chain_method(method, 10, torch.device("cpu")) == method
    with pytest.raises(ValueError, match="method must be one of"):
        resolve_chain_method("fastest", 10)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("method", ["scan", "sweep"])
@pytest.mark.parametrize("factor", [1e6, 1e-6])
def test_sweep_falls_back_to_renormalising_every_site_when_blocks_would_overflow(
    grad, method, factor
):
    # transfer matrices 1e6 * I: 8 sites between renormalisations would reach 1e48 in float32,
    # and 1e-6 * I would sink to 1e-48, below its range
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


@pytest.mark.parametrize("block", [1, 2, 3, 5])
@pytest.mark.parametrize("method", ["scan", "sweep"])
def test_sweep_intervals_and_blocks_match_a_plain_loop(block, method):
    torch.manual_seed(5)
    start = torch.rand(2, 3, 6, dtype=torch.float64)
    cores = torch.randn(2, 41, 6, 2, 6, dtype=torch.float64)  # 41 sites: blocks leave a rest
    feats = torch.rand(2, 3, 41, 2, dtype=torch.float64)
    ref = start
    for i in range(41):  # no rescaling: float64 holds these values exactly enough
        ref = torch.einsum("kbl,kbs,klsr->kbr", ref, feats[:, :, i], cores[:, i])
    for every in (1, 3, 8, 40):
        v, log_scale = sweep_boundary(
            start, cores, feats, renorm_every=every, block=block, method=method
        )
        assert torch.allclose(v * log_scale.exp().unsqueeze(-1), ref, rtol=1e-10)


@pytest.mark.parametrize("method", ["scan", "sweep"])
def test_sweep_rejects_bad_block_and_interval(method):
    args = (torch.rand(1, 2, 3), torch.rand(1, 4, 3, 2, 3), torch.rand(1, 2, 4, 2))
    with pytest.raises(ValueError, match="block must be a positive integer, but got 0"):
        sweep_boundary(*args, block=0, method=method)
    with pytest.raises(ValueError, match="renorm_every must be a positive integer, but got 0"):
        sweep_boundary(*args, renorm_every=0, method=method)


@pytest.mark.parametrize("chains", [1, 3])
@pytest.mark.parametrize("block", [1, 2, 3])
@pytest.mark.parametrize("every", [1, 4, 100])
def test_scan_values_and_gradients_equal_the_autograd_sweep(chains, block, every):
    # K chains at once, a length that leaves partial blocks and chunks, features with gradients
    # (a learnable map): every input's gradient must equal autograd's through the plain sweep
    torch.manual_seed(6)
    bond, length, d, batch = 5, 37, 3, 4
    start = torch.randn(chains, batch, bond, dtype=torch.float64, requires_grad=True)
    cores = torch.randn(chains, length, bond, d, bond, dtype=torch.float64) / bond**0.5
    cores.requires_grad_()
    feats = torch.rand(chains, batch, length, d, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(chains, batch, bond, dtype=torch.float64)
    results = {}
    for method in ("scan", "sweep"):
        v, log_scale = sweep_boundary(
            start, cores, feats, renorm_every=every, block=block, method=method
        )
        exact = v * log_scale.exp().unsqueeze(-1)
        grads = torch.autograd.grad((exact * weights).sum(), (start, cores, feats))
        results[method] = (exact, *grads)
    for got, want in zip(results["scan"], results["sweep"], strict=True):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)


def test_scan_gradcheck_through_merged_blocks():
    torch.manual_seed(7)
    start = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    cores = torch.randn(2, 5, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    feats = torch.rand(2, 3, 5, 2, dtype=torch.float64, requires_grad=True)

    def f(start, cores, feats):
        v, log_scale = sweep_boundary(start, cores, feats, renorm_every=2, block=2, method="scan")
        return v * log_scale.exp().unsqueeze(-1)

    assert torch.autograd.gradcheck(f, (start, cores, feats))


def test_scan_gradient_survives_an_overflow_between_renormalisations():
    # Every transfer matrix is 1e-3 * I: between two renormalisations (8 sites) the vector
    # shrinks by 1e-24, inside float32's range. Going back, a gradient of size 1e15 is first
    # divided by that scale (1e39: beyond float32) and then shrinks again; the backward pass
    # sees the overflow and redoes both passes renormalising every step.
    bond, length, g = 3, 32, 1e-3
    start = torch.ones(1, 2, bond)
    cores = torch.zeros(1, length, bond, 2, bond)
    cores[:, :, :, 0, :] = g * torch.eye(bond)
    cores[:, :, 0, 1, 2] = g  # an off-diagonal entry reached through the second feature
    cores.requires_grad_()
    feats = torch.zeros(1, 2, length, 2)
    feats[..., 0] = 1.0
    feats[:, 1, :, 1] = 0.5
    weights = torch.tensor([1.0, -2.0, 3.0]) * 1e15
    v, _ = sweep_boundary(start, cores, feats, renorm_every=8, block=2, method="scan")
    (grad,) = torch.autograd.grad((v * weights).sum(), cores)
    # reference: the plain loop in float64, whose range needs no renormalisation here
    c64 = cores.detach().double().requires_grad_()
    ref = start.double()
    for i in range(length):
        ref = torch.einsum("kbl,kbs,klsr->kbr", ref, feats[:, :, i].double(), c64[:, i])
    ref = ref / ref.abs().amax(dim=2, keepdim=True).detach()
    (want,) = torch.autograd.grad((ref * weights.double()).sum(), c64)
    assert torch.isfinite(grad).all()
    assert torch.allclose(grad.double(), want, rtol=1e-4, atol=want.abs().amax().item() * 1e-6)


def test_scan_and_sweep_defaults():
    with torch.no_grad():
        assert default_renorm_every(torch.float32, "sweep") == 8
    assert default_renorm_every(torch.float32, "sweep") == 4  # tests run with grad enabled
    assert default_renorm_every(torch.float16, "scan") == 1
    assert default_renorm_every(torch.float32, "scan") >= 1
    assert default_block(10, "sweep") == 2 and default_block(100, "sweep") == 1
    assert default_block(32, "scan") == 2 and default_block(33, "scan") == 1
