import pytest
import torch

from tnkd.students import MPSClassifier
from tnkd.tn.contraction import (
    CompiledNetwork,
    contract_chain,
    einsum_equation,
    resolve_chain_method,
)
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


@pytest.mark.parametrize("method", ["sweep", "tree"])
@pytest.mark.parametrize("position", [0, 5, 11])
def test_fast_paths_equal_the_generic_compiled_contraction(method, position):
    torch.manual_seed(1)
    mps = MPSClassifier(
        11, 4, bond_dim=5, label_position=position, output="raw", init_std=0.6, method=method
    ).double()
    x = torch.rand(6, 11, dtype=torch.float64)
    assert torch.allclose(mps.raw_forward(x), mps.generic_forward(x), rtol=1e-10, atol=1e-13)
    assert mps._compiled.plans == 1


@pytest.mark.parametrize("method", ["sweep", "tree"])
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


@pytest.mark.parametrize("method", ["sweep", "tree"])
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


def test_auto_method_is_sweep_on_cpu():
    assert resolve_chain_method("auto", 10, torch.device("cpu")) == "sweep"
    assert resolve_chain_method("auto", 10, torch.device("cuda")) == "tree"
    assert resolve_chain_method("auto", 64, torch.device("cuda")) == "tree"
    assert resolve_chain_method("auto", 65, torch.device("cuda")) == "sweep"
    with pytest.raises(ValueError, match="method must be one of"):
        resolve_chain_method("fastest", 10)


@pytest.mark.parametrize("grad", [False, True])
def test_sweep_falls_back_to_renormalising_every_site_when_blocks_would_overflow(grad):
    # transfer matrices 1e6 * I: 8 sites between renormalisations would reach 1e48 in float32
    mps = MPSClassifier(64, 3, bond_dim=4, init_std=0.0, output="raw", method="sweep")
    with torch.no_grad():
        mps.cores.mul_(1e6)
    with torch.set_grad_enabled(grad):
        values, log_scale = mps.log_forward(torch.rand(2, 64))
    expected = 64 * torch.log(torch.tensor(1e6, dtype=torch.float64)).item()
    assert torch.allclose(
        log_scale.double(), torch.full((2,), expected, dtype=torch.float64), rtol=1e-6
    )
    assert torch.allclose(values, torch.ones(2, 3), atol=1e-5)


@pytest.mark.parametrize("block", [1, 2, 3, 5])
def test_sweep_intervals_and_blocks_match_a_plain_loop(block):
    from tnkd.tn.contraction import sweep_boundary

    torch.manual_seed(5)
    start = torch.rand(2, 3, 6, dtype=torch.float64)
    cores = torch.randn(2, 41, 6, 2, 6, dtype=torch.float64)  # 41 sites: blocks leave a rest
    feats = torch.rand(2, 3, 41, 2, dtype=torch.float64)
    ref = start
    for i in range(41):  # no rescaling: float64 holds these values exactly enough
        ref = torch.einsum("kbl,kbs,klsr->kbr", ref, feats[:, :, i], cores[:, i])
    for every in (1, 3, 8, 40):
        v, log_scale = sweep_boundary(start, cores, feats, renorm_every=every, block=block)
        assert torch.allclose(v * log_scale.exp().unsqueeze(-1), ref, rtol=1e-10)


def test_sweep_rejects_bad_block_and_interval():
    from tnkd.tn.contraction import sweep_boundary

    args = (torch.rand(1, 2, 3), torch.rand(1, 4, 3, 2, 3), torch.rand(1, 2, 4, 2))
    with pytest.raises(ValueError, match="block"):
        sweep_boundary(*args, block=0)
    with pytest.raises(ValueError, match="renorm_every"):
        sweep_boundary(*args, renorm_every=0)
