"""The tree engine (tnkd.tn.fused) against dense einsum, finite differences and the stable engine.

Each test runs the native level loop and, with ``plan.native = False``, the stable engine that
runs the plan where the native loop does not; where the native kernels cannot be built both runs
are the stable engine. Tests whose reference is the stable engine itself run the native loop
only (against itself the stable engine would prove nothing).
"""

import pytest
import torch
from tn_reference import dense_coefficients, evaluate_dense

import tnkd.tn.fused as fused
from tnkd.students import TreeClassifier
from tnkd.tn.stable import StableNetwork, direction_logits, log_abs

NATIVE = pytest.mark.parametrize("native", [True, False], ids=["native", "stable"])


def NATIVE_ONLY(test):
    """The native loop only (skipped without its kernels): these tests' reference is the stable
    engine, so a stable variant would compare it with itself."""
    marked = pytest.mark.parametrize("native", [True], ids=["native"])(test)
    return pytest.mark.usefixtures("tree_kernels")(marked)


def _tree(*args, native=True, **kwargs):
    tree = TreeClassifier(*args, **kwargs)
    tree.tree_plan.native = native
    return tree


def _exact(tree, blocks, every=False):
    values, log_scale = tree.tree_plan.contract(blocks, every)
    return values * log_scale.exp().unsqueeze(1)


def _with_params(tree, x):
    """f(parameter blocks) -> exact values, for gradcheck."""

    def f(*params):
        inputs = iter(
            b for b, k in zip(tree.operand_blocks(x), tree._block_kinds, strict=True) if k
        )
        it = iter(params)
        return _exact(tree, [next(inputs) if k else next(it) for k in tree._block_kinds])

    return f


def _dense_logits(tree, x):
    """s f / ||f|| from the dense coefficient tensor (independent of tnkd's engines)."""
    f = evaluate_dense(dense_coefficients(tree.to_graph()), list(tree.features(x).unbind(1)))
    return tree.log_logit_scale.exp() * f / f.norm(dim=1, keepdim=True)


def _stable_logits(tree, x):
    """The logits by the stable engine (einsum and autograd) from the same parameters."""
    return direction_logits(tree.network.contract(tree.operand_blocks(x))[0], tree.log_logit_scale)


@NATIVE
@pytest.mark.parametrize("input_shape", [(16,), (1, 5, 3)])  # balanced; odd sites passed up
def test_tree_engine_equals_dense_einsum_and_finite_differences(input_shape, native):
    torch.manual_seed(2)
    tree = _tree(input_shape, num_classes=3, bond_dim=3, output="raw", init_std=0.5, native=native)
    tree = tree.double()
    assert tree.plan().engine == "tree"
    x = torch.rand(4, *input_shape, dtype=torch.float64)
    ref = evaluate_dense(dense_coefficients(tree.to_graph()), list(tree.features(x).unbind(1)))
    assert torch.allclose(tree(x), ref, rtol=1e-10, atol=1e-12)
    leaves = [p.detach().clone().requires_grad_() for p in tree.blocks]
    assert torch.autograd.gradcheck(_with_params(tree, x), leaves)


@NATIVE
def test_tree_engine_passes_gradients_to_learned_features(native):
    torch.manual_seed(3)
    tree = _tree((8,), num_classes=2, bond_dim=3, output="raw", feature_map="learnable")
    tree = tree.double()
    tree.tree_plan.native = native
    x = torch.rand(3, 8, dtype=torch.float64)
    blocks = [b.detach().clone().requires_grad_() for b in tree.operand_blocks(x)]
    assert torch.autograd.gradcheck(lambda *ops: _exact(tree, list(ops)), blocks)


