import math

import pytest
import torch
from test_contraction import peps_2x2

from tnkd.students import GraphStudent, MPSClassifier, TreeClassifier
from tnkd.tn.contraction import CompiledNetwork
from tnkd.tn.planner import examine, examine_tree, plan
from tnkd.tn.stable import StableNetwork, log_abs, tree_path


def test_stable_equals_a_handwritten_einsum_on_a_graph_with_loops():
    graph, params = peps_2x2()
    x = torch.rand(7, 4, 2, dtype=torch.float64)
    values, log_scale = StableNetwork(graph)(params + list(x.unbind(1)))
    ref = torch.einsum("rdsl,ret,dfv,efq,ns,nt,nv,nq->nl", *params, *x.unbind(1))
    assert torch.allclose(values * log_scale.exp().unsqueeze(1), ref, rtol=1e-12, atol=1e-12)
    # max-abs 1 per sample: the scale went into log_scale
    assert torch.allclose(values.abs().amax(1), torch.ones(7, dtype=torch.float64))


def test_784_input_trig_chain_is_finite_and_equals_the_fast_chain_path():
    torch.manual_seed(0)
    mps = MPSClassifier(784, 10, bond_dim=6, feature_map="trig", init_std=0.3).double()
    with torch.no_grad():
        mps.cores.mul_(0.3)  # the exact value is ~1e-400: below float64's range
    x = torch.rand(3, 784, dtype=torch.float64)
    net = StableNetwork(mps.to_graph())
    values, log_scale = net(mps.graph_operands(x))
    stable = log_abs(values, log_scale)
    fast = log_abs(*mps.log_forward(x))
    assert torch.isfinite(stable).all() and (values.abs().amax(1) > 0).all()
    assert (stable < -700).all()  # it really is out of float64's range ...
    plain = CompiledNetwork(mps.to_graph(), optimize=net.path)(mps.graph_operands(x))
    # ... where the plain compiled contraction underflows (to 0 or to subnormals, digits lost)
    assert (plain.abs() < 1e-300).all()
    assert torch.allclose(stable, fast, rtol=1e-6, atol=0)


def test_gradients_of_the_stable_contraction_match_finite_differences():
    graph, params = peps_2x2(bond=2)
    x = torch.rand(3, 4, 2, dtype=torch.float64)
    net = StableNetwork(graph)

    def f(*ps):
        values, log_scale = net(list(ps) + list(x.unbind(1)))
        return values * log_scale.exp().unsqueeze(1)

    leaves = [p.clone().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(f, leaves)


def test_steps_of_equal_shape_run_as_one_kernel_per_tree_level():
    tree = TreeClassifier(input_shape=(64,), num_classes=10, bond_dim=4)
    net = tree.network
    assert tree_path(net.spec) is not None
    assert net.depth == 6 and net.kernels == 6  # 64 leaves: 32 + 16 + ... + 1 nodes, 6 levels
    assert [
        len(b) for b, is_input in zip(net.blocks, net.block_is_input, strict=False) if not is_input
    ] == [32, 16, 8, 4, 2, 1]


def test_tree_path_refuses_graphs_with_loops():
    graph, _ = peps_2x2()
    assert tree_path(graph.spec()) is None


def test_the_planner_picks_one_einsum_for_a_small_loop_and_the_tree_engine_for_a_tree():
    graph, _ = peps_2x2()
    shape = examine(graph.spec())
    examine_tree(shape)
    assert shape.shallow and plan(shape).engine == "reference"
    shape = examine(TreeClassifier(input_shape=(16,), bond_dim=3).to_graph().spec())
    network, tree = examine_tree(shape)
    assert tree is not None and plan(shape).engine == "tree"
    assert len(tree.levels) == network.kernels == 4
    shape = examine(MPSClassifier(40, 3, bond_dim=3).to_graph().spec())
    examine_tree(shape)
    assert not shape.shallow  # deep: the stable engine where the chain engine is not asked


def test_auto_reruns_a_shallow_graph_on_the_stable_engine_when_its_values_underflow():
    graph, params = peps_2x2()
    x = torch.rand(2, 4, dtype=torch.float64)
    logs = {}
    for method in ("auto", "reference", "stable"):
        student = GraphStudent(graph, method=method, output="raw").double()
        student.load_node_tensors(
            {n: p * 1e-120 for n, p in zip(student.node_names, params, strict=True)}
        )
        assert student.plan().engine == ("reference" if method == "auto" else method)
        logs[method] = log_abs(*student.log_forward(x))
    assert torch.isinf(logs["reference"]).all()  # ~1e-480 underflows one einsum
    assert torch.isfinite(logs["auto"]).all()
    assert torch.allclose(logs["auto"], logs["stable"], rtol=1e-12)


def test_stable_keeps_values_that_underflow_the_reference_contraction():
    graph, params = peps_2x2()
    tiny = [p * 1e-120 for p in params]  # the value is ~1e-480
    x = torch.rand(2, 4, 2, dtype=torch.float64)
    net = StableNetwork(graph)
    assert (CompiledNetwork(graph)(tiny + list(x.unbind(1))) == 0).all()
    values, log_scale = net(tiny + list(x.unbind(1)))
    ref = torch.log(CompiledNetwork(graph)(params + list(x.unbind(1))).abs())
    assert torch.allclose(log_abs(values, log_scale), ref + 4 * math.log(1e-120), rtol=1e-10)


def test_blocks_round_trip_and_bad_operand_counts_are_clear_errors():
    graph, params = peps_2x2()
    net = StableNetwork(graph)
    x = torch.rand(5, 4, 2, dtype=torch.float64)
    ops = params + list(x.unbind(1))
    back = net.from_blocks(net.to_blocks(ops))
    assert all(torch.equal(a, b) for a, b in zip(ops, back, strict=False))
    with pytest.raises(ValueError, match="expected 8 operands"):
        net(params)
    with pytest.raises(ValueError, match=r"expected .* blocks"):
        net.contract([])


def test_bfloat16_autocast_contracts_in_float32():
    tree = TreeClassifier(input_shape=(16,), bond_dim=3)
    x = torch.rand(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values, log_scale = tree.log_forward(x)
    assert values.dtype == torch.float32
    ref, ref_log = tree.log_forward(x)
    assert torch.allclose(log_abs(values, log_scale), log_abs(ref, ref_log), atol=1e-5)