@NATIVE_ONLY
@pytest.mark.parametrize("feature_map", ["linear", "trig"])
def test_tree_engine_reruns_renormalising_every_level_when_values_leave_the_range(
    feature_map, native
):
    torch.manual_seed(4)
    tree = _tree((64,), num_classes=3, bond_dim=4, feature_map=feature_map, native=native)
    with torch.no_grad():
        for block in tree.blocks:
            block.mul_(1e5)  # 1e35 after the 7 nodes below a renormalisation: digits lost
    x = torch.rand(5, 64)
    plan = tree.tree_plan
    blocks = tree.operand_blocks(x)
    ext = plan.kernels(blocks)  # the native loop's first pass leaves the range: a rerun is needed
    plain = [b.detach() for b in plan.arranged(blocks)]
    assert fused.native_tree_forward(ext, plan.levels, plain, False, None, False) is None
    values, log_scale = plan.contract(blocks)
    ref_values, ref_log = tree.network.contract(blocks)  # the stable engine
    assert torch.isfinite(values).all() and torch.isfinite(log_scale).all()
    assert torch.allclose(log_abs(values, log_scale), log_abs(ref_values, ref_log), atol=1e-3)
    logits = tree(x)  # fused [1, x] leaves and the head rerun too
    ref = ref_values / ref_values.norm(dim=1, keepdim=True) * tree.log_logit_scale.exp()
    assert torch.isfinite(logits).all() and torch.allclose(logits, ref, atol=1e-5)


@NATIVE_ONLY
def test_1024_site_trig_tree_is_finite_and_equals_the_stable_engine(native):
    torch.manual_seed(5)
    tree = _tree((1024,), num_classes=4, bond_dim=4, feature_map="trig", native=native)
    x = torch.rand(3, 1024)
    blocks = tree.operand_blocks(x)
    values, log_scale = tree.tree_plan.contract(blocks)
    ref_values, ref_log = tree.network.contract(blocks)
    fast, ref = log_abs(values, log_scale), log_abs(ref_values, ref_log)
    assert torch.isfinite(fast).all() and (values.abs().amax(1) > 0).all()
    assert (fast.abs() > 100).all()  # |log f| > 88: the exact value is outside float32 range
    assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-3)
    logits, ref_logits = tree(x), _stable_logits(tree, x)
    assert torch.isfinite(logits).all() and torch.allclose(logits, ref_logits, atol=1e-5)
    # float32 sums of entries up to ~400: rounding of a few 1e-6 of a block's largest entry
    for out, want in ((values, ref_values), (logits, ref_logits)):
        g_fast = torch.autograd.grad(out.sum(), list(tree.blocks))
        g_ref = torch.autograd.grad(want.sum(), list(tree.blocks))
        for a, b in zip(g_fast, g_ref, strict=True):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-5 * b.abs().amax().item())


def test_graphs_with_other_steps_are_not_trees():
    from test_contraction import peps_2x2

    graph, _ = peps_2x2()
    plan, why = fused.tree_plan(StableNetwork(graph))
    assert plan is None and "two children" in why


@NATIVE
@pytest.mark.parametrize("feature_map", ["linear", "trig"])  # fused [1, x] leaves; general map
def test_tree_logits_equal_dense_einsum_and_finite_differences(feature_map, native):
    torch.manual_seed(6)
    tree = _tree((16,), num_classes=3, bond_dim=3, feature_map=feature_map, init_std=0.5)
    tree = tree.double()
    tree.tree_plan.native = native
    assert tree.fast_path and tree._linear_leaves == (feature_map == "linear")
    x = torch.rand(5, 16, dtype=torch.float64)
    assert torch.allclose(tree(x), _dense_logits(tree, x), rtol=1e-10, atol=1e-12)
    params = [p.detach().clone().requires_grad_() for p in tree.parameters()]

    def f(*ps):  # the logits as a function of the weights and the logit scale
        scale = next(q for q in ps if q.ndim == 0)
        weights = [q for q in ps if q.ndim == 4]
        inputs = [b for b, k in zip(tree.operand_blocks(x), tree._block_kinds, strict=True) if k]
        return tree.tree_plan.normalized_logits([*inputs, *weights], scale)

    assert torch.autograd.gradcheck(f, params)
    # the whole forward (fused leaves, the head) against autograd through the stable engine
    grads = torch.autograd.grad(tree(x).sin().sum(), list(tree.parameters()))
    ref = torch.autograd.grad(_stable_logits(tree, x).sin().sum(), list(tree.parameters()))
    for a, b in zip(grads, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_normalized_logits_gradients_match_finite_differences():
    torch.manual_seed(7)
    values = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    out = direction_logits(values, scale)
    assert torch.allclose(out, scale.exp() * values / values.norm(dim=1, keepdim=True))
    assert torch.autograd.gradcheck(direction_logits, (values, scale))


@NATIVE
def test_pending_backward_passes_and_retain_graph(native):
    torch.manual_seed(8)
    tree = _tree((32,), num_classes=4, bond_dim=4, init_std=0.5, native=native).double()
    x1, x2 = torch.rand(6, 32, dtype=torch.float64), torch.rand(6, 32, dtype=torch.float64)
    params = list(tree.parameters())
    one = [torch.autograd.grad(tree(x).square().sum(), params) for x in (x1, x2)]
    l1, l2 = tree(x1).square().sum(), tree(x2).square().sum()  # both forwards first
    g2 = torch.autograd.grad(l2, params)
    g1 = torch.autograd.grad(l1, params, retain_graph=True)
    again = torch.autograd.grad(l1, params)  # a second backward through the same graph
    for a, b, c, d, e in zip(one[0], one[1], g1, g2, again, strict=True):
        assert torch.allclose(a, c) and torch.allclose(b, d) and torch.allclose(a, e)


@NATIVE
@pytest.mark.parametrize("every", [False, True])  # the root's norm checked; renormalised first
def test_the_head_equals_the_stable_engine_with_a_small_root(every, native):
    torch.manual_seed(9)
    tree = _tree((64,), num_classes=10, bond_dim=8, native=native).double()
    with torch.no_grad():
        tree.blocks[-1].mul_(1e-3)  # ||root|| far below 1, every other value near 1
    x = torch.rand(5, 64, dtype=torch.float64)
    pairs = x.T.reshape(32, 2, 5)
    plan = tree.tree_plan
    blocks = [pairs, pairs, *tree.blocks]
    logits = plan.normalized_logits(blocks, tree.log_logit_scale, linear_leaves=True, every=every)
    ref = _stable_logits(tree, x)
    assert torch.allclose(logits, ref, rtol=1e-10, atol=1e-12)
    params = list(tree.parameters())
    g = torch.autograd.grad(logits.sin().sum(), params)
    g_ref = torch.autograd.grad(ref.sin().sum(), params)
    for a, b in zip(g, g_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


@NATIVE_ONLY
def test_the_plan_reruns_renormalising_every_level_when_values_leave_the_range(native):
    torch.manual_seed(10)
    tree = _tree((64,), num_classes=3, bond_dim=4, output="raw", native=native).double()
    plan = tree.tree_plan
    assert sum(lv[3] for lv in plan.levels) == 2  # the network's plan renormalises two levels
    x = torch.rand(4, 64, dtype=torch.float64)
    with torch.no_grad():
        for block in tree.blocks:
            block.mul_(1e50)  # 7 weights between renormalisations: 1e350, beyond float64
    blocks = tree.operand_blocks(x)
    values, log_scale = plan.contract(blocks)
    ref_values, ref_log = tree.network.contract(blocks)
    assert torch.isfinite(values).all() and (log_scale > 700).all()  # exp(700): beyond float64
    assert torch.allclose(log_abs(values, log_scale), log_abs(ref_values, ref_log), atol=1e-9)
    assert torch.allclose(values, ref_values, atol=1e-12)


@NATIVE
def test_gradients_reach_the_inputs_when_they_need_them(native):
    torch.manual_seed(11)
    tree = _tree((16,), num_classes=3, bond_dim=3, init_std=0.5, native=native).double()
    x = torch.rand(4, 16, dtype=torch.float64, requires_grad=True)
    (g_x,) = torch.autograd.grad(tree(x).sin().sum(), x)  # not through the fused [1, x] leaves
    (ref,) = torch.autograd.grad(_stable_logits(tree, x).sin().sum(), x)
    assert torch.allclose(g_x, ref, rtol=1e-10, atol=1e-12) and g_x.abs().sum() > 0
    pairs = x.T.reshape(8, 2, 4)
    blocks = [pairs, pairs, *tree.blocks]
    with pytest.raises(ValueError, match="no gradient"):
        tree.tree_plan.normalized_logits(blocks, tree.log_logit_scale, linear_leaves=True)
